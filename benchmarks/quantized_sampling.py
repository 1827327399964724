"""Quantized diffusion sampling: calibration on drawn inputs vs on the sampler's trajectory.

For each reference diffusion model (``tiny``) and each quantized target, two artifacts:
``draws`` calibrates (and judges the accuracy floor) on the model's independent input draws,
N(0, 1) noisy samples at uniform timesteps (what edgec did before: given here as ``--calib``
an .npz of ``ModelSpec.drawn_inputs``, 16 calibration + 4 held-out); ``default`` is what
edgec does now (``calibration_data`` says which: feeds recorded from the fp32 model's own sampler,
or, for pose-prior, the draws). Each row gives the floor's
held-out cosine where the compile measured one, and the cosine of whole generations (the
artifact's default steps and guidance, ``--seeds`` seeds) to the fp32 artifact's from the same
noise: the number the floor stands for. ``--graphs`` adds denoiser graphs that are not
reference models, an exported .onnx or a diffusers transformer (random init): ``draws`` are then
the random feeds they calibrated on before, ``default`` their fp32 graph's own trajectory. Usage:

    python benchmarks/quantized_sampling.py [--models reactive-dance,...] [--targets ...]
                                            [--graphs reactive-dance.onnx,wan,cogvideox]
                                            [--graph-targets ...] [--seeds 2] [--npu-seeds 1]
                                            [--out FILE]
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
# denoiser graphs (``--graphs``): calibrated on their fp32 graph's trajectory (random conditions)
# against random feeds, what they calibrated on before; diffusers ones as the test suite builds
GRAPHS = {
    "wan": ("WanTransformer3DModel",
            dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)),
    "cogvideox": ("CogVideoXTransformer3DModel",
                  dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                       out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=2,
                       sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=8,
                       use_rotary_positional_embeddings=True)),
}
GRAPH_TARGETS = ("ort-cpu:w8a8", "openvino-cpu:w8a8")


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
    """The accuracy floor's held-out cosine (``achieved``), how many layers it kept, and its
    whole 16-step sample from held-out noise (``sample_check``)."""
    mp = next((p["stats"]["mixed_precision"] for p in report.get("passes") or []
               if "mixed_precision" in (p.get("stats") or {})), None)
    if not mp:
        return None
    return {"achieved": mp.get("achieved"), "min_cos": mp.get("min_cos"),
            "reached": mp.get("reached"), "kept": len(mp.get("kept") or []),
            "sample": mp.get("sample")}


def graph_source(name: str, root: Path) -> tuple[str, Path]:
    """A denoiser graph source (``GRAPHS``): a reference model's ``edgec export`` (.onnx with
    its sampling entry), or a random-init diffusers transformer folder (the test suite's
    configs, two layers)."""
    if name.endswith(".onnx"):
        from edgec.exporters.export_file import export_to_file

        path = root / name
        export_to_file(name.removesuffix(".onnx"), path, config="tiny")
        return name, path
    import diffusers
    import torch

    torch.manual_seed(0)
    cls, config = GRAPHS[name]
    path = root / name
    getattr(diffusers, cls)(**config).save_pretrained(path)
    return f"{name} (diffusers {cls}, random init)", path


def graph_draws_npz(path: Path, out: Path) -> Path:
    """What an .onnx or diffusers source calibrated on before (and still does without a
    sampling entry): random feeds shaped as its example (``random_feeds``, seeds 1000 + i)."""
    from edgec.calibration.samples import _specs
    from edgec.exporters.sources import random_feeds, resolve_source

    src = resolve_source(str(path))
    sets = [random_feeds(_specs(src), seed=1000 + i) for i in range(DEFAULT_SAMPLES + HELD_OUT)]
    np.savez(out, **{k: np.stack([s[k] for s in sets]) for k in sets[0]})
    return out


def run(model: str, targets: list[str], seeds: int, root: Path, npu_seeds: int,
        source=None, config: str | None = "tiny", npz: Path | None = None) -> dict:
    """``source`` (default the reference ``model``, ``config``) against its fp32 artifact;
    ``npz`` the draws (default the reference model's ``drawn_inputs``)."""
    source = model if source is None else source
    log(f"{model}: fp32 reference")
    fp = edgec.load(edgec.compile(source, target="ort-cpu", config=config,
                                  output_dir=root / f"{model}-fp32").path)
    reference = [fp.sample(seed=s) for s in range(seeds)]
    npz = npz or draws_npz(model, root / f"{model}-draws.npz")
    rows = {}
    for entry in targets:
        target, scheme = entry.split(":", 1)
        for how in ("draws", "default"):
            log(f"{model} {target} {scheme} {how}")
            t0 = time.perf_counter()
            art = edgec.compile(source, target=target, config=config, quantize=scheme,
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
    spec = fp.manifest["sampling"]
    return {"sampling": {k: spec[k] for k in ("kind", "solver", "steps", "guidance")
                         if k in spec},
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--graphs", default="",
                    help="also these denoiser graphs: NAME.onnx (a reference model's export), "
                         f"{', '.join(GRAPHS)} (diffusers, random init)")
    ap.add_argument("--graph-targets", default=",".join(GRAPH_TARGETS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--npu-seeds", type=int, default=1,
                    help="generations per qnn-htp row (the HTP emulator runs ~1 s a step)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgec-qsampling-") as tmp:
        for model in filter(None, args.models.split(",")):
            results[model] = run(model, args.targets.split(","), args.seeds, Path(tmp),
                                 args.npu_seeds)
        for name in filter(None, args.graphs.split(",")):
            label, path = graph_source(name, Path(tmp))
            npz = graph_draws_npz(path, Path(tmp) / f"{name}-draws.npz")
            results[label] = run(name, args.graph_targets.split(","), args.seeds, Path(tmp),
                                 args.npu_seeds, source=str(path), config=None, npz=npz)
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
