"""qnn-htp's build: a QDQ model precompiled for the Hexagon NPU (QNN EP) into an EPContext model.

The build compiles the quantized model once (``onnxruntime.ModelCompiler``, CPU fallback off) into
``target/model_ctx.onnx`` whose EPContext node points at the HTP context binary beside it
(``model_ctx_qnn.bin``), so loading the artifact does not recompile. When the HTP cannot take the
whole graph the build names the nodes: from ONNX Runtime's graph-assignment record of a session
that may fall back to the CPU, or, when even that session cannot finalize the QNN graph, from the
shortest prefix of the graph that fails (bisection).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from edgec._native_stdout import native_stdout_to_stderr
from edgec.errors import InternalError, UserError
from edgec.targets.base import BuildResult, Target

__all__ = ["build", "CONTEXT_MODEL"]

logger = logging.getLogger(__name__)

CONTEXT_MODEL = "model_ctx.onnx"
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FLOATS = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_SHOW = 5  # nodes named in an error message


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _check_static(target: Target, graph) -> None:
    """The target's static-shape check (``Target.check_static``) on a ``GraphProto``'s inputs
    and outputs: only their value infos are read, not the graph."""
    import onnx_ir as ir

    inits = {i.name for i in graph.initializer}

    def values(infos):
        return [ir.serde.deserialize_value_info_proto(vi, None) for vi in infos
                if vi.name not in inits]

    target.check_static(values(graph.input), values(graph.output))


def _describe(nodes: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{op} {name!r}" for op, name in nodes[:_SHOW])
    more = f" and {len(nodes) - _SHOW} more" if len(nodes) > _SHOW else ""
    return f"{len(nodes)} node(s): {shown}{more}"


def _compile(model_path: Path, ctx_path: Path, opts) -> None:
    import onnxruntime as ort

    ort.ModelCompiler(opts, str(model_path),
                      flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
                      graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                      ).compile_to_file(str(ctx_path))


def _cpu_assigned(model_path: Path) -> tuple[list[tuple[str, str]], set[str]]:
    """Nodes ONNX Runtime gives to the CPU when fallback is allowed (raises if QNN still fails),
    and the names of all the nodes it assigned (to any EP)."""
    import onnxruntime as ort

    from edgec.runtimes.qnn import graph_provider_options, qnn_session_options

    opts = qnn_session_options(provider_options=graph_provider_options(model_path),
                               fallback=True, record_assignment=True, quiet=True)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with native_stdout_to_stderr():  # the QNN backend prints to fd 1 from native code
        sess = ort.InferenceSession(str(model_path), sess_options=opts)
    info = sess.get_provider_graph_assignment_info()
    return ([(n.op_type, n.name) for sub in info if sub.ep_name != "QNNExecutionProvider"
             for n in sub.get_nodes()], {n.name for sub in info for n in sub.get_nodes()})


def _expanded_functions(graph, opset: int, assigned: set[str]) -> list[tuple[str, str]]:
    """Nodes of ONNX function ops that no EP took as they are: ONNX Runtime ran their function
    body instead (its nodes are unnamed), which a session does but the EPContext compile cannot."""
    import onnx

    found = []
    for n in graph.node:
        if not n.name or n.name in assigned or n.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        if schema.has_function or schema.has_context_dependent_function:
            found.append((n.op_type, n.name))
    return found


_NOT_FLOAT_OPS = {"QuantizeLinear", "Shape", "Size", "IsNaN", "IsInf", "Equal", "Less", "Greater",
                  "LessOrEqual", "GreaterOrEqual", "And", "Or", "Not", "Xor", "ArgMax", "ArgMin",
                  "NonZero"}


def _elem_types(model) -> dict[str, int]:
    """Element type of every tensor: ONNX shape inference, completed where it gave up.

    Inference stops at the first node it cannot type (e.g. a DequantizeLinear of an int32 bias
    with a [1] scale), leaving everything after it untyped; a few rules suffice past that point.
    """
    g = model.graph
    elem = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    elem.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        for o in n.output:
            if elem.get(o):
                continue
            if n.op_type == "DequantizeLinear":
                elem[o] = elem.get(n.input[1], 1)
            elif n.op_type == "Cast":
                elem[o] = next(a.i for a in n.attribute if a.name == "to")
            elif n.op_type in _NOT_FLOAT_OPS:
                elem[o] = 0  # only "not a float" matters here
            else:
                elem[o] = elem.get(n.input[0], 0) if n.input else 0
    return elem


def _live(model) -> set[int]:
    """Indices of the nodes that depend on a graph input (the rest are constants ORT folds)."""
    values, live = {i.name for i in model.graph.input}, set()
    for i, n in enumerate(model.graph.node):
        if values.intersection(n.input):
            values.update(n.output)
            live.add(i)
    return live


def _prefix(model, k: int, live: set[int], elem: dict[str, int]):
    """The graph up to node ``k`` (with the Q/DQ pairs on its outputs), cut there."""
    import onnx

    nodes = list(model.graph.node)
    keep = {i for i in live if i <= k}
    produced = {o for i in keep for o in nodes[i].output}
    for want in _QDQ:  # close the QDQ units the cut would split, so outputs stay dequantized
        for i, n in enumerate(nodes):
            if n.op_type == want and n.input[0] in produced and i not in keep:
                keep.add(i)
                produced.update(n.output)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    stack = [x for i in keep for x in nodes[i].input]
    while stack:  # the constant subgraphs (weight DQs) the kept nodes read
        p = producer.get(stack.pop())
        if p is not None and p not in keep:
            keep.add(p)
            stack.extend(nodes[p].input)
    used_later = {x for i, n in enumerate(nodes) if i not in keep for x in n.input}
    used_later.update(o.name for o in model.graph.output)
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    del sub.graph.node[:], sub.graph.output[:], sub.graph.value_info[:]
    sub.graph.node.extend(nodes[i] for i in sorted(keep))
    sub.graph.output.extend(onnx.helper.make_tensor_value_info(o, elem[o], None)
                            for o in sorted(produced & used_later))
    return sub


def _cuts(model, live: set[int], elem: dict[str, int]) -> list[int]:
    """Compute nodes after which the graph can be cut: only float tensors cross the cut there.

    A bool/int tensor as a graph output fails on the HTP by itself, so no cut may expose one.
    """
    nodes = list(model.graph.node)
    producer, last_use = {}, {}
    for i, n in enumerate(nodes):
        producer.update({o: i for o in n.output})
        last_use.update({x: i for x in n.input})
    crossing = [0] * (len(nodes) + 1)
    for v, p in producer.items():
        if p in live and elem.get(v) not in _FLOATS and last_use.get(v, p) > p:
            crossing[p] += 1
            crossing[last_use[v]] -= 1
    cuts, open_ = [], 0
    for i, n in enumerate(nodes):
        open_ += crossing[i]
        if i in live and n.op_type not in _QDQ and open_ == 0:
            cuts.append(i)
    return cuts


def _first_failing(count: int, fails: Callable[[int], bool]) -> int:
    """Bisection: the first prefix ``k`` in [0, count) with ``fails(k)`` (a failure every longer
    prefix carries); ``count`` when none fails."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _stretch(nodes, live: set[int], cuts: list[int], k: int) -> list[tuple[str, str]]:
    """(op, name) of the compute nodes after cut ``k - 1`` up to cut ``k`` (to the graph's end
    when ``k`` is past the last cut)."""
    after = cuts[k - 1] if k else -1
    upto = cuts[k] if k < len(cuts) else len(nodes)
    return [(nodes[i].op_type, nodes[i].name) for i in sorted(live)
            if after < i <= upto and nodes[i].op_type not in _QDQ]


def _failing_nodes(model_path: Path) -> tuple[list[tuple[str, str]], str] | None:
    """Bisect over graph prefixes for the first stretch of nodes the HTP cannot compile."""
    import onnx
    import onnxruntime as ort

    from edgec.runtimes.qnn import graph_provider_options, qnn_session_options

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    provider = graph_provider_options(model)
    nodes = list(model.graph.node)
    live, elem = _live(model), _elem_types(model)
    cuts = _cuts(model, live, elem)
    probe = model_path.with_name(f".{model_path.stem}.qnn-probe.onnx")  # beside its external data

    def error_at(k: int) -> str | None:
        onnx.save(_prefix(model, cuts[k], live, elem), str(probe))
        try:
            with native_stdout_to_stderr():  # the QNN backend prints to fd 1 from native code
                ort.InferenceSession(str(probe), sess_options=qnn_session_options(
                    provider_options=provider, quiet=True))
            return None
        except Exception as e:  # noqa: BLE001 — any failure is the answer being probed for
            return _first_line(e)

    errors: dict[int, str | None] = {}

    def fails(k: int) -> bool:
        errors[k] = error_at(k)
        return errors[k] is not None

    try:  # k == len(cuts) stands for the whole (failing) graph
        lo = _first_failing(len(cuts), fails)
    finally:
        probe.unlink(missing_ok=True)
    stretch = _stretch(nodes, live, cuts, lo)
    return (stretch, errors.get(lo)) if stretch else None


def _quantized(graph, names: set[str]) -> set[str]:
    """Of the nodes called ``names``, those that sit in a QDQ unit (a DQ input or a Q output)."""
    dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    q_in = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    return {n.name for n in graph.node if n.name in names
            and (dq_out.intersection(n.input) or q_in.intersection(n.output))}


def _diagnose(model_path: Path, graph, error: Exception, opset: int = 21) -> UserError:
    try:
        offending, assigned = _cpu_assigned(model_path)
    except Exception:  # noqa: BLE001 — the QNN graph itself fails to finalize: bisect
        logger.info("qnn-htp: locating the first node the HTP cannot compile (bisection)")
        try:
            found = _failing_nodes(model_path)
        except Exception:  # best effort: the original error still stands
            logger.debug("qnn-htp: bisection failed", exc_info=True)
            found = None
        if found is None:
            return UserError(f"the QNN HTP backend could not compile the model: "
                             f"{_first_line(error)}")
        stretch, err = found
        where = (f"node {stretch[0][0]} {stretch[0][1]!r}" if len(stretch) == 1 else
                 f"one of {_describe(stretch)}")
        return UserError(
            f"the QNN HTP backend cannot compile the model: it fails at {where} (the graph "
            f"before compiles; QNN says: {err or _first_line(error)}); the op/type is "
            "unsupported on the NPU even after qnn-legalize (run by every qnn-htp compile): "
            "change the model there (see the qnn-htp notes in `edgec targets`)")
    compute = [n for n in offending if n[0] not in _QDQ] or offending
    expanded = [] if compute else _expanded_functions(graph, opset, assigned)
    if expanded:
        return UserError(
            f"the QNN HTP has no kernel for {_describe(expanded)}: ONNX Runtime runs such ops by "
            "expanding their ONNX function body, which the EPContext compile cannot (QNN says: "
            f"{_first_line(error)}); rewrite them into ops the HTP has before quantizing (the "
            "qnn-legalize pass does for Mish)")
    if not compute:
        return UserError(f"the QNN HTP backend could not compile the model: {_first_line(error)}")
    float_nodes = [n for n in compute if n[1] not in _quantized(graph, {c[1] for c in compute})]
    advice = (f"{_describe(float_nodes)} are not quantized: quantize the model with --quantize "
              "w8a8 (or w8a16)" if float_nodes else
              "they are quantized, so the op/type is unsupported on the NPU even after "
              "qnn-legalize (run by every qnn-htp compile): change the model there (see the "
              "qnn-htp notes in `edgec targets`)")
    return UserError(f"the QNN HTP cannot run {_describe(compute)} and qnn-htp has no CPU "
                     f"fallback; {advice}")


def build(target: Target, model_path: Path, target_dir: Path, **options) -> BuildResult:
    import onnx

    from edgec.runtimes.qnn import QnnSession, graph_provider_options, qnn_session_options

    proto = onnx.load(str(model_path), load_external_data=False)
    provider = graph_provider_options(proto)
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 21)
    _check_static(target, graph)
    if not any(n.op_type in _QDQ for n in graph.node):
        raise UserError("qnn-htp runs quantized (QDQ) models and this one has no "
                        "QuantizeLinear/DequantizeLinear nodes; compile with --quantize w8a8 "
                        f"(or {', '.join(s for s in target.schemes if s != 'w8a8')})")
    target_dir.mkdir(parents=True, exist_ok=True)
    ctx = target_dir / CONTEXT_MODEL
    try:
        with native_stdout_to_stderr():  # the QNN backend prints to fd 1 from native code
            _compile(model_path, ctx, qnn_session_options(provider_options=provider, quiet=True))
    except UserError:
        raise
    except Exception as e:
        for f in target_dir.glob(f"{ctx.stem}*"):  # ORT leaves partial outputs behind
            with contextlib.suppress(OSError):
                f.unlink()
        raise _diagnose(model_path, graph, e, opset) from e
    try:  # the artifact must load from the context binary just compiled
        QnnSession(ctx, {"backend": "htp", "provider_options": provider})
    except UserError as e:
        raise InternalError(f"the QNN HTP compiled the model but cannot load the context binary "
                            f"it wrote ({e}); this is an edgec or QNN bug: report it") from e
    files = sorted(f"target/{f.name}" for f in target_dir.glob(f"{ctx.stem}*"))
    return BuildResult(
        runtime={"name": "qnn", "model": f"target/{CONTEXT_MODEL}", "backend": "htp",
                 "provider_options": {**target.runtime_config["provider_options"], **provider},
                 "config": dict(target.runtime_config)},
        files=files,
    )


