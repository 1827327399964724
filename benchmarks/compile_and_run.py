"""Export+compile wall time and p50 latency, ort-cpu vs openvino-cpu, for reference models.

Both targets' latencies are measured in the same process, interleaved in blocks, after a
warm-up; the JSON carries the OpenVINO/ORT speed ratio. Usage:

    python benchmarks/compile_and_run.py [--models video-dit:small llama:small] [--runs 10]

Without --models it runs every registered reference model at its small config (one row each).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

import edgec
from edgec.artifact import versions

TARGETS = ("ort-cpu", "openvino-cpu")


QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state()


def interleaved_latency(sessions: dict, feeds: dict, runs: int, warmup: int, block: int = 5
                        ) -> dict:
    """Alternate blocks of ``block`` runs per session; the first run of each block is dropped.

    Run-by-run alternation is unfair: ORT's intra-op threads spin-wait after a run and steal
    the cores from whichever runtime runs next (measured: OpenVINO 19 ms interleaved vs 12 ms
    alone on llama small).
    """
    times = {name: [] for name in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(feeds)
    while min(len(t) for t in times.values()) < runs:
        for name, s in sessions.items():
            s.run(feeds)
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(feeds)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                   "runs": len(t)} for name, t in times.items()}


def bench_model(name: str, config: str, runs: int, warmup: int, root: Path) -> dict:
    result = {"model": name, "config": config, "targets": {}}
    sessions = {}
    for target in TARGETS:
        t0 = time.perf_counter()
        art = edgec.compile(name, target=target, config=config,
                            output_dir=root / f"{name}-{target}")
        wall = time.perf_counter() - t0
        worst = max(art.report["fidelity"]["target_vs_source"]["outputs"].values(),
                    key=lambda e: e["max_rel"])
        result["targets"][target] = {
            "compile_wall_s": round(wall, 2),
            "export_s": round(art.report["timings_s"]["export_s"], 2),
            "max_rel_vs_pytorch": worst["max_rel"],
            "cosine_vs_pytorch": worst["cosine"],
        }
        sessions[target] = art.load()
    feeds = sessions[TARGETS[0]].default_feeds
    lat = interleaved_latency(sessions, feeds, runs, warmup)
    for target in TARGETS:
        result["targets"][target].update(lat[target])
    result["openvino_speedup_vs_ort"] = round(
        lat["ort-cpu"]["p50_ms"] / lat["openvino-cpu"]["p50_ms"], 3)
    a, b = (sessions[t].run(feeds) for t in TARGETS)
    from edgec.exporters.verify import compare_outputs

    result["cross_target_cosine"] = min(e["cosine"] for e in compare_outputs(b, a).values())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="name[:config] (default: every registered "
                    "model at small)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    from edgec.models import registry

    models = args.models or [f"{name}:small" for name in registry.names()]
    results = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        for item in models:
            name, _, config = item.partition(":")
            results.append(bench_model(name, config or "small", args.runs, args.warmup, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr)
    doc = {"benchmark": "compile_and_run", "machine": QB.machine(), "git": QB.git_state(),
           "versions": versions(), "results": results}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
