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
    trajectory, each step once, each with a draw of conditions of its own; every block of four
    runs from an early step to a late one, the second of each zeroing the conditions as
    guidance's unconditional half does; the held-out block after them (another trajectory)
    holds its first step's pure noise and t = 0, where the noisy latent is near the model's
    own x0 (the drawn N(0, 1) latents held none of that range)."""
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
        assert t[start] > t[start + 1] > t[start + 2] > t[start + 3]
        for k, s in enumerate(four):
            j, i = divmod(start + k, PER_TRAJECTORY)  # a draw of conditions for every sample
            drawn = dict(zip(spec.input_names,
                             spec.example_inputs("tiny", seed=1000 + PER_TRAJECTORY * j + i)))
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


@pytest.fixture(scope="module")
def dance_onnx(tmp_path_factory):
    """reactive-dance's ``edgec export`` (an .onnx keeping its sampling entry), resolved as a
    compile resolves it."""
    from edgec.exporters.export_file import export_to_file
    from edgec.exporters.sources import resolve_source

    path = tmp_path_factory.mktemp("dance") / "dance.onnx"
    export_to_file("reactive-dance", path, config="tiny")
    return path, resolve_source(str(path))


def _fresh(src, **changes):
    """A copy of ``src`` with nothing recorded yet."""
    import dataclasses

    return dataclasses.replace(src, trajectories={}, **changes)


def test_an_exported_denoiser_records_the_trajectory_its_pytorch_model_takes(dance_onnx,
                                                                                monkeypatch):
    """An .onnx with a sampling entry calibrates on its own fp32 graph's trajectory, which,
    given the reference model's conditions, is the PyTorch model's (``dance``: the registry
    recorder) to export precision, step for step, the unconditional half included."""
    from edgec.calibration import trajectory

    spec = registry.get("reactive-dance")
    monkeypatch.setattr(trajectory, "_drawn_feeds", lambda src, seed: {
        k: t.numpy() for k, t in zip(spec.input_names, spec.example_inputs("tiny", seed=seed))})
    src = _fresh(dance_onnx[1])
    samples, origin = generated_samples(src, PER_TRAJECTORY)
    assert origin == trajectory.GRAPH_ORIGIN
    reference = trajectory.trajectory_inputs(spec, "tiny", PER_TRAJECTORY)
    for got, want in zip(samples, reference):
        assert list(got) == list(spec.input_names)
        for name, value in zip(spec.input_names, want):
            np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-4)


def test_a_graphs_trajectories_are_kept_with_the_source_and_drawn_conditions(dance_onnx):
    """Conditions are random feeds (seed 1000 + i for sample i, zeroed in the unconditional
    slot); the
    floor's held-out samples (``skip``) reuse the recorded trajectory 0 rather than sample it
    again, and read trajectory 1 where the first call did not reach; a copy of the source
    with another graph records its own."""
    from edgec.calibration.samples import _specs
    from edgec.exporters.sources import random_feeds

    src = _fresh(dance_onnx[1])
    first, _ = generated_samples(src, PER_TRAJECTORY)
    assert set(src.trajectories) == {"model", "run", 0}
    held, _ = generated_samples(src, PER_TRAJECTORY + BLOCK, skip=PER_TRAJECTORY - 2)
    assert set(src.trajectories) == {"model", "run", 0, 1}
    np.testing.assert_array_equal(held[0]["latent"], first[-2]["latent"])
    import dataclasses

    other = dataclasses.replace(src, model=src.model.clone())  # shares the dict, not the graph
    generated_samples(other, 1)
    assert src.trajectories["model"] is other.model and set(src.trajectories) == {
        "model", "run", 0}
    grid = _fed_timesteps("reactive-dance", RECORD_STEPS)
    assert sorted((float(s["timestep"][0]) for s in first), reverse=True) == grid
    for i, s in enumerate(first + held[2:]):
        drawn = random_feeds(_specs(src), seed=1000 + i)  # a draw for every sample
        for c in registry.get("reactive-dance").sampling["conditions"]:
            if i % BLOCK == 1:
                assert not s[c].any()
            else:
                np.testing.assert_array_equal(s[c], drawn[c])


def test_a_quantized_graph_is_never_recorded(dance_onnx):
    """The trajectory stands for the fp32 model: asked of a graph that already holds
    quantizers (a pass order edgec never runs), it is edgec's fault, not a silent recording."""
    import onnx_ir as ir

    from edgec.errors import InternalError

    src = _fresh(dance_onnx[1])
    model = src.model.clone()
    x = model.graph.inputs[0]
    scale = ir.Value(name="s", const_value=ir.tensor(np.float32(0.1)))
    model.graph.initializers["s"] = scale
    node = ir.node("QuantizeLinear", [x, scale], num_outputs=1)
    model.graph.append(node)
    with pytest.raises(InternalError, match="already quantized"):
        generated_samples(_fresh(src, model=model), 1)


@pytest.mark.parametrize(("kind", "sampler", "records"), [
    ("onnx", "flow", True), ("diffusers", "ddim-v", True), ("onnx", "ddim-x0", True),
    ("onnx", "score", False), ("module", "flow", False), ("onnx", None, False)])
def test_which_graphs_record_their_trajectory(kind, sampler, records):
    """Graphs with a sampling entry do, but a score SDE's (a prior serves one step at a time,
    and pose-prior's untrained SDE diverges); reference models go by their ModelSpec."""
    from edgec.calibration.trajectory import records_graph_trajectories

    info = {"sampling": {"kind": sampler}} if sampler else {}
    assert records_graph_trajectories(SimpleNamespace(kind=kind, info=info)) is records
