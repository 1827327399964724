"""PEFT's own merged model as the PyTorch reference of a LoRA recipe (needs ``peft``).

    module + adapters  →  PeftModel.from_pretrained / load_adapter  →  lora_B ·= weight
                       →  merge_and_unload(adapter_names)  →  outputs on the example inputs

Diffusers-format LoRA files on a diffusers model are loaded and fused by diffusers itself
(``load_lora_adapter`` → ``set_adapters(weights)`` → ``fuse_lora``): its own config inference
and key handling, not edgec's reading of the file. Used by the pipeline (merge: all adapters
with their weights; swappable: the default adapter) so a LoRA artifact is held to PEFT's (or
diffusers') result instead of the base model's. Sparse-merge (LoSA masking) has no PEFT
counterpart: it is compared with PEFT's merge of the unpruned base, the model before its
approximations (pruning, ΔW masked on the base's zeros), held only where the mask dropped
nothing (the pipeline reads the pass's ``delta_masked``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.exporters.outputs import flatten_outputs
from edgec.lora.peft_adapter import LoraAdapter, write_peft_adapter

__all__ = ["peft_merged_outputs", "peft_available", "lora_reference", "fused_by_diffusers"]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_merged_outputs(module, feeds: Mapping[str, np.ndarray], input_names: Sequence[str],
                        output_names: Sequence[str], adapters: Sequence[LoraAdapter],
                        decoder: bool = False, inner: str | None = None,
                        decoder_info: Any = None) -> dict[str, np.ndarray]:
    """Outputs of ``merge_and_unload()`` of ``module`` (copied, not modified) with ``adapters``.
    ``inner``: the attribute of ``module`` holding the model the adapters were trained on (a
    checkpoint source's wrapper: ``hf``; its KV-cache decoder: ``model``, with
    ``decoder_info``), merged there and run through the wrapper."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local adapter dirs only, never the hub
    import torch

    from edgec.exporters.hf import without_kv_cache

    model = copy.deepcopy(module).eval()
    wrapper, model = (model, getattr(model, inner)) if inner else (None, model)
    model = _own_adapters_merged(model)
    # PEFT's own adapter names, not the directories': PEFT drops the weights of an adapter whose
    # name is a substring of its "lora_" key prefix (a directory called "a" or "r" loads nothing).
    names = [f"edgec{i}" for i in range(len(adapters))]
    with torch.no_grad():
        if fused_by_diffusers(model, adapters):
            merged = _diffusers_fused(model, adapters, names)
        else:
            with tempfile.TemporaryDirectory(prefix="edgec-lora-") as tmp:
                merged = _peft_merged(model, adapters, names, Path(tmp))
        if wrapper is not None:
            setattr(wrapper, inner, merged)
            merged = wrapper
        tensors = [torch.from_numpy(np.asarray(feeds[n])) for n in input_names]
        if decoder:  # a KV-cache decoder: the cache tensors are one tuple argument
            from edgec.exporters.decoder import reference_decoder

            wrapped, info = (merged, decoder_info) if wrapper is not None else \
                reference_decoder(merged, type(merged).__name__)
            past = tuple(tensors[3:])
            if not past:  # a prefill-only graph (no cache inputs): the cache starts empty
                empty = torch.zeros(tensors[0].shape[0], info.kv_heads, 0, info.head_dim)
                past = (empty,) * (2 * info.layers)
            out = wrapped(*tensors[:3], past)
        else:
            with without_kv_cache(merged):  # as the source was exported
                out = merged(*tensors)
    return {n: t.detach().cpu().numpy() for n, t in zip(output_names, flatten_outputs(out))}


def _own_adapters_merged(model):
    """A ``PeftModel`` source with its own adapters merged (PEFT's ``merge_and_unload``, what
    ``lora-fold`` does to the branches its export has), the model the adapters given are then
    merged onto, as the artifact does; ``PeftModel.from_pretrained`` on a ``PeftModel`` failed
    inside PEFT ("property 'peft_config' of 'PeftModel' object has no deleter")."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _peft_merged(model, adapters: Sequence[LoraAdapter], names: Sequence[str], tmp: Path):
    """PEFT's ``merge_and_unload`` of ``adapters`` (weighted) on ``model``; an adapter read from
    another format is written as a PEFT directory under ``tmp`` first."""
    import torch
    from peft import PeftModel

    paths = [a.path if a.format == "peft" else write_peft_adapter(a, tmp / name)
             for name, a in zip(names, adapters)]
    peft_model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    with torch.no_grad():
        for name, a in zip(names, adapters):
            if a.weight != 1.0:
                for pname, p in peft_model.named_parameters():
                    # an embedding's B is a ParameterDict entry: ``lora_embedding_B.{name}``
                    # (missed, the reference merged it at weight 1 and every weighted adapter
                    # on an embedding failed its check, edgec's merge being right)
                    if (f".lora_B.{name}." in pname
                            or pname.endswith(f".lora_embedding_B.{name}")):
                        p.mul_(a.weight)
    return peft_model.merge_and_unload(adapter_names=names)


def fused_by_diffusers(model, adapters: Sequence[LoraAdapter]) -> bool:
    """Whether the reference is diffusers' own load and fuse: diffusers-format files on a
    diffusers model (else PEFT's merge)."""
    return all(a.format == "diffusers" for a in adapters) and hasattr(model, "load_lora_adapter")


def _diffusers_fused(model, adapters: Sequence[LoraAdapter], names: Sequence[str]):
    """A diffusers model with diffusers-format LoRA files loaded by diffusers itself
    (``load_lora_adapter``: its own config inference and key handling), weighted
    (``set_adapters``) and fused into the weights (``fuse_lora``)."""
    from edgec.lora.diffusers_lora import diffusers_state_dict

    for name, a in zip(names, adapters):
        tensors, metadata, prefix, _ = diffusers_state_dict(a.path)
        model.load_lora_adapter(tensors, prefix=prefix, adapter_name=name, metadata=metadata)
    model.set_adapters(list(names), weights=[a.weight for a in adapters])
    model.fuse_lora(adapter_names=list(names))
    return model


def lora_reference(source: Any, src, adapters: Sequence[LoraAdapter], mode: str
                   ) -> tuple[Any, dict[str, Any]]:
    """``src`` with PEFT's merged outputs as its reference where there is one, and the entry the
    manifest records.

    merge and sparse-merge: all adapters (weighted; sparse-merge's own masking and pruning are
    then the recipe's approximation, as pruning is merge's); swappable: the default (first)
    adapter, and otherwise the base (adapter ``base``) is verified against the base reference.
    Compared with the base instead, sparse-merge reported the adapter's own effect as its error
    (cosine 0.44 on a dense transformers llama, whose artifact was right).
    """
    import torch

    info = {"mode": mode, "recipe_adapters": [a.summary() for a in adapters]}
    used = list(adapters) if mode != "swappable" else list(adapters[:1])
    reason = None
    if src.kind == "onnx":
        reason = "the source is ONNX (no PyTorch module to merge into)"
    elif src.kind == "hf" and "vlm_graph" in src.info:
        reason = "a vision-language checkpoint's graphs are not held to PEFT's merge yet"
    elif not peft_available():
        reason = "peft is not installed (pip install 'edgec[hf]')"
    if reason is not None:
        info.update(reference=f"none: {reason}",
                    verified_adapter="base" if mode == "swappable" else None)
        if mode == "swappable":  # verified with no adapter bound: base against base
            return src, info
        # merged, but held to the model without them: the row's difference is their effect
        # (it read "onnxruntime vs onnxruntime", as if the merge were that inexact)
        label = f"{src.reference_kind} without the adapters (its difference includes their effect)"
        return dataclasses.replace(src, reference_kind=label), info
    inner = decoder_info = None
    if isinstance(source, torch.nn.Module):
        module = source
    elif src.kind == "hf":
        module, inner, decoder_info = _checkpoint_module(src)
    elif src.kind == "diffusers":
        from edgec.exporters.diffusers_source import reload_module

        module, inner = reload_module(src.info), "transformer"
    else:
        from edgec.models import registry

        module = registry.get(src.info["name"]).build(src.info["config"])
    reference = peft_merged_outputs(module, src.feeds, src.info["input_names"],
                                    src.info["output_names"], used,
                                    decoder=bool(src.info.get("generation")), inner=inner,
                                    decoder_info=decoder_info)
    diffusers = fused_by_diffusers(getattr(module, inner) if inner else module, used)
    kind = ("diffusers fuse_lora (" if diffusers else "peft merge_and_unload (") + \
        ", ".join(a.name for a in used) + ")"
    info.update(reference=kind, verified_adapter=used[0].name if mode == "swappable" else None)
    return dataclasses.replace(src, reference=reference, reference_kind=kind), info


def _checkpoint_module(src) -> tuple[Any, str, Any]:
    """A Hugging Face checkpoint source's module as exported, loaded again from its directory
    (the export's copy is spent), and the attribute holding the transformers model PEFT adapts:
    the ``forward(input_ids, attention_mask)`` wrapper, or with ``--generate`` the KV-cache
    decoder (and its ``DecoderInfo``)."""
    from pathlib import Path

    from edgec.exporters.hf import hf_wrapper, load_hf_model

    path = Path(src.info["path"])
    model = load_hf_model(path)[0]
    if src.info.get("generation"):
        from edgec.exporters.decoder import hf_decoder

        wrapped, info = hf_decoder(model, path)
        return wrapped, "model", info
    return hf_wrapper(model, list(src.info["output_names"])), "hf", None
