"""The graphs a vision-language model runs beside its text decoder, exported and verified.

A VLM artifact (``vlm`` or a Hugging Face LLaVA checkpoint, ``--generate``) is the language
model's KV-cache decoder (``model.onnx``, text tokens), and:

- ``vision.onnx``: ``pixel_values`` [B, 3, H, W] → ``image_features`` [B, image tokens, dim];
- ``prefill.onnx``: the embedding merge and the language model over the whole prompt
  (``input_ids`` with one placeholder per image feature, ``image_features``, ``attention_mask``,
  ``position_ids``) → last-position ``logits``, ``attention_mask_kept`` and ``present.*``, with
  ``--prune-vision-tokens`` applied (``vision_prune``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgec.exporters.param_map import strip_prefix
from edgec.exporters.vision_prune import KEPT_MASK, VisionPruning, VlmPrefill, prefill_flops

__all__ = ["VisionGraph", "VlmPrefillGraph", "VlmDecoderGraph", "load_vlm", "vlm_graph_source",
           "is_vlm_source", "image_token_count", "calibration_samples", "random_images",
           "REFERENCE_MEAN", "REFERENCE_STD"]

REFERENCE_MEAN = REFERENCE_STD = (0.5, 0.5, 0.5)  # the ``vlm`` reference: pixels in [-1, 1]


@dataclasses.dataclass(frozen=True)
class VisionGraph:
    """Marker: export the image encoder (``vision.onnx``); ``static``: batch 1, every shape
    fixed (an NPU)."""

    static: bool = False


@dataclasses.dataclass(frozen=True)
class VlmPrefillGraph:
    """Marker: export the prefill graph, pruned by ``pruning`` (None: every token).
    ``static_text``: an NPU's fixed-shape graph over batch 1 and a prompt of one token, the
    image's placeholders and ``static_text`` more tokens (the runtime left-pads a shorter
    prompt and prefills the rest of a longer one in the decoder's chunks)."""

    pruning: VisionPruning | None = None
    static_text: int | None = None


@dataclasses.dataclass(frozen=True)
class VlmDecoderGraph:
    """Marker: the language model's KV-cache decoder (``model.onnx``), with the
    ``attention_scores`` output when ``pruning`` sparsifies decoding (text_keep < 1)."""

    pruning: VisionPruning | None = None

    @property
    def scored(self) -> bool:
        return self.pruning is not None and self.pruning.text_keep < 1


def is_vlm_source(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    from edgec.exporters.sources import names_reference_model

    path = Path(source)
    if path.is_dir() and not names_reference_model(source):
        from edgec.exporters.hf_llava import is_llava

        return is_llava(path)
    return str(source) == "vlm"


def image_token_count(source: Any, config: str | None) -> int | None:
    """How many image tokens the VLM ``source`` puts in a prompt, from its configuration only
    (no weights: the compile's up-front checks); None where the config does not say."""
    from edgec.exporters.sources import names_reference_model

    path = Path(source)
    if path.is_dir() and not names_reference_model(source):
        import transformers

        from edgec.exporters.hf_llava import image_tokens

        cfg = transformers.AutoConfig.from_pretrained(path)
        vc = getattr(cfg, "vision_config", None)
        if not isinstance(getattr(vc, "image_size", None), int) or not isinstance(
                cfg.vision_feature_layer, int):
            return None  # a tower edgec cannot size from its config: load_vlm refuses it
        try:  # the tower on the meta device: its shapes without its weights
            with torch.device("meta"):
                tower = transformers.AutoModel.from_config(vc)
                return image_tokens(path, cfg, tower)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            return None  # one that cannot run on the meta device: load_vlm counts it
    from edgec.models import registry

    return int(registry.get(str(source)).hyperparameters(config or "tiny")["image_tokens"])


def load_vlm(source: Any, config: str | None) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(the ``Vlm``, its source info with a ``vision`` entry, kind ``registry``|``hf``)."""
    from edgec.exporters.sources import names_reference_model

    path = Path(source)
    if path.is_dir() and not names_reference_model(source):
        from edgec.exporters.hf_llava import load_llava

        vlm, pre = load_llava(path)
        info = {"kind": "hf", "path": str(path), "architecture": "LlavaForConditionalGeneration",
                "vocab_size": vlm.language.cfg.vocab}
        kind = "hf"
    else:
        from edgec.models import registry

        spec = registry.get(str(source))
        config = config or "tiny"
        vlm = spec.build(config)
        pre = {"image_size": vlm.image_size, "mean": list(REFERENCE_MEAN),
               "std": list(REFERENCE_STD)}
        info = {"kind": "registry", "name": spec.name, "config": config,
                "hyperparameters": spec.hyperparameters(config)}
        kind = "registry"
    info["vision"] = {**pre, "image_tokens": vlm.image_tokens,
                      "image_token_id": vlm.image_token_id}
    return vlm, info, kind


def random_images(batch: int, side: int, mean, std, g: torch.Generator) -> torch.Tensor:
    """``batch`` random images [B, 3, side, side] as a processor hands them to the encoder:
    smooth in [0, 1] (each a bicubic upsampling of a 2x2 to 8x8 grid of random colours, a
    random contrast of 1 to 2.5 that saturates part of the image at black or white, a little
    pixel noise), then normalized by the checkpoint's ``mean``/``std``. A CLIP checkpoint's
    pixels so span [-1.79, 2.15]; uniform pixels in [-1, 1] (what calibration drew before)
    clipped its bright and dark pixels: a tiny LLaVA's w8a16 image features fell to cosine
    0.983 on a PNG and its tokens left fp32's from the first."""
    out = []
    for _ in range(batch):
        k = int(torch.randint(2, 9, (1,), generator=g))
        grey = torch.rand(1, 1, k, k, generator=g)
        grid = 0.6 * grey + 0.4 * torch.rand(1, 3, k, k, generator=g)
        img = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic",
                                              align_corners=False)
        contrast = 1 + 1.5 * torch.rand(1, generator=g)
        img = (img - 0.5) * contrast + 0.5 + 0.2 * (torch.rand(1, generator=g) - 0.5)
        img = img + 0.02 * torch.randn(img.shape, generator=g)
        out.append(img.clamp(0, 1))
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (torch.cat(out) - m) / s


def _example(vlm, pre: dict[str, Any], batch: int = 2, text: int = 6, seed: int = 0):
    """Random images normalized as ``pre`` (the checkpoint's preprocessing) says
    (``random_images``), and prompts [token, image placeholders..., text tokens]."""
    g = torch.Generator().manual_seed(seed)
    pixels = random_images(batch, vlm.image_size, pre["mean"], pre["std"], g)
    high = min(vlm.image_token_id, vlm.language.cfg.vocab)
    ids = torch.randint(0, high, (batch, text + 1), generator=g)
    image = torch.full((batch, vlm.image_tokens), vlm.image_token_id)
    return pixels, torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)


def vlm_graph_source(source: Any, config: str | None, graph, opset: int | None):
    """The ``vision`` or ``prefill`` graph of a VLM source, exported and checked against
    PyTorch (``sources.Source``); the prefill's info carries ``vision_pruning`` (FLOPs and the
    pruned logits' change vs every token kept, on the example)."""
    from edgec.exporters.decoder import present_name
    from edgec.exporters.sources import _from_torch

    vlm, info, kind = load_vlm(source, config)
    static = graph.static if isinstance(graph, VisionGraph) else graph.static_text is not None
    text = graph.static_text if static and isinstance(graph, VlmPrefillGraph) else 6
    pixels, ids = _example(vlm, info["vision"], batch=1 if static else 2, text=text)
    lm = vlm.language.cfg
    if isinstance(graph, VisionGraph):
        src = _from_torch(vlm.vision, (pixels,),
                          {} if static else {"pixel_values": {0: "batch_size"}},
                          ["image_features"], info, kind, input_names=["pixel_values"],
                          opset=opset)
        prefix = "vision."
    else:
        module = VlmPrefill(vlm, graph.pruning).eval()
        with torch.no_grad():
            features = vlm.vision(pixels)
        b, s = ids.shape
        mask = torch.ones(b, s, dtype=torch.int64)
        positions = torch.arange(s)[None].expand(b, s).contiguous()
        seq = {0: "batch_size", 1: "sequence_length"}
        shapes = {} if static else {"input_ids": seq, "image_features": {0: "batch_size"},
                                    "attention_mask": seq, "position_ids": seq}
        outputs = ["logits", KEPT_MASK, *[present_name(i, k) for i in range(lm.layers)
                                          for k in ("key", "value")]]
        src = _from_torch(module, (ids, features, mask, positions), shapes, outputs, info,
                          kind, input_names=["input_ids", "image_features", "attention_mask",
                                             "position_ids"], opset=opset)
        src.info["vision_pruning"] = _pruning_stats(vlm, graph.pruning, src, module,
                                                    (ids, features, mask, positions))
        prefix = "vlm."
    src.parameter_map = strip_prefix(src.parameter_map, prefix, only=False)
    src.info["vlm_graph"] = "vision" if isinstance(graph, VisionGraph) else "prefill"
    return src


def calibration_samples(src, n: int) -> list[dict[str, np.ndarray]]:
    """``n`` calibration feeds for a VLM's vision or prefill graph: random images (seeds
    disjoint from the example's) and, for the prefill graph, their features from the PyTorch
    image encoder merged into prompts of random text around the image's placeholders."""
    # a Path: the stored path lost its ./, and a str "vlm" would name the reference model again
    origin = Path(src.info["path"]).absolute() if src.info.get("path") else src.info["name"]
    vlm, info, _ = load_vlm(origin, src.info.get("config"))
    batch = src.feeds[src.info["input_names"][0]].shape[0]
    # the example's own text length: a static prefill graph takes exactly 1 + image tokens +
    # its chunk (1 at --context < 8: a floor of 2 gave feeds one token too long, and the
    # quantizer's ONNX Runtime refused position_ids 19 against 18 after 80 s)
    text = src.feeds["input_ids"].shape[1] - vlm.image_tokens - 1 if (
        "input_ids" in src.feeds) else 6
    out = []
    for i in range(n):
        pixels, ids = _example(vlm, info["vision"], batch=batch, text=text, seed=1000 + i)
        if src.info["vlm_graph"] == "vision":
            out.append({"pixel_values": pixels.numpy()})
            continue
        with torch.no_grad():
            features = vlm.vision(pixels).numpy()
        b, s = ids.shape
        out.append({"input_ids": ids.numpy(), "image_features": features,
                    "attention_mask": np.ones((b, s), np.int64),
                    "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()})
    return out


def _pruning_stats(vlm, pruning, src, module, inputs) -> dict[str, Any]:
    lm = vlm.language.cfg
    tokens = int(inputs[0].shape[1])
    stats: dict[str, Any] = {"image_tokens": vlm.image_tokens, "prompt_tokens": tokens}
    if pruning is None:
        return stats
    kept = pruning.kept(vlm.image_tokens)
    after = tokens - vlm.image_tokens + kept
    full, cut = prefill_flops(lm, tokens), prefill_flops(lm, tokens, after, pruning.layer)
    with torch.no_grad():
        dense = VlmPrefill(vlm, None)(*inputs)[0][:, -1].numpy()
    pruned = src.reference["logits"][:, -1]
    cos = float(np.mean([np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
                         for a, b in zip(dense, pruned)]))
    return {**stats, **pruning.to_json(), "kept_image_tokens": kept,
            "prefill_flops": full, "prefill_flops_pruned": cut,
            "prefill_flops_cut": round(1 - cut / full, 4),
            "example_logits_cosine_vs_unpruned": round(cos, 6),
            "example_argmax_agreement": float(np.mean(dense.argmax(-1) == pruned.argmax(-1)))}
