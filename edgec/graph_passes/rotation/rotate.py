"""Rotation pass (QuaRot / SpinQuant / DartQuant style), exact in fp32.

    norm(x)·γ → W          ⇒  norm(x) → diag(γ)·W                       (norm folding)
    stream x               ⇒  x·R1: E·R1, R1ᵀ·W_{q,k,v,gate,up,head}, W_{o,down}·R1   (R1)
    V_h → O                ⇒  V_h·R2 → R2ᵀ·O_h   per head, shared by a GQA group     (R2)
    a → W_down             ⇒  a·H (online MatMul) → Hᵀ·W_down                        (R4)

Rotations make activations easy to quantize (a few huge channels are spread over all of them)
without changing what the model computes. The structure comes from the graph
(``topology.analyze``); where a rotation cannot pass (post-norm encoders, AdaLN-modulated DiTs,
KV-cache outputs) it is skipped and ``stats["skipped"]`` says which node and why, while the
rotations that stay exact there (R2, R4) are still applied. A graph with no norm is refused.

Swappable-LoRA branches (``graph_passes.lora.swappable``) go with their base Linear: the base's
weight is rotated as usual and the transforms it got on each side are recorded per site
(``rotation.lora_transforms``), so that ``A_in = M_in·Aᵀ``, ``B_in = w·s·Bᵀ·M_out`` keep swapping
exact; the pass leaves the matrices in ``lora_transforms`` for the pipeline to ship. A LayerNorm β
folded into a base's bias (b += β·W) has no such transform, so R1 is skipped there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes.rotation.edit import WeightEditor
from edgec.graph_passes.rotation.hadamard import (
    apply_left_transpose,
    orthogonal_factors,
    random_hadamard,
)
from edgec.graph_passes.rotation.lora_transforms import SiteTransforms
from edgec.graph_passes.rotation.topology import (
    Attention,
    Skip,
    Stream,
    Topology,
    analyze,
    const_array,
)
from edgec.lora.transforms import Factor

__all__ = ["RotatePass", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("hadamard", "dartquant")
ORTHOGONALITY_TOL = 1e-4


class RotatePass(EdgecPass):
    """``rotations``: calibrated matrices ``{"r1": [d, d], "r2.<layer>": [hd, hd] or
    [kv_heads, hd, hd]}`` (``edgec.calibration.dartquant``); a rotation not given is a seeded
    random Hadamard. ``parameter_map`` only names the folded norm scales in the stats
    (``folded_parameters``: their initializers are gone); the structure comes from the graph.

    After ``call``, ``lora_transforms`` holds the swappable-LoRA site transforms it named in the
    sites metadata (name → float32 matrix; empty without sites)."""

    name = "rotate"
    exact = True
    rtol = 1e-4

    def __init__(self, method: str = "hadamard",
                 parameter_map: Mapping[str, Mapping[str, str]] | None = None,
                 rotations: Mapping[str, np.ndarray] | None = None,
                 online_r4: bool | None = False,
                 seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"unknown rotation {method!r}; use one of {', '.join(METHODS)}")
        if method == "dartquant" and not rotations:
            raise UserError("--rotate dartquant needs calibrated rotations; run `edgec calibrate` "
                            "first or use --rotate hadamard")
        self.method = method
        self.rotations = {k: np.asarray(v, dtype=np.float64) for k, v in (rotations or {}).items()}
        self.online_r4 = online_r4
        self.seed = seed
        self.parameter_map = parameter_map or {}
        self.lora_transforms: dict[str, Factor] = {}

    def call(self, model: ir.Model) -> PassResult:
        topo = analyze(model.graph)
        if not topo.norms:
            raise UserError("--rotate: no RMSNorm or LayerNorm found in the graph, so there is no "
                            "transformer structure to rotate; compile without --rotate")
        _check_rotations(self.rotations, topo)
        before = set(model.graph.initializers)
        self._used: list[str] = []
        editor = WeightEditor(model.graph)
        self._sites = SiteTransforms(model)
        skipped = list(topo.skipped)
        beta = _lora_beta(topo.stream) if topo.stream is not None else None
        if beta is not None:
            skipped.append(beta)
        with_r1 = topo.stream is not None and beta is None
        online_r4 = self.online_r4 if self.online_r4 is not None else with_r1  # None: with R1
        if not (with_r1 or topo.attention or (online_r4 and topo.ffn_down)):
            raise UserError(f"--rotate {self.method} found nothing it can rotate exactly in this "
                            f"graph ({_first_reasons(skipped, topo)}); compile without --rotate")
        r1 = 0
        if with_r1:
            r1 = self._rotate_stream(editor, topo.stream, model.opset_imports.get("", 18))
        for att in topo.attention:
            self._rotate_heads(editor, att)
        r4 = 0
        if online_r4:
            for k, down in enumerate(topo.ffn_down):
                w = editor.weight(down)
                factors = orthogonal_factors(w.shape[0], self.seed + 7919 + k)
                editor.set_weight(down, apply_left_transpose(factors, w))
                # only the base MatMul reads x·H; a LoRA branch keeps reading x (no transform)
                editor.insert_online(down, factors, "r4")
                r4 += 1
        if online_r4 and not topo.ffn_down:
            skipped.append(Skip("r4", "-", "no FFN down projection (a Linear reading an activation "
                                "of another Linear and writing into a residual Add) was found"))
        if skipped:
            logger.warning("--rotate %s rotated the graph only in part: %s", self.method,
                           _first_reasons(skipped, topo))
        written = editor.flush()
        lora_sites = self._sites.finish(model)
        self.lora_transforms = self._sites.factors
        stats = self._stats(topo, skipped, r1, r4, editor)
        if self._sites.sites:
            stats["lora_sites_transformed"] = lora_sites
            stats["lora_transforms"] = len(self.lora_transforms)
        gone = before - set(model.graph.initializers)
        stats["folded_parameters"] = sorted(p for p, e in self.parameter_map.items()
                                            if e["initializer"] in gone)
        return PassResult(model, written > 0 or r4 > 0, stats)

    def _rotation(self, key: str, size: int, seed: int) -> np.ndarray:
        if key in self.rotations:
            self._used.append(key)
            return self.rotations[key]
        return random_hadamard(size, seed)

    def _rotate_stream(self, editor: WeightEditor, stream: Stream, opset: int) -> int:
        """Fold every stream norm's γ/β into its readers, then rotate the stream by R1."""
        r1 = self._rotation("r1", stream.width, self.seed)
        layer_norm = stream.blocks[0][0].kind == "layer"
        if layer_norm:  # a zero-mean stream makes LayerNorm an RMSNorm, which R1 passes
            for site in stream.tables:
                t = editor.table(site)
                t -= t.mean(axis=-1, keepdims=True)
            for w in stream.writers:
                m = editor.weight(w)
                m -= m.mean(axis=1, keepdims=True)
                n = m.shape[1]
                self._sites.right(w, Factor.center(n))  # W·C
                b = editor.bias(w)
                if b is not None:
                    b -= b.mean()
        rotated, r1_in, r1_out = 0, Factor.dense(r1.T), Factor.dense(r1)
        for norm, readers in stream.blocks:
            gamma, beta = const_array(norm.scale), const_array(norm.shift)
            for lin in readers:
                w = editor.weight(lin)
                if beta is not None:
                    b = editor.bias(lin)
                    editor.set_bias(lin, (0 if b is None else b) + beta.astype(np.float64) @ w)
                if gamma is not None:
                    w = gamma.astype(np.float64)[:, None] * w
                    self._sites.left(lin, Factor.diag(gamma))
                editor.set_weight(lin, r1.T @ w)
                self._sites.left(lin, r1_in)
                rotated += 1
            if layer_norm:
                editor.layer_norm_to_rms(norm, opset)
            else:
                editor.drop_norm_scale(norm)
        for site in stream.tables:
            editor.set_table(site, editor.table(site) @ r1)
        for w in stream.writers:
            editor.set_weight(w, editor.weight(w) @ r1)
            self._sites.right(w, r1_out)
            b = editor.bias(w)
            if b is not None:
                editor.set_bias(w, b @ r1)
        return rotated + len(stream.tables) + len(stream.writers)

    def _rotate_heads(self, editor: WeightEditor, att: Attention) -> None:
        """V's columns of kv head g by R2[g]; O's rows of query head h by R2[group(h)]ᵀ."""
        hd = att.head_dim
        r2 = self._rotation(f"r2.{att.layer}", hd, self.seed + 1 + att.layer)
        per_kv = r2 if r2.ndim == 3 else np.broadcast_to(r2, (att.kv_heads, hd, hd))
        w, b = editor.weight(att.v), editor.bias(att.v)
        for g, col in enumerate(att.v_columns):
            w[:, col:col + hd] = w[:, col:col + hd] @ per_kv[g]
            if b is not None:
                b[col:col + hd] = b[col:col + hd] @ per_kv[g]
        self._sites.right(att.v, Factor.blocks(att.v_columns, per_kv))
        o = editor.weight(att.o)
        for h, row in enumerate(att.o_rows):
            o[row:row + hd] = per_kv[att.group[h]].T @ o[row:row + hd]
        self._sites.left(att.o, Factor.blocks(att.o_rows, [per_kv[g].T for g in att.group]))

    def _stats(self, topo: Topology, skipped: list[Skip], r1: int, r4: int,
               editor: WeightEditor) -> dict[str, Any]:
        att = topo.attention
        stats: dict[str, Any] = {
            "method": self.method,
            "calibrated": sorted(self._used),  # the given rotations that were applied
            "norms": len(topo.norms),
            "layers": len(att),
            "hidden": topo.stream.width if topo.stream else None,
            "heads": att[0].heads if att else None,
            "kv_heads": att[0].kv_heads if att else None,
            "head_dim": att[0].head_dim if att else None,
            "norms_folded": len(topo.stream.blocks) if topo.stream else 0,
            "r1": r1,  # weights rotated by R1 (embeddings, readers, writers)
            "r2": len(att),  # attention layers rotated by R2
            "r4": r4,  # online Hadamards inserted before FFN down projections
            "initializers_split": editor.split,
            "skipped": [s.to_json() for s in skipped],
        }
        return stats


def _first_reasons(skipped: list[Skip], topo: Topology) -> str:
    """``R1 skipped at X: why; R2 skipped at Y (and 1 more site): why``: the first reason per
    rotation, as the report's rotate row words it."""
    first: dict[str, list[Skip]] = {}
    for s in skipped:
        first.setdefault(s.rotation, []).append(s)
    parts = []
    for rot, items in first.items():
        at = "" if items[0].node == "-" else f" at {items[0].node}"
        more = f" (and {len(items) - 1} more sites)" if len(items) > 1 else ""
        parts.append(f"{rot.upper()} skipped{at}{more}: {items[0].reason}")
    if not topo.attention and "r2" not in first:
        parts.append("R2: no attention block found")
    return "; ".join(parts)


def _lora_beta(stream: Stream) -> Skip | None:
    """R1 folds a LayerNorm β into each reader's bias (b += β·W); a swappable-LoRA branch on a
    reader would need (β·Aᵀ)·B added per adapter, which no transform of A/B expresses."""
    for norm, readers in stream.blocks:
        beta = const_array(norm.shift)
        if beta is None or not np.any(beta):
            continue
        for lin in readers:
            if lin.lora_module is not None:
                return Skip("r1", norm.node.name, f"the norm's shift β would fold into the bias of "
                            f"{lin.node.name}, whose swappable LoRA branch ({lin.lora_module}) "
                            "would then need β·A·B added per adapter; compile with --lora-mode "
                            "merge to rotate this stream")
    return None


def _check_rotations(rotations: Mapping[str, np.ndarray], topo: Topology) -> None:
    """Calibrated matrices must fit this graph (right keys, sizes) and be orthogonal."""
    layers = {a.layer: a for a in topo.attention}
    for key, r in rotations.items():
        m = re.fullmatch(r"r1|r2\.(\d+)", key)
        if m is None:
            raise UserError(f"rotation {key!r}: unknown key; calibrated rotations are 'r1' and "
                            "'r2.<layer>'")
        if key == "r1":
            want = [(topo.stream.width,) * 2] if topo.stream else [r.shape]
        elif int(m.group(1)) in layers:
            a = layers[int(m.group(1))]
            want = [(a.head_dim,) * 2, (a.kv_heads, a.head_dim, a.head_dim)]
        else:
            raise UserError(f"rotation {key!r}: this graph has {len(layers)} attention layers; "
                            "the rotations were calibrated for another model")
        if r.shape not in want:
            raise UserError(f"rotation {key!r} is {list(r.shape)}, this graph needs "
                            f"{list(want[0])}; the rotations were calibrated for another model")
        eye = np.eye(r.shape[-1])
        err = float(np.abs(np.swapaxes(r, -1, -2) @ r - eye).max())
        if err > ORTHOGONALITY_TOL:
            raise UserError(f"rotation {key!r} is not orthogonal (max |RᵀR − I| = {err:.2g})")
