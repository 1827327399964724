"""Reading PEFT adapters: scaling per module as PEFT computes it, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgec.errors import UserError
from edgec.graph_passes.lora.merge import LoraMergePass
from edgec.lora import parse_lora_option, read_adapter
from edgec.models.llama import Llama, LlamaConfig


def _peft_layers(module, adapter_dir, name):
    """PEFT's own scaling/r per module, from a freshly loaded PeftModel."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(module, str(adapter_dir), adapter_name=name)
    return {n.removeprefix("base_model.model."): (m.r[name], m.scaling[name])
            for n, m in model.named_modules() if hasattr(m, "scaling") and name in m.scaling}


@pytest.mark.parametrize("name", ["attn_mlp", "patterns", "rslora"])
def test_rank_and_scaling_match_peft(adapter_dirs, lora_helpers, name):
    dirs, _ = adapter_dirs
    adapter = read_adapter(dirs[name])
    expected = _peft_layers(lora_helpers.build_llama(), dirs[name], name)
    assert set(adapter.modules) == set(expected)
    for mod, lm in adapter.modules.items():
        assert (lm.rank, pytest.approx(lm.scaling, rel=1e-12)) == expected[mod], mod
    if name == "patterns":  # rank_pattern / alpha_pattern really differ per module
        assert {m.rank for m in adapter.modules.values()} == {4, 8}
        assert {m.scaling for m in adapter.modules.values()} == {2.0, 16 / 4, 3 / 8}


def test_delta_equals_peft_get_delta_weight(adapter_dirs, lora_helpers):
    from peft import PeftModel

    dirs, _ = adapter_dirs
    adapter = read_adapter(dirs["rslora"])
    model = PeftModel.from_pretrained(lora_helpers.build_llama(), str(dirs["rslora"]),
                                      adapter_name="x")
    layer = model.base_model.model.layers[1].mlp.up_proj
    ref = layer.get_delta_weight("x").detach().numpy()
    np.testing.assert_allclose(adapter.modules["layers.1.mlp.up_proj"].delta(), ref,
                               rtol=1e-5, atol=1e-7)


def test_a_weights_file_reads_with_its_config_and_round_trips(adapter_dirs, tmp_path):
    """A PEFT directory's ``adapter_model.safetensors`` named alone reads with the config beside
    it (read as a loose diffusers-style file its scales would be 1); a loose file without one
    takes diffusers' convention; ``write_peft_adapter`` writes what reads back the same."""
    from edgec.lora import write_peft_adapter

    dirs, _ = adapter_dirs
    adapter = read_adapter(dirs["patterns"] / "adapter_model.safetensors")
    want = read_adapter(dirs["patterns"])
    assert adapter.format == "peft" and adapter.name == "patterns"
    assert {m: lm.scaling for m, lm in adapter.modules.items()} == {
        m: lm.scaling for m, lm in want.modules.items()} and adapter.modules
    loose = shutil.copy(dirs["patterns"] / "adapter_model.safetensors", tmp_path / "x.safetensors")
    loose = read_adapter(loose)
    assert loose.format == "diffusers" and {m.scaling for m in loose.modules.values()} == {1.0}
    back = read_adapter(write_peft_adapter(want, tmp_path / "written"))
    for m, lm in want.modules.items():
        np.testing.assert_array_equal(back.modules[m].delta(), lm.delta())


def test_parse_lora_option(tmp_path):
    assert parse_lora_option(None) == []
    assert parse_lora_option("a") == [("a", 1.0)]
    assert parse_lora_option(["a:0.5", ("b", 2)]) == [("a", 0.5), ("b", 2.0)]
    assert parse_lora_option({"a": 0.3}) == [("a", 0.3)]
    odd = tmp_path / "x:1"
    odd.mkdir()
    assert parse_lora_option(str(odd)) == [(str(odd), 1.0)]  # an existing path wins
    # weights that are no finite number: one line each (nan merged NaN logits; "abc" read as
    # part of the path and said "adapter not found"; a dict's raw ValueError)
    for bad in (f"{tmp_path}:abc", f"{tmp_path}:nan", f"{tmp_path}:inf", {"a": "abc"},
                [("a", None)], [None]):
        with pytest.raises(UserError, match="not a (finite )?number|give an adapter path"):
            parse_lora_option(bad)
    # beyond float32 the fp32 merge made inf weights (the run-time blend's rule too)
    with pytest.raises(UserError, match="weight '1e39' overflows float32"):
        parse_lora_option(f"{tmp_path}:1e39")
    # the same adapter twice was merged twice (summed), however its path was spelled
    with pytest.raises(UserError, match="are the same adapter; give it once"):
        parse_lora_option([f"{odd}:0.5", f"{tmp_path}/./x:1:0.5"])


def test_an_adapter_is_named_by_its_resolved_directory(adapter_dirs, monkeypatch):
    """`--lora .` was named '' (a swappable artifact then failed after the export)."""
    dirs, _ = adapter_dirs
    monkeypatch.chdir(dirs["zero"])
    assert read_adapter(".").name == "zero"
    assert read_adapter("adapter_model.safetensors").name == "zero"


def test_a_named_adapter_subdirectory_is_pointed_to(adapter_dirs, tmp_path):
    """PEFT's save_pretrained of an adapter not named "default" writes DIR/<name>/...: the
    message said only "give a PEFT adapter directory"."""
    dirs, _ = adapter_dirs
    shutil.copytree(dirs["zero"], tmp_path / "saved" / "style")
    with pytest.raises(UserError, match=r"saved: no adapter_model.safetensors; give "
                                        r"\S*saved/style \(PEFT saves"):
        read_adapter(tmp_path / "saved")


def test_an_adapter_without_lora_tensors_is_refused(adapter_dirs, tmp_path):
    from safetensors.numpy import save_file

    dirs, _ = adapter_dirs
    empty = _copy(dirs["zero"], tmp_path / "empty")
    save_file({}, str(empty / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="holds no LoRA tensors"):
        read_adapter(empty)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_pickles_missing_files_and_unsupported_kinds(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    pickled = _copy(dirs["zero"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        read_adapter(pickled)
    with pytest.raises(UserError, match="not found"):
        read_adapter(tmp_path / "nope")
    dora = _copy(dirs["zero"], tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="no lora_magnitude_vector, but the adapter is DoRA"):
        read_adapter(dora)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_qalora": True}))
    with pytest.raises(UserError, match="QALoRA adapters .* not supported"):
        read_adapter(dora)
    # aLoRA acts after its invocation tokens only: merged, it ran on every token (exit 0)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg,
                                                          "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(UserError, match=r"aLoRA \(activated LoRA\) adapters .* not supported"):
        read_adapter(dora)
    # layer_replication (a model of another depth) was merged as a plain LoRA, silently
    (dora / "adapter_config.json").write_text(json.dumps({**cfg,
                                                          "layer_replication": [[0, 1], [0, 1]]}))
    with pytest.raises(UserError, match="layer_replication .* not supported yet; use an adapter "
                                        "trained without it"):
        read_adapter(dora)


@pytest.mark.parametrize("option, match", [
    ({"bias": "lora_only"}, "PEFT's bias='lora_only' .* not supported yet; merge it in PEFT"),
    ({"bias": "all"}, "PEFT's bias='all' .* not supported yet; merge it in PEFT"),
    ({"target_modules": [], "target_parameters": ["self_attn.q_proj.weight"]},
     r"target_parameters \(LoRA on bare parameters.* not supported yet; merge it in PEFT"),
    # its embed_tokens.token_adapter.trainable_tokens_delta read as "not a LoRA A/B weight"
    ({"trainable_token_indices": [3, 5, 7]},
     r"trainable_token_indices \(embedding rows .* not supported yet; merge it in PEFT "
     r"\(merge_and_unload\), save the merged model and compile that$")])
def test_peft_options_edgec_does_not_merge_are_named(adapter_dirs, tmp_path, option, match):
    """bias="lora_only" read as "a resized vocabulary?", bias="all" as "not a LoRA A/B weight",
    target_parameters as "target_modules [] does not name it; the adapter is inconsistent",
    trainable_token_indices as "not a LoRA A/B weight"."""
    dirs, _ = adapter_dirs
    path = _copy(dirs["zero"], tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, **option}))
    with pytest.raises(UserError, match=match):
        read_adapter(path)


def test_rank_mismatch_names_the_module(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    bad = _copy(dirs["attn_mlp"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(UserError, match=r"module layers\.0\.mlp\.down_proj has rank 4 .* r=2"):
        read_adapter(bad)


def test_wrong_base_and_unknown_module_are_refused(llama_source, lora_helpers, tmp_path):
    make_adapter = lora_helpers.make_adapter
    src = llama_source()
    other = Llama(LlamaConfig(vocab=256, dim=32, layers=2, heads=4, kv_heads=2, ffn=86, seq=16))
    make_adapter(tmp_path / "wrong", 0, module=other, target_modules=["q_proj"], r=2, lora_alpha=2)
    with pytest.raises(UserError) as e:
        LoraMergePass([read_adapter(tmp_path / "wrong")], src.parameter_map)(src.model)
    msg = str(e.value)
    assert "\n" not in msg and "layers.0.self_attn.q_proj" in msg and "different base" in msg

    class Extra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extra_proj = torch.nn.Linear(64, 64, bias=False)

    make_adapter(tmp_path / "extra", 0, module=Extra(), target_modules=["extra_proj"], r=2,
                 lora_alpha=2)
    with pytest.raises(UserError, match="target module extra_proj is not in the model"):
        LoraMergePass([read_adapter(tmp_path / "extra")], src.parameter_map)(src.model)


def test_a_conv_folded_with_its_batchnorm_is_refused_with_the_reason(lora_helpers, tmp_path):
    """The export fuses a Conv with the BatchNorm after it (W·γ/√(σ²+ε) under the Conv's name),
    so its weight is not in the parameter map: the refusal said "not in the model"."""
    from edgec.exporters.torch_export import export_module

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.c2 = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c2(torch.relu(self.bn(self.c1(x))))

    net = Net().eval()
    src = export_module(net, (torch.randn(1, 3, 8, 8),))
    lora_helpers.make_adapter(tmp_path / "ad", 0, module=Net().eval(), target_modules=["c1"],
                              r=2, lora_alpha=2)
    with pytest.raises(UserError, match="module c1's weight was folded with the BatchNorm after "
                       "it by the export.*merge_and_unload"):
        LoraMergePass([read_adapter(tmp_path / "ad")], src.parameter_map)(src.model)
