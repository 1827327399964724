"""The HTP's QDQ form: ONNX Runtime's QNN config helper, plus what the HTP measured to need.

    every op the QNN EP quantizes (``get_qnn_qdq_config``), u8 per-tensor weights by default
    + 16-bit overrides for the tensors 8 bits cannot hold (``select``: scores, angles, masks,
      and tensors whose measured crest factor exceeds the scheme's ``outlier_crest``)
    + MatMul weights symmetric per output channel in the scheme's type (int8, int4)
    + constant data inputs quantized too (``ForceQuantizeNoInputCheck``): every op the HTP
      runs quantized reads quantized inputs
    + the plan's float nodes left as they are (``float_stream``: fp16 on the HTP)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec.graph_passes.quantization.quantize import quant_type
from edgec.graph_passes.rotation.edit import ROTATION_TAG

__all__ = ["qdq_options"]


def qdq_options(model: ir.Model, path: Path, scheme, plan, method) -> dict[str, Any]:
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    overrides = {t: [{"quant_type": quant_type("uint16")}] for t in plan.tensors_16bit}
    # MatMul weights in the scheme's signed type, symmetric per output channel; every other
    # weight (LayerNorm, Conv, Gather tables) u8 per tensor, the only form all ops accept
    overrides.update(_matmul_weights(model, scheme.weights,
                                     {*plan.head_nodes, *plan.wide_nodes}))
    cfg = get_qnn_qdq_config(str(path), None, calibrate_method=method,
                             activation_type=quant_type(scheme.activations),
                             weight_type=quant_type("uint8"), per_channel=False,
                             init_overrides=overrides or None,
                             activation_symmetric=scheme.activation_symmetric,
                             weight_symmetric=False)
    return dict(activation_type=quant_type(scheme.activations), weight_type=quant_type("uint8"),
                op_types_to_quantize=cfg.op_types_to_quantize, per_channel=cfg.per_channel,
                extra_options={**cfg.extra_options, "ForceQuantizeNoInputCheck": True},
                nodes_to_exclude=[*(cfg.nodes_to_exclude or ()), *plan.nodes_to_exclude])


def _matmul_weights(model: ir.Model, weights: str, heads: set[str] = frozenset()
                    ) -> dict[str, list[dict[str, Any]]]:
    """Constant [K, N] MatMul weights: ``weights`` (int8/int4), symmetric, per channel (axis 1).
    An online rotation's own MatMul (``--rotate ...:r4=true``; its factors are orthogonal, not
    all ±1/√n) stays int8: at 4 bits it would round the rotation itself. So do the output
    ``heads`` and the kept MatMuls the plan runs at w8a16 (``QuantScheme.head_w8a16``,
    ``QuantPlan.wide_nodes``)."""
    out = {}
    for node in model.graph:
        w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if w is not None and w.is_initializer() and w.const_value is not None and len(
                w.const_value.shape) == 2:
            kind = "int8" if ROTATION_TAG in node.metadata_props or node.name in heads else weights
            out[w.name] = [{"quant_type": quant_type(kind), "symmetric": True, "axis": 1}]
    return out
