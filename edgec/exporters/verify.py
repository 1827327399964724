"""Numerical comparison of output sets: max abs / max relative error and cosine per output.

Relative error is norm-wise: ``max|a − b| / max|b|`` (elementwise relative error explodes on
outputs that cross zero and says nothing about the model).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgec.errors import VerificationError

__all__ = ["compare_outputs", "assert_close", "OutputError"]

# {"max_abs", "max_rel", "cosine", "rel_l2", "shape"}, and "nonfinite" (NaN/±inf equal in both,
# left out of the metrics) or "nonfinite_mismatch" (NaN/±inf in one only or different: inf error)
OutputError = dict


def _metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    diff = np.abs(a64 - b64)
    scale = float(np.max(np.abs(b64))) if b64.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cosine = float(a64 @ b64 / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "cosine": cosine,
        "rel_l2": float(np.linalg.norm(a64 - b64) / nb) if nb > 0 else float(np.linalg.norm(a64)),
    }


def _float_metrics(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Metrics on the elements finite in both; NaN/±inf must sit at the same places with the
    same values (``nonfinite``: how many do), else they count as ``nonfinite_mismatch`` and the
    output differs (inf error, cosine 0). Two identical outputs holding a NaN compared as
    max abs inf, cosine 0."""
    fg, fr = np.isfinite(got), np.isfinite(ref)
    if fg.all() and fr.all():
        return _metrics(got, ref)
    same = (fg & fr) | (np.isnan(got) & np.isnan(ref)) | (~fg & ~fr & (got == ref))
    mismatch, both = int(same.size - np.count_nonzero(same)), fg & fr
    if mismatch:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0,
                "rel_l2": float("inf"), "nonfinite_mismatch": mismatch}
    return {**_metrics(got[both], ref[both]), "nonfinite": int(both.size - both.sum())}


def compare_outputs(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]
) -> dict[str, OutputError]:
    """Per-output metrics of ``actual`` against the reference ``expected``."""
    result: dict[str, OutputError] = {}
    for name, ref in expected.items():
        if name not in actual:
            raise VerificationError(f"output {name!r} is missing from the model under test")
        got = np.asarray(actual[name])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            raise VerificationError(
                f"output {name!r} has shape {list(got.shape)}, expected {list(ref.shape)}"
            )
        if not np.issubdtype(ref.dtype, np.floating):
            equal = bool(np.array_equal(got, ref))
            m = {"max_abs": 0.0 if equal else float(np.max(np.abs(got.astype(np.float64) - ref))),
                 "max_rel": 0.0 if equal else 1.0, "cosine": 1.0 if equal else 0.0,
                 "rel_l2": 0.0 if equal else 1.0}
        else:
            m = _float_metrics(got, ref)
        result[name] = {**m, "shape": list(ref.shape)}
    return result


def assert_close(errors: Mapping[str, OutputError], max_rel: float, what: str) -> None:
    """Raise VerificationError naming the first output over ``max_rel``."""
    for name, e in errors.items():
        if not e["max_rel"] <= max_rel:
            raise VerificationError(
                f"{what}: output {name!r} differs by max relative error {e['max_rel']:.3g} "
                f"(max abs {e['max_abs']:.3g}, cosine {e['cosine']:.6f}); tolerance is {max_rel:g}"
            )
