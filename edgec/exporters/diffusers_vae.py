"""A diffusers video VAE directory (``AutoencoderKLCogVideoX``, ``AutoencoderKLWan``) as a compile
source: its *decoder*, ``forward(latents [B, C, F, H, W]) -> sample [B, 3, frames, H', W']``,
exported at the latent sizes of ``--config batch=N,frames=N,height=N,width=N`` (static: the causal
3D convolutions' frame caches unroll over the latent frames; compile it at the denoiser's
sizes). How the pipeline un-normalizes latents before decoding (CogVideoX: ÷ scaling_factor;
Wan: × latents_std + latents_mean per channel) goes into the source info, so ``Session.sample``
decodes as the pipeline's ``decode_latents`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VAES", "WRAPPED", "load_vae"]

VAES = ("AutoencoderKLCogVideoX", "AutoencoderKLWan")
WRAPPED = "vae."  # the wrapper's attribute prefix, stripped from parameter names


def _wrap(model):
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = model  # parameter names: "vae." + the checkpoint's own

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    return VaeDecoder()


def load_vae(model, name: str, opts: dict[str, int]) -> tuple[Any, tuple, dict, dict]:
    """(decoder wrapper, example latents, dynamic shapes (none), source info)."""
    import torch

    c = model.config
    if name == "AutoencoderKLCogVideoX":
        channels = c.latent_channels
        decode = {"style": "cogvideox", "scaling_factor": float(c.scaling_factor)}
    else:
        channels = c.z_dim
        decode = {"style": "wan", "latents_mean": [float(v) for v in c.latents_mean],
                  "latents_std": [float(v) for v in c.latents_std]}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(opts["batch"], channels, opts["frames"], opts["height"],
                          opts["width"], generator=g)
    hp = {"latent_channels": channels, "latent_frames": opts["frames"]}
    return _wrap(model), (latents,), {}, {"hyperparameters": hp, "vae": decode}
