"""Per-layer block-recall metrics of sparse attention (edgec.graph_passes.sparse_attention.metrics).

Checked against a brute-force float64 implementation of the definitions on small inputs, and on
the video-dit tiny export: keep=1.0 keeps everything (recall = oracle = 1); a sparse selection
can never beat the oracle top-k of the same size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.graph_passes.sparse_attention import SparseAttentionConfig, metrics
from edgec.graph_passes.sparse_attention.layout import reference_block_selection

ROOT = Path(__file__).resolve().parents[2]
TINY = "block=4,prefix=8,grid=2x4x4,min_seq=0"


@pytest.fixture(scope="module")
def dit_tiny():
    from edgec.exporters.torch_export import export_module
    from edgec.models import registry

    spec = registry.get("video-dit")
    inputs = spec.example_inputs("tiny")
    res = export_module(spec.build("tiny"), inputs, spec.dynamic_shapes("tiny"), spec.output_names)
    return res.model, {n: t.numpy() for n, t in zip(res.input_names, inputs)}


def brute_force(q, k, cfg):
    """The metric's definitions, literally: float64, no chunking, loops over blocks."""
    p, bs = cfg.prefix, cfg.block
    qbs = getattr(cfg, "query_block", bs)
    lay = cfg.layout()
    sel = reference_block_selection(q, k, cfg)
    b_, h_, n, _ = q.shape
    nv = n - p
    perm = lay.perm if lay.perm is not None else np.arange(nv)
    nb, nbq = -(-nv // bs), -(-nv // qbs)
    recall, oracle, prefix = [], [], []
    for b in range(b_):
        for h in range(h_):
            logits = q[b, h].astype(np.float64) @ k[b, h].astype(np.float64).T
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            video = probs[p:][:, p:][perm][:, perm]  # video rows x video keys, tiled order
            prefix.append(probs[p:, :p].sum(1).mean())
            for qb in range(nbq):
                rows = video[qb * qbs:(qb + 1) * qbs]
                mass = np.array([rows[:, j * bs:(j + 1) * bs].sum() for j in range(nb)])
                k_sel = sel.shape[-1]
                recall.append(mass[sel[b, h, qb]].sum() / mass.sum())
                oracle.append(np.sort(mass)[::-1][:k_sel].sum() / mass.sum())
    return np.mean(recall), np.mean(oracle), np.mean(prefix)


@pytest.mark.parametrize("options", [
    "keep=0.25,block=4,prefix=8,grid=2x4x4",
    "keep=0.25,block=4,prefix=8,grid=2x4x4,sink=frame",
    "keep=0.3,block=5,prefix=3",  # no grid, padded last block
])
def test_site_quality_matches_brute_force(options, monkeypatch, rng):
    monkeypatch.setattr(metrics, "ROWS_PER_CHUNK", 8)  # several row chunks per head
    cfg = SparseAttentionConfig.parse(options + ",min_seq=0")
    n = cfg.prefix + (32 if cfg.grid else 37)
    q, k = (rng.standard_normal((2, 3, n, 8)).astype(np.float32) for _ in range(2))
    got = metrics.site_quality(q, k, cfg)
    recall, oracle, prefix = brute_force(q, k, cfg)
    assert got["recall"] == pytest.approx(recall, abs=1e-5)
    assert got["oracle_recall"] == pytest.approx(oracle, abs=1e-5)
    assert got["prefix_mass"] == pytest.approx(prefix, abs=1e-5)
    assert 0 < got["recall"] <= got["oracle_recall"] + 1e-9
    json.dumps(got)


def test_keep_one_recalls_everything(dit_tiny):
    model, feeds = dit_tiny
    nodes, outputs = len(model.graph), [v.name for v in model.graph.outputs]
    layers = metrics.attention_quality(model, "keep=1.0," + TINY, feeds)
    assert [entry["layer"] for entry in layers] == [0, 1]  # depth 2
    for entry in layers:
        assert entry["kept_blocks"] == entry["blocks"] == 8
        assert entry["recall"] == pytest.approx(1.0, abs=1e-9)
        assert entry["oracle_recall"] == pytest.approx(1.0, abs=1e-9)
        assert 0 < entry["prefix_mass"] < 1
    json.dumps(layers)
    # the caller's model is untouched
    assert len(model.graph) == nodes and [v.name for v in model.graph.outputs] == outputs


@pytest.mark.parametrize("extra", ["", ",sink=frame", ",mode=rainfusion"])
def test_sparse_recall_is_bounded_by_the_oracle(dit_tiny, extra):
    model, feeds = dit_tiny
    layers = metrics.attention_quality(model, "keep=0.25," + TINY + extra, feeds)
    assert len(layers) == 2
    for entry in layers:
        assert entry["kept_blocks"] < entry["blocks"]
        assert 0 < entry["recall"] <= entry["oracle_recall"] + 1e-9
        assert 0 < entry["recall_ratio"] <= 1 + 1e-9
        if extra == ",mode=rainfusion":
            assert sum(entry["head_patterns"].values()) == 2 * 4  # batch x heads


def test_site_scores_are_checked_against_the_dense_graph(rng):
    """A static SDPA export (scale split as √s on Q and on Kᵀ): the metrics' q·kᵀ must equal the
    dense graph's scores, whatever the site finder returns (a lost constant factor is corrected
    and reported under ``scale_correction``)."""
    import torch
    import torch.nn.functional as F

    from edgec.exporters.torch_export import export_module

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    shape = (1, 2, 256, 16)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in "qkv"}
    model = export_module(Attention(), [torch.from_numpy(feeds[n]) for n in "qkv"]).model
    cfg = SparseAttentionConfig.parse("keep=0.25,block=16,min_seq=0")
    (layer,) = metrics.attention_quality(model, cfg, feeds)
    assert layer["scores_check"]["checked"] and layer["scores_check"]["max_rel_error"] < 1e-5
    s = 16 ** -0.25
    want = metrics.site_quality(feeds["q"] * s, feeds["k"] * s, cfg)
    assert layer["recall"] == pytest.approx(want["recall"], abs=1e-6)
    assert layer["oracle_recall"] == pytest.approx(want["oracle_recall"], abs=1e-6)


def test_amdahl_bound():
    assert metrics.amdahl_bound(0.0, 0.2) == 1.0
    assert metrics.amdahl_bound(1.0, 0.2) == pytest.approx(5.0)
    assert metrics.amdahl_bound(0.8, 0.2) == pytest.approx(1 / 0.36)


@pytest.mark.slow
def test_benchmark_quick_prints_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_attention.py"),
                           "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads(out.read_text())
    assert {"benchmark", "machine", "versions", "goals", "attention", "memory",
            "end_to_end"} <= set(doc)
    (attn,) = doc["attention"]
    assert attn["seq"] == 2048 and "error" not in attn
    for rt in ("ort-cpu", "openvino-cpu"):
        r = attn["runtimes"][rt]
        assert r["speedup"] > 0 and 0 < r["mask_share"] < 1
        assert r["selection_vs_reference"]["query_blocks_matching_reference"] == 1.0
        assert r["sparse_vs_dense"]["cosine"] > 0.9
        mem = doc["memory"]["runtimes"][rt]
        assert mem["dense"]["peak_after_run_mb"] > 0 and mem["sparse"]["peak_after_run_mb"] > 0
        e2e = doc["end_to_end"]["runtimes"][rt]
        assert 0 < e2e["attention_share_f"] <= 1 and e2e["amdahl_bound"] >= 1
        assert e2e["speedup"] > 0 and e2e["output_cosine"] > 0.9
    assert len(doc["end_to_end"]["layers"]) == 2
