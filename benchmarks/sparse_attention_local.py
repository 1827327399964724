"""Block-sparse attention quality on local / structured attention, per ``qblock`` and mode.

One attention site over a 4x8x16 token grid (block=16: 32 key blocks), Q = K = random Fourier
features of the token position: head 0 attends within its frame near its own position, head 1
to the same position in every frame. Random weights have no such structure, so they hide what
a query block of several tiles sharing one selection loses. Prints relative L2 vs dense per
head, ORT. Usage:

    python benchmarks/sparse_attention_local.py [--keep 0.125 0.25 0.5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import numpy as np
import torch

import edgec

GRID, BLOCK, D = (4, 8, 16), 16, 32


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    pos = np.stack(np.meshgrid(*map(np.arange, GRID), indexing="ij"), -1).reshape(-1, 3)

    def features(scale_t, scale_s, sharpness):
        w = rng.normal(size=(D // 2, 3)) * np.array([scale_t, scale_s, scale_s])
        phase = pos @ w.T
        return np.concatenate([np.cos(phase), np.sin(phase)], 1) * np.sqrt(sharpness)

    q = np.stack([features(3.0, 0.6, 14), features(0.05, 2.0, 14)])[None].astype(np.float32)
    return q, q.copy(), rng.normal(size=q.shape).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--out")
    args = ap.parse_args()
    q, k, v = _inputs()
    dense = Attention()(*map(torch.tensor, (q, k, v))).numpy()
    rows = []
    for mode in ("rf2", "rainfusion"):
        for keep in args.keep:
            for ratio in (1, 2, 4, 8):
                opts = dict(keep=keep, block=BLOCK, qblock=ratio * BLOCK, grid=GRID, min_seq=0,
                            mode=mode)
                with tempfile.TemporaryDirectory() as out:
                    edgec.compile(Attention(), example_inputs=tuple(map(torch.tensor, (q, k, v))),
                                  target="ort-cpu", output_dir=out, sparse_attention=opts)
                    y = edgec.load(out).run({"q": q, "k": k, "v": v})["output"]
                err = [float(np.linalg.norm(y[0, h] - dense[0, h]) / np.linalg.norm(dense[0, h]))
                       for h in range(2)]
                rows.append({"mode": mode, "keep": keep, "qblock": ratio * BLOCK,
                             "rel_l2_local": round(err[0], 3), "rel_l2_temporal": round(err[1], 3)})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
