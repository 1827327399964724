"""A reference denoiser's calibration samples come from its own fp32 sampler: one trajectory
gives 16, one per step, in blocks of four that each span it (the first block from its first
step to its last, at the default step count's timestep), a quarter of them guidance's
unconditional half; determinism, and ``skip``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgec.calibration.samples import generated_samples
from edgec.calibration.trajectory import BLOCK, ORIGIN, PER_TRAJECTORY, RECORD_STEPS
from edgec.models import registry
from edgec.runtimes.base import IOSpec
from edgec.runtimes.sampling import sample


def _source(name: str) -> SimpleNamespace:
    """What the generator reads of an exported reference model (no export needed)."""
    spec = registry.get(name)
    return SimpleNamespace(kind="registry", feeds={},
                           info={"name": name, "config": "tiny", "sampling": spec.sampling,
                                 "input_names": list(spec.input_names)})


def _fed_timesteps(name: str, steps: int) -> list[float]:
    """The timesteps the sampler feeds over ``steps`` steps (a denoiser predicting zeros)."""
    spec = registry.get(name)
    example = dict(zip(spec.input_names, (t.numpy() for t in spec.example_inputs("tiny"))))
    seen = []

    class Zeros:
        manifest = {"sampling": dict(spec.sampling)}
        inputs = [IOSpec(k, v.shape, v.dtype.name) for k, v in example.items()]
        default_feeds = example

        def run(self, feeds):
            seen.append(float(feeds[spec.sampling["timestep"]][0]))
            return {o: np.zeros_like(feeds[i]) for i, o in spec.sampling["samples"].items()}

    sample(Zeros(), steps=steps, guidance=1.0)
    return seen


@pytest.fixture(scope="module")
def dance():
    src = _source("reactive-dance")
    samples, origin = generated_samples(src, PER_TRAJECTORY + BLOCK)
    return src, samples, origin


def test_blocks_of_four_span_one_trajectory(dance):
    """reactive-dance (DDIM, x0 prediction, guided): the 16 calibration samples are one
    trajectory, each step once; every block of four runs from an early step to a late one, the
    second of each zeroing the conditions as guidance's unconditional half does; the held-out
    block after them (another trajectory) holds its first step's pure noise and t = 0, where
    the noisy latent is near the model's own x0 (the drawn N(0, 1) latents held none of that
    range)."""
    _, samples, origin = dance
    assert origin == ORIGIN and PER_TRAJECTORY == RECORD_STEPS == 16 and BLOCK == 4
    spec = registry.get("reactive-dance")
    grid = _fed_timesteps("reactive-dance", RECORD_STEPS)
    assert grid[0] == 999 and grid[-1] == 0
    t = [float(s["timestep"][0]) for s in samples]
    assert sorted(t[:PER_TRAJECTORY], reverse=True) == grid  # every step once
    conditions = spec.sampling["conditions"]
    for start in range(0, len(samples), BLOCK):
        four = samples[start:start + BLOCK]
        j = start // PER_TRAJECTORY
        drawn = dict(zip(spec.input_names, spec.example_inputs("tiny", seed=1000 + j)))
        assert t[start] > t[start + 1] > t[start + 2] > t[start + 3]
        for k, s in enumerate(four):
            for c in conditions:
                if k == 1:
                    assert not s[c].any()
                else:
                    np.testing.assert_array_equal(s[c], drawn[c].numpy())
    held = samples[PER_TRAJECTORY:]
    assert [float(s["timestep"][0]) for s in held][::3] == [999, 0]
    assert 0.9 < held[0]["latent"].std() < 1.1
    assert held[3]["latent"].std() > 1.5 * held[0]["latent"].std()
    assert not np.array_equal(held[0]["latent"], samples[0]["latent"])  # another trajectory


def test_samples_are_deterministic_and_skip_keeps_their_order(dance):
    from edgec.calibration import trajectory

    _, samples, _ = dance
    trajectory._trajectory.cache_clear()  # sampled again, not read back
    later, _ = generated_samples(_source("reactive-dance"), PER_TRAJECTORY + BLOCK, skip=13)
    assert len(later) == 7
    for a, b in zip(later, samples[13:]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    trajectory._trajectory.cache_clear()  # the held-out samples alone: their trajectory only
    held, _ = generated_samples(_source("reactive-dance"), PER_TRAJECTORY + BLOCK,
                                skip=PER_TRAJECTORY)
    assert trajectory._trajectory.cache_info().currsize == 1
    np.testing.assert_array_equal(held[0]["latent"], samples[PER_TRAJECTORY]["latent"])


def test_flow_last_sample_sits_at_the_default_steps_last_timestep():
    """A flow trajectory recorded over fewer steps than the artifact samples with stops at a
    larger σ; the last sample moves along its Euler step to the default count's last σ, so
    the timestep quantizer's range reaches it (video-dit: 57.7 at 50 steps, 166.7 at 16)."""
    spec = registry.get("video-dit")
    src = _source("video-dit")
    samples, _ = generated_samples(src, BLOCK)
    last = _fed_timesteps("video-dit", spec.sampling["steps"])[-1]
    short = _fed_timesteps("video-dit", RECORD_STEPS)[-1]
    assert last < short
    assert float(samples[3]["timestep"][0]) == pytest.approx(last, rel=1e-6)
    assert float(samples[0]["timestep"][0]) == pytest.approx(1000.0)
