"""Mask-aware block sparsity: a mask known at compile time (bool or additive; block-diagonal,
banded, block-causal, causal) becomes exact block-sparse attention over its visible tiles."""

import numpy as np
import pytest
import torch

from edgec.exporters import export_module
from edgec.graph_passes.sparse_attention import SparseAttentionPass
from edgec.graph_passes.sparse_attention.mask import plan_blocks, visible
from edgec.runtimes.ort import run_model

F = torch.nn.functional
N = 500  # not a multiple of any block size tried: partial tiles are masked in the bias


def _visible(kind: str, n: int) -> torch.Tensor:
    i = torch.arange(n)
    return {
        "block-diagonal": (i[:, None] // 60) == (i[None, :] // 60),
        "banded": (i[:, None] - i[None, :]).abs() < 60,
        "block-causal": (i[None, :] // 60) <= (i[:, None] // 60),
        "causal": i[None, :] <= i[:, None],
    }[kind]


class MaskedSelfAttention(torch.nn.Module):
    """Projection → 4 heads → SDPA with a mask built from the (static) sequence length."""

    def __init__(self, kind: str, additive: bool):
        super().__init__()
        self.kind, self.additive = kind, additive
        self.proj = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        mask = _visible(self.kind, n)
        if self.additive:
            mask = torch.zeros(n, n).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class TwoSites(torch.nn.Module):
    """One masked and one unmasked attention: mode=mask rewrites only the first."""

    def __init__(self):
        super().__init__()
        self.masked = MaskedSelfAttention("block-diagonal", additive=False)

    def forward(self, x):
        y = self.masked(x)
        return y + F.scaled_dot_product_attention(y, y, y)


X = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(0))


def _rewrite(module, spec="mode=mask"):
    torch.manual_seed(0)
    model = export_module(module.eval(), (X,)).model
    feeds = {model.graph.inputs[0].name: X.numpy()}
    dense = run_model(model, feeds)
    result = SparseAttentionPass(spec)(model)
    return dense, run_model(result.model, feeds), result


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("kind", ["block-diagonal", "banded", "block-causal", "causal"])
def test_exact_on_every_mask_structure(kind, additive):
    dense, sparse, result = _rewrite(MaskedSelfAttention(kind, additive))
    name = next(iter(dense))
    np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-4, atol=1e-5)
    site = result.stats["sites"][0]
    assert result.stats["sites_exact"] == 1 and site["status"] == "exact"
    assert site["mask"] == kind
    assert site["kept_fraction"] <= 0.85  # tiles the mask hides are not multiplied
    assert result.stats["attention_gflops_sparse"] < result.stats["attention_gflops_dense"]
    ops = [n.op_type for n in result.model.graph]
    assert "IsNaN" not in ops  # the exporter's all-masked-row guard is gone with the dense site


def test_block_diagonal_keeps_one_block_per_query_block():
    _, _, result = _rewrite(MaskedSelfAttention("block-diagonal", additive=False))
    site = result.stats["sites"][0]
    assert site["block"] == 60 and site["keys_per_query_block"] == [1]
    assert site["kept_fraction"] == pytest.approx(9 / 81, abs=1e-4)


def test_mask_mode_leaves_unmasked_sites_dense_and_rf2_rewrites_both():
    dense, sparse, result = _rewrite(TwoSites())
    stats = result.stats
    assert stats["sites_found"] == 2 and stats["sites_exact"] == 1
    assert stats["skipped_reasons"] == {"no mask (mode=mask rewrites masked sites only)": 1}
    assert result.modified and SparseAttentionPass("mode=mask").exact
    name = next(iter(dense))
    np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-4, atol=1e-5)
    approx = SparseAttentionPass("keep=0.5,block=16,min_seq=0")
    torch.manual_seed(0)
    model = export_module(TwoSites().eval(), (X,)).model
    stats = approx(model).stats
    assert stats["sites_exact"] == 1 and stats["sites_approximate"] == 1
    assert approx.exact is False  # one approximate site makes the pass approximate


def test_masks_that_cannot_be_planned_are_reported():
    i = np.arange(8)
    seen, _, why = visible(np.where(i[:, None] > 9, 0.0, -np.inf), 8, 8)
    assert seen is None and why == "a query row has every key masked"
    seen, _, why = visible(np.zeros((1, 2, 8, 8)), 8, 8)
    assert seen is None and why == "mask varies over batch or heads"
    seen, values, _ = visible(np.where(abs(i[:, None] - i) < 2, 0.5, -1e9), 8, 8)
    assert seen.sum() == 8 + 2 * 7 and values[0, 0] == 0.5  # finite large negatives hide keys
    plan = plan_blocks(np.ones((128, 128), bool))
    assert plan.kept_fraction == 1.0 and plan.structure == "dense"


def test_block_sizes_are_the_ones_the_readme_names():
    """48..128 (32-token blocks ran slower than dense on ORT), the shorter side under 48: the
    README said 32–128."""
    band = np.abs(np.arange(1024)[:, None] - np.arange(1024)) < 60
    assert plan_blocks(band).block in (48, 60, 64, 96, 120, 128)
    diag = np.kron(np.eye(32, dtype=bool), np.ones((32, 32), bool))  # 32-token diagonal blocks
    assert plan_blocks(diag).block != 32
    assert plan_blocks(np.tril(np.ones((40, 40), bool))).block == 40


def test_dense_mask_stays_dense_with_reason():
    class Full(MaskedSelfAttention):
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.proj(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            mask = torch.ones(n, n, dtype=torch.bool)
            mask[0, -1] = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _, _, result = _rewrite(Full("banded", False))
    assert result.stats["sites_rewritten"] == 0
    (reason,) = result.stats["skipped_reasons"]
    assert reason.startswith("mask leaves 100% of its tiles visible")


class CrossAttention(torch.nn.Module):
    def forward(self, x):
        q = x.reshape(2, N, 4, 8).transpose(1, 2)
        kv = q[:, :, : N // 2]  # half as many keys as queries
        return F.scaled_dot_product_attention(q, kv, kv)


def test_unmasked_cross_attention_is_never_approximated():
    model = export_module(CrossAttention(), (X,)).model
    stats = SparseAttentionPass("keep=0.5,block=16,min_seq=0")(model).stats
    assert stats["sites_rewritten"] == 0
    assert stats["skipped_reasons"] == {
        "cross-attention (query and key lengths differ or are unknown)": 1}


@pytest.mark.parametrize("target,quantize", [("openvino-cpu", None), ("qnn-htp", "w8a16")])
def test_block_diagonal_model_compiles_exact_on_each_runtime(tmp_path, target, quantize):
    """reactive-dance's 60-token blocks: OpenVINO must not fuse the blocks back into one dense
    attention (it did, through [B, H·blocks, ...] views); the NPU runs the same QDQ graph."""
    import edgec

    art = edgec.compile("reactive-dance", target=target, output_dir=tmp_path / "o",
                        config="tiny", sparse_attention="mode=mask", quantize=quantize)
    stats = next(p["stats"] for p in art.manifest["passes"] if p["name"] == "sparse-attention")
    assert stats["sites_exact"] == stats["sites_found"] > 0
    fid = art.report["fidelity"]["target_vs_source"]
    worst = min(e["cosine"] for e in fid["outputs"].values())
    if quantize is None:
        assert max(e["max_rel"] for e in fid["outputs"].values()) <= 1e-5
    else:
        assert worst >= 0.999
        agree = fid["vs_rewritten_onnx"]["outputs"].values()
        assert min(e["cosine"] for e in agree) >= 0.998
