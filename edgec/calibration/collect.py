"""Calibrate a prepared graph: samples → activation ranges → a cache with its provenance.

The quantization stage decides what a calibration means for a scheme on a target (method, which
tensors, symmetry) and hands it over as a ``CalibrationRequest``; this module only runs it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgec.artifact import file_sha256
from edgec.calibration.cache import CalibrationCache, adapters_bound, model_hash
from edgec.calibration.crest import collect_crest
from edgec.calibration.ranges import collect_ranges
from edgec.calibration.samples import (
    check_sample_count,
    default_sample_count,
    generated_samples,
    samples_for_model,
    samples_from_npz,
)

__all__ = ["CalibrationRequest", "collect_cache"]


@dataclasses.dataclass(frozen=True)
class CalibrationRequest:
    """target, scheme: what the cache is for; method: ORT calibrator (``minmax``...);
    symmetric: symmetric activation ranges; op_types: calibrate these ops' tensors (None: every
    float tensor); samples: how many (None: all of ``data``, or
    ``default_sample_count`` generated); data: an .npz of
    samples (None: the source's own generator); crest: also each tensor's crest factor
    (absmax / RMS), for precision choices per tensor; bits: the activations' integer width
    (what ``entropy`` sizes its thresholds for)."""

    target: str
    scheme: str
    method: str
    symmetric: bool
    op_types: tuple[str, ...] | None
    samples: int | None = None
    data: Path | None = None
    crest: bool = False
    bits: int = 8


def collect_cache(model, request: CalibrationRequest, src,
                  progress: Callable[[int, int], None] | None = None,
                  bindings: Sequence[tuple[str, dict[str, np.ndarray]]] | None = None
                  ) -> CalibrationCache:
    """Ranges of ``model`` (an onnx_ir.Model, already rewritten) on the request's samples;
    ``bindings``: a swappable-LoRA graph's adapters, bound in turn (``samples_for_model``)."""
    if request.data is not None:
        from edgec.lora.binding import adapter_inputs
        from edgec.runtimes.base import IOSpec

        bound = adapter_inputs(model)
        from edgec.onnx_io import dim_label

        specs = [IOSpec(v.name, tuple(dim_label(d) for d in v.shape.dims),
                        v.dtype.numpy().name)
                 for v in model.graph.inputs if v.name not in bound]
        from edgec.exporters.index_inputs import index_bounds

        samples = samples_from_npz(request.data, specs, index_bounds(model), src)
        origin, digest = f"file {request.data.name}", file_sha256(request.data)
        if request.samples:
            check_sample_count(request.samples, len(samples), request.data.name)
            samples = samples[: request.samples]
    else:
        samples, origin = generated_samples(src, request.samples or default_sample_count(src))
        digest = None
    samples = samples_for_model(samples, model, bindings)
    t0 = time.perf_counter()
    tensors = collect_ranges(model, samples, request.method, request.op_types,
                             symmetric=request.symmetric, progress=progress,
                             bits=request.bits)
    if request.crest:
        crest = collect_crest(model, samples)
        for name, stats in tensors.items():
            stats["crest"] = crest.get(name, 1.0)
    return CalibrationCache(model_hash(model), request.target, request.scheme, request.method,
                            len(samples), origin, tensors, time.perf_counter() - t0,
                            {k: src.info.get(k) for k in ("kind", "name", "config", "path")
                             if src.info.get(k) is not None},
                            adapters=adapters_bound(bindings), data_sha256=digest)

