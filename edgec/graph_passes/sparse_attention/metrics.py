"""Per-layer quality of sparse attention's block selection against the dense attention it replaces.

``attention_quality(dense_model, cfg, feeds)`` exposes every attention site's scaled Q and K as
outputs of a copy of the dense model, runs it once in ONNX Runtime, and then, per site, in numpy:

- the dense attention probabilities of the video (non-prefix) query rows over all keys, in chunks
  of query blocks (never all heads at once);
- block masses per (query block, key block) in the pass's tiled block order (``cfg.layout()``;
  query blocks of ``cfg.query_block`` tokens share one selection of key blocks of ``cfg.block``);
- ``recall``: mean over (batch, head, query block) of the mass inside the selected key blocks
  (forced sink blocks included) over the mass on all video keys; ``oracle_recall``: the same for
  the best blocks by true mass, as many as were selected; ``recall_ratio`` = recall / oracle;
- ``prefix_mass``: mean share of a video row's attention mass that lands on the prefix keys;
- ``scores_check``: q·kᵀ of the site against a few rows of the dense graph's own scores (a site
  whose q·kᵀ is a constant factor off is corrected and the factor reported; otherwise an error).

The selection is ``layout.reference_block_selection`` (the numpy twin of the graph's
TopK); for ``mode=rainfusion`` the per-head pattern choice is mirrored here on the same sampled
rows. The caller's model is not modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["attention_quality", "site_quality", "amdahl_bound"]

ROWS_PER_CHUNK = 2048  # query rows whose probabilities are materialized at once (float32)
CHECK_ROWS = 8  # dense score rows exposed to check each site's q·kᵀ


def attention_quality(dense_model: ir.Model, cfg: Any, feeds: Mapping[str, np.ndarray]
                      ) -> list[dict[str, Any]]:
    """One JSON-able dict per attention site (layer) of ``dense_model``; see the module doc."""
    from onnx_ir.passes import common

    from edgec.graph_passes.sparse_attention import SparseAttentionConfig, find_attention_sites
    from edgec.runtimes.ort import run_model

    cfg = SparseAttentionConfig.parse(cfg)
    model = dense_model.clone()
    found = find_attention_sites(model)
    sites = found[0] if isinstance(found, tuple) else found
    if not sites:
        return []
    tape = ir.tape.Tape()
    outputs = []
    for i, site in enumerate(sites):
        exposed = {"q": site.q, "k": site.k}
        if site.softmax.op_type == "Softmax":  # a few rows of the dense scores, to check q·kᵀ
            starts, ends, axes = (tape.initializer(ir.tensor(np.array([x], np.int64)),
                                                   name=f"_quality_{tag}{i}")
                                  for tag, x in (("from", 0), ("to", CHECK_ROWS), ("axis", 2)))
            exposed["s"] = tape.op("Slice", [site.softmax.inputs[0], starts, ends, axes])
        for tag, value in exposed.items():
            out = tape.op("Identity", [value])
            out.name = f"_quality_{tag}{i}"
            out.dtype = value.dtype or site.q.dtype or ir.DataType.FLOAT
            outputs.append(out)
    model.graph.extend(tape.nodes)
    for init in tape.initializers:
        model.graph.register_initializer(init)
    # Only these are needed: drop the original outputs and everything only they use.
    model.graph.outputs.clear()
    model.graph.outputs.extend(outputs)
    common.RemoveUnusedNodesPass()(model)
    res = run_model(model, feeds, optimize=True)
    layers = []
    for i in range(len(sites)):
        q, k = res[f"_quality_q{i}"], res[f"_quality_k{i}"]
        check = _check_scores(q, k, res.get(f"_quality_s{i}"), i)
        q = q * np.float32(check.get("scale_correction", 1.0))
        layers.append({"layer": i, **site_quality(q, k, cfg), "scores_check": check})
    return layers


def _check_scores(q, k, scores, site: int) -> dict[str, Any]:
    """q·kᵀ must reproduce the dense graph's scores; a constant factor off (a scale lost by the
    site finder) is corrected and reported, anything else is an error."""
    if scores is None:
        return {"checked": False}
    est = np.einsum("bhrd,bhnd->bhrn", q[:, :, :CHECK_ROWS].astype(np.float64), k)
    ref = scores.astype(np.float64)
    c = float((est * ref).sum() / max((est * est).sum(), 1e-300))
    err = float(np.abs(c * est - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > 1e-3:
        raise ValueError(f"attention site {site}: q·kᵀ does not reproduce the dense scores "
                         f"(max rel error {err:.3g} after the best constant factor)")
    out = {"checked": True, "max_rel_error": err}
    if abs(c - 1.0) > 1e-4:
        out["scale_correction"] = c  # site q·kᵀ was c times off: find_attention_sites bug
    return out


def site_quality(q: np.ndarray, k: np.ndarray, cfg: Any) -> dict[str, Any]:
    """Metrics for one site from its scaled ``q``, ``k`` [B, H, N, d] (prefix included)."""
    from edgec.graph_passes.sparse_attention.layout import reference_block_selection

    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    layout = cfg.layout()
    p, bs = cfg.prefix, cfg.block
    qbs = getattr(cfg, "query_block", bs)  # query tokens sharing one selection
    b_, h_, n, _ = q.shape
    nv = n - p
    nb, nbq = -(-nv // bs), -(-nv // qbs)
    perm = layout.perm if layout.perm is not None else np.arange(nv)
    sel = reference_block_selection(q, k, cfg)  # [B, H, nbq, k_sel]
    k_sel = sel.shape[-1]
    chunk_blocks = max(1, ROWS_PER_CHUNK // qbs)
    recall = np.zeros((b_, h_, nbq))
    oracle = np.zeros((b_, h_, nbq))
    prefix_mass = np.zeros((b_, h_))
    choice = np.full((b_, h_), "topk", dtype=object)
    for b in range(b_):
        for h in range(h_):
            qv = q[b, h, p:][perm]
            keys = np.concatenate([k[b, h, :p], k[b, h, p:][perm]])  # softmax ignores key order
            sel_bh = sel[b, h]
            if cfg.mode == "rainfusion":
                sel_bh, choice[b, h] = _rainfusion_choice(qv, keys[p:], sel_bh, cfg, layout, nb)
            for lo in range(0, nbq, chunk_blocks):
                hi = min(nbq, lo + chunk_blocks)
                probs = _softmax_rows(qv[lo * qbs: hi * qbs], keys)
                prefix_mass[b, h] += probs[:, :p].sum(dtype=np.float64)
                mass = _block_mass(probs[:, p:], hi - lo, qbs, nb, bs)  # [hi-lo, nb]
                total = np.maximum(mass.sum(1), 1e-300)
                picked = np.take_along_axis(mass, _unique_rows(sel_bh[lo:hi], nb), 1).sum(1)
                best = -np.sort(-mass, axis=1)[:, :k_sel].sum(1)
                recall[b, h, lo:hi] = picked / total
                oracle[b, h, lo:hi] = best / total
    r, o = float(recall.mean()), float(oracle.mean())
    out = {
        "recall": r,
        "oracle_recall": o,
        "recall_ratio": r / o if o > 0 else float("nan"),
        "recall_min_head": float(recall.mean(axis=2).min()),
        "prefix_mass": float(prefix_mass.mean() / nv),
        "blocks": int(nb),
        "query_blocks": int(nbq),
        "kept_blocks": int(k_sel),
        "kept_fraction": round(k_sel / nb, 4),
        "sink_blocks": int(len(layout.sink)),
    }
    if cfg.mode == "rainfusion":
        kinds, counts = np.unique(choice.astype(str), return_counts=True)
        out["head_patterns"] = {str(kd): int(c) for kd, c in zip(kinds, counts)}
    return out


def _softmax_rows(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    logits = rows @ keys.T
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    return logits


def _block_mass(pv: np.ndarray, n_qblocks: int, qbs: int, nb: int, bs: int) -> np.ndarray:
    """[rows, Nv] probabilities → [query block, key block] masses (zero-padded to whole blocks)."""
    rows, nv = pv.shape
    pv = np.pad(pv, ((0, n_qblocks * qbs - rows), (0, nb * bs - nv)))
    return pv.reshape(n_qblocks, qbs, nb, bs).sum(axis=(1, 3), dtype=np.float64)


def _unique_rows(idx: np.ndarray, nb: int) -> np.ndarray:
    """The selection, checked: a key block repeated within a row would count its mass twice."""
    idx = np.sort(idx, axis=1)
    dup = np.zeros_like(idx, dtype=bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    if dup.any():
        raise ValueError("block selection repeats a key block within one query block")
    return idx


def _rainfusion_choice(qv, kv, topk, cfg, layout, nb):
    """Mirror of the graph's online per-head pattern test (spatial / temporal / textural)."""
    from edgec.graph_passes.sparse_attention.layout import query_block_pattern

    nv, bs, k_sel = kv.shape[0], cfg.block, topk.shape[-1]
    qbs = getattr(cfg, "query_block", bs)
    rows = np.unique(np.linspace(0, nv - 1, cfg.samples).round().astype(np.int64))
    probs = _softmax_rows(qv[rows], kv)  # over video keys only, as in the graph
    mass = np.pad(probs, ((0, 0), (0, nb * bs - nv))).reshape(len(rows), nb, bs).sum(2)
    q_blocks = rows // qbs
    tables = [query_block_pattern(layout.grid, layout.tile, k_sel, kind, qbs // bs,
                                  forced=layout.sink) for kind in ("spatial", "temporal")]
    captured = [np.take_along_axis(mass, t[q_blocks], 1).sum() for t in tables]
    captured.append(np.take_along_axis(mass, topk[q_blocks], 1).sum())
    c = int(np.argmax(captured))
    return (tables + [topk])[c], ("spatial", "temporal", "topk")[c]


def amdahl_bound(f: float, keep: float) -> float:
    """Speedup bound when a fraction ``f`` of the time shrinks to ``keep`` of itself."""
    return 1.0 / ((1.0 - f) + keep * f) if math.isfinite(f) else float("nan")
