"""How long an export takes with torch.onnx's ATen translation registry built once per opset
for the process (``torch_export._one_registry``) against building it again for every export, as
``torch.onnx.export`` does by itself.

Why it matters: exports are most of a compile's time on small models and most of the test
suite's (233 exports, 980 of ~2050 summed seconds in one run on a 2-core AVX2 host), and a
compile of a decoder, a VLM or a denoiser with companion graphs exports several graphs.

Each case exports ``--rounds`` times per mode, interleaved (shared, fresh, fresh, shared, ...;
a first round of each dropped as warm-up), and checks each round's two graphs are byte for byte
the same. Registry models go through ``export_module`` (the export alone); SmolLM2-135M's first
4 layers (a Hugging Face ``LlamaForCausalLM`` with its published weights, ``_smollm2.py``)
through ``resolve_source`` (the export plus edgec's PyTorch check, the compile's export step).
Reported: median seconds per mode, the ratio of medians and the median of per-round ratios.

Run: ``python benchmarks/export_time.py [--rounds 4] [--out PATH]`` (results:
``benchmarks/results/export_time.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()

# (label, registry model or "smollm2-4", config, opset)
CASES = (("llama tiny", "llama", "tiny", None), ("video-dit tiny", "video-dit", "tiny", None),
         ("motion-dit tiny", "motion-dit", "tiny", None), ("llama small", "llama", "small", None),
         ("SmolLM2-135M, 4 layers (HF)", "smollm2-4", None, None))


def log(msg: str) -> None:
    print(f"[export-time {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_once(source: str, config: str | None, opset: int | None, shared: bool
                ) -> tuple[float, bytes]:
    """One export (``shared``: with the process's registry): seconds, graph bytes."""
    import onnx_ir as ir

    from edgec.exporters import torch_export

    saved = torch_export._one_registry
    if not shared:
        torch_export._one_registry = contextlib.nullcontext
    try:
        if source == "smollm2-4":
            from edgec.exporters.sources import resolve_source

            path = str(_load("_smollm2", "edgec_bench_smollm2").checkpoint(4))
            start = time.perf_counter()
            model = resolve_source(path, config).model
        else:
            from edgec.models import registry

            spec = registry.get(source)
            module, inputs = spec.build(config), spec.example_inputs(config)
            start = time.perf_counter()
            model = torch_export.export_module(module, inputs, spec.dynamic_shapes(config),
                                               spec.output_names, opset=opset).model
        seconds = time.perf_counter() - start
    finally:
        torch_export._one_registry = saved
    return seconds, ir.to_proto(model).graph.SerializeToString()


def measure(label: str, source: str, config: str | None, opset: int | None, rounds: int
            ) -> dict:
    times: dict[str, list[float]] = {"fresh": [], "shared": []}
    identical = True
    for r in range(rounds + 1):
        order = ("shared", "fresh") if r % 2 == 0 else ("fresh", "shared")
        graphs = {}
        for mode in order:
            seconds, graphs[mode] = export_once(source, config, opset, mode == "shared")
            if r:  # round 0 warms both up (and builds the shared registry)
                times[mode].append(seconds)
        identical &= graphs["fresh"] == graphs["shared"]
        if r:
            log(f"{label} round {r}: fresh {times['fresh'][-1]:.2f} s, "
                f"shared {times['shared'][-1]:.2f} s")
    figures = QB.paired(times, "fresh", "shared", ratio_digits=3)
    return {"case": label, "what": "resolve_source (export + PyTorch check)"
            if source == "smollm2-4" else "export_module", "rounds": rounds, **figures,
            "saved_median_s": round(figures["fresh_median_s"] - figures["shared_median_s"], 3),
            "graphs_identical": identical}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as each of the suite's two workers on 2 cores
    load = QB.loadavg()
    rows = [measure(*case, args.rounds) for case in CASES]
    for r in rows:
        log(f"{r['case']:28s} fresh {r['fresh_median_s']:.2f} s, shared "
            f"{r['shared_median_s']:.2f} s ({r['speedup_paired_median']}×, identical: "
            f"{r['graphs_identical']})")
    QB.emit({"benchmark": "export-time", "machine": QB.machine(), "git": QB.git_state(),
             "torch_threads": 1, "loadavg_before": load, "loadavg_after": QB.loadavg(),
             "rows": rows}, args.out)
    return 0 if all(r["graphs_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
