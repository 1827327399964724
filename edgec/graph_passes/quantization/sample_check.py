"""A denoiser's quantization measured as its users see it: a whole generation.

The accuracy floor holds per call, and a sampler compounds what each call loses: calibrated on
independent draws, reactive-dance tiny w8a8 held cosine 0.9997 on every held-out call while its
50-step guided samples reached 0.904 to the fp32 artifact's (this check: 0.950); on the HTP at
w8a8, calibrated on its trajectory, 0.9887 per call and 0.979 a sample (this check: 0.976).
So where the source samples, the quantize pass
also runs the artifact's sampler (``SAMPLE_STEPS`` steps, its default guidance) over the fp32
graph and over the quantized graph it keeps, in ONNX Runtime, from the same noise and the
conditions of the first held-out sample, and reports the cosine of the two generations; the
report warns where it falls below the floor's cosine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["whole_sample", "SAMPLE_STEPS", "SAMPLE_SEED"]

SAMPLE_STEPS = 16  # the steps a calibration trajectory records (``trajectory.RECORD_STEPS``)
SAMPLE_SEED = 1001  # the held-out trajectory's noise (calibration's is seed 1000)


def whole_sample(fp32, quantized, sampling: Mapping[str, Any],
                 feeds: Mapping[str, np.ndarray], min_cos: float | None = None,
                 steps: int = SAMPLE_STEPS) -> dict[str, Any]:
    """{"steps", "seed", "cosine"}: the cosine (the worst over the sampled inputs) of
    ``quantized``'s ``steps``-step generation (at most the artifact's default) to ``fp32``'s
    (in-memory graphs) from noise ``SAMPLE_SEED`` under the conditions in ``feeds`` (a
    held-out sample, which also fixes the batch); a warning where it is below ``min_cos``, the
    floor each call holds."""
    from edgec.calibration.trajectory import RecordingSession
    from edgec.runtimes.ort import model_feeds, open_model
    from edgec.runtimes.sampling import SamplerSpec, sample

    spec = SamplerSpec.from_manifest({"sampling": sampling})
    steps = min(spec.steps, steps)
    conditions = {k: v for k, v in feeds.items()
                  if k not in spec.samples and k != spec.timestep}
    out = []
    for model in (fp32, quantized):
        with open_model(model) as sess:
            def run(f, sess=sess, model=model):
                return sess.run(model_feeds(model, f))

            session = RecordingSession(run, list(feeds), sampling, dict(feeds))
            out.append(sample(session, conditions, steps=steps, seed=SAMPLE_SEED,
                              guidance_mode="split"))
    cosine = min(_cosine(out[0][k], out[1][k]) for k in out[0])
    if min_cos is not None and cosine < min_cos:
        logger.warning("a whole %d-step generation from held-out noise reaches cosine %.4f to "
                       "the fp32 graph's, below the floor's %s that each call holds: the "
                       "sampler compounds each step's error (a 16-bit scheme, or a higher "
                       "min_cos, holds it)", steps, cosine, min_cos)
    return {"steps": steps, "seed": SAMPLE_SEED, "cosine": round(cosine, 6)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))
