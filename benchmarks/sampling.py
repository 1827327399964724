"""End to end diffusion sampling, dense vs scheduled sparse attention, on one runtime.

``video-dit small`` (8192 video + 64 text tokens), flow-matching Euler, 50 steps, classifier-free
guidance 6.0 (``--guidance-mode auto``: each graph times one batch-2 run against two batch-1 runs
on its first steps and keeps the faster). Dense: every step on the dense graph. Scheduled
sparse: the artifact compiled with ``--sparse-attention keep=0.2,dense_steps=W`` runs its first W
steps on the dense companion graph and the rest block-sparse (RainFusion's schedule).
``--sparse-extra share=batch`` shares one selection across a batched guidance pair (RainFusion2.0;
measured slower on OpenVINO here: 2.04 s vs 1.66 s per batch-2 forward).
Whole generations alternate dense / sparse (``--repeats`` pairs, the first pair
after one warm-up step each); the JSON gives median wall times, their ratio, the final-latent
cosine and relative L2 of sparse vs dense from the same noise, per-step medians of both graphs,
and the speedup the per-step times predict for other W (w + (1−w)/s). Usage:

    python benchmarks/sampling.py [--target openvino-cpu] [--steps 50] [--dense-steps 5]
                                  [--repeats 2] [--config small] [--out FILE]
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

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()
GOAL = 1.8  # RainFusion2.0 reports 1.5-1.8x end to end


def log(msg: str) -> None:
    print(f"[sampling-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def run(target: str, config: str, steps: int, dense_steps: int, keep: float, repeats: int,
        root: Path, extra: str = "", guidance_mode: str = "auto") -> dict:
    log(f"compiling video-dit {config} for {target}: dense, and sparse keep={keep}")
    dense_art = edgec.compile("video-dit", target=target, config=config,
                              output_dir=root / "dense")
    sparse_art = edgec.compile("video-dit", target=target, config=config,
                               output_dir=root / "sparse",
                               sparse_attention=f"keep={keep},dense_steps={dense_steps}"
                               + (f",{extra}" if extra else ""))
    dense, sparse = edgec.load(dense_art.path), edgec.load(sparse_art.path)
    # warm-up: first runs of each shape allocate; the sparse artifact opens its dense companion
    dense.sample(steps=2, seed=0, guidance_mode=guidance_mode)  # batch-2, then two batch-1
    sparse.sample(steps=4, seed=0, dense_steps=2, guidance_mode=guidance_mode)
    sampler, probes = {}, {"dense": [], "sparse": []}
    walls = {"dense": [], "sparse": []}
    per_step = {"dense": [], "sparse": []}
    finals = {}
    for r in range(repeats):
        for name, sess in (("dense", dense), ("sparse", sparse))[:: 1 if r % 2 == 0 else -1]:
            marks = [time.perf_counter()]
            out = sess.sample(steps=steps, seed=0, guidance_mode=guidance_mode,
                              callback=lambda i, n, marks=marks: marks.append(time.perf_counter()))
            sampler[name] = {k: v for k, v in sess.last_sampling.items()
                             if k not in ("seconds", "guidance_probe_ms")}
            probes[name].append(sess.last_sampling["guidance_probe_ms"])
            walls[name].append(marks[-1] - marks[0])
            step_s = np.diff(marks)
            per_step[name].append(step_s)
            finals[name] = out["latent"]
            log(f"{name}: {walls[name][-1]:.1f} s ({sess.last_sampling['model_runs']} runs)")
    d_wall, s_wall = float(np.median(walls["dense"])), float(np.median(walls["sparse"]))
    dense_step = float(np.median(np.concatenate(per_step["dense"])))
    sparse_step = float(np.median(np.concatenate([s[dense_steps:] for s in per_step["sparse"]])))
    s_ratio = dense_step / sparse_step
    diff = finals["sparse"] - finals["dense"]
    return {
        "model": "video-dit", "config": config, "target": target,
        "hyperparameters": dense_art.manifest["source"]["hyperparameters"],
        "sampler": sampler,
        "guidance_probes_ms": probes,  # per generation; the session keeps its first choice
        "steps": steps, "dense_steps": dense_steps, "keep": keep, "repeats": repeats,
        "sparse_options": sparse_art.manifest["recipe"]["options"].get("sparse-attention"),
        "sparse_pass": {k: sparse_art.manifest["passes"][i]["stats"].get(k)
                        for i, p in enumerate(sparse_art.manifest["passes"])
                        if p["name"] == "sparse-attention"
                        for k in ("sites_rewritten", "predicted_sparsity", "blocks",
                                  "kept_blocks", "attention_gflops_dense",
                                  "attention_gflops_sparse")},
        "wall_s": {"dense": walls["dense"], "sparse": walls["sparse"],
                   "dense_median": round(d_wall, 2), "sparse_median": round(s_wall, 2)},
        "speedup": round(d_wall / s_wall, 3),
        "meets_goal": d_wall / s_wall >= GOAL,
        "goal": GOAL,
        "step_ms": {"dense": round(dense_step * 1e3, 1), "sparse": round(sparse_step * 1e3, 1),
                    "per_step_speedup": round(s_ratio, 3)},
        "predicted_speedup_by_dense_steps": {
            str(w): round(steps / (w + (steps - w) / s_ratio), 3)
            for w in sorted({0, dense_steps, steps // 10, steps // 5, int(steps * 0.375)})},
        "final_latent": {"cosine_sparse_vs_dense": round(_cos(finals["sparse"],
                                                              finals["dense"]), 5),
                         "rel_l2": round(float(np.linalg.norm(diff) /
                                               np.linalg.norm(finals["dense"])), 5),
                         "dense_std": round(float(finals["dense"].std()), 4)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dense-steps", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sparse-extra", default="",
                    help="more sparse-attention options (tiny: block=4,min_seq=0)")
    ap.add_argument("--guidance-mode", default="auto", choices=("auto", "batch", "split"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-sampling-") as tmp:
        result = run(args.target, args.config, args.steps, args.dense_steps, args.keep,
                     args.repeats, Path(tmp), args.sparse_extra, args.guidance_mode)
    doc = {"benchmark": "sampling", "machine": QB.machine(), "git": QB.git_state(),
           "versions": edgec.artifact.versions(), "result": result,
           "wall_s": round(time.perf_counter() - t0, 1),
           "note": ("random-weight video-dit: the final-latent cosine measures how far sparse "
                    "attention moves a 50-step trajectory, not visual quality")}
    QB.emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
