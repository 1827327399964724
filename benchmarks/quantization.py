"""Quantization benchmark: w8a8 speed vs fp32, accuracy per scheme × target, calibration time.

Three parts, one process run (``--quick``: tiny configs, few rounds, a smoke test):

1. speed: ``llama small`` fp32 vs w8a8 on openvino-cpu and ort-cpu, each compiled artifact's own
   Session. Per runtime, all its variants run interleaved in rounds (one runtime at a time, so
   the other's sessions sit idle); in a round each session runs one block of ``--block`` timed
   runs after one dropped run (ORT's spin-waiting intra-op threads steal the cores from whatever
   runs next), the order reversed every other round, after warm-ups. Reported per session:
   p50/p90/min over all timed runs; per variant: the speedup as the ratio of p50s and as the
   median over rounds of the paired per-round block medians (the fp32 and int8 blocks of a round
   are a second apart, so load from other processes on the shared 2-core machine largely
   cancels). Goal: w8a8 ≥ 2.0× fp32 on OpenVINO (``goal_met``, judged on the paired ratio of
   the headline variant, edgec's default ``w8a8``). Variants (one calibration cache per target
   for all of them: minmax, 16 generated samples): ``w8a8``; ``w8a8-attn`` (the
   activation×activation attention MatMuls excluded by node name); ``w8a8-lm_head``;
   ``w8a8-attn-lm_head``; outside edgec, ``plain_qs`` (onnxruntime ``quantize_static`` on the fp32
   model.onnx: u8 activations, s8 per-channel weights, MatMul only, its own MinMax over the same
   samples; the reference first measured outside edgec) and ``plain_qs_symact`` (the same with
   symmetric activations: u8 with zero point 128). OpenVINO experiments: the executed graph
   (``get_runtime_model``) per variant, counted by layer type × runtime precision; a per-layer
   profile (PERF_COUNT) of fp32, w8a8 and plain_qs_symact; fp32 vs w8a8 with
   ``INFERENCE_NUM_THREADS=1`` and with the input reshaped to a static [batch, seq]. ORT
   experiments: fp32 vs w8a8 with one intra-op thread and with ORT's default spin-waiting
   threads (edgec's ort-cpu sessions do not spin), and the fp32/w8a8 ratio in three separate
   batches with and without spinning (how steady the figure is).
2. accuracy: every scheme each target offers (``edgec.targets.TARGETS``; qnn-htp when registered)
   on ``llama small`` and ``small+outliers``: cosine, max_rel (max |err| / max |ref|) and rel_l2
   of the logits vs the fp32 PyTorch reference, from the compile's fidelity report. TensorRT
   artifacts are verified by ORT CPU on the TensorRT-legal graph when TensorRT is absent.
   ``fp32`` rows check the unquantized artifact (not applicable on qnn-htp, which runs only QDQ
   graphs). Where the openvino-cpu compile refuses its quantized artifact (its cosine floor of
   0.998 against ORT on the same graph), the row keeps the error and a ``fallback``: OpenVINO run
   on the ort-cpu artifact's identical graph (same QuantScheme, no legalize passes), measured the
   same way.
3. calibration: ``edgec.calibrate`` time on ``llama small`` (ort-cpu, w8a8) per method at two
   sample counts (the fastest of two runs each); seconds per 100 samples from the slope (fixed
   costs removed) and scaled from the larger count.

    python benchmarks/quantization.py [--quick] [--rounds 40] [--out FILE]

Without ``--quick`` the JSON also goes to benchmarks/results/quantization.json (unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# OpenVINO's telemetry asks for consent on import unless CI is set; set before any import of it.
os.environ["CI"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quantization.json"
SPEED_TARGETS = ("openvino-cpu", "ort-cpu")
GOAL = {"openvino_w8a8_speedup": 2.0}
# The variant the goal is judged on: edgec's default w8a8, what users get (attention MatMuls
# quantized too). Excluding them changes OpenVINO's speed within noise; excluding lm_head costs
# about 15% (speed.targets.*.w8a8-* in the JSON).
HEADLINE = "w8a8"
METHODS = ("minmax", "percentile", "entropy")


def log(msg: str) -> None:
    print(f"[quant-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ machine --

def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
           if f" {f}" in flags]
    return {"cpu_model": cpu or platform.processor(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "isa": isa,
            "platform": platform.platform(), "python": sys.version.split()[0]}


def paired(times: dict[str, list[float]], slow: str, fast: str, ratio_digits: int = 2) -> dict:
    """Interleaved rounds' figures: each mode's seconds and median, the ratio of medians and the
    median of per-round ratios (``slow`` over ``fast``)."""
    import statistics

    med = {k: statistics.median(times[k]) for k in (slow, fast)}
    return {f"{slow}_s": [round(t, 3) for t in times[slow]],
            f"{fast}_s": [round(t, 3) for t in times[fast]],
            f"{slow}_median_s": round(med[slow], 3), f"{fast}_median_s": round(med[fast], 3),
            "speedup_of_medians": round(med[slow] / med[fast], ratio_digits),
            "speedup_paired_median": round(statistics.median(
                a / b for a, b in zip(times[slow], times[fast])), ratio_digits)}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "edgec").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "edgec_uncommitted": dirty}


# ------------------------------------------------------------------------------ timing --

def interleaved(sessions: dict, feeds: dict, rounds: int, block: int, warmup: int = 3) -> dict:
    """Blocks of ``block`` timed runs per session per round, each after one dropped run."""
    names = list(sessions)
    times = {k: [] for k in names}
    blocks = {k: [] for k in names}
    for k in names:
        for _ in range(warmup):
            sessions[k].run(feeds)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            s = sessions[k]
            s.run(feeds)  # dropped: the previous runtime's threads may still spin
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(feeds)
                ts.append((time.perf_counter() - t0) * 1e3)
            times[k].extend(ts)
            blocks[k].append(float(np.median(ts)))
    return {"times": times, "blocks": blocks}


def lat_stats(ts: list[float]) -> dict:
    return {"p50_ms": round(float(np.median(ts)), 3),
            "p90_ms": round(float(np.percentile(ts, 90)), 3),
            "min_ms": round(float(np.min(ts)), 3), "runs": len(ts)}


def speedup(meas: dict, base: str, cand: str) -> dict:
    t, b = meas["times"], meas["blocks"]
    paired = np.array(b[base]) / np.array(b[cand])
    return {"ratio_of_p50": round(float(np.median(t[base]) / np.median(t[cand])), 3),
            "paired_median": round(float(np.median(paired)), 3),
            "paired_iqr": [round(float(np.percentile(paired, 25)), 3),
                           round(float(np.percentile(paired, 75)), 3)],
            "ratio_of_min": round(float(np.min(t[base]) / np.min(t[cand])), 3)}


# ------------------------------------------------------------------------------ helpers --

def fidelity(art) -> dict:
    out = art.report["fidelity"]["target_vs_source"]["outputs"]
    name = "logits" if "logits" in out else next(iter(out))
    e = out[name]
    return {"cosine": round(e["cosine"], 6), "max_rel": round(e["max_rel"], 5),
            "rel_l2": round(e["rel_l2"], 5), "max_abs": round(e["max_abs"], 5)}


def fp32_names(model_path: Path) -> dict:
    """Node names to exclude: activation×activation MatMuls, the MatMul making the output."""
    import onnx_ir as ir

    m = ir.load(model_path)
    attn = [n.name for n in m.graph if n.op_type == "MatMul"
            and not any(v.const_value is not None for v in n.inputs)]
    head = [n.name for n in m.graph if n.op_type == "MatMul"
            and any(o in m.graph.outputs for o in n.outputs)]
    return {"attention_matmuls": attn, "lm_head": head}


class OVRaw:
    """An OpenVINO compiled model with a Session-like ``run`` (for the thread/shape experiments)."""

    def __init__(self, xml: Path, config: dict, static: dict | None = None):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(xml))
        if static:
            model.reshape({k: list(v) for k, v in static.items()})
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, feeds):
        res = self.request.infer(feeds, share_inputs=True)
        return {p.get_any_name(): np.array(res[p], copy=True) for p in self.compiled.outputs}


def ov_runtime_census(xml: Path, config: dict) -> dict:
    """What OpenVINO's CPU plugin executes: layer type × runtime precision counts, MatMul-like
    layers (FullyConnected, MatMul, attention Subgraphs) listed by precision."""
    raw = OVRaw(xml, config)
    counts, gemm = Counter(), Counter()
    for op in raw.compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        lt, prec = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
        if lt in ("Const", "Input", "Output"):
            continue
        counts[f"{lt}:{prec}"] += 1
        if lt in ("FullyConnected", "MatMul", "Subgraph", "ScaledDotProductAttention"):
            orig = rt["originalLayersNames"].astype(str)
            kind = "attention" if ("scaled_dot" in orig or "Softmax" in orig) else "linear"
            gemm[f"{lt}({kind}):{prec}"] += 1
    return {"matmul_like": dict(sorted(gemm.items())),
            "nodes_by_type_precision": dict(sorted(counts.items()))}


def plain_quantize_static(fp32_onnx: Path, samples: list[dict], out: Path,
                          symmetric_activations: bool = False,
                          op_types: list[str] | None = ("MatMul",)) -> Path:
    """onnxruntime quantize_static as first measured outside edgec: u8 activations, s8
    per-channel weights, MatMul only (``op_types``; None: every op type ORT knows), MinMax over
    ``samples``; ``symmetric_activations``: u8 with zero point 128 (ORT's ActivationSymmetric),
    i.e. int8 values without a zero point."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" warnings
    quantize_static(str(fp32_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=list(op_types) if op_types is not None else None,
                    use_external_data_format=True,
                    extra_options={"ActivationSymmetric": symmetric_activations})
    return path


def ov_convert(onnx_path: Path) -> Path:
    import openvino as ov

    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def ov_profile(xml: Path, config: dict, feeds: dict, runs: int) -> dict:
    """OpenVINO per-layer profile (PERF_COUNT): ms per inference by (layer type, kernel), the
    median over ``runs`` inferences per key (robust to preemption by other processes)."""
    raw = OVRaw(xml, {**config, "PERF_COUNT": True})
    for _ in range(3):
        raw.request.infer(feeds)
    per_run: list[Counter] = []
    for _ in range(runs):
        raw.request.infer(feeds)
        c: Counter = Counter()
        for p in raw.request.get_profiling_info():
            c[f"{p.node_type}:{p.exec_type}"] += p.real_time.total_seconds() * 1e3
        per_run.append(c)
    keys = set().union(*per_run)
    med = Counter({k: float(np.median([c.get(k, 0.0) for c in per_run])) for k in keys})
    total = sum(med.values())
    fc = sum(v for k, v in med.items() if k.startswith("FullyConnected"))
    top = {k: round(v, 3) for k, v in med.most_common(12) if v >= 0.01}
    return {"runs": runs, "total_ms": round(total, 3), "fully_connected_ms": round(fc, 3),
            "fully_connected_share": round(fc / total, 3) if total else None,
            "attention_subgraph_ms": round(sum(v for k, v in med.items()
                                               if k.startswith("Subgraph")), 3),
            "top_ms": top}


class OrtRaw:
    """An ORT CPU session with explicit threading options (for the ORT experiments)."""

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort

        from edgec.runtimes.ort import session_options

        config = {"session.intra_op.allow_spinning": "1" if spinning else "0",
                  "session.inter_op.allow_spinning": "1" if spinning else "0",
                  **({"intra_op_num_threads": threads} if threads else {})}
        opts = session_options(True, config)
        self.sess = ort.InferenceSession(str(path), sess_options=opts,
                                         providers=["CPUExecutionProvider"])

    def run(self, feeds):
        return self.sess.run(None, feeds)


# ------------------------------------------------------------------------------ 1. speed --

PLAIN = {"plain_qs": "onnxruntime quantize_static run directly on the fp32 model.onnx "
                     "(QUInt8 asymmetric activations, QInt8 per-channel weights, MatMul only, "
                     "MinMax over the same samples): the measurement first made outside edgec",
         "plain_qs_symact": "the same with ActivationSymmetric=True (u8, zero point 128): not an "
                            "edgec scheme, an experiment on OpenVINO's int8 kernels"}


def bench_speed(config: str, rounds: int, block: int, root: Path) -> dict:
    import edgec
    from edgec.calibration.samples import generated_samples
    from edgec.exporters.sources import resolve_source
    from edgec.exporters.verify import compare_outputs
    from edgec.runtimes.openvino import OpenVINOSession
    from edgec.runtimes.ort import OrtSession
    from edgec.targets.openvino_cpu import OPENVINO_CPU

    res: dict = {"model": "llama", "config": config, "headline_variant": HEADLINE}
    arts, compile_s = {}, {}
    for tgt in SPEED_TARGETS:
        t0 = time.perf_counter()
        arts[(tgt, "fp32")] = edgec.compile("llama", target=tgt, config=config,
                                            output_dir=root / f"{tgt}-fp32")
        compile_s[(tgt, "fp32")] = time.perf_counter() - t0
    names = fp32_names(root / "ort-cpu-fp32" / "model.onnx")
    res["excluded_names"] = names
    variants = {
        "w8a8": "w8a8",
        "w8a8-attn": "w8a8:exclude=" + ";".join(names["attention_matmuls"]),
        "w8a8-lm_head": "w8a8:exclude=" + ";".join(names["lm_head"]),
        "w8a8-attn-lm_head": "w8a8:exclude=" + ";".join(names["attention_matmuls"]
                                                         + names["lm_head"]),
    }
    res["variants"] = {**{k: f"edgec quantize={q!r}" for k, q in variants.items()}, **PLAIN}
    for tgt in SPEED_TARGETS:
        log(f"speed: calibrating and compiling w8a8 variants for {tgt}")
        cache_dir = root / f"calib-{tgt}"
        cache = edgec.calibrate("llama", tgt, cache_dir, config=config, quantize="w8a8")
        res.setdefault("calibration", {})[tgt] = {"method": cache.method,
                                                  "samples": cache.samples}
        for v, q in variants.items():
            t0 = time.perf_counter()
            arts[(tgt, v)] = edgec.compile("llama", target=tgt, config=config, quantize=q,
                                           output_dir=root / f"{tgt}-{v}", calibration=cache_dir)
            compile_s[(tgt, v)] = time.perf_counter() - t0
    fid = {k: fidelity(a) for k, a in arts.items()}

    # outside-edgec references over the same samples edgec calibrated with
    src = resolve_source("llama", config)
    samples, _ = generated_samples(src, res["calibration"]["ort-cpu"]["samples"])
    plain = {v: plain_quantize_static(root / "ort-cpu-fp32" / "model.onnx", samples, root / v,
                                      symmetric_activations=v.endswith("symact"))
             for v in PLAIN}
    plain_xml = {v: ov_convert(p) for v, p in plain.items()}
    ov_cfg = dict(OPENVINO_CPU.runtime_config)
    feeds = arts[("ort-cpu", "fp32")].load().default_feeds
    per_target, meas_all = {}, {}
    for tgt in SPEED_TARGETS:
        sessions = {v: arts[(tgt, v)].load() for v in ["fp32", *variants]}
        for v in PLAIN:
            sessions[v] = (OpenVINOSession(plain_xml[v], "CPU", ov_cfg) if tgt == "openvino-cpu"
                           else OrtSession(plain[v]))
            e = compare_outputs(sessions[v].run(feeds), src.reference)
            e = e["logits"] if "logits" in e else next(iter(e.values()))
            fid[(tgt, v)] = {k: round(e[k], 6 if k == "cosine" else 5)
                             for k in ("cosine", "max_rel", "rel_l2", "max_abs")}
        # one runtime at a time: the other runtime's sessions sit idle (no spinning threads)
        log(f"speed: {tgt}: {len(sessions)} sessions interleaved, {rounds} rounds × {block}")
        la0 = loadavg()
        meas = interleaved(sessions, feeds, rounds, block)
        meas_all[tgt] = meas
        entry: dict = {"loadavg_before_after": [la0, loadavg()]}
        for v in sessions:
            entry[v] = {**lat_stats(meas["times"][v]), "fidelity": fid[(tgt, v)]}
            if v != "fp32":
                entry[v]["speedup_vs_fp32"] = speedup(meas, "fp32", v)
            if (tgt, v) in compile_s:
                entry[v]["compile_s"] = round(compile_s[(tgt, v)], 2)
        per_target[tgt] = entry
        del sessions
    res["targets"] = per_target
    head = {t: per_target[t][HEADLINE]["speedup_vs_fp32"] for t in SPEED_TARGETS}
    res["headline"] = {"variant": HEADLINE, "quantize": variants[HEADLINE],
                       "openvino_speedup": head["openvino-cpu"]["paired_median"],
                       "openvino_speedup_ratio_of_p50": head["openvino-cpu"]["ratio_of_p50"],
                       "ort_speedup": head["ort-cpu"]["paired_median"],
                       "ort_speedup_ratio_of_p50": head["ort-cpu"]["ratio_of_p50"],
                       "goal": GOAL["openvino_w8a8_speedup"],
                       "goal_met": bool(head["openvino-cpu"]["paired_median"]
                                        >= GOAL["openvino_w8a8_speedup"]),
                       "judged_on": "openvino paired_median"}

    # OpenVINO experiments: executed graph and profile per variant, one thread, static shapes
    log("speed: OpenVINO experiments (runtime graph, profile, threads, static shapes)")
    exp: dict = {"runtime_graph": {}, "profile": {}}
    xmls = {v: root / f"openvino-cpu-{v}" / "target" / "model.xml" for v in ["fp32", *variants]}
    xmls.update(plain_xml)
    for v, xml in xmls.items():
        exp["runtime_graph"][v] = ov_runtime_census(xml, ov_cfg)
    for v in ("fp32", HEADLINE, "plain_qs_symact"):
        exp["profile"][v] = ov_profile(xmls[v], ov_cfg, feeds, max(5, rounds))
    hv = HEADLINE
    static = {k: v.shape for k, v in feeds.items()}
    extra = {"fp32/1thread": OVRaw(xmls["fp32"], {**ov_cfg, "INFERENCE_NUM_THREADS": 1}),
             f"{hv}/1thread": OVRaw(xmls[hv], {**ov_cfg, "INFERENCE_NUM_THREADS": 1}),
             "fp32/static": OVRaw(xmls["fp32"], ov_cfg, static),
             f"{hv}/static": OVRaw(xmls[hv], ov_cfg, static)}
    r2 = max(4, rounds // 2)
    m2 = interleaved(extra, feeds, r2, block)
    exp["threads_and_shapes"] = {
        "rounds": r2, "static_shape": {k: list(v) for k, v in static.items()},
        "p50_ms": {k: lat_stats(m2["times"][k])["p50_ms"] for k in extra},
        "speedup_1thread": speedup(m2, "fp32/1thread", f"{hv}/1thread"),
        "speedup_static_shapes": speedup(m2, "fp32/static", f"{hv}/static"),
        "note": "default config: PERFORMANCE_HINT=LATENCY (2 threads on this machine), "
                "dynamic [batch, seq] input"}
    res["openvino_experiments"] = exp

    log("speed: ORT experiments (spin-waiting as ORT's default; one thread; steadiness)")
    onnx = {v: root / f"ort-cpu-{v}" / "model.onnx" for v in ("fp32", hv)}
    extra = {"fp32/1thread": OrtRaw(onnx["fp32"], 1), f"{hv}/1thread": OrtRaw(onnx[hv], 1),
             "fp32/spin": OrtRaw(onnx["fp32"], None, True),
             f"{hv}/spin": OrtRaw(onnx[hv], None, True)}
    m3 = interleaved(extra, feeds, r2, block)
    # the same pair measured in separate batches: with spin-waiting the ratio moved between
    # runs (1.35–2.07×); edgec's default (no spinning) should give the same figure every time
    default = {v: OrtRaw(onnx[v], None, False) for v in ("fp32", hv)}
    batches = {"default": [], "spin": []}
    for _ in range(3):
        for label, pair in (("default", default),
                            ("spin", {"fp32": extra["fp32/spin"], hv: extra[f"{hv}/spin"]})):
            m = interleaved(pair, feeds, r2, block)
            batches[label].append(speedup(m, "fp32", hv)["paired_median"])
    res["ort_experiments"] = {
        "rounds": r2, "p50_ms": {k: lat_stats(m3["times"][k])["p50_ms"] for k in extra},
        "min_ms": {k: lat_stats(m3["times"][k])["min_ms"] for k in extra},
        "speedup_1thread": speedup(m3, "fp32/1thread", f"{hv}/1thread"),
        "speedup_spin": speedup(m3, "fp32/spin", f"{hv}/spin"),
        "speedup_by_batch": batches,
        "note": "edgec's ORT session (the ort-cpu entries above, 'default' here): default "
                "intra-op threads (2 here) without spin-waiting (the ort-cpu target's "
                "runtime_config); spin: ORT's own default, session.intra_op.allow_spinning=1"}
    return res


# ------------------------------------------------------------------------------ 2. accuracy --

def ov_on_ort_graph(config: str, scheme: str, root: Path) -> dict | None:
    """When the openvino-cpu compile refuses its own artifact (its cross-runtime agreement check),
    measure OpenVINO anyway: the ort-cpu compile with the identical scheme makes the same graph
    (same QuantScheme, no legalize passes on either); OpenVINO runs it under the target's config."""
    import edgec
    from edgec import targets
    from edgec.exporters.sources import resolve_source
    from edgec.exporters.verify import compare_outputs
    from edgec.runtimes.openvino import OpenVINOSession

    ov_t, ort_t = targets.TARGETS["openvino-cpu"], targets.TARGETS["ort-cpu"]
    if (ort_t.schemes.get(scheme) != ov_t.schemes[scheme]
            or ov_t.before_quantize or ov_t.after_quantize
            or ort_t.before_quantize or ort_t.after_quantize):
        return None
    a = edgec.compile("llama", target="ort-cpu", config=config, quantize=scheme,
                      output_dir=root / f"fallback-{config}-{scheme}")
    src = resolve_source("llama", config)
    ov_out = OpenVINOSession(ov_convert(a.path / "model.onnx"), "CPU",
                             dict(ov_t.runtime_config)).run(src.feeds)
    e = compare_outputs(ov_out, src.reference)
    e = e["logits"] if "logits" in e else next(iter(e.values()))
    agree = compare_outputs(ov_out, a.load().run(src.feeds))
    return {"how": "OpenVINO on the ort-cpu artifact's identical QDQ graph",
            **{k: round(e[k], 6 if k == "cosine" else 5)
               for k in ("cosine", "max_rel", "rel_l2", "max_abs")},
            "cosine_vs_ort_on_same_graph": round(min(x["cosine"] for x in agree.values()), 6),
            "ort_same_graph": fidelity(a)}


def bench_accuracy(configs: list[str], root: Path) -> dict:
    import edgec
    from edgec import targets
    from edgec.errors import VerificationError

    names = [t for t in ("ort-cpu", "openvino-cpu", "tensorrt", "qnn-htp")]
    avail = {t: t in targets.TARGETS for t in names}
    rows, skipped = [], {t: "not registered in edgec.targets.TARGETS at run time"
                         for t, ok in avail.items() if not ok}
    for config in configs:
        for tgt in (t for t in names if avail[t]):
            schemes = list(targets.TARGETS[tgt].schemes)
            for scheme in ["fp32", *schemes]:
                log(f"accuracy: {config} {tgt} {scheme}")
                row = {"config": config, "target": tgt, "scheme": scheme}
                t0 = time.perf_counter()
                try:
                    a = edgec.compile("llama", target=tgt, config=config,
                                      quantize=None if scheme == "fp32" else scheme,
                                      output_dir=root / f"acc-{config}-{tgt}-{scheme}")
                except Exception as e:  # noqa: BLE001 (one broken cell is a finding: record it)
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    if scheme == "fp32":
                        row["not_applicable"] = msg  # e.g. qnn-htp runs only quantized graphs
                    else:
                        row["error"] = msg
                        if isinstance(e, VerificationError) and tgt == "openvino-cpu":
                            row["fallback"] = ov_on_ort_graph(config, scheme, root)
                    rows.append(row)
                    continue
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                row.update(fidelity(a))
                stand_in = a.report["fidelity"].get("stand_in")
                row["verified_on"] = stand_in or a.manifest["runtime"]["name"]
                vs = a.report["fidelity"]["target_vs_source"].get("vs_rewritten_onnx")
                if vs:  # the target vs ORT running the same (quantized) graph
                    row["cosine_vs_ort_on_same_graph"] = round(
                        min(x["cosine"] for x in vs["outputs"].values()), 6)
                    if vs.get("agrees") is not None:
                        row["agrees_with_ort"] = vs["agrees"]
                q = a.report.get("quantization") or {}
                st = next((p.get("stats", {}) for p in a.report.get("passes", [])
                           if p.get("name") == "quantize"), {})
                row["quant_stats"] = {k: v for k, v in st.items() if k != "config"} or None
                if q.get("calibration"):
                    row["calibration"] = f"{q['calibration']['method']}, " \
                                         f"{q['calibration']['samples']} samples"
                rows.append(row)
    return {"model": "llama", "configs": configs, "metric_of": "logits vs fp32 PyTorch",
            "targets_available": avail, "targets_skipped": skipped, "rows": rows}


# ------------------------------------------------------------------------------ 3. calibration --

def bench_calibration(config: str, counts: tuple[int, int], methods, root: Path,
                      repeats: int) -> dict:
    """``edgec.calibrate`` per method and sample count; each measured ``repeats`` times, the
    fastest kept (other processes share the cores). ``collect_s`` is the cache's own time (ORT
    calibrator: augmented-graph session, the sample runs, range computation); ``calibrate_wall_s``
    adds the export and passes."""
    import edgec

    out: dict = {"model": "llama", "config": config, "target": "ort-cpu", "scheme": "w8a8",
                 "sample_counts": list(counts), "repeats": repeats, "methods": {}}
    # export once first so that import/first-export costs do not land on the first method
    edgec.calibrate("llama", "ort-cpu", root / "calib-warm", config=config,
                    quantize="w8a8:samples=1")
    for method in methods:
        m: dict = {}
        for n in counts:
            log(f"calibration: {method} × {n}")
            best = None
            for i in range(repeats):
                t0 = time.perf_counter()
                try:
                    c = edgec.calibrate("llama", "ort-cpu", root / f"calib-{method}-{n}-{i}",
                                        config=config,
                                        quantize=f"w8a8:method={method},samples={n}")
                except Exception as e:  # noqa: BLE001 (recorded in the JSON)
                    m["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    break
                run = {"collect_s": round(c.seconds, 3), "samples": c.samples,
                       "calibrate_wall_s": round(time.perf_counter() - t0, 3)}
                if best is None or run["collect_s"] < best["collect_s"]:
                    best = run
            if "error" in m:
                break
            m[str(n)] = best
        if "error" not in m:
            a, b = (m[str(n)]["collect_s"] for n in counts)
            m["s_per_100_samples_slope"] = round((b - a) / (counts[1] - counts[0]) * 100, 2)
            m["s_per_100_samples_scaled"] = round(b / counts[1] * 100, 2)
            m["fixed_s"] = round(a - (b - a) / (counts[1] - counts[0]) * counts[0], 2)
        out["methods"][method] = m
    return out


# ------------------------------------------------------------------------------ main --

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configs, few rounds (smoke test)")
    ap.add_argument("--rounds", type=int, help="speed rounds (default 40; --quick 3)")
    ap.add_argument("--block", type=int, default=5, help="timed runs per block")
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "accuracy", "calibration"])
    ap.add_argument("--out", type=Path, help="also write the JSON here (default without --quick: "
                    "benchmarks/results/quantization.json)")
    args = ap.parse_args(argv)
    base = "tiny" if args.quick else "small"
    rounds = args.rounds or (3 if args.quick else 40)
    out = args.out or (None if args.quick else DEFAULT_OUT)

    import torch

    from edgec.artifact import versions

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # Native libraries print to fd 1 (the QNN stack's "# LIBNATIVE: ..." banner): send fd 1 to
    # stderr while working so that stdout carries only the JSON.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    t_start = time.perf_counter()
    doc: dict = {"benchmark": "quantization", "quick": args.quick, "machine": machine(),
                 "versions": versions(), "git": git_state(), "loadavg_start": loadavg(),
                 "goal": GOAL}
    with tempfile.TemporaryDirectory(prefix="edgec-bench-quant-") as tmp:
        root = Path(tmp)
        if "speed" not in args.skip:
            doc["speed"] = bench_speed(base, rounds, args.block, root / "speed")
            h = doc["speed"]["headline"]
            log(f"speed: OpenVINO {h['openvino_speedup']}×, ORT {h['ort_speedup']}× "
                f"(goal ≥ {h['goal']}: {'met' if h['goal_met'] else 'NOT met'})")
        if "accuracy" not in args.skip:
            doc["accuracy"] = bench_accuracy([base, f"{base}+outliers"], root / "acc")
        if "calibration" not in args.skip:
            counts = (2, 4) if args.quick else (16, 64)
            doc["calibration"] = bench_calibration(base, counts, METHODS, root / "calib",
                                                  1 if args.quick else 2)
    doc["loadavg_end"] = loadavg()
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    os.close(real_stdout)
    emit(doc, out)
    return 0


def emit(doc: dict, out: Path | None) -> None:
    """The benchmark's JSON on stdout, and into ``out`` when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
