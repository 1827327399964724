"""A transformers module (forward returns a ModelOutput) as an nn.Module source with LoRA."""

from __future__ import annotations

import pytest
import torch

import edgec

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_module():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)
    module = transformers.BertModel(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    return module, (ids, torch.ones_like(ids))


def test_lora_merge_on_a_model_output_module_is_held_to_peft(bert_module, tmp_path,
                                                             lora_helpers):
    module, inputs = bert_module
    import copy

    lora_helpers.make_adapter(tmp_path / "a", 5, module=copy.deepcopy(module),
                              target_modules=["query", "value"], r=2, lora_alpha=4)
    art = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=inputs, lora=str(tmp_path / "a"))
    fid = art.report["fidelity"]
    assert fid["lora"]["reference"] == "peft merge_and_unload (a)"
    # both ModelOutput fields (last_hidden_state, pooler_output) are outputs, held to PEFT's merge
    outputs = fid["target_vs_source"]["outputs"]
    assert list(outputs) == ["last_hidden_state", "pooler_output"]
    assert all(e["max_rel"] <= 1e-5 for e in outputs.values())
    with torch.no_grad():
        base = module(*inputs).last_hidden_state.numpy()
    got = art.load().run(art.load().default_feeds)["last_hidden_state"]
    assert abs(got - base).max() > 1e-4  # the adapter really changed the model


@pytest.fixture(scope="module")
def peft_llama(tmp_path_factory, lora_helpers):
    """A one-layer transformers LlamaForCausalLM (``use_cache`` left at its default, True) in a
    PeftModel with adapter ``own``, and a second adapter ``more`` (q/o) saved beside it."""
    import copy

    import peft

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    root = tmp_path_factory.mktemp("peft_llama")
    lora_helpers.make_adapter(root / "own", 1, module=copy.deepcopy(base),
                              target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    lora_helpers.make_adapter(root / "more", 2, module=copy.deepcopy(base),
                              target_modules=["q_proj", "o_proj"], r=4, lora_alpha=4)
    plain = copy.deepcopy(base)
    model = peft.PeftModel.from_pretrained(base, str(root / "own")).eval()
    return model, root, torch.randint(0, 64, (1, 8)), plain


def test_peft_model_source_with_more_adapters_is_held_to_peft(peft_llama, lora_helpers):
    """The reference of a PeftModel source given lora=: its own adapter merged, then the
    others; PeftModel.from_pretrained on the PeftModel itself crashed inside PEFT
    ("property 'peft_config' of 'PeftModel' object has no deleter"). With use_cache on (the
    default) the reference returned a DynamicCache."""
    import copy

    import peft

    from edgec.lora.peft_adapter import read_adapter
    from edgec.lora.reference import peft_merged_outputs

    model, root, ids, plain = peft_llama
    got = peft_merged_outputs(model, {"input_ids": ids.numpy()}, ["input_ids"], ["logits"],
                              [read_adapter(root / "more")])["logits"]
    both = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(root / "own"),
                                          adapter_name="x")
    both.load_adapter(str(root / "more"), adapter_name="y")
    with torch.no_grad():
        ref = both.merge_and_unload(adapter_names=["x", "y"])(ids, use_cache=False).logits
    assert lora_helpers.max_rel(got, ref.numpy()) <= 1e-5
    assert isinstance(model, peft.PeftModel) and model.config.use_cache  # left as it was


def test_a_transformers_module_exports_without_its_kv_cache(peft_llama):
    """use_cache (transformers' default) made forward return a DynamicCache, which no graph
    output is: the export failed with no hint. It is off for the export, restored after."""
    from edgec.exporters.outputs import flatten_outputs
    from edgec.exporters.sources import resolve_source

    model, _, ids, _ = peft_llama
    src = resolve_source(model, example_inputs=(ids,))
    assert list(src.reference) == ["logits"] and model.config.use_cache is True
    with pytest.raises(edgec.errors.UserError, match="forward returned DynamicCache.*"
                                                     "use_cache=False"):
        with torch.no_grad():
            flatten_outputs(model(ids, use_cache=True))


@pytest.fixture(scope="module")
def gpt2_module():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=16, tie_word_embeddings=False)
    return transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, 64, (1, 8))


def test_gpt2_conv1d_and_a_linear_in_one_adapter_are_held_to_peft(gpt2_module, tmp_path,
                                                                  lora_helpers):
    """PEFT decides fan_in_fan_out per layer (True for GPT-2's Conv1D, False for the Linear
    lm_head) and saves the last one set: false here. Trusted for every module, the square
    c_proj got ΔW transposed (merged logits 0.2 off PEFT's) and swappable refused it; the
    layout now comes from the model's weight."""
    import copy

    module, ids = gpt2_module
    model = lora_helpers.make_adapter(tmp_path / "a", 3, module=copy.deepcopy(module),
                                      target_modules=["attn.c_proj", "lm_head"], r=4,
                                      lora_alpha=8)
    from edgec.lora import read_adapter

    assert read_adapter(tmp_path / "a").config["fan_in_fan_out"] is False
    with torch.no_grad():
        ref = model.merge_and_unload()(ids).logits.numpy()
    for mode in ("merge", "swappable"):
        art = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / mode,
                            example_inputs=(ids,), lora=str(tmp_path / "a"), lora_mode=mode)
        got = art.load().run({"input_ids": ids.numpy()})["logits"]
        assert lora_helpers.max_rel(got, ref) <= 1e-5, mode
