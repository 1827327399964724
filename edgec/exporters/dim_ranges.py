"""The sizes a dynamic dim's graph is good for, when torch.export traced it for fewer than any.

torch.export records a range per dynamic dim: ``batch >= 2`` when forward branches on
``x.shape[0] > 1``, ``batch <= 4`` on ``x.shape[0] < 5``. The graph holds the traced branch
only, so outside the range it computes what PyTorch does not (the sign of every output flipped,
silently). Checked here against PyTorch once, at the export: a least bound is kept when the
graph and forward disagree (or either fails) just below it, and dropped when they agree (a
transformers model's ``if seq_len > 1`` mask shortcut gives ``seq >= 2`` and the same numbers
at 1); a most bound is kept as is. Kept ranges go in the model metadata ``edgec.dim_ranges``,
the manifest's inputs (``dim_ranges``) and every run's feed check, one line naming the input,
the dim and the range.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["DIM_RANGES_KEY", "verified_ranges", "stored_ranges", "check_ranges", "range_text",
           "table_ranges", "merge_ranges"]

DIM_RANGES_KEY = "edgec.dim_ranges"
_log = logging.getLogger(__name__)


def verified_ranges(module, inputs, result, feeds: Mapping[str, np.ndarray],
                    errors: Mapping[str, Any], rtol: float, run) -> dict[str, dict[str, int]]:
    """{dim: {"min": n, "max": n}} of ``result.dim_ranges`` the graph needs; ``errors``: the
    export's check at the example; ``run``: feeds → the graph's outputs. An example edgec
    doubled that the graph gets wrong is refused here, saying why (the generic mismatch said
    nothing of the doubling)."""
    axes: dict[str, list[tuple[int, int]]] = {}
    for i, value in enumerate(result.model.graph.inputs):
        for axis, dim in enumerate(value.shape.dims if value.shape is not None else ()):
            if isinstance(getattr(dim, "value", None), str):
                axes.setdefault(dim.value, []).append((i, axis))
    names = result.input_names
    out: dict[str, dict[str, int]] = {}
    for dim, (least, most) in result.dim_ranges.items():
        if dim not in axes:
            continue
        i, axis = axes[dim][0]
        size = feeds[names[i]].shape[axis]
        kept = {"max": most} if most is not None else {}
        if least >= 2 and size < least:  # the doubled example: it is below the range
            if any(not e["max_rel"] <= rtol for e in errors.values()):
                raise UserError(
                    f"{type(module).__name__}.forward branches on {dim} (torch.export traced "
                    f"{dim} >= {least}), and the example's {dim} of {size} was traced at "
                    f"{2 * size}: edgec doubles a size-1 dynamic dim, which torch.export "
                    f"cannot keep dynamic; give an example with {dim} >= {least}, or leave "
                    f"{dim} out of dynamic_shapes")
        elif least >= 2 and _differs(module, inputs, result, {dim: least - 1}, axes, rtol, run):
            kept["min"] = least
        if kept:
            out[dim] = kept
    for guard in getattr(result, "guards", ()):
        _refuse_guard(module, inputs, result, feeds, guard, axes, out, rtol, run)
    return out


def _refuse_guard(module, inputs, result, feeds, guard, axes, ranges, rtol, run) -> None:
    """Refuse the export when forward computes otherwise where ``guard`` (a relation between
    dims torch.export asserted, or one a range cannot hold: ``b*s > 10``, ``s % 2 == 0``) fails:
    the graph holds the branch traced at the example, and no per-dim range keeps a feed out.
    Checked at up to three sizes near the example that each dim's range allows and the guard
    does not; where forward itself fails there, that size is no input of the module's."""
    import itertools

    import sympy

    dims = sorted(guard.free_symbols, key=str)
    if not all(str(d) in axes for d in dims):
        return
    excluded = _one_excluded_size(guard, ranges)
    if excluded is not None:  # the guard is "d != v" (b*(s - 12) != 0 with b >= 1)
        dim, v = excluded
        r = ranges.get(dim, {})
        lo, hi = r.get("min", 1), r.get("max")
        if v < lo or (hi is not None and v > hi):
            return  # the range already keeps v out
        if v in (lo, hi):  # at the edge: a range holds it, where the graph needs one
            if _differs(module, inputs, result, {dim: v}, axes, rtol, run):
                ranges[dim] = {**r, "min": v + 1} if v == lo else {**r, "max": v - 1}
            return
    tried, options, example = [], [], []
    for d in dims:
        i, axis = axes[str(d)][0]
        e = int(feeds[result.input_names[i]].shape[axis])
        r = ranges.get(str(d), {})
        lo, hi = r.get("min", 1), r.get("max", 2 * e + 2)
        example.append(e)
        options.append(sorted(v for v in {1, 2, 3, lo, lo + 1, e - 2, e - 1, e, e + 1, e + 2,
                                          2 * e - 1, 2 * e, 2 * e + 1} if lo <= v <= hi))
    sizes = sorted(itertools.product(*options),
                   key=lambda vs: sum(abs(v - e) for v, e in zip(vs, example)))
    for vs in sizes:
        try:
            holds = bool(guard.xreplace({d: sympy.Integer(v) for d, v in zip(dims, vs)}))
        except (TypeError, ValueError):
            return  # a relation sympy cannot decide at these sizes: nothing to probe
        if holds:
            continue
        at = {str(d): v for d, v in zip(dims, vs)}
        tried.append(at)
        if _differs(module, inputs, result, at, axes, rtol, run, forward_fails=False):
            names = " and ".join(str(d) for d in dims)
            raise UserError(
                f"{type(module).__name__}.forward branches on {guard_text(guard)} (torch.export "
                f"traced the example's branch only; at "
                f"{', '.join(f'{d} = {v}' for d, v in at.items())} the graph computes what "
                "PyTorch does not), which edgec's dim ranges (one dim each) cannot check at "
                f"run time; export with static shapes (leave {names} out of dynamic_shapes), "
                "or make forward not branch on input sizes")
        if len(tried) == 3:
            break
    _log.debug("guard %s: the graph agrees with forward at %s", guard, tried)


def _one_excluded_size(guard, ranges) -> tuple[str, int] | None:
    """(dim, v) where ``guard`` is ``d != v`` once the factors that cannot be zero are dropped
    (dims whose least is ≥ 1): torch.export writes "text after the image tokens" as
    ``Ne(batch_size*(sequence_length - 12), 0)``. None for any other guard."""
    import sympy

    if not isinstance(guard, sympy.Ne) or guard.rhs != 0:
        return None
    _, factors = sympy.factor_list(guard.lhs)
    left = [f for f, _ in factors
            if not (f.is_Symbol and ranges.get(str(f), {}).get("min", 1) >= 1)]
    if len(left) != 1 or len(left[0].free_symbols) != 1:
        return None
    (d,) = left[0].free_symbols
    roots = sympy.solve(left[0], d)
    if len(roots) != 1 or not roots[0].is_Integer:
        return None
    return str(d), int(roots[0])


def guard_text(guard) -> str:
    """A guard as Python would write it: ``s % 2 == 0`` for ``Eq(Mod(s, 2), 0)``."""
    import re

    text = str(guard)
    text = re.sub(r"(?:Python)?Mod\((\w+), (\w+)\)", r"\1 % \2", text)
    text = re.sub(r"FloorDiv\((\w+), (\w+)\)", r"\1 // \2", text)
    m = re.fullmatch(r"(Eq|Ne)\((.+), ([^,]+)\)", text)
    return f"{m[2]} {'==' if m[1] == 'Eq' else '!='} {m[3]}" if m else text


def _resized(t, axis: int, size: int):
    """``t`` cut or repeated along ``axis`` to ``size``."""
    import torch

    if size > t.shape[axis]:
        t = torch.cat([t] * -(-size // t.shape[axis]), dim=axis)
    return t.narrow(axis, 0, size)


def _differs(module, inputs, result, sizes: Mapping[str, int], axes, rtol: float, run,
             forward_fails: bool = True) -> bool:
    """Whether the graph and forward disagree (or either fails) with each dim of ``sizes`` (its
    ``axes``) cut or repeated to its size; ``forward_fails``: what a failing forward means."""
    import torch

    from edgec.exporters.outputs import flatten_outputs
    from edgec.exporters.verify import compare_outputs

    cut = list(inputs)
    for dim, size in sizes.items():
        for i, axis in axes[dim]:
            cut[i] = _resized(cut[i], axis, size)
    try:
        with torch.no_grad():
            ref = dict(zip(result.output_names, flatten_outputs(module(*cut))))
    except Exception as e:  # noqa: BLE001 (a size forward cannot run is outside)
        _log.debug("at %s: %s", sizes, e)
        return forward_fails
    try:
        got = run({n: t.detach().cpu().numpy() for n, t in zip(result.input_names, cut)})
        errors = compare_outputs(got, {n: t.detach().cpu().numpy() for n, t in ref.items()})
    except Exception as e:  # noqa: BLE001 (the graph cannot run where forward does)
        _log.debug("at %s: %s", sizes, e)
        return True
    return any(not e["max_rel"] <= rtol for e in errors.values())


def stored_ranges(model) -> dict[str, dict[str, int]]:
    """The ranges ``verified_ranges`` kept, from the model's metadata (``{}`` if none)."""
    raw = model.metadata_props.get(DIM_RANGES_KEY)
    return json.loads(raw) if raw else {}


def merge_ranges(*many: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """The ranges in force under all of ``many``: the largest least, the smallest most."""
    out: dict[str, dict[str, int]] = {}
    for ranges in many:
        for dim, r in ranges.items():
            kept = out.setdefault(dim, {})
            if "min" in r:
                kept["min"] = max(kept.get("min", r["min"]), r["min"])
            if "max" in r:
                kept["max"] = min(kept.get("max", r["max"]), r["max"])
    return out


def table_ranges(model) -> dict[str, dict[str, int]]:
    """{dim: {"max": n}} for the dynamic input dims that positions index a constant table by:
    ``Range(s, dim + c)`` reaching a Gather's indices (GPT-2's ``wpe(arange(seq))``) is good
    for ``dim + c <= rows`` only. Past it ONNX Runtime stopped with a Gather error and OpenVINO
    returned logits for 33 tokens of a 32-position GPT-2 (exit 0), where PyTorch raises."""
    from edgec.exporters.index_inputs import _uses_as_index

    names = {d.value for v in model.graph.inputs if v.shape is not None
             for d in v.shape.dims if isinstance(getattr(d, "value", None), str)}
    out: dict[str, dict[str, int]] = {}
    for node in model.graph.all_nodes():
        if node.op_type != "Range" or len(node.inputs) != 3:
            continue
        start, delta = (_const_int(node.inputs[i]) for i in (0, 2))
        if start is None or start < 0 or delta != 1:
            continue
        limit = _dim_plus(node.inputs[1])
        if limit is None:  # the length the exporter gave the output: dim = limit - start
            dims = node.outputs[0].shape.dims if node.outputs[0].shape is not None else ()
            name = getattr(dims[0], "value", None) if len(dims) == 1 else None
            limit = (name, start) if isinstance(name, str) else None
        if limit is None or limit[0] not in names:
            continue
        rows = [b for b, _ in filter(None, _uses_as_index(node.outputs[0]))]
        if rows:
            dim, offset = limit
            most = min(rows) - offset
            out[dim] = {"max": min(most, out.get(dim, {}).get("max", most))}
    return out


def _const_int(value) -> int | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return int(value.const_value.numpy().reshape(-1)[0])


def _dim_plus(value, depth: int = 0) -> tuple[str, int] | None:
    """(dim name, c) where ``value`` is a graph input's named dim + a constant c."""
    node = value.producer() if value is not None and depth < 8 else None
    if node is None:
        return None
    op = node.op_type
    if op in ("Squeeze", "Unsqueeze", "Cast", "Reshape", "Identity"):
        return _dim_plus(node.inputs[0], depth + 1)
    if op == "Add":
        for a, b in ((0, 1), (1, 0)):
            c = _const_int(node.inputs[b])
            inner = _dim_plus(node.inputs[a], depth + 1) if c is not None else None
            if inner is not None:
                return inner[0], inner[1] + c
        return None
    if op == "Shape":
        axis, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
        return _named_dim(node.inputs[0], axis, end)
    if op == "Gather" and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        shape, k = node.inputs[0].producer(), _const_int(node.inputs[1])
        if shape.op_type == "Shape" and k is not None and k >= 0:
            first = shape.attributes.get_int("start", 0)
            return _named_dim(shape.inputs[0], first + k, first + k + 1) if first >= 0 else None
    return None


def _named_dim(value, axis: int, end: int | None) -> tuple[str, int] | None:
    """(the name of ``value``'s dim ``axis``, 0) where Shape(start=axis, end) takes it alone."""
    if value is None or value.shape is None:
        return None
    rank = len(value.shape)
    axis = axis + rank if axis < 0 else axis
    if end is None or not 0 <= axis < rank or (end + rank if end < 0 else end) != axis + 1:
        return None
    name = getattr(value.shape.dims[axis], "value", None)
    return (name, 0) if isinstance(name, str) else None


def range_text(r: Mapping[str, int]) -> str:
    if "min" in r and "max" in r:
        return f"in [{r['min']}, {r['max']}]"
    return f">= {r['min']}" if "min" in r else f"<= {r['max']}"


def check_ranges(feeds: Mapping[str, np.ndarray], inputs: list[Mapping[str, Any]]) -> None:
    """Refuse a feed whose named dim is outside the manifest input's ``dim_ranges``."""
    for spec in inputs:
        ranges, arr = spec.get("dim_ranges"), feeds.get(spec["name"])
        if not ranges or arr is None or np.ndim(arr) != len(spec["shape"]):
            continue
        for axis, (dim, size) in enumerate(zip(spec["shape"], np.shape(arr))):
            r = ranges.get(dim) if isinstance(dim, str) else None
            if r and not r.get("min", size) <= size <= r.get("max", size):
                raise UserError(
                    f"input {spec['name']!r} has {dim} = {size} (axis {axis}), but the model "
                    f"was exported for {dim} {range_text(r)} only (forward branches on it, or "
                    f"cannot run outside it); give {dim} {range_text(r)}")
