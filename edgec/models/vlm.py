"""LLaVA-style vision-language model: a ViT image encoder over patches, a two-layer projector, and
the ``llama`` decoder over the merged sequence.

The prompt carries one placeholder token (``image_token_id``) per image feature, as LLaVA's
processor expands ``<image>``; the merge puts the projected patch features at those positions, in
order. ``forward(pixel_values, input_ids)`` → logits [B, S, vocab]. The vision side's names follow
Hugging Face CLIP/LLaVA in spirit (``vision.blocks.0.attn.qkv``, ``projector.linear_1``); the
language model's are the ``llama`` model's under ``language.``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models import llama
from edgec.models.registry import ModelSpec, register

__all__ = ["Vlm", "VlmConfig", "VisionEncoder", "CONFIGS", "SPEC"]


@dataclasses.dataclass(frozen=True)
class VlmConfig:
    image: int  # side of the square input image, pixels
    patch: int
    vision_dim: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text: llama.LlamaConfig
    text_tokens: int  # the example prompt's text tokens after the image
    batch: int = 1

    @property
    def image_tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def image_token_id(self) -> int:
        return self.text.vocab - 1


CONFIGS: dict[str, VlmConfig] = {
    "tiny": VlmConfig(image=32, patch=8, vision_dim=32, vision_layers=2, vision_heads=2,
                      vision_ffn=64, text=dataclasses.replace(llama.CONFIGS["tiny"], layers=4),
                      text_tokens=8, batch=2),
    # 256 image tokens as LLaVA's 336/14 has 576; 8 decoder layers so that pruning after layer 2
    # leaves most of the prefill to the pruned sequence, as in a 32-layer LLaVA
    "small": VlmConfig(image=224, patch=14, vision_dim=256, vision_layers=4, vision_heads=4,
                       vision_ffn=1024, text=dataclasses.replace(llama.CONFIGS["small"], layers=8),
                       text_tokens=32),
    "base": VlmConfig(image=336, patch=14, vision_dim=768, vision_layers=12, vision_heads=12,
                      vision_ffn=3072, text=llama.CONFIGS["base"], text_tokens=64),
}


class _Block(nn.Module):
    """Pre-norm ViT block: LayerNorm → multi-head self-attention → LayerNorm → GELU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] → image features [B, patches, text dim] (ViT + projector)."""

    def __init__(self, cfg: VlmConfig) -> None:
        super().__init__()
        vd = cfg.vision_dim
        self.patch_embed = nn.Conv2d(3, vd, cfg.patch, stride=cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.image_tokens, vd))
        self.blocks = nn.ModuleList(_Block(vd, cfg.vision_heads, cfg.vision_ffn)
                                    for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(vd)
        self.projector = nn.ModuleDict({"linear_1": nn.Linear(vd, cfg.text.dim),
                                        "linear_2": nn.Linear(cfg.text.dim, cfg.text.dim)})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        p = self.projector
        return p["linear_2"](F.gelu(p["linear_1"](self.norm(x))))


class Vlm(nn.Module):
    """``vision`` (pixel_values → [B, image_tokens, dim]) and ``language`` (a ``llama.Llama``)."""

    def __init__(self, vision: nn.Module, language: llama.Llama, image_token_id: int,
                 image_tokens: int, image_size: int) -> None:
        super().__init__()
        self.vision, self.language = vision, language
        self.image_token_id, self.image_tokens, self.image_size = (
            image_token_id, image_tokens, image_size)

    def merge(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the k-th image placeholder of each row replaced by the row's
        k-th image feature."""
        is_image = input_ids == self.image_token_id
        text = self.language.embed_tokens(torch.where(is_image, 0, input_ids))
        index = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp(
            0, image_features.shape[1] - 1)
        picked = torch.gather(image_features, 1,
                              index[..., None].expand(-1, -1, image_features.shape[-1]))
        return torch.where(is_image[..., None], picked, text)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        x = self.merge(input_ids, self.vision(pixel_values))
        mask = torch.ones(b, s, dtype=torch.int64)
        positions = torch.arange(s)[None].expand(b, s)
        cfg = self.language.cfg
        empty = torch.zeros(b, cfg.kv_heads, 0, cfg.head_dim)
        logits, _ = self.language.forward_embeds_cached(
            x, mask, positions, [(empty, empty)] * cfg.layers)
        return logits


SHARP = 4.0  # ``+sharp``: the language model's queries × this


def build(config: str, options: frozenset[str]) -> nn.Module:
    cfg = CONFIGS[config]
    language = llama.build_language(cfg.text)
    if "sharp" in options:  # random weights attend almost uniformly; trained models do not
        with torch.no_grad():
            for layer in language.layers:
                layer.self_attn.q_proj.weight.mul_(SHARP)
    g = torch.Generator().manual_seed(1)
    vision = VisionEncoder(cfg)
    with torch.no_grad():
        for name, p in vision.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
        vision.pos_embed.normal_(0.0, 0.5, generator=g)
    return Vlm(vision, language, cfg.image_token_id, cfg.image_tokens, cfg.image).eval()


def example_prompt(cfg: VlmConfig, batch: int, text_tokens: int, seed: int) -> torch.Tensor:
    """[BOS-like token, image placeholders..., text tokens] ids, [batch, 1 + patches + text]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.image_token_id, (batch, text_tokens + 1), generator=g)
    image = torch.full((batch, cfg.image_tokens), cfg.image_token_id)
    return torch.cat([text[:, :1], image, text[:, 1:]], dim=1)


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(cfg.batch, 3, cfg.image, cfg.image, generator=g) * 2 - 1
    return pixels, example_prompt(cfg, cfg.batch, cfg.text_tokens, seed)


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    return {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "seq"}}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "text"}
    info.update(image_tokens=cfg.image_tokens, image_token_id=cfg.image_token_id,
                text=dataclasses.asdict(cfg.text), sharp=SHARP if "sharp" in options else None)
    return info


SPEC = register(
    ModelSpec(
        name="vlm",
        description="LLaVA-style VLM (ViT patches → projector → llama decoder over image + text)",
        paper="LLaVA (Liu et al. 2023); Dynamic-LLaVA vision-token sparsification",
        configs=tuple(CONFIGS),
        options={"sharp": f"language-model queries x{SHARP:g}: peaked attention, as trained "
                          "models have (random weights attend almost uniformly)"},
        input_names=("pixel_values", "input_ids"),
        output_names=("logits",),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
    )
)
