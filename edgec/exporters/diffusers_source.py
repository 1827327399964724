"""A local diffusers model directory as a compile source (offline, safetensors only).

A directory written by a diffusers model's ``save_pretrained`` has a ``config.json`` naming its
class in ``_class_name`` (transformers configs never have that key, so their checkpoints still go
to ``hf.py``) and ``diffusion_pytorch_model.safetensors`` (or shards with an index). It is loaded
with ``from_pretrained(local_files_only=True, use_safetensors=True)`` in float32: pickled
``*.bin`` weights are refused and nothing is fetched. The denoiser is exported as
``forward(hidden_states, encoder_hidden_states, timestep) -> sample`` with a dynamic batch; the
parameter map keeps the checkpoint's own names (``transformer_blocks.0.attn1.to_q.weight``).

Supported classes and their example inputs (``--config batch=1,frames=2,height=8,width=8,
text_len=N``; frames/height/width are latent sizes):

- ``CogVideoXTransformer3DModel``: hidden_states [B, F, C, H, W], encoder_hidden_states
  [B, L, text_embed_dim], timestep [B] int64. L defaults to ``max_text_seq_length`` (the
  pipeline pads prompts to it; with sin-cos position embeddings it must be that). With
  ``use_rotary_positional_embeddings`` the 3D RoPE tables are computed as the CogVideoX pipeline
  computes them for these sizes, so the graph is the pipeline's denoiser, not one without RoPE.
  CogVideoX predicts v on CogVideoXDDIMScheduler's schedule (the ``ddim-v`` sampler); that
  scheduler's settings come from ``../scheduler/scheduler_config.json`` when there is one.
- ``WanTransformer3DModel`` (text-to-video): hidden_states [B, C, F, H, W], timestep [B] float32,
  encoder_hidden_states [B, L, text_dim] (L defaults to 8; Wan's pipeline pads to 512). Wan is a
  flow-matching model (output ε − x0, timestep 1000σ), so its source info carries a ``sampling``
  entry for ``Session.sample``: the pipeline's scheduler (UniPC or FlowMatchEuler, its shift)
  from ``../scheduler/scheduler_config.json`` when the directory sits in a pipeline, else the
  Wan 2.1 pipelines' UniPC with flow shift 3.

The token grid (and CogVideoX's text prefix) go into the source's hyper-parameters, so
``--sparse-attention`` gets ``grid``/``prefix`` defaults as it does for the reference models.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from edgec.errors import UserError
from edgec.exporters.param_map import strip_prefix
from edgec.options import parse_options

__all__ = ["is_diffusers_model", "diffusers_source", "reload_module", "SUPPORTED", "WRAPPED"]

WRAPPED = "transformer."  # the wrapper's attribute prefix, stripped from parameter names
INPUTS = ("hidden_states", "encoder_hidden_states", "timestep")


@dataclasses.dataclass(frozen=True)
class ExampleShape:
    """``--config batch=N,frames=N,height=N,width=N,text_len=N`` (latent sizes; text_len 0:
    the class's default)."""

    batch: int = 1
    frames: int = 2
    height: int = 8
    width: int = 8
    text_len: int = 0

    def __post_init__(self):
        values = dataclasses.astuple(self)
        if not all(isinstance(v, int) for v in values) or min(values[:4]) < 1 or self.text_len < 0:
            raise UserError(f"batch, frames, height, width must be integers ≥ 1 and text_len "
                            f"≥ 0, got {self}")


def is_diffusers_model(path: Path) -> bool:
    """A diffusers model directory (config.json with ``_class_name``), or a pipeline root
    (``model_index.json``, refused with a hint by ``diffusers_source``)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return (path / "model_index.json").is_file()
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False  # hf.py reports an unreadable config
    return isinstance(data, dict) and "_class_name" in data


def diffusers_source(path: Path, config: str | None = None, dynamic_shapes=None):
    """The exported, verified ``Source`` of a diffusers model directory."""
    from edgec.exporters.diffusers_vae import VAES
    from edgec.exporters.diffusers_vae import WRAPPED as VAE_WRAPPED
    from edgec.exporters.sources import _from_torch

    module, inputs, dims, info = load_diffusers(path, config)
    src = _from_torch(module, inputs, dims if dynamic_shapes is None else dynamic_shapes,
                      ["sample"], info, "diffusers")
    prefix = VAE_WRAPPED if info["class"] in VAES else WRAPPED
    src.parameter_map = strip_prefix(src.parameter_map, prefix)
    return src


def load_diffusers(path: Path, config: str | None = None) -> tuple[Any, tuple, dict, dict]:
    """(wrapped module, example inputs, dynamic shapes, source info) for a model directory."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: is a diffusers pipeline (model_index.json); give the model's "
                        f"own folder, e.g. {path / 'transformer'}")
    from edgec.exporters.diffusers_vae import VAES, load_vae

    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("_class_name")
    if name not in SUPPORTED and name not in VAES:
        raise UserError(f"{path}: diffusers model class {name!r} is not supported; supported: "
                        f"{', '.join([*SUPPORTED, *VAES])}")
    opts = _options(config)
    model = _load_model(path, name)
    if name in VAES:  # its decoder, at static latent sizes
        module, inputs, dims, info = load_vae(model, name, opts)
    else:
        module, inputs, info = SUPPORTED[name](model, opts)
        dims = {n: {0: "batch"} for n in INPUTS}
    info = {"kind": "diffusers", "class": name, "path": str(path), "example": opts,
            "diffusers_version": cfg.get("_diffusers_version"), **info}
    if "sampling" in info:
        info["sampling"] = _with_scheduler(path, info["sampling"])
    return module, inputs, dims, info


def reload_module(info: dict[str, Any]):
    """The wrapper a diffusers source exported (``info``: its source info), loaded again from
    its directory; the diffusers model is its ``transformer``."""
    name = info["class"]
    if name not in SUPPORTED:
        raise UserError(f"LoRA on a {name} is not supported (the video DiTs' denoisers only)")
    module, _, _ = SUPPORTED[name](_load_model(Path(info["path"]), name), info["example"])
    return module


def _options(config: str | None) -> dict[str, int]:
    try:
        return dataclasses.asdict(parse_options(ExampleShape, config, "example"))
    except UserError as e:
        raise UserError("diffusers sources take --config batch=N,frames=N,height=N,width=N,"
                        f"text_len=N; {e}") from None


def _load_model(path: Path, name: str):
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickles are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}; save the model with "
                        "save_pretrained(safe_serialization=True)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import diffusers
        import torch
    except ImportError:
        raise UserError(f"{path}: a diffusers model needs diffusers; "
                        "pip install 'edgec[diffusers]'") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"{path}: diffusers {diffusers.__version__} has no {name}; upgrade "
                        "diffusers")
    try:
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                    torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: diffusers cannot load this model: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    return model.eval()


def _divisible(what: str, size: int, by: int) -> None:
    if size % by:
        raise UserError(f"diffusers source: {what}={size} must be a multiple of the patch size "
                        f"{by}")


def _wrap(model, extra=None):
    """``forward(hidden_states, encoder_hidden_states, timestep) -> sample``; ``extra(hidden
    states) -> kwargs`` adds what the pipeline computes outside the model (RoPE tables)."""
    import torch

    class DiffusersWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = model  # parameter names: "transformer." + the checkpoint's own

        def forward(self, hidden_states, encoder_hidden_states, timestep):
            kwargs = extra(hidden_states) if extra is not None else {}
            return self.transformer(hidden_states=hidden_states,
                                    encoder_hidden_states=encoder_hidden_states,
                                    timestep=timestep, return_dict=False, **kwargs)[0]

    return DiffusersWrapper()


def _example(opts, latent_shape, text_dim: int, text_len: int, timestep_dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    b = opts["batch"]
    x = torch.randn(b, *latent_shape, generator=g)
    text = torch.randn(b, text_len, text_dim, generator=g)
    if timestep_dtype is torch.int64:
        t = torch.randint(0, 1000, (b,), generator=g)
    else:
        t = torch.rand(b, generator=g) * 1000
    return x, text, t


def _cogvideox(model, opts):
    import torch

    c = model.config
    p, p_t = c.patch_size, c.patch_size_t
    f, h, w = opts["frames"], opts["height"], opts["width"]
    _divisible("height", h, p)
    _divisible("width", w, p)
    if p_t:
        _divisible("frames", f, p_t)
    text_len = opts["text_len"] or c.max_text_seq_length
    if not c.use_rotary_positional_embeddings and text_len != c.max_text_seq_length:
        raise UserError(f"CogVideoXTransformer3DModel with sin-cos position embeddings needs "
                        f"text_len={c.max_text_seq_length} (its max_text_seq_length)")
    if c.use_rotary_positional_embeddings and p_t and (h // p > c.sample_height // p
                                                       or w // p > c.sample_width // p):
        # slice RoPE reads a table of the sample size: a raw "Sizes of tensors must match"
        raise UserError(f"height={h}, width={w} exceed this CogVideoX's sample size "
                        f"{c.sample_height}x{c.sample_width} (its slice RoPE table); give "
                        "height/width within it")
    if not c.use_rotary_positional_embeddings:
        _sincos_at(model.patch_embed, f, h, w)
    extra = _cogvideox_rope(c) if c.use_rotary_positional_embeddings else None
    inputs = _example(opts, (f, c.in_channels, h, w), c.text_embed_dim, text_len, torch.int64)
    grid = [f // p_t if p_t else f, h // p, w // p]
    hp = {"grid": grid, "text_tokens": text_len, "layers": c.num_layers,
          "heads": c.num_attention_heads, "head_dim": c.attention_head_dim,
          "rope": bool(c.use_rotary_positional_embeddings)}
    # CogVideoXDDIMScheduler as the hub's pipelines ship it: v prediction, scaled-linear betas,
    # zero terminal SNR, trailing timesteps; SNR shift 3 (2B, sin-cos positions) or 1 (5B, RoPE)
    # unless the pipeline's scheduler_config.json says otherwise
    sampling = {"kind": "ddim-v", "samples": {"hidden_states": "sample"},
                "timestep": "timestep", "timestep_scale": 1.0,
                "conditions": ["encoder_hidden_states"], "guidance": 6.0, "steps": 50,
                "schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "snr_shift": 1.0 if c.use_rotary_positional_embeddings else 3.0,
                "zero_snr": True, "spacing": "trailing", "alpha_to_one": True, "solver": "ddim"}
    return _wrap(model, extra), inputs, {"hyperparameters": hp, "sampling": sampling}


def _sincos_at(embed, frames: int, height: int, width: int) -> None:
    """The sin-cos position table of a CogVideoX-2B-style patch embedding made for the
    compile's latent size, as its forward makes one for a size other than its sample size
    (it writes that one in place, which torch.export refused: exit 1 at any other size)."""
    if not getattr(embed, "use_positional_embeddings", False):
        return
    pre = (frames - 1) * embed.temporal_compression_ratio + 1
    if (embed.sample_height, embed.sample_width, embed.sample_frames) == (height, width, pre):
        return
    if embed.use_learned_positional_embeddings:
        raise UserError(f"this CogVideoX learned its position embeddings at "
                        f"{embed.sample_height}x{embed.sample_width}; compile it at that "
                        "height and width")
    table = embed._get_positional_embeddings(height, width, pre)
    embed.sample_height, embed.sample_width, embed.sample_frames = height, width, pre
    embed.pos_embedding = table.to(embed.pos_embedding.dtype)


def _cogvideox_rope(c):
    """The CogVideoX pipeline's ``_prepare_rotary_positional_embeddings``, on latent sizes."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    def rope(hidden_states) -> dict[str, Any]:
        _, frames, _, height, width = hidden_states.shape
        p, p_t = c.patch_size, c.patch_size_t
        gh, gw = int(height) // p, int(width) // p
        base_w, base_h = c.sample_width // p, c.sample_height // p
        if p_t is None:
            emb = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim,
                                          crops_coords=_crop_region((gh, gw), base_w, base_h),
                                          grid_size=(gh, gw), temporal_size=int(frames))
        else:
            emb = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None,
                                          grid_size=(gh, gw),
                                          temporal_size=(int(frames) + p_t - 1) // p_t,
                                          grid_type="slice", max_size=(base_h, base_w))
        return {"image_rotary_emb": emb}

    return rope


def _crop_region(src, tgt_width, tgt_height):
    """diffusers' ``get_resize_crop_region_for_grid`` (CogVideoX pipeline), without importing
    the pipeline (which needs transformers)."""
    th, tw = tgt_height, tgt_width
    h, w = src
    if h / w > th / tw:
        resize_height, resize_width = th, int(round(th / h * w))
    else:
        resize_width, resize_height = tw, int(round(tw / w * h))
    top, left = int(round((th - resize_height) / 2.0)), int(round((tw - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def _wan(model, opts):
    import torch

    c = model.config
    if c.image_dim or c.added_kv_proj_dim:
        raise UserError("WanTransformer3DModel: image-to-video variants (image_dim / "
                        "added_kv_proj_dim set) are not supported; text-to-video only")
    p_t, p_h, p_w = c.patch_size
    f, h, w = opts["frames"], opts["height"], opts["width"]
    _divisible("frames", f, p_t)
    _divisible("height", h, p_h)
    _divisible("width", w, p_w)
    text_len = opts["text_len"] or 8
    inputs = _example(opts, (c.in_channels, f, h, w), c.text_dim, text_len, torch.float32)
    hp = {"grid": [f // p_t, h // p_h, w // p_w], "layers": c.num_layers,
          "heads": c.num_attention_heads, "head_dim": c.attention_head_dim}
    # flow matching: x_σ = (1 − σ)x0 + σε, the output is ε − x0, timestep = 1000σ; without a
    # pipeline's scheduler config, the Wan 2.1 text-to-video pipelines' UniPC (flow shift 3,
    # guidance 5)
    sampling = {"kind": "flow", "samples": {"hidden_states": "sample"}, "timestep": "timestep",
                "timestep_scale": 1000.0, "conditions": ["encoder_hidden_states"],
                "solver": "unipc", "shift": 3.0, "guidance": 5.0, "steps": 50}
    return _wrap(model), inputs, {"hyperparameters": hp, "sampling": sampling}


def _with_scheduler(path: Path, sampling: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's scheduler settings, when the model directory sits in a pipeline
    (``../scheduler/scheduler_config.json``): flow's σ shift and timestep scale, DDIM's
    betas, SNR shift, zero-SNR rescale and spacing."""
    sched = path.parent / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return sampling
    try:
        cfg = json.loads(sched.read_text())
    except (OSError, ValueError):
        return sampling
    if not isinstance(cfg, dict):
        return sampling
    if sampling["kind"] == "ddim-v":
        return _ddim_scheduler(sched, cfg, sampling)
    return _flow_scheduler(sched, cfg, sampling)


# what edgec's UniPC is: data prediction on flow sigmas ending at zero, no dynamic shifting
_UNIPC_FIXED = {"predict_x0": True, "use_flow_sigmas": True, "final_sigmas_type": "zero",
                "lower_order_final": True, "thresholding": False, "use_dynamic_shifting": False,
                "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "solver_p": None, "shift_terminal": None,
                "prediction_type": "flow_prediction"}
_FLOWMATCH_FIXED = {"use_dynamic_shifting": False, "invert_sigmas": False,
                    "shift_terminal": None, "use_karras_sigmas": False,
                    "use_exponential_sigmas": False, "use_beta_sigmas": False,
                    "stochastic_sampling": False}


def _flow_scheduler(file: Path, cfg: dict[str, Any], sampling: dict[str, Any]
                    ) -> dict[str, Any]:
    """A Wan pipeline's UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler config;
    a setting edgec's re-derivation does not have is refused naming it."""
    name = cfg.get("_class_name")
    solver, fixed = {"UniPCMultistepScheduler": ("unipc", _UNIPC_FIXED),
                     "FlowMatchEulerDiscreteScheduler": ("flowmatch", _FLOWMATCH_FIXED)
                     }.get(name, (None, None))
    if solver is None:
        raise UserError(f"{file}: scheduler {name!r}; edgec samples Wan with "
                        "UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler")
    for key, want in fixed.items():
        if cfg.get(key, want) != want:
            raise UserError(f"{file}: {name} with {key}={cfg[key]!r} is not supported "
                            f"(edgec's sampler has {key}={want!r})")
    out = {**sampling, "solver": solver}
    shift = cfg.get("flow_shift" if solver == "unipc" else "shift", 1.0)
    train = cfg.get("num_train_timesteps", 1000)
    if not (isinstance(shift, (int, float)) and shift > 0 and isinstance(train, int)
            and train > 0):
        raise UserError(f"{file}: shift {shift!r} / num_train_timesteps {train!r}; give a "
                        "positive shift and an integer step count")
    out.update(shift=float(shift), timestep_scale=float(train))
    if solver == "unipc":
        order, kind = cfg.get("solver_order", 2), cfg.get("solver_type", "bh2")
        skip = cfg.get("disable_corrector", [])
        if order not in (1, 2, 3) or kind not in ("bh1", "bh2") or not isinstance(skip, list):
            raise UserError(f"{file}: solver_order {order!r} / solver_type {kind!r} / "
                            f"disable_corrector {skip!r}; edgec's UniPC takes order 1-3, bh1 "
                            "or bh2, a list of steps")
        out.update(solver_order=order, bh2=kind == "bh2", skip_corrector=list(skip))
    return out


_DDIM_KEYS = {"num_train_timesteps": ("train_steps", int), "beta_start": ("beta_start", float),
              "beta_end": ("beta_end", float), "beta_schedule": ("schedule", str),
              "snr_shift_scale": ("snr_shift", float),
              "rescale_betas_zero_snr": ("zero_snr", bool),
              "timestep_spacing": ("spacing", str), "set_alpha_to_one": ("alpha_to_one", bool)}


def _ddim_scheduler(file: Path, cfg: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """A CogVideoX pipeline's CogVideoXDDIMScheduler or CogVideoXDPMScheduler config (the same
    schedule, two solvers) over the defaults; another scheduler or a prediction type other
    than v is refused."""
    name = cfg.get("_class_name", "CogVideoXDDIMScheduler")
    solver = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}.get(name)
    if solver is None:
        raise UserError(f"{file}: scheduler {name!r}; edgec samples CogVideoX with "
                        "CogVideoXDDIMScheduler or CogVideoXDPMScheduler")
    if cfg.get("prediction_type", "v_prediction") != "v_prediction":
        raise UserError(f"{file}: prediction_type {cfg['prediction_type']!r}; edgec samples "
                        "CogVideoX as v_prediction (the hub pipelines' setting)")
    if cfg.get("trained_betas") is not None:
        raise UserError(f"{file}: trained_betas are not supported; use beta_schedule")
    out = {**sampling, "solver": solver}
    for key, (field, kind) in _DDIM_KEYS.items():
        if key in cfg:
            value = cfg[key]
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise UserError(f"{file}: {key} {value!r} is not a {kind.__name__}")
            out[field] = value
    if out["schedule"] not in ("scaled_linear", "linear"):
        raise UserError(f"{file}: beta_schedule {out['schedule']!r}; edgec's CogVideoX sampler "
                        "takes scaled_linear or linear")
    if out["spacing"] not in ("trailing", "linspace", "leading") or cfg.get("steps_offset"):
        raise UserError(f"{file}: timestep_spacing {out['spacing']!r} with steps_offset "
                        f"{cfg.get('steps_offset', 0)} is not supported (trailing, linspace, "
                        "leading without an offset)")
    return out


SUPPORTED = {"CogVideoXTransformer3DModel": _cogvideox, "WanTransformer3DModel": _wan}
