"""PEFT's own merged model as the PyTorch reference of a LoRA recipe (needs ``peft``).

    module + adapters  →  PeftModel.from_pretrained / load_adapter  →  lora_B ·= weight
                       →  merge_and_unload(adapter_names)  →  outputs on the example inputs

Used by the pipeline (merge: all adapters with their weights; swappable: the default adapter) so
a LoRA artifact is held to PEFT's result instead of the base model's. Sparse-merge (LoSA masking)
has no PEFT counterpart and is reported, not asserted.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgec.exporters.outputs import flatten_outputs
from edgec.lora.peft_adapter import LoraAdapter

__all__ = ["peft_merged_outputs", "peft_available", "lora_reference"]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_merged_outputs(module, feeds: Mapping[str, np.ndarray], input_names: Sequence[str],
                        output_names: Sequence[str], adapters: Sequence[LoraAdapter],
                        decoder: bool = False) -> dict[str, np.ndarray]:
    """Outputs of ``merge_and_unload()`` of ``module`` (copied, not modified) with ``adapters``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local adapter dirs only, never the hub
    import torch
    from peft import PeftModel

    model = copy.deepcopy(module).eval()
    # PEFT's own adapter names, not the directories': PEFT drops the weights of an adapter whose
    # name is a substring of its "lora_" key prefix (a directory called "a" or "r" loads nothing).
    names = [f"edgec{i}" for i in range(len(adapters))]
    first, *rest = adapters
    peft_model = PeftModel.from_pretrained(model, str(first.path), adapter_name=names[0])
    for name, a in zip(names[1:], rest):
        peft_model.load_adapter(str(a.path), adapter_name=name)
    with torch.no_grad():
        for name, a in zip(names, adapters):
            if a.weight != 1.0:
                for pname, p in peft_model.named_parameters():
                    if f".lora_B.{name}." in pname:
                        p.mul_(a.weight)
        merged = peft_model.merge_and_unload(adapter_names=names)
        tensors = [torch.from_numpy(np.asarray(feeds[n])) for n in input_names]
        if decoder:  # a KV-cache decoder: the cache tensors are one tuple argument
            from edgec.exporters.decoder import reference_decoder

            wrapped, info = reference_decoder(merged, type(merged).__name__)
            past = tuple(tensors[3:])
            if not past:  # a prefill-only graph (no cache inputs): the cache starts empty
                empty = torch.zeros(tensors[0].shape[0], info.kv_heads, 0, info.head_dim)
                past = (empty,) * (2 * info.layers)
            out = wrapped(*tensors[:3], past)
        else:
            out = merged(*tensors)
    return {n: t.detach().cpu().numpy() for n, t in zip(output_names, flatten_outputs(out))}


def lora_reference(source: Any, src, adapters: Sequence[LoraAdapter], mode: str
                   ) -> tuple[Any, dict[str, Any]]:
    """``src`` with PEFT's merged outputs as its reference where there is one, and the entry the
    manifest records.

    merge: all adapters (weighted); swappable: the default (first) adapter, and otherwise the
    base (adapter ``base``) is verified against the base reference. sparse-merge: reported only.
    """
    import torch

    info = {"mode": mode, "recipe_adapters": [a.summary() for a in adapters]}
    used = list(adapters) if mode == "merge" else list(adapters[:1])
    reason = None
    if mode == "sparse-merge":
        reason = "LoSA masking has no PEFT counterpart"
    elif src.kind == "onnx":
        reason = "the source is ONNX (no PyTorch module to merge into)"
    elif src.kind == "hf":
        reason = "Hugging Face checkpoint sources are not held to PEFT's merge yet"
    elif not peft_available():
        reason = "peft is not installed (pip install 'edgec[hf]')"
    if reason is not None:
        info.update(reference=f"none: {reason}",
                    verified_adapter="base" if mode == "swappable" else None)
        return src, info
    if isinstance(source, torch.nn.Module):
        module = source
    else:
        from edgec.models import registry

        module = registry.get(src.info["name"]).build(src.info["config"])
    reference = peft_merged_outputs(module, src.feeds, src.info["input_names"],
                                    src.info["output_names"], used,
                                    decoder=bool(src.info.get("generation")))
    kind = "peft merge_and_unload (" + ", ".join(a.name for a in used) + ")"
    info.update(reference=kind, verified_adapter=used[0].name if mode == "swappable" else None)
    return dataclasses.replace(src, reference=reference, reference_kind=kind), info
