"""Int8 weights as uint8, exactly, on a host whose u8 × s8 int8 kernels saturate.

Without VNNI, x86 int8 dot products (ONNX Runtime's MLAS, OpenVINO's oneDNN) multiply u8
activations by s8 weights with ``vpmaddubsw``, whose int16 pair sums overflow on 8-bit weights
(``host_int8``). A weight ``DequantizeLinear(W:int8, s, z)`` is the same tensor as
``DequantizeLinear(W + 128 : uint8, s, z + 128)``, and both runtimes run that form without the
overflow: ONNX Runtime picks its U8U8 kernels (still fused into QLinearMatMul /
MatMulIntegerToFloat / QLinearConv), OpenVINO decompresses u8 weights into a float GEMM. So a
quantized graph keeps all 8 bits of its weights and computes what it says, a user's QDQ model
included. Measured on an AVX2-only AMD EPYC, one 768×3072 MatMul at 128 rows, u8 activations,
relative error vs the unfused graph: s8 weights 0.22-0.48, u8 weights ≤ 0.008 (one rounding
step of the output quantizer). The cost, on whole models (``benchmarks/host_int8.py``): ORT's
U8U8 kernels run at 0.86-0.97× the speed of the U8S8 ones; OpenVINO's u8 path at 1.00-1.05×.

Weights already on a 7-bit grid ([−64, 64]: ``--quantize ...:reduce_range=true``, ONNX
Runtime's ``reduce_range``, or a user's QDQ model made so) stay int8: their pair sums fit
int16 (2·255·64 = 32640), and ONNX Runtime's U8S8 kernels run them exactly and faster.

Guarantees: outputs bitwise unchanged (an integer shift of a constant and its zero point);
stats count the weights shifted. The targets run it only where the host saturates (``wanted``;
``EDGEC_INT8_SATURATES=1|0`` decides for an artifact meant for a host of the other kind: on a
VNNI host the u8 × s8 kernels accumulate exactly in int32 and are the ones tuned for it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult, fresh_name, register_constant

__all__ = ["UnsignedWeightsPass", "weight_forms"]


class UnsignedWeightsPass(EdgecPass):
    """Constant int8 ``DequantizeLinear`` inputs shifted to uint8 where the host saturates."""

    name = "unsigned-weights"
    exact = True
    rtol = 1e-6

    @classmethod
    def wanted(cls) -> bool:
        from edgec.graph_passes.quantization.host_int8 import int8_saturates

        return int8_saturates()

    def call(self, model: ir.Model) -> PassResult:
        graph, shifted, midpoint = model.graph, {}, None
        count = seven = 0
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or not _int8_constant(node.inputs[0]):
                continue
            if _within_seven_bits(node.inputs[0]):  # no int16 pair sum overflows
                seven += 1
                continue
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            if zp is not None and not _int8_constant(zp):
                continue  # an int8 weight with a computed zero point: left as it is
            if any(u.op_type != "DequantizeLinear" or i != 0 for u, i in node.inputs[0].uses()):
                # read as integers elsewhere too (a tied head's table, whose lookup gathers its
                # int8 rows): a shifted copy would store the table twice
                continue
            weight = _shifted(graph, node.inputs[0], shifted)
            scale = node.inputs[1].const_value
            if zp is None and scale is not None and scale.size > 1:  # per axis: 1-D, its size
                zero = register_constant(graph, fresh_name(graph, "uint8_midpoints"),
                                         np.full(scale.size, 128, np.uint8))
            elif zp is None:  # int8's implicit zero point 0, as uint8: one midpoint for all
                midpoint = midpoint or register_constant(
                    graph, fresh_name(graph, "uint8_midpoint"), np.array(128, np.uint8))
                zero = midpoint
            else:
                zero = _shifted(graph, zp, shifted)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(0, weight)
            node.replace_input_with(2, zero)
            count += 1
        for old in shifted:  # the int8 originals nothing reads any more
            if not old.uses() and not old.is_graph_output() and old.is_initializer():
                graph.initializers.pop(old.name)
        return PassResult(model, bool(count), {"weights_shifted": count,
                                               "weights_7bit_kept": seven})


def weight_forms(model: ir.Model) -> dict[str, int]:
    """How many constant weights the graph's DequantizeLinear nodes read in each 8-bit form:
    ``int8`` (all 8 bits: a host without VNNI saturates them), ``int8_7bit`` (within ±64),
    ``uint8`` (shifted, or written so); empty where there are none. The manifest records it,
    and loading warns where this host saturates ``int8`` ones (``runtimes.load``). A graph that
    quantizes no activation (weight-only: its int8 weights are decompressed into float GEMMs,
    a tied head's table among them) has no 8-bit products to saturate: empty."""
    forms = {"int8": 0, "int8_7bit": 0, "uint8": 0}
    if not any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in model.graph):
        return {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        value = node.inputs[0]
        if _int8_constant(value):
            forms["int8_7bit" if _within_seven_bits(value) else "int8"] += 1
        elif (value.const_value is not None and value.producer() is None
              and value.const_value.dtype == ir.DataType.UINT8):
            forms["uint8"] += 1
    return {k: n for k, n in forms.items() if n}


def _int8_constant(value: ir.Value | None) -> bool:
    return (value is not None and value.const_value is not None and value.producer() is None
            and value.const_value.dtype == ir.DataType.INT8)


def _within_seven_bits(value: ir.Value) -> bool:
    """Every element of the int8 constant in [−64, 64]."""
    array = value.const_value.numpy()
    return array.size == 0 or (int(array.min()) >= -64 and int(array.max()) <= 64)


def _shifted(graph: ir.Graph, value: ir.Value, done: dict[ir.Value, ir.Value]
             ) -> ir.Value:
    """``value`` + 128 as a new uint8 initializer (once per original)."""
    if value not in done:
        array = value.const_value.numpy().astype(np.int16) + 128
        done[value] = register_constant(graph, fresh_name(graph, f"{value.name}_u8"),
                                        array.astype(np.uint8))
    return done[value]

