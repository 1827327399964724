"""Calibration samples of a diffusion denoiser taken from its own sampler's trajectory.

A denoiser's quantizers must hold what the sampler feeds it, step by step, and that is not
what independent draws give: reactive-dance predicts x0 with DDIM, so near t = 0 its noisy
input is close to its own prediction (std 3–4 on the tiny reference, max |latent| 13), where
N(0, 1) draws at every timestep held [−4.6, 4.4]. Calibrated and judged on those draws, the
w8a8 graph's floor read 0.9997 while a 50-step guided sample reached cosine 0.904 to the fp32
one. So a reference model with a sampler is calibrated as Q-Diffusion does (time-step-aware
calibration): the fp32 PyTorch model runs the artifact's sampler (its default guidance, the
guidance pair split so every feed has the example's batch) from seeded noise and conditions,
and the feeds it ran are the samples.

A trajectory of RECORD_STEPS steps gives PER_TRAJECTORY samples, one per step, in blocks of
four (``BLOCK``): block b holds steps b, 4 + b (run with the conditions zeroed: guidance's
unconditional half), 8 + b and 15 − b, so every four samples in a row (the accuracy floor's
held-out sets) span the trajectory from noise to its end, block 0 from its first step to its
last, and the 16 calibration samples are one whole trajectory. Trajectory ``j`` starts from
seed ``1000 + j``, so sample ``i`` does not depend on how many are asked for. Each sample
then takes a draw of conditions of its own (seed ``1000 + i``; the noisy input and timestep
stay the trajectory's): one trajectory's 16 samples had held one draw, and a condition-only
MatMul's range from one draw falls short of another's (a random-init Wan transformer's w8a8
samples: cosine 0.9979 to fp32, 0.9999 with a draw per sample; reactive-dance unchanged).
Cost: RECORD_STEPS runs of the fp32 model (twice that guided) per 16 samples; the 16
calibration samples and the floor's 4 held-out ones take two trajectories.

Reference models run their PyTorch module (``trajectory_inputs``); other denoiser graphs with
a sampling entry (a diffusers transformer, an .onnx from ``edgec export``) their fp32 graph in
ONNX Runtime, from random conditions (``graph_trajectory_inputs``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["trajectory_inputs", "graph_trajectory_inputs", "records_graph_trajectories",
           "RecordingSession", "PER_TRAJECTORY", "RECORD_STEPS", "ORIGIN", "GRAPH_ORIGIN"]

# the steps a recorded trajectory takes (the artifact's default when fewer); the late steps'
# inputs, where the drawn samples fell short, are much the same at 16 steps as at the
# default 50 (a flow's last σ is moved to the default count's: ``_flow_end``)
RECORD_STEPS = 16
BLOCK = 4  # = the floor's HELD_OUT
PER_TRAJECTORY = 4 * BLOCK
ORIGIN = "the fp32 model's own sampling trajectories"
GRAPH_ORIGIN = f"{ORIGIN}, random conditions (--data gives real ones)"


def trajectory_inputs(spec, config: str, n: int, skip: int = 0
                      ) -> list[tuple[torch.Tensor, ...]]:
    """Samples ``skip``..``n`` − 1 of ``spec``'s trajectories (module docstring), as input
    tuples in the model's input order; a trajectory is sampled once per process (the last few
    kept), and only where a sample asked for lies on it (the floor's held-out samples alone,
    ``skip`` 16, sample trajectory 1 only)."""
    out = []
    for i in range(skip, n):
        j, k = divmod(i, PER_TRAJECTORY)
        feeds = _trajectory(spec.name, config, j)[k]
        out.append(tuple(torch.from_numpy(feeds[name].copy()) for name in spec.input_names))
    return out


def graph_trajectory_inputs(src, n: int, skip: int = 0) -> list[dict[str, np.ndarray]]:
    """Samples ``skip``..``n`` − 1 of the trajectories an exported denoiser's fp32 graph takes
    under its sampling entry (a diffusers transformer, an .onnx from ``edgec export``), as feed
    dicts. The graph runs in ONNX Runtime as it was when first asked (calibration comes before
    quantization: a graph holding quantizers is refused); its conditions are random draws
    (``random_feeds``: trajectory ``j``'s from seed ``1000 + j``, sample ``i``'s from
    ``1000 + i``), where a user's ``--data`` gives real ones. The
    recordings and the session stay with the source (``Source.trajectories``) for the floor's
    held-out samples."""
    out = []
    for i in range(skip, n):
        j, k = divmod(i, PER_TRAJECTORY)
        out.append({name: v.copy() for name, v in _graph_trajectory(src, j)[k].items()})
    return out


def records_graph_trajectories(src) -> bool:
    """Whether ``src`` (not a reference model: those have ``ModelSpec.calibrates_on_trajectory``)
    calibrates on its graph's trajectories: it samples, and not by a score SDE, whose samples
    a prior mostly serves one step at a time (``denoise``) and whose untrained trajectories
    diverge (pose-prior's reference model keeps its draws for both reasons)."""
    sampling = src.info.get("sampling")
    return bool(sampling) and src.kind in ("onnx", "diffusers") and sampling["kind"] != "score"


def _graph_trajectory(src, j: int) -> list[dict[str, np.ndarray]]:
    cache = src.trajectories
    if cache.get("model") is not src.model:  # a copy of the source with another graph
        cache.clear()
        cache["model"] = src.model
    if j not in cache:
        if "run" not in cache:
            cache["run"] = _GraphRunner(src.model)
        feeds = _drawn_feeds(src, 1000 + j)
        cache[j] = _recorded(cache["run"], list(feeds), src.info["sampling"], feeds, 1000 + j,
                             lambda i: _drawn_feeds(src, 1000 + PER_TRAJECTORY * j + i))
    return cache[j]


def _drawn_feeds(src, seed: int) -> dict[str, np.ndarray]:
    """A graph's conditions for the trajectory from ``seed`` (its noisy samples and timestep
    are the sampler's): random feeds shaped as its example."""
    from edgec.calibration.samples import _specs
    from edgec.exporters.sources import random_feeds

    return random_feeds(_specs(src), seed=seed)


class _GraphRunner:
    """``model`` as it is now in its own ORT session (the passes edit the source's graph in
    place later), called as ``run(feeds) -> outputs``; its temp folder lives as long as it."""

    def __init__(self, model):
        import tempfile
        from pathlib import Path

        from edgec.errors import InternalError
        from edgec.onnx_io import save_model
        from edgec.runtimes.ort import OrtSession, model_feeds

        if any(node.op_type in ("QuantizeLinear", "DequantizeLinear")
               for node in model.graph.all_nodes()):
            raise InternalError("a sampling trajectory was asked of a graph already quantized; "
                                "it must be recorded on the fp32 graph")
        self._folder = tempfile.TemporaryDirectory(prefix="edgec-trajectory-")
        path = Path(self._folder.name) / "model.onnx"
        save_model(model, path)
        self._session = OrtSession(path)
        self._defaults = model_feeds(model, {})  # a swappable-LoRA graph's adapters: the base

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._session.run({**self._defaults, **feeds})


class RecordingSession:
    """A model as the sampler's session (``runtimes.sampling.sample``): ``run`` maps a feed dict
    to the outputs by name, ``feeds`` are its default feeds (their shapes the inputs'); every
    feed it ran is kept."""

    def __init__(self, run, input_names, sampling, feeds: dict[str, np.ndarray]):
        from edgec.runtimes.base import IOSpec

        self._run, self.names = run, list(input_names)
        self.manifest = {"sampling": dict(sampling)}
        self.default_feeds = feeds
        self.inputs = [IOSpec(k, v.shape, v.dtype.name) for k, v in feeds.items()]
        self.ran: list[dict[str, np.ndarray]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.array(feeds[k]) for k in self.names}
        self.ran.append(feeds)
        return self._run(feeds)


def _recorded(run, input_names, sampling, feeds: dict[str, np.ndarray], seed: int,
              draw) -> list[dict[str, np.ndarray]]:
    """The PER_TRAJECTORY feeds (module docstring) of one trajectory that ``run`` (the fp32
    model) takes from ``seed``'s noise under the conditions in ``feeds``; ``draw(i)``: the
    feeds whose conditions slot ``i`` takes instead."""
    from edgec.runtimes.sampling import SamplerSpec, _guided, sample

    sampler = SamplerSpec.from_manifest({"sampling": sampling})
    steps = min(sampler.steps, RECORD_STEPS)
    session = RecordingSession(run, input_names, sampling, feeds)
    conditions = {k: v for k, v in feeds.items()
                  if k not in sampler.samples and k != sampler.timestep}
    final = sample(session, conditions, steps=steps, seed=seed, guidance_mode="split")
    per_step = 2 if _guided(sampler, None) else 1
    last = session.ran[(steps - 1) * per_step]
    if sampler.kind == "flow" and steps < sampler.steps:
        last = _flow_end(last, final, sampler, steps)

    def at(slot: int) -> int:  # the step of slot 0..15 (fewer steps: spread over them)
        return round(slot * (steps - 1) / (PER_TRAJECTORY - 1))

    out = []
    for b in range(BLOCK):  # the second of each block: guidance's unconditional half where it
        out += [session.ran[at(b) * per_step],  # ran, else the step's feed (zeroed below)
                session.ran[at(4 + b) * per_step + per_step - 1],
                session.ran[at(8 + b) * per_step],
                last if b == 0 else session.ran[at(15 - b) * per_step]]
    return [_with_conditions(f, draw(i), sampler, i % BLOCK == 1) for i, f in enumerate(out)]


def _with_conditions(feed, drawn, sampler, unconditional: bool) -> dict[str, np.ndarray]:
    """``feed`` with every input but the noisy samples and the timestep from ``drawn``, the
    sampler's conditions zeroed in an unconditional slot as guidance's unconditional half zeroes
    them (unguided too: a user may sample with guidance)."""
    out = dict(feed)
    for k, v in drawn.items():
        if k not in sampler.samples and k != sampler.timestep:
            out[k] = np.zeros_like(v) if unconditional and k in sampler.conditions else v
    return out


# trajectories kept: 16 feeds each (motion-dit base: 16 MiB a feed), GPTQ's 132 samples take 9
@functools.lru_cache(maxsize=8)
def _trajectory(name: str, config: str, j: int) -> list[dict[str, np.ndarray]]:
    from edgec.models import registry

    spec = registry.get(name)
    base, opts = spec.resolve(config)
    module = _module(name, config)
    seed = 1000 + j
    feeds = {k: t.numpy() for k, t in zip(spec.input_names, spec.inputs(base, opts, seed))}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(v) for v in feeds.values()))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: t.numpy() for n, t in zip(spec.output_names, out)}

    def draw(i: int) -> dict[str, np.ndarray]:
        inputs = spec.inputs(base, opts, 1000 + PER_TRAJECTORY * j + i)
        return {k: t.numpy() for k, t in zip(spec.input_names, inputs)}

    return _recorded(run, spec.input_names, spec.sampling, feeds, seed, draw)


def _flow_end(last: dict[str, np.ndarray], final: dict[str, np.ndarray], sampler, steps: int
              ) -> dict[str, np.ndarray]:
    """The last step's feed moved along its own Euler step to the σ the artifact's default
    step count ends at: the shorter trajectory's last σ (0.167 at 16 steps, shift 3) stops short
    of it (0.058 at 50), and the quantized timestep would clamp there. Euler's last step is
    linear in σ (x − σ·v reaches the final sample at 0), so the feed at σ* lies on it."""
    from edgec.runtimes.sampling import flow_sigmas

    here = float(flow_sigmas(steps, sampler.shift)[steps - 1])
    there = float(flow_sigmas(sampler.steps, sampler.shift)[sampler.steps - 1])
    w = (here - there) / here
    feed = dict(last)
    for name in sampler.samples:
        feed[name] = (last[name] + w * (final[name] - last[name])).astype(last[name].dtype)
    t = last[sampler.timestep]
    value = there * sampler.timestep_scale
    feed[sampler.timestep] = np.full_like(t, round(value) if t.dtype.kind in "iu" else value)
    return feed


@functools.lru_cache(maxsize=1)
def _module(name: str, config: str):
    from edgec.models import registry

    return registry.get(name).build(config)

