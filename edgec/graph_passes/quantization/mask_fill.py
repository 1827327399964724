"""Attention-mask fill: an additive mask's dtype-min (or -inf) fill ⇒ a bounded fill ``-F``.

    Where(keep, 0, finfo.min) | Mul(1 - mask, finfo.min) | Add(scores, C_causal)  → … → Softmax
    ⇒ the same with every constant entry ≤ -1e4 replaced by ``-F`` (default 100)

Why: a fully-quantized target (the QNN NPU quantizes every tensor) would otherwise calibrate the
mask's tensors and the masked scores to a range of ~3.4e38, wiping out every real score. Exact in
fp32 while the unmasked scores of a row span less than about F − 17 (then e^(−F+spread) is below
fp32 resolution); rows with every key masked differ (they are meaningless either way).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["MaskFillPass", "HUGE"]

HUGE = 1e4  # |fill| at or above this is a "minus infinity" mask constant
_THROUGH = {"Where", "Mul", "Add", "Sub", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Cast",
            "Transpose", "Slice", "Concat", "Tile", "Identity", "Min", "Max"}


def _constant(value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _reaches_softmax(value: ir.Value, depth: int = 8) -> bool:
    if depth == 0:
        return False
    for user, _ in value.uses():
        if user.op_type == "Softmax":
            return True
        if user.op_type in _THROUGH and any(_reaches_softmax(o, depth - 1) for o in user.outputs):
            return True
    return False


class MaskFillPass(EdgecPass):
    name = "mask-fill"
    exact = True
    rtol = 1e-4

    def __init__(self, fill: float = 100.0):
        super().__init__()
        self.fill = float(fill)

    def call(self, model: ir.Model) -> PassResult:
        replaced = 0
        bounded: dict[str, ir.Value] = {}  # one bounded copy per shared constant
        for node in list(model.graph):
            if node.op_type not in ("Where", "Mul", "Add"):
                continue
            for i, value in enumerate(node.inputs):
                if value is None or (i == 0 and node.op_type == "Where"):
                    continue
                arr = _constant(value)
                if (arr is None or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating)
                        or not np.any(arr <= -HUGE)):
                    continue
                if node.op_type == "Mul" and not np.all(arr <= -HUGE):
                    continue  # a scale, not a fill
                if not any(_reaches_softmax(o) for o in node.outputs):
                    continue
                new = bounded.get(value.name)
                if new is None:
                    new = ir.Value(name=f"{value.name}_bounded",
                                   const_value=ir.tensor(np.where(arr <= -HUGE, -self.fill, arr
                                                                  ).astype(arr.dtype)))
                    model.graph.register_initializer(new)
                    bounded[value.name] = new
                node.replace_input_with(i, new)
                replaced += 1
                if not value.uses() and value.name in model.graph.initializers:
                    model.graph.initializers.pop(value.name)
        return PassResult(model, replaced > 0, {"fills_bounded": replaced, "fill": -self.fill})
