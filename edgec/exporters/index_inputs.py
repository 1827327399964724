"""Integer inputs that index a table (token ids into an embedding, positions into a rotary
cache), and the table's size: the values such an input may take.

Out of range, ONNX Runtime stops with a Gather error that reads as edgec's fault (exit 1), and
OpenVINO returns zeros for the row: an artifact run on another tokenizer's ids gave all-zero
logits with exit 0. Recorded per input in the manifest (``index_bound``) and checked on every
run and on calibration samples, one line naming the input, the value and the range.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError

__all__ = ["index_bounds", "check_indices"]

# ops an index passes through unchanged in value (shape or dtype only)
_CARRY = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def index_bounds(model: ir.Model) -> dict[str, int]:
    """{integer graph input: size of the smallest constant table a Gather indexes with it}."""
    out: dict[str, int] = {}
    for value in model.graph.inputs:
        if value.dtype is None or not value.dtype.is_integer():
            continue
        sizes, seen, todo = [], set(), [value]
        while todo:
            v = todo.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for node, idx in v.uses():
                if node.op_type in _CARRY and idx == 0:
                    todo.extend(o for o in node.outputs)
                elif node.op_type == "Gather" and idx == 1:
                    table = node.inputs[0]
                    axis = node.attributes.get("axis")
                    if table is not None and table.const_value is not None and (
                            axis is None or axis.value == 0):
                        sizes.append(int(table.const_value.shape[0]))
        if sizes:
            out[value.name] = min(sizes)
    return out


def check_indices(feeds: Mapping[str, np.ndarray], bounds: Mapping[str, int],
                  what: str = "input") -> None:
    """Refuse a value of an index input outside [0, its table size) in one line."""
    for name, bound in bounds.items():
        arr = feeds.get(name)
        if arr is None or not np.size(arr) or not np.issubdtype(np.asarray(arr).dtype,
                                                                np.integer):
            continue
        lo, hi = int(np.min(arr)), int(np.max(arr))
        if lo < 0 or hi >= bound:
            bad = lo if lo < 0 else hi
            raise UserError(f"{what} {name!r} holds {bad}, outside [0, {bound}) (the size of "
                            "the table it indexes: the vocabulary for token ids); were these "
                            "ids made by this model's tokenizer?")
