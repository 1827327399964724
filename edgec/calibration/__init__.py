"""Calibration: samples, activation statistics, caches (``edgec calibrate``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from edgec.calibration.cache import CACHE_FILE, CalibrationCache, model_hash
from edgec.errors import UserError

__all__ = ["calibrate", "CalibrationCache", "model_hash", "CACHE_FILE"]


def calibrate(source: Any, target: str, output_dir: str | os.PathLike,
              config: str | None = None, data: str | os.PathLike | None = None,
              quantize: str = "w8a8", progress: Callable[[int, int], None] | None = None,
              step: Callable[[str], None] | None = None, **recipe: Any) -> CalibrationCache:
    """Collect activation ranges of ``source`` as ``target`` will quantize it; save the cache.

    ``quantize`` is the scheme (with options, as for ``edgec compile --quantize``); ``data`` an
    .npz of samples (leading sample axis) or None for the source's own generator; ``recipe``
    takes compile's other recipe options (sparse_attention, lora, lora_mode, prune,
    example_inputs, dynamic_shapes) so the calibrated graph is the one the compile quantizes.
    Writes ``output_dir/calibration.json`` only once calibration succeeded.
    """
    from edgec.calibration.recipe import QuantRecipe
    from edgec.pipeline import prepare

    plan = QuantRecipe.parse(quantize, data, target)
    if plan.cache is not None:
        raise UserError("edgec calibrate --data takes an .npz of samples, not a cache")
    prep = prepare(source, target, config, recipe.get("example_inputs"),
                   recipe.get("dynamic_shapes"), recipe.get("sparse_attention"),
                   False, step, recipe.get("lora"), recipe.get("lora_mode", "merge"),
                   recipe.get("prune"), plan)
    if not plan.scheme(prep.tgt).calibrated:
        raise UserError(f"scheme {plan.scheme_name} is weight-only: it needs no calibration")
    cache = plan.calibrate(prep.model, prep.src, prep.tgt, progress)
    cache.save(output_dir)
    return cache
