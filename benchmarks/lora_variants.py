"""PEFT's LoRA variants merged into a real decoder, held to PEFT's own merge.

SmolLM2-135M-Instruct (30 layers, hidden 576; ``benchmarks/_smollm2.py``) with adapters made by
PEFT here (seed 0, ``init_lora_weights=False`` so B ≠ 0), each compiled on ort-cpu in merge
mode; the compile's LoRA reference is PEFT's ``merge_and_unload()`` of the transformers model,
exported and run, and the table is its fidelity row:

- ``dora``: rank 8 DoRA on q/k/v/o/gate/up/down, each magnitude scaled by U(0.8, 1.2) (PEFT
  initializes it to ‖W + ΔW‖, which would make the merge a plain one);
- ``embedding``: rank 8 on ``embed_tokens`` (a tied table: the LM head reads it too) and q/v,
  each lora_embedding_B scaled by 0.01 (the delta then about the size of the table's entries);
- ``embedding-raw``: the same with PEFT's ``init_lora_weights=False`` draw as is (A, B ~ N(0, 1):
  a delta ~100× the table's entries, which no trained adapter has); a compile whose own check
  fails is recorded as its error.

    python benchmarks/lora_variants.py [--layers N] [--out FILE]

Needs transformers, tokenizers, gguf and peft (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), git_state(), emit()
SMOL = _load("_smollm2", "edgec_bench_smollm2")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lora_variants.json"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"dora": (dict(target_modules=ALL, use_dora=True), 1.0),
            "embedding": (dict(target_modules=["embed_tokens", "q_proj", "v_proj"]), 0.01),
            "embedding-raw": (dict(target_modules=["embed_tokens", "q_proj", "v_proj"]), 1.0)}


def log(msg: str) -> None:
    print(f"[lora-variants {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_adapter(ckpt: Path, out: Path, config: dict, embedding_scale: float) -> None:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16,
                                                      init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
            if "lora_embedding_B" in name:
                p.mul_(embedding_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)


def smol_args(doc: str, out: Path, argv=None) -> argparse.Namespace:
    """``--layers N`` (the checkpoint's first N layers) and ``--out`` (the results JSON)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="the first N layers (default all)")
    ap.add_argument("--out", type=Path, default=out)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = smol_args(__doc__, DEFAULT_OUT, argv)
    import edgec
    from edgec.errors import VerificationError

    t0 = time.perf_counter()
    ckpt = SMOL.checkpoint(args.layers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-lora-variants-") as tmp:
        tmp = Path(tmp)
        for name, (config, scale) in VARIANTS.items():
            make_adapter(ckpt, tmp / name, config, scale)
            log(f"compiling {name}")
            t = time.perf_counter()
            try:
                art = edgec.compile(str(ckpt), target="ort-cpu", config="batch=1,seq=24",
                                    lora=[str(tmp / name)], output_dir=tmp / f"out-{name}")
            except VerificationError as e:  # the compile's own check refused it: a finding
                rows.append({"variant": name, "config": config, "embedding_b_scale": scale,
                             "error": str(e)})
                log(f"  {e}")
                continue
            fid = art.report["fidelity"]
            (merge,) = [p["stats"] for p in art.report["passes"] if p["name"] == "lora-merge"]
            logits = fid["target_vs_source"]["outputs"]["logits"]
            rows.append({"variant": name, "config": config, "embedding_b_scale": scale,
                         "reference": fid["lora"]["reference"],
                         "vs_peft_merge": {k: logits[k] for k in ("max_rel", "rel_l2",
                                                                  "cosine")},
                         "modules_merged": merge["modules_merged"],
                         "dora_modules": merge["dora_modules"],
                         "max_abs_delta": merge["max_abs_delta"],
                         "compile_s": round(time.perf_counter() - t, 1)})
            log(f"  {rows[-1]['vs_peft_merge']}")
    QB.emit({"benchmark": "lora-variants", "machine": QB.machine(), "git": QB.git_state(),
             "model": f"SmolLM2-135M-Instruct ({SMOL.PACKAGE}, Q4_1 dequantized)"
                      + (f", first {args.layers} layers" if args.layers else ""),
             "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
