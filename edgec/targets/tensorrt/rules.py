"""TensorRT's explicit-quantization (Q/DQ) rules as data, and a checker naming each failing node.

Sources: NVIDIA TensorRT Developer Guide, "Working with Quantized Types" (symmetric INT8/FP8/INT4,
INT4 weight-only with per-block scales of 64 or 128); the TensorRT operator reference for
Quantize/Dequantize (build-time constant scales; zero points all zero; block scales only for INT4);
the ONNX parser's Q/DQ importer (onnx/onnx-tensorrt ``QuantDequantLinearHelper``: positive scales,
uint8 not a quantized type, per-axis scales only for weights on the output-channel axis) and its
``docs/operators.md`` (binding types; uint8 only as network input/output).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.targets.base import QuantScheme

__all__ = ["RULES", "Rule", "Violation", "check_tensorrt_graph", "const_array", "is_constant",
           "qdq_nodes", "weight_axes"]

_GUIDE = "TensorRT Developer Guide: Working with Quantized Types"
_OPREF = "TensorRT operator reference: Quantize / Dequantize"
_PARSER = "onnx-tensorrt onnxOpImporters.cpp QuantDequantLinearHelper"


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    source: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("qdq-type", "Q/DQ quantize to int8, float8e4m3fn or int4 only (no uint8, int16, uint4, "
         "float8e5m2)", f"{_PARSER}; {_GUIDE}"),
    Rule("zero-point", "zero points are absent or constant all-zero (symmetric quantization)",
         f"{_OPREF}; {_PARSER}"),
    Rule("scale-constant", "scales are build-time constants (initializers or Constant nodes)",
         _OPREF),
    Rule("scale-value", "scales are positive, finite, float32/float16/bfloat16",
         f"{_PARSER}; {_OPREF}"),
    Rule("activation-per-tensor", "activations are quantized per tensor (one scale)", _PARSER),
    Rule("weight-channel-axis", "per-channel weight scales lie on the output-channel axis (MatMul "
         "[K, N]: 1; Gemm transB=1: 0, transB=0: 1; Conv: 0; ConvTranspose: 1)", _PARSER),
    Rule("int4-weight-only", "int4 only dequantizes constant weights (no int4 quantization of "
         "activations)", _GUIDE),
    Rule("int4-block", "int4 weights use per-block scales: block_size 64 or 128, one blocked axis, "
         "the input-channel axis of the MatMul/Gemm consuming them", _GUIDE),
    Rule("block-int4-only", "block-wise scales are only for int4 weights", _OPREF),
    Rule("opset", "float8 Q/DQ needs opset >= 19; int4 and block_size need opset >= 21",
         "ONNX QuantizeLinear/DequantizeLinear specification"),
    Rule("io-dtype", "graph inputs/outputs have TensorRT binding types",
         "onnx-tensorrt docs/operators.md"),
    Rule("scheme", "Q/DQ types and granularity are those of the requested quantization scheme",
         "edgec QuantScheme"),
)}


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken rule at one node (``node`` is the node's name, or its output's when unnamed)."""

    node: str
    op: str
    rule: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_QTYPES = {ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4}
_SCALE_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
_IO_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE,
             ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT32, ir.DataType.INT64,
             ir.DataType.BOOL, ir.DataType.FLOAT8E4M3FN}
_INT4_BLOCKS = (64, 128)


def is_constant(value: ir.Value | None) -> bool:
    # An initializer that is also a graph input can be overridden at run time: not a constant.
    return (value is not None and not value.is_graph_input()
            and ir.convenience.get_const_tensor(value) is not None)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    return ir.convenience.get_const_tensor(value).numpy() if is_constant(value) else None


def qdq_nodes(graph: ir.Graph):
    return [n for n in graph.all_nodes() if n.domain in ("", "ai.onnx")
            and n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def weight_axes(consumer: ir.Node, index: int, rank: int) -> tuple[int, int | None] | None:
    """(output-channel, input-channel) axes of a weight at input ``index`` of ``consumer``.

    None when that input is not a weight TensorRT knows; the input-channel axis (where int4
    blocks must run) only for MatMul/Gemm, the ops TensorRT's int4 weight-only path serves.
    """
    if index != 1:
        return None
    if consumer.op_type == "MatMul" and rank >= 2:
        return rank - 1, rank - 2
    if consumer.op_type == "Gemm":
        return (0, 1) if _attr(consumer, "transB", 0) else (1, 0)
    return {"Conv": (0, None), "ConvTranspose": (1, None)}.get(consumer.op_type)


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _label(node: ir.Node) -> str:
    return node.name or f"<unnamed, output {node.outputs[0].name!r}>"


def _violation(node: ir.Node, rule: str, message: str) -> Violation:
    return Violation(_label(node), node.op_type, rule, message)


def _qtype(node: ir.Node) -> ir.DataType | None:
    x, zp = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None and (zp.dtype or is_constant(zp)):
        return zp.dtype or ir.convenience.get_const_tensor(zp).dtype
    if node.op_type == "DequantizeLinear":
        return x.dtype if x is not None else None
    out = _attr(node, "output_dtype", 0)
    return ir.DataType(out) if out else ir.DataType.UINT8  # ONNX's default quantized type


def _is_weight(node: ir.Node) -> bool:
    x = node.inputs[0]
    if is_constant(x):
        return True
    src = x.producer() if x is not None else None
    return (node.op_type == "DequantizeLinear" and src is not None
            and src.op_type == "QuantizeLinear" and is_constant(src.inputs[0]))


def check_tensorrt_graph(model: ir.Model, scheme: QuantScheme | None = None) -> list[Violation]:
    """Every TensorRT rule the graph breaks, one :class:`Violation` per node and rule."""
    found: list[Violation] = []
    for value, kind in [(v, "graph input") for v in model.graph.inputs] + [
            (v, "graph output") for v in model.graph.outputs]:
        if value.dtype is not None and value.dtype not in _IO_TYPES:
            found.append(Violation(value.name, kind, "io-dtype", f"{kind} {value.name!r} has type "
                                   f"{value.dtype.name}, which TensorRT cannot bind; cast it"))
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    for node in qdq_nodes(model.graph):
        found += _check_qdq(node, opset, scheme)
    return found


def _check_qdq(node: ir.Node, opset: int, scheme: QuantScheme | None) -> list[Violation]:
    qtype, weight, s = _qtype(node), _is_weight(node), const_array(node.inputs[1])
    out = _check_type(node, qtype, weight, opset) + _check_scheme(node, qtype, weight, s, scheme)
    if s is None:
        return out + [_violation(node, "scale-constant", "scale is computed at run time; "
                                 "TensorRT needs a constant scale (initializer or Constant node)")]
    return out + _check_scale(node, qtype, weight, s)


def _check_type(node: ir.Node, qtype, weight: bool, opset: int) -> list[Violation]:
    add = functools.partial(_violation, node)
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    block, out = _attr(node, "block_size", 0), []
    if qtype is not None and qtype not in _QTYPES:
        out.append(add("qdq-type", f"quantizes to {qtype.name}; TensorRT quantizes to int8, "
                       "float8e4m3fn or int4 only (a uint8 pair with zero point 128 is made int8 "
                       "exactly by the tensorrt-legalize pass)"))
    float8 = qtype is not None and qtype.name.startswith("FLOAT8")
    if (float8 and opset < 19) or ((qtype == ir.DataType.INT4 or block) and opset < 21):
        out.append(add("opset", f"opset {opset} is too low for {getattr(qtype, 'name', '?')}"
                       f"{' with block_size' if block else ''}; re-export with opset 21"))
    zp_arr = const_array(zp)
    if zp is not None and zp_arr is None:
        out.append(add("zero-point", "zero point is not a constant; TensorRT needs constant 0"))
    elif zp_arr is not None and np.any(zp_arr.astype(np.float32) != 0):
        out.append(add("zero-point", f"zero point is not 0 (values {_few(zp_arr)}); TensorRT "
                       "quantizes symmetrically: re-quantize with symmetric ranges"))
    if qtype == ir.DataType.INT4 and not weight:
        out.append(add("int4-weight-only", f"{node.op_type} of a run-time (activation) tensor to "
                       "int4; TensorRT takes int4 only as weight-only DequantizeLinear of "
                       "constants"))
    return out


def _check_scale(node: ir.Node, qtype, weight: bool, s: np.ndarray) -> list[Violation]:
    add = functools.partial(_violation, node)
    out, scale, rank = [], node.inputs[1], _rank(node.inputs[0])
    if not np.all(np.isfinite(s.astype(np.float64)) & (s.astype(np.float64) > 0)):
        out.append(add("scale-value", f"scale has non-positive or non-finite values ({_few(s)})"))
    if scale.dtype is not None and scale.dtype not in _SCALE_TYPES:
        out.append(add("scale-value", f"scale has type {scale.dtype.name}; use float32, float16 "
                       "or bfloat16"))
    if s.size > 1 and s.ndim > 1:
        return out + _check_block(node, qtype, weight, s, rank, _attr(node, "block_size", 0))
    if qtype == ir.DataType.INT4 and weight:
        out.append(add("int4-block", "int4 with per-tensor or per-channel scales; TensorRT needs "
                       f"per-block scales (block_size in {_INT4_BLOCKS})"))
    if s.size > 1 and not weight:
        out.append(add("activation-per-tensor", f"activation quantized per channel ({s.size} "
                       "scales); TensorRT quantizes activations per tensor: use one scale"))
    elif s.size > 1 and rank is not None and node.op_type == "DequantizeLinear":
        axis = _attr(node, "axis", 1) % rank
        for use in node.outputs[0].uses():
            want = (weight_axes(use.node, use.idx, rank) or (None,))[0]
            if want is not None and want != axis:
                out.append(add("weight-channel-axis", f"per-channel scales on axis {axis}, but the "
                               f"output-channel axis of {use.node.op_type} {_label(use.node)!r} "
                               f"is {want}"))
    return out


def _check_block(node, qtype, weight, s, rank, block) -> list[Violation]:
    add = functools.partial(_violation, node)
    if qtype != ir.DataType.INT4 or not weight:
        kind = f"{qtype.name if qtype else 'quantized'} {'weight' if weight else 'activation'}"
        return [add("block-int4-only", f"block-wise scales {list(s.shape)} on a {kind}; "
                    "TensorRT takes block scales only for int4 weights")]
    if block not in _INT4_BLOCKS:
        return [add("int4-block", f"block_size {block}; TensorRT supports {_INT4_BLOCKS}")]
    if rank is None:
        return []
    axis = _attr(node, "axis", 1) % rank
    found = []
    for use in node.outputs[0].uses():
        want = (weight_axes(use.node, use.idx, rank) or (None, None))[1]
        if want is not None and want != axis:
            found.append(add("int4-block", f"blocks run along axis {axis}, but the input-channel "
                             f"axis of {use.node.op_type} {_label(use.node)!r} is {want}"))
    return found


def _check_scheme(node, qtype, weight, s, scheme: QuantScheme | None) -> list[Violation]:
    if scheme is None or qtype is None:
        return []
    block = _attr(node, "block_size", 0)
    add = functools.partial(_violation, node, "scheme")
    want = scheme.weights if weight else scheme.activations
    if want is None:
        return [add(f"quantizes an activation, but scheme {scheme.name!r} is weight-only")]
    if qtype.name.lower() != want.lower():
        return [add(f"{'weight' if weight else 'activation'} type {qtype.name}; scheme "
                    f"{scheme.name!r} uses {want}")]
    if weight and scheme.block_size and s is not None and block != scheme.block_size:
        return [add(f"block_size {block or 'absent'}; scheme {scheme.name!r} uses "
                    f"{scheme.block_size}")]
    return []


def _rank(value: ir.Value | None) -> int | None:
    arr = const_array(value)
    if arr is not None:
        return arr.ndim
    return len(value.shape) if value is not None and value.shape is not None else None


def _few(arr: np.ndarray) -> str:
    flat = np.asarray(arr, dtype=np.float64).ravel()
    return ", ".join(f"{v:g}" for v in flat[:4]) + (", ..." if flat.size > 4 else "")
