"""Sampled latents to video frames with a compiled VAE decoder, as the CogVideoX / Wan pipelines'
``decode_latents`` and ``VideoProcessor.postprocess_video(output_type="np")`` do: the latents
un-normalized as the VAE's source info says (CogVideoX: [B, F, C, H, W] → [B, C, F, H, W],
÷ scaling_factor; Wan: × latents_std + latents_mean per channel), decoded, then
(x / 2 + 0.5) clipped to [0, 1] as [B, frames, H, W, 3]. ``save_gif`` writes one video.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgec.errors import UserError

__all__ = ["check_vae", "decode_video", "save_gif"]


def _decode_info(vae) -> dict:
    source = (getattr(vae, "manifest", None) or {}).get("source") or {}
    info = source.get("vae")
    if not info:
        raise UserError("--vae must be a compiled diffusers video VAE (AutoencoderKLCogVideoX "
                        "or AutoencoderKLWan folder), e.g. `edgec compile ./pipeline/vae "
                        "--config frames=N,height=N,width=N --target ort-cpu -o vae`")
    return info


def check_vae(vae, shape: tuple[int, ...], denoiser=None) -> None:
    """Refuse a VAE that cannot decode latents of ``shape`` (the denoiser's layout) from
    ``denoiser`` (its session): another pipeline's, or compiled at other sizes. ``sample`` runs
    it before the first step (a wrong --vae was refused only after every step had run)."""
    style = _decode_info(vae)["style"]
    kind = ((getattr(denoiser, "manifest", None) or {}).get("source") or {}).get("class", "")
    if denoiser is not None and not kind.lower().startswith(style):
        raise UserError(f"a {style} VAE cannot decode {kind or 'this model'}'s latents; give "
                        "the VAE of the same pipeline")
    got = _vae_layout(style, tuple(shape))
    want = next(i for i in vae.inputs if i.name == "latents").shape
    if len(want) != len(got) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
        sizes = ",".join(f"{k}={v}" for k, v in zip(("batch", "frames", "height", "width"),
                                                    (got[0], *got[2:])))
        raise UserError(f"the VAE decodes latents {list(want)}, the samples are {list(got)}: "
                        f"compile the VAE with --config {sizes}")


def _vae_layout(style: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The denoiser's latent shape as the VAE takes it (CogVideoX: [B, F, C, H, W] → [B, C, F,
    H, W])."""
    if style == "cogvideox" and len(shape) == 5:
        return (shape[0], shape[2], shape[1], *shape[3:])
    return shape


def decode_video(vae, latents: np.ndarray, denoiser=None) -> np.ndarray:
    """[B, frames, H, W, 3] float32 in [0, 1] from the sampled ``latents`` (the denoiser's
    layout); ``denoiser`` (its session) is checked to be the VAE's pipeline kind."""
    x = np.asarray(latents, np.float32)
    check_vae(vae, x.shape, denoiser)
    info = _decode_info(vae)
    if info["style"] == "cogvideox":
        x = x.transpose(0, 2, 1, 3, 4) / np.float32(info["scaling_factor"])
    else:
        shape = (1, -1, 1, 1, 1)
        x = (x * np.asarray(info["latents_std"], np.float32).reshape(shape)
             + np.asarray(info["latents_mean"], np.float32).reshape(shape))
    video = np.asarray(vae.run({"latents": x.astype(np.float32)})["sample"], np.float32)
    return np.clip(video / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)


def save_gif(frames: np.ndarray, path: Path, fps: float = 8.0) -> None:
    """One video [frames, H, W, 3] in [0, 1] as an animated GIF (Pillow), written to a
    temporary file renamed over ``path`` once complete (as ``save_npz``)."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("writing a GIF needs Pillow: pip install pillow") from None
    images = [Image.fromarray((f * 255).round().astype(np.uint8)) for f in frames]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:  # GIF keeps centiseconds: a whole number of them, so merged equal frames add up exactly
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=10 * max(1, round(100 / fps)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
