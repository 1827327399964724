"""qnn-htp on the HTP emulator: EPContext build + reload, refusals that name nodes, legalization."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as H
from onnx import numpy_helper as nh

pytest.importorskip("onnxruntime_qnn")

import onnxruntime as ort

from edgec.errors import UserError
from edgec.runtimes import open_session
from edgec.runtimes.ort import run_model
from edgec.runtimes.qnn import emulator
from edgec.targets.qnn_htp import QNN_HTP
from edgec.targets.qnn_htp.legalize import QnnLegalizePass

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=21) -> onnx.ModelProto:
    graph = H.make_graph(nodes, "g", inputs, outputs, list(inits))
    return H.make_model(graph, opset_imports=[H.make_opsetid("", opset)], ir_version=10)


def _quantize(model: onnx.ModelProto, path, samples, **kw):
    """QDQ-quantize with onnxruntime's QNN config (what the HTP's own toolchain expects)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    fp32 = path.with_name(path.stem + "_fp32.onnx")
    onnx.save(model, fp32)
    config = get_qnn_qdq_config(str(fp32), Reader(), activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QUInt8, **kw)
    quantize(str(fp32), str(path), config)
    return path


def _cpu(path, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _build(path, root):
    return QNN_HTP.build(QNN_HTP, path, root / "target")


def _out_scale(path) -> float:
    """Scale of the graph output's final DequantizeLinear (one quantization step)."""
    m = onnx.load(str(path))
    out = m.graph.output[0].name
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == out)
    init = {i.name: i for i in m.graph.initializer}
    return float(nh.to_array(init[dq.input[1]]))


def _mlp(batch=2, dim=16):
    w1 = RNG.standard_normal((dim, 32)).astype(np.float32) * 0.3
    w2 = RNG.standard_normal((32, 8)).astype(np.float32) * 0.3
    nodes = [H.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             H.make_node("Relu", ["h"], ["r"], name="relu"),
             H.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return _model(nodes, [H.make_tensor_value_info("x", T.FLOAT, [batch, dim])],
                  [H.make_tensor_value_info("y", T.FLOAT, [batch, 8])],
                  [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])


def _samples(n=4, **shapes):
    return [{k: RNG.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(n)]


def test_qdq_graph_builds_epcontext_and_reloads(tmp_path, monkeypatch):
    path = _quantize(_mlp(), tmp_path / "model.onnx", _samples(x=(2, 16)))
    build = _build(path, tmp_path)
    assert build.runtime["name"] == "qnn" and build.runtime["model"] == "target/model_ctx.onnx"
    assert set(build.files) == {"target/model_ctx.onnx", "target/model_ctx_qnn.bin"}
    ctx = onnx.load(str(tmp_path / "target" / "model_ctx.onnx"), load_external_data=False)
    # precompiled: one EPContext node whose binary lives in the separate .bin (embed mode 0)
    assert [n.op_type for n in ctx.graph.node] == ["EPContext"]
    attrs = {a.name: H.get_attribute_value(a) for a in ctx.graph.node[0].attribute}
    assert attrs["embed_mode"] == 0 and attrs["ep_cache_context"] == b"model_ctx_qnn.bin"

    sess = open_session(tmp_path, build.runtime)
    assert "qnn" in sess.runtime.lower()
    # on this x86_64 host the HTP backend is QNN's emulator: the session says so
    assert sess.emulator == emulator("htp") and "x86_64" in sess.emulator
    x = RNG.standard_normal((2, 16)).astype(np.float32)
    # Python's benchmark() says so too (only `edgec bench --json` did)
    assert sess.benchmark(warmup=0, iterations=1, feeds={"x": x})["emulator"] == sess.emulator
    got, want = sess.run({"x": x})["y"], _cpu(path, {"x": x})
    # the HTP requantizes in fixed point: within one output quantization step of ORT CPU
    assert np.abs(got - want).max() <= 1.01 * _out_scale(path)

    # an edited context-binary path ('..' or absolute) is refused as a damaged artifact: ORT
    # refused '..' itself, and edgec's line told the user to upgrade edgec/onnxruntime-qnn
    for location in ("../secret.bin", str(tmp_path / "target" / "model_ctx_qnn.bin")):
        ctx.graph.node[0].attribute[[a.name for a in ctx.graph.node[0].attribute]
                                    .index("ep_cache_context")].s = location.encode()
        onnx.save(ctx, str(tmp_path / "target" / "model_ctx.onnx"))
        with pytest.raises(UserError, match=f"context binary '{location}', outside the artifact"
                                            r".*damaged or was edited"):
            open_session(tmp_path, build.runtime)
    import edgec.runtimes.qnn as qnn_runtime  # ORT's own refusal, past edgec's check

    monkeypatch.setattr(qnn_runtime, "_check_context_paths", lambda root, model: None)
    ctx.graph.node[0].attribute[[a.name for a in ctx.graph.node[0].attribute]
                                .index("ep_cache_context")].s = b"../secret.bin"
    onnx.save(ctx, str(tmp_path / "target" / "model_ctx.onnx"))
    with pytest.raises(UserError, match="ep_cache_context.*damaged or was edited") as e:
        open_session(tmp_path, build.runtime)
    assert "recompile the artifact with this" not in str(e.value)


def test_emulator_is_named_by_host_and_backend():
    assert "emulator" in emulator("htp", "x86_64") and "emulator" in emulator("htp", "AMD64")
    assert emulator("htp", "aarch64") is None and emulator("htp", "ARM64") is None  # the NPU
    assert "reference" in emulator("cpu", "aarch64")


def test_integer_token_ids_gather_on_npu(tmp_path):
    table = RNG.standard_normal((50, 16)).astype(np.float32)
    w = RNG.standard_normal((16, 8)).astype(np.float32) * 0.3
    model = _model([H.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
                    H.make_node("MatMul", ["e", "w"], ["y"], name="proj")],
                   [H.make_tensor_value_info("ids", T.INT64, [1, 6])],
                   [H.make_tensor_value_info("y", T.FLOAT, [1, 6, 8])],
                   [nh.from_array(table, "table"), nh.from_array(w, "w")])
    samples = [{"ids": RNG.integers(0, 50, (1, 6))} for _ in range(4)]
    path = _quantize(model, tmp_path / "model.onnx", samples)
    build = _build(path, tmp_path)  # CPU fallback is off: the int64 Gather runs on the HTP
    sess = open_session(tmp_path, build.runtime)
    assert sess.inputs[0].dtype == "int64"
    ids = RNG.integers(0, 50, (1, 6))
    got, want = sess.run({"ids": ids})["y"], _cpu(path, {"ids": ids})
    assert np.abs(got - want).max() <= 1.01 * _out_scale(path)


def test_unsupported_node_is_named(tmp_path):
    # GatherND on bool data (BERT's key mask) is rejected by the HTP's op validation
    idx = np.stack(np.meshgrid(np.arange(4), np.arange(8), indexing="ij"), -1)
    model = _model([H.make_node("MatMul", ["x", "w"], ["r"], name="proj"),
                    H.make_node("GatherND", ["m", "idx"], ["g"], name="mask_gather"),
                    H.make_node("Cast", ["g"], ["gf"], to=T.FLOAT, name="to_float"),
                    H.make_node("Mul", ["r", "gf"], ["y"], name="apply_mask")],
                   [H.make_tensor_value_info("x", T.FLOAT, [4, 8]),
                    H.make_tensor_value_info("m", T.BOOL, [4, 8])],
                   [H.make_tensor_value_info("y", T.FLOAT, [4, 8])],
                   [nh.from_array(idx.astype(np.int64), "idx"),
                    nh.from_array(RNG.standard_normal((8, 8)).astype(np.float32), "w")])
    samples = [{"x": RNG.standard_normal((4, 8)).astype(np.float32),
                "m": RNG.random((4, 8)) > 0.5} for _ in range(4)]
    path = _quantize(model, tmp_path / "model.onnx", samples)
    with pytest.raises(UserError, match=r"GatherND 'mask_gather'") as info:
        _build(path, tmp_path)
    assert "no CPU fallback" in str(info.value)
    assert not list((tmp_path / "target").glob("model_ctx*"))  # no partial artifact


def test_float_model_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_mlp(), path)
    with pytest.raises(UserError, match="--quantize w8a8"):
        _build(path, tmp_path)


def test_dynamic_dims_refused(tmp_path):
    model = _mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with pytest.raises(UserError, match=r"input 'x' has shape \['batch', 16\].*static shapes"):
        _build(path, tmp_path)


def test_finalize_failure_names_the_node(tmp_path):
    # the exporter's NaN guard after a masked Softmax: the HTP cannot finalize the QNN graph
    model = _model([H.make_node("Softmax", ["x"], ["p"], name="softmax"),
                    H.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
                    H.make_node("Where", ["nan", "zero", "p"], ["y"], name="nan_guard")],
                   [H.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                   [H.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])],
                   [nh.from_array(np.zeros((), np.float32), "zero")])
    path = _quantize(model, tmp_path / "model.onnx", _samples(x=(1, 4, 8, 8)))
    with pytest.raises(UserError, match=r"IsNaN 'isnan'|Where 'nan_guard'"):
        _build(path, tmp_path)
    legal = ir.from_proto(model)
    QnnLegalizePass()(legal)
    assert [n.op_type for n in legal.graph] == ["Softmax"]
    assert legal.graph.outputs[0].name == "y"
    path = _quantize(ir.to_proto(legal), tmp_path / "legal.onnx", _samples(x=(1, 4, 8, 8)))
    _build(path, tmp_path)


# --- legalization: op lists and exactness ------------------------------------------------------

def _legalize(model: onnx.ModelProto, feeds):
    before = run_model(ir.from_proto(model), feeds)
    legal = ir.from_proto(model)
    result = QnnLegalizePass()(legal)
    after = run_model(result.model, feeds)
    return result, before, after


def test_legalize_lowers_rank8_unpatchify_exactly(tmp_path):
    # video-dit's unpatchify: [B, T', H', W', pt, ph, pw, C] → [B, C, T, H, W]; the HTP's limit is 5
    dims, perm = [2, 2, 4, 4, 1, 2, 2, 4], [0, 7, 1, 4, 2, 5, 3, 6]
    model = _model([H.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
                    H.make_node("Reshape", ["h", "s1"], ["v"], name="view"),
                    H.make_node("Transpose", ["v"], ["t"], perm=perm, name="unpatchify"),
                    H.make_node("Reshape", ["t", "s2"], ["y"], name="merge")],
                   [H.make_tensor_value_info("x", T.FLOAT, [2, 32, 16])],
                   [H.make_tensor_value_info("y", T.FLOAT, [2, 4, 2, 8, 8])],
                   [nh.from_array(RNG.standard_normal((16, 16)).astype(np.float32), "w"),
                    nh.from_array(np.array(dims, np.int64), "s1"),
                    nh.from_array(np.array([2, 4, 2, 8, 8], np.int64), "s2")])
    x = RNG.standard_normal((2, 32, 16)).astype(np.float32)
    result, before, after = _legalize(onnx.shape_inference.infer_shapes(model), {"x": x})
    assert result.stats["transposes_lowered"] == 1
    ranks = [len(n.attributes["perm"].as_ints()) for n in result.model.graph
             if n.op_type == "Transpose"]
    assert ranks and max(ranks) <= 5
    lowered = [n for n in result.model.graph if n.name.startswith("unpatchify_lower")]
    assert lowered and all(n.outputs[0].dtype == ir.DataType.FLOAT for n in lowered)  # typed
    np.testing.assert_array_equal(after["y"], before["y"])  # pure data movement: bit exact
    path = _quantize(ir.to_proto(result.model), tmp_path / "model.onnx", _samples(x=(2, 32, 16)))
    _build(path, tmp_path)  # and the HTP takes it


def test_legalize_gathernd_exactly():
    # BERT's key-mask broadcast: GatherND(bool mask, constant indices) feeding the mask's Where
    idx = np.stack(np.meshgrid(np.arange(1), np.arange(8), indexing="ij"), -1)[None, None]
    model = _model([H.make_node("Cast", ["mask"], ["b"], to=T.BOOL, name="to_bool"),
                    H.make_node("GatherND", ["b", "idx"], ["bk"], name="gnd"),
                    H.make_node("Where", ["bk", "s", "neg"], ["sm"], name="apply_mask"),
                    H.make_node("Softmax", ["sm"], ["y"], name="softmax")],
                   [H.make_tensor_value_info("s", T.FLOAT, [1, 2, 8, 8]),
                    H.make_tensor_value_info("mask", T.INT64, [1, 8])],
                   [H.make_tensor_value_info("y", T.FLOAT, [1, 2, 8, 8])],
                   [nh.from_array(idx.astype(np.int64), "idx"),
                    nh.from_array(np.array(-100, np.float32), "neg")])
    model = onnx.shape_inference.infer_shapes(model)
    feeds = {"s": RNG.standard_normal((1, 2, 8, 8)).astype(np.float32),
             "mask": np.array([[1, 1, 1, 1, 1, 1, 0, 0]])}
    result, before, after = _legalize(model, feeds)
    assert result.stats["gathernd_rewritten"] == 1
    assert [n.op_type for n in result.model.graph] == [
        "Cast", "Reshape", "Gather", "Where", "Softmax"]
    np.testing.assert_array_equal(after["y"], before["y"])  # an index remap: bit exact


@pytest.mark.parametrize("seed", range(6))
def test_legalize_lowers_random_high_rank_transposes(seed):
    rng = np.random.default_rng(seed)
    rank = int(rng.integers(6, 9))
    dims = [int(d) for d in rng.integers(1, 4, rank)]
    perm = [int(p) for p in rng.permutation(rank)]
    total = int(np.prod(dims))
    model = _model([H.make_node("Reshape", ["x", "s1"], ["v"], name="view"),
                    H.make_node("Transpose", ["v"], ["t"], perm=perm, name="t"),
                    H.make_node("Reshape", ["t", "s2"], ["y"], name="flat")],
                   [H.make_tensor_value_info("x", T.FLOAT, [total])],
                   [H.make_tensor_value_info("y", T.FLOAT, [total])],
                   [nh.from_array(np.array(dims, np.int64), "s1"),
                    nh.from_array(np.array([total], np.int64), "s2")])
    x = np.arange(total, dtype=np.float32)
    result, before, after = _legalize(onnx.shape_inference.infer_shapes(model), {"x": x})
    assert result.stats["transposes_lowered"] == 1
    assert all(len(n.attributes["perm"].as_ints()) <= 5 for n in result.model.graph
               if n.op_type == "Transpose")
    np.testing.assert_array_equal(after["y"], before["y"])


def test_online_rotation_matmuls_keep_8_bit_weights_under_w4():
    """A 4-bit scheme's MatMul weights are int4, but an online rotation's own MatMul (R4) stays
    int8: at 4 bits the rotation itself would be rounded."""
    import numpy as np
    import onnx_ir as ir

    from edgec.graph_passes.rotation.edit import ROTATION_TAG
    from edgec.targets.qnn_htp.qdq import _matmul_weights

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8]))
    rot = ir.Value(name="r", const_value=ir.tensor(np.eye(8, dtype=np.float32)))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 4), np.float32)))
    a = ir.node("MatMul", [x, rot], name="r4", metadata_props={ROTATION_TAG: "r4"})
    b = ir.node("MatMul", [a.outputs[0], w], name="down")
    model = ir.Model(ir.Graph([x], [b.outputs[0]], nodes=[a, b], initializers=[rot, w],
                              opset_imports={"": 21}), ir_version=10)
    types = {k: str(v[0]["quant_type"]) for k, v in _matmul_weights(model, "int4").items()}
    assert types["w"].endswith("QInt4") and types["r"].endswith("QInt8"), types


def test_online_rotation_output_keeps_its_inputs_16_bits():
    """A rotation keeps each token's norm: a 16-bit (outlier) input's rotated output is 16-bit
    too, through every node of a factored rotation; an 8-bit input's stays 8-bit."""
    import numpy as np
    import onnx_ir as ir

    from edgec.graph_passes.quantization.select import rotated_outputs
    from edgec.graph_passes.rotation.edit import ROTATION_TAG

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8]))
    f1 = ir.Value(name="f1", const_value=ir.tensor(np.eye(8, dtype=np.float32)))
    f2 = ir.Value(name="f2", const_value=ir.tensor(np.eye(8, dtype=np.float32)))
    a = ir.node("MatMul", [x, f1], name="r4a", metadata_props={ROTATION_TAG: "r4"})
    b = ir.node("MatMul", [a.outputs[0], f2], name="r4b", metadata_props={ROTATION_TAG: "r4"})
    c = ir.node("Relu", [b.outputs[0]], name="after")
    for n in (a, b, c):
        n.outputs[0].dtype = ir.DataType.FLOAT
    model = ir.Model(ir.Graph([x], [c.outputs[0]], nodes=[a, b, c], initializers=[f1, f2],
                              opset_imports={"": 21}), ir_version=10)
    assert rotated_outputs(model, {"x"}) == {a.outputs[0].name, b.outputs[0].name}
    assert rotated_outputs(model, set()) == set()


def test_a_target_bug_names_the_node_where_the_device_departs(tmp_path, monkeypatch):
    """The compile's device check fails as a target bug (device far from ORT, ORT close to fp32)
    and its one line says where: here the HTP's Reciprocal of a range below 1 (the qnn-legalize
    rule that fixes it switched off), found by its output's norm."""
    import torch

    import edgec
    from edgec.errors import VerificationError
    from edgec.graph_passes._infra import PassResult

    class Norm(torch.nn.Module):  # RMSNorm of activations at a trained LLM's scale (RMS ~0.1)
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            h = 0.1 * x
            return self.proj(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))

    torch.manual_seed(0)
    monkeypatch.setattr(QnnLegalizePass, "call", lambda self, model: PassResult(model, False, {}))
    with pytest.raises(VerificationError) as err:
        edgec.compile(Norm().eval(), target="qnn-htp", quantize="w8a8:min_cos=0",
                      example_inputs=(torch.randn(1, 24, 64),), output_dir=tmp_path / "o")
    message = str(err.value)
    assert "target bug" in message and "first departs from ONNX Runtime at Reciprocal" in message
    assert not (tmp_path / "o").exists()


def test_constant_node_resize_scales_compile(tmp_path):
    """The legacy exporter (``torch.onnx.export``, ``dynamo=False``) writes a Resize's scales as
    a ``Constant`` node: the HTP's quantizer put Q/DQ on them (Constant was an op to quantize)
    and the HTP refused the Resize. Cleanup lifts an ONNX file's Constants to initializers."""
    import edgec

    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    scales = H.make_tensor("scales_value", T.FLOAT, [4], [1, 1, 2, 2])
    model = _model([H.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                    H.make_node("Constant", [], ["scales"], value=scales, name="scales_const"),
                    H.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest",
                                name="up")],
                   [H.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                   [H.make_tensor_value_info("y", T.FLOAT, [1, 8, 16, 16])],
                   [nh.from_array(w, "w")], opset=17)
    onnx.save(model, tmp_path / "up.onnx")
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((12, 1, 3, 8, 8)).astype(np.float32))
    art = edgec.compile(tmp_path / "up.onnx", target="qnn-htp", quantize="w8a8",
                        calibration=tmp_path / "calib.npz", output_dir=tmp_path / "o")
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["y"]["cosine"] > 0.99
    graph = onnx.load(tmp_path / "o" / "model.onnx").graph
    assert not any(n.op_type == "Constant" for n in graph.node)


@pytest.fixture(scope="module")
def wide_norm_bert(tmp_path_factory):
    """A tiny HF BertModel (initializer_range 0.1) whose LayerNorm weights carry two outlier
    channels (×20, ×8): its LayerNorm outputs span about ±45."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=128, initializer_range=0.1)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p[5] *= 20
                p[17] *= 8
    path = tmp_path_factory.mktemp("hbert") / "hbert"
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_a_floor_held_on_ort_but_missed_far_off_it_on_the_htp_fails_the_compile(
        wide_norm_bert, tmp_path):
    """The HTP computes the Q/K/V MatMuls reading that LayerNorm otherwise than ONNX Runtime
    (some tokens come out sign-flipped): the default floor held on ONNX Runtime (0.9997) and
    the HTP ran the held-out samples at 0.73, shipped as "min_cos 0.98 (default) reached" with
    the advice to ask for a tighter floor. Judged against ONNX Runtime as the example is, it is
    a target bug, named where the HTP first departs, and nothing is written."""
    import edgec
    from edgec.errors import VerificationError

    with pytest.raises(VerificationError) as err:
        edgec.compile(wide_norm_bert, target="qnn-htp", quantize="w8a16",
                      output_dir=tmp_path / "o")
    message = str(err.value)
    assert "misses the accuracy floor (min_cos=0.98) on the held-out samples" in message
    assert "target bug" in message and "first departs from ONNX Runtime at MatMul" in message
    assert "a tighter floor cannot help" in message
    assert not (tmp_path / "o").exists()


def test_a_session_naming_another_soc_than_the_processs_first_is_warned_of(monkeypatch, caplog):
    """The HTP backend keeps the first session's SoC for the process: after an fp16 session
    (soc_model 60), one naming no SoC finalized an IsNaN/Where graph a fresh process refuses.
    A session whose SoC options differ from the first one's is warned of, once; only the
    options are made here, no session (a real one would change this process's backend)."""
    import logging

    from edgec.runtimes import qnn

    monkeypatch.setattr(qnn, "_first_soc", [])
    monkeypatch.setattr(qnn, "_soc_warned", [])
    with caplog.at_level(logging.WARNING, logger="edgec.runtimes.qnn"):
        qnn.qnn_session_options(provider_options=qnn.FP16_OPTIONS)
        qnn.qnn_session_options(provider_options=qnn.FP16_OPTIONS)
        assert not caplog.records  # the same SoC again
        qnn.qnn_session_options()
        qnn.qnn_session_options()
    (record,) = caplog.records
    assert ("with soc_model 60, htp_arch 73 before, and one with no SoC now"
            in record.getMessage())
