"""Attention heads from layout ops: which columns of V's weight and which rows of O's weight hold
each head, and which kv head each query head reads (GQA).

    x·W_v (+b) → Reshape [.., (part,) head, d] → Transpose / Slice / Squeeze (fused QKV)
      → Unsqueeze → Expand → Reshape (GQA repeat) → MatMul(P, ·) → Transpose → Reshape → ·W_o

GPT-2's Conv1D adds Reshapes [b·s, N] ↔ [b, s, N] around its Gemms, and splits its fused QKV's
columns (Split / Slice on the column axis) before the heads.

Every value on that path is tracked as axes with a stride into V's output columns, so a per-head
rotation applied to V's columns is undone exactly by O's rows. A path with any other op, a value
read elsewhere (a KV-cache output) or a shape that does not say where the heads are
is reported instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

__all__ = ["trace_attention"]

_LAYOUT = {"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Expand", "Gather", "Split",
           "Identity"}
_PROBS_PASS = {"Where", "Cast", "Identity", "Dropout"}


@dataclasses.dataclass(frozen=True)
class _Axis:
    kind: str  # "batch" | "col" | "part" | "head" | "dim" | "one" | "rep"
    size: int = 1
    stride: int = 0
    rep: int = 1  # a head axis after a GQA repeat: query head h reads kv head h // rep


class _Fail(Exception):
    pass


def _static(shape: ir.Shape | None, node: ir.Node) -> list:
    if shape is None:
        raise _Fail(f"{node.name}: the output shape is unknown (run shape inference first)")
    return [d if isinstance(d, int) else None for d in shape]


def _ints(value: ir.Value | None) -> list[int] | None:
    from edgec.graph_passes.rotation.topology import const_array

    arr = const_array(value)
    return None if arr is None else [int(x) for x in np.atleast_1d(arr)]


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _axes_arg(node: ir.Node) -> list[int] | None:
    return _ints(node.inputs[1]) if len(node.inputs) > 1 else _attr(node, "axes", None)


def _selection(node: ir.Node, rank: int) -> tuple[int, int, int] | None:
    """(axis, start, stop) that a one-axis Slice or a scalar Gather selects (negatives resolved
    only for the axis index)."""
    if node.op_type == "Gather":
        idx = _ints(node.inputs[1])
        if idx is None or len(idx) != 1:
            return None
        return _attr(node, "axis", 0) % rank, idx[0], idx[0] + 1
    if node.op_type == "Slice":
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or steps != [1]:
            return None
        return axes[0] % rank, starts[0], ends[0]
    return None


def _clip(start: int, stop: int, size: int) -> tuple[int, int]:
    start = start + size if start < 0 else start
    stop = stop + size if stop < 0 else stop
    return max(0, min(start, size)), max(0, min(stop, size))


def _select_part(axes: list[_Axis], axis: int, start: int, stop: int, offset: int, node: ir.Node):
    ax = axes[axis]
    start, stop = _clip(start, stop, ax.size)
    if ax.kind == "col" and stop > start:  # V's columns of a fused QKV, split before the heads
        axes[axis] = _Axis("col", stop - start, ax.stride)
        return offset + start * ax.stride
    if ax.kind != "part" or stop - start != 1:
        raise _Fail(f"{node.name} slices V along a non-part axis or more than one part")
    axes[axis] = _Axis("part", 1, ax.stride)
    return offset + start * ax.stride


def _reshape(axes: list[_Axis], out: list, node: ir.Node) -> list[_Axis]:
    last = axes[-1]
    mqa = len(out) == len(axes) + 1 and out[-2] == 1  # [..., d] → [..., 1 kv head, d]
    if (last.kind == "col" and out and out[-1] == last.size and not mqa
            and all(a.kind == "batch" for a in axes[:-1])):
        return [_Axis("batch")] * (len(out) - 1) + [last]  # [b·s, N] ↔ [b, s, N] (GPT-2)
    if last.kind == "col":  # split the columns: [..., N] → [..., (part,) head, dim]
        prod, k = 1, 0
        while prod < last.size and k < len(out) and out[-1 - k] is not None:
            prod *= out[-1 - k]
            k += 1
        if k == 1 and mqa:
            k = 2
        if prod != last.size or k < 2 or len(out) - k != len(axes) - 1:
            raise _Fail(f"{node.name} does not split V's columns into heads")
        split, stride = [], last.stride
        for i, size in enumerate(reversed(out[-k:])):
            split.append(_Axis("dim" if i == 0 else "head" if i == 1 else "part", size, stride))
            stride *= size
        return axes[:-1] + split[::-1]
    for i in range(len(axes) - 1):  # merge the GQA repeat: [.., kv, rep, ..] → [.., heads, ..]
        a, b = axes[i], axes[i + 1]
        if not (a.kind == "head" and b.kind in ("rep", "one") and a.rep == 1
                and len(out) == len(axes) - 1 and out[i] is not None):
            continue
        rep = b.size if b.kind == "rep" else out[i] // a.size  # an Expand of unknown size
        rest = axes[i + 2:]
        if out[i] == a.size * rep and all(o == x.size for o, x in zip(out[i + 1:], rest)
                                          if x.kind != "batch"):
            return axes[:i] + [_Axis("head", out[i], a.stride, rep)] + rest
    if len(out) == len(axes) and all(o == a.size for o, a in zip(out, axes)
                                     if a.kind != "batch"):
        return axes
    raise _Fail(f"{node.name} reshapes the V heads in a way the rotation does not follow")


def _step(node: ir.Node, out: ir.Value, axes: list[_Axis], offset: int):
    op, rank = node.op_type, len(axes)
    if op == "Identity":
        return axes, offset
    if op == "Reshape":
        return _reshape(axes, _static(out.shape, node), node), offset
    if op == "Transpose":
        perm = _attr(node, "perm", None) or list(range(rank))[::-1]
        return [axes[p] for p in perm], offset
    if op in ("Slice", "Gather"):
        sel = _selection(node, rank)
        if sel is None:
            raise _Fail(f"{node.name}: a {op} with non-constant or multi-axis arguments")
        if op == "Gather" and axes[sel[0]].kind == "col":
            raise _Fail(f"{node.name} gathers one column of V")
        axes = list(axes)
        offset = _select_part(axes, sel[0], sel[1], sel[2], offset, node)
        if op == "Gather":
            del axes[sel[0]]
        return axes, offset
    if op == "Split":
        axis = _attr(node, "axis", 0) % rank
        k = list(node.outputs).index(out)
        sizes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        if sizes is None:
            sizes = [axes[axis].size // len(node.outputs)] * len(node.outputs)
        axes = list(axes)
        return axes, _select_part(axes, axis, sum(sizes[:k]), sum(sizes[:k + 1]), offset, node)
    if op == "Squeeze":
        drop = _axes_arg(node)
        drop = ([i for i, a in enumerate(axes) if a.size == 1 and a.kind in ("part", "one")]
                if drop is None else [d % rank for d in drop])
        if any(axes[d].size != 1 or axes[d].kind not in ("part", "one") for d in drop):
            raise _Fail(f"{node.name} squeezes an axis of V that is not a selected part")
        return [a for i, a in enumerate(axes) if i not in drop], offset
    if op == "Unsqueeze":
        new = _axes_arg(node)
        if new is None:
            raise _Fail(f"{node.name}: Unsqueeze axes are not constant")
        axes = list(axes)
        for d in sorted(x % (rank + len(new)) for x in new):
            axes.insert(d, _Axis("one"))
        return axes, offset
    if op == "Expand":
        shape = _static(out.shape, node)
        if len(shape) != rank:
            raise _Fail(f"{node.name} expands V to another rank")
        return [_Axis("rep", s) if a.kind == "one" and s not in (None, 1) else a
                for a, s in zip(axes, shape)], offset
    raise _Fail(f"{node.name} ({op}) sits between the V projection and attention")


def _probs_v(softmax: ir.Node) -> ir.Node | None:
    """The MatMul(P, V) that the Softmax's probabilities reach through Where/Cast/Identity."""
    frontier, seen = [softmax.outputs[0]], set()
    for _ in range(3):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type == "MatMul" and use.idx == 0:
                    return node
                if node.op_type in _PROBS_PASS and id(node) not in seen:
                    seen.add(id(node))
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


def _only_reader(value: ir.Value, node: ir.Node, axes: list[_Axis]) -> None:
    """``node`` is the only reader of ``value`` that sees V's columns (Shape reads none; a sibling
    Slice/Gather selecting another part of a fused QKV reads none either)."""
    if value.is_graph_output():
        raise _Fail(f"{value.name} (rotated by R2) is also a graph output, e.g. a KV cache")
    mine = _selection(node, len(axes)) if node.op_type in ("Slice", "Gather") else None
    for use in value.uses():
        other = use.node
        if other is node or other.op_type == "Shape":
            continue
        sel = _selection(other, len(axes)) if other.op_type in ("Slice", "Gather") else None
        if mine is not None and sel is not None and sel[0] == mine[0]:
            size = axes[mine[0]].size
            a, b = _clip(sel[1], sel[2], size)
            if not a <= _clip(mine[1], mine[2], size)[0] < b:
                continue  # another part of a fused projection
        raise _Fail(f"{other.name} ({other.op_type}) also reads {value.name}, which R2 rotates")


def _trace_v(pv: ir.Node):
    from edgec.graph_passes.rotation.topology import linear_ending_at

    chain, value = [], pv.inputs[1]
    while (lin := linear_ending_at(value)) is None:
        p = value.producer()
        if p is None or p.op_type not in _LAYOUT or len(chain) > 16:
            what = f"{p.name} ({p.op_type})" if p is not None else f"graph input {value.name}"
            raise _Fail(f"V reaches {pv.name} from {what}, not from a MatMul with a constant "
                        "weight through layout ops")
        chain.append((p, value))
        value = p.inputs[0]
    n_cols = lin.shape[1]
    rank = len(lin.output.shape) if lin.output.shape is not None else 3
    axes, offset = [_Axis("batch")] * (rank - 1) + [_Axis("col", n_cols, 1)], 0
    value = lin.output
    for node, out in reversed(chain):
        _only_reader(value, node, axes)
        axes, offset = _step(node, out, axes, offset)
        value = out
    _only_reader(value, pv, axes)
    heads = [i for i, a in enumerate(axes) if a.kind == "head"]
    if axes[-1].kind != "dim" or len(heads) != 1 or any(
            a.kind in ("col", "rep") or (a.kind == "part" and a.size != 1) for a in axes):
        raise _Fail(f"V reaches {pv.name} without one head axis and head_dim last")
    return lin, axes, offset, len(axes) - heads[0]


def _trace_o(pv: ir.Node, heads: int, head_dim: int, from_end: int):
    from edgec.graph_passes.rotation.topology import as_linear, is_lora_reader

    value = pv.outputs[0]
    rank = len(value.shape) if value.shape is not None else from_end + 1
    axes = [_Axis("batch")] * rank
    axes[rank - from_end], axes[-1] = _Axis("head", heads), _Axis("dim", head_dim)
    for _ in range(8):
        if value.is_graph_output():
            raise _Fail(f"the attention output {value.name} is a graph output")
        uses = [u for u in value.uses() if u.node.op_type != "Shape"
                and not (u.idx == 0 and is_lora_reader(u.node))]  # O's LoRA branch goes with O
        if len(uses) != 1:
            raise _Fail(f"the attention output {value.name} has {len(uses)} readers")
        node = uses[0].node
        lin = as_linear(node) if uses[0].idx == 0 else None
        if lin is not None:
            if axes[-1].kind != "col":
                raise _Fail(f"{node.name} reads the heads before they are merged")
            return lin
        if node.op_type == "Transpose":
            axes = [axes[p] for p in _attr(node, "perm", None) or range(rank)[::-1]]
        elif node.op_type == "Reshape":
            out = _static(node.outputs[0].shape, node)
            if (len(axes) >= 2 and axes[-2].kind == "head" and axes[-1].kind == "dim"
                    and out and out[-1] == heads * head_dim
                    and (len(out) == len(axes) - 1
                         or all(a.kind == "batch" for a in axes[:-2]))):
                # merge the heads (and maybe the batch axes: [b, s, h, d] → [b·s, h·d], GPT-2)
                axes = [_Axis("batch")] * (len(out) - 1) + [_Axis("col", heads * head_dim, 1)]
            elif len(out) != len(axes) or out[-1] != axes[-1].size:
                raise _Fail(f"{node.name} reshapes the attention output in a way R2 does not "
                            "follow")
        else:
            raise _Fail(f"{node.name} ({node.op_type}) sits between attention and O")
        value = node.outputs[0]
    raise _Fail(f"no O projection after {pv.name}")


def trace_attention(softmax: ir.Node, layer: int):
    """(layer, v, o, head_dim, heads, kv_heads, v_columns, o_rows, group) for the attention
    this Softmax belongs to, a ``Skip`` saying why not, or None when no probs·V follows it."""
    from edgec.graph_passes.rotation.topology import Skip

    pv = _probs_v(softmax)
    if pv is None:
        return None
    try:
        v, axes, offset, from_end = _trace_v(pv)
        head = axes[len(axes) - from_end]
        head_dim, heads, rep = axes[-1].size, head.size, head.rep
        o = _trace_o(pv, heads, head_dim, from_end)
    except _Fail as e:
        return Skip("r2", pv.name, str(e))
    kv = heads // rep
    return (layer, v, o, head_dim, heads, kv, [offset + g * head.stride for g in range(kv)],
            [h * head_dim for h in range(heads)], [h // rep for h in range(heads)])
