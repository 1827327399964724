"""SmoothQuant folded into the norms: exact in fp32, and what it does to w8a8 on outliers."""

import numpy as np
import pytest

import edgec
from edgec.errors import UserError
from edgec.graph_passes import PassManager
from edgec.graph_passes.quantization.smooth import SmoothQuantPass, smoothing_scales
from edgec.runtimes.ort import run_model


def test_scales_follow_the_smoothquant_formula():
    s = smoothing_scales([100.0, 4.0, 0.0], [0.01, 1.0, 2.0], 0.5)
    np.testing.assert_allclose(s, [np.sqrt(100.0) / np.sqrt(0.01), 2.0, 1.0])


@pytest.fixture(scope="module")
def outliers():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny+outliers")


def test_smoothing_is_exact_and_flattens_the_outlier_channels(outliers):
    src = outliers
    before = src.model.clone()
    ref = run_model(before, src.feeds)["logits"]
    pm = PassManager([SmoothQuantPass(0.5, src)], check=True, feeds=src.feeds)
    model = pm(src.model.clone())
    stats = pm.records[0].stats
    assert pm.records[0].check["rtol"] == 1e-4  # checked against the model it came from
    assert stats["smoothed_norms"] == 5 and not stats["skipped"]  # 2 layers × 2 + final norm
    out = run_model(model, src.feeds)["logits"]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4
    worst = max(n["act_max_before"] / n["act_max_after"] for n in stats["norms"])
    assert worst > 20  # the planted channels (~120) now sit near the rest
    assert len(list(model.graph)) == len(list(before.graph))  # no op added


def test_norms_that_cannot_fold_are_reported_not_rewritten():
    """Post-norm (BERT-style): the LayerNorm's output is the residual stream too."""
    import onnx_ir as ir

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    consts = [ir.Value(name=n, const_value=ir.tensor(np.full(shape, 0.5, np.float32)))
              for n, shape in (("gamma", (4,)), ("beta", (4,)), ("w", (4, 4)))]
    ln = ir.node("LayerNormalization", [x, consts[0], consts[1]], attributes={"axis": -1},
                 name="ln")
    mm = ir.node("MatMul", [ln.outputs[0], consts[2]], name="mm")
    add = ir.node("Add", [mm.outputs[0], ln.outputs[0]], name="residual")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], add.outputs, nodes=[ln, mm, add], initializers=consts,
                     opset_imports={"": 17}, name="g")
    result = SmoothQuantPass(0.5, None, samples=[])(ir.Model(graph, ir_version=9))
    assert not result.modified and result.stats["smoothed_norms"] == 0
    (skip,) = result.stats["skipped"]
    assert skip["norm"] == "ln" and "residual" in skip["reason"] and "Add" in skip["reason"]


def test_w8a8_with_smoothing_holds_where_the_outliers_broke_it(tmp_path):
    """llama tiny+outliers w8a8 on ort-cpu: logits cosine 0.984 unsmoothed (measured), ≥ 0.999
    with smooth=0.5 (0.9997 measured)."""
    art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o",
                        config="tiny+outliers", quantize="w8a8:smooth=0.5")
    assert [p["name"] for p in art.report["passes"]  # unsigned-weights: the host's, if any
            if p["name"] != "unsigned-weights"][-2:] == ["smooth", "quantize"]
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["cosine"] >= 0.999
    for bad, match in (("w8a8:smooth=1.5", "between 0 and 1"),
                       ("w4a16:smooth=0.5", "weight-only")):
        with pytest.raises(UserError, match=match):
            edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "x", quantize=bad)
    assert not (tmp_path / "x").exists()


def test_hugging_face_decoder_norms_fold_exactly(tmp_path):
    """transformers' Qwen2 (RMSNorm as its modeling code writes it, q/k/v biases)."""
    import torch
    import transformers

    from edgec.exporters.sources import resolve_source

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :3] *= 40.0  # outlier channels in the stream
    model.save_pretrained(tmp_path / "qwen2")
    src = resolve_source(str(tmp_path / "qwen2"), "batch=1,seq=8")
    pm = PassManager([SmoothQuantPass(0.5, src)], check=True, feeds=src.feeds)
    pm(src.model.clone())
    stats = pm.records[0].stats
    assert stats["smoothed_norms"] == 5 and stats["readers"] == 11 and not stats["skipped"]
    assert pm.records[0].check["outputs"]["logits"]["max_rel"] <= 1e-4
