"""keep_float: a quantized op reads its fp32 inputs again; what only it read is dropped."""

import numpy as np
import onnx_ir as ir
import pytest

from edgec.graph_passes.quantization.keep_float import keep_float
from edgec.runtimes.ort import run_model


def _graphs():
    """fp32: y = (x @ w1) @ w2; quantized: both MatMuls read Q/DQ'd x / h and DQ'd weights."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))

    def fp32():
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
        c1, c2 = (ir.Value(name=n, const_value=ir.tensor(w, name=n))
                  for n, w in (("w1", w1), ("w2", w2)))
        m1 = ir.node("MatMul", [x, c1], name="mm1")
        m1.outputs[0].name = "h"
        m2 = ir.node("MatMul", [m1.outputs[0], c2], name="mm2")
        m2.outputs[0].name = "y"
        return ir.Model(ir.Graph([x], m2.outputs, nodes=[m1, m2], initializers=[c1, c2],
                                 opset_imports={"": 19}, name="g"), ir_version=9)

    def quantized():
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
        inits, nodes = [], []

        def const(name, array):
            v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            inits.append(v)
            return v

        def qdq(v, tag, scale):
            s, z = const(f"{tag}_s", np.float32(scale)), const(f"{tag}_z", np.uint8(128))
            q = ir.node("QuantizeLinear", [v, s, z], name=f"{tag}_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{tag}_dq")
            nodes.extend([q, dq])
            return dq.outputs[0]

        def weight(tag, w):
            s = np.abs(w).max() / 127
            wq = const(f"{tag}_quantized", np.round(w / s).astype(np.int8))
            dq = ir.node("DequantizeLinear", [wq, const(f"{tag}_ws", np.float32(s))],
                         name=f"{tag}_wdq")
            nodes.append(dq)
            return dq.outputs[0]

        m1 = ir.node("MatMul", [qdq(x, "x", 0.05), weight("w1", w1)], name="mm1")
        m1.outputs[0].name = "h"
        nodes.append(m1)
        m2 = ir.node("MatMul", [qdq(m1.outputs[0], "h", 0.1), weight("w2", w2)], name="mm2")
        m2.outputs[0].name = "y"
        nodes.append(m2)
        return ir.Model(ir.Graph([x], m2.outputs, nodes=nodes, initializers=inits,
                                 opset_imports={"": 19}, name="q"), ir_version=9)

    return fp32(), quantized()


def test_keep_float_reads_the_fp32_inputs_and_drops_their_quantizers():
    fp32, quantized = _graphs()
    x = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    probe = keep_float(quantized, fp32, ["mm2"])
    ops = [n.name for n in probe.graph]
    assert "h_q" not in ops and "h_dq" not in ops and "w2_wdq" not in ops  # mm2's only
    assert "x_q" in ops and "w1_wdq" in ops  # mm1 still quantized
    assert "w2_quantized" not in probe.graph.initializers and "w2" in probe.graph.initializers
    assert "h_q" in [n.name for n in quantized.graph]  # the input graph is left as it was
    # all kept: exactly the fp32 model; one kept: between the two
    exact = run_model(fp32, x)["y"]
    both = run_model(keep_float(quantized, fp32, ["mm1", "mm2"]), x)["y"]
    np.testing.assert_allclose(both, exact, rtol=1e-5, atol=1e-5)
    # mm2 kept: mm1 as quantized (x at a 0.05 step around 128, w1 per tensor), mm2 in float
    xq = (np.clip(np.round(x["x"] / 0.05) + 128, 0, 255) - 128) * 0.05
    w1 = fp32.graph.initializers["w1"].const_value.numpy()
    w1q = np.round(w1 / (np.abs(w1).max() / 127)) * (np.abs(w1).max() / 127)
    w2 = fp32.graph.initializers["w2"].const_value.numpy()
    np.testing.assert_allclose(run_model(probe, x)["y"], (xq @ w1q) @ w2, rtol=1e-4, atol=1e-4)
    assert not np.allclose(run_model(quantized, x)["y"], (xq @ w1q) @ w2, atol=1e-3)
    assert keep_float(quantized, fp32, []) is quantized
    with pytest.raises(LookupError, match="not in both graphs"):
        keep_float(quantized, fp32, ["mm3"])
