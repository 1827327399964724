"""qnn-fuse-rmsnorm on tiny graphs (the exporter's decomposed RMSNorm forms), and the 16-bit rule
``select`` applies to the fused op. The HTP side (a real decoder destroyed without the fusion,
held with it) is tests/test_real_decoder.py::test_npu_runs_the_real_decoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as H
from onnx import numpy_helper as nh

from edgec.graph_passes.quantization.select import norm_outputs
from edgec.targets.qnn_htp.fuse_rmsnorm import RMS_OPSET, FuseRmsNormPass

D, S = 16, 6
RNG = np.random.default_rng(0)


def _rms_model(inverse: bool = True, gamma: bool = True, head: bool = True,
               residual: bool = True) -> onnx.ModelProto:
    """x = a + b (a residual sum; else x = a · b) → RMSNorm (Pow/ReduceMean/Add/Sqrt, then
    Reciprocal·x or x/·, ± Mul γ) → [MatMul]."""
    inits = [nh.from_array(np.array([-1], np.int64), "axes"),
             nh.from_array(np.array(2.0, np.float32), "two"),
             nh.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [H.make_node("Add" if residual else "Mul", ["a", "b"], ["x"]),
             H.make_node("Pow", ["x", "two"], ["sq"]),
             H.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             H.make_node("Add", ["ms", "eps"], ["mse"]),
             H.make_node("Sqrt", ["mse"], ["rms"])]
    if inverse:
        nodes += [H.make_node("Reciprocal", ["rms"], ["inv"]),
                  H.make_node("Mul", ["x", "inv"], ["normed"])]
    else:
        nodes.append(H.make_node("Div", ["x", "rms"], ["normed"]))
    last = "normed"
    if gamma:
        inits.append(nh.from_array(RNG.uniform(0.5, 2, D).astype(np.float32), "gamma"))
        nodes.append(H.make_node("Mul", ["normed", "gamma"], ["scaled"]))
        last = "scaled"
    if head:
        inits.append(nh.from_array(RNG.normal(0, 0.3, (D, 8)).astype(np.float32), "w"))
        nodes.append(H.make_node("MatMul", [last, "w"], ["y"]))
        last = "y"
    inputs = [H.make_tensor_value_info(n, T.FLOAT, [1, S, D]) for n in "ab"]
    graph = H.make_graph(nodes, "rms", inputs,
                         [H.make_tensor_value_info(last, T.FLOAT, [1, S, None if head else D])],
                         inits, value_info=[H.make_tensor_value_info("x", T.FLOAT, [1, S, D])])
    return H.make_model(graph, opset_imports=[H.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feeds = {"a": x, "b": np.full_like(x, 0.5)}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("inverse,gamma,head", [(True, True, True), (False, True, True),
                                                (True, False, True), (True, True, False)])
def test_decomposed_rmsnorm_becomes_one_op_with_the_same_outputs(inverse, gamma, head):
    model = _rms_model(inverse, gamma, head)
    x = RNG.normal(0, 3, (1, S, D)).astype(np.float32)
    x[0, 0, 3] = 2.5e4  # a massive first-token activation: the fused op must not care
    before = _run(model, x)
    result = FuseRmsNormPass()(ir.from_proto(model))
    assert result.modified and result.stats["rmsnorms_fused"] == 1
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert "RMSNormalization" in ops and not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(ops)
    assert result.model.opset_imports[""] == RMS_OPSET
    norm = next(n for n in proto.graph.node if n.op_type == "RMSNormalization")
    assert (next(a.f for a in norm.attribute if a.name == "epsilon") == pytest.approx(1e-5))
    after = _run(proto, x)
    assert list(after) == list(before)  # the graph output keeps its name
    for name, ref in before.items():
        np.testing.assert_allclose(after[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_norm_off_the_residual_stream_is_left_alone():
    """A norm on a product (a QK norm on a projection) keeps its decomposed form."""
    result = FuseRmsNormPass()(ir.from_proto(_rms_model(residual=False)))
    assert not result.modified and result.model.opset_imports[""] == 21
    assert "Pow" in [n.op_type for n in result.model.graph]


def test_fused_norm_output_takes_its_inputs_width():
    """The HTP runs RMSNormalization at 16 in / 16 out or 8 / 8, never 16 / 8."""
    model = FuseRmsNormPass()(ir.from_proto(_rms_model())).model
    norm = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert norm_outputs(model, {"x"}) == {norm.outputs[0].name}  # x: the residual sum
    assert norm_outputs(model, set()) == set()
