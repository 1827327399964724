"""Activation statistics: run calibration samples through ONNX Runtime's calibrators.

``collect_ranges`` wraps ``onnxruntime.quantization.create_calibrator`` (minmax, percentile,
entropy; distribution: ORT's float8 scale) and reports progress per run; the result is
plain JSON-ready per-tensor statistics keyed by tensor name.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.calibration.entropy import kl_threshold
from edgec.calibration.histograms import collect_histograms
from edgec.errors import UserError

__all__ = ["collect_ranges", "METHODS"]

METHODS = ("minmax", "percentile", "entropy", "distribution")
# Entropy (TensorRT's KL-divergence threshold) searches clipping thresholds on a histogram of
# ENTROPY_BINS bins over [-absmax, absmax], each candidate requantized to 2**bits bins. ORT's own
# defaults (128 bins, 128 quantized bins) leave one candidate, the full range: minmax under
# another name. 2048 bins as TensorRT; at 16 bits (2**16 ≥ the bins) it is minmax again.
ENTROPY_BINS = 2048


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy, "distribution": CalibrationMethod.Distribution}
    if name not in table:
        raise UserError(f"unknown calibration method {name!r}; use one of {', '.join(METHODS)}")
    return table[name]


def collect_ranges(model, samples: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                   op_types: Sequence[str] | None = None, symmetric: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   bits: int = 8) -> dict[str, dict[str, Any]]:
    """Per-tensor statistics of ``model`` (an onnx_ir.Model) over ``samples``.

    ``op_types``: calibrate the inputs/outputs of these op types only (None: every float tensor).
    ``bits``: the activations' integer width, which the entropy threshold search quantizes to.
    ``progress(runs done, runs)``: one run per sample (minmax), more for the histogram methods
    (``histograms.collect_histograms``).
    Returns ``{tensor: {"lowest": float, "highest": float, ["avg", "std"]}}``.
    """
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator

    from edgec.onnx_io import save_model

    if not samples:
        raise UserError("calibration needs at least one sample")
    total = len(samples)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._i = 0

        def get_next(self):
            if self._i >= total:
                return None
            feeds = samples[self._i]
            self._i += 1
            if progress:
                progress(self._i, total)
            return feeds

        def __len__(self):
            return total

    # MinMax's augmented graph returns only ReduceMin/ReduceMax per tensor (small); its
    # ``max_intermediate_outputs`` option drops collected data in ORT 1.31, so it is not used.
    options: dict[str, Any] = {"symmetric": symmetric}
    if method == "entropy":
        options.update(num_bins=ENTROPY_BINS, num_quantized_bins=min(2 ** bits, ENTROPY_BINS))
    with tempfile.TemporaryDirectory(prefix="edgec-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        calibrator = create_calibrator(path, list(op_types) if op_types else None,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=_method(method),
                                       use_external_data_format=True, extra_options=options)
        if method == "minmax":
            _reduce_early(calibrator)
            with contextlib.redirect_stdout(io.StringIO()):
                calibrator.collect_data(Reader())
        else:  # ORT's histograms, one sample and a bounded group of tensors at a time
            _histograms(calibrator, model, samples, progress)
        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints histogram settings
            if method == "entropy":  # ORT's histograms, edgec's vectorized threshold search
                return {name: _entropy_stats(h, options["num_quantized_bins"])
                        for name, h in calibrator.collector.histogram_dict.items()}
            data = calibrator.compute_data()
        del calibrator
    return {name: _stats(td) for name, td in data.items()}


def _reduce_early(calibrator) -> None:
    """Reopen the MinMax calibrator's session with ``runtimes.ort.LEAN`` settings (same ops, same
    results).

    ORT's default order ran the ReduceMin/ReduceMax the calibrator adds after the rest of the
    graph, so every tensor it reads stayed alive to the end: video-dit small (8192 tokens of
    dense attention) peaked at 11.0 GB for one sample against 5.0 GB for the plain model, and a
    qnn-htp compile was killed for memory. Priority order runs each reduction as soon as its
    input exists (2.8 GB)."""
    import onnxruntime as ort

    from edgec.runtimes.ort import LEAN, session_options

    opts = session_options(optimize=False, config=LEAN)  # unoptimized, as ORT's own
    calibrator.infer_session = None  # free the default-order session first
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, opts,
                                                    providers=calibrator.execution_providers)


def _histograms(calibrator, model, samples, progress) -> None:
    """Fill ``calibrator``'s collector with the histograms ORT's ``collect_data`` would build,
    without holding every sample's tensors (``histograms.collect_histograms``)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    calibrator.infer_session = None  # opened by create_calibrator; each pass opens its own
    magnitudes = calibrator.method == "percentile" and calibrator.symmetric  # ORT's choice
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins,
                                   num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile,
                                   scenario=calibrator.scenario)
    names = sorted(calibrator.tensors_to_calibrate)  # chosen by its augment_graph
    collector.histogram_dict = collect_histograms(model, names, samples,
                                                  calibrator.num_bins, magnitudes,
                                                  progress=progress)
    calibrator.collector = collector


def _entropy_stats(histogram, levels: int) -> dict[str, float]:
    """ORT's entropy histogram (counts, edges over [-t, t], data min, data max, t) → the KL
    threshold, never wider than the data."""
    hist, edges, lowest, highest = histogram[:4]
    low, high = kl_threshold(hist, edges, levels)
    return {"lowest": max(low, float(lowest)), "highest": min(high, float(highest))}


def _stats(td) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("lowest", "highest", "avg", "std"):
        if hasattr(td, key):
            value = np.asarray(getattr(td, key), dtype=np.float64)
            out[key] = float(value.reshape(-1)[0]) if value.size == 1 else value.tolist()
    return out
