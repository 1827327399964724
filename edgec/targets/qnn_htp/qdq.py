"""The HTP's QDQ form: ONNX Runtime's QNN config helper, plus what the HTP measured to need.

    every op the QNN EP quantizes (``get_qnn_qdq_config``), u8 per-tensor weights by default
    + 16-bit overrides for the tensors 8 bits cannot hold (``select``: scores, angles, masks)
    + symmetric int4 per-output-channel MatMul weights for w4a16 (others stay u8)
    + constant data inputs quantized too (``ForceQuantizeNoInputCheck``): the HTP has no float
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec.graph_passes.quantization.quantize import quant_type

__all__ = ["qdq_options"]


def qdq_options(model: ir.Model, path: Path, scheme, plan, method) -> dict[str, Any]:
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    overrides = {t: [{"quant_type": quant_type("uint16")}] for t in plan.tensors_16bit}
    weights = scheme.weights
    if scheme.weights == "int4":  # the HTP runs int4 only symmetric; LayerNorm etc. stay u8
        weights = "uint8"
        overrides.update(_int4_matmul_weights(model))
    cfg = get_qnn_qdq_config(str(path), None, calibrate_method=method,
                             activation_type=quant_type(scheme.activations),
                             weight_type=quant_type(weights),
                             per_channel=scheme.per_channel and scheme.weights != "int4",
                             init_overrides=overrides or None,
                             activation_symmetric=scheme.activation_symmetric,
                             weight_symmetric=scheme.weight_symmetric)
    return dict(activation_type=quant_type(scheme.activations), weight_type=quant_type(weights),
                op_types_to_quantize=cfg.op_types_to_quantize, per_channel=cfg.per_channel,
                extra_options={**cfg.extra_options, "ForceQuantizeNoInputCheck": True},
                nodes_to_exclude=cfg.nodes_to_exclude)


def _int4_matmul_weights(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """w4a16: symmetric int4 per output channel (axis 1 of [K, N]) on MatMul weights."""
    out = {}
    for node in model.graph:
        w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if w is not None and w.is_initializer() and w.const_value is not None and len(
                w.const_value.shape) == 2:
            out[w.name] = [{"quant_type": quant_type("int4"), "symmetric": True, "axis": 1}]
    return out
