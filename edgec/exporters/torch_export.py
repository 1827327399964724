"""torch.nn.Module → onnx_ir.Model with the dynamo exporter, plus the parameter map.

Input names are the module's ``forward`` argument names; outputs are ``output`` (one) or
``output_<i>`` (``i`` its position in what forward returned, a skipped None counted) unless
names are given or forward returns a dict of tensors, whose keys name them (``_out`` added to
one that is an input name, ``_out_1``, ``_out_2``, ... where that is taken too). Dynamic dims
are given as ``{input: {axis: dim_name}}`` or, for a tensor, a list of one name or None per axis.
A failed export is a UserError when the module is at fault (torch.export cannot capture it, or an
operator has no ONNX translation) and an InternalError when the exporter itself breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir
import torch

from edgec.errors import InternalError, UserError
from edgec.exporters.outputs import flatten_outputs, output_keys, positional_names
from edgec.exporters.param_map import build_parameter_map

__all__ = ["ExportResult", "ModuleState", "export_module", "forward_input_names"]

logger = logging.getLogger(__name__)
OPSET = 20


@dataclasses.dataclass
class ExportResult:
    model: ir.Model
    parameter_map: dict[str, dict[str, str]]
    input_names: list[str]
    output_names: list[str]
    # {dim name: [least, most or None]}: the sizes torch.export traced a dynamic dim for, where
    # that is narrower than "any" (forward branched on the size, or edgec's doubling below)
    dim_ranges: dict[str, list] = dataclasses.field(default_factory=dict)
    # sympy relations over dim names (symbols named as the ONNX dims) that torch.export asserted
    # and no per-dim range expresses (``b*s > 10``, ``s % 2 == 0``): dim_ranges probes them
    guards: list = dataclasses.field(default_factory=list)
    doubled: list[str] = dataclasses.field(default_factory=list)  # dims traced at twice 1


def forward_input_names(module: torch.nn.Module, n: int, every: bool = False) -> list[str]:
    """The names of forward's first ``n`` positional arguments (``every``: all of them)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if every:
        return [p.name for p in params]
    if len(params) < n:
        raise UserError(f"{type(module).__name__}.forward takes {len(params)} positional "
                        f"inputs but {n} example inputs were given")
    return [p.name for p in params[:n]]


class ModuleState:
    """A module's buffers (copied) and parameters (their in-place version counters), to put
    the buffers back after edgec ran forward and to refuse a forward that changes either.

    A forward that updates its own state (``self.n += 1``) gives results that depend on how
    often it ran; the exported graph holds the state of one moment as a constant (the artifact
    computed ``x + 2`` forever after two runs, its check against PyTorch passing)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        self.params = {n: p._version for n, p in module.named_parameters()}

    def changed(self) -> list[tuple[str, str]]:
        """(kind, name) of each buffer whose values and parameter whose data forward changed."""
        now = dict(self.module.named_buffers())
        out = [("buffer", n) for n, b in self.buffers.items()
               if n not in now or now[n] is None or now[n].shape != b.shape
               or not torch.equal(now[n].detach().cpu(), b.cpu())]
        return out + [("parameter", n) for n, p in self.module.named_parameters()
                      if self.params.get(n, p._version) != p._version]

    def restore(self) -> None:
        """The buffers as they were (values, in place: the module's own tensors)."""
        now = dict(self.module.named_buffers())
        with torch.no_grad():
            for n, b in self.buffers.items():
                if n in now and now[n] is not None and now[n].shape == b.shape:
                    now[n].copy_(b)

    def refuse_changes(self) -> None:
        changed = self.changed()
        if not changed:
            return
        self.restore()
        kind, name = changed[0]
        raise UserError(
            f"{type(self.module).__name__}.forward changes its {kind} {name!r} in place, so "
            "its results depend on how often it ran, which one exported graph cannot "
            f"compute; compute the value from the inputs, or update the {kind} outside forward "
            "(edgec exports forward as a pure function of its inputs)")


def export_module(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
    opset: int | None = None,
) -> ExportResult:
    """Export ``module`` (eval mode) with ``torch.onnx.export(dynamo=True)``.

    ``input_names``: the ONNX names of the flattened inputs when an argument is a tuple of
    tensors (a KV cache); ``dynamic_shapes`` then gives that argument a list, one dict per tensor.
    ``opset``: the ONNX opset (default 20); at 23 ``scaled_dot_product_attention`` becomes one
    ONNX ``Attention`` (grouped-query by head counts) that runtimes fuse.
    """
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}")
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, (torch.Tensor, tuple))
                                     for t in example_inputs):
        raise UserError("example_inputs must be a non-empty tuple of tensors, one per forward "
                        "argument")
    module = module.eval()
    names = forward_input_names(module, len(example_inputs))
    shapes = None
    if dynamic_shapes:
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise UserError(f"dynamic_shapes names {unknown[0]!r}, which is not a forward "
                            f"argument (arguments: {', '.join(names)})")
        dynamic_shapes = {n: _tensor_dims(n, dynamic_shapes[n], t) if isinstance(t, torch.Tensor)
                          else dynamic_shapes[n]
                          for n, t in zip(names, example_inputs) if n in dynamic_shapes}
        _one_size_per_name(dynamic_shapes, names, example_inputs)
        shapes = {n: _dims(dynamic_shapes.get(n, {})) for n in names}
    state = ModuleState(module)
    with torch.no_grad():
        out = module(*example_inputs)
    state.refuse_changes()
    out_names = list(output_names or output_keys(out) or positional_names(out))
    _count_outputs(out)  # a non-tensor output refused in one line
    taken = set(input_names or names)
    if output_names and taken & set(out_names):
        raise UserError(f"output name {sorted(taken & set(out_names))[0]!r} is also an input "
                        "name; ONNX names must be unique")
    out_names = _unclashed(out_names, taken)
    # torchvision is optional; its missing-op registrations are not our users' concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    said = io.StringIO()  # what torch printed to stderr (a failed capture dumps its graph)
    traced = _unpinned(example_inputs, names, dynamic_shapes)
    captured: list = []  # what torch.export captured, its shape asserts not yet dropped
    try:
        # The exporter prints its own progress to stdout and warns liberally; we report instead.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(said), _quiet(_EXPORTER_NOTES), _captured(captured), \
                _one_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, traced, dynamo=True,
                dynamic_shapes=shapes,
                input_names=list(input_names or names), output_names=out_names,
                opset_version=opset or OPSET, verbose=False, optimize=True,
            )
    except Exception as e:
        if os.environ.get("EDGEC_DEBUG"):
            sys.stderr.write(said.getvalue())
        raise _classify_export_error(type(module).__name__, e,
                                     getattr(module, "fixed_dim_remedy", None),
                                     dict(zip(names, example_inputs)), dynamic_shapes) from e
    model = program.model
    from edgec import __version__

    model.producer_name, model.producer_version = "edgec", __version__  # not torch's version
    pmap = build_parameter_map(model, module)
    logger.info("exported %s: %d nodes, %d initializers, %d parameters mapped",
                type(module).__name__, len(model.graph), len(model.graph.initializers), len(pmap))
    # KV-cache decoders (tuple arguments) are left as they were: their dims are tied by sums
    # (the mask spans past + new tokens), and edgec checks their feeds itself (_check_dims)
    flat = not any(isinstance(t, tuple) for t in example_inputs)
    doubled = sorted({str(dim) for t, x, n in zip(traced, example_inputs, names)
                      for axis, dim in (dynamic_shapes or {}).get(n, {}).items()
                      if t.shape[axis] != x.shape[axis]}) if traced is not example_inputs else []
    guards = _shape_guards(captured[-1], model) if flat and dynamic_shapes and captured else []
    return ExportResult(model, pmap, list(input_names or names), out_names,
                        _dim_ranges(program, model) if flat else {}, doubled=doubled,
                        guards=guards)


@contextlib.contextmanager
def _captured(into: list):
    """The ExportedPrograms torch.onnx.export captures with ``torch.export.export``, appended to
    ``into``: torch.onnx drops their shape asserts (``_assert_scalar``) on the way to ONNX."""
    real = torch.export.export

    def export(*args, **kwargs):
        ep = real(*args, **kwargs)
        into.append(ep)
        return ep

    torch.export.export = export
    try:
        yield
    finally:
        torch.export.export = real


# from_torchlib's arguments (the opset) -> torch.onnx's registry of ATen -> ONNX translations
_REGISTRIES: dict = {}


@contextlib.contextmanager
def _one_registry():
    """torch.onnx builds its registry of ATen translations again on every export (parsing the
    source of its onnxscript functions): 0.7-1.3 s of every export, 4-24% (llama tiny, video-dit
    and motion-dit tiny, llama small, SmolLM2-135M's 4 layers through transformers; one thread,
    2-core AVX2 host, the graphs byte for byte the same: ``benchmarks/export_time.py``). edgec
    passes no custom translations, so an export only reads it, and one registry per opset serves
    every export in the process (a decoder's prefill and decode graphs, a VLM's parts,
    ``calibrate`` then ``compile``). Where torch moves that function, the exports build their
    own as before."""
    try:
        from torch.onnx._internal.exporter import _registration
        real = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def shared(cls, *args, **kwargs):
        if cls is not _registration.ONNXRegistry:
            return real.__func__(cls, *args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = real.__func__(cls, *args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(shared)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = real


def _shape_guards(ep, model: ir.Model) -> list:
    """The relations between dynamic dims (or of one beyond a bound) that torch.export asserted
    while tracing (forward branched on ``x.shape[0] * x.shape[1] > 10``, ``x.shape[1] % 2``), as
    sympy expressions over symbols named as the ONNX dims. A single dim's bound (``s > 4``) is
    left out: ``_dim_ranges`` has it from the range constraints."""
    import sympy

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    names: dict = {}
    env = None
    for value, ph in zip(model.graph.inputs, ep.graph_signature.user_inputs):
        val = vals.get(ph)
        if value.shape is None or not isinstance(val, torch.Tensor):
            continue
        env = env or getattr(getattr(val, "fake_mode", None), "shape_env", None)
        for dim, size in zip(value.shape.dims, val.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol) and isinstance(dim, ir.SymbolicDim) and dim.value:
                names.setdefault(expr, sympy.Symbol(dim.value, integer=True, positive=True))
    out, seen = [], set()
    for node in ep.graph.nodes:
        if node.target is not torch.ops.aten._assert_scalar.default or not node.args:
            continue
        expr = getattr(getattr(getattr(node.args[0], "meta", {}).get("val"), "node", None),
                       "expr", None)
        if expr is None:
            continue
        with contextlib.suppress(Exception):  # the assert as the dims it names
            expr = env.replace(expr) if env is not None else expr
        if not isinstance(expr, sympy.Basic) or not expr.free_symbols <= set(names) or \
                expr in (sympy.true, sympy.false) or _a_bound(expr):
            continue
        expr = expr.xreplace(names)
        if str(expr) not in seen:
            seen.add(str(expr))
            out.append(expr)
    return out


def _a_bound(expr) -> bool:
    """Whether ``expr`` compares one dim with a number (``s > 4``, ``Ne(s, 1)``)."""
    import sympy

    return (isinstance(expr, sympy.core.relational.Relational) and len(expr.free_symbols) == 1
            and all(a.is_Symbol or a.is_Integer for a in expr.args)
            and any(a.is_Symbol for a in expr.args) and any(a.is_Integer for a in expr.args))


def _dim_ranges(program, model: ir.Model) -> dict[str, list]:
    """{dim name: [least, most or None]} of the ONNX inputs' named dims that torch.export
    traced for fewer sizes than any (a least of 2 or more, or a most): its range constraints,
    matched to the ONNX dims through the user inputs' placeholders (same order)."""
    ep = program.exported_program
    shapes = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    out: dict[str, list] = {}
    for value, ph in zip(model.graph.inputs, ep.graph_signature.user_inputs):
        val = shapes.get(ph)
        if value.shape is None or not isinstance(val, torch.Tensor):
            continue
        for dim, size in zip(value.shape.dims, val.shape):
            vr = ep.range_constraints.get(getattr(getattr(size, "node", None), "expr", None))
            if not isinstance(dim, ir.SymbolicDim) or not dim.value or vr is None:
                continue
            hi = None if float(vr.upper) == float("inf") else int(vr.upper)
            least, most = out.get(dim.value, (0, None))
            out[dim.value] = [max(least, int(vr.lower)),
                              hi if most is None else most if hi is None else min(most, hi)]
    return {d: r for d, r in out.items() if r[0] >= 2 or r[1] is not None}


# Loggers whose warnings during torch.onnx.export are about the exporter's own code, not the
# user's model: onnx_ir's note that an attribute was built from an empty list (a Conv's default
# pads: four lines on every video-dit compile) and the exporter's optimizer skipping a
# multi-output Split (every Wan compile). And torch.export's own dump of the traced graph
# when it cannot capture a data-dependent branch (~38 lines before edgec's one-line refusal).
# And the exporter's notes on its own translation ("Output node output has None output", then
# "Skipping constant argument" for a forward returning None, which edgec skips as documented;
# its own accuracy check, which edgec's verification replaces). These log through a handler
# holding the real stderr, so redirecting sys.stderr does not catch them.
_EXPORTER_NOTES = ("onnx_ir._convenience", "onnxscript.optimizer._constant_folding",
                   "torch.fx.experimental.symbolic_shapes",
                   "torch.onnx._internal.exporter._core")


@contextlib.contextmanager
def _quiet(names: Sequence[str]):
    """Those loggers' warnings dropped while exporting; EDGEC_DEBUG=1 keeps them."""
    loggers = [] if os.environ.get("EDGEC_DEBUG") else [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _unpinned(example_inputs: tuple, names: Sequence[str],
              dynamic_shapes: Mapping[str, Any] | None) -> tuple:
    """The inputs to trace with: torch.export specializes a dynamic dim whose example size is 1
    (a batch-1 example gave a graph that named its batch dynamic but reshaped to 1 inside, and
    failed at batch 2), so a dim name whose every use has size 1 is traced at size 2 (the
    tensors repeated). Tuple arguments (KV caches) are left alone, and then all inputs are."""
    if not dynamic_shapes or any(not isinstance(t, torch.Tensor) for t in example_inputs):
        return example_inputs
    uses: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        dims = dynamic_shapes.get(name) or {}
        if isinstance(dims, Mapping):
            for axis, dim in dims.items():
                uses.setdefault(str(dim), []).append((i, int(axis)))
    tensors = list(example_inputs)
    for dim_uses in uses.values():
        if all(tensors[i].shape[axis] == 1 for i, axis in dim_uses):
            for i, axis in dim_uses:
                tensors[i] = torch.cat([tensors[i], tensors[i]], dim=axis)
    return tuple(tensors)


def _tensor_dims(name: str, spec: Any, tensor: torch.Tensor) -> dict[int, str]:
    """A tensor argument's dynamic dims as ``{axis: dim name}``, checked against its rank; the
    list form (one name or None per axis, as torch.export takes it) and None (all static) are
    accepted too."""
    rank = tensor.dim()
    if spec is None:  # the whole input static, as torch.export reads None
        return {}
    if isinstance(spec, (list, tuple)):
        if len(spec) != rank:
            raise UserError(f"dynamic_shapes[{name!r}] lists {len(spec)} axes but the example "
                            f"input has {rank}; give one name or None per axis, or "
                            "{axis: name}")
        spec = {i: d for i, d in enumerate(spec) if d is not None}
    if not isinstance(spec, Mapping):
        raise UserError(f"dynamic_shapes[{name!r}] must be {{axis: name}} or a list of names, "
                        f"not {type(spec).__name__}")
    out = {}
    for axis, dim in spec.items():
        if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
            raise UserError(f"dynamic_shapes[{name!r}] names axis {axis!r}, but the example "
                            f"input has {rank} axes (0..{rank - 1})")
        if not isinstance(dim, str) or not dim:
            raise UserError(f"dynamic_shapes[{name!r}][{axis}] must be a dim name (a string "
                            f"such as 'batch'), not {dim!r}")
        out[axis % rank] = dim
    return out


def _one_size_per_name(dynamic_shapes: Mapping[str, Any], names: Sequence[str],
                       example_inputs: Sequence[Any]) -> None:
    """Refuse one dim name given to dims of different example sizes: torch.export makes it one
    size and then reported the other dim as fixed to a constant, blaming forward."""
    seen: dict[str, tuple[str, int]] = {}
    for name, t in zip(names, example_inputs):
        dims = dynamic_shapes.get(name)
        if not isinstance(t, torch.Tensor) or not isinstance(dims, Mapping):
            continue
        for axis, dim in dims.items():
            where, size = f"{name}.shape[{axis}]", int(t.shape[axis])
            first = seen.setdefault(dim, (where, size))
            if first[1] != size:
                raise UserError(
                    f"dynamic_shapes names both {first[0]} (size {first[1]} in the example) "
                    f"and {where} (size {size}) {dim!r}, and one name is one size; give each "
                    "dim a name of its own, or an example where they are equal")


def _dims(spec):
    """A forward argument's dynamic dims: a dict, or a list of dicts for a tuple argument."""
    return tuple(dict(d) for d in spec) if isinstance(spec, (list, tuple)) else dict(spec)


# The exporter numbers its stages in the message of the ConversionError it raises.
_STAGES = {"1": "while capturing the module with torch.export",
           "2": "while decomposing the captured graph", "3": "while translating the graph to ONNX"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXPORTDB = "https://pytorch.org/docs/stable/generated/exportdb/index.html"


def _exporter_error_types() -> tuple[type, type, type]:
    """TorchExportError, DispatchError, GraphConstructionError of the dynamo exporter."""
    try:
        from torch.onnx._internal.exporter import _errors
    except ImportError:  # a torch that moved them: nothing matches, everything is internal
        return (), (), ()
    return _errors.TorchExportError, _errors.DispatchError, _errors.GraphConstructionError


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes, outermost first (the exporter wraps each stage's error once more)."""
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


_INPUT_DIM = re.compile(r"inputs\['(\w+)'\]\.shape\[(\d+)\]")


def _fixed_peers(dim: str, size: int, inputs: Mapping[str, Any],
                 dynamic_shapes: Mapping[str, Any] | None) -> list[tuple[str, int]]:
    """(input, axis) of the other inputs' dims of ``size`` in the example that dynamic_shapes
    leaves fixed: a dynamic ``dim`` (``inputs['x'].shape[1]``) that forward combines with one
    of them is fixed to its size, and then the fix is to declare that dim too."""
    own = _INPUT_DIM.fullmatch(dim)
    peers = []
    for name, t in inputs.items():
        declared = (dynamic_shapes or {}).get(name)
        declared = declared if isinstance(declared, Mapping) else {}
        if isinstance(t, torch.Tensor) and not (own and name == own[1]):
            peers += [(name, axis) for axis, n in enumerate(t.shape)
                      if n == size and axis not in declared]
    return peers


def _fixed_dim_error(name: str, dim: str, size: int, remedy: str | None,
                     inputs: Mapping[str, Any], dynamic_shapes: Mapping[str, Any] | None
                     ) -> UserError:
    """A dim declared dynamic that forward ties to a constant size: to a tensor forward builds
    (size it from the input: ``x.new_ones``), or to another input's dim that dynamic_shapes
    leaves fixed (declare that one too: the hint suggested ``x.new_ones`` there as well)."""
    head = f"{name}.forward fixes {dim} to {size}"
    if remedy:  # a checkpoint wrapper's own dims: the user declared none of them
        return UserError(f"{head} (forward combines it with a tensor of a constant size); "
                         f"{remedy}")
    own = _INPUT_DIM.fullmatch(dim)
    built = f"size that tensor from the input (e.g. {own[1] if own else 'x'}.new_ones(...))"
    head += ", which dynamic_shapes declares dynamic"
    peers = _fixed_peers(dim, size, inputs, dynamic_shapes)
    if not peers:
        return UserError(f"{head} (forward combines it with a tensor of a constant size); drop "
                         f"that dim from dynamic_shapes, or {built}")
    shown = " or ".join(f"{n}.shape[{a}]" for n, a in peers[:3])
    more = f" (or {len(peers) - 3} more)" if len(peers) > 3 else ""
    label = ((dynamic_shapes or {}).get(own[1]) or {}).get(int(own[2])) if own else None
    peer, axis = peers[0]
    same = (f" under the same name: dynamic_shapes {{{peer!r}: {{{axis}: {label!r}}}}}"
            if isinstance(label, str) else " under the same name")
    return UserError(f"{head} (forward combines it with a tensor of size {size}); if that is "
                     f"input dim {shown}{more}, which dynamic_shapes leaves fixed, declare that "
                     f"dim dynamic too{same}; else drop {dim} from dynamic_shapes, or {built}")


def _classify_export_error(name: str, e: Exception, fixed_dim_remedy: str | None = None,
                           inputs: Mapping[str, Any] | None = None,
                           dynamic_shapes: Mapping[str, Any] | None = None) -> Exception:
    """What a failed ``torch.onnx.export`` means for the user: UserError or InternalError.

    The model's fault: torch.export cannot capture it (``TorchExportError``), it uses an operator
    with no ONNX translation (``DispatchError``), or the operator's translation declares this use
    unsupported (``NotImplementedError`` under ``GraphConstructionError``). Anything else is a
    fault of the exporter (or of how edgec drives it) that the user cannot fix by changing input.
    ``fixed_dim_remedy``: what to do about a dim forward fixes, where the module's own
    dynamic dims are not the user's (a checkpoint's wrapper: the CLI declares them).
    """
    capture, dispatch, construction = _exporter_error_types()
    chain = _chain(e)
    root = chain[-1]
    static = re.search(r"inferred a static shape of (\d+) for dimension (inputs\[[^\]]+\]"
                       r"\.shape\[\d+\])", _ANSI.sub("", str(root)))
    if static:  # a dim declared dynamic that forward ties to a constant size
        return _fixed_dim_error(name, static[2], int(static[1]), fixed_dim_remedy,
                                inputs or {}, dynamic_shapes)
    if any(isinstance(c, capture) for c in chain):
        where = re.search(r'File "([^"]+)", line (\d+), in (\w+)', str(root))
        at = f" (at {where[1]}:{where[2]}, in {where[3]})" if where else ""
        return UserError(
            f"torch.export cannot capture {name}.forward: {_first_line(root)}{at}; edgec "
            "exports one traced graph, so forward must not branch in Python on tensor values "
            "(`if x.sum() > 0:` → torch.where or torch.cond) nor use Python torch.export does "
            f"not support (see {_EXPORTDB})")
    bad = next((c for c in chain if isinstance(c, dispatch)), None)
    if bad is not None:
        op = re.search(r"op='([^']+)', overload='([^']+)'", str(bad))
        op_name = (op[1] if op[2] == "default" else f"{op[1]}.{op[2]}") if op else None
        what = f"the operator {op_name}" if op_name else f"an operator ({_first_line(bad)})"
        return UserError(
            f"{name} uses {what}, which has no ONNX translation in torch.onnx "
            f"(torch {torch.__version__}); rewrite that part of forward with operators that "
            "export to ONNX")
    unsupported = any(isinstance(c, construction) for c in chain) and isinstance(
        root, NotImplementedError)
    node = next((m for c in chain if (m := re.search(r"target=torch\.ops\.([\w.]+)", str(c)))),
                None)
    op_name = node[1].removesuffix(".default") if node else "an operator"
    if unsupported:
        return UserError(f"{name}: torch.onnx cannot translate this use of {op_name}: "
                         f"{_first_line(root).rstrip('.')}; change how forward calls it")
    step = next((m[1] for c in chain if (m := re.search(r"step (\d)/3", _ANSI.sub("", str(c))))),
                None)
    stage = _STAGES.get(step, "inside torch.onnx.export")
    at = f" at {op_name}" if node else ""
    return InternalError(
        f"torch.onnx.export failed {stage}{at} for {name}: {type(root).__name__}: "
        f"{_first_line(root)}. This is a fault of the exporter or of edgec, not of the model: "
        "please report it with the traceback (EDGEC_DEBUG=1)")


def _unclashed(out_names: Sequence[str], taken: set[str]) -> list[str]:
    """Output names with one that is also an input name renamed (forward(self, output)):
    ``<name>_out``, or ``<name>_out_1``, ``_2``, ... where that is taken too (by an input or
    another output: a dict returning both ``x`` and ``x_out`` for an input ``x``)."""
    used = set(taken) | set(out_names)
    out = []
    for n in out_names:
        if n in taken:
            new, i = f"{n}_out", 0
            while new in used:
                i += 1
                new = f"{n}_out_{i}"
            used.add(new)
            n = new
        out.append(n)
    return out


def _count_outputs(out) -> int:
    """How many ONNX outputs ``out`` becomes: the tensors ``flatten_outputs`` finds (None
    skipped, as torch.export skips it)."""
    return len(flatten_outputs(out))
