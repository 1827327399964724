"""Block-wise int4 MatMul weights in the low-power form (LPBQ) the Qualcomm HTP runs:

    scale[b, n] = k[b, n] · c[n]      k: unsigned ``scale_bits``-bit integer per block, c: float
    W ≈ q · scale (q int4, symmetric; one block = ``block`` consecutive input channels)

    DequantizeLinear(k u8 [K/B, N], c [N], axis=1)  →  scale [K/B, N]
    DequantizeLinear(q int4 [K, N], scale, block_size=B, axis=0)  →  MatMul

A scale per 32 input channels instead of one per output channel gives each block of weights
its own range: the int4 error of Gaussian weights falls from 13% to about 10% (relative L2). The
HTP takes block-wise int4 only in this form, and only with 4-bit block scales: probed on
onnxruntime-qnn 2.7.0 (QNN 2.51), a plain block-wise ``DequantizeLinear`` went to the CPU, and
8-bit block scales (values up to 255) ran but disagreed with ONNX Runtime's CPU reading of the
same graph (relative error 1.2); with ``k ≤ 15`` it agrees (0.013). With 16-bit activations it
still disagreed (0.30), so a MatMul whose input is 16-bit keeps its per-channel weights.

It rewrites the per-channel int4 weights ONNX Runtime's quantizer wrote (the fp32 weights come
from the graph before quantization, by node name); ``gptq`` then re-rounds on this grid.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["lpbq_weights"]

_EIGHT_BIT = (ir.DataType.UINT8, ir.DataType.INT8)


def _activation_bits_8(node: ir.Node) -> bool:
    dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3:
        return False
    zp = dq.inputs[2]
    return zp is not None and zp.const_value is not None and zp.const_value.dtype in _EIGHT_BIT


def _candidate(node: ir.Node) -> ir.Node | None:
    """The MatMul's weight DequantizeLinear if it is int4 per output channel of a [K, N]."""
    if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.outputs[0].uses()) != 1:
        return None
    data, scale = dq.inputs[0], dq.inputs[1]
    if (data.const_value is None or data.const_value.dtype != ir.DataType.INT4
            or len(data.const_value.shape) != 2 or scale.const_value is None):
        return None
    attrs = {k: a.value for k, a in dq.attributes.items()}
    if attrs.get("block_size", 0) or attrs.get("axis", 1) % 2 != 1:
        return None
    return dq if scale.const_value.size == data.const_value.shape[1] else None


def _const(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))


def lpbq_grid(w: np.ndarray, block: int, scale_bits: int) -> tuple[np.ndarray, ...]:
    """(k [K/B, N] uint8, c [N] float32, q [K, N] int8 in [-8, 7]) for ``w`` [K, N]: each block's
    absmax scale rounded up to a multiple of c = (largest block scale) / (2^bits − 1)."""
    k_in, n = w.shape
    w = w.astype(np.float64)
    s = np.abs(w.reshape(k_in // block, block, n)).max(axis=1) / 7.0
    levels = 2**scale_bits - 1
    c = s.max(axis=0) / levels
    c[c == 0] = 1.0  # an all-zero column: any scale
    k = np.clip(np.ceil(s / c - 1e-9), 1, levels)
    c32 = c.astype(np.float32)
    eff = np.repeat(k * c32.astype(np.float64), block, axis=0)
    q = np.clip(np.rint(w / eff), -8, 7)
    return k.astype(np.uint8), c32, q.astype(np.int8)


def lpbq_weights(fp32: ir.Model, quantized: ir.Model, block: int, scale_bits: int
                 ) -> dict[str, Any]:
    """Rewrite, in ``quantized`` (in place), each per-channel int4 MatMul weight whose MatMul
    reads 8-bit activations into the LPBQ form (module docstring). Returns stats."""
    names = Counter(n.name for n in fp32.graph)  # the cleanup names every node uniquely;
    by_name = {n.name: n for n in fp32.graph if names[n.name] == 1}  # never guess among repeats
    done, kept = 0, {}

    def keep(why: str) -> None:
        kept[why] = kept.get(why, 0) + 1

    for node in list(quantized.graph):
        dq = _candidate(node)
        if dq is None:
            continue
        source = by_name.get(node.name)
        weight = (source.inputs[1].const_value if source is not None
                  and source.op_type == "MatMul" and source.inputs[1] is not None else None)
        if weight is None or tuple(weight.shape) != tuple(dq.inputs[0].const_value.shape):
            keep("no fp32 weight")
            continue
        if weight.shape[0] % block:
            keep(f"input channels not a multiple of {block}")
            continue
        if not _activation_bits_8(node):
            keep("16-bit activations")
            continue
        k, c, q = lpbq_grid(weight.numpy(), block, scale_bits)
        base = dq.inputs[0].name
        old = [v for v in dq.inputs if v is not None]  # per-channel data, scale, zero point
        scale = ir.node("DequantizeLinear", [
            _const(f"{base}_lpbq_k", k), _const(f"{base}_lpbq_c", c),
            _const(f"{base}_lpbq_k_zp", np.zeros(c.shape, np.uint8))],
            attributes={"axis": 1}, name=f"{dq.name}_lpbq_scale")
        scale.outputs[0].name = f"{base}_lpbq_scale"
        for v in scale.inputs:
            quantized.graph.register_initializer(v)
        q_value = _const(f"{base}_lpbq_q", q, ir.DataType.INT4)
        zp = _const(f"{base}_lpbq_zp", np.zeros(k.shape, np.int8), ir.DataType.INT4)
        quantized.graph.register_initializer(q_value)
        quantized.graph.register_initializer(zp)
        quantized.graph.insert_before(dq, scale)
        dq.replace_input_with(0, q_value)
        dq.replace_input_with(1, scale.outputs[0])
        if len(dq.inputs) < 3:
            dq.resize_inputs(3)
        dq.replace_input_with(2, zp)
        dq.attributes["axis"] = ir.AttrInt64("axis", 0)
        dq.attributes["block_size"] = ir.AttrInt64("block_size", block)
        for v in old:
            if not v.uses() and v.is_initializer():
                quantized.graph.initializers.pop(v.name, None)
        done += 1
    return {"lpbq": {"weights": done, "block": block, "scale_bits": scale_bits,
                     **({"per_channel_kept": kept} if kept else {})}}
