"""LoRA on Conv layers (a DiT's or ViT's patch embedding, a motion model's Conv1d): PEFT stores
lora_A as a Conv with the base's kernel and lora_B as a 1×1 Conv; the merge folds B·A over the
flattened kernel into the [out, in, *kernel] weight, held to PEFT's ``merge_and_unload()`` by the
compile's own check (plain and DoRA); swappable, each gets a Conv branch. What a merge cannot
be (a grouped Conv PEFT cannot merge either, a kernel that is not the base's) is refused in
one line."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import edgec
from edgec.errors import UserError
from edgec.lora import read_adapter

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    """Conv1d (kernel 3, padded), a strided 3×3 Conv2d, a 1×1 Conv2d and a grouped one."""

    def __init__(self):
        super().__init__()
        self.temporal = nn.Conv1d(4, 6, 3, padding=1)
        self.patch = nn.Conv2d(6, 8, 3, stride=2)
        self.point = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):  # x [B, 4, 16]
        y = torch.relu(self.temporal(x))  # [B, 6, 16]
        y = self.patch(y.reshape(y.shape[0], 6, 4, 4).repeat(1, 1, 2, 2))  # [B, 8, 3, 3]
        y = self.grouped(torch.relu(self.point(y)))
        return self.head(y.mean(dim=(2, 3)))


def _save(model, path):
    with warnings.catch_warnings():  # PEFT's notes about a module that is not transformers'
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))


def _adapter(module, path, seed: int, dora: bool = False, **config):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(module), peft.LoraConfig(
        init_lora_weights=False, use_dora=dora, **config))
    if dora:  # a magnitude that is not ‖W + ΔW‖, so the test sees m
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    _save(model, path)
    return model


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval(), (torch.randn(2, 4, 16),)


def _compiled(module, inputs, lora, out, target="ort-cpu", **kw):
    art = edgec.compile(module, target=target, output_dir=out, example_inputs=inputs,
                        lora=lora if isinstance(lora, list) else str(lora), **kw)
    fid = art.report["fidelity"]
    assert fid["lora"]["reference"].startswith("peft merge_and_unload")
    assert all(e["max_rel"] <= 1e-5 for e in fid["target_vs_source"]["outputs"].values())
    (stats,) = [p["stats"] for p in art.report["passes"] if p["name"].startswith("lora")]
    return art, stats


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv_adapters_merge_as_peft_merges_them(convnet, tmp_path, dora):
    module, inputs = convnet
    _adapter(module, tmp_path / "a", 1, dora, target_modules=["temporal", "patch", "point",
                                                            "head"], r=2, lora_alpha=4)
    adapter = read_adapter(tmp_path / "a")
    assert {m: lm.kernel for m, lm in adapter.modules.items()} == {
        "temporal": (3,), "patch": (3, 3), "point": (1, 1), "head": ()}
    art, stats = _compiled(module, inputs, tmp_path / "a", tmp_path / "o")
    assert stats["modules_merged"] == 4 and stats["dora_modules"] == (4 if dora else 0)
    # the adapter is no rounding: the merged artifact computes another model than the base
    base = module(*inputs).detach().numpy()
    got = art.load().run({"x": inputs[0].numpy()})["output"]
    assert np.abs(got - base).max() > 1e-2 * np.abs(base).max()


def test_conv_adapters_on_a_transformers_vit(tmp_path):
    """The patch embedding of a transformers ViT (Conv2d ``projection``) beside its attention."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64)
    module = transformers.ViTModel(config, add_pooling_layer=False).eval()
    _adapter(module, tmp_path / "a", 2, target_modules=["projection", "q_proj"], r=4,
             lora_alpha=8)
    _, stats = _compiled(module, (torch.randn(1, 3, 16, 16),), tmp_path / "a", tmp_path / "o")
    assert stats["by_module_kind"] == {"projection": 1, "q_proj": 1}


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_conv_adapters_swap_at_run_time(convnet, tmp_path, target):
    """Swappable Conv branches Conv(Conv(x, A), B) (rank fixed: OpenVINO's CPU Convolution
    takes no dynamic weight shape) and a Gemm site (the Linear head on 2-D inputs): swapping
    to the second adapter computes what compiling it merged does; a higher rank than compiled
    is refused on a Conv site."""
    module, inputs = convnet
    feeds = {"x": inputs[0].numpy()}
    for i in range(2):
        _adapter(module, tmp_path / f"s{i}", 10 + i, target_modules=["temporal", "patch",
                                                                    "point", "head"],
                 r=2 + i, lora_alpha=4)
    art, stats = _compiled(module, inputs, [str(tmp_path / "s0"), str(tmp_path / "s1")],
                           tmp_path / "o", target=target, lora_mode="swappable")
    assert stats["sites"] == 4
    merged, _ = _compiled(module, inputs, tmp_path / "s1", tmp_path / "m")
    session = art.load()
    got, want = session.run(feeds, adapter="s1")["output"], merged.load().run(feeds)["output"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    base = session.run(feeds, adapter="base")["output"]
    np.testing.assert_allclose(base, module(*inputs).detach().numpy(), rtol=1e-5, atol=1e-6)
    # a blend of both fits the Conv sites (compiled at the sum of their ranks: 2 + 3)
    mix, _ = _compiled(module, inputs, [f"{tmp_path / 's0'}:0.7", f"{tmp_path / 's1'}:0.3"],
                       tmp_path / "mix")
    got = session.run(feeds, adapter={"s0": 0.7, "s1": 0.3})["output"]
    want = mix.load().run(feeds)["output"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    if target == "ort-cpu":
        _adapter(module, tmp_path / "big", 12, target_modules=["patch"], r=6, lora_alpha=4)
        with pytest.raises(UserError, match="rank 6, over the rank 5 its Conv branch"):
            session.load_adapter(tmp_path / "big")


def test_conv_adapters_are_refused_where_a_merge_cannot_be_them(convnet, tmp_path):
    module, inputs = convnet
    _adapter(module, tmp_path / "a", 3, target_modules=["patch"], r=2, lora_alpha=2)
    with warnings.catch_warnings():  # PEFT: "Merging is not supported" for groups > 1
        warnings.simplefilter("ignore")
        _adapter(module, tmp_path / "g", 4, target_modules=["grouped"], r=2, lora_alpha=2)
    with pytest.raises(UserError, match="grouped Conv's LoRA.*PEFT cannot merge"):
        read_adapter(tmp_path / "g")
    # a kernel that is not the base's: another base model
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = np.ascontiguousarray(tensors[key][:, :, :2, :2])
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"expects a \[8, 6, 2, 2\] weight \(out, in, \*kernel\)"
                                        r" but the model's is \[8, 6, 3, 3\]"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "k",
                      example_inputs=inputs, lora=str(tmp_path / "a"))
    assert not (tmp_path / "k").exists()


def test_a_peft_model_compiles_with_its_conv_and_gemm_branches_folded(convnet, tmp_path):
    """A ``PeftModel`` in hand is a source too (its ``forward(*args, **kwargs)`` named no
    inputs: refused before); its Conv and Gemm LoRA branches fold into the base weights as its
    MatMul ones always did (they stayed in the graph, two extra Convs per site)."""
    module, inputs = convnet
    model = _adapter(module, tmp_path / "a", 5, target_modules=["temporal", "patch", "point",
                                                               "head"], r=2, lora_alpha=4)
    art = edgec.compile(model.eval(), target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=inputs, check=True)
    (fold,) = [p for p in art.report["passes"] if p["name"] == "lora-fold"]
    assert fold["stats"]["branches_folded"] == 4 and fold["check"]["exact"]
    assert art.report["graph"]["ops"]["Conv"] == 4 and "Mul" not in art.report["graph"]["ops"]
    want = model(*inputs).detach().numpy()
    got = art.load().run({"x": inputs[0].numpy()})["output"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(want - module(*inputs).detach().numpy()).max() > 1e-2 * np.abs(want).max()


def test_swappable_adapters_reach_the_samplers_dense_graph(tmp_path):
    """--lora-mode swappable with scheduled sparse attention (dense_steps): the dense companion
    graph carries the branches too; its verification ran without the adapter inputs bound
    (refused as the user's missing inputs) and the sampler's dense steps could not run."""
    from edgec.models import registry

    module = registry.get("video-dit").build("tiny")
    _adapter(module, tmp_path / "a", 7, target_modules=["patch_embed", "fc1"], r=2,
             lora_alpha=4)
    art = edgec.compile("video-dit", config="tiny", target="ort-cpu", output_dir=tmp_path / "o",
                        lora=str(tmp_path / "a"), lora_mode="swappable",
                        sparse_attention="keep=0.5,block=16,min_seq=0,dense_steps=2")
    assert art.report["fidelity"]["lora"]["verified_adapter"] == "a"
    sparse = next(p for p in art.report["passes"] if p["name"] == "sparse-attention")
    assert sparse["modified"]  # the main graph is sparse, the dense one beside it
    session = edgec.load(art.path)
    with_adapter = session.sample(steps=3, seed=0)
    assert session.last_sampling["dense_steps"] == 2
    assert session.dense_session.adapters == session.adapters == ["base", "a"]
    session.active_adapter = "base"
    base = session.sample(steps=3, seed=0)
    name = next(iter(base))
    assert np.abs(with_adapter[name] - base[name]).max() > 1e-3
    # the CLI's sample takes the adapter too (only run and bench had --adapter)
    from typer.testing import CliRunner

    from edgec.cli import app

    r = CliRunner().invoke(app, ["sample", str(art.path), "--steps", "3", "--adapter", "base",
                                 "--save", str(tmp_path / "s.npz"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["adapter"] == "base"  # --json did not say which ran
    with np.load(tmp_path / "s.npz") as saved:
        np.testing.assert_array_equal(saved[name], base[name])
