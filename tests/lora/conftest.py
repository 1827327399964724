"""LoRA fixtures: real PEFT adapters on `llama tiny` (made here, never downloaded) and PEFT's own
``merge_and_unload()`` models exported and run in ORT as the references."""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the hub

import numpy as np
import onnx_ir as ir
import pytest
import torch

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name → (LoraConfig kwargs, seed). init_lora_weights=False so that B ≠ 0.
ADAPTERS = {
    "attn_mlp": (dict(target_modules=ALL, r=4, lora_alpha=8), 1),
    "patterns": (dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16,
                      rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 3}), 2),
    "rslora": (dict(target_modules=["o_proj", "up_proj"], r=16, lora_alpha=8, use_rslora=True), 3),
}


def build_llama():
    from edgec.models import registry

    return registry.get("llama").build("tiny")


def make_adapter(path, seed: int, zero: bool = False, module=None, **config):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=zero, **config)
    model = peft.get_peft_model(module if module is not None else build_llama(), cfg)
    with warnings.catch_warnings():  # PEFT's "not a transformers model" notes about lm_head
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """name → adapter dir; plus ``merged[name]``: PEFT's merge_and_unload() module."""
    root = tmp_path_factory.mktemp("adapters")
    dirs, merged = {}, {}
    for name, (config, seed) in ADAPTERS.items():
        model = make_adapter(root / name, seed, **config)
        dirs[name] = root / name
        merged[name] = model.merge_and_unload()
    dirs["zero"] = root / "zero"  # PEFT's default init: B = 0, the base model exactly
    make_adapter(dirs["zero"], 4, zero=True, target_modules=["q_proj"], r=2, lora_alpha=2)
    return dirs, merged


@pytest.fixture(scope="session")
def llama_source():
    """Factory: a fresh exported `llama tiny` Source (the IR is copied; passes mutate it)."""
    from edgec.exporters.sources import resolve_source

    src = resolve_source("llama", "tiny")
    proto = ir.to_proto(src.model)

    def fresh():
        import dataclasses

        return dataclasses.replace(src, model=ir.from_proto(proto))

    return fresh


@pytest.fixture(scope="session")
def exported_outputs(llama_source):
    """Factory: export a torch module with edgec and run it in ORT on llama tiny's feeds."""
    from edgec.exporters.torch_export import export_module
    from edgec.models import registry
    from edgec.runtimes.ort import run_model

    spec = registry.get("llama")
    feeds = llama_source().feeds
    cache = {}

    def run(key, module):
        if key not in cache:
            res = export_module(module, spec.example_inputs("tiny"), spec.dynamic_shapes("tiny"),
                                ["logits"])
            cache[key] = run_model(res.model, feeds)
        return cache[key]

    return run


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def lora_helpers():
    """``make_adapter``, ``build_llama``, ``max_rel`` for the test modules."""
    import types

    return types.SimpleNamespace(make_adapter=make_adapter, build_llama=build_llama,
                                 max_rel=max_rel)
