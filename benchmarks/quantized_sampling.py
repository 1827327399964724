"""Quantized diffusion sampling: calibration on drawn inputs vs on the sampler's trajectory.

For each reference diffusion model (``tiny``) and each quantized target, two artifacts:
``draws`` calibrates (and judges the accuracy floor) on the model's independent input draws,
N(0, 1) noisy samples at uniform timesteps (what edgec did before: given here as ``--calib``
an .npz of ``ModelSpec.drawn_inputs``, 16 calibration + 4 held-out); ``default`` is what
edgec does now (``calibration_data`` says which: feeds recorded from the fp32 model's own sampler,
or, for pose-prior, the draws). Each row gives the floor's
held-out cosine where the compile measured one, and the cosine of whole generations (the
artifact's default steps and guidance, ``--seeds`` seeds) to the fp32 artifact's from the same
noise: the number the floor stands for. Usage:

    python benchmarks/quantized_sampling.py [--models reactive-dance,...] [--targets ...]
                                            [--seeds 2] [--npu-seeds 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

import edgec
from edgec.calibration.samples import DEFAULT_SAMPLES
from edgec.graph_passes.quantization.options import HELD_OUT
from edgec.models import registry

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()
MODELS = ("reactive-dance", "video-dit", "motion-dit", "motion-gen", "pose-prior")
TARGETS = ("ort-cpu:w8a8:min_cos=0.99", "openvino-cpu:w8a8", "qnn-htp:w8a8", "qnn-htp:w8a16")


def log(msg: str) -> None:
    print(f"[quantized-sampling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def draws_npz(model: str, path: Path) -> Path:
    """The model's independent draws as a calibration file: 16 to calibrate, 4 held out."""
    spec = registry.get(model)
    sets = spec.drawn_inputs("tiny", DEFAULT_SAMPLES + HELD_OUT)
    np.savez(path, **{name: np.stack([s[i].numpy() for s in sets])
                      for i, name in enumerate(spec.input_names)})
    return path


def _floor(report: dict) -> dict | None:
    """The accuracy floor's held-out cosine (``achieved``), and how many layers it kept."""
    mp = next((p["stats"]["mixed_precision"] for p in report.get("passes") or []
               if "mixed_precision" in (p.get("stats") or {})), None)
    if not mp:
        return None
    return {"achieved": mp.get("achieved"), "min_cos": mp.get("min_cos"),
            "reached": mp.get("reached"), "kept": len(mp.get("kept") or [])}


def run(model: str, targets: list[str], seeds: int, root: Path, npu_seeds: int) -> dict:
    log(f"{model}: fp32 reference")
    fp = edgec.load(edgec.compile(model, target="ort-cpu", config="tiny",
                                  output_dir=root / f"{model}-fp32").path)
    reference = [fp.sample(seed=s) for s in range(seeds)]
    npz = draws_npz(model, root / f"{model}-draws.npz")
    rows = {}
    for entry in targets:
        target, scheme = entry.split(":", 1)
        for how in ("draws", "default"):
            log(f"{model} {target} {scheme} {how}")
            t0 = time.perf_counter()
            art = edgec.compile(model, target=target, config="tiny", quantize=scheme,
                                calibration=npz if how == "draws" else None,
                                output_dir=root / f"{model}-{target}-{scheme}-{how}")
            seconds = time.perf_counter() - t0
            session = edgec.load(art.path)
            cos = [min(_cos(session.sample(seed=s)[k], reference[s][k]) for k in reference[s])
                   for s in range(npu_seeds if target == "qnn-htp" else seeds)]
            rows.setdefault(entry, {})[how] = {
                "sample_cosine_min": round(min(cos), 5),
                "sample_cosine_mean": round(float(np.mean(cos)), 5),
                "floor_held_out": _floor(art.report),
                "calibration_data": ((art.report.get("quantization") or {}).get("calibration")
                                     or {}).get("data"),
                "compile_s": round(seconds, 1)}
    spec = registry.get(model).sampling
    return {"sampling": {k: spec[k] for k in ("kind", "steps", "guidance") if k in spec},
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--npu-seeds", type=int, default=1,
                    help="generations per qnn-htp row (the HTP emulator runs ~1 s a step)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgec-qsampling-") as tmp:
        for model in args.models.split(","):
            results[model] = run(model, args.targets.split(","), args.seeds, Path(tmp),
                                 args.npu_seeds)
    doc = {"benchmark": "quantized_sampling", "machine": QB.machine(), "git": QB.git_state(),
           "versions": edgec.artifact.versions(), "config": "tiny", "seeds": args.seeds,
           "npu_seeds": args.npu_seeds,
           "results": results, "wall_s": round(time.perf_counter() - t0, 1),
           "note": ("random-weight reference models (no pretrained diffusion checkpoint installs "
                    "offline): the cosine measures how far quantization moves a whole "
                    "generation from the fp32 artifact's, not visual quality")}
    QB.emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
