"""Swappable LoRA after a rotation, on a real decoder: what the site transforms weigh.

SmolLM2-135M-Instruct (30 layers, hidden 576; ``benchmarks/_smollm2.py``) with a PEFT adapter
(rank 8 on q/k/v/o/gate/up/down, random non-zero weights: ``init_lora_weights=False``, seed 0)
compiled ``--lora-mode swappable`` on ort-cpu, once plain and once with ``--rotate hadamard``
(R1 + R2 + R4). Recorded:

- the rotated artifact's ``adapters/transforms.safetensors``: bytes and its factors by kind
  (``edgec.lora.transforms``), beside the bytes of the format before (one dense float32 [n, n]
  per distinct composed site transform, computed here from the same factors);
- exactness: the logits of both artifacts with the adapter bound and with none (``base``) on
  the artifact's example input, max relative difference;
- binding an adapter (``site_feeds``) with the factors and with the dense matrices: median of
  7 interleaved runs each.

    python benchmarks/lora_transforms.py [--layers N] [--out FILE]

Needs transformers, tokenizers, gguf and peft (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lora_transforms.json"
VARIANTS = _load("lora_variants", "edgec_bench_lora_variants")  # make_adapter(), ALL
QB, SMOL = VARIANTS.QB, VARIANTS.SMOL  # machine(), git_state(), emit(); the checkpoint


def log(msg: str) -> None:
    print(f"[lora-transforms {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dense_format(sites: list[dict], factors: dict) -> tuple[int, dict[str, np.ndarray], list]:
    """The format before: one dense float32 matrix per distinct composed site transform."""
    from edgec.lora.transforms import factor_names

    matrices: dict[str, np.ndarray] = {}
    by_digest: dict[str, str] = {}
    dense_sites = []
    for s in sites:
        s = dict(s)
        for key, size in (("a_transform", s["in_features"]), ("b_transform", s["out_features"])):
            names = factor_names(s.get(key))
            if not names:
                continue
            m = np.eye(size)
            for f in (factors[n] for n in names):
                m = f.matrix(size) @ m if key == "a_transform" else m @ f.matrix(size)
            m32 = m.astype(np.float32)
            digest = hashlib.sha1(m32.tobytes()).hexdigest()
            if digest not in by_digest:
                by_digest[digest] = f"{s['module']}.{key[0]}"
                matrices[by_digest[digest]] = m32
            s[key] = by_digest[digest]
        dense_sites.append(s)
    return sum(m.nbytes for m in matrices.values()), matrices, dense_sites


def main(argv=None) -> int:
    args = VARIANTS.smol_args(__doc__, DEFAULT_OUT, argv)
    import edgec
    from edgec.lora.binding import TRANSFORMS_FILE, site_feeds
    from edgec.lora.peft_adapter import read_adapter
    from edgec.lora.transforms import Factor, load_factors

    t0 = time.perf_counter()
    ckpt = SMOL.checkpoint(args.layers)
    with tempfile.TemporaryDirectory(prefix="edgec-lora-transforms-") as tmp:
        tmp = Path(tmp)
        adapter_dir = tmp / "adapter"
        VARIANTS.make_adapter(ckpt, adapter_dir, dict(target_modules=VARIANTS.ALL), 1.0)
        arts, seconds = {}, {}
        for name, rotate in (("plain", None), ("rotated", "hadamard")):
            log(f"compiling {name}")
            t = time.perf_counter()
            arts[name] = edgec.compile(str(ckpt), target="ort-cpu", config="batch=1,seq=24",
                                       lora=[str(adapter_dir)], lora_mode="swappable",
                                       rotate=rotate, output_dir=tmp / name)
            seconds[name] = round(time.perf_counter() - t, 1)
        art = arts["rotated"]
        sites = art.manifest["lora"]["sites"]
        path = art.path / TRANSFORMS_FILE
        factors = load_factors(path)
        dense_bytes, matrices, dense_sites = dense_format(sites, factors)
        kinds: dict[str, int] = {}
        for f in factors.values():
            kinds[f.kind] = kinds.get(f.kind, 0) + 1

        plain, rotated = edgec.load(arts["plain"].path), edgec.load(art.path)
        feeds = plain.default_feeds
        exact = {}
        for adapter in (read_adapter(adapter_dir).name, "base"):
            want = plain.run(feeds, adapter=adapter)["logits"].astype(np.float64)
            got = rotated.run(feeds, adapter=adapter)["logits"].astype(np.float64)
            exact[adapter] = float(np.abs(got - want).max() / np.abs(want).max())
            log(f"adapter {adapter}: max rel {exact[adapter]:.2e}")

        adapter = read_adapter(adapter_dir)
        dense = {k: Factor.dense(v.astype(np.float64)) for k, v in matrices.items()}  # as loaded
        times: dict[str, list[float]] = {"factors": [], "dense": []}
        for _ in range(7):
            for label, (ss, tr) in (("factors", (sites, factors)),
                                    ("dense", (dense_sites, dense))):
                t = time.perf_counter()
                site_feeds(ss, adapter, tr)
                times[label].append(time.perf_counter() - t)
        a = site_feeds(sites, adapter, factors)
        b = site_feeds(dense_sites, adapter, dense)
        bind_diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        doc = {"benchmark": "lora-transforms", "machine": QB.machine(), "git": QB.git_state(),
               "model": f"SmolLM2-135M-Instruct ({SMOL.PACKAGE}, Q4_1 dequantized)"
                        + (f", first {args.layers} layers" if args.layers else ""),
               "adapter": {"rank": 8, "modules": VARIANTS.ALL, "sites": len(sites)},
               "rotate": "hadamard (R1 + R2 + R4)",
               "transforms_bytes": path.stat().st_size,
               "factors": kinds,
               "dense_format_bytes": dense_bytes,
               "dense_format_matrices": len(matrices),
               "max_rel_logits_rotated_vs_plain": exact,
               "bind_seconds_median": {k: round(statistics.median(v), 4)
                                       for k, v in times.items()},
               "bind_max_abs_diff_factors_vs_dense": bind_diff,
               "compile_s": seconds,
               "wall_s": round(time.perf_counter() - t0, 1)}
    QB.emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
