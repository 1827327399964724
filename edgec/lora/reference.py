"""PEFT's own merged model as the PyTorch reference of a LoRA recipe (needs ``peft``).

    module + adapters  →  PeftModel.from_pretrained / load_adapter  →  lora_B ·= weight
                       →  merge_and_unload(adapter_names)  →  outputs on the example inputs

Used by the pipeline (merge: all adapters with their weights; swappable: the default adapter) so
a LoRA artifact is held to PEFT's result instead of the base model's. Sparse-merge (LoSA masking)
has no PEFT counterpart and is reported, not asserted.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import numpy as np

from edgec.lora.peft_adapter import LoraAdapter

__all__ = ["peft_merged_outputs", "peft_available"]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_merged_outputs(module, feeds: Mapping[str, np.ndarray], input_names: Sequence[str],
                        output_names: Sequence[str], adapters: Sequence[LoraAdapter]
                        ) -> dict[str, np.ndarray]:
    """Outputs of ``merge_and_unload()`` of ``module`` (copied, not modified) with ``adapters``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local adapter dirs only, never the hub
    import torch
    from peft import PeftModel

    model = copy.deepcopy(module).eval()
    first, *rest = adapters
    peft_model = PeftModel.from_pretrained(model, str(first.path), adapter_name=first.name)
    for a in rest:
        peft_model.load_adapter(str(a.path), adapter_name=a.name)
    with torch.no_grad():
        for a in adapters:
            if a.weight != 1.0:
                for name, p in peft_model.named_parameters():
                    if f".lora_B.{a.name}." in name:
                        p.mul_(a.weight)
        merged = peft_model.merge_and_unload(adapter_names=[a.name for a in adapters])
        out = merged(*(torch.from_numpy(np.asarray(feeds[n])) for n in input_names))
    flat = [out] if isinstance(out, torch.Tensor) else list(out)
    return {n: t.detach().cpu().numpy() for n, t in zip(output_names, flat)}
