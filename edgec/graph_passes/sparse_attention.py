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

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes._sparse_builder import SiteShape, build_sparse_attention
from edgec.graph_passes import _sparse_layout as layout_lib

__all__ = ["SparseAttentionConfig", "SparseAttentionPass", "AttentionSite",
           "find_attention_sites", "Layout", "config_for_source"]


@dataclasses.dataclass(frozen=True)
class Layout:
    grid: tuple[int, int, int] | None
    tile: tuple[int, int, int] | None
    perm: np.ndarray | None
    inverse: np.ndarray | None
    sink: np.ndarray
    n_video: int | None


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Options of ``--sparse-attention k=v,...`` (names as in the CLI).

    keep: fraction of key blocks each query block keeps (0 < keep ≤ 1).
    block: tokens per key block (and per permutation tile).
    qblock: query tokens sharing one selection (a multiple of block; 0 = 8 × block). Larger
        query blocks gather K/V fewer times and feed MatMul bigger tiles (measured on N=8192,
        keep=0.2: OpenVINO 1.9× at qblock=64, 3.7× at 256, 4.3× at 512 vs dense).
    prefix: leading dense tokens (text in joint attention).
    sink: ``none`` or ``frame`` (first-frame blocks always kept; needs grid).
    grid: TxHxW video token grid after the prefix; enables the tile permutation.
    mode: ``rf2`` or ``rainfusion`` (per-head patterns; needs grid).
    min_seq: sites with a static sequence shorter than this stay dense.
    tile: TtxThxTw tokens per block tile (default: most compact tile dividing the grid).
    samples: query rows sampled by the rainfusion pattern test.
    chunk_mb: memory budget for gathered K/V and scores per chunk of query blocks.
    """

    keep: float = 0.2
    block: int = 64
    qblock: int = 0
    prefix: int = 0
    sink: str = "none"
    grid: tuple[int, int, int] | None = None
    mode: str = "rf2"
    min_seq: int = 256
    tile: tuple[int, int, int] | None = None
    samples: int = 32
    chunk_mb: int = 256

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise UserError(f"sparse attention keep={self.keep} must be in (0, 1]")
        if self.block < 1 or self.prefix < 0 or self.min_seq < 0 or self.chunk_mb < 1:
            raise UserError("sparse attention block, chunk_mb must be ≥ 1 and prefix, "
                            "min_seq ≥ 0")
        if self.qblock < 0 or (self.qblock and self.qblock % self.block):
            raise UserError(f"sparse attention qblock={self.qblock} must be a multiple of "
                            f"block={self.block}")
        if self.sink not in ("none", "frame"):
            raise UserError(f"sparse attention sink={self.sink!r}: use none or frame")
        if self.mode not in ("rf2", "rainfusion"):
            raise UserError(f"sparse attention mode={self.mode!r}: use rf2 or rainfusion")
        if self.grid is None and (self.sink == "frame" or self.mode == "rainfusion"):
            raise UserError("sparse attention sink=frame and mode=rainfusion need grid=TxHxW")

    @classmethod
    def parse(cls, text: str | dict | SparseAttentionConfig | None) -> SparseAttentionConfig:
        """From ``"keep=0.2,block=64,grid=8x32x32"``, a dict, or a config."""
        if isinstance(text, cls):
            return text
        return cls(**cls.parse_items(text or {}))

    @classmethod
    def parse_items(cls, text: str | dict) -> dict[str, Any]:
        """Validated, converted ``{option: value}`` of only the options given."""
        items = text if isinstance(text, dict) else dict(
            _split_kv(part) for part in str(text).split(",") if part.strip())
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in items.items():
            if key not in fields:
                raise UserError(f"unknown sparse attention option {key!r}; known: "
                                f"{', '.join(fields)}")
            kwargs[key] = _convert(key, raw, fields[key].default)
        return kwargs

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def query_block(self) -> int:
        return self.qblock or 8 * self.block

    def layout(self) -> Layout:
        if self.grid is None:
            return Layout(None, None, None, None, np.zeros(0, np.int64), None)
        tile = self.tile or layout_lib.choose_tile(self.grid, self.block, self.sink == "frame")
        if tile is None or math.prod(tile) != self.block or any(
                g % t for g, t in zip(self.grid, tile)):
            raise UserError(f"no tile of block={self.block} tokens divides grid "
                            f"{'x'.join(map(str, self.grid))}; pick another block or tile")
        perm = layout_lib.tile_permutation(self.grid, tile)
        sink = (layout_lib.sink_blocks(self.grid, tile) if self.sink == "frame"
                else np.zeros(0, np.int64))
        return Layout(self.grid, tile, perm, np.argsort(perm), sink, math.prod(self.grid))


def config_for_source(options: dict[str, Any] | SparseAttentionConfig,
                      source_info: dict[str, Any]) -> SparseAttentionConfig:
    """Fill ``grid`` and ``prefix`` from a reference model's hyper-parameters unless given."""
    if isinstance(options, SparseAttentionConfig):
        return options
    hp = source_info.get("hyperparameters") or {}
    defaults: dict[str, Any] = {}
    if "grid" in hp and "grid" not in options:
        defaults["grid"] = tuple(hp["grid"])
        defaults["prefix"] = int(hp.get("text_tokens", 0))
    return SparseAttentionConfig(**{**defaults, **options})


def _split_kv(part: str) -> tuple[str, str]:
    key, sep, value = part.partition("=")
    if not sep:
        raise UserError(f"sparse attention option {part!r} is not key=value")
    return key.strip(), value.strip()


def _convert(key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    try:
        if key in ("grid", "tile"):
            dims = tuple(int(x) for x in raw.lower().split("x"))
            if len(dims) != 3 or min(dims) < 1:
                raise ValueError
            return dims
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, int):
            return int(raw)
    except ValueError:
        raise UserError(f"sparse attention {key}={raw!r} is not valid"
                        + (" (use TxHxW)" if key in ("grid", "tile") else "")) from None
    return raw


@dataclasses.dataclass
class AttentionSite:
    q: ir.Value          # Q [B,H,N,d] carrying the whole score scale (softmax(q·kᵀ) is exact)
    k: ir.Value          # K [B,H,N,d] (a Transpose of Kᵀ added to the graph if needed)
    v: ir.Value
    softmax: ir.Node     # the Softmax, or the Attention op itself
    output: ir.Value     # the dense attention output this site replaces
    anchor: ir.Node      # the final MatMul


def _const_scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _producer(value: ir.Value, *ops: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type in ops and node.domain == "" else None


def _match(softmax: ir.Node) -> tuple[dict | None, str]:
    """Bindings for one Softmax-centred site, or (None, reason it stays dense)."""
    uses = list(softmax.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
        return None, "softmax output not consumed by one MatMul(·, V)"
    scores = softmax.inputs[0]
    rank = len(scores.shape) if scores.shape is not None else None
    axis = softmax.attributes.get_int("axis", -1)
    if rank is None or axis not in (-1, rank - 1):
        return None, "softmax not over the last axis"
    scale = 1.0
    node = _producer(scores, "Mul", "Div", "Add", "MatMul")
    if node is not None and node.op_type == "Add":
        return None, "additive mask"
    if node is not None and node.op_type in ("Mul", "Div"):
        s = _const_scalar(node.inputs[1])
        if s is None:
            return None, "score scale is not a constant scalar"
        scale = s if node.op_type == "Mul" else 1.0 / s
        node = _producer(node.inputs[0], "MatMul")
    if node is None:
        return None, "scores not produced by MatMul(Q, Kᵀ)"
    q, kt = node.inputs
    return {"q": q, "kt": kt, "scale": scale, "v": uses[0].node.inputs[1],
            "anchor": uses[0].node, "softmax": softmax, "qk": node}, ""


def _match_attention_op(node: ir.Node) -> tuple[dict | None, str]:
    """ONNX Attention (opset 23): 4-D Q/K/V, no mask/past/causal/softcap, same head counts."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if any(x is not None for x in inputs[3:]):
        return None, "Attention op with mask or past key/value"
    if any(len(out.uses()) or out.is_graph_output() for out in node.outputs[1:]):
        return None, "Attention op present key/value outputs are used"
    attrs = node.attributes
    if attrs.get_int("is_causal", 0) or attrs.get_float("softcap", 0.0) or attrs.get_int(
            "qk_matmul_output_mode", 0):
        return None, "Attention op with is_causal / softcap / qk output"
    q, k, v = inputs[:3]
    if any(x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
        return None, "Attention op inputs not 4-D [B,H,N,d]"
    if q.shape[1] != k.shape[1]:
        return None, "Attention op with grouped key/value heads"
    d = q.shape[3]
    scale = attrs.get_float("scale", None)
    if scale is None:
        if not isinstance(d, int):
            return None, "head dim not static"
        scale = 1.0 / math.sqrt(d)
    return {"q": q, "k": k, "scale": scale, "v": v, "anchor": node}, ""


def _untransposed(kt: ir.Value) -> tuple[ir.Value | None, float]:
    """K and a scale such that ``kt == Transpose(K)·scale``, read off the producers, if visible.

    Recognizes a scalar Mul, a last-two-axes Transpose, and the dynamo exporter's
    ``Reshape([B·H,N,d]) → Transpose(0,2,1) → Reshape([B,H,d,N])``; saves two copies of K.
    """
    scale = 1.0
    node = _producer(kt, "Mul")
    if node is not None:
        s = _const_scalar(node.inputs[1])
        if s is None:
            return None, 1.0
        scale, kt = s, node.inputs[0]
    node = _producer(kt, "Transpose", "Reshape")
    if node is not None and node.op_type == "Transpose":
        perm = list(node.attributes.get_ints("perm", []))
        return (node.inputs[0], scale) if perm == [0, 1, 3, 2] else (None, 1.0)
    if node is None:
        return None, 1.0
    inner = _producer(node.inputs[0], "Transpose")
    if inner is None or list(inner.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return None, 1.0
    flat = _producer(inner.inputs[0], "Reshape")
    if flat is None:
        return None, 1.0
    k = flat.inputs[0]
    if k.shape is None or kt.shape is None or len(k.shape) != 4 or len(kt.shape) != 4:
        return None, 1.0
    if list(k.shape.dims) != [*kt.shape.dims[:2], kt.shape.dims[3], kt.shape.dims[2]]:
        return None, 1.0
    return k, scale


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def find_attention_sites(model: ir.Model) -> tuple[list[AttentionSite], Counter]:
    """Attention sites of the main graph (adds a Transpose Kᵀ→K per site), and skip reasons."""
    sites, skipped = [], Counter()
    for node in list(model.graph):
        if node.domain != "" or node.op_type not in ("Softmax", "Attention"):
            continue
        b, reason = _match(node) if node.op_type == "Softmax" else _match_attention_op(node)
        if b is None:
            skipped[reason] += 1
            continue
        shapes = [x.shape for x in (b["q"], b.get("kt", b.get("k")), b["v"])]
        if any(s is None or len(s) != 4 for s in shapes):
            skipped["Q/K/V not 4-D [B,H,N,d]"] += 1
            continue
        tape = ir.tape.Tape()
        k = b.get("k")
        if "kt" in b:  # resolve K (and any scale on Kᵀ) before emitting Q's scale
            k, k_scale = _untransposed(b["kt"])
            if k is None:  # unknown producer: transpose back explicitly
                k = tape.op("Transpose", [b["kt"]], {"perm": [0, 1, 3, 2]})
                k.dtype = b["kt"].dtype
                k.shape = ir.Shape([*b["kt"].shape[:2], b["kt"].shape[3], b["kt"].shape[2]])
            else:  # fold K's scale into Q: (Q·a)(K·b)ᵀ = (Q·ab)Kᵀ
                b["scale"] *= k_scale
        q = b["q"]
        if b["scale"] != 1.0:
            dtype = q.dtype.numpy()
            q = tape.op("Mul", [q, tape.initializer(ir.tensor(np.array(b["scale"], dtype)),
                                                    name=f"{node.name}_sparse_scale")])
            q.dtype, q.shape = b["q"].dtype, b["q"].shape
        model.graph.insert_before(b["anchor"], tape.nodes)
        for init in tape.initializers:
            model.graph.register_initializer(init)
        sites.append(AttentionSite(q, k, b["v"], node, b["anchor"].outputs[0], b["anchor"]))
    # Kᵀ → K Transposes of sites that end up skipped are removed by the pass's DCE.
    return sites, skipped


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
            n, d = _static(n), _static(d)
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
            bh = (_static(b_) or 0) * (_static(h_) or 0) or None
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
