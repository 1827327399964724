"""PEFT's LoRA variants merge as PEFT merges them, held to its own ``merge_and_unload()``: DoRA
(``use_dora``: W' = m/‖W + ΔW‖·(W + ΔW) per output channel) on llama tiny and a transformers
Llama, ``lora_bias`` on a transformers BERT, embedding adapters on llama tiny. Where one cannot
be what it is (a swappable branch, LoSA's mask, a weight, another adapter on a DoRA module, a
layer without a bias) it is refused in one line."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import edgec
from edgec.errors import UserError
from edgec.graph_passes.lora.merge import LoraMergePass
from edgec.lora import read_adapter
from edgec.runtimes.ort import run_model

peft = pytest.importorskip("peft")
RTOL = 1e-4


def _peft(module, seed: int, **config):
    """PEFT's LoRA model of a copy of ``module`` with B ≠ 0 (``init_lora_weights=False``)."""
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(module),
                               peft.LoraConfig(init_lora_weights=False, **config))


def _dora(path, module, seed, **config):
    """A DoRA adapter with B ≠ 0 and a magnitude that is not ‖W + ΔW‖ (PEFT initializes it to
    that, which would make the DoRA merge a plain LoRA merge and this test blind to m)."""
    model = _peft(module, seed, use_dora=True, **config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return model.merge_and_unload()


@pytest.fixture(scope="module")
def dora_dir(tmp_path_factory, lora_helpers, exported_outputs):
    root = tmp_path_factory.mktemp("dora")
    merged = _dora(root / "d", lora_helpers.build_llama(), 7,
                   target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    return root / "d", exported_outputs("dora", merged)["logits"]


def test_dora_merge_equals_peft_merge_and_unload(dora_dir, llama_source, lora_helpers):
    path, ref = dora_dir
    adapter = read_adapter(path)
    assert adapter.dora and all(m.magnitude is not None for m in adapter.modules.values())
    src = llama_source()
    result = LoraMergePass([adapter], src.parameter_map)(src.model)
    assert result.stats["dora_modules"] == 6 == result.stats["modules_merged"]
    got = run_model(result.model, src.feeds)["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL
    # the magnitude matters: the same A/B merged as plain LoRA is another model
    for m in adapter.modules.values():
        m.magnitude = None
    src = llama_source()
    plain = run_model(LoraMergePass([adapter], src.parameter_map)(src.model).model,
                      src.feeds)["logits"]
    assert lora_helpers.max_rel(plain, ref) > 100 * RTOL


def _tiny_llama(seed: int, **config):
    """A one-layer transformers LlamaForCausalLM (hidden 32, GQA 2/1), random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, **config)
    return transformers.LlamaForCausalLM(config).eval()


def test_dora_on_a_transformers_module_is_held_to_peft(tmp_path):
    """The compile's own LoRA reference (PEFT's merge of the module) holds the DoRA merge."""
    module = _tiny_llama(0, use_cache=False)
    _dora(tmp_path / "a", copy.deepcopy(module), 3, target_modules=["q_proj", "up_proj"], r=2,
          lora_alpha=4)
    ids = torch.randint(0, 64, (1, 8))
    art = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=(ids,), lora=str(tmp_path / "a"))
    fid = art.report["fidelity"]
    assert fid["lora"]["reference"] == "peft merge_and_unload (a)"
    assert all(e["max_rel"] <= 1e-5 for e in fid["target_vs_source"]["outputs"].values())
    (lora,) = [p["stats"] for p in art.report["passes"] if p["name"] == "lora-merge"]
    assert lora["dora_modules"] == 2 and lora["adapters"][0]["dora"]


def test_dora_is_refused_where_it_cannot_be_what_it_is(dora_dir, adapter_dirs, llama_source,
                                                       tmp_path):
    path, _ = dora_dir
    src = llama_source()
    with pytest.raises(UserError, match="DoRA.*cannot be scaled by a weight"):
        LoraMergePass([read_adapter(path, weight=0.5)], src.parameter_map)(src.model)
    with pytest.raises(UserError, match="sparse-merge.*--lora-mode merge"):
        LoraMergePass([read_adapter(path)], src.parameter_map, sparse=True)(src.model)
    dirs, _ = adapter_dirs  # "patterns" adapts q_proj too
    with pytest.raises(UserError, match="DoRA adapter and another one"):
        LoraMergePass([read_adapter(path), read_adapter(dirs["patterns"])],
                      src.parameter_map)(src.model)
    with pytest.raises(UserError, match="swappable branch cannot carry"):
        edgec.compile("llama", target="ort-cpu", config="tiny", output_dir=tmp_path / "s",
                      lora=[str(path)], lora_mode="swappable")
    assert not (tmp_path / "s").exists()
    bad = shutil.copytree(path, tmp_path / "bad")  # use_dora without its magnitudes
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(UserError, match="magnitude_vector, but use_dora is not set"):
        read_adapter(bad)


def test_a_dora_adapter_is_not_bound_to_a_swappable_artifact(dora_dir, adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    art = edgec.compile("llama", target="ort-cpu", config="tiny", output_dir=tmp_path / "o",
                        lora=[str(dirs["patterns"])], lora_mode="swappable")
    with pytest.raises(UserError, match="DoRA.*--lora-mode merge"):
        art.load().load_adapter(dora_dir[0])
    assert np.isfinite(art.load().run(art.load().default_feeds)["logits"]).all()


def _held_to_peft(module, inputs, tmp_path):
    """``module`` compiled with the adapter in ``tmp_path/a``, its outputs within 1e-5 of
    PEFT's merge (the compile's LoRA reference); the artifact and the merge's stats."""
    art = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=inputs, lora=str(tmp_path / "a"))
    outputs = art.report["fidelity"]["target_vs_source"]["outputs"]
    assert all(e["max_rel"] <= 1e-5 for e in outputs.values())
    (stats,) = [p["stats"] for p in art.report["passes"] if p["name"] == "lora-merge"]
    return art, stats


def _max_difference(module, inputs, adapter, art) -> float:
    """How far ``adapter`` merged into ``module``'s export computes from ``art``."""
    from edgec.exporters.sources import resolve_source

    src = resolve_source(module, None, inputs, None)
    got = run_model(LoraMergePass([adapter], src.parameter_map)(src.model).model, src.feeds)
    want = art.load().run(art.load().default_feeds)
    return max(float(np.abs(got[k] - want[k]).max()) for k in got)


@pytest.fixture(scope="module")
def bert_with_biases():
    """A transformers BERT whose biases differ (all-zero biases at init are one initializer
    after the exporter's deduplication, which no merge may change alone)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)
    module = transformers.BertModel(config).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, 64, (1, 8))
    return module, (ids, torch.ones_like(ids))


def test_lora_bias_merges_into_the_layers_bias_as_peft_does(bert_with_biases, tmp_path):
    """``lora_bias``: lora_B's bias times the scaling is added to the base layer's bias, held to
    PEFT's merge by the compile's own LoRA reference."""
    module, inputs = bert_with_biases
    pm = _peft(module, 4, lora_bias=True, r=2, lora_alpha=4, target_modules=["query", "value"])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.5)  # PEFT starts them at zero
    with warnings.catch_warnings():  # PEFT takes a 1-D lora_B bias for an unsharded tensor
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "a"))
    adapter = read_adapter(tmp_path / "a")
    assert adapter.has_bias and not adapter.dora
    art, stats = _held_to_peft(module, inputs, tmp_path)
    assert stats["biases_changed"] == 2 and stats["dora_modules"] == 0
    for m in adapter.modules.values():  # the bias matters: without it, another model
        m.bias = None
    assert _max_difference(module, inputs, adapter, art) > 1e-3
    with pytest.raises(UserError, match="lora_bias.*--lora-mode merge"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "s", example_inputs=inputs,
                      lora=str(tmp_path / "a"), lora_mode="swappable")


def test_lora_bias_needs_a_bias_to_merge_into(tmp_path, llama_source, lora_helpers):
    """llama's projections have no bias: PEFT refuses that merge, and so does edgec."""
    lora_helpers.make_adapter(tmp_path / "a", 1, target_modules=["q_proj"], r=2, lora_alpha=2)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for k in list(tensors):
        if "lora_B" in k:
            tensors[k.replace(".weight", ".bias")] = np.ones(tensors[k].shape[0], np.float32)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    src = llama_source()
    with pytest.raises(UserError, match="has no bias to merge it into"):
        LoraMergePass([read_adapter(tmp_path / "a")], src.parameter_map)(src.model)


def test_an_embedding_adapter_merges_into_the_table(tmp_path, llama_source, exported_outputs,
                                                    lora_helpers):
    """``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r]: ΔW = (B·A)ᵀ·s added to
    the Gather's table, as PEFT merges it; swappable refuses it (a lookup is no x·A·B)."""
    merged = lora_helpers.make_adapter(tmp_path / "e", 9, target_modules=["embed_tokens",
                                                                           "q_proj"],
                                       r=4, lora_alpha=8).merge_and_unload()
    adapter = read_adapter(tmp_path / "e")
    assert adapter.modules["embed_tokens"].embedding
    src = llama_source()
    result = LoraMergePass([adapter], src.parameter_map)(src.model)
    assert result.stats["by_module_kind"] == {"embed_tokens": 1, "q_proj": 2}
    got = run_model(result.model, src.feeds)["logits"]
    ref = exported_outputs("embedding", merged)["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL
    assert lora_helpers.max_rel(src.reference["logits"], ref) > 100 * RTOL
    # weighted: PEFT's reference scaled lora_B but not lora_embedding_B (a ParameterDict entry),
    # so every weighted embedding adapter failed its check while the merge was right
    from edgec.lora.reference import peft_merged_outputs
    from edgec.models import registry

    half = read_adapter(tmp_path / "e", weight=0.5)
    got = run_model(LoraMergePass([half], src.parameter_map)(llama_source().model).model,
                    src.feeds)["logits"]
    module = registry.get("llama").build("tiny")
    ref = peft_merged_outputs(module, src.feeds, list(src.feeds), ["logits"], [half])["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL
    with pytest.raises(UserError, match="embedding embed_tokens.*--lora-mode merge"):
        edgec.compile("llama", target="ort-cpu", config="tiny", output_dir=tmp_path / "s",
                      lora=[str(tmp_path / "e")], lora_mode="swappable")


def _classifier_adapter(module, seed: int, targets, path) -> None:
    """A SEQ_CLS LoRA on ``module`` (biases drawn first: as trained, an all-zero bias is folded
    away at export) whose saved head differs from the base's, saved at ``path``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    pm = _peft(module, seed, task_type="SEQ_CLS", target_modules=targets, r=2, lora_alpha=4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(path))


def test_modules_to_save_replace_the_models_parameters(tmp_path):
    """A sequence-classification LoRA saves its trained head whole (``modules_to_save``:
    ``classifier.weight``/``.bias``): merging replaces the model's, as PEFT's merge does."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    module = transformers.BertForSequenceClassification(config).eval()
    _classifier_adapter(module, 0, ["query", "value"], tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.saved) == ["classifier.bias", "classifier.weight"]
    ids = torch.randint(0, 64, (1, 8))
    inputs = (ids, torch.ones_like(ids))
    art, stats = _held_to_peft(module, inputs, tmp_path)
    assert stats["parameters_replaced"] == 2 and stats["modules_merged"] == 2
    adapter.saved.clear()  # LoRA alone, the base head: another model
    assert _max_difference(module, inputs, adapter, art) > 1e-2
    with pytest.raises(UserError, match="modules_to_save.*--lora-mode merge"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "s", example_inputs=inputs,
                      lora=str(tmp_path / "a"), lora_mode="swappable")
    with pytest.raises(UserError, match="replaces classifier.* cannot scale"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "w", example_inputs=inputs,
                      lora=f"{tmp_path / 'a'}:0.5")
    assert not (tmp_path / "s").exists() and not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A transformers LlamaForCausalLM with tied embeddings saved as a checkpoint directory."""
    model = _tiny_llama(1, tie_word_embeddings=True)
    root = tmp_path_factory.mktemp("tied")
    model.save_pretrained(root / "ckpt", safe_serialization=True)
    return root / "ckpt", model


@pytest.mark.filterwarnings("ignore:.*tie_word_embeddings")  # PEFT's note on tied adapters
@pytest.mark.parametrize("generate", [False, True])
def test_a_checkpoint_source_is_held_to_peft_with_its_tied_embedding(tied_checkpoint, tmp_path,
                                                                     generate):
    """A checkpoint directory (not only an nn.Module) is held to PEFT's merge of the model
    loaded from it, in the KV-cache decoder too; a LoRA on a tied embedding merges into the one
    table the LM head also reads, as PEFT's merge changes the one tied parameter (the parameter
    map records the tie; an initializer shared by equal but untied weights is still refused)."""
    from edgec.exporters.sources import resolve_source

    path, model = tied_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft(model, 2, use_dora=True, r=2, lora_alpha=4,
              target_modules=["q_proj", "down_proj"]).save_pretrained(str(tmp_path / "dora"))
        _peft(model, 2, r=2, lora_alpha=4,
              target_modules=["embed_tokens"]).save_pretrained(str(tmp_path / "emb"))
    src = resolve_source(str(path), "batch=1,seq=8", None, None)
    assert src.parameter_map["lm_head.weight"]["tied"] == ["model.embed_tokens.weight"]
    for name in ("dora", "emb"):
        art = edgec.compile(str(path), target="ort-cpu", config="batch=1,seq=8",
                            output_dir=tmp_path / f"o-{name}", lora=str(tmp_path / name),
                            generate=generate)
        fid = art.report["fidelity"]
        assert fid["lora"]["reference"] == f"peft merge_and_unload ({name})"
        assert all(e["max_rel"] <= 1e-5 for e in fid["target_vs_source"]["outputs"].values())


def test_modules_to_save_match_as_peft_matches_them(tmp_path):
    """PEFT saves every module whose name ends with a ``modules_to_save`` entry: DistilBERT's
    SEQ_CLS task saves ``classifier`` and, by that rule, ``pre_classifier`` (refused as "not a
    LoRA A/B weight" before); both replace the model's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                           hidden_dim=64, num_labels=3,
                                           max_position_embeddings=16)
    module = transformers.DistilBertForSequenceClassification(config).eval()
    _classifier_adapter(module, 1, ["q_lin", "v_lin"], tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.saved) == ["classifier.bias", "classifier.weight",
                                     "pre_classifier.bias", "pre_classifier.weight"]
    ids = torch.randint(0, 64, (1, 8))
    _, stats = _held_to_peft(module, (ids, torch.ones_like(ids)), tmp_path)
    assert stats["parameters_replaced"] == 4


@pytest.mark.parametrize("saved", ["lm_head", "embed_tokens"])
def test_modules_to_save_on_a_tied_table_replace_that_module_alone(saved, tmp_path,
                                                                   lora_helpers):
    """On a tied model PEFT's modules_to_save copy unties: the saved head (or embedding)
    replaces that module alone, the other keeps the base's table. The export holds both in one
    initializer; writing the saved one there changed the other too (logits 0.05 off PEFT's
    merge, silent). The saved one now gets an initializer of its own."""
    from edgec.exporters.sources import resolve_source
    from edgec.models import registry

    src = resolve_source("llama", "tiny+tied")
    tied = src.parameter_map["lm_head.weight"]
    assert tied["initializer"] == src.parameter_map["embed_tokens.weight"]["initializer"]
    pm = _peft(registry.get("llama").build("tiny+tied"), 5, target_modules=["q_proj"],
               modules_to_save=[saved], r=2, lora_alpha=4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "a"))
    with torch.no_grad():
        ref = pm.merge_and_unload()(torch.from_numpy(src.feeds["input_ids"])).numpy()
    result = LoraMergePass([read_adapter(tmp_path / "a")], src.parameter_map)(src.model)
    assert result.stats["parameters_replaced"] == 1
    got = run_model(result.model, src.feeds)["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL


def test_a_swappable_lora_on_a_tied_head_is_refused_by_name(tmp_path):
    """PEFT's merge writes a tied head's ΔW into the one table the embedding reads too; a
    swappable branch adds it at the head alone, so the compile failed its check against PEFT
    (cosine 0.86) with nothing saying why. Refused before any branch is built."""
    from edgec.exporters.sources import resolve_source
    from edgec.graph_passes.lora.swappable import LoraSwappablePass
    from edgec.models import registry

    src = resolve_source("llama", "tiny+tied")
    pm = _peft(registry.get("llama").build("tiny+tied"), 6, target_modules=["q_proj", "lm_head"],
               r=2, lora_alpha=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(UserError, match=r"lm_head is tied to embed_tokens.*--lora-mode merge"):
        LoraSwappablePass([read_adapter(tmp_path / "a")], src.parameter_map)(src.model)
