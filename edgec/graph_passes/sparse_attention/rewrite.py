"""Sparse attention pass: dense attention sites ⇒ RainFusion2.0 block-sparse attention.

    Mul(Q,√s)·Mul(Kᵀ,√s) | MatMul(Q,Kᵀ)·s | MatMul(Q,Kᵀ)/s  → Softmax → MatMul(·, V)
    | Attention(Q, K, V) (opset 23, 4-D, no mask/past)
        ⇒  block-sparse gather attention (see ``_sparse_builder``)

``mode=rf2``: block-mean representatives predict the key blocks each query block keeps
(TopK, k = ceil(keep·n_blocks)), plus a dense text prefix and optional first-frame sink blocks
outside that budget. ``mode=rainfusion``: per head, the best of static spatial / temporal patterns
and the textural (rf2) pattern, chosen online on sampled query rows. keep=1.0 is exact.
Sites with an additive mask, non-4D tensors, a dynamic head dim or fewer than ``min_seq``
tokens stay dense; the stats say which and why.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes import common

from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes.sparse_attention.builder import SiteShape, build_sparse_attention
from edgec.graph_passes.sparse_attention.config import SparseAttentionConfig
from edgec.graph_passes.sparse_attention.sites import find_attention_sites, static_dim

__all__ = ["SparseAttentionPass"]


class SparseAttentionPass(EdgecPass):
    """Rewrite every eligible attention site; stats count found/rewritten/skipped and FLOPs."""

    name = "sparse-attention"

    def __init__(self, config: SparseAttentionConfig | str | dict | None = None):
        super().__init__()
        self.config = SparseAttentionConfig.parse(config)
        self.exact = self.config.keep >= 1.0

    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        lay = cfg.layout()
        sites, skipped = find_attention_sites(model)
        flops_dense = flops_sparse = 0.0
        rewritten, per_site = 0, []
        for i, site in enumerate(sites):
            b_, h_, n, d = site.q.shape.dims
            n, d = static_dim(n), static_dim(d)
            if d is None:
                skipped["head dim not static"] += 1
                continue
            if n is not None and n < cfg.min_seq:
                skipped[f"sequence {n} < min_seq {cfg.min_seq}"] += 1
                continue
            if lay.n_video is not None and n is not None and n != cfg.prefix + lay.n_video:
                skipped[f"sequence {n} != prefix + grid tokens {cfg.prefix + lay.n_video}"] += 1
                continue
            if n is not None and n <= cfg.prefix:
                skipped["sequence not longer than the prefix"] += 1
                continue
            bh = (static_dim(b_) or 0) * (static_dim(h_) or 0) or None
            shape = SiteShape(d=d, n=n, batch_heads=bh, dtype=site.q.dtype)
            out, tape, stats = build_sparse_attention(
                f"sparse_attn{i}", site.q, site.k, site.v, shape, cfg, lay)
            model.graph.insert_before(site.anchor, tape.nodes)
            for init in tape.initializers:
                model.graph.register_initializer(init)
            out.shape, out.dtype = site.output.shape, site.output.dtype
            if site.output.is_graph_output():  # keep the graph's output name
                name = site.output.name
                site.output.name = f"{name}_dense"
                out.name = name
            ir.convenience.replace_all_uses_with(site.output, out, replace_graph_outputs=True)
            rewritten += 1
            if n is not None:
                fd, fs = _flops(n, d, cfg, stats)
                flops_dense += fd * (bh or 1)
                flops_sparse += fs * (bh or 1)
            per_site.append(stats)
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
        stats: dict[str, Any] = {
            "sites_found": len(sites) + sum(skipped.values()),
            "sites_rewritten": rewritten,
            "sites_skipped": sum(skipped.values()) + len(sites) - rewritten,
            "skipped_reasons": dict(skipped),
            "config": cfg.to_json(),
        }
        if per_site and per_site[0].get("blocks"):
            s0 = per_site[0]
            stats["predicted_sparsity"] = round(1 - s0["kept_blocks"] / s0["blocks"], 4)
            stats["kept_blocks"] = s0["kept_blocks"]
            stats["blocks"] = s0["blocks"]
            stats["chunks"] = s0["chunks"]
        if flops_dense:
            stats["attention_gflops_dense"] = round(flops_dense / 1e9, 3)
            stats["attention_gflops_sparse"] = round(flops_sparse / 1e9, 3)
        return PassResult(model, rewritten > 0, stats)


def _flops(n: int, d: int, cfg: SparseAttentionConfig, stats: dict) -> tuple[float, float]:
    """Per (batch, head) multiply-add FLOPs of QKᵀ and PV, dense vs sparse (incl. selection)."""
    dense = 4.0 * n * n * d
    p, nv, nb, k = cfg.prefix, n - cfg.prefix, stats["blocks"], stats["kept_blocks"]
    sparse = 4.0 * nv * (k * cfg.block + p) * d + 4.0 * p * n * d + 2.0 * nb * nb * d
    return dense, sparse
