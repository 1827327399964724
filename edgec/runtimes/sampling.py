"""Diffusion samplers over a compiled denoiser: flow matching (Euler; diffusers' UniPC and
FlowMatchEuler for Wan), DDIM (x0 prediction; and v prediction on diffusers' scaled-linear
schedule, CogVideoX's; see ``schedulers``) and a sub-VP SDE (score), with
classifier-free guidance (zeroed or negative-prompt conditions), a seed and a dense-then-sparse
step schedule.

The manifest's ``sampling`` entry (a reference model's ``ModelSpec.sampling``) says which inputs
are noisy samples, which output predicts each, the timestep input and its scale, and which inputs
are conditions (zeroed in the unconditional half of guidance). Guidance runs the pair as one
batch of 2B when the graph's batch allows it, or as two runs of B; ``guidance_mode="auto"`` times
both on real steps of each graph (a warm and two timed runs of each, steps 0-5) and keeps the faster
for the rest: on a 2-core CPU one batch-2 run of video-dit small is slower than two batch-1 runs
(OpenVINO: 3.55 s vs 3.32 s dense, 1.66 s vs 1.40 s sparse). A sparse graph that selects its
blocks from batch row 0 for every row (``share=batch``) gives different samples batched (the
unconditional half attends over the conditional half's blocks) than split, so ``auto`` runs it
split without timing: a sample must not depend on which form ran faster. A sparse-attention
artifact built with ``dense_steps`` carries a dense companion graph (``runtime.dense``): the first
steps run it, the rest the sparse graph, as RainFusion and TimeRipple schedule their sparsity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgec.errors import UserError
from edgec.runtimes import schedulers

logger = logging.getLogger(__name__)

__all__ = ["SamplerSpec", "sample", "check_inputs", "flow_sigmas", "ddim_alphas", "subvp",
           "subvp_integral", "denoise", "fit_with_prior"]

KINDS = ("flow", "ddim-x0", "ddim-v", "score")
# what a score-kind model outputs: the score itself, or the noise ε̂ = −σ(t)·score (DPoser-X's and
# score_sde's networks: range-stable over t, where the score grows as 1/σ(t), ~10⁴ at t = 1e-3)
PREDICTIONS = ("score", "noise")
SPACINGS = ("trailing", "linspace", "leading")
# the solvers a kind can sample with (the artifact names its pipeline's; sample(solver=) swaps)
SOLVERS = {"flow": ("euler", "flowmatch", "unipc"), "ddim-v": ("ddim", "dpm")}


MAX_STEPS = 10_000  # continuous-time samplers (flow, score)
SCORE_EPS = 1e-3  # the score sampler's last t (its first is 1)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    kind: str
    samples: dict[str, str]          # noisy input → output predicting it
    timestep: str
    timestep_scale: float = 1000.0
    conditions: tuple[str, ...] = ()
    guidance: float = 1.0
    steps: int = 50
    shift: float = 1.0
    # flow: "euler" (σ uniform in [1, 0], shifted), or a diffusers pipeline's scheduler:
    # "flowmatch" (FlowMatchEulerDiscreteScheduler's grid) or "unipc" (UniPCMultistepScheduler);
    # ddim-v: "ddim" (CogVideoXDDIMScheduler) or "dpm" (CogVideoXDPMScheduler)
    solver: str = "euler"
    solver_order: int = 2
    bh2: bool = True
    skip_corrector: tuple[int, ...] = ()
    schedule: str = "cosine"
    train_steps: int = 1000
    beta_min: float = 0.1
    beta_max: float = 20.0
    prediction: str = "score"  # score: see PREDICTIONS
    # ddim-v: CogVideoXDDIMScheduler's schedule (scaled-linear betas, SNR shift, zero terminal
    # SNR, timestep spacing); the timestep is the integer train step (timestep_scale 1)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift: float = 1.0
    zero_snr: bool = False
    spacing: str = "trailing"
    alpha_to_one: bool = True

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> SamplerSpec:
        entry = manifest.get("sampling")
        if not entry:
            source = manifest.get("source") or {}
            cls_name = str(source.get("class", ""))
            if source.get("kind") == "diffusers" and not cls_name.startswith(
                    ("Autoencoder", "CLIP", "T5", "UMT5")):  # a denoiser edgec has no sampler for
                raise UserError(f"this {cls_name or 'diffusers model'} artifact has "
                                "no sampling entry (an edgec without its sampler compiled it); "
                                "compile it again, or run its denoiser with `edgec run`")
            if source.get("kind") == "diffusers":  # "compile it again" cannot help a VAE
                raise UserError(f"this {cls_name} artifact is not a denoiser; sample the "
                                "transformer's artifact (a VAE goes to --vae, a text encoder "
                                "to --text-encoder)")
            name = source.get("name", "this artifact")
            raise UserError(f"{name} is not a diffusion model (its manifest has no sampling "
                            "entry); `edgec models` lists the ones with a sampler")
        fields = {f.name for f in dataclasses.fields(cls)}
        entry = {k: v for k, v in entry.items() if k in fields}
        entry["samples"] = dict(entry["samples"])
        entry["conditions"] = tuple(entry.get("conditions", ()))
        entry["skip_corrector"] = tuple(entry.get("skip_corrector", ()))
        if entry.get("kind") == "ddim-v":  # written before CogVideoX had a second solver
            entry.setdefault("solver", "ddim")
        spec = cls(**entry)
        if spec.kind not in KINDS:
            raise UserError(f"sampler kind {spec.kind!r} unknown; upgrade edgec")
        if spec.kind == "score" and spec.prediction not in PREDICTIONS:
            raise UserError(f"score prediction {spec.prediction!r} unknown; upgrade edgec")
        if spec.kind == "ddim-v" and spec.spacing not in SPACINGS:
            raise UserError(f"timestep spacing {spec.spacing!r} unknown; upgrade edgec")
        if spec.kind in SOLVERS and spec.solver not in SOLVERS[spec.kind]:
            raise UserError(f"{spec.kind} solver {spec.solver!r} unknown; upgrade edgec")
        return spec

    def with_solver(self, solver: str | None) -> SamplerSpec:
        """This spec sampled with ``solver`` instead of the artifact's (as a diffusers user swaps
        ``pipe.scheduler`` for another over the same config)."""
        if solver is None or solver == self.solver:
            return self
        choices = SOLVERS.get(self.kind)
        if not choices:
            raise UserError(f"solver={solver!r}: this artifact's sampler ({self.kind}) has one "
                            "solver; leave solver out")
        if solver not in choices:
            raise UserError(f"solver={solver!r}: a {self.kind} artifact samples with one of: "
                            f"{', '.join(choices)}")
        return dataclasses.replace(self, solver=solver)


def flow_sigmas(steps: int, shift: float = 1.0) -> np.ndarray:
    """σ from 1 to 0 in ``steps`` Euler steps, shifted as SD3 / Wan do: σ' = sσ / (1 + (s−1)σ)."""
    s = np.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


def ddim_alphas(train_steps: int, schedule: str = "cosine") -> np.ndarray:
    """ᾱ_t for t = 0..T−1: the cosine schedule (Nichol & Dhariwal) or DDPM's linear betas."""
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, train_steps)
        return np.cumprod(1.0 - betas)
    s = 0.008
    f = np.cos((np.arange(train_steps + 1) / train_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


def subvp_integral(t, beta_min: float, beta_max: float):
    """∫₀ᵗ β(s) ds of the sub-VP SDE's linear β (a float, an array or a tensor): its mean
    coefficient is exp(−½·integral), its std 1 − exp(−integral)."""
    return beta_min * t + 0.5 * t * t * (beta_max - beta_min)


def subvp(t: float, spec: SamplerSpec) -> tuple[float, float, float]:
    """(β(t), mean coefficient α(t), std σ(t)) of the sub-VP SDE (Song et al. 2021)."""
    integral = subvp_integral(t, spec.beta_min, spec.beta_max)
    beta = spec.beta_min + t * (spec.beta_max - spec.beta_min)
    return beta, math.exp(-0.5 * integral), 1.0 - math.exp(-integral)


GUIDANCE_MODES = ("auto", "batch", "split")
_PROBE = ("batch", "split") * 3  # a warm run of each, then the faster of two timed runs of each


class _Denoiser:
    """One model evaluation with guidance; counts runs and switches dense → sparse graphs."""

    def __init__(self, session, spec: SamplerSpec, fixed: dict[str, np.ndarray], batch: int,
                 guidance: float, dense, dense_steps: int, mode: str = "auto",
                 negative: dict[str, np.ndarray] | None = None,
                 guidance_at: Callable[[float], float] | None = None):
        self.session, self.spec, self.fixed, self.batch = session, spec, fixed, batch
        self.guidance, self.dense, self.dense_steps = guidance, dense, dense_steps
        self.runs = 0
        self.cfg = _guided(spec, guidance)
        self.mode, self.probes = mode, {}  # graph name -> {mode: seconds}
        self.reason = None  # why the guidance mode is what it is, where not measured or asked
        self.guidance_at = guidance_at  # a per-timestep scale (CogVideoX's dynamic guidance)
        self.t_dtype = _timestep_dtype(session, spec)  # CogVideoX: the integer train step
        if self.cfg:  # the unconditional half: the negative conditions given, else zeros
            self.null = {**fixed, **{c: np.zeros_like(fixed[c]) for c in spec.conditions
                                     if c in fixed}, **(negative or {})}
            self.pair = _pairable(session, spec, batch, mode)
            self.shared = self.pair and _shared_selection(session)
            if self.shared and mode == "auto":
                self.reason = SHARED_SELECTION
            elif self.shared and mode == "batch":
                self.reason = "asked for; the pair shares the conditional half's block selection"
                logger.warning("guidance_mode='batch' on a graph whose sparse attention "
                               "computes one block selection for the whole batch (share=batch)"
                               ": the unconditional half attends over the conditional half's "
                               "blocks, so the samples differ from 'split' (which a batch-1 "
                               "run matches)")

    def __call__(self, step: int, x: dict[str, np.ndarray], t: float) -> dict[str, np.ndarray]:
        sess = self.dense if self.dense is not None and step < self.dense_steps else self.session
        t = t * self.spec.timestep_scale
        if self.t_dtype.kind in "iu":  # an integer step: t·scale is one up to rounding
            t = round(t)
        ts = np.full(self.batch, t, np.float64).astype(self.t_dtype)
        feeds = {**self.fixed, **x, self.spec.timestep: ts}
        if not self.cfg:
            self.runs += 1
            return self._predict(sess, feeds)
        null = {**self.null, **x, self.spec.timestep: ts}
        how, trial = self._how(sess)
        t0 = time.perf_counter()
        if how == "batch":  # one run of batch 2B: [conditional; unconditional]
            self.runs += 1
            both = self._predict(sess, {k: np.concatenate([feeds[k], null[k]]) for k in feeds})
            cond = {k: v[:self.batch] for k, v in both.items()}
            uncond = {k: v[self.batch:] for k, v in both.items()}
        else:
            self.runs += 2
            cond, uncond = self._predict(sess, feeds), self._predict(sess, null)
        if trial is not None:
            self._record(sess, trial, how, time.perf_counter() - t0)
        g = self.guidance if self.guidance_at is None else self.guidance_at(t)
        return {k: uncond[k] + g * (cond[k] - uncond[k]) for k in cond}

    def graph_name(self, sess) -> str:
        return "dense" if sess is self.dense and sess is not self.session else "main"

    def _how(self, sess) -> tuple[str, int | None]:
        """(batch | split, probe trial index or None) for this evaluation on ``sess``."""
        if not self.pair:
            return "split", None
        if self.mode != "auto":
            return self.mode, None
        if self.shared and sess is self.session:  # not timed: batch and split differ
            return "split", None
        chosen = getattr(sess, "guidance_modes", {}).get(self.batch)
        if chosen is not None:
            return chosen, None
        trials = self.probes.setdefault(self.graph_name(sess), {"trials": 0})
        n = trials["trials"]
        return _PROBE[n], n

    def _record(self, sess, n: int, how: str, seconds: float) -> None:
        probe = self.probes[self.graph_name(sess)]
        probe["trials"] = n + 1
        if n >= 2:  # the first run of each shape warms the runtime up
            ms = round(seconds * 1e3, 2)
            probe[f"{how}_ms"] = min(ms, probe.get(f"{how}_ms", ms))
        if n + 1 == len(_PROBE):
            probe["chosen"] = "batch" if probe["batch_ms"] <= probe["split_ms"] else "split"
            modes = getattr(sess, "guidance_modes", None)
            if modes is None:
                modes = {}
                try:
                    sess.guidance_modes = modes
                except AttributeError:  # a session that takes no attributes probes every time
                    pass
            modes[self.batch] = probe["chosen"]

    def final_mode(self) -> str | None:
        """How the last guidance pair on the main graph ran (None without guidance)."""
        if not self.cfg:
            return None
        how, trial = self._how(self.session)
        return how if trial is None else _PROBE[max(trial - 1, 0)]

    def _predict(self, sess, feeds) -> dict[str, np.ndarray]:
        out = sess.run(feeds)
        pred = {name: out[o].astype(np.float32) for name, o in self.spec.samples.items()}
        for name, o in self.spec.samples.items():  # the step would fail in numpy's broadcast
            if pred[name].shape != feeds[name].shape:  # (odd H/W under a 2x2 patch, say)
                example = np.shape((getattr(self.session, "default_feeds", None) or {}
                                    ).get(name))
                rows = [self.batch]  # as given, not as the guidance pair's 2B rows
                raise UserError(f"sample {name!r} has shape {rows + list(feeds[name].shape[1:])}"
                                f" but the model's prediction {o!r} has "
                                f"{rows + list(pred[name].shape[1:])}: give noise of a shape "
                                f"the model maps to itself (its example: {list(example)})")
        return pred


SHARED_SELECTION = ("the graph's sparse attention computes one block selection for the whole "
                    "batch (share=batch), so 'auto' runs the guidance pair split, each half "
                    "selecting its own blocks, without timing the two forms")


def _shared_selection(session) -> bool:
    """Does the (main) graph's sparse attention select its blocks from batch row 0 for every
    row (``share=batch`` with a site rewritten approximately)? Its manifest's pass record says."""
    passes = (getattr(session, "manifest", None) or {}).get("passes") or []
    stats = next((p.get("stats") or {} for p in passes
                  if p.get("name") == "sparse-attention"), {})
    return (stats.get("config") or {}).get("share") == "batch" and bool(
        stats.get("sites_approximate"))


def _timestep_dtype(session, spec: SamplerSpec) -> np.dtype:
    return np.dtype({i.name: i.dtype for i in session.inputs}.get(spec.timestep, "float32"))


def _fits_batch(session, spec: SamplerSpec, batch: int) -> bool:
    """Can one run take ``batch`` rows: every input's batch dim dynamic or exactly that?"""
    dims = [i.shape[0] for i in session.inputs if i.shape]
    return all(isinstance(d, str) or d is None or d == batch for d in dims)


def _pairable(session, spec: SamplerSpec, batch: int, mode: str) -> bool:
    """Can the guidance pair run as one batch of 2B; refuses guidance_mode='batch' if not."""
    pair = _fits_batch(session, spec, 2 * batch)
    if mode == "batch" and not pair:
        raise UserError("guidance_mode='batch' needs a graph whose batch dim takes "
                        f"{2 * batch} rows (it is static); use 'split' or 'auto'")
    return pair


def _guided(spec: SamplerSpec, guidance) -> bool:
    """Does classifier-free guidance run (``guidance`` None: the artifact's scale)? Only above
    1, as diffusers' pipelines (``guidance_scale > 1``): 1 or less samples the conditional
    prediction alone (0 sampled the unconditional one, ignoring the prompt)."""
    return bool(spec.conditions) and (spec.guidance if guidance is None
                                      else float(guidance)) > 1.0


def sample(session, conditions: Mapping[str, np.ndarray] | None = None, *,
           steps: int | None = None, guidance: float | None = None, seed: int = 0,
           dense_steps: int | None = None, callback: Callable[[int, int], None] | None = None,
           noise: Mapping[str, np.ndarray] | None = None, guidance_mode: str = "auto",
           negative: Mapping[str, np.ndarray] | None = None, prompt=None, negative_prompt=None,
           text_encoder=None, vae=None, dynamic_cfg: bool = False,
           solver: str | None = None) -> dict[str, np.ndarray]:
    """Run the artifact's sampler from Gaussian noise; returns the final samples by input name.

    ``conditions`` feeds every input that is not a noisy sample or the timestep (missing ones
    come from the artifact's example inputs); ``guidance`` 1.0 or less disables classifier-free
    guidance (the conditional prediction alone, as diffusers' pipelines); ``negative`` feeds
    condition inputs of the unconditional half (a negative prompt's embeddings, as diffusers
    pipelines take ``negative_prompt_embeds``; default zeros);
    ``prompt`` (a string or one per batch row; CogVideoX / Wan artifacts) is encoded by
    ``text_encoder`` (a loaded text-encoder artifact) as the pipeline encodes it, and so is
    ``negative_prompt`` (default "", as the pipelines); ``guidance_mode`` runs the guidance
    pair as one batch ("batch"), as two runs ("split"), or whichever measures faster on each
    graph ("auto", remembered by the session);
    ``vae`` (a loaded VAE-decoder artifact of the same pipeline) adds ``"video"``, the frames
    [B, frames, H, W, 3] in [0, 1] as the pipeline's ``output_type="np"``;
    ``dynamic_cfg`` (CogVideoX) scales guidance per step as CogVideoXPipeline's
    ``use_dynamic_cfg`` does;
    ``solver`` (default: the artifact's, from its pipeline's scheduler config) swaps the
    solver over the same schedule: flow "euler" / "flowmatch" / "unipc", CogVideoX "ddim" /
    "dpm" (CogVideoXDPMScheduler, stochastic: its noise comes from ``seed``);
    ``dense_steps`` (default: the artifact's) steps run the dense companion graph;
    ``callback(step, steps)`` after every step. Timings and model runs land in
    ``session.last_sampling``."""
    manifest = getattr(session, "manifest", None) or {}
    spec = SamplerSpec.from_manifest(manifest).with_solver(solver)
    steps = _check_steps(spec, steps)
    _check_options(session, spec, guidance, guidance_mode, dense_steps, seed, dynamic_cfg)
    conditions, negative = with_prompts(session, conditions, negative, prompt, negative_prompt,
                                        text_encoder, guidance=guidance)
    guidance = spec.guidance if guidance is None else float(guidance)
    rng = np.random.default_rng(seed)
    fixed, batch, x, negative = _start(session, spec, conditions, noise, rng, negative)
    if vae is not None:  # before the first step, not after the last
        from edgec.runtimes.video import check_vae

        check_vae(vae, np.shape(next(iter(x.values()))), session)
    dense, n_dense = _dense(session, dense_steps)
    n_dense = min(n_dense, steps)  # more dense steps than steps: every step runs dense
    model = _Denoiser(session, spec, fixed, batch, guidance, dense, n_dense, guidance_mode,
                      negative, _dynamic_cfg(guidance, steps) if dynamic_cfg else None)
    t0 = time.perf_counter()
    x = {"flow": _flow, "ddim-x0": _ddim, "ddim-v": _ddim_v, "score": _score}[spec.kind](
        model, spec, x, steps, rng, callback)
    if vae is not None:
        from edgec.runtimes.video import decode_video

        (latents,) = x.values()
        x = {**x, "video": decode_video(vae, latents, session)}
    session.last_sampling = {"kind": spec.kind,
                             "solver": spec.solver if spec.kind in SOLVERS else None,
                             "steps": steps,
                             "guidance": guidance,
                             "dense_steps": n_dense, "model_runs": model.runs,
                             "seconds": time.perf_counter() - t0,
                             "guidance_mode": model.final_mode(),
                             "guidance_batched": model.final_mode() == "batch",
                             "guidance_mode_reason": model.reason if model.cfg else None,
                             "guidance_probe_ms": {k: {m: v for m, v in p.items()
                                                       if m != "trials"}
                                                   for k, p in model.probes.items()}}
    return x


def _dynamic_cfg(guidance: float, steps: int) -> Callable[[float], float]:
    """CogVideoXPipeline's ``use_dynamic_cfg`` scale at the integer timestep t, as diffusers
    computes it: 1 + g·(1 − cos(π·((steps − t) / steps)⁵)) / 2 (t the train step, not the
    step index: its published form)."""
    return lambda t: 1.0 + guidance * (1.0 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)
                                       ) / 2.0


def with_prompts(session, conditions, negative, prompt, negative_prompt, text_encoder, *,
                 guidance=None):
    """(conditions, negative conditions) with the prompts' embeddings in them. Negatives given
    where no guidance runs (``guidance`` ≤ 1, or None and the artifact's ≤ 1) are refused:
    they would be ignored."""
    spec = SamplerSpec.from_manifest(getattr(session, "manifest", None) or {})
    _unused_negatives(spec, negative, negative_prompt, guidance)
    if prompt is None:
        if negative_prompt is not None:
            raise UserError("negative_prompt needs a prompt (or give negative embeddings)")
        return conditions, negative
    if negative is not None and negative_prompt is not None:
        raise UserError("give negative_prompt or negative embeddings, not both")
    from edgec.runtimes.prompts import prompt_conditions

    cond, neg = prompt_conditions(session, text_encoder, prompt, negative_prompt,
                                  guided=_guided(spec, guidance))
    if conditions and set(cond) & set(conditions):
        raise UserError(f"give a prompt or {next(iter(cond))} in the conditions, not both")
    return {**(conditions or {}), **cond}, (negative if negative is not None else neg)


def _unused_negatives(spec: SamplerSpec, negative, negative_prompt, guidance) -> None:
    """Refuse negatives given where no guidance runs (``guidance`` ≤ 1, or None and the
    artifact's ≤ 1): they would be ignored."""
    given = ("negative_prompt is", "it") if negative_prompt is not None else (
        "negative conditions are", "them")
    if (negative is not None or negative_prompt is not None) and spec.conditions and (
            not _guided(spec, guidance)):
        scale = float(spec.guidance if guidance is None else guidance)
        default = " (the artifact's default)" if guidance is None else ""
        raise UserError(f"{given[0]} used by guidance, which runs above 1; guidance is "
                        f"{scale:g}{default}: give a guidance scale above 1, or leave "
                        f"{given[1]} out")


def check_inputs(session, conditions: Mapping[str, np.ndarray] | None = None,
                 noise: Mapping[str, np.ndarray] | None = None,
                 negative: Mapping[str, np.ndarray] | None = None, *,
                 steps: int | None = None, guidance: float | None = None,
                 guidance_mode: str = "auto", dense_steps: int | None = None, seed: int = 0,
                 solver: str | None = None, dynamic_cfg: bool = False, vae=None) -> None:
    """Refuse conditions (and noise) ``sample`` could not run, before anything runs: unknown
    names, and shapes the main graph does not take (a sparse-attention graph's baked-in grid);
    and the options: steps, guidance, guidance_mode (and whether 'batch' fits the graph's
    batch), dense_steps, seed, solver, dynamic_cfg, and a ``vae`` session's latent sizes.
    ``sample`` checks them too; the CLI calls this before it shows its progress bar."""
    spec = SamplerSpec.from_manifest(getattr(session, "manifest", None) or {}).with_solver(solver)
    _check_steps(spec, steps)
    _check_options(session, spec, guidance, guidance_mode, dense_steps, seed, dynamic_cfg)
    _unused_negatives(spec, negative, None, guidance)
    _, batch, x, _ = _start(session, spec, conditions, noise, np.random.default_rng(0), negative)
    if vae is not None:
        from edgec.runtimes.video import check_vae

        check_vae(vae, np.shape(next(iter(x.values()))), session)
    if _guided(spec, guidance):
        _pairable(session, spec, batch, guidance_mode)


def _whole(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _check_steps(spec: SamplerSpec, steps) -> int:
    """The number of steps to run (None: the artifact's), checked against the sampler."""
    if steps is not None and not _whole(steps):  # int() ran 2.7 as 2 steps
        raise UserError(f"steps={steps!r}: give a whole number of sampling steps")
    steps = spec.steps if steps is None else int(steps)
    if steps < 1:
        raise UserError(f"steps={steps}: give at least one sampling step")
    # a discrete schedule has no steps between its train steps (DDIM repeated timesteps); no
    # sampler needs more than MAX_STEPS (10**11 steps was a MemoryError for the σ grid)
    most = spec.train_steps if spec.kind in ("ddim-x0", "ddim-v") else MAX_STEPS
    if steps > most:
        raise UserError(f"steps={steps}: this model's {spec.kind} sampler takes at most {most} "
                        f"steps; give fewer")
    return steps


def _check_options(session, spec: SamplerSpec, guidance, guidance_mode, dense_steps, seed,
                   dynamic_cfg=False):
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
            raise UserError(f"guidance={guidance!r}: give a number (1.0: no guidance)")
        if not math.isfinite(float(guidance)):
            raise UserError(f"guidance={guidance}: give a finite number (1.0: no guidance)")
        if float(guidance) > 1.0 and not spec.conditions:  # it was ignored, and reported
            raise UserError(f"guidance={guidance}: this model has no conditions to guide; "
                            "give 1 or less (no guidance)")
    if guidance_mode not in GUIDANCE_MODES:
        raise UserError(f"guidance_mode={guidance_mode!r}: choose one of "
                        f"{', '.join(GUIDANCE_MODES)}")
    if seed is not None and (not _whole(seed) or seed < 0):  # numpy: "expected non-negative
        raise UserError(f"seed={seed}: give a non-negative integer")  # integer"
    if dense_steps is not None and not _whole(dense_steps):
        raise UserError(f"dense_steps={dense_steps!r}: give a whole number of steps")
    if dynamic_cfg and spec.kind != "ddim-v":
        raise UserError("dynamic_cfg is CogVideoX's guidance schedule (a ddim-v artifact); "
                        "this artifact samples with a constant guidance scale")
    _dense_entry(session, dense_steps)


def _start(session, spec: SamplerSpec, conditions, noise, rng, negative=None):
    """(the fixed inputs, the batch, the initial noisy samples, the negative conditions),
    checked against the model."""
    default = dict(getattr(session, "default_feeds", {}) or {})
    fixed = {k: np.asarray(v) for k, v in {**default, **(conditions or {})}.items()
             if k not in spec.samples and k != spec.timestep}
    known = {i.name for i in session.inputs}
    unknown = sorted(set(conditions or {}) - known)
    if unknown:
        raise UserError(f"unknown input {unknown[0]!r}; the model's inputs are: "
                        f"{', '.join(sorted(known))}")
    for name, value in (conditions or {}).items():  # these were dropped, or sampled NaN
        if name in spec.samples:
            raise UserError(f"{name!r} is the noisy sample, not a condition; give its starting "
                            "noise through noise= (Python) and leave it out of the conditions")
        if name == spec.timestep:
            raise UserError(f"{name!r} is the model's timestep input, which the sampler sets "
                            "at each step; leave it out of the conditions")
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise UserError(f"condition {name!r} holds NaN or inf; give finite values")
    _check_noise(spec, noise)
    batch = _batch(fixed, default, spec, noise)
    _check_batch(session, spec, fixed, conditions, batch)
    x = {}
    for name in spec.samples:
        shape = (batch, *np.shape(default[name])[1:]) if name in default else None
        if noise is not None and name in noise:
            x[name] = np.asarray(noise[name], np.float32)
            given = int(np.shape(x[name])[0]) if np.ndim(x[name]) else None
            by = _batch_input(fixed, spec)
            if by is not None and given is not None and given != batch:
                # the feed check named the timestep the sampler makes, not the condition
                whose = "given" if by in (conditions or {}) else "the artifact's example"
                raise UserError(f"noise {name!r} has batch {given}, but condition {by!r} "
                                f"({whose}) has batch {batch}; give both for the same number "
                                "of samples")
        elif shape is None:
            raise UserError(f"no example shape for sample input {name!r}; pass noise={{...}}")
        else:
            x[name] = rng.standard_normal(shape).astype(np.float32)
    negative = _negative(spec, fixed, negative)
    check = getattr(session, "_check_feeds", None)
    if check is not None:  # the main graph's shapes, before any step runs (dense ones too)
        check({**fixed, **x, spec.timestep: np.zeros(batch, _timestep_dtype(session, spec))})
    return fixed, batch, x, negative


def _check_batch(session, spec: SamplerSpec, fixed, conditions, batch: int) -> None:
    """Refuse fixed inputs whose batches disagree, or a batch a static-batch graph does not
    take, naming the conditions and where each came from: the feed check named the noisy
    sample the sampler makes at the batch ("inputs 'latent' and 'music' share dim 'batch'",
    "input 'latent' has shape [1, ...], the model wants [2, ...]")."""
    by = _batch_input(fixed, spec)
    if by is None:
        return
    dims = {i.name: i.shape[0] for i in session.inputs if i.shape}

    def what(name: str) -> str:
        kind = "condition" if name in spec.conditions else "input"
        whose = "given" if name in (conditions or {}) else "the artifact's example"
        return f"{kind} {name!r} ({whose})"

    if isinstance(dims.get(by), int) and dims[by] != batch:
        raise UserError(f"{what(by)} has batch {batch}, but this artifact's graph takes a "
                        f"static batch of {dims[by]}; give conditions of batch {dims[by]}")
    for name, value in fixed.items():
        if name != by and np.ndim(value) and name in dims and dims[name] == dims.get(by) \
                and int(np.shape(value)[0]) != batch:
            raise UserError(f"{what(by)} has batch {batch}, but {what(name)} has batch "
                            f"{int(np.shape(value)[0])}; give both for the same number of "
                            "samples")


def _check_noise(spec: SamplerSpec, noise) -> None:
    """Refuse noise the sampler would ignore (a misspelt name: random noise ran instead) or
    that samples NaN."""
    if noise is None:
        return
    if not isinstance(noise, Mapping):
        raise UserError(f"noise= takes {{sample input name: array}}, not "
                        f"{type(noise).__name__}; the sample inputs: {', '.join(spec.samples)}")
    for name, value in noise.items():
        if name not in spec.samples:
            raise UserError(f"noise {name!r} is not a sample input of this model; its sample "
                            f"inputs are: {', '.join(spec.samples)}")
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise UserError(f"noise {name!r} has dtype {value.dtype}; give float values")
        if not np.isfinite(value).all():
            raise UserError(f"noise {name!r} holds NaN or inf; give finite values")


def _negative(spec: SamplerSpec, fixed, negative) -> dict[str, np.ndarray]:
    """The negative conditions, each a condition input shaped as its conditional feed."""
    out = {}
    for name, value in (negative or {}).items():
        if name not in spec.conditions:
            raise UserError(f"negative input {name!r} is not a condition of this model; its "
                            f"conditions are: {', '.join(spec.conditions) or 'none'}")
        value = np.asarray(value)
        want = np.shape(fixed.get(name))
        if value.shape != want or value.dtype.kind not in "fiu":
            raise UserError(f"negative {name!r} has shape {list(value.shape)} "
                            f"({value.dtype}); give one shaped as the condition, {list(want)}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UserError(f"negative {name!r} holds NaN or inf; give finite values")
        out[name] = value.astype(fixed[name].dtype)
    return out


def _batch_input(fixed, spec) -> str | None:
    """The condition (else other fixed input) whose leading dim is the batch."""
    return next((name for name in (*spec.conditions, *fixed)
                 if name in fixed and np.ndim(fixed[name])), None)


def _batch(fixed, default, spec, noise=None) -> int:
    """The batch: a condition's (or other fixed input's), else the given noise's (a model with
    no inputs but its sample and timestep, pose-prior), else the example's."""
    name = _batch_input(fixed, spec)
    if name is not None:
        return int(np.shape(fixed[name])[0])
    given = next((np.shape(v) for k, v in (noise or {}).items() if k in spec.samples
                  and np.ndim(v)), None)
    if given is not None:
        return int(given[0])
    first = next(iter(spec.samples))
    return int(np.shape(default[first])[0]) if first in default else 1


def _dense_entry(session, dense_steps: int | None):
    """(the manifest's dense graph entry or None, how many steps it runs), checked."""
    entry = ((getattr(session, "manifest", None) or {}).get("runtime") or {}).get("dense")
    if dense_steps is not None and int(dense_steps) < 0:
        raise UserError(f"dense_steps={dense_steps}: give 0 or more dense steps")
    n = int(entry.get("steps", 0)) if entry and dense_steps is None else int(dense_steps or 0)
    if n > 0 and entry is None:
        raise UserError("dense_steps needs an artifact compiled with --sparse-attention "
                        "...,dense_steps=N that rewrote attention (it carries the dense graph "
                        "beside the sparse one); this one has no dense graph")
    return entry, n


def _dense(session, dense_steps: int | None):
    """(dense session or None, how many steps it runs)."""
    entry, n = _dense_entry(session, dense_steps)
    if n <= 0:
        return None, 0
    dense = getattr(session, "dense_session", None)
    if dense is None:
        from edgec.runtimes import open_session

        dense = session.dense_session = open_session(session.root, entry)
        dense.share_adapters(session)  # swappable LoRA: the dense steps run the same adapter
    return dense, n


def _flow(model, spec, x, steps, rng, callback):
    """Euler over σ (edgec's uniform grid or FlowMatchEuler's), or diffusers' UniPC; the
    timestep fed is σ·scale (UniPC's: truncated to an integer, as its pipeline feeds it)."""
    scale = spec.timestep_scale
    if spec.solver == "euler":
        sigmas = flow_sigmas(steps, spec.shift)
        timesteps = sigmas[:-1] * scale
    elif spec.solver == "flowmatch":
        sigmas, timesteps = schedulers.flowmatch_sigmas(steps, spec.shift, int(scale))
    else:
        sigmas, timesteps = schedulers.unipc_sigmas(steps, spec.shift, int(scale))
        solvers = {k: schedulers.UniPC(sigmas, spec.solver_order, spec.bh2,
                                       skip_corrector=spec.skip_corrector) for k in x}
    for i in range(steps):
        v = model(i, x, float(timesteps[i]) / scale)
        if spec.solver == "unipc":
            x = {k: solvers[k](i, x[k], v[k]) for k in x}
        else:
            x = {k: x[k] + np.float32(sigmas[i + 1] - sigmas[i]) * v[k] for k in x}
        if callback:
            callback(i + 1, steps)
    return x


def _ddim(model, spec, x, steps, rng, callback):
    alphas = ddim_alphas(spec.train_steps, spec.schedule)
    ts = np.linspace(spec.train_steps - 1, 0, steps).round().astype(int)
    for i, t in enumerate(ts):
        x0 = model(i, x, float(t))
        a = alphas[t]
        a_next = alphas[ts[i + 1]] if i + 1 < steps else 1.0
        eps = {k: (x[k] - math.sqrt(a) * x0[k]) / math.sqrt(1.0 - a) for k in x}
        x = {k: (math.sqrt(a_next) * x0[k] + math.sqrt(1.0 - a_next) * eps[k]).astype(np.float32)
             for k in x}
        if callback:
            callback(i + 1, steps)
    return x


def _ddim_v(model, spec, x, steps, rng, callback):
    """A v-predicting model sampled as CogVideoXDDIMScheduler.step (deterministic DDIM, η = 0)
    or CogVideoXDPMScheduler.step (``solver="dpm"``): the previous timestep is t − T // steps
    (ᾱ = 1 past the end with ``alpha_to_one``)."""
    alphas = schedulers.ddim_v_alphas(spec)
    final = 1.0 if spec.alpha_to_one else float(alphas[0])
    ts = schedulers.ddim_v_timesteps(spec, steps)
    old = {k: None for k in x}  # DPM's previous data prediction
    for i, t in enumerate(ts):
        v = model(i, x, float(t))
        a = float(alphas[t])
        prev = int(t) - spec.train_steps // steps
        a_prev = float(alphas[prev]) if prev >= 0 else final
        x0 = {k: math.sqrt(a) * x[k] - math.sqrt(1.0 - a) * v[k] for k in x}
        if spec.solver == "dpm":
            a_back = float(alphas[ts[i - 1]]) if i else None
            x = {k: schedulers.dpm_sde_step(x[k], x0[k], old[k], a, a_prev, a_back, prev < 0,
                                            rng) for k in x}
            old = x0
        else:
            c_x = math.sqrt((1.0 - a_prev) / (1.0 - a))
            c_x0 = math.sqrt(a_prev) - math.sqrt(a) * c_x
            x = {k: (c_x * x[k] + c_x0 * x0[k]).astype(np.float32) for k in x}
        if callback:
            callback(i + 1, steps)
    return x


def _to_score(out: np.ndarray, sigma: float, spec: SamplerSpec) -> np.ndarray:
    """The score from a score-kind model's output, on the host in float64: the output itself, or
    −ε̂ / σ(t) (a graph that divided by σ(t) would hold both at 8/16 bits on an NPU)."""
    if spec.prediction == "noise":
        return -np.asarray(out, np.float64) / sigma
    return out


def _score(model, spec, x, steps, rng, callback, eps: float = SCORE_EPS):
    """Euler–Maruyama on the reverse sub-VP SDE from t = 1 to ``eps`` (last step noise-free)."""
    ts = np.linspace(1.0, eps, steps)
    dt = -(1.0 - eps) / steps
    for i, t in enumerate(ts):
        beta, _, sigma = subvp(float(t), spec)
        g2 = beta * (1.0 - math.exp(-2.0 * subvp_integral(t, spec.beta_min, spec.beta_max)))
        score = {k: _to_score(v, sigma, spec) for k, v in model(i, x, float(t)).items()}
        mean = {k: x[k] + (-0.5 * beta * x[k] - g2 * score[k]) * dt for k in x}
        last = i + 1 == steps
        x = {k: (mean[k] if last else mean[k] + math.sqrt(g2 * -dt)
                 * rng.standard_normal(mean[k].shape)).astype(np.float32) for k in x}
        if callback:
            callback(i + 1, steps)
    return x


def denoise(session, x0: np.ndarray, t: float, rng: np.random.Generator,
            spec: SamplerSpec | None = None) -> tuple[np.ndarray, float]:
    """DPoser's one-step prior: perturb ``x0`` to ``t``, denoise once (Tweedie:
    x̂0 = (x_t + σ²·score) / α). Returns (x̂0, the loss weight ½√(1 + SNR²))."""
    spec = spec or SamplerSpec.from_manifest(getattr(session, "manifest", None) or {})
    if not (isinstance(t, numbers.Real) and 0 < float(t) <= 1):  # σ(0) = 0: a division by zero
        raise UserError(f"t={t!r}: the sub-VP SDE's time lies in (0, 1]")
    (name, out), = spec.samples.items()
    _, alpha, sigma = subvp(t, spec)
    xt = (alpha * x0 + sigma * rng.standard_normal(x0.shape)).astype(np.float32)
    other = {k: v for k, v in (getattr(session, "default_feeds", None) or {}).items()
             if k not in (name, spec.timestep) and np.shape(v)[:1] == (len(x0),)}
    feeds = {**other, name: xt,
             spec.timestep: np.full(len(x0), t * spec.timestep_scale, np.float32)}
    score = _to_score(session.run(feeds)[out], sigma, spec)
    snr = alpha / sigma
    return ((xt + sigma ** 2 * score) / alpha).astype(np.float32), 0.5 * math.sqrt(1 + snr ** 2)


def fit_with_prior(session, observed: np.ndarray, known: np.ndarray | None = None, *,
                   iterations: int = 100, t_range: tuple[float, float] = (0.12, 0.08),
                   prior_weight: float = 1.0, lr: float = 0.1, seed: int = 0) -> np.ndarray:
    """Fit a pose to ``observed`` where ``known`` (bool, same shape) is True, the pose prior
    filling the rest: gradient steps on ‖known·(x − observed)‖² + w·λ(t)·‖x − x̂0(x)‖² with x̂0
    detached and t falling linearly over the iterations (DPoser-X's truncated schedule)."""
    spec = SamplerSpec.from_manifest(getattr(session, "manifest", None) or {})
    if spec.kind != "score":
        raise UserError("fit_with_prior needs a score-model artifact (e.g. pose-prior)")
    observed = np.asarray(observed, np.float32)
    known = np.ones_like(observed, bool) if known is None else np.asarray(known, bool)
    if known.shape != observed.shape:
        raise UserError(f"known has shape {list(known.shape)}; give one flag per observed "
                        f"entry, {list(observed.shape)}")
    if not np.isfinite(observed[known]).all():
        raise UserError("observed holds NaN or inf where known is True; mark such entries "
                        "unknown")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or \
            iterations < 1:
        raise UserError(f"iterations={iterations!r}: give an integer ≥ 1")
    for name, value in (("lr", lr), ("prior_weight", prior_weight)):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise UserError(f"{name}={value!r}: give a finite number ≥ 0")
    rng = np.random.default_rng(seed)
    x = np.where(known, observed, 0.0).astype(np.float32)
    for t in np.linspace(t_range[0], t_range[1], iterations):
        x0_hat, weight = denoise(session, x, float(t), rng, spec)
        # unknown entries play no part (NaN there, a common "missing" mark, was 0·NaN = NaN and
        # spread to every entry through the network)
        fit = np.where(known, x - observed, 0.0)
        grad = 2.0 * fit + prior_weight * weight * (x - x0_hat)
        x = (x - lr * grad).astype(np.float32)
    return x
