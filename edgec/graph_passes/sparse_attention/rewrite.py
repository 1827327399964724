"""Sparse attention pass: dense attention sites ⇒ RainFusion2.0 block-sparse attention.

    Mul(Q,√s)·Mul(Kᵀ,√s) | MatMul(Q,Kᵀ)·s | MatMul(Q,Kᵀ)/s  → Softmax → MatMul(·, V)
    | Attention(Q, K, V) (opset 23, 4-D, no mask/past)
        ⇒  block-sparse gather attention (see ``_sparse_builder``)

``mode=rf2``: block-mean representatives predict the key blocks each query block keeps
(TopK, k = ceil(keep·n_blocks)), plus a dense text prefix and optional first-frame sink blocks
outside that budget. ``mode=rainfusion``: per head, the best of static spatial / temporal patterns
and the textural (rf2) pattern, chosen online on sampled query rows. keep=1.0 is exact.

A site whose mask (additive or boolean) is known at compile time runs as exact block-sparse
attention over the tiles the mask leaves visible (``mask_builder``), whatever the mode;
``mode=mask`` rewrites only those and leaves unmasked sites dense. Sites with a runtime mask,
non-4D tensors, a dynamic head dim or fewer than ``min_seq`` tokens (approximate modes) stay
dense; the stats list every site: rewritten exact / approximate, or skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes.sparse_attention.builder import SiteShape, build_sparse_attention
from edgec.graph_passes.sparse_attention.config import SparseAttentionConfig
from edgec.graph_passes.sparse_attention.mask import mask_array, plan_blocks, visible
from edgec.graph_passes.sparse_attention.mask_builder import build_masked_attention
from edgec.graph_passes.sparse_attention.sites import find_attention_sites, static_dim

__all__ = ["SparseAttentionPass"]

logger = logging.getLogger(__name__)


class SparseAttentionPass(EdgecPass):
    """Rewrite every eligible attention site; stats count found/rewritten/skipped and FLOPs."""

    name = "sparse-attention"

    def __init__(self, config: SparseAttentionConfig | str | dict | None = None,
                 regroup_by_transpose: bool = False,
                 feeds: Mapping[str, np.ndarray] | None = None):
        """``regroup_by_transpose``: for a fully quantized target, join the query blocks'
        outputs back through a Transpose (``build_sparse_attention``). ``feeds``: the example
        inputs; with a grid, a dynamic sequence is evaluated at them (checked against the grid
        and ``min_seq``) and the input dims it is made of become static (``static_dims``): the
        rewrite bakes the grid in, so the graph runs that shape only."""
        super().__init__()
        self.config = SparseAttentionConfig.parse(config)
        self.regroup_by_transpose = regroup_by_transpose
        self.feeds = feeds
        self.exact = self.config.keep >= 1.0 or self.config.mode == "mask"

    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        # the tile is planned when a site is rewritten: sites below min_seq stay dense whatever
        # the grid, so a grid no tile divides is refused only where it would be used
        self._lay = None
        self._dims = _example_dims(model, self.feeds)
        self._fixed: dict[str, int] = {}  # input dims a rewritten grid site's sequence is made of
        self._lengths: set[int] = set()   # sequence lengths that did not fit the grid
        self._length = None
        sites, skipped = find_attention_sites(model)
        flops_dense = flops_sparse = 0.0
        rewritten, exact, per_site = 0, 0, []
        whole = 0  # approximate-mode sites whose budget keeps every block: exact
        flops_at: set[int] = set()  # dynamic sequence lengths FLOPs were counted at
        for i, site in enumerate(sites):
            b_, h_, n, d = site.q.shape.dims
            n, d = static_dim(n), static_dim(d)
            bh = (static_dim(b_) or 0) * (static_dim(h_) or 0) or None
            if site.mask is not None or cfg.mode == "mask":
                built, reason = self._masked(model, i, site, d)
            else:
                built, reason = self._approximate(i, site, n, d, bh)
            if built is None:
                skipped[reason] += 1
                per_site.append({"site": site.softmax.name, "status": "skipped",
                                 "reason": reason})
                continue
            out, tape, stats = built
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
            if stats["mode"] == "mask":
                exact += 1
                kept = stats["kept_fraction"]
                fd = 4.0 * stats["queries"] * stats["keys"] * d * (bh or 1)
                flops_dense += fd
                flops_sparse += fd * kept
            elif (length := n if n is not None else self._length) is not None:
                # a dynamic sequence the grid fixed: its FLOPs at the example inputs' length
                bh_at = bh or _example_size(site.q.shape.dims[:2], self._dims)
                fd, fs = _flops(length, d, cfg, stats)
                flops_dense += fd * (bh_at or 1)
                flops_sparse += fs * (bh_at or 1)
                stats = {**stats, "sequence": length,
                         "gflops_dense": float(f"{fd * (bh_at or 1) / 1e9:.4g}"),
                         "gflops_sparse": float(f"{fs * (bh_at or 1) / 1e9:.4g}")}
                if n is None:
                    flops_at.add(length)
            keeps_all = (stats["mode"] != "mask" and stats.get("kept_blocks") is not None
                         and stats["kept_blocks"] == stats["blocks"])
            whole += keeps_all
            per_site.append({"site": site.softmax.name,
                             "status": "exact" if stats["mode"] == "mask" or self.exact
                             or keeps_all else "approximate", **stats})
        if cfg.grid is not None and self._lengths and rewritten == exact:
            raise UserError(
                f"sparse attention grid={'x'.join(map(str, cfg.grid))} with prefix={cfg.prefix} "
                f"and tail={cfg.tail} makes {cfg.prefix + cfg.grid_tokens + _dense_tail(cfg)} "
                f"tokens, but the model's attention sequences are "
                f"{', '.join(map(str, sorted(self._lengths)))} tokens long; give the grid, "
                f"prefix and tail of the model's attention")
        static = _fix_input_dims(model, self._fixed) if rewritten > exact else {}
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
        # exact unless an approximate (RainFusion, keep < 1) site that skips blocks was rewritten
        self.exact = self.config.keep >= 1.0 or rewritten == exact + whole
        if whole:
            logger.warning(
                "sparse attention keeps every key block at %d of %d rewritten sites (keep=%g "
                "plus %s of %s blocks): nothing is skipped there, so they are exact and no "
                "faster; lower keep, drop sink=frame or give a smaller block", whole, rewritten,
                cfg.keep, "the first-frame sinks" if cfg.sink == "frame" else "rounding up",
                next(p["blocks"] for p in per_site if p["status"] == "exact" and "blocks" in p))
        found = len(sites) + sum(skipped.values()) - sum(
            1 for p in per_site if p["status"] == "skipped")
        stats: dict[str, Any] = {
            "sites_found": found,
            "sites_rewritten": rewritten,
            "sites_exact": exact,
            "sites_approximate": rewritten - exact - whole,
            "sites_skipped": found - rewritten,
            "skipped_reasons": dict(skipped),
            "sites": per_site,
            # the effective values where the options leave them to edgec (qblock=0: 8 × block;
            # tile: planned from the grid)
            "config": {**cfg.to_json(), "qblock": cfg.query_block,
                       **({"tile": list(self._lay.tile)} if self._lay and self._lay.tile
                          else {})},
        }
        if whole:
            stats["sites_keeping_every_block"] = whole
        if static:
            stats["static_dims"] = static
        approx = [p for p in per_site if p.get("mode") != "mask" and p.get("blocks")
                  and self.config.keep < 1.0]  # every-block sites: sparsity 0
        if approx:
            s0 = approx[0]
            stats["predicted_sparsity"] = round(1 - s0["kept_blocks"] / s0["blocks"], 4)
            stats["kept_blocks"] = s0["kept_blocks"]
            stats["blocks"] = s0["blocks"]
            stats["chunks"] = s0["chunks"]
        if flops_dense:
            # 4 significant digits: 3 decimals showed a tiny model's 0.00164 → 0.00112 as 0.002
            # → 0.001
            stats["attention_gflops_dense"] = float(f"{flops_dense / 1e9:.4g}")
            stats["attention_gflops_sparse"] = float(f"{flops_sparse / 1e9:.4g}")
            if flops_at:  # the graph's sequence is dynamic; the grid fixed it at the example's
                stats["attention_gflops_at_sequence"] = sorted(flops_at)
        return PassResult(model, rewritten > 0, stats)

    def _approximate(self, i, site, n, d, bh):
        """(built, "") for the RainFusion rewrite of an unmasked site, or (None, why not)."""
        cfg = self.config
        self._length = None  # the sequence length a grid fixes a dynamic one to
        if d is None:
            return None, "head dim not static"
        keys = next((_dim(x) for x in (site.k, site.v) if _dim(x) is not None), None)
        if keys is None or keys != _dim(site.q):
            return None, "cross-attention (query and key lengths differ or are unknown)"
        dense_tail = _dense_tail(cfg)
        expected = None if cfg.grid is None else cfg.prefix + cfg.grid_tokens + dense_tail
        at = ""
        fixed = _evaluate(site.q.shape[2], self._dims) if n is None and expected else None
        if fixed is not None:  # the grid fixes a dynamic sequence to its example length
            length, at = fixed[0], " at the example inputs"
        else:
            length = n
        if length is not None and length < cfg.min_seq:
            return None, f"sequence {length}{at} < min_seq {cfg.min_seq}"
        if expected is not None and length is not None and length != expected:
            self._lengths.add(length)
            return None, f"sequence {length}{at} != prefix + grid + tail tokens {expected}"
        if fixed is not None:
            self._fixed.update(fixed[1])
            self._length = length
        if n is not None and n <= cfg.prefix + dense_tail:
            return None, "sequence not longer than the dense prefix and tail"
        shape = SiteShape(d=d, n=n, batch_heads=bh, dtype=site.q.dtype)
        if self._lay is None:
            self._lay = cfg.layout()
        lay = self._lay
        if not dense_tail:
            return build_sparse_attention(f"sparse_attn{i}", site.q, site.k, site.v, shape,
                                          cfg, lay, self.regroup_by_transpose), ""
        return _with_dense_tail(f"sparse_attn{i}", site, shape, cfg, lay,
                                self.regroup_by_transpose), ""

    def _masked(self, model, i, site, d):
        """(built, "") for the exact mask rewrite, or (None, why the site stays dense)."""
        if site.mask is None:
            return None, "no mask (mode=mask rewrites masked sites only)"
        n_q = static_dim(site.q.shape[2])
        n_k = next((static_dim(x.shape[2]) for x in (site.k, site.v)  # Kᵀ's shape may be lost
                    if x.shape is not None and static_dim(x.shape[2])), None)
        if d is None or n_q is None or n_k is None:
            return None, "masked site with a dynamic sequence length or head dim"
        mask, why = mask_array(model, site.mask)
        if mask is None:
            return None, why
        seen, values, why = visible(mask, n_q, n_k)
        if seen is None:
            return None, why
        plan = plan_blocks(seen)
        if plan.kept_fraction > MAX_KEPT:
            return None, (f"mask leaves {plan.kept_fraction:.0%} of its tiles visible "
                          f"(> {MAX_KEPT:.0%}: nothing to skip)")
        return build_masked_attention(f"masked_attn{i}", site.q, site.k, site.v, d, plan,
                                      seen, values, site.q.dtype), ""


def _dense_tail(cfg: SparseAttentionConfig) -> int:
    return cfg.tail if cfg.tail_mode == "dense" else 0


def _example_dims(model: ir.Model, feeds: Mapping[str, np.ndarray] | None) -> dict[str, int]:
    """{dim name: its size in ``feeds``} for the named dims of the graph's inputs."""
    dims: dict[str, int] = {}
    for inp in model.graph.inputs if feeds else ():
        if inp.shape is None or inp.name not in feeds:
            continue
        shape = np.shape(feeds[inp.name])
        for axis, dim in enumerate(inp.shape.dims):
            if isinstance(dim, ir.SymbolicDim) and dim.value and axis < len(shape):
                dims.setdefault(dim.value, int(shape[axis]))
    return dims


_EXPRESSION = re.compile(r"[\w\s+\-*/%()]+")


def _evaluate(dim, dims: Mapping[str, int]) -> tuple[int, dict[str, int]] | None:
    """(value, {input dim: size}) of a symbolic sequence dim (the exporter writes it as an
    expression of input dims: ``text_len + frames*((height//2))*((width//2))``) at the example
    sizes ``dims``, or None when it is not made of input dims only."""
    text = getattr(dim, "value", None)
    if not isinstance(text, str) or not _EXPRESSION.fullmatch(text):
        return None
    names = set(re.findall(r"[A-Za-z_]\w*", text))
    if not names or not names <= set(dims):
        return None
    try:
        value = eval(text, {"__builtins__": {}}, dict(dims))  # noqa: S307 (names and arithmetic)
    except (ArithmeticError, SyntaxError, TypeError):
        return None
    return (int(value), {k: dims[k] for k in names}) if isinstance(value, int) else None


def _example_size(dims, sizes: Mapping[str, int]) -> int | None:
    """The product of ``dims`` (static, or input dims the example inputs give), or None."""
    total = 1
    for dim in dims:
        value = static_dim(dim)
        if value is None:
            value = (_evaluate(dim, sizes) or (None,))[0]
        if value is None:
            return None
        total *= value
    return total


def _fix_input_dims(model: ir.Model, fixed: Mapping[str, int]) -> dict[str, int]:
    """Make the graph inputs' dims named in ``fixed`` static at those sizes; the ones changed."""
    done: dict[str, int] = {}
    for inp in model.graph.inputs:
        if inp.shape is None:
            continue
        dims = [fixed[d.value] if isinstance(d, ir.SymbolicDim) and d.value in fixed else d
                for d in inp.shape.dims]
        if dims != list(inp.shape.dims):
            done.update({d.value: fixed[d.value] for d in inp.shape.dims
                         if isinstance(d, ir.SymbolicDim) and d.value in fixed})
            inp.shape = ir.Shape(dims)
    return done


def _with_dense_tail(name, site, shape, cfg, lay, regroup_by_transpose=False):
    """A dense tail is a prefix moved: rotate the last ``tail`` tokens to the front, build with
    prefix + tail dense tokens, rotate the output back (Slice/Concat: any sequence length)."""
    before, after = ir.tape.Tape(), ir.tape.Tape()
    consts = {}

    def const(tape, value):
        if value not in consts:
            consts[value] = tape.initializer(ir.tensor(np.array([value], np.int64)),
                                             name=f"{name}_tail{len(consts)}")
        return consts[value]

    def rotate(tape, x, first):  # x[:, :, first:] ⊕ x[:, :, :first]
        axis, cut, zero, end = (const(tape, c) for c in (2, first, 0, 2**62))
        head = tape.op("Slice", [x, cut, end, axis])
        rest = tape.op("Slice", [x, zero, cut, axis])
        out = tape.op("Concat", [head, rest], {"axis": 2})
        out.dtype, out.shape = x.dtype, x.shape
        return out

    q, k, v = (rotate(before, x, -cfg.tail) for x in (site.q, site.k, site.v))
    inner = dataclasses.replace(cfg, prefix=cfg.prefix + cfg.tail, tail=0)
    out, body, stats = build_sparse_attention(name, q, k, v, shape, inner, lay,
                                              regroup_by_transpose)
    out.dtype, out.shape = site.output.dtype, site.output.shape
    out = rotate(after, out, cfg.tail)
    nodes = _Tape((*before.nodes, *body.nodes, *after.nodes),
                  (*before.initializers, *body.initializers, *after.initializers))
    return out, nodes, {**stats, "tail": cfg.tail, "tail_mode": "dense"}


@dataclasses.dataclass(frozen=True)
class _Tape:  # the nodes and initializers of several tapes, in order
    nodes: tuple
    initializers: tuple


def _dim(x: ir.Value):
    """The sequence dim of a [B,H,N,d] value: an int, a dim name, or None when unknown."""
    dim = x.shape[2] if x.shape is not None and len(x.shape) == 4 else None
    return dim if isinstance(dim, int) or dim is None else dim.value


MAX_KEPT = 0.85  # the mask rewrite's gathers cost more than the tiles it skips above this



def _flops(n: int, d: int, cfg: SparseAttentionConfig, stats: dict) -> tuple[float, float]:
    """Per (batch, head) multiply-add FLOPs of QKᵀ and PV, dense vs sparse (incl. selection)."""
    dense = 4.0 * n * n * d
    p = cfg.prefix + (stats.get("tail", 0) if stats.get("tail_mode") == "dense" else 0)
    nv, nb, k = n - p, stats["blocks"], stats["kept_blocks"]
    sparse = 4.0 * nv * (k * cfg.block + p) * d + 4.0 * p * n * d + 2.0 * nb * nb * d
    return dense, sparse
