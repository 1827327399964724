"""A quantized denoiser's whole generation against its fp32 graph's (``sample_check``): the
report's number is what a user sampling both artifacts measures, and a generation below the
floor each call holds is said."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import edgec
from edgec.calibration.samples import generated_samples
from edgec.graph_passes.quantization.sample_check import SAMPLE_SEED, SAMPLE_STEPS, whole_sample


def _cos(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def dance(tmp_path_factory):
    root = tmp_path_factory.mktemp("dance")
    fp32 = edgec.compile("reactive-dance", target="ort-cpu", config="tiny",
                         output_dir=root / "fp32")
    q = edgec.compile("reactive-dance", target="ort-cpu", config="tiny",
                      quantize="w8a8:sample_steps=8", output_dir=root / "q")
    return fp32, q


def test_the_reported_sample_is_what_sampling_the_artifacts_gives(dance):
    """reactive-dance (guided DDIM) w8a8 on ort-cpu, ``sample_steps=8``: the floor's entry holds
    an 8-step generation from held-out noise, and sampling the two artifacts with the
    conditions of the floor's first held-out sample and that seed gives the same cosine."""
    from edgec.exporters.sources import resolve_source

    fp32, q = dance
    mp = next(p for p in q.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    found = mp["sample"]
    assert (found["steps"], found["seed"]) == (8, SAMPLE_SEED)
    assert 0.99 < found["cosine"] < 1.0
    held = generated_samples(resolve_source("reactive-dance", "tiny"), 20, skip=16)[0][0]
    conditions = {k: v for k, v in held.items() if k not in ("latent", "timestep")}
    got = [a.load().sample(conditions, steps=8, seed=SAMPLE_SEED,
                           guidance_mode="split")["latent"] for a in (fp32, q)]
    # the artifact runs the pass's graph after the target's lowering, with ORT's optimizations
    # on: measured 2.3e-5 apart
    assert _cos(*got) == pytest.approx(found["cosine"], abs=1e-4)
    assert (f"a whole 8-step sample from held-out noise: cosine {found['cosine']:.4f}"
            in (q.path / "report.md").read_text().lower())


def test_a_generation_below_the_floor_is_said(dance, caplog):
    """Weights perturbed by 2%: every call stays close, the 16 steps compound it; a floor above
    the generation's cosine gets a warning naming both, and the report line says it."""
    import onnx_ir as ir

    from edgec.report import sample_line

    fp32, _ = dance
    model = ir.load(fp32.path / "model.onnx")
    noisy = ir.load(fp32.path / "model.onnx")
    rng = np.random.default_rng(0)
    for value in noisy.graph.initializers.values():
        w = value.const_value.numpy()
        if w.dtype == np.float32 and w.ndim == 2:
            value.const_value = ir.tensor(
                (w * (1 + 0.02 * rng.standard_normal(w.shape))).astype(np.float32),
                name=value.name)
    feeds = fp32.load().default_feeds
    assert whole_sample(model, model, fp32.manifest["sampling"], feeds)["cosine"] == 1.0
    with caplog.at_level(logging.WARNING):
        found = whole_sample(model, noisy, fp32.manifest["sampling"], feeds, min_cos=0.99999)
    assert found["cosine"] < 0.99999
    assert "compounds each step's error" in caplog.text and f"{found['cosine']:.4f}" in caplog.text
    line = sample_line({"min_cos": 0.99999, "sample": found})
    assert line.endswith("(below the floor: the sampler compounds each call's error)")
    assert "below" not in sample_line({"min_cos": 0.5, "sample": found})


def test_sample_steps_zero_skips_it_and_bad_counts_are_refused(tmp_path):
    """``sample_steps=0`` leaves the whole sample out (it costs 4 N runs of each graph guided:
    minutes on a `small` video DiT); a count that is not an integer in [0, 1000] is refused
    before anything is exported; the default is SAMPLE_STEPS."""
    from edgec import targets
    from edgec.errors import UserError
    from edgec.graph_passes.quantization.options import QuantOptions

    art = edgec.compile("reactive-dance", target="ort-cpu", config="tiny",
                        quantize="w8a8:sample_steps=0", output_dir=tmp_path / "q")
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    assert "sample" not in mp and mp["reached"]
    for bad in ("-1", "2.5", "1001", "many"):
        with pytest.raises(UserError, match="sample_steps"):
            QuantOptions.parse(f"w8a8:sample_steps={bad}", targets.get("ort-cpu"))
    assert SAMPLE_STEPS == 16
