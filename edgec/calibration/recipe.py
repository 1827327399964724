"""The quantization stage of a compile: parse ``--quantize``, get a calibration cache, quantize.

    exact preparation passes (mask fill on fully-quantized targets) → model hash
    → cache (``--calib DIR`` checked against the hash, or calibrated now) → QuantizePass
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["QuantRecipe"]

_KEYS = ("method", "exclude", "samples", "mask_fill")


@dataclasses.dataclass
class QuantRecipe:
    """What ``quantize=`` / ``--quantize SCHEME[:k=v,...]`` asks for.

    Options after the scheme: ``method=minmax|percentile|entropy``, ``exclude=A;B`` (node names or
    op types kept in high precision: float on CPU targets, 16-bit on QNN), ``samples=N``,
    ``mask_fill=F``. ``calibration`` is a cache (directory or ``calibration.json``), an ``.npz``
    of samples, or ``None`` (the source's own generator).
    """

    scheme_name: str
    target: str
    method: str | None = None
    exclude: tuple[str, ...] = ()
    samples: int | None = None
    mask_fill: float = 100.0
    cache: Any = None  # CalibrationCache given by the user
    data: Path | None = None  # .npz calibration samples

    @classmethod
    def parse(cls, quantize: Any, calibration: Any, target: str) -> QuantRecipe | None:
        from edgec import targets
        from edgec.calibration.cache import CalibrationCache
        from edgec.calibration.ranges import METHODS

        if quantize is None or quantize is False:
            if calibration is not None:
                raise UserError("--calib applies to quantized compiles; add --quantize SCHEME")
            return None
        if isinstance(quantize, QuantRecipe):
            return quantize
        opts: dict[str, Any] = dict(quantize) if isinstance(quantize, dict) else {}
        if isinstance(quantize, str):
            name, _, rest = quantize.partition(":")
            opts["scheme"] = name.strip()
            for item in filter(None, (p.strip() for p in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq or key.strip() not in _KEYS:
                    raise UserError(f"bad --quantize option {item!r}; use SCHEME[:k=v,...] with "
                                    f"k in {', '.join(_KEYS)}")
                opts[key.strip()] = value.strip()
        tgt = targets.get(target)
        scheme = opts.pop("scheme", None)
        if scheme not in tgt.schemes:
            offered = ", ".join(tgt.schemes) or "none"
            raise UserError(f"target {tgt.name} has no quantization scheme {scheme!r}; "
                            f"it offers: {offered}")
        recipe = cls(scheme, tgt.name)
        if opts.get("method") is not None:
            if opts["method"] not in METHODS:
                raise UserError(f"unknown calibration method {opts['method']!r}; use one of "
                                f"{', '.join(METHODS)}")
            recipe.method = opts["method"]
        ex = opts.get("exclude") or ()
        recipe.exclude = tuple(e for e in (ex.split(";") if isinstance(ex, str) else ex) if e)
        try:
            if opts.get("samples") is not None:
                recipe.samples = int(opts["samples"])
                if recipe.samples < 1:
                    raise ValueError
            if opts.get("mask_fill") is not None:
                recipe.mask_fill = abs(float(opts["mask_fill"]))
        except ValueError:
            raise UserError("--quantize samples must be a positive integer and mask_fill a "
                            "number") from None
        if calibration is not None:
            if isinstance(calibration, CalibrationCache):
                recipe.cache = calibration
            elif str(calibration).endswith(".npz"):
                recipe.data = Path(calibration)
                if not recipe.data.is_file():
                    raise UserError(f"{calibration}: no such calibration data file")
            else:
                recipe.cache = CalibrationCache.load(calibration)
        return recipe

    def scheme(self, tgt):
        return tgt.schemes[self.scheme_name]

    def resolved_method(self, tgt) -> str:
        scheme = self.scheme(tgt)
        if scheme.activations and scheme.activations.startswith("float8"):
            return "distribution"  # ORT's float8 quantizer needs avg/std statistics
        return self.method or "minmax"

    def preparation_passes(self, tgt) -> list:
        """Exact passes the quantized form needs; they run before the model hash is taken."""
        from edgec.graph_passes.mask_fill import MaskFillPass
        from edgec.graph_passes.qnn_legalize import QnnLegalizePass

        scheme = self.scheme(tgt)
        return [MaskFillPass(self.mask_fill), QnnLegalizePass()] if scheme.rules == "qnn" else []

    def calibrate(self, model, src, tgt, progress: Callable[[int, int], None] | None = None):
        """Collect activation ranges of ``model`` (already prepared) into a CalibrationCache."""
        from edgec.calibration.cache import CalibrationCache, model_hash
        from edgec.calibration.ranges import collect_ranges
        from edgec.calibration.samples import DEFAULT_SAMPLES, generated_samples, samples_from_npz
        from edgec.runtimes.base import IOSpec

        scheme = self.scheme(tgt)
        if self.data is not None:
            specs = [IOSpec(v.name, tuple(d if isinstance(d, int) else str(d)
                                          for d in v.shape.dims), v.dtype.numpy().name)
                     for v in model.graph.inputs]
            samples, origin = samples_from_npz(self.data, specs), f"file {self.data.name}"
            if self.samples:
                samples = samples[: self.samples]
        else:
            samples, origin = generated_samples(src, self.samples or DEFAULT_SAMPLES)
        from edgec.graph_passes.lora_swappable import lora_sites

        sites = lora_sites(model)
        if sites:  # swappable LoRA: calibrate the base (zero adapters); the branch stays float
            from edgec.lora.binding import site_feeds

            zeros = site_feeds(sites, None)
            samples = [{**zeros, **x} for x in samples]
        method = self.resolved_method(tgt)
        op_types = None if scheme.rules == "qnn" else list(scheme.op_types)
        t0 = time.perf_counter()
        tensors = collect_ranges(model, samples, method, op_types,
                                 symmetric=scheme.activation_symmetric, progress=progress)
        return CalibrationCache(model_hash(model), tgt.name, scheme.name, method, len(samples),
                                origin, tensors, time.perf_counter() - t0,
                                {k: src.info.get(k) for k in ("kind", "name", "config", "path")
                                 if src.info.get(k) is not None})

    def apply(self, model, src, tgt, manager, step, check: bool):
        """Quantize the prepared ``model``; returns (quantized model, manifest entry)."""
        from edgec.calibration.cache import model_hash
        from edgec.graph_passes import PassManager
        from edgec.graph_passes.quantize import QuantizePass

        scheme = self.scheme(tgt)
        cache = None
        if scheme.calibrated:
            if self.cache is not None:
                self.cache.check(model_hash(model), tgt.name, scheme.name,
                                 self.resolved_method(tgt) if self.method else None)
                cache, how = self.cache, "reused cache"
            else:
                step("calibrating activation ranges")
                cache = self.calibrate(
                    model, src, tgt, lambda i, n: step(f"calibrating: sample {i}/{n}"))
                how = "calibrated during compile"
        step(f"quantizing ({scheme.name})")
        qm = PassManager([QuantizePass(scheme, cache, self.exclude), *tgt.legalize_passes()],
                         check=check, feeds=src.feeds)
        model = qm(model)
        manager.records.extend(qm.records)
        info = {"scheme": dataclasses.asdict(scheme), "exclude": list(self.exclude)}
        if cache is not None:
            info["calibration"] = {"how": how, "method": cache.method, "samples": cache.samples,
                                   "data": cache.data, "model_hash": cache.model_hash,
                                   "seconds": round(cache.seconds, 3),
                                   "tensors": len(cache.tensors)}
        return model, info


