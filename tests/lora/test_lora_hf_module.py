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
