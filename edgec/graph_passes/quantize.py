"""Quantization: fp32 graph ⇒ QDQ graph in the form the target's scheme asks for.

    MatMul(x, W)  ⇒  MatMul(DQ(Q(x; s_x, z_x)), DQ(W_q; s_w[, block]))      (per QuantScheme)

onnxruntime.quantization does the insertion (``quantize_static`` in QDQ format from cached
ranges; ``get_qnn_qdq_config`` for QNN's rules). Block-wise weight-only int4 is done here
(``_blockwise``): ORT's MatMulNBitsQuantizer writes negative scales in symmetric mode, which
TensorRT refuses. This pass adds what ORT lacks: the choice of what not to quantize
(masks, integer paths, user exclusions; see ``_quant_select``), 16-bit tensors on QNN, opset
upgrades for 16-bit/int4 types, and ranges from an edgec calibration cache. The pass is
approximating: the pipeline reports its error against the fp32 model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import PassResult
from edgec.graph_passes._blockwise import blockwise_weights
from edgec.graph_passes._quant_select import plan_quantization

__all__ = ["QuantizePass", "quant_type"]


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    table = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int16": QuantType.QInt16,
             "uint16": QuantType.QUInt16, "int4": QuantType.QInt4, "uint4": QuantType.QUInt4,
             "float8e4m3fn": QuantType.QFLOAT8E4M3FN}
    return table[name]


@contextlib.contextmanager
def _quiet_ort_quantization():
    # quantize_static logs "consider pre-processing" warnings on the root logger for every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class QuantizePass(ir.passes.FunctionalPass):
    """Quantize ``model`` with ``scheme`` (a targets.QuantScheme) and a calibration cache."""

    name = "quantize"
    exact = False
    rtol = None

    def __init__(self, scheme, cache=None, exclude: tuple[str, ...] = ()):
        super().__init__()
        if scheme.calibrated and cache is None:
            raise ValueError(f"scheme {scheme.name} needs a calibration cache")
        self.scheme, self.cache, self.exclude = scheme, cache, tuple(exclude)

    def call(self, model: ir.Model) -> PassResult:
        s = self.scheme
        plan = plan_quantization(model, "qnn" if s.rules == "qnn" else "ort", self.exclude)
        unknown = [e for e in self.exclude if not any(n.name == e or n.op_type == e
                                                       for n in model.graph)]
        if unknown:
            raise UserError(f"--exclude {unknown[0]!r} names no node or op type of the model; "
                            "use node names or op types (`edgec inspect` lists them)")
        opset = model.opset_imports.get("", 0)
        if opset < s.min_opset:
            # 20 → 21 only widens type constraints (int4/16-bit Q/DQ); no op changes meaning.
            model.opset_imports[""] = s.min_opset
        extra: dict[str, Any] = {}
        if s.rules == "weight-only":
            # Rewritten in place on the graph, handed out as a new Model: the pass consumes its
            # input (no copy of a multi-GB weight set just to satisfy the functional contract).
            extra = blockwise_weights(model, s, set(plan.nodes_to_exclude))
            quantized = ir.Model(model.graph, ir_version=model.ir_version,
                                 producer_name=model.producer_name,
                                 producer_version=model.producer_version,
                                 functions=list(model.functions.values()))
        else:
            proto = ir.serde.serialize_model(model)
            with (tempfile.TemporaryDirectory(prefix="edgec-quant-") as tmp,
                  _quiet_ort_quantization()):
                out = Path(tmp) / "quantized.onnx"
                self._static(proto, out, plan, Path(tmp))
                quantized = ir.load(out)
                ir.external_data.load_to_model(quantized)  # the temp dir goes away
        if extra.get("skipped"):
            logging.getLogger(__name__).warning(
                "%s: %s weights left in float (%s)", s.name, sum(extra["skipped"].values()),
                ", ".join(extra["skipped"]))
        ops = Counter(n.op_type for n in quantized.graph)
        quantized.metadata_props.update(model.metadata_props)
        stats: dict[str, Any] = {
            "config": {"scheme": s.name, "weights": s.weights, "activations": s.activations,
                       "rules": s.rules, "method": self.cache.method if self.cache else None,
                       "exclude": list(self.exclude)},
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0),
            "excluded_nodes": len(plan.nodes_to_exclude),
            "tensors_16bit": len(plan.tensors_16bit),
            "mask_tensors": len(plan.mask_tensors),
            "opset": quantized.opset_imports.get(""),
            **extra,
        }
        return PassResult(quantized, True, stats)

    def _static(self, proto, out: Path, plan, tmp: Path) -> None:
        from onnxruntime.quantization import QuantFormat, quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data

        s = self.scheme
        ranges = tmp / "ranges.json"
        tensors = self.cache.to_tensors_data()
        save_tensors_data(tensors, ranges)
        method = tensors.calibration_method
        if s.rules == "qnn":
            from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

            overrides = {t: [{"quant_type": quant_type("uint16")}] for t in plan.tensors_16bit}
            weights = s.weights
            if s.weights == "int4":  # the HTP runs int4 only symmetric; LayerNorm etc. stay u8
                weights = "uint8"
                overrides.update(_int4_matmul_weights(proto))
            cfg = get_qnn_qdq_config(proto, None, calibrate_method=method,
                                     activation_type=quant_type(s.activations),
                                     weight_type=quant_type(weights),
                                     per_channel=s.per_channel and s.weights != "int4",
                                     init_overrides=overrides or None,
                                     activation_symmetric=s.activation_symmetric,
                                     weight_symmetric=s.weight_symmetric)
            # Constant data inputs (a Where's fill) must be quantized too: the HTP has no float.
            kwargs = dict(op_types_to_quantize=cfg.op_types_to_quantize,
                          per_channel=cfg.per_channel,
                          extra_options={**cfg.extra_options, "ForceQuantizeNoInputCheck": True},
                          nodes_to_exclude=cfg.nodes_to_exclude)
            weight_type = quant_type(weights)
        else:
            weight_type = quant_type(s.weights)
            kwargs = dict(op_types_to_quantize=list(s.op_types), per_channel=s.per_channel,
                          nodes_to_exclude=plan.nodes_to_exclude,
                          extra_options={"ActivationSymmetric": s.activation_symmetric,
                                         "WeightSymmetric": s.weight_symmetric,
                                         "QuantizeBias": s.quantize_bias,
                                         "MinimumRealRange": 1e-4})
        try:
            quantize_static(proto, str(out), None, quant_format=QuantFormat.QDQ,
                            activation_type=quant_type(s.activations),
                            weight_type=weight_type, calibrate_method=method,
                            use_external_data_format=True, calibration_cache_path=str(ranges),
                            **kwargs)
        except KeyError as e:
            raise UserError(f"the calibration cache has no range for tensor {e}; it was made "
                            "for another graph: re-run `edgec calibrate`") from None


def _int4_matmul_weights(proto) -> dict[str, list[dict[str, Any]]]:
    """QNN w4a16: symmetric int4 per output channel (axis 1 of [K, N]) on MatMul weights."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            if len(inits[node.input[1]].dims) == 2:
                out[node.input[1]] = [{"quant_type": quant_type("int4"), "symmetric": True,
                                       "axis": 1}]
    return out
