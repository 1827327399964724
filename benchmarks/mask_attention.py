"""Mask-aware block sparsity vs the dense masked graph: the same model, exact, faster.

For each model (default ``reactive-dance small``: block-diagonal mask over 60-token blocks, and
``motion-recovery small``: a 120-frame band over 1024 frames) and runtime, the dense compile and
the ``--sparse-attention mode=mask`` compile run on the same example inputs, interleaved in
blocks (first run of each block dropped), medians. The JSON gives p50s, the speedup, the largest
relative difference between the two outputs (the rewrite is exact: ≤ 1e-4), and the pass's
per-site report (mask structure, block size, kept fraction, attention GFLOPs). Usage:

    python benchmarks/mask_attention.py [--models reactive-dance:small motion-recovery:small]
                                        [--targets ort-cpu openvino-cpu] [--rounds 4] [--out F]
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


def log(msg: str) -> None:
    print(f"[mask-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench(model: str, config: str, target: str, rounds: int, block: int, root: Path) -> dict:
    log(f"{model} {config} on {target}")
    dense = edgec.compile(model, target=target, config=config, output_dir=root / "dense")
    sparse = edgec.compile(model, target=target, config=config, output_dir=root / "sparse",
                           sparse_attention="mode=mask")
    stats = next(p["stats"] for p in sparse.manifest["passes"] if p["name"] == "sparse-attention")
    sessions = {"dense": dense.load(), "sparse": sparse.load()}
    feeds = sessions["dense"].default_feeds
    meas = QB.interleaved(sessions, feeds, rounds, block)
    lat = {k: QB.lat_stats(v) for k, v in meas["times"].items()}
    err = compare_outputs(sessions["sparse"].run(feeds), sessions["dense"].run(feeds))
    sites = [s for s in stats["sites"] if s["status"] != "skipped"]
    row = {
        "model": model, "config": config, "target": target,
        "seq_len": dense.manifest["source"]["hyperparameters"].get("seq_len"),
        "dense": lat["dense"], "sparse": lat["sparse"],
        "speedup": round(lat["dense"]["p50_ms"] / lat["sparse"]["p50_ms"], 3),
        "max_rel_sparse_vs_dense": max(e["max_rel"] for e in err.values()),
        "sites": {"found": stats["sites_found"], "exact": stats["sites_exact"],
                  "skipped": stats["skipped_reasons"]},
        "site": {k: sites[0].get(k) for k in ("mask", "block", "groups", "kept_fraction",
                                              "keys_per_query_block")} if sites else None,
        "attention_gflops": {"dense": stats.get("attention_gflops_dense"),
                             "sparse": stats.get("attention_gflops_sparse")},
    }
    log(f"  dense {row['dense']['p50_ms']:.1f} ms, sparse {row['sparse']['p50_ms']:.1f} ms, "
        f"x{row['speedup']}, max rel {row['max_rel_sparse_vs_dense']:.2e}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["reactive-dance:small", "motion-recovery:small"])
    ap.add_argument("--targets", nargs="+", default=["ort-cpu", "openvino-cpu"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0, rows = time.perf_counter(), []
    for item in args.models:
        name, _, config = item.partition(":")
        for target in args.targets:
            with tempfile.TemporaryDirectory(prefix="edgec-mask-") as tmp:
                rows.append(bench(name, config or "small", target, args.rounds, args.block,
                                  Path(tmp)))
    doc = {"benchmark": "mask_attention", "machine": QB.machine(), "git": QB.git_state(),
           "versions": edgec.artifact.versions(),
           "timing": {"rounds": args.rounds, "block": args.block,
                      "statistic": "p50 of interleaved blocks, first run of each dropped"},
           "goal": "exact (max rel <= 1e-4) and faster than the dense masked graph",
           "results": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    QB.emit(doc, args.out)
    return 0 if all(r["max_rel_sparse_vs_dense"] <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
