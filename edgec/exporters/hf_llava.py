"""A Hugging Face LLaVA checkpoint (``LlavaForConditionalGeneration``) as a ``models.vlm.Vlm``.

The vision side is transformers' own (its vision tower's hidden states at
``vision_feature_layer``, the CLS row dropped for the ``default`` strategy, its projector). The
language model's weights are loaded into the ``llama`` reference (the same parameter names), so
the decoder, the prefill graph and the vision-token pruning are the ones the ``vlm`` reference
model gets; a language model that is not LLaMA-shaped (biases, other activations, scaled RoPE,
a sliding window narrower than its context) is refused, not approximated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgec.errors import UserError

__all__ = ["is_llava", "load_llava", "image_tokens", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_llava(path: Path) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except ValueError:
        return False
    return cfg.get("model_type") == "llava" or any(
        a.startswith("Llava") for a in cfg.get("architectures") or [])


class _Vision(nn.Module):
    """pixel_values → projected image features, as ``LlavaModel.get_image_features``."""

    def __init__(self, tower: nn.Module, projector: nn.Module, layer: int, drop_cls: bool):
        super().__init__()
        self.tower, self.projector, self.layer, self.drop_cls = tower, projector, layer, drop_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feature = out.hidden_states[self.layer]
        return self.projector(feature[:, 1:] if self.drop_cls else feature)


def _rope_theta(tc) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    scaling = getattr(tc, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(f"the LLaVA language model uses {kind} RoPE scaling; edgec's VLM "
                        "decoder runs plain RoPE only")
    return float(params.get("rope_theta") or getattr(tc, "rope_theta", None) or 10000.0)


def _language(model, cfg, path) -> nn.Module:
    from edgec.exporters.decoder import has_sliding_window
    from edgec.models.llama import Llama, LlamaConfig

    tc = cfg.text_config
    unsupported = [k for k in ("attention_bias", "mlp_bias") if getattr(tc, k, False)]
    if tc.model_type not in ("llama", "mistral") or unsupported or tc.hidden_act != "silu":
        raise UserError(f"{path}: the LLaVA language model is {tc.model_type} ("
                        f"{', '.join(unsupported) or tc.hidden_act}); edgec's VLM decoder is "
                        "LLaMA-shaped (no biases, SiLU MLP)")
    window = getattr(tc, "sliding_window", None)
    longest = getattr(tc, "max_position_embeddings", None)
    if has_sliding_window(tc.to_dict()) and not (window and longest and window >= longest):
        raise UserError(f"{path}: the LLaVA language model ({tc.model_type}) attends over a "
                        f"sliding window of {window} tokens; edgec's VLM decoder attends over "
                        "the whole context, so its tokens would differ past the window: set "
                        "text_config.sliding_window to null only if prompt + output stay within "
                        f"{window} tokens")
    heads = int(tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    if head_dim * heads != tc.hidden_size:
        raise UserError(f"{path}: head_dim {head_dim} × {heads} heads ≠ hidden size "
                        f"{tc.hidden_size}; not supported by edgec's VLM decoder")
    lcfg = LlamaConfig(vocab=int(tc.vocab_size), dim=int(tc.hidden_size),
                       layers=int(tc.num_hidden_layers), heads=heads,
                       kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
                       ffn=int(tc.intermediate_size), seq=16, rope_theta=_rope_theta(tc),
                       eps=float(tc.rms_norm_eps))
    tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings",
                                                                       False))
    language = Llama(lcfg, tied=tied)
    state = dict(getattr(model, "model", model).language_model.state_dict())
    state["lm_head.weight"] = model.lm_head.weight.detach()
    missing, unexpected = language.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: the language model's weights do not map onto LLaMA's "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return language.eval()


def load_llava(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(the checkpoint as a ``Vlm``, its image preprocessing: ``_preprocessing``)."""
    from edgec.exporters.hf import load_hf_model
    from edgec.models.vlm import Vlm

    model, _, _ = load_hf_model(Path(path))
    model = model.float()
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise UserError(f"{path}: vision_feature_layer {layer} (several layers) is not supported")
    strategy = cfg.vision_feature_select_strategy
    side = int(cfg.vision_config.image_size)
    inner = getattr(model, "model", model)  # transformers ≥ 4.52 nests the parts in .model
    tokens = image_tokens(Path(path), cfg, inner.vision_tower)
    vision = _Vision(inner.vision_tower, inner.multi_modal_projector, layer,
                     strategy == "default").eval()
    image_token = getattr(cfg, "image_token_id", None)
    image_token = image_token if image_token is not None else cfg.image_token_index
    vlm = Vlm(vision, _language(model, cfg, path), int(image_token), tokens, side).eval()
    return vlm, _preprocessing(Path(path), side)


def image_tokens(path: Path, cfg, tower: nn.Module) -> int:
    """How many image features ``tower`` (the checkpoint's vision tower, or one built on the
    meta device from its config) gives at ``vision_feature_layer``, from one dry run: a CLIP
    tower puts a CLS row before its patches, a SigLIP tower none (counting one for SigLIP gave
    a placeholder without a feature, and tokens other than HF's). Checked against config.json's
    ``image_seq_length`` where it states one."""
    side = int(cfg.vision_config.image_size)
    device = next(tower.parameters()).device
    with torch.no_grad():
        out = tower(torch.zeros(1, 3, side, side, device=device), output_hidden_states=True,
                    return_dict=True)
    strategy = cfg.vision_feature_select_strategy
    tokens = int(out.hidden_states[cfg.vision_feature_layer].shape[1]) - (
        1 if strategy == "default" else 0)
    try:
        stated = json.loads((path / "config.json").read_text()).get("image_seq_length")
    except (OSError, ValueError):
        stated = None
    if stated is not None and stated != tokens:
        raise UserError(f"{path}: config.json's image_seq_length is {stated}, but its vision "
                        f"tower ({cfg.vision_config.model_type}, {side} px, strategy "
                        f"{strategy}) gives {tokens} image features; fix image_seq_length or "
                        "the vision config")
    return tokens


def _preprocessing(path: Path, side: int) -> dict[str, Any]:
    """The checkpoint's image preprocessing, as its processor does it: CLIP's (``size``
    ``shortest_edge``) resizes the shortest edge to ``resize_shortest`` (bicubic) and crops the
    centre ``image_size``; SigLIP's (``size`` ``height``/``width``) resizes the whole image to
    ``resize_to`` [height, width], no crop; then the mean and std. From
    ``preprocessor_config.json``, else ``processor_config.json``'s ``image_processor``
    (transformers 5 writes only that), else CLIP's defaults."""
    p: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except ValueError:
                continue
            p = d.get("image_processor", d) if isinstance(d, dict) else {}
            break
    size = p.get("size")
    out: dict[str, Any] = {"image_size": side}
    if isinstance(size, dict) and size.get("height") and size.get("width"):
        out["resize_to"] = [int(size["height"]), int(size["width"])]
    else:
        shortest = size.get("shortest_edge") if isinstance(size, dict) else size
        out["resize_shortest"] = int(shortest or side)
    return {**out, "mean": list(p.get("image_mean") or CLIP_MEAN),
            "std": list(p.get("image_std") or CLIP_STD)}
