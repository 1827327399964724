"""LoRA files in diffusers' format: one safetensors file, the form video-DiT LoRAs are shared in.

    pipe.save_lora_weights(dir, transformer_lora_layers=...)
        →  dir/pytorch_lora_weights.safetensors:
        transformer.<module>.lora_A.weight / lora_B.weight [/ lora_B.bias / lora_magnitude_vector]
        header "lora_adapter_metadata": the LoraConfig, its keys prefixed by the component

A model's own ``save_lora_adapter`` writes the same without the component prefix. Community
formats diffusers' Wan loader converts (original Wan / ComfyUI ``diffusion_model.*`` keys,
musubi-tuner ``lora_unet_*``; their ``alpha`` folded into A and B) are converted with diffusers'
own ``WanLoraLoaderMixin.lora_state_dict``. Without metadata, the ranks come from lora_B's
shapes and each module's scale is 1 (alpha = r), diffusers' convention.

The denoiser (``transformer``, or ``unet``) is the graph edgec compiles; weights for other
components (a text encoder) are left out and counted in the adapter's summary (``ignored``).
The file is read with safetensors (never a pickle); half-precision tensors merge in fp32.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["WEIGHT_FILE", "diffusers_lora_file", "read_diffusers_lora", "diffusers_state_dict",
           "peft_config"]

logger = logging.getLogger(__name__)

WEIGHT_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
DENOISERS = ("transformer", "unet")  # the component edgec compiles, first found
COMPONENTS = (*DENOISERS, "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3",
              "image_encoder")
_CONVERTED = ("diffusion_model.", "lora_unet_")  # Wan formats diffusers' loader converts


def diffusers_lora_file(path: Path) -> Path | None:
    """The diffusers-format weights file ``path`` names: a ``.safetensors`` file, or a directory
    with ``pytorch_lora_weights.safetensors`` and no PEFT ``adapter_config.json``."""
    from edgec.lora.peft_adapter import CONFIG_FILE

    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / WEIGHT_FILE).is_file():
        return path / WEIGHT_FILE
    return None


def diffusers_state_dict(file: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str | None,
                                              dict[str, int]]:
    """The file's LoRA tensors (torch, diffusers' key names), its LoraConfig metadata (keys as
    stored), the component prefix of the denoiser (None: keys without one) and the tensor
    count of each other component left out."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), "pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: unreadable safetensors ({e})") from None
    if not tensors:
        raise UserError(f"{file}: holds no tensors; give a LoRA weights file")
    try:
        metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except ValueError as e:
        raise UserError(f"{file}: its {METADATA_KEY} header is not valid JSON ({e})") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise UserError(f"{file}: its {METADATA_KEY} header is not a LoraConfig (a JSON object)")
    if any(k.startswith(_CONVERTED) for k in tensors):
        tensors = _converted(file, tensors)
    by_component = collections.Counter(k.split(".", 1)[0] for k in tensors
                                       if k.split(".", 1)[0] in COMPONENTS)
    prefix = next((c for c in DENOISERS if by_component.get(c)), None)
    if by_component and prefix is None:
        raise UserError(f"{file}: has LoRA weights for {', '.join(sorted(by_component))} only, "
                        "no denoiser (transformer or unet), the model edgec compiles")
    if prefix is not None:
        stray = [k for k in tensors if k.split(".", 1)[0] not in COMPONENTS]
        if stray:
            raise UserError(f"{file}: tensor {stray[0]!r} belongs to no component while others "
                            f"are under {prefix}.; the file mixes two key layouts")
    ignored = {c: n for c, n in by_component.items() if c != prefix}
    return tensors, metadata, prefix, ignored


def _converted(file: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """A community Wan LoRA in diffusers' key names, by diffusers' own converter."""
    try:
        from diffusers.loaders import WanLoraLoaderMixin
    except ImportError:
        raise UserError(f"{file}: a Wan LoRA in the original (diffusion_model.*) or musubi "
                        "(lora_unet_*) key names needs diffusers to convert it: pip install "
                        "'edgec[diffusers]'") from None
    try:
        return dict(WanLoraLoaderMixin.lora_state_dict(dict(tensors)))
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{file}: diffusers could not convert this Wan LoRA "
                        f"({type(e).__name__}: {e}); is it a Wan LoRA?") from None


def peft_config(tensors: dict[str, Any], metadata: dict[str, Any] | None,
                prefix: str | None, file: Path) -> dict[str, Any]:
    """The adapter's LoraConfig as a dict: the file's metadata (the denoiser's keys), else
    diffusers' inference: r the commonest rank (lora_B's second dim), the others in
    ``rank_pattern``, and alpha = r for every module (scale 1)."""
    if metadata is not None:
        if prefix is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items()
                        if k.startswith(f"{prefix}.")}
        return {k: v for k, v in metadata.items() if k != "peft_type"}
    ranks = {k.split(".lora_B.")[0]: int(v.shape[1]) for k, v in tensors.items()
             if ".lora_B." in k and v.ndim > 1}
    if not ranks:
        raise UserError(f"{file}: has no lora_B (or lora_up) weights, so it is not a LoRA; give "
                        "a PEFT adapter directory or a diffusers LoRA file")
    r = collections.Counter(ranks.values()).most_common()[0][0]
    pattern = {_exact(m): v for m, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks),
            "use_dora": any("lora_magnitude_vector" in k for k in tensors),
            "lora_bias": any(".lora_B." in k and k.endswith(".bias") for k in tensors)}


def _exact(module: str) -> str:
    """A rank/alpha pattern key matching ``module`` alone (dots literal)."""
    return re.escape(module)


def read_diffusers_lora(file: Path, name: str | None, weight: float):
    """A diffusers-format LoRA file as a ``LoraAdapter`` (``format`` "diffusers")."""
    from edgec.lora.peft_adapter import adapter_from_tensors
    from edgec.lora.spec import dir_name

    tensors, metadata, prefix, ignored = diffusers_state_dict(file)
    if prefix is not None:
        tensors = {k.removeprefix(f"{prefix}."): v for k, v in tensors.items()
                   if k.startswith(f"{prefix}.")}
    tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}  # PEFT's
    config = peft_config(tensors, metadata, prefix, file)
    arrays = {k: v.float().numpy() for k, v in tensors.items()}
    if name is None:
        name = dir_name(file.parent) if file.name == WEIGHT_FILE else file.stem
    adapter = adapter_from_tensors(arrays, config, name, file, weight)
    adapter.format, adapter.ignored = "diffusers", ignored
    if ignored:
        logger.warning("%s: LoRA weights for %s left out (edgec compiles the %s)", file,
                       ", ".join(f"{c} ({n} tensors)" for c, n in sorted(ignored.items())),
                       prefix)
    return adapter
