"""Hosts whose int8 kernels saturate (x86 without VNNI): the CPU targets shift int8 weights to
uint8 (exact, 8 bits kept), and ONNX Runtime measuring a QDQ graph leaves its fusions off."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from edgec.graph_passes.quantization.host_int8 import ENV, int8_saturates, saturates
from edgec.graph_passes.quantization.unsigned_weights import UnsignedWeightsPass


def test_only_x86_with_avx2_and_no_vnni_saturates(monkeypatch):
    assert saturates("x86_64", {"avx2", "fma"})
    assert not saturates("x86_64", {"avx2", "avx512f", "avx512_vnni"})
    assert not saturates("x86_64", {"avx2", "avx_vnni"})
    assert not saturates("aarch64", {"asimd"})
    monkeypatch.setenv(ENV, "1")
    assert int8_saturates() and UnsignedWeightsPass.wanted()
    monkeypatch.setenv(ENV, "0")
    assert not int8_saturates() and not UnsignedWeightsPass.wanted()


def _qdq_matmul(k: int = 64, n: int = 32, with_zero_point: bool = True, top: int = 127
                ) -> bytes:
    """u8 activations × int8 weights whose pair sums overflow int16 (weights near ±``top``,
    inputs near the u8 top; ``top`` 64, a 7-bit grid: they fit), the weight's zero point
    shared with a second DequantizeLinear."""
    rng = np.random.default_rng(0)
    w = np.where(rng.random((k, n)) < 0.5, top, top - 7).astype(np.int8)
    w[:, ::2] *= -1
    w2 = rng.integers(-top, top + 1, (n, n)).astype(np.int8)
    wz = [h.make_tensor("wz", T.INT8, [], [0])]
    inits = [h.make_tensor("W", T.INT8, [k, n], w.tobytes(), raw=True),
             h.make_tensor("W2", T.INT8, [n, n], w2.tobytes(), raw=True),
             h.make_tensor("ws", T.FLOAT, [], [0.01]), h.make_tensor("xs", T.FLOAT, [], [0.02]),
             h.make_tensor("xz", T.UINT8, [], [0]), h.make_tensor("ys", T.FLOAT, [], [2.0]),
             h.make_tensor("yz", T.UINT8, [], [128])] + (wz if with_zero_point else [])
    zp = ["wz"] if with_zero_point else []
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             h.make_node("DequantizeLinear", ["W", "ws", *zp], ["Wd"]),
             h.make_node("MatMul", ["xd", "Wd"], ["y0"]),
             h.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
             h.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["yd"]),
             h.make_node("DequantizeLinear", ["W2", "ws", *zp], ["W2d"]),
             h.make_node("MatMul", ["yd", "W2d"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [8, k])],
                         [h.make_tensor_value_info("y", T.FLOAT, [8, n])], initializer=inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def _run(model: bytes, fused: bool, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused else
                                     ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("with_zero_point", [True, False])
def test_unsigned_weights_are_exact_and_fused_kernels_compute_them(with_zero_point):
    """The shift leaves the graph's values bitwise (unfused); ORT's fused kernels then compute
    what the graph says on any host (U8U8 never overflows), where the int8 weights overflowed on
    a saturating host (that half asserted only there)."""
    import onnx

    before = _qdq_matmul(with_zero_point=with_zero_point)
    model = ir.serde.deserialize_model(onnx.load_from_string(before))
    result = UnsignedWeightsPass()(model)
    assert result.modified and result.stats["weights_shifted"] == 2
    dqs = [n for n in result.model.graph if n.op_type == "DequantizeLinear"
           and n.inputs[0].const_value is not None]
    assert {n.inputs[0].const_value.dtype for n in dqs} == {ir.DataType.UINT8}
    assert all(n.inputs[2].const_value.numpy() == 128 for n in dqs)
    assert "W" not in result.model.graph.initializers  # the int8 original is gone
    after = onnx.ModelProto.SerializeToString(ir.serde.serialize_model(result.model))
    x = np.random.default_rng(1).uniform(4.5, 5.1, (8, 64)).astype(np.float32)
    exact = _run(before, False, x)
    np.testing.assert_array_equal(_run(after, False, x), exact)
    top = np.abs(exact).max()  # 3409; the fused int8 weights were off by 604 on an AVX2 host
    assert np.abs(_run(after, True, x) - exact).max() <= 1e-5 * top  # 2.4e-4 measured
    if int8_saturates():
        assert np.abs(_run(before, True, x) - exact).max() > 0.05 * top


def test_weights_on_a_seven_bit_grid_stay_int8_and_the_fused_kernels_compute_them():
    """Weights within ±64 (``reduce_range``) overflow no int16 pair sum: the pass leaves them
    int8, for ONNX Runtime's U8S8 kernels, and those compute what the graph says on any host
    (the same inputs near the u8 top as the overflowing case above)."""
    import onnx

    before = _qdq_matmul(top=64)
    model = ir.serde.deserialize_model(onnx.load_from_string(before))
    result = UnsignedWeightsPass()(model)
    assert not result.modified
    assert result.stats == {"weights_shifted": 0, "weights_7bit_kept": 2}
    x = np.random.default_rng(1).uniform(4.5, 5.1, (8, 64)).astype(np.float32)
    exact = _run(before, False, x)
    assert np.abs(_run(before, True, x) - exact).max() <= 1e-5 * np.abs(exact).max()
    # a weight that reaches 65 is shifted
    wider = onnx.load_from_string(_qdq_matmul(top=65))
    result = UnsignedWeightsPass()(ir.serde.deserialize_model(wider))
    assert result.stats == {"weights_shifted": 2, "weights_7bit_kept": 0}


def test_weight_forms_count_each_8_bit_form():
    import onnx

    from edgec.graph_passes.quantization.unsigned_weights import weight_forms

    full = ir.serde.deserialize_model(onnx.load_from_string(_qdq_matmul()))
    assert weight_forms(full) == {"int8": 2}
    seven = ir.serde.deserialize_model(onnx.load_from_string(_qdq_matmul(top=64)))
    assert weight_forms(seven) == {"int8_7bit": 2}
    assert weight_forms(UnsignedWeightsPass()(full).model) == {"uint8": 2}


def test_reduce_range_is_offered_where_it_pays_ort_cpu_w8a8():
    from edgec.errors import UserError
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.targets import get as get_target

    target = get_target("ort-cpu")
    opts = QuantOptions.parse("w8a8:reduce_range=true", target)
    assert opts.scheme_on(target).reduce_range and opts.scheme_on(target).weights == "int8"
    assert not QuantOptions.parse("w8a8", target).scheme_on(target).reduce_range
    with pytest.raises(UserError, match="on ort-cpu only w8a8 takes it: drop reduce_range"):
        QuantOptions.parse("w8a16:reduce_range=true", target)
    for name in ("openvino-cpu", "tensorrt", "qnn-htp"):
        with pytest.raises(UserError, match=f"{name} gains nothing from it .*: drop reduce_range"):
            QuantOptions.parse("w8a8:reduce_range=true", get_target(name))
    with pytest.raises(UserError, match="reduce_range"):
        QuantOptions.parse("w8a8:reduce_range=maybe", target)


def test_reduce_range_on_a_vnni_host_is_kept_and_warned_about(monkeypatch, caplog):
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.targets import get as get_target

    target = get_target("ort-cpu")
    opts = QuantOptions.parse("w8a8:reduce_range=true,samples=4", target)
    monkeypatch.setenv(ENV, "0")
    quantize = opts.make_pass(target, None, None, lambda message: None)
    assert quantize.scheme.reduce_range
    assert "gain no speed here; kept as asked" in caplog.text
    caplog.clear()
    monkeypatch.setenv(ENV, "1")
    opts.make_pass(target, None, None, lambda message: None)
    assert "reduce_range" not in caplog.text


def test_cpu_targets_run_it_only_where_the_host_saturates(monkeypatch):
    from edgec.pipeline import STAGES
    from edgec.recipe import Recipe

    stage = next(s for s in STAGES if s.name == "device-legalize-quantized")
    for target in ("ort-cpu", "openvino-cpu"):
        recipe = Recipe.parse(target)
        monkeypatch.setenv(ENV, "1")
        assert [p.name for p in stage.make(_Ctx(recipe))] == ["unsigned-weights"]
        monkeypatch.setenv(ENV, "0")
        assert stage.make(_Ctx(recipe)) == []
    monkeypatch.setenv(ENV, "1")  # the other targets' own passes stay as they were
    assert [p.name for p in stage.make(_Ctx(Recipe.parse("tensorrt")))] == ["tensorrt-legalize"]


class _Ctx:
    def __init__(self, recipe):
        self.recipe, self.target = recipe, recipe.target


def test_measuring_sessions_leave_qdq_fusions_off_only_there(monkeypatch):
    from edgec.runtimes.ort import exact_qdq

    monkeypatch.setenv(ENV, "1")
    assert exact_qdq() == {"session.disable_quant_qdq": "1"}
    monkeypatch.setenv(ENV, "0")
    assert exact_qdq() == {}


def test_a_weight_only_floor_measures_the_fused_kernel_the_artifact_runs(tmp_path, monkeypatch):
    """A graph that quantizes no activation has no u8 x s8 fusion to saturate: its measuring
    sessions keep ORT's fusions (DequantizeLinear -> MatMul into MatMulNBits) on a saturating
    host too, so the floor's held-out figures are the artifact's own on ort-cpu. Unfused, the
    floor measured float arithmetic while the artifact ran MatMulNBits' per-block int8 input."""
    import edgec
    from edgec.runtimes.ort import exact_qdq

    monkeypatch.setenv(ENV, "1")
    import onnx

    qdq = ir.from_proto(onnx.load_model_from_string(_qdq_matmul()))
    assert exact_qdq(qdq) == {"session.disable_quant_qdq": "1"}
    art = edgec.compile("llama", target="ort-cpu", config="tiny", quantize="w8a16",
                        output_dir=tmp_path / "o")
    model = ir.load(art.path / "model.onnx")
    assert exact_qdq(model) == {}
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    on_target = mp["on_target"]
    assert on_target["runtime"] == "onnxruntime" and on_target["reached"], mp
    # the same samples through the same fused kernels: the same figures
    assert abs(mp["achieved"] - on_target["cosine"]) <= 2e-6, mp
    assert abs(mp["achieved_kld"] - on_target["kld"]) <= 1e-5 + 0.01 * on_target["kld"], mp


def test_a_reduce_range_compile_keeps_7_bit_int8_weights_that_run_exactly(tmp_path, monkeypatch):
    """``w8a8:reduce_range=true`` on a host whose kernels saturate (forced here): every weight
    stays int8 within ±64, so ``unsigned-weights`` shifts none and ONNX Runtime's fused U8S8
    kernels compute what the QDQ graph says; the report and the manifest say 7-bit. A target
    without the host's int8 kernels refuses it in one line, writing nothing."""
    import edgec
    from edgec.report import summary_rows

    monkeypatch.setenv(ENV, "1")
    art = edgec.compile("llama", target="ort-cpu", config="tiny",
                        quantize="w8a8:reduce_range=true,min_cos=0", output_dir=tmp_path / "o")
    model = ir.load(art.path / "model.onnx")
    weights = [n.inputs[0].const_value for n in model.graph if n.op_type == "DequantizeLinear"
               and n.inputs[0].const_value is not None]
    assert weights and {w.dtype for w in weights} == {ir.DataType.INT8}
    assert max(int(np.abs(w.numpy().astype(np.int16)).max()) for w in weights) == 64
    stats = next(p for p in art.report["passes"] if p["name"] == "unsigned-weights")["stats"]
    assert stats == {"weights_shifted": 0, "weights_7bit_kept": len(weights)}
    sess = art.load()
    feeds = sess.default_feeds
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(art.path / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in unfused.get_inputs()}
    exact = unfused.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    got = sess.run(feeds)["logits"]
    assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()
    assert "int8 (7-bit, reduce_range) weights" in dict(summary_rows(art.report))["quantization"]
    assert art.manifest["recipe"]["quantize"]["reduce_range"] is True
    assert art.manifest["int8_weights"] == {"int8_7bit": len(weights)}
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["cosine"] > 0.999

    from typer.testing import CliRunner

    from edgec.cli import app

    out = tmp_path / "trt"
    r = CliRunner().invoke(app, ["compile", "llama", "--config", "tiny", "--target", "tensorrt",
                                 "--quantize", "w8a8:reduce_range=true", "-o", str(out)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and not out.exists()
    assert "tensorrt gains nothing from it" in r.stderr


def test_loading_int8_weights_on_a_host_that_saturates_them_warns(tmp_path, monkeypatch, caplog):
    """An artifact built where int8 kernels do not saturate keeps 8-bit int8 weights; loaded
    where they do, its outputs drift, which the load says (the manifest records the forms)."""
    import logging

    import edgec

    monkeypatch.setenv(ENV, "0")  # built as on a VNNI host
    art = edgec.compile("llama", target="openvino-cpu", config="tiny",
                        quantize="w8a8:min_cos=0", output_dir=tmp_path / "vnni")
    assert art.manifest["int8_weights"]["int8"] > 0 and "uint8" not in art.manifest["int8_weights"]
    with caplog.at_level(logging.WARNING, logger="edgec.runtimes"):
        edgec.load(art.path)
        assert not caplog.records
        monkeypatch.setenv(ENV, "1")  # loaded on an AVX2-only host
        edgec.load(art.path)
    (record,) = caplog.records
    assert "int8 weights use all 8 bits" in record.getMessage()
    assert f"{ENV}=1" in record.getMessage()
