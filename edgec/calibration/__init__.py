"""Calibration: samples, activation statistics, caches. No quantization decisions are made here
(the quantization passes ask for a ``CalibrationRequest``), and nothing here runs the pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgec.calibration.cache import CACHE_FILE, CalibrationCache, model_hash
from edgec.calibration.collect import CalibrationRequest, collect_cache
from edgec.errors import UserError

__all__ = ["CalibrationCache", "CalibrationRequest", "collect_cache", "model_hash", "CACHE_FILE",
           "calibration_input"]


def calibration_input(value: Any) -> CalibrationCache | Path | None:
    """``calibration=`` / ``--calib``: a cache (its directory or calibration.json), an .npz of
    samples (checked to exist), or None."""
    if value is None or isinstance(value, CalibrationCache):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"calibration must be a cache directory, a calibration.json or an .npz "
                        f"of samples, not {type(value).__name__}")
    path = Path(value)
    if path.is_file() and path.suffix not in (".npz", ".json"):  # an .npy was read as JSON
        raise UserError(f"{path}: calibration takes a cache (its directory or calibration.json) "
                        "or an .npz of samples whose keys are the model's input names, each "
                        "array with a leading sample axis")
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"{path}: no such calibration data file")
        return path
    return CalibrationCache.load(path)
