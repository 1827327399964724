"""Generation with an image: pixels in, the image's placeholder tokens in the prompt, and the
VLM prefill graph in front of the text decoder's cache.

``generate(..., image=...)`` on a VLM artifact runs the image encoder (``vision.onnx``), the
prefill graph over the prompt with the image features merged in (vision tokens pruned there
when the artifact was compiled with ``--prune-vision-tokens``), loads the cache with the
prompt's kept keys/values, and decodes text tokens with the decoder. Positions continue from
the un-pruned prompt's length; the decode mask covers the kept tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["load_pixels", "expand_prompt", "VisionPrefill", "TextBudget"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_pixels(image: Any, vision: Mapping[str, Any]) -> np.ndarray:
    """``pixel_values`` [B, 3, H, W] float32 from an image file (``.png``/``.jpg``/...: RGB,
    transparency composited onto white,
    its shortest edge resized to ``resize_shortest`` (bicubic) and centre-cropped to the
    model's side, as CLIP's processor does, or resized to ``resize_to`` [height, width] as
    SigLIP's does; scaled to [0, 1], normalized by the model's mean and
    std), an ``.npy`` of pixel values, or an array of them."""
    side = int(vision["image_size"])
    where = ""
    if isinstance(image, (str, Path)):
        path = Path(image)
        where = f"{path}: "
        if path.is_dir():
            raise UserError(f"{path} is a directory; give an image file (.png/.jpg or .npy)")
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                magic = f.read(len(np.lib.format.MAGIC_PREFIX))
            if magic != np.lib.format.MAGIC_PREFIX:  # np.load took it for pickled data
                raise UserError(f"{path}: not a readable .npy file (no NumPy header); save the "
                                "pixel values with numpy.save, or give an image file")
            try:
                image = np.load(path, allow_pickle=False)
            except ValueError as e:
                what = "plain .npy array" if "allow_pickle" in str(e) else "readable .npy file"
                raise UserError(f"{path}: not a {what} ({e})") from None
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            image = _read_image(path, side, vision)
        else:
            raise UserError(f"{path}: give the image as {'/'.join(IMAGE_SUFFIXES)} or as .npy "
                            "pixel values [3, H, W]")
    dtype = np.asarray(image).dtype
    if not np.issubdtype(dtype, np.floating):  # e.g. uint8 0..255: not normalized
        raise UserError(f"{where}pixel values are {dtype}; give the processor's normalized "
                        "float pixel values (or an image file, which is preprocessed)")
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[1:] != (3, side, side):
        raise UserError(f"pixel values must be [batch, 3, {side}, {side}] (or [3, {side}, "
                        f"{side}]), got {list(pixels.shape)}; give an image file to resize")
    if not np.isfinite(pixels).all():
        raise UserError("pixel values contain NaN or infinity")
    return pixels


def _read_image(path: Path, side: int, vision: Mapping[str, Any]) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading an image file needs Pillow (pip install pillow), or give the "
                        "pixel values as .npy") from None
    shortest = int(vision.get("resize_shortest") or side)
    try:
        with Image.open(path) as im:
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                # onto white, as transformers' convert_to_rgb: convert("RGB") kept the colour
                # of transparent pixels (a logo's hidden background)
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
            else:
                rgb = im.convert("RGB")
            w, h = rgb.size
            if vision.get("resize_to"):  # SigLIP's processor: the whole image to height × width
                size = (int(vision["resize_to"][1]), int(vision["resize_to"][0]))
            else:  # the shortest edge to `shortest`, the other in proportion, as CLIP's
                size = (shortest, int(shortest * h / w)) if w <= h else (
                    int(shortest * w / h), shortest)
            if (w, h) != size:
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)
    top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2  # the centre crop
    if top < 0 or left < 0:
        raise UserError(f"{path}: the resized image is smaller than the model's {side} px; "
                        "the checkpoint's preprocessing config is inconsistent")
    x = x[:, top:top + side, left:left + side] / 255.0
    mean = np.asarray(vision["mean"], np.float32)[:, None, None]
    std = np.asarray(vision["std"], np.float32)[:, None, None]
    return (x - mean) / std


def expand_prompt(ids: np.ndarray, mask: np.ndarray | None, vision: Mapping[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The prompt with the image's placeholders: rows that already hold ``image_tokens`` of
    them stay; one placeholder (LLaVA's ``<image>``) becomes ``image_tokens``; none: they go
    first (after a leading BOS-like first token when the row starts with text)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = np.ones_like(ids) if mask is None else np.asarray(mask).reshape(ids.shape)
    n, token = int(vision["image_tokens"]), int(vision["image_token_id"])
    counts = (ids == token).sum(axis=1)
    if len(set(counts.tolist())) != 1 or counts[0] not in (0, 1, n):
        raise UserError(f"each prompt row needs 0, 1 or {n} image placeholder tokens (id "
                        f"{token}), the same in every row; got {counts.tolist()}")
    if counts[0] == n:
        return ids, mask
    rows, masks = [], []
    for row, m in zip(ids, mask):
        at = int(np.argmax(row == token)) if counts[0] else int(m.argmax() + 1)
        keep = 1 if counts[0] else 0  # replace the one placeholder, or insert before `at`
        rows.append(np.concatenate([row[:at], np.full(n, token), row[at + keep:]]))
        masks.append(np.concatenate([m[:at], np.ones(n, m.dtype), m[at + keep:]]))
    return np.stack(rows), np.stack(masks)


class TextBudget:
    """Decode-time sparsification of the generated tokens (training-free Dynamic-LLaVA): the
    ``recent`` newest always stay; of the older ones at most ceil(``text_keep`` · their number)
    stay in the cache, those with the highest mean attention received (``attention_scores``
    of each decode step, over the queries that saw them). Slots are dropped ``chunk`` at a
    time; with text_keep = 1 nothing is ever dropped (exact)."""

    def __init__(self, text_keep: float, recent: int, chunk: int = 4):
        self.text_keep, self.recent, self.chunk = text_keep, recent, chunk
        self.generated = 0
        self.evicted = 0
        self.received: np.ndarray | None = None

    def start(self, slots: np.ndarray) -> None:
        """The prompt's cache slots (mask [B, T]): never dropped."""
        self.received = np.zeros(slots.shape, np.float64)
        self.seen = np.zeros(slots.shape, np.float64)
        self.is_generated = np.zeros(slots.shape, bool)

    def observe(self, scores: np.ndarray) -> np.ndarray | None:
        """One decode step's scores [B, T] (the cache with the new token last); the slots to
        keep [B, n] when it is time to drop some, else None."""
        b = scores.shape[0]
        self.received = np.concatenate([self.received, np.zeros((b, 1))], axis=1) + scores
        self.seen = np.concatenate([self.seen, np.zeros((b, 1))], axis=1) + 1
        self.is_generated = np.concatenate([self.is_generated, np.ones((b, 1), bool)], axis=1)
        self.generated += 1
        slots = scores.shape[1]
        old = self.is_generated.copy()
        old[:, max(0, slots - self.recent):] = False
        allowed = int(np.ceil(self.text_keep * max(0, self.generated - self.recent) - 1e-9))
        excess = int(old[0].sum()) - allowed
        if excess < self.chunk:
            return None
        mean = np.where(old, self.received / self.seen, np.inf)
        drop = np.argsort(mean, axis=1, kind="stable")[:, :excess]
        keep_mask = np.ones_like(old)
        np.put_along_axis(keep_mask, drop, False, axis=1)
        keep = np.stack([np.flatnonzero(row) for row in keep_mask])
        for name in ("received", "seen", "is_generated"):
            setattr(self, name, np.take_along_axis(getattr(self, name), keep, axis=1))
        self.evicted += excess
        return keep


class VisionPrefill:
    """The first ``step`` runs the image encoder and the VLM prefill graph and loads ``cache``
    with the kept tokens' keys/values; later steps decode through ``cache`` over the cache's
    own mask (the kept prompt tokens, then the generated ones ``budget`` leaves)."""

    def __init__(self, cache, prefill_session, vision_session, info, pixel_values: np.ndarray,
                 budget: TextBudget | None = None,
                 static_prompt: tuple[int, int] | None = None):
        self.cache, self.prefill, self.vision, self.info = (cache, prefill_session,
                                                            vision_session, info)
        self.pixels = pixel_values
        self.mask: np.ndarray | None = None
        self.kept_tokens: int | None = None
        self.budget = budget if hasattr(cache, "evict") else None
        # an NPU's fixed prefill graph: (its prompt length, the image token id); None: any
        self.static_prompt = static_prompt

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.mask is not None:
            self.mask = np.concatenate([self.mask, np.ones((ids.shape[0], 1), np.int64)], 1)
            logits = self.cache.step(ids, self.mask, positions)
            scores = getattr(self.cache, "scores", None)
            keep = None if self.budget is None or scores is None else self.budget.observe(
                scores.reshape(ids.shape[0], -1))
            if keep is not None:
                self.cache.evict(keep)
                self.mask = np.take_along_axis(self.mask, keep, axis=1)
            return logits
        pixels = self.pixels
        if pixels.shape[0] == 1 and ids.shape[0] > 1:
            pixels = np.repeat(pixels, ids.shape[0], axis=0)
        if pixels.shape[0] != ids.shape[0]:
            raise UserError(f"{pixels.shape[0]} images for {ids.shape[0]} prompts; give one "
                            "image, or one per prompt")
        features = self.vision._run({"pixel_values": pixels})["image_features"]
        tail = None
        if self.static_prompt is not None:  # the fixed-length head, the rest in chunks after
            ids, mask, positions, tail = _static_head(ids, mask, positions,
                                                      *self.static_prompt)
        out = self.prefill._run({"input_ids": ids, "image_features": features,
                                 "attention_mask": mask, "position_ids": positions})
        self.mask = out["attention_mask_kept"].astype(np.int64)
        self.cache.load_prompt([out[n] for n in self.info.present_names], self.mask)
        if self.budget is not None:
            self.budget.start(self.mask)
        if tail is not None:
            self.mask = np.concatenate([self.mask, tail[1]], axis=1)
        # the prompt's tokens kept, not the mask's slots (a static graph's padding counts none)
        self.kept_tokens = int(self.mask.sum(axis=1).max())
        return out["logits"] if tail is None else self.cache.step(tail[0], self.mask, tail[2])

    @property
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens_kept": self.kept_tokens}
        if self.budget is not None:
            out.update(generated_tokens_evicted=self.budget.evicted,
                       cache_tokens=int(self.mask.shape[1]))
        return out


def _static_head(ids, mask, positions, length: int, image_token: int):
    """A prompt fitted to a static prefill graph of ``length`` tokens: left-padded (masked) when
    shorter; when longer, its first ``length`` tokens, which must hold the image, and the rest
    (ids, mask, positions) for the decoder's chunked prefill."""
    n = ids.shape[1]
    if n <= length:
        pad = ((0, 0), (length - n, 0))
        return (np.pad(ids, pad), np.pad(mask, pad), np.pad(positions, pad, constant_values=1),
                None)
    if (ids[:, length:] == image_token).any():
        raise UserError(f"this static-shape artifact takes the image within the prompt's first "
                        f"{length} tokens; put it earlier (LLaVA: 'USER: <image>\\n...')")
    return ids[:, :length], mask[:, :length], positions[:, :length], (
        ids[:, length:], mask[:, length:], positions[:, length:])
