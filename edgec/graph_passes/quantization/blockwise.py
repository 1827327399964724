"""Block-wise symmetric weight-only quantization of constant MatMul weights (w4a16).

    MatMul(x, W[K, N])  ⇒  MatMul(x, DequantizeLinear(W_q[K, N]; s[K/b, N], axis=0, block_size=b))
    Gemm(x, W[N, K], transB=1)  ⇒  the same with blocks along axis 1 (K)

Scales are absmax/qmax per block of ``b`` input channels and always positive (TensorRT's rule),
no zero point (symmetric), so the same graph is legal for TensorRT, ORT and OpenVINO. A weight
read by several nodes (one Linear called twice) is quantized once and its DequantizeLinear shared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["blockwise_weights"]

_TYPES = {"int4": (ir.DataType.INT4, 7), "int8": (ir.DataType.INT8, 127)}


def blockwise_weights(model: ir.Model, scheme, exclude: set[str]) -> dict[str, Any]:
    """Rewrite every eligible MatMul weight of ``model`` in place; returns stats."""
    dtype, qmax = _TYPES[scheme.weights]
    block = scheme.block_size or 128
    done, skipped = 0, {}
    shared: dict[tuple[str, int], ir.Value] = {}  # (weight, K axis) → its dequantized value
    for node in list(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or {node.name, node.op_type} & exclude:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            continue
        axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0  # the K axis
        w = node.inputs[1]
        if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
            continue
        if (w.name, axis) in shared:  # a weight read by several nodes: quantized once
            node.replace_input_with(1, shared[w.name, axis])
            _drop_if_unused(model, w)
            continue
        arr = w.const_value.numpy()
        if arr.ndim != 2 or arr.shape[axis] % block:
            reason = "not 2-D" if arr.ndim != 2 else f"K not a multiple of {block}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kn = arr if axis == 0 else arr.T  # [K, N] view
        k, n = kn.shape
        blocks = kn.reshape(k // block, block, n)
        scale = np.abs(blocks).max(axis=1) / qmax
        scale = np.where(scale > 0, scale, np.float32(1e-8)).astype(np.float32)  # positive
        q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8)
        q = q.reshape(k, n)
        if axis == 1:
            q, scale = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)
        base = w.name if all(k[0] != w.name for k in shared) else f"{w.name}_axis{axis}"
        wq = ir.Value(name=f"{base}_q", const_value=ir.tensor(q, dtype=dtype))
        ws = ir.Value(name=f"{base}_scale", const_value=ir.tensor(scale))
        for v in (wq, ws):
            model.graph.register_initializer(v)
        dq = ir.node("DequantizeLinear", [wq, ws], attributes={"axis": axis, "block_size": block},
                     name=f"{node.name}_weight_dq")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(arr.shape))
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        shared[w.name, axis] = dq.outputs[0]
        _drop_if_unused(model, w)
        done += 1
    return {"weights_blockwise": done, "block_size": block,
            **({"skipped": skipped} if skipped else {})}


def _drop_if_unused(model: ir.Model, w: ir.Value) -> None:
    if not w.uses() and w.name in model.graph.initializers:
        model.graph.initializers.pop(w.name)
