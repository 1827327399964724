"""Generation benchmark: prefill ms and decode tokens/s, edgec beside the anchors, one run.

Models (batch 1, greedy, exactly ``--new-tokens`` new tokens, prompts of ``--prompts`` tokens):

- ``hf_llama_small``: a Hugging Face ``LlamaForCausalLM`` checkpoint the size of edgec's
  ``llama small`` (vocab 4096, hidden 512, 4 layers, 8 heads, 2 KV heads, FFN 1376; random
  weights, safetensors, a word-level tokenizer.json; lm_head's EOS row zeroed so no system stops
  early). Systems: edgec fp32 and w8a8 on ort-cpu and openvino-cpu (``generate=True``), and the
  anchors on the same checkpoint: optimum-onnx's ``ORTModelForCausalLM`` (ONNX Runtime CPU,
  driven by transformers' ``generate()``), ONNX Runtime GenAI (its model builder, fp32 and int8
  weight-only), OpenVINO GenAI's ``LLMPipeline`` on optimum-intel's export (fp32 and int8
  weight-only). See benchmarks/_anchors_generation.py for how each is built and timed.
- ``edgec_llama_small``: edgec's reference ``llama small`` (edgec only: the anchors load HF
  checkpoints).

Timing: prefill ms = time to first token (wall clock from the call until the first new token is
known: a streamer's first call for every system); decode tokens/s = (new_tokens - 1) /
(total - ttft). Per prompt length: one warm-up generation per system, then ``--reps`` rounds, each
running every system once on that round's prompt (a new random prompt per round, so a prefix
cache, e.g. OpenVINO GenAI's, cannot skip the prefill), the order reversed every other round, a
50 ms pause before each generation (ONNX Runtime's spin-waiting threads in the previous system
go idle); medians reported. Rounds: ``--reps`` up to 128 tokens, half as many up to 1024;
longer prompts three rounds, fp32 systems of the HF checkpoint only.
Ratios per runtime: edgec decode tokens/s over the anchor's (goal: ≥ 1, reported, not asserted)
and prefill speed-up (anchor ms / edgec ms). OpenVINO GenAI runs twice on the same IR: with the
CPU plugin's defaults (bf16 compute and a u8 KV cache on a CPU with avx512_bf16) and pinned to
f32 (edgec's openvino-cpu precision). Greedy tokens are compared with
transformers' PyTorch ``generate()`` on the same checkpoint (fp32 systems must agree; w8a8 and
weight-only int8 may diverge on a random model whose logits are nearly tied).

optimum-onnx cannot be installed beside optimum-intel / transformers 5 (see the JSON's notes):
give ``--optimum-onnx-python`` (or EDGEC_BENCH_OPTIMUM_ONNX_PYTHON) the python of a separate
environment with ``torch`` (CPU), ``optimum-onnx[onnxruntime]==0.1.0`` and ``onnxruntime==1.31.*``;
it then runs there in a worker process, interleaved like the rest. Without it that row is an
error with the reason.

    pip install -e ".[bench-generation]" torch==2.13.0 && pip uninstall -y torchvision
    # torch pinned in the same command: unpinned, the resolver upgrades it to a CUDA build
    python benchmarks/generation.py [--quick] [--reps 8] [--prompts 128,1024,4096] [--out FILE]

Without ``--quick`` the JSON also goes to benchmarks/results/generation.json (unless ``--out``).
Longer prompts are skipped (and say so) when the ``--budget-s`` would not hold them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

# OpenVINO's telemetry asks for consent on import unless CI is set; set before any import of it.
os.environ["CI"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "generation.json"
INSTALL = ('pip install -e ".[bench-generation]" torch==2.13.0 && pip uninstall -y '
           'torchvision')
TARGETS = ("ort-cpu", "openvino-cpu")
SCHEMES = ("fp32", "w8a8")
PAUSE_S = 0.05
# Rounds: --reps up to SHORT tokens, half as many up to LONG; beyond LONG three rounds (one
# round there swung a system's decode tokens/s by 2x between runs), fp32 systems of the first
# model only (the HF checkpoint; edgec's llama small is the same size), so that the whole run
# stays under 10 minutes.
SHORT, LONG = 128, 1024


def rounds(length: int, reps: int) -> int:
    return reps if length <= SHORT else (max(1, (reps + 1) // 2) if length <= LONG else
                                         min(3, reps))


def full_precision(key: str) -> bool:
    return "w8a8" not in key and "int8" not in key


def estimate(plan: dict, prev: dict, length: int, n_reps: int) -> float | None:
    """Seconds the next length should take, from each system's medians at the previous one
    (prefill × (L/L0)^1.5, ^2 from L0 ≥ 1024 where unfused attention dominates: measured
    ×8 tokens 128 → 1024 cost ×8 to ×17, ×4 tokens 1024 → 4096 cost ×6.6 to ×25; decode ×
    (L/L0)^0.5), plus 30%."""
    total, known = 0.0, False
    for model, systems in plan.items():
        if model not in prev:
            continue
        l0, rows = prev[model]
        f, power = length / l0, (2.0 if l0 >= 1024 else 1.5)
        for s in systems:
            row = rows.get(s.key, {})
            if row.get("prefill_ms") is None:
                continue
            known = True
            decode_ms = row["total_ms"] - row["prefill_ms"]
            total += (n_reps + 1) * (row["prefill_ms"] * f ** power + decode_ms * f ** 0.5) / 1e3
    return total * 1.3 if known else None  # + the PyTorch reference, warm-up shapes


QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()
A = _load("_anchors_generation", "edgec_bench_anchors_generation")


def log(msg: str) -> None:
    print(f"[gen-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ machine --

def cpu_flags() -> dict:
    flags: set[str] = set()
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                    "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")}


def threads() -> dict:
    import openvino as ov
    import torch

    core = ov.Core()
    return {"cpus_usable": len(os.sched_getaffinity(0)),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "OV_CPU_THREADS")},
            "torch_num_threads": torch.get_num_threads(),
            "openvino_cpu_inference_num_threads": int(core.get_property(
                "CPU", "INFERENCE_NUM_THREADS")),
            "openvino_cpu_defaults": {k: str(core.get_property("CPU", k)) for k in (
                "INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "PERFORMANCE_HINT")},
            "note": "every system runs with its own defaults: ONNX Runtime intra-op threads 0 "
                    "(= one per physical core); OpenVINO INFERENCE_NUM_THREADS 0 (auto). "
                    "edgec's ort-cpu sessions do not spin-wait (its runtime_config); "
                    "optimum's and ORT GenAI's sessions keep ORT's default spinning."}


def versions() -> dict:
    from edgec.artifact import versions as edgec_versions

    return {**edgec_versions(), **A.dist_versions([
        "torch", "transformers", "tokenizers", "optimum", "optimum-intel", "nncf",
        "openvino-genai", "openvino-tokenizers", "onnxruntime-genai"])}


# ------------------------------------------------------------------------------ systems --

class Edgec:
    """An edgec artifact compiled with ``generate=True``; ``Session.generate`` timed with its
    streamer (first call = first token); edgec's own ``last_generation`` kept beside."""

    def __init__(self, source: str, target: str, scheme: str, out: Path, config: str | None):
        self.source, self.target, self.scheme, self.out, self.config = (
            source, target, scheme, out, config)
        self.name = f"edgec_{scheme}"
        self.runtime = target

    def setup(self) -> dict:
        import edgec

        kw = {"config": self.config} if self.config else {}
        if self.scheme != "fp32":
            kw["quantize"] = self.scheme
        t0 = time.perf_counter()
        art = edgec.compile(self.source, target=self.target, output_dir=self.out,
                            generate=True, **kw)
        compile_s = time.perf_counter() - t0
        self.session = edgec.load(self.out)
        man = art.manifest
        return {"compile_s": round(compile_s, 2),
                "call": f"edgec.compile({'llama' if self.config else 'hf_dir'!r}, "
                        f"target={self.target!r}, generate=True"
                        + (f", config={self.config!r}" if self.config else "")
                        + (f", quantize={self.scheme!r}" if self.scheme != "fp32" else "") + ")",
                "runtime": {k: v for k, v in (man.get("runtime") or {}).items()
                            if k != "stateful"}
                | {"stateful": bool((man.get("runtime") or {}).get("stateful"))},
                "quantization": (man.get("quantization") or {}).get("scheme"),
                "timings_s": (art.report or {}).get("timings_s")}

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        marks: list[float] = []
        t0 = time.perf_counter()
        out = self.session.generate(ids, max_new_tokens=new_tokens, eos_token_id=[],
                                    streamer=lambda tok: marks.append(time.perf_counter()))
        t1 = time.perf_counter()
        own = self.session.last_generation
        return A.timing(t0, marks[0] if marks else None, t1, out.shape[1] - ids.shape[1]) | {
            "tokens": out[0, ids.shape[1]:].tolist(), "own_ttft_ms": own["prefill_ms"],
            "own_decode_tokens_per_s": own["decode_tokens_per_s"]}


def specs(model: str, ckpt: Path, work: Path, ort_python: str | None, quick: bool):
    """(edgec systems, anchor systems) of ``model``, not yet set up."""
    schemes = SCHEMES[:1] if quick else SCHEMES  # --quick: fp32 only (no calibration)
    if model != "hf_llama_small":
        return [Edgec("llama", t, s, work / f"edgec-llama-{t}-{s}", "small")
                for t in TARGETS for s in schemes], []
    ours = [Edgec(str(ckpt), t, s, work / f"edgec-hf-{t}-{s}", None)
            for t in TARGETS for s in schemes]
    c, w = str(ckpt), str(work)
    theirs = [A.WorkerRunner(ort_python, "optimum_ort", c, w) if ort_python else None,
              A.OrtGenai(c, w), A.OvGenai(c, w), A.OvGenai(c, w, f32=True)]
    if not quick:
        theirs += [A.OrtGenai(c, w, precision="int8"), A.OvGenai(c, w, weight_format="int8")]
    return ours, theirs


def set_up(model: str, sysm, setup: dict) -> bool:
    if sysm is None:  # optimum-onnx without its environment
        setup["optimum_ort@ort-cpu"] = {
            "error": "not run: no --optimum-onnx-python (EDGEC_BENCH_OPTIMUM_ONNX_PYTHON) "
                     "given. " + A.OPTIMUM_ONNX_CONFLICT}
        return False
    key = sysm.key = f"{sysm.name}@{sysm.runtime}"
    log(f"{model}: setting up {key}")
    t0 = time.perf_counter()
    try:
        setup[key] = sysm.setup()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the others still run
        setup[key] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}",
                      "seconds": round(time.perf_counter() - t0, 1)}
        log(f"  {key} failed: {type(e).__name__}: {str(e)[-300:]}")
        return False
    return True


def build_all(models: list[str], ckpt: Path, work: Path, ort_python: str | None,
              quick: bool) -> dict:
    """model -> (systems set up, setup records). The anchors' exports (subprocesses: the
    optimum-onnx worker, optimum-cli, the ORT GenAI builder) run in a thread while edgec
    compiles in this one: setup is not timed, and torch.export is single-threaded."""
    from concurrent.futures import ThreadPoolExecutor

    plan = {m: specs(m, ckpt, work, ort_python, quick) for m in models}
    setup = {m: {} for m in models}

    def anchors() -> dict:
        return {m: [s for s in theirs if set_up(m, s, setup[m])]
                for m, (_, theirs) in plan.items()}

    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(anchors)
        ours = {m: [s for s in mine if set_up(m, s, setup[m])] for m, (mine, _) in plan.items()}
        theirs = fut.result()
    return {m: (ours[m] + theirs[m], setup[m]) for m in models}


# ------------------------------------------------------------------------------ timing --

def derive(t: dict) -> dict:
    ttft, total, n = t["ttft_ms"], t["total_ms"], t["new_tokens"]
    dec = (n - 1) / ((total - ttft) / 1e3) if ttft is not None and n > 1 and total > ttft else None
    return {"prefill_ms": ttft, "decode_tokens_per_s": dec, "total_ms": total, "new_tokens": n}


def med(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(np.median(xs)), 3) if xs else None


def leading_match(tokens: list[int], ref: list[int] | None) -> int | None:
    if ref is None:
        return None
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n


def measure(systems: list, length: int, new_tokens: int, reps: int,
            ref: list[int] | None) -> dict:
    """Warm-up on prompt 0, then ``reps`` interleaved rounds, round r on prompt r + 1 (the
    same for every system; a new prompt each round, so no prefix cache can skip a prefill);
    per system the medians and the runs."""
    ids = A.prompt_ids(length, seed=0)
    runs = {s.key: [] for s in systems}
    errors: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    live = list(systems)
    for s in list(live):  # warm-up (also the tokens compared with the reference)
        time.sleep(PAUSE_S)
        try:
            tokens[s.key] = s.generate(ids, new_tokens)["tokens"]
        except Exception as e:  # noqa: BLE001 - recorded, the system leaves this length
            errors[s.key] = f"{type(e).__name__}: {str(e)[-1500:]}"
            live.remove(s)
            log(f"  {s.key} failed: {errors[s.key][:300]}")
    load = []
    for r in range(reps):
        load.append(round(os.getloadavg()[0], 2))
        ids = A.prompt_ids(length, seed=r + 1)
        for s in (live if r % 2 == 0 else live[::-1]):
            if s.key in errors:
                continue
            time.sleep(PAUSE_S)
            try:
                t = s.generate(ids, new_tokens)
            except Exception as e:  # noqa: BLE001 - recorded, the system leaves this length
                errors[s.key] = f"round {r}: {type(e).__name__}: {str(e)[-1500:]}"
                continue
            t.pop("tokens", None)
            runs[s.key].append(t)
    if ref is None and live:
        ref = tokens[live[0].key]
    out = {"_loadavg_1min_per_round": load}
    for s in systems:
        if s.key in errors:
            out[s.key] = {"error": errors[s.key]}
            continue
        d = [derive(t) for t in runs[s.key]]
        row = {"prefill_ms": med(x["prefill_ms"] for x in d),
               "decode_tokens_per_s": med(x["decode_tokens_per_s"] for x in d),
               "total_ms": med(x["total_ms"] for x in d),
               "new_tokens": sorted({x["new_tokens"] for x in d}),
               "runs": len(d),
               "prefill_ms_runs": [round(x["prefill_ms"], 3) for x in d],
               "decode_tokens_per_s_runs": [round(x["decode_tokens_per_s"], 2) for x in d],
               "tokens_matching_reference": leading_match(tokens[s.key], ref)}
        for own in ("own_ttft_ms", "own_decode_tokens_per_s", "own_tpot_ms"):
            if own in runs[s.key][0]:
                row[own] = med(t[own] for t in runs[s.key])
        out[s.key] = row
    return out


def hf_reference(ckpt: Path, ids: np.ndarray, new_tokens: int) -> list[int]:
    """transformers' PyTorch greedy ``generate()``: the tokens every fp32 system should give."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    x = torch.from_numpy(ids)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=A.PAD)
    return out[0, ids.shape[1]:].tolist()


# Pairs compared per runtime: (edgec system, anchor system, what is compared).
PAIRS = [
    ("edgec_fp32@ort-cpu", "optimum_ort@ort-cpu", "fp32 vs fp32"),
    ("edgec_fp32@ort-cpu", "ort_genai@ort-cpu", "fp32 vs fp32"),
    ("edgec_w8a8@ort-cpu", "ort_genai_int8_wo@ort-cpu",
     "edgec w8a8 (static, int8 activations) vs ORT GenAI int8 weight-only"),
    ("edgec_fp32@openvino-cpu", "ov_genai_f32@openvino-cpu",
     "fp32 vs fp32 (LLMPipeline with f32 inference and KV cache, edgec's precision)"),
    ("edgec_fp32@openvino-cpu", "ov_genai@openvino-cpu",
     "fp32 IR vs fp32 IR, LLMPipeline on the CPU plugin's defaults (bf16 compute, u8 KV cache "
     "on this CPU) against edgec's f32"),
    ("edgec_w8a8@openvino-cpu", "ov_genai_int8_wo@openvino-cpu",
     "edgec w8a8 (static, int8 activations) vs optimum-intel int8 weight-only"),
]


def ratios(rows: dict) -> list[dict]:
    out = []
    for ours, theirs, what in PAIRS:
        a, b = rows.get(ours, {}), rows.get(theirs, {})
        if not a.get("decode_tokens_per_s") or not b.get("decode_tokens_per_s"):
            continue
        dec = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        out.append({"runtime": ours.split("@")[1], "edgec": ours, "anchor": theirs,
                    "compared": what,
                    "decode_tps_ratio": round(dec, 3),
                    "prefill_speedup": round(b["prefill_ms"] / a["prefill_ms"], 3),
                    "goal_decode_ge_anchor": dec >= 1.0})
    return out


def table(results: dict) -> list[str]:
    lines = ["| model | prompt | system | runtime | prefill ms | decode tok/s | "
             "tokens = HF ref |", "|---|---:|---|---|---:|---:|---:|"]
    for model, by_len in results.items():
        for length, rows in by_len.items():
            if not isinstance(rows, dict) or "systems" not in rows:
                continue
            for key, row in rows["systems"].items():
                if key.startswith("_"):
                    continue
                name, rt = key.split("@")
                if "error" in row:
                    lines.append(f"| {model} | {length} | {name} | {rt} | error | error | |")
                    continue
                m = row["tokens_matching_reference"]
                lines.append(f"| {model} | {length} | {name} | {rt} | {row['prefill_ms']:.2f} | "
                             f"{row['decode_tokens_per_s']:.1f} | "
                             f"{'' if m is None else m} |")
    return lines


# ------------------------------------------------------------------------------ main --

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: prompt 32, 8 new tokens, 2 rounds")
    ap.add_argument("--prompts", default=None, help="prompt lengths (default 128,1024,4096)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64")
    ap.add_argument("--reps", type=int, default=None, help="rounds per length (default 8)")
    ap.add_argument("--budget-s", type=float, default=510.0,
                    help="skip a prompt length whose estimated time would pass this")
    ap.add_argument("--models", default=None,
                    help="default hf_llama_small,edgec_llama_small (--quick: hf_llama_small)")
    ap.add_argument("--optimum-onnx-python",
                    default=os.environ.get("EDGEC_BENCH_OPTIMUM_ONNX_PYTHON"),
                    help="python of an environment with optimum-onnx (see the module doc)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    missing = [m for m in ("transformers", "tokenizers", "openvino_genai", "onnxruntime_genai",
                           "optimum.intel") if _missing(m)]
    if missing:
        print(f"generation.py: {', '.join(missing)} not installed; run {INSTALL}",
              file=sys.stderr)
        return 2
    prompts = [int(x) for x in (args.prompts or ("32" if args.quick else "128,1024,4096"))
               .split(",")]
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    reps = args.reps or (2 if args.quick else 8)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    start = time.perf_counter()

    doc: dict = {"benchmark": "generation", "quick": args.quick,
                 "machine": {**QB.machine(), "cpu_flags": cpu_flags()},
                 "loadavg_start": QB.loadavg(), "git": QB.git_state(), "versions": versions(),
                 "threads": threads(),
                 "method": {"batch": 1, "new_tokens": new_tokens, "prompts": prompts,
                            "reps": reps, "decoding": "greedy, EOS never produced (lm_head EOS "
                            "row zeroed) and ignored where the tool allows",
                            "prefill_ms": "time to first token, wall clock, from the generate "
                            "call until the streamer's first new token",
                            "decode_tokens_per_s": "(new_tokens - 1) / (total - ttft)",
                            "ttft_source": {
                                "edgec": "Session.generate's streamer (first call)",
                                "optimum_ort": "transformers streamer: its second put() (the "
                                               "first carries the prompt)",
                                "ort_genai": "after the first generate_next_token() "
                                             "(GeneratorParams + Generator + append_tokens "
                                             "counted, as a user pays them)",
                                "ov_genai": "StreamerBase.write (first call); the pipeline's "
                                            "own perf_metrics TTFT/TPOT kept as own_*"},
                            "order": "per prompt length: one warm-up generation per system "
                                     "(prompt seed 0, its tokens compared with the reference), "
                                     "then rounds running each system once on the round's own "
                                     "prompt (seed r+1: no prefix-cache reuse), order reversed "
                                     f"every other round, {PAUSE_S * 1e3:.0f} ms pause before "
                                     "each; medians over the rounds",
                            "rounds_by_length": f"--reps up to {SHORT} tokens, half as "
                                                f"many up to {LONG}; beyond: three rounds, "
                                                "fp32 systems of hf_llama_small only"},
                 "setup": {}, "results": {}, "ratios": {}, "notes": notes(args)}
    with tempfile.TemporaryDirectory(prefix="edgec-genbench-") as tmp:
        work = Path(tmp)
        ckpt = A.make_checkpoint(work / "hf-llama-small", max_positions=8192)
        doc["models"] = {"hf_llama_small": {**A.LLAMA_SMALL_HF, "max_position_embeddings": 8192,
                                            "weights": "random (transformers' init, seed 0), "
                                            "lm_head EOS row zeroed", "format": "safetensors"},
                         "edgec_llama_small": "edgec's reference `llama` config `small` "
                                              "(same sizes, edgec's own init)"}
        models = (args.models or ("hf_llama_small" if args.quick
                                  else "hf_llama_small,edgec_llama_small")).split(",")
        built = build_all(models, ckpt, work, args.optimum_onnx_python, args.quick)
        for model in models:  # every system set up before any is timed
            doc["setup"][model] = built[model][1]
            doc["results"][model], doc["ratios"][model] = {}, {}
        doc["setup_s"] = round(time.perf_counter() - start, 1)
        prev: dict = {}  # model -> (length, rows) of the last length measured
        for length in prompts:
            plan = {}
            for model in models if length <= LONG else models[:1]:
                systems = [s for s in built[model][0] if length <= LONG or full_precision(s.key)]
                plan[model] = systems
            n_reps = rounds(length, reps)
            budget_left = args.budget_s - (time.perf_counter() - start)
            est = estimate(plan, prev, length, n_reps)
            if est is not None and est > budget_left:
                why = (f"estimated {est:.0f} s (each system's prefill × (L/L0)^1.5|2 + decode × "
                       f"(L/L0)^0.5 from the previous length, {n_reps + 1} runs, +30%) > "
                       f"{budget_left:.0f} s left of --budget-s {args.budget_s:.0f}")
                for model in models:
                    doc["results"][model][str(length)] = {"skipped": why}
                log(f"skipping prompt {length}: {why}")
                continue
            for model, systems in plan.items():
                setup = built[model][1]
                log(f"{model}: prompt {length}, {len(systems)} systems, {n_reps} rounds")
                t1 = time.perf_counter()
                if model == "hf_llama_small":
                    ref = hf_reference(ckpt, A.prompt_ids(length, seed=0), new_tokens)
                    ref_label = "transformers PyTorch generate() on the checkpoint"
                else:
                    ref, ref_label = None, f"{systems[0].key} (no PyTorch reference run here)"
                rows = measure(systems, length, new_tokens, n_reps, ref)
                rows.update({k: {"error": v["error"]} for k, v in setup.items() if "error" in v})
                doc["results"][model][str(length)] = {
                    "seconds": round(time.perf_counter() - t1, 1), "rounds": n_reps,
                    "reference": ref_label, "systems": rows}
                doc["ratios"][model][str(length)] = ratios(rows)
                prev[model] = (length, rows)
            if length > LONG:
                for model in models[1:]:
                    doc["results"][model][str(length)] = {
                        "skipped": f"> {LONG} tokens: the HF checkpoint only (same size)"}
        for systems, _ in built.values():
            for s in systems:
                if hasattr(s, "close"):
                    s.close()
    doc["table"] = table(doc["results"])
    doc["loadavg_end"] = QB.loadavg()
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)
    QB.emit(doc, out)
    return 0


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def notes(args) -> list[str]:
    return [
        A.OPTIMUM_ONNX_CONFLICT + (" Here it ran from " + args.optimum_onnx_python +
                                   " in a worker process." if args.optimum_onnx_python
                                   else " Not run here."),
        "optimum-intel 2.2.0 lists torchvision; PyPI's torchvision wheels are CUDA builds that "
        "pull a CUDA torch (or, at the CPU torch's version, fail to import: 'operator "
        "torchvision::nms does not exist'); it is not needed for causal LMs (uninstall it).",
        "int8 anchors are weight-only (optimum-intel --weight-format int8: per-channel int8 "
        "weights; ORT GenAI builder -p int8: MatMulNBits 8-bit weights) with float "
        "activations; edgec's w8a8 quantizes activations too: different schemes, compared as "
        "each tool's int8.",
        "Setup seconds (compile_s, export_s) are not benchmarks: the anchors' exports run in "
        "a thread beside edgec's compiles.",
        "ov_genai runs LLMPipeline's default backend (paged attention, continuous batching on "
        "CPU); edgec's openvino-cpu artifact is a stateful IR whose generate runs its paged form "
        "(OpenVINO's paged-attention transformation, the same PagedAttention kernel) from "
        "edgec's own Python loop.",
        "The machine is noisy (a shared 2-core VM): the same systems' ratios moved by up to "
        "±0.2 between whole runs, which is why the default is 8 rounds.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
