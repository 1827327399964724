"""openvino-legalize: grouped-query K/V spelled out as repeat_kv, boolean masks made additive."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from edgec.runtimes.ort import run_model
from edgec.targets.openvino_legalize import OpenVINOLegalizePass

HQ, HKV, D = 4, 2, 8


def _gqa_model() -> ir.Model:
    """Q [B,4,S,8], K/V [B,2,T,8], a bool mask, then the tail transformers exports: the output
    reshaped with -1 before a projection. (OpenVINO happens to convert this small graph as it
    is; the Hugging Face decoders of tests/runtimes/test_generation.py do not.)"""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], scale=0.25),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["q"], ["b_"], start=0, end=1),
        helper.make_node("Shape", ["q"], ["s_"], start=2, end=3),
        helper.make_node("Concat", ["b_", "s_", "minus1"], ["tail"], axis=0),
        helper.make_node("Reshape", ["yt", "tail"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["out"]),
    ]
    w = np.random.default_rng(0).standard_normal((HQ * D, 16)).astype(np.float32)
    graph = helper.make_graph(
        nodes, "gqa",
        [helper.make_tensor_value_info("q", f, ["b", HQ, "s", D]),
         helper.make_tensor_value_info("k", f, ["b", HKV, "t", D]),
         helper.make_tensor_value_info("v", f, ["b", HKV, "t", D]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["b", 1, "s", "t"])],
        [helper.make_tensor_value_info("out", f, ["b", "s", 16])],
        [helper.make_tensor("minus1", i64, [1], [-1]),
         helper.make_tensor("w", f, list(w.shape), w.ravel().tolist())])
    model = ir.from_proto(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10))
    for node in model.graph:  # the attention output's shape, as torch.export annotates it
        if node.op_type == "Attention":
            node.outputs[0].shape = ir.Shape(["b", HQ, "s", D])
            node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return model


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, s, t = 2, 3, 5
    mask = np.tril(np.ones((s, t), bool), k=t - s)[None, None].repeat(b, 0)
    mask[1, :, :, 0] = False  # a left-padded row
    return {"q": rng.standard_normal((b, HQ, s, D)).astype(np.float32),
            "k": rng.standard_normal((b, HKV, t, D)).astype(np.float32),
            "v": rng.standard_normal((b, HKV, t, D)).astype(np.float32), "mask": mask}


def test_kv_heads_are_repeated_and_the_mask_made_additive_exactly():
    model = _gqa_model()
    before = run_model(model, _feeds())["out"]
    result = OpenVINOLegalizePass()(model)
    assert result.stats["gqa_kv_repeated"] == 1
    assert result.stats["bool_masks_made_additive"] == 1
    attn = next(n for n in model.graph if n.op_type == "Attention")
    assert attn.inputs[3].dtype == ir.DataType.FLOAT
    for kv in attn.inputs[1:3]:
        chain = [kv.producer()]
        while chain[-1].inputs[0].producer() is not None:
            chain.append(chain[-1].inputs[0].producer())
        assert [n.op_type for n in chain] == ["Reshape", "Expand", "Unsqueeze"]
        assert list(kv.shape)[1] == HQ
    after = run_model(model, _feeds())["out"]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_openvino_converts_the_legalized_graph_and_agrees(tmp_path):
    ov = pytest.importorskip("openvino")
    from edgec.onnx_io import save_model

    model = _gqa_model()
    expected = run_model(model, _feeds())["out"]
    OpenVINOLegalizePass()(model)
    path = tmp_path / "model.onnx"
    save_model(model, path)
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(_feeds())[compiled.outputs[0]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_equal_head_counts_are_left_alone():
    model = _gqa_model()
    for name in ("k", "v"):  # make K/V full-headed: no grouping, nothing to pin
        value = next(v for v in model.graph.inputs if v.name == name)
        value.shape = ir.Shape(["b", HQ, "t", D])
    result = OpenVINOLegalizePass()(model)
    assert result.stats["gqa_kv_repeated"] == 0
