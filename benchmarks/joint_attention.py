"""Joint video+motion attention (``motion-dit``): where the motion tokens go in block sparsity.

RainFusion2.0's selection runs over the video grid with its tile permutation; the motion tokens
that follow the grid either stay dense (every motion row attends to every key and every query
keeps the motion key blocks: ``tail_mode=dense``) or become ordinary blocks selected like the
video's (``tail_mode=blocks``). One compile each on the same runtime, interleaved with the dense
model (first run of each block dropped, medians): p50, speedup over dense, and each output's
cosine / relative L2 vs dense on the model's example inputs. Usage:

    python benchmarks/joint_attention.py [--config small] [--target openvino-cpu]
                                         [--keep 0.2] [--block 65] [--rounds 3] [--out F]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

import edgec
from edgec.exporters.verify import compare_outputs

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), interleaved()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--block", type=int, default=65, help="tokens per block (tiles the grid)")
    ap.add_argument("--extra", default="", help="more sparse-attention options")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per block")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    spec = f"keep={args.keep},block={args.block}" + (f",{args.extra}" if args.extra else "")
    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgec-joint-") as tmp:
        for name, sparse in (("dense", None), ("tail_dense", f"{spec},tail_mode=dense"),
                             ("tail_blocks", f"{spec},tail_mode=blocks")):
            print(f"[joint-bench] compiling {name}", file=sys.stderr, flush=True)
            art = edgec.compile("motion-dit", target=args.target, config=args.config,
                                output_dir=Path(tmp) / name, sparse_attention=sparse)
            sessions[name] = art.load()
            if sparse:
                stats = next(p["stats"] for p in art.manifest["passes"]
                             if p["name"] == "sparse-attention")
                rows[name] = {"sparse_attention": sparse,
                              "sites_rewritten": stats["sites_rewritten"],
                              "attention_gflops_dense": stats.get("attention_gflops_dense"),
                              "attention_gflops_sparse": stats.get("attention_gflops_sparse")}
            else:
                rows[name] = {"hyperparameters": {
                    k: art.manifest["source"]["hyperparameters"].get(k)
                    for k in ("grid", "video_tokens", "motion_tokens", "seq_len", "dim",
                              "heads", "depth")}}
        feeds = sessions["dense"].default_feeds
        meas = QB.interleaved(sessions, feeds, args.rounds, args.repeat)
        ref = sessions["dense"].run(feeds)
        for name, sess in sessions.items():
            rows[name]["latency"] = QB.lat_stats(meas["times"][name])
            if name != "dense":
                rows[name]["speedup_vs_dense"] = round(
                    rows["dense"]["latency"]["p50_ms"] / rows[name]["latency"]["p50_ms"], 3)
                rows[name]["vs_dense"] = {
                    k: {"cosine": round(e["cosine"], 5), "rel_l2": round(e["rel_l2"], 5)}
                    for k, e in compare_outputs(sess.run(feeds), ref).items()}
    best = max(("tail_dense", "tail_blocks"),
               key=lambda n: min(e["cosine"] for e in rows[n]["vs_dense"].values()))
    doc = {"benchmark": "joint_attention", "machine": QB.machine(), "git": QB.git_state(),
           "versions": edgec.artifact.versions(), "model": "motion-dit", "config": args.config,
           "target": args.target, "results": rows, "more_accurate": best,
           "timing": {"rounds": args.rounds, "block": args.repeat},
           "wall_s": round(time.perf_counter() - t0, 1),
           "note": "random-weight model: cosines measure how far sparsity moves the output"}
    QB.emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
