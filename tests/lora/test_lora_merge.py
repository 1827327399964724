"""LoRA merge on the ONNX graph == PEFT's merge_and_unload() model exported and run (≤ 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.graph_passes.lora.merge import LoraMergePass
from edgec.graph_passes.prune import PruneConfig, PrunePass
from edgec.lora import read_adapter
from edgec.lora.reference import peft_merged_outputs
from edgec.runtimes.ort import run_model

RTOL = 1e-4


@pytest.mark.parametrize("name", ["attn_mlp", "patterns", "rslora"])
def test_merge_equals_peft_merge_and_unload(adapter_dirs, llama_source, exported_outputs,
                                            lora_helpers, name):
    dirs, merged = adapter_dirs
    src = llama_source()
    result = LoraMergePass([read_adapter(dirs[name])], src.parameter_map)(src.model)
    stats = result.stats
    assert result.modified and stats["modules_merged"] == len(read_adapter(dirs[name]).modules)
    if name == "attn_mlp":  # every attention and MLP projection of both layers
        assert stats["by_module_kind"] == {k: 2 for k in ("down_proj", "gate_proj", "k_proj",
                                                          "o_proj", "q_proj", "up_proj", "v_proj")}
    got = run_model(result.model, src.feeds)["logits"]
    ref = exported_outputs(name, merged[name])["logits"]
    base = src.reference["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL
    assert lora_helpers.max_rel(base, ref) > 100 * RTOL  # the adapter really changes the model
    assert stats["max_abs_delta"] > 0 and stats["zeros_destroyed"] == 0


def test_weighted_merge_of_two_adapters(adapter_dirs, llama_source, lora_helpers):
    dirs, _ = adapter_dirs
    src = llama_source()
    adapters = [read_adapter(dirs["attn_mlp"], weight=0.7),
                read_adapter(dirs["rslora"], weight=-0.5)]
    model = LoraMergePass(adapters, src.parameter_map)(src.model).model
    got = run_model(model, src.feeds)["logits"]
    ref = peft_merged_outputs(lora_helpers.build_llama(), src.feeds, ["input_ids"], ["logits"],
                              adapters)["logits"]
    assert lora_helpers.max_rel(got, ref) <= RTOL


def test_zero_adapter_is_the_base(adapter_dirs, llama_source):
    dirs, _ = adapter_dirs
    src = llama_source()
    result = LoraMergePass([read_adapter(dirs["zero"])], src.parameter_map)(src.model)
    got = run_model(result.model, src.feeds)["logits"]
    np.testing.assert_array_equal(got, run_model(llama_source().model, src.feeds)["logits"])
    assert result.stats["max_abs_delta"] == 0.0


@pytest.mark.parametrize("prune", ["magnitude:0.5", "2:4"])
def test_sparse_merge_keeps_exact_zero_count_merge_destroys_it(adapter_dirs, llama_source, prune):
    dirs, _ = adapter_dirs
    adapter = read_adapter(dirs["attn_mlp"])
    results = {}
    for sparse in (True, False):
        src = llama_source()
        model = PrunePass(PruneConfig.parse(prune), src.parameter_map)(src.model).model
        zeros = {n: int(np.count_nonzero(v.const_value.numpy() == 0))
                 for n, v in model.graph.initializers.items() if v.const_value is not None}
        result = LoraMergePass([adapter], src.parameter_map, sparse=sparse)(model)
        after = {n: int(np.count_nonzero(v.const_value.numpy() == 0))
                 for n, v in result.model.graph.initializers.items() if v.const_value is not None}
        results[sparse] = (zeros, after, result.stats)
    zeros, after, stats = results[True]
    assert after == zeros  # every weight keeps exactly its zeros
    assert stats["sparsity_before"] == stats["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    assert stats["zeros_destroyed"] == 0
    _, _, dense = results[False]
    assert dense["sparsity_before"] == pytest.approx(0.5, abs=1e-3)
    assert dense["sparsity_after"] < 0.01 and dense["zeros_destroyed"] > 0  # reported


def test_sparse_merge_delta_is_the_masked_peft_delta(adapter_dirs, llama_source):
    dirs, _ = adapter_dirs
    adapter = read_adapter(dirs["attn_mlp"])
    src = llama_source()
    model = PrunePass(PruneConfig.parse("2:4"), src.parameter_map)(src.model).model
    entry = src.parameter_map["layers.1.mlp.down_proj.weight"]
    before = model.graph.initializers[entry["initializer"]].const_value.numpy().copy()
    LoraMergePass([adapter], src.parameter_map, sparse=True)(model)
    after = model.graph.initializers[entry["initializer"]].const_value.numpy()
    delta = adapter.modules["layers.1.mlp.down_proj"].delta().T  # ONNX stores Wᵀ
    np.testing.assert_allclose(after - before, delta * (before != 0), atol=1e-6)


def test_sparse_merge_on_a_dense_base_is_plain_merge_held_to_peft(adapter_dirs, llama_source,
                                                                  caplog):
    """With no zeros to keep (no --prune, a dense base) sparse-merge is a plain merge: said in
    a warning, and held to PEFT's merge exactly (its fidelity was measured against the base
    without the adapter: cosine 0.44, the adapter's own effect reported as error)."""
    from types import SimpleNamespace

    from edgec.pipeline import _approximate, _peft_merges

    dirs, _ = adapter_dirs
    src = llama_source()
    with caplog.at_level("WARNING"):
        result = LoraMergePass([read_adapter(dirs["attn_mlp"])], src.parameter_map,
                               sparse=True)(src.model)
    stats = result.stats
    assert stats["delta_masked"] == 0 and "this is a plain merge" in stats["warning"]
    assert stats["warning"] in caplog.text
    record = SimpleNamespace(name="lora-sparse-merge", modified=True, exact=False, stats=stats)
    assert not _approximate([record], _peft_merges([record]))  # held within 1e-5
    masked = SimpleNamespace(**{**vars(record), "stats": {**stats, "delta_masked": 3}})
    assert _approximate([masked], _peft_merges([masked]))  # the mask dropped part of ΔW
