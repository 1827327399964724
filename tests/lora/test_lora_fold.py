"""Graph-level fold: a graph exported with PEFT's LoRA branches becomes one MatMul per site."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import pytest

from edgec.graph_passes.lora.fold import LoraFoldPass, count_lora_branches
from edgec.runtimes.ort import run_model


@pytest.fixture(scope="module")
def branched(adapter_dirs, lora_helpers):
    """llama tiny with PEFT's unmerged LoRA layers (two adapters active), exported by edgec."""
    import peft

    from edgec.exporters.torch_export import export_module
    from edgec.models import registry

    dirs, _ = adapter_dirs
    model = peft.PeftModel.from_pretrained(lora_helpers.build_llama(), str(dirs["attn_mlp"]),
                                           adapter_name="a")
    model.load_adapter(str(dirs["rslora"]), adapter_name="b")
    model.base_model.set_adapter(["a", "b"])  # both active: stacked branches on o/up_proj
    spec = registry.get("llama")
    inner = model.get_base_model()
    res = export_module(inner, spec.example_inputs("tiny"), spec.dynamic_shapes("tiny"),
                        ["logits"])
    proto = ir.to_proto(res.model)  # before merging: the IR aliases the module's parameters
    return proto, model.merge_and_unload(adapter_names=["a", "b"])


def test_fold_makes_one_matmul_per_projection(branched, llama_source, exported_outputs,
                                              lora_helpers):
    proto, merged = branched
    model = ir.from_proto(proto)
    n_branches = count_lora_branches(model)
    assert n_branches == 14  # attn_mlp's 14 sites; the 4 stacked rslora branches fold after
    feeds = llama_source().feeds
    before = run_model(model, feeds)["logits"]
    result = LoraFoldPass()(model)
    assert result.stats["branches_folded"] == 14 + 4
    ops = Counter(n.op_type for n in result.model.graph)
    base_ops = Counter(n.op_type for n in llama_source().model.graph)
    assert ops["MatMul"] == base_ops["MatMul"] and ops["Add"] == base_ops["Add"]
    assert count_lora_branches(result.model) == 0
    after = run_model(result.model, feeds)["logits"]
    assert lora_helpers.max_rel(after, before) <= 1e-4
    ref = exported_outputs("fold-a+b", merged)["logits"]
    assert lora_helpers.max_rel(after, ref) <= 1e-4


def test_fold_leaves_plain_graphs_alone(llama_source):
    model = llama_source().model
    assert count_lora_branches(model) == 0
    result = LoraFoldPass()(model)
    assert not result.modified and result.stats["branches_folded"] == 0


def test_pipeline_folds_a_peft_module(branched, tmp_path, lora_helpers):
    """An nn.Module with LoRA layers compiles to the base graph shape, checked exact (--check)."""
    import peft

    import edgec
    from edgec.models import registry

    spec = registry.get("llama")
    model = peft.get_peft_model(lora_helpers.build_llama(), peft.LoraConfig(
        target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights=False))
    art = edgec.compile(model.get_base_model(), example_inputs=spec.example_inputs("tiny"),
                        target="ort-cpu", output_dir=tmp_path / "out", check=True)
    fold = next(p for p in art.report["passes"] if p["name"] == "lora-fold")
    assert fold["stats"]["branches_folded"] == 4 and fold["check"]["exact"]
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["output"]["max_rel"] <= 1e-5
