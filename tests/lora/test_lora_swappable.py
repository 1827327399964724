"""Swappable adapters: one compiled model, adapters switched at run time on ort-cpu and
openvino-cpu; each equals PEFT's merge_and_unload() model exported and run (≤ 1e-4)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import edgec
from edgec.errors import UserError
from edgec.graph_passes.lora.swappable import LoraSwappablePass, lora_sites
from edgec.lora import read_adapter
from edgec.runtimes.ort import run_model
from edgec.targets.tensorrt import optimization_profile

RTOL = 1e-4


def test_pass_adds_explicit_branches_and_unbound_is_the_base(adapter_dirs, llama_source):
    dirs, _ = adapter_dirs
    src = llama_source()
    adapters = [read_adapter(dirs["attn_mlp"]), read_adapter(dirs["patterns"])]
    result = LoraSwappablePass(adapters, src.parameter_map)(src.model)
    sites = lora_sites(result.model)
    assert result.stats["sites"] == len(sites) == 14  # union of both adapters' modules
    ranks = {s["module"]: s["rank"] for s in sites}
    assert ranks["layers.0.self_attn.q_proj"] == 8 and ranks["layers.0.mlp.gate_proj"] == 4
    # TensorRT's profile sizes the rank dims from the sites (no example input has lora.*):
    # 1 .. compiled rank (opt) .. Σ ranks (a blend of both adapters binds 4 + 8)
    profile = optimization_profile(result.model, {"input_ids": src.feeds["input_ids"].shape})
    assert profile["lora.layers.0.self_attn.q_proj.A"] == {"min": [64, 1], "opt": [64, 8],
                                                            "max": [64, 12]}
    assert profile["lora.layers.0.mlp.gate_proj.B"]["max"][0] == 4  # one adapter: its rank
    inputs = {v.name: v for v in result.model.graph.inputs}
    a = inputs["lora.layers.0.self_attn.q_proj.A"]
    assert a.shape.dims[0] == 64 and json.loads(a.metadata_props["edgec.lora"])["role"] == "A"
    branch = [n for n in result.model.graph if "edgec.lora.branch" in n.metadata_props]
    assert len(branch) == 3 * 14
    # the base weight still feeds only its own MatMul (a later quantization pass may quantize it)
    w = result.model.graph.initializers[sites[0]["initializer"]]
    assert [u.node.op_type for u in w.uses()] == ["MatMul"]
    got = run_model(result.model, src.feeds)["logits"]  # run_model binds no adapter
    np.testing.assert_array_equal(got, run_model(llama_source().model, src.feeds)["logits"])


@pytest.fixture(scope="module", params=["ort-cpu", "openvino-cpu"])
def swappable(request, adapter_dirs, tmp_path_factory):
    dirs, _ = adapter_dirs
    out = tmp_path_factory.mktemp("swap") / request.param
    art = edgec.compile("llama", target=request.param, output_dir=out, config="tiny",
                        lora=[dirs["attn_mlp"], dirs["patterns"]], lora_mode="swappable",
                        check=True)
    return art


def test_each_adapter_and_none_equal_peft(swappable, adapter_dirs, exported_outputs,
                                          lora_helpers, llama_source):
    dirs, merged = adapter_dirs
    lora = swappable.manifest["lora"]
    assert lora["adapters"] == {"attn_mlp": "adapters/attn_mlp", "patterns": "adapters/patterns"}
    assert lora["default"] == "attn_mlp"
    assert (swappable.path / "adapters/patterns/adapter_model.safetensors").is_file()
    assert swappable.report["fidelity"]["lora"]["verified_adapter"] == "attn_mlp"
    sess = edgec.load(swappable.path)
    assert sess.adapters == ["base", "attn_mlp", "patterns"]
    assert [i.name for i in sess.inputs] == ["input_ids"]
    feeds = sess.default_feeds
    for name in ("attn_mlp", "patterns", "attn_mlp"):  # switch back and forth, same session
        got = sess.run(feeds, adapter=name)["logits"]
        ref = exported_outputs(name, merged[name])["logits"]
        assert lora_helpers.max_rel(got, ref) <= RTOL, name
    base = sess.run(feeds, adapter="base")["logits"]
    assert lora_helpers.max_rel(base, llama_source().reference["logits"]) <= 1e-5
    # a new adapter at run time (no recompilation), and an all-zero (B = 0) adapter = base
    assert sess.load_adapter(dirs["zero"]) == "zero"
    np.testing.assert_allclose(sess.run(feeds, adapter="zero")["logits"], base, rtol=0, atol=0)
    sess.active_adapter = "patterns"
    ref = exported_outputs("patterns", merged["patterns"])["logits"]
    assert lora_helpers.max_rel(sess.run(feeds)["logits"], ref) <= RTOL


def test_new_adapter_with_higher_rank_and_refusals(swappable, adapter_dirs, exported_outputs,
                                                   lora_helpers, tmp_path):
    dirs, merged = adapter_dirs
    sess = edgec.load(swappable.path)
    # rslora has r=16 on o_proj/up_proj, compiled at r=4: the rank dims are dynamic
    sess.load_adapter(dirs["rslora"], name="late")
    ref = exported_outputs("rslora", merged["rslora"])["logits"]
    assert lora_helpers.max_rel(sess.run(sess.default_feeds, adapter="late")["logits"], ref) <= RTOL
    lora_helpers.make_adapter(tmp_path / "head", 0, target_modules=["lm_head"], r=2, lora_alpha=2)
    with pytest.raises(UserError, match="target module lm_head has no LoRA branch"):
        sess.load_adapter(tmp_path / "head")
    with pytest.raises(UserError, match=r"no adapter named 'nope'.*Session\.load_adapter"):
        sess.run(sess.default_feeds, adapter="nope")
    # "base" is the base model: loading an adapter under that name ran the adapter instead
    with pytest.raises(UserError, match="'base' is reserved"):
        sess.load_adapter(dirs["patterns"], name="base")
    # a name the blend syntax cannot address ("b:2" ran as adapter b at weight 2)
    shutil.copytree(dirs["zero"], tmp_path / "b:2")
    with pytest.raises(UserError, match="'b:2' holds ':' or ','.*name=.*e.g. b_2"):
        sess.load_adapter(tmp_path / "b:2")
    assert sess.load_adapter(tmp_path / "b:2", name="b2") == "b2"
    np.testing.assert_array_equal(sess.run(sess.default_feeds, adapter="base")["logits"],
                                  edgec.load(swappable.path).run(sess.default_feeds,
                                                                 adapter="base")["logits"])


def test_an_adapter_path_edited_to_leave_the_artifact_is_refused(swappable, adapter_dirs,
                                                                 tmp_path):
    """``lora.adapters.attn_mlp`` edited to ``../elsewhere`` ran an adapter outside the artifact
    (exit 0), and ``inspect --verify`` found nothing changed: no hashed file was."""
    dirs, _ = adapter_dirs
    art = tmp_path / "art"
    shutil.copytree(swappable.path, art)
    shutil.copytree(dirs["zero"], tmp_path / "elsewhere")
    manifest = json.loads((art / "manifest.json").read_text())
    for rel in ("../elsewhere", str(tmp_path / "elsewhere")):
        manifest["lora"]["adapters"]["attn_mlp"] = rel
        (art / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=r"damaged or edited artifact: lora\.adapters\."
                                            r"attn_mlp points outside it"):
            edgec.load(art)


def test_a_weighted_blend_equals_peft_weighted_merge(swappable, adapter_dirs, lora_helpers,
                                                     llama_source):
    """A blend of loaded adapters at run time (one adapter of rank Σ rᵢ, A stacked, B
    weighted): PEFT's weighted merge of the two, on both targets, with no recompilation; the
    rslora adapter loaded late has another rank on other modules."""
    from edgec.lora.reference import peft_merged_outputs

    dirs, _ = adapter_dirs
    sess = edgec.load(swappable.path)
    sess.load_adapter(dirs["rslora"])
    feeds = sess.default_feeds
    ref = peft_merged_outputs(lora_helpers.build_llama(), llama_source().feeds, ["input_ids"],
                              ["logits"], [read_adapter(dirs["attn_mlp"], weight=0.7),
                                           read_adapter(dirs["rslora"], weight=-0.5)])["logits"]
    got = sess.run(feeds, adapter={"attn_mlp": 0.7, "rslora": -0.5})["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL
    sess.active_adapter = "attn_mlp:0.7,rslora:-0.5"  # the CLI's --adapter form
    assert sess.active_adapter == {"attn_mlp": 0.7, "rslora": -0.5}
    np.testing.assert_array_equal(sess.run(feeds)["logits"], got)
    alone = sess.run(feeds, adapter={"attn_mlp": 1.0, "base": 0.3})["logits"]
    np.testing.assert_allclose(alone, sess.run(feeds, adapter="attn_mlp")["logits"], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(UserError, match="no adapter named 'nope' to blend"):
        sess.run(feeds, adapter={"attn_mlp": 0.5, "nope": 0.5})
    with pytest.raises(UserError, match="weight 'x' of 'rslora' is not a number"):
        sess.active_adapter = "attn_mlp:0.5,rslora:x"
    # the compile's rule for weights (nan ran all-NaN logits, 1e39 a numpy overflow warning),
    # and no silent loss of a repeated name or an empty entry
    for bad, match in [("attn_mlp:nan", "weight 'nan' of 'attn_mlp' is not a finite number"),
                       ("attn_mlp:-inf", "not a finite number"),
                       ({"attn_mlp": float("nan")}, "not a finite number"),
                       ("attn_mlp:1e39", "overflows float32"),
                       # float() read "1_0" as 10 and True as 1
                       ("attn_mlp:1_0", "weight '1_0' of 'attn_mlp' is not a number"),
                       ({"attn_mlp": True}, "is not a number"),
                       ("attn_mlp:0.5,attn_mlp:0.5", "names 'attn_mlp' twice"),
                       ("attn_mlp:0.5,,rslora", "has an empty entry"),
                       ("attn_mlp,", "has an empty entry")]:
        with pytest.raises(UserError, match=match):
            sess.run(feeds, adapter=bad)
        with pytest.raises(UserError, match=match):
            sess.active_adapter = bad
    assert sess.active_adapter == {"attn_mlp": 0.7, "rslora": -0.5}


def test_a_blend_overflowing_float32_is_one_line_not_a_numpy_warning(adapter_dirs):
    from edgec.lora.binding import blended

    dirs, _ = adapter_dirs
    loud = read_adapter(dirs["attn_mlp"], weight=10.0)  # each weight fits float32, w·s·B not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match="lora_B overflows float32; give smaller weights"):
            blended([(loud, 3e38)])


def test_merged_artifact_has_no_adapters(tmp_path, adapter_dirs):
    dirs, _ = adapter_dirs
    art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "m", config="tiny",
                        lora=dirs["attn_mlp"])
    assert art.manifest["lora"]["mode"] == "merge"
    assert "peft merge_and_unload" in art.report["fidelity"]["lora"]["reference"]
    sess = edgec.load(art.path)
    assert sess.adapters == []
    with pytest.raises(UserError, match="no swappable LoRA adapters"):
        sess.run(sess.default_feeds, adapter="attn_mlp")
