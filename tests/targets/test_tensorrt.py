"""tensorrt target: Q/DQ legality rules, the legalize pass, the build without TensorRT, session."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.errors import TargetUnavailableError, UserError
from edgec.runtimes.ort import run_model
from edgec.targets.tensorrt import TENSORRT, TIMING_CACHE_ENV, optimization_profile
from edgec.targets.tensorrt.legalize import TensorRTLegalizePass
from edgec.targets.tensorrt.rules import RULES, check_tensorrt_graph

K, N = 128, 64
RNG = np.random.default_rng(0)
X = {"x": RNG.standard_normal((2, K)).astype(np.float32)}


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inits, inputs=None, opset=21, out_dim=N):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["batch", out_dim])], inits)
    # onnx 1.23 writes ir_version 14 by default, which onnxruntime refuses
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def _qdq_matmul(act_type=np.int8, act_zp=0, act_scale=0.05, w_axis=1, w_scale=None, op="MatMul"):
    """y = MatMul(DQ(Q(x)), DQ(W)) with int8 per-channel weights; each argument breaks one rule."""
    w = RNG.integers(-127, 128, (N, K) if op == "Gemm" else (K, N)).astype(np.int8)
    w_scale = np.full(w.shape[w_axis], 0.01, np.float32) if w_scale is None else w_scale
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], name="dq_w", axis=w_axis),
             helper.make_node(op, ["xd", "wd"], ["y"], name="mm",
                              **({"transB": 1} if op == "Gemm" else {}))]
    inits = [_init("sx", np.asarray(act_scale, np.float32)),
             _init("zx", np.asarray(act_zp, act_type)),
             _init("w", w), _init("sw", w_scale)]
    return _model(nodes, inits)


def _int4_matmul(block=128, axis=0, scale_sign=1.0, quantize_activation=False):
    w = RNG.integers(-8, 8, (K, N)).astype(ml_dtypes.int4)
    blocks = [K // block, N] if axis == 0 else [K, N // block]
    scale = scale_sign * RNG.uniform(0.01, 0.02, blocks).astype(np.float32)
    w_t = ir.serde.serialize_tensor(ir.tensor(w, name="w4"))
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s4"], ["wd"], name="dq_w4", axis=axis,
                              block_size=block),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    if quantize_activation:  # int4 Q/DQ on the activation: TensorRT has no int4 activations
        nodes[1:1] = [helper.make_node("QuantizeLinear", ["x", "sx", "zx4"], ["xq"], name="q_x"),
                      helper.make_node("DequantizeLinear", ["xq", "sx", "zx4"], ["xd"],
                                       name="dq_x")]
        nodes[-1].input[0] = "xd"
    inits = [w_t, _init("s4", scale), _init("sx", np.float32(0.5)),
             ir.serde.serialize_tensor(ir.tensor(np.zeros((), ml_dtypes.int4), name="zx4"))]
    return _model(nodes, inits)


def _fp8_matmul(opset=19):
    w = RNG.uniform(-2, 2, (K, N)).astype(ml_dtypes.float8_e4m3fn)
    zero = np.zeros((), ml_dtypes.float8_e4m3fn)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w8", "sw"], ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    inits = [ir.serde.serialize_tensor(ir.tensor(w, name="w8")),
             ir.serde.serialize_tensor(ir.tensor(zero, name="zx")),
             _init("sx", np.float32(0.01)), _init("sw", np.float32(0.02))]
    return _model(nodes, inits, opset=opset)


def _int16_output():
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT16)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT16, [2])])
    return ir.serde.deserialize_model(helper.make_model(graph, ir_version=10))


def _ort_quantized(tmp_path, activation_type, per_channel=True):
    """MatMul + Gemm(transB=1) + Conv quantized by onnxruntime.quantization (the real producer)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    w1, w2 = RNG.standard_normal((K, 32)), RNG.standard_normal((16, 32))
    wc = RNG.standard_normal((4, 1, 1, 3))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm"),
             helper.make_node("Gemm", ["h1", "w2"], ["h2"], name="gemm", transB=1),
             helper.make_node("Reshape", ["h2", "shape"], ["h3"], name="reshape"),
             helper.make_node("Conv", ["h3", "wc"], ["h4"], name="conv"),
             helper.make_node("Reshape", ["h4", "flat"], ["y"], name="flatten")]
    inits = [_init("w1", w1.astype(np.float32)), _init("w2", w2.astype(np.float32)),
             _init("wc", wc.astype(np.float32)), _init("shape", np.array([2, 1, 4, 4])),
             _init("flat", np.array([2, 32]))]
    x_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])]
    src = tmp_path / "fp32.onnx"
    ir.save(_model(nodes, inits, x_info, opset=13, out_dim=32), src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": RNG.standard_normal((2, K)).astype(np.float32)}
                              for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    out = tmp_path / "q.onnx"
    qtype = {np.int8: QuantType.QInt8, np.uint8: QuantType.QUInt8}[activation_type]
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=qtype, weight_type=qtype, per_channel=per_channel,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return ir.load(out)


def _rules(model, scheme=None):
    return {(v.node, v.rule) for v in check_tensorrt_graph(model, scheme)}


# --- legal graphs ---------------------------------------------------------------------------

def test_ort_symmetric_int8_per_channel_is_legal_for_matmul_gemm_and_conv(tmp_path):
    model = _ort_quantized(tmp_path, np.int8)
    weight_axes = {n.name: n.attributes["axis"].as_int() for n in model.graph
                   if n.op_type == "DequantizeLinear" and "axis" in n.attributes}
    assert weight_axes  # per-channel weights really are there (MatMul 1, Gemm transB 0, Conv 0)
    assert check_tensorrt_graph(model) == []
    assert check_tensorrt_graph(model, TENSORRT.schemes["w8a8"]) == []


@pytest.mark.parametrize("build, scheme", [(_fp8_matmul, "fp8"), (_int4_matmul, "w4a16"),
                                           (_qdq_matmul, "w8a8")])
def test_each_scheme_form_is_legal_and_matches_its_scheme(build, scheme):
    model = build()
    assert check_tensorrt_graph(model) == []
    assert check_tensorrt_graph(model, TENSORRT.schemes[scheme]) == []
    run_model(model, X)  # a well-formed ONNX graph, not only a legal-looking one
    result = TensorRTLegalizePass()(model)  # already legal: nothing to do, nothing left over
    assert not result.modified and result.stats["left_asymmetric"] == 0


def test_scheme_mismatch_is_reported():
    assert ("dq_w", "scheme") in _rules(_fp8_matmul(), TENSORRT.schemes["w8a8"])
    # a weight-only scheme must not find quantized activations
    assert ("q_x", "scheme") in _rules(_qdq_matmul(), TENSORRT.schemes["w4a16"])
    assert ("dq_w4", "scheme") in _rules(_int4_matmul(block=64), TENSORRT.schemes["w4a16"])


# --- illegal graphs: each is reported at its node -------------------------------------------

@pytest.mark.parametrize("model, node, rule", [
    (lambda: _qdq_matmul(act_zp=3), "q_x", "zero-point"),
    (lambda: _qdq_matmul(act_type=np.uint8, act_zp=128), "q_x", "qdq-type"),
    (lambda: _qdq_matmul(act_scale=-0.05), "dq_x", "scale-value"),
    (lambda: _qdq_matmul(act_scale=np.float32(np.inf)), "q_x", "scale-value"),
    (lambda: _qdq_matmul(w_axis=0, w_scale=np.full(K, 0.01, np.float32)), "dq_w",
     "weight-channel-axis"),
    (lambda: _qdq_matmul(op="Gemm", w_axis=1, w_scale=np.full(K, 0.01, np.float32)), "dq_w",
     "weight-channel-axis"),
    (lambda: _qdq_matmul(act_scale=np.full(K, 0.05, np.float32)), "q_x", "activation-per-tensor"),
    (lambda: _int4_matmul(quantize_activation=True), "q_x", "int4-weight-only"),
    (lambda: _int4_matmul(axis=1, block=64), "dq_w4", "int4-block"),
    (lambda: _int4_matmul(block=32), "dq_w4", "int4-block"),
    (lambda: _int4_matmul(scale_sign=-1.0), "dq_w4", "scale-value"),
    (lambda: _fp8_matmul(opset=17), "q_x", "opset"),
    (_int16_output, "y", "io-dtype"),
])
def test_illegal_form_is_reported_naming_its_node(model, node, rule):
    violations = check_tensorrt_graph(model())
    assert (node, rule) in {(v.node, v.rule) for v in violations}
    assert all(v.rule in RULES for v in violations)
    json.dumps([v.to_json() for v in violations])  # the manifest/CLI can carry them


def test_scale_from_a_constant_node_is_a_constant():
    model = _qdq_matmul()
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.float32(0.05))},
                    name="scale_const")
    model.graph.insert_before(model.graph.node("q_x"), const)
    for name in ("q_x", "dq_x"):
        model.graph.node(name).replace_input_with(1, const.outputs[0])
    assert check_tensorrt_graph(model) == []
    const.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.float32(0.0)))
    assert ("q_x", "scale-value") in _rules(model)


def test_non_constant_scale_and_unnamed_nodes():
    model = _qdq_matmul()
    scale_input = ir.Value(name="sx_runtime", shape=ir.Shape([]),
                           type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(scale_input)
    q = model.graph.node("q_x")
    q.replace_input_with(1, scale_input)
    q.name = None
    [v] = [v for v in check_tensorrt_graph(model) if v.rule == "scale-constant"]
    assert v.op == "QuantizeLinear" and "'xq'" in v.node  # unnamed: named by its output


@pytest.mark.parametrize("axis, legal", [(0, True), (1, False)])
def test_conv_weights_are_per_channel_on_axis_0(axis, legal):
    w = np.ones((8, 4, 1, 1), np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], name="dq_w", axis=axis),
             helper.make_node("Conv", ["x", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3, 3])],
        [_init("w", w), _init("sw", np.full(w.shape[axis], 0.1, np.float32))])
    model = ir.serde.deserialize_model(helper.make_model(graph, ir_version=10))
    assert (("dq_w", "weight-channel-axis") not in _rules(model)) == legal


# --- legalization ---------------------------------------------------------------------------

def test_legalize_turns_uint8_zp128_into_int8_exactly(tmp_path):
    model = _ort_quantized(tmp_path, np.uint8, per_channel=False)
    assert any(v.rule == "qdq-type" for v in check_tensorrt_graph(model))
    feeds = {"x": RNG.standard_normal((2, K)).astype(np.float32)}
    before = run_model(model, feeds)
    ops_before = [n.op_type for n in model.graph]
    result = TensorRTLegalizePass()(model)
    assert result.modified and result.stats["qdq_pairs_shifted"] > 0
    assert result.stats["weights_shifted"] > 0 and result.stats["left_asymmetric"] == 0
    assert [n.op_type for n in result.model.graph] == ops_before
    assert check_tensorrt_graph(result.model) == []
    after = run_model(result.model, feeds)
    np.testing.assert_array_equal(after["y"], before["y"])  # exact, not merely close


def test_legalize_shifts_weights_that_fit_and_leaves_what_cannot_be_exact():
    model = _qdq_matmul(act_type=np.uint8, act_zp=37)  # asymmetric activation: no exact int8 form
    w = model.graph.initializers["w"]
    w.const_value = ir.tensor(np.clip(w.const_value.numpy(), -120, 120).astype(np.int8))
    zw = ir.Value(name="zw", const_value=ir.tensor(np.full(N, 5, np.int8)),
                  shape=ir.Shape([N]), type=ir.TensorType(ir.DataType.INT8))
    model.graph.register_initializer(zw)
    dq_w = model.graph.node("dq_w")
    dq_w.resize_inputs(3)
    dq_w.replace_input_with(2, zw)
    before = run_model(model, X)
    result = TensorRTLegalizePass()(model)
    assert result.stats == {"weights_shifted": 1, "qdq_pairs_shifted": 0, "left_asymmetric": 1}
    np.testing.assert_array_equal(run_model(result.model, X)["y"], before["y"])
    assert {v.node for v in check_tensorrt_graph(result.model)} == {"q_x", "dq_x"}


def test_legalize_uint4_block_weights_with_midpoint_zero_point():
    model = _int4_matmul()
    w4 = model.graph.initializers["w4"]
    u4 = (w4.const_value.numpy().astype(np.int32) + 8).astype(ml_dtypes.uint4)
    w4.const_value, w4.type = ir.tensor(u4), ir.TensorType(ir.DataType.UINT4)
    zp = ir.Value(name="z4", const_value=ir.tensor(np.full((1, N), 8, ml_dtypes.uint4)),
                  shape=ir.Shape([1, N]), type=ir.TensorType(ir.DataType.UINT4))
    model.graph.register_initializer(zp)
    dq = model.graph.node("dq_w4")
    dq.resize_inputs(3)
    dq.replace_input_with(2, zp)
    assert any(v.rule == "qdq-type" for v in check_tensorrt_graph(model))
    before = run_model(model, X)
    result = TensorRTLegalizePass()(model)
    assert result.stats["weights_shifted"] == 1 and check_tensorrt_graph(result.model) == []
    np.testing.assert_array_equal(run_model(result.model, X)["y"], before["y"])


# --- build without TensorRT -----------------------------------------------------------------

def _artifact(tmp_path, model, batch=2):
    ir.save(model, tmp_path / "model.onnx")
    np.savez(tmp_path / "example_inputs.npz", x=np.zeros((batch, K), np.float32))
    return tmp_path / "model.onnx"


def test_target_is_data_and_selectable_without_tensorrt():
    assert TENSORRT.requires == () and not TENSORRT.static_shapes
    assert TENSORRT.schemes["w8a8"].activations == "int8"
    assert TENSORRT.schemes["w8a8"].activation_symmetric and TENSORRT.schemes["w8a8"].per_channel
    fp8 = TENSORRT.schemes["fp8"]
    assert fp8.weights == "float8e4m3fn" and fp8.min_opset == 19
    w4 = TENSORRT.schemes["w4a16"]
    assert (w4.weights, w4.activations, w4.block_size, w4.weight_only, w4.min_opset) == (
        "int4", None, 128, True, 21)


def test_build_without_tensorrt_checks_legality_and_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, even where installed
    built = TENSORRT.build(TENSORRT, _artifact(tmp_path, _qdq_matmul(), batch=3),
                           tmp_path / "target")
    rt = built.runtime
    assert rt["name"] == "tensorrt" and rt["model"] == "model.onnx" and rt["engine"] is None
    assert "TensorRT is not installed" in rt["unavailable"] and "edgec compile" in rt["unavailable"]
    assert built.notes[0] == rt["unavailable"] and "0 violations" in built.notes[1]
    assert rt["legality"] == {"rules": sorted(RULES), "qdq_nodes": 3, "violations": 0}
    assert rt["profile"] == {"x": {"min": [1, K], "opt": [3, K], "max": [3, K]}}
    assert rt["strongly_typed"] is True and built.files == []
    json.dumps(rt)
    assert not (tmp_path / "target").exists()
    # an all-ones example (the CLI's for an .onnx file) built an engine for batch 1 only, unsaid
    (tmp_path / "b1").mkdir()
    ones = TENSORRT.build(TENSORRT, _artifact(tmp_path / "b1", _qdq_matmul(), batch=1),
                          tmp_path / "target")
    assert "holds dynamic x[0] at 1" in ones.notes[1] and "at 1" not in built.notes[1]


def _decoder_like():
    """A graph with a decoder's named inputs (one KV-cache input), enough for the profiles."""
    vi = helper.make_tensor_value_info
    past = vi("past_key_values.0.key", TensorProto.FLOAT,
              ["batch_size", 2, "past_sequence_length", 16])
    return _model([helper.make_node("Identity", ["past_key_values.0.key"], ["y"])], [],
                  inputs=[vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                          past])


def test_build_later_gives_the_command_that_rebuilds_the_same_engine(tmp_path, monkeypatch,
                                                                        caplog):
    from edgec.lora.binding import SITES_KEY

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = tmp_path / "model.onnx"
    ir.save(_decoder_like(), path)
    # a decoder: `edgec compile model.onnx -t tensorrt` alone built one profile from the
    # example (no empty-cache prefill, decode up to 8 tokens), in silence
    built = TENSORRT.build(TENSORRT, path, tmp_path / "target", generation={"context": 64})
    assert ("`edgec compile model.onnx --target tensorrt --generate --context 64 -o DIR`"
            in built.runtime["unavailable"]) and len(built.runtime["profiles"]) == 2
    no_context = TENSORRT.build(TENSORRT, path, tmp_path / "target", generation={"context": None})
    assert "--generate --context 2048 -o DIR" in no_context.runtime["unavailable"]
    # what model.onnx alone does not give back: the whole compile again
    for options in ({"generation": {"context": 64}, "companions": True},
                    {"generation": {"context": 64, "graph": "prefill"}}):
        note = TENSORRT.build(TENSORRT, path, tmp_path / "target", **options).notes[0]
        assert "rerunning this compile" in note and "edgec compile model.onnx" not in note
    model = _decoder_like()
    model.metadata_props[SITES_KEY] = json.dumps([])  # no site: still the plain command
    ir.save(model, path)
    assert "--generate" in TENSORRT.build(TENSORRT, path, tmp_path / "target",
                                          generation={"context": 64}).notes[0]
    # the decoder compiled as a plain graph: one line says the profile is the example's
    np.savez(tmp_path / "example_inputs.npz", input_ids=np.zeros((1, 8), np.int64),
             **{"past_key_values.0.key": np.zeros((1, 2, 8, 16), np.float32)})
    with caplog.at_level("WARNING"):
        plain = TENSORRT.build(TENSORRT, path, tmp_path / "target")
    assert "--generate" not in plain.notes[0]
    warned = [r.getMessage() for r in caplog.records if "KV-cache input" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "--generate --context N" in warned[0]


def test_build_later_of_swappable_adapters_is_the_whole_compile(tmp_path, monkeypatch):
    from edgec.lora.binding import SITES_KEY

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    vi = helper.make_tensor_value_info
    model = _model([helper.make_node("MatMul", ["x", "a"], ["xa"]),
                    helper.make_node("MatMul", ["xa", "b"], ["y"])], [],
                   inputs=[vi("x", TensorProto.FLOAT, ["batch", K]),
                           vi("a", TensorProto.FLOAT, [K, "lora_r_0"]),
                           vi("b", TensorProto.FLOAT, ["lora_r_0", N])])
    model.metadata_props[SITES_KEY] = json.dumps(
        [{"module": "q", "a_input": "a", "b_input": "b", "rank": 4}])
    note = TENSORRT.build(TENSORRT, _artifact(tmp_path, model), tmp_path / "target").notes[0]
    assert "rerunning this compile" in note and "manifest.json's recipe" in note


def test_build_refuses_an_illegal_graph_naming_node_and_rule(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = _artifact(tmp_path, _qdq_matmul(act_zp=5))
    with pytest.raises(UserError, match=r"node 'q_x' \(QuantizeLinear\) breaks zero-point.*"
                                        r"compile its float model with a tensorrt scheme"):
        TENSORRT.build(TENSORRT, path, tmp_path / "target")


def test_profile_needs_examples_for_dynamic_dims():
    model = _qdq_matmul()
    # dims print as the user reads them, not as onnx_ir's SymbolicDim reprs
    with pytest.raises(UserError, match=r"dynamic shape \[batch, 128\] and no example input"):
        optimization_profile(model, {})
    assert optimization_profile(model, {"x": (5, K)})["x"] == {"min": [1, K], "opt": [5, K],
                                                               "max": [5, K]}


def test_profiles_keep_to_the_models_stored_dim_ranges():
    """The profile ran a dynamic dim from 1 where the graph stores `batch >= 2` (torch.export
    traced a branch: below it the graph is wrong and every run's feed check refuses it)."""
    from edgec.exporters.dim_ranges import DIM_RANGES_KEY
    from edgec.targets.tensorrt.engine import generation_profiles

    model = _qdq_matmul()
    model.metadata_props[DIM_RANGES_KEY] = json.dumps({"batch": {"min": 2, "max": 4}})
    assert optimization_profile(model, {"x": (3, K)})["x"] == {"min": [2, K], "opt": [3, K],
                                                               "max": [3, K]}
    assert optimization_profile(model, {"x": (6, K)})["x"]["max"] == [4, K]
    with pytest.raises(UserError, match=r"would size batch 1\.\.1, but the graph is good for "
                                        r"batch in \[2, 4\] only"):
        optimization_profile(model, {"x": (1, K)})
    vi = helper.make_tensor_value_info
    decoder = _model([helper.make_node("Identity", ["x"], ["y"])], [],
                     inputs=[vi("x", TensorProto.FLOAT, ["batch_size", "total_sequence_length"])])
    decoder.metadata_props[DIM_RANGES_KEY] = json.dumps(
        {"total_sequence_length": {"min": 2, "max": 48}})
    prefill, decode = generation_profiles(decoder, {"context": 64})
    assert prefill["x"] == {"min": [1, 2], "opt": [1, 48], "max": [1, 48]}
    assert decode["x"] == {"min": [1, 2], "opt": [1, 33], "max": [1, 48]}


def test_adapter_rank_dims_are_sized_from_the_lora_sites():
    from edgec.lora.binding import SITES_KEY
    from edgec.targets.tensorrt.engine import generation_profiles

    vi = helper.make_tensor_value_info
    model = _model([helper.make_node("MatMul", ["x", "a"], ["xa"]),
                    helper.make_node("MatMul", ["xa", "b"], ["y"])], [],
                   inputs=[vi("x", TensorProto.FLOAT, ["batch_size", K]),
                           vi("a", TensorProto.FLOAT, [K, "lora_r_0"]),
                           vi("b", TensorProto.FLOAT, ["lora_r_0", N])])
    site = {"module": "q", "a_input": "a", "b_input": "b", "rank": 4, "blend_rank": 6}
    model.metadata_props[SITES_KEY] = json.dumps([site])
    prefill, decode = generation_profiles(model, {"context": 64})  # a decoder: both profiles
    assert prefill["a"] == decode["a"] == {"min": [K, 1], "opt": [K, 4], "max": [K, 6]}
    assert decode["b"] == {"min": [1, N], "opt": [4, N], "max": [6, N]}
    del site["blend_rank"]  # an artifact from before blend_rank: up to the compiled rank
    model.metadata_props[SITES_KEY] = json.dumps([site])
    assert optimization_profile(model, {"x": (2, K)})["a"]["max"] == [K, 4]


# --- session without TensorRT ---------------------------------------------------------------

def test_session_without_engine_or_tensorrt_is_unavailable(tmp_path, monkeypatch):
    from edgec.runtimes import open_session
    from edgec.runtimes.tensorrt import TensorRTSession

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    built = TENSORRT.build(TENSORRT, _artifact(tmp_path, _qdq_matmul()), tmp_path / "target")
    with pytest.raises(TargetUnavailableError, match="has no engine to run.*TensorRT is not "
                                                     "installed.*edgec compile"):
        open_session(tmp_path, built.runtime)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "model.plan").write_bytes(b"plan")
    with pytest.raises(TargetUnavailableError,
                       match="needs tensorrt.*pip install 'edgec\\[tensorrt\\]'"):
        TensorRTSession(tmp_path, {**built.runtime, "engine": "target/model.plan"})


def test_profile_check_names_the_allowed_shapes():
    from edgec.runtimes.tensorrt import check_profile

    profile = {"x": {"min": [1, K], "opt": [4, K], "max": [4, K]}}
    check_profile({"x": np.zeros((3, K))}, profile)
    with pytest.raises(UserError, match=r"shape \[5, 128\].*from \[1, 128\] to \[4, 128\]"):
        check_profile({"x": np.zeros((5, K))}, profile)
    # below the minimum, a larger example is not the way out
    with pytest.raises(UserError, match=r"from \[1, 128\].*at least its minimum") as e:
        check_profile({"x": np.zeros((0, K))}, profile)
    assert "this large" not in str(e.value)
    # a decoder built without --generate: one profile from the example, past length ≥ 1
    past = {"past_key_values.0.key": {"min": [1, 2, 1, 16], "opt": [1, 2, 8, 16],
                                      "max": [2, 2, 8, 16]}}
    with pytest.raises(UserError, match=r"shape \[1, 2, 0, 16\].*--generate --context N"):
        check_profile({"past_key_values.0.key": np.zeros((1, 2, 0, 16))}, past)
    with pytest.raises(UserError, match=r"rank-2 input"):
        check_profile({"x": np.zeros((K,))}, profile)
    # an adapter's input is bound by the session: the way out is a recompile with the adapter
    lora = {"lora.q.A": {"min": [K, 1], "opt": [K, 8], "max": [K, 12]}}
    with pytest.raises(UserError, match=r"adapter input lora.q.A has shape \[128, 16\].*"
                                        r"among --lora"):
        check_profile({"lora.q.A": np.zeros((K, 16))}, lora)


# --- engine build call sequence, against a stand-in tensorrt module -------------------------

class _FakeTrt(types.ModuleType):
    """The slice of the TensorRT Python API the build uses; records what the build asked for."""

    def __init__(self, parse_ok=True):
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.__version__ = "10.99-fake"
        self.calls: dict = {"shapes": {}, "cleared": [], "cache_in": None}
        fake = self

        class Flag:
            STRONGLY_TYPED = 3

        class Parser:
            def __init__(self, network, log):
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                return parse_ok

            def get_error(self, i):
                return types.SimpleNamespace(desc=lambda: "unsupported op", node_name=lambda: "mm",
                                             node_operator=lambda: "MatMul")

        class Config:
            def clear_flag(self, flag):
                fake.calls["cleared"].append(flag)

            def create_timing_cache(self, data):
                fake.calls["cache_in"] = bytes(data)
                return bytes(data) + b"+timed"

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return types.SimpleNamespace(serialize=lambda: self.cache)

            def add_optimization_profile(self, profile):
                pass

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls["shapes"][name] = (list(lo), list(opt), list(hi))

        class Builder:
            def __init__(self, log):
                pass

            def create_network(self, flags):
                fake.calls["flags"] = flags
                return object()

            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                return b"PLAN"

        self.Logger = lambda level: object()
        self.Logger.WARNING = 2
        self.Builder, self.OnnxParser = Builder, Parser
        self.NetworkDefinitionCreationFlag = Flag
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")


def test_engine_build_is_strongly_typed_and_reuses_its_timing_cache(tmp_path, monkeypatch):
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    shared = tmp_path / "shared" / "timing.cache"
    monkeypatch.setenv(TIMING_CACHE_ENV, str(shared))
    path, target = _artifact(tmp_path, _qdq_matmul(), batch=4), tmp_path / "target"
    built = TENSORRT.build(TENSORRT, path, target)
    assert fake.calls["flags"] == 1 << 3 and fake.calls["cleared"] == ["TF32"]
    assert fake.calls["shapes"] == {"x": ([1, K], [4, K], [4, K])}
    assert (target / "model.plan").read_bytes() == b"PLAN"
    assert fake.calls["cache_in"] == b""  # first build: nothing to reuse
    assert (target / "timing.cache").read_bytes() == shared.read_bytes() == b"+timed"
    assert built.runtime["model"] == built.runtime["engine"] == "target/model.plan"
    assert built.files == ["target/model.plan", "target/timing.cache"]
    TENSORRT.build(TENSORRT, path, target)  # a rebuild starts from the cache it saved
    assert fake.calls["cache_in"] == b"+timed"
    (target / "timing.cache").unlink()
    TENSORRT.build(TENSORRT, path, tmp_path / "fresh")  # a new artifact starts from the shared one
    assert fake.calls["cache_in"] == b"+timed+timed"


def test_engine_build_fp32_is_not_strongly_typed_and_parser_errors_name_the_node(tmp_path,
                                                                                 monkeypatch):
    fp32 = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [_init("w", np.ones((K, N), np.float32))])
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.delenv(TIMING_CACHE_ENV, raising=False)
    TENSORRT.build(TENSORRT, _artifact(tmp_path, fp32), tmp_path / "target")
    assert fake.calls["flags"] == 0
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt(parse_ok=False))
    with pytest.raises(UserError, match=r"parser rejected node 'mm' \(MatMul\): unsupported op"):
        TENSORRT.build(TENSORRT, tmp_path / "model.onnx", tmp_path / "target2")
