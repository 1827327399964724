"""Integer inputs that index a table (token ids into an embedding, positions into a rotary
cache, ``table[i]`` on a buffer), and the table's size: the values such an input may take.

Out of range, ONNX Runtime stops with a Gather error that reads as edgec's fault (exit 1), and
OpenVINO returns zeros for the row: an artifact run on another tokenizer's ids gave all-zero
logits with exit 0. Recorded per input in the manifest (``index_bound``) and checked on every
run and on calibration samples, one line naming the input, the value and the range.

Tensor indexing (``table[i]``) exports as GatherND, whose negative indices count from the end as
in PyTorch (``index_negative``: values in ``[-bound, bound)``); Gather and GatherElements come
from ``nn.Embedding``, ``index_select`` and ``gather``, which refuse negatives in PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError

__all__ = ["index_bounds", "check_indices"]

# ops an index passes through unchanged in value (shape or dtype only)
_CARRY = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Concat"}
# ops between a constant table and its gather that keep the table's shape (a quantized one)
_TABLE_CARRY = {"DequantizeLinear", "Cast", "Identity"}
# ...and those that also keep it in its place along the last axis (its GatherND component)
_KEEP_LANE = {"Cast", "Identity"}


def index_bounds(model: ir.Model) -> dict[str, dict[str, Any]]:
    """{integer graph input: its manifest fields, ``index_bound`` (the size of the smallest
    constant table it indexes) and ``index_negative`` where every use counts negatives from
    the end}."""
    out: dict[str, dict[str, Any]] = {}
    for value in model.graph.inputs:
        if value.dtype is None or not value.dtype.is_integer():
            continue
        found = [f for f in _uses_as_index(value) if f is not None]
        if found:
            fields: dict[str, Any] = {"index_bound": min(b for b, _ in found)}
            if all(neg for _, neg in found):
                fields["index_negative"] = True
            out[value.name] = fields
    return out


def _uses_as_index(value: ir.Value):
    """(table size, negatives allowed) per use of ``value`` as the indices of a gather from a
    constant. The walk tracks ``lane``: the GatherND index component the value's elements land
    in (None until an Unsqueeze makes them the last axis of an index tuple)."""
    seen, todo = set(), [(value, None)]
    while todo:
        v, lane = todo.pop()
        if (id(v), lane) in seen:
            continue
        seen.add((id(v), lane))
        for node, idx in v.uses():
            op = node.op_type
            if op in ("Gather", "GatherElements", "GatherND") and idx == 1:
                yield _bound(node, v, lane)
            elif op in _KEEP_LANE and idx == 0:
                todo.extend((o, lane) for o in node.outputs)
            elif lane is None and op in _CARRY and (idx == 0 or op == "Concat"):
                todo.extend((o, _trailing_unsqueeze(node)) for o in node.outputs)
            elif lane is not None and op == "Concat":
                offset = _offset_along_last(node, idx)
                if offset is not None:
                    todo.extend((o, lane + offset) for o in node.outputs)


def _table_dims(node: ir.Node) -> tuple | None:
    """The shape of the constant table ``node`` gathers from, also where quantization put it
    behind a DequantizeLinear (qnn-htp's w8a8 embedding: its bound was lost, so out-of-range
    ids reached the NPU)."""
    table = node.inputs[0]
    for _ in range(4):
        if table is None:
            return None
        if table.const_value is not None:
            return tuple(table.const_value.shape)
        producer = table.producer()
        if producer is None or producer.op_type not in _TABLE_CARRY:
            return None
        table = producer.inputs[0]
    return None


def _bound(node: ir.Node, indices: ir.Value, lane: int | None):
    dims = _table_dims(node)
    if dims is None:
        return None
    if node.op_type != "GatherND":
        axis = node.attributes.get_int("axis", 0)
        return (dims[axis], False) if -len(dims) <= axis < len(dims) else None
    first = node.attributes.get_int("batch_dims", 0)
    if lane is not None:
        return (dims[first + lane], True) if first + lane < len(dims) else None
    # the input is the whole index tuple: one bound only where its components share it
    tup = indices.shape[-1] if indices.shape is not None and len(indices.shape) else None
    sizes = set(dims[first:first + tup]) if isinstance(tup, int) else set()
    return (sizes.pop(), True) if len(sizes) == 1 else None


def _trailing_unsqueeze(node: ir.Node) -> int | None:
    """Lane 0 where ``node`` is an Unsqueeze adding the last axis (``table[i]`` exports as
    GatherND(table, Unsqueeze(i, -1))), else None."""
    if node.op_type != "Unsqueeze" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    axes = node.inputs[1].const_value
    shape = node.outputs[0].shape
    if axes is None:
        return None
    rank = len(shape) if shape is not None else None
    last = {-1} | ({rank - 1} if rank else set())
    return 0 if any(int(a) in last for a in axes.numpy().reshape(-1)) else None


def _offset_along_last(node: ir.Node, idx: int) -> int | None:
    """Components ahead of input ``idx`` in a Concat along the last axis; None otherwise."""
    shape = node.outputs[0].shape
    axis = node.attributes.get_int("axis", 0)
    if shape is None or axis not in (-1, len(shape) - 1):
        return None
    ahead = [i.shape[-1] if i is not None and i.shape is not None and len(i.shape) else None
             for i in node.inputs[:idx]]
    return sum(ahead) if all(isinstance(d, int) for d in ahead) else None


def check_indices(feeds: Mapping[str, np.ndarray], bounds: Mapping[str, Mapping[str, Any]],
                  what: str = "input") -> None:
    """Refuse a value of an index input outside [0, its table size) (or [-size, size) where
    negatives count from the end) in one line; ``bounds`` maps names to manifest fields."""
    for name, fields in bounds.items():
        arr = feeds.get(name)
        if arr is None or not np.size(arr) or not np.issubdtype(np.asarray(arr).dtype,
                                                                np.integer):
            continue
        bound = int(fields["index_bound"])
        low = -bound if fields.get("index_negative") else 0
        lo, hi = int(np.min(arr)), int(np.max(arr))
        if lo < low or hi >= bound:
            bad = lo if lo < low else hi
            # token ids come from a tokenizer; another index (table[i]) from the user's code
            hint = ("the vocabulary for token ids); were these ids made by this model's "
                    "tokenizer?" if "ids" in name.lower() else "give indices in that range)")
            raise UserError(f"{what} {name!r} holds {bad}, outside [{low}, {bound}) (the size "
                            f"of the table it indexes: {hint}")
