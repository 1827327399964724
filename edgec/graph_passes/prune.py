"""Magnitude pruning of MatMul weights (so a sparse base can be shown end to end with LoSA merge).

    W ← W ⊙ 1[|W| ≥ quantile(|W|, s)]             (``magnitude:s``, unstructured, per matrix)
    W ← W ⊙ 1[|W| among the top 2 of each 4 along the input dim]     (``2:4``, N:M structured)

The 2-D constant right-hand inputs of MatMul and Gemm are pruned (the exporter's Linear weights:
MatMul's stored [in, out], Gemm's [out, in] with ``transB``), also when read through a
Transpose; N:M groups run along the reduction (input) dim of the stored layout, as sparse tensor
cores want. A weight shared by several nodes is pruned once (its readers must agree on that
dim). Parameters matching ``exclude`` (default ``lm_head``, embeddings never reach a MatMul)
stay dense. Pruning changes the function: the pass is approximating and reports sparsity before
and after; finding no weight to prune is refused, not reported as a pruned model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.options import split_spec

__all__ = ["PruneConfig", "PrunePass", "prunable_weights"]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    method: str = "magnitude"  # "magnitude" | "nm"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4
    exclude: str = "lm_head"

    @classmethod
    def parse(cls, text: str | PruneConfig) -> PruneConfig:
        """``magnitude:0.5``, ``0.5``, ``2:4`` (N:M), optionally ``…,exclude=REGEX``."""
        if isinstance(text, cls):
            return text
        head, items = split_spec(text, "--prune", head=",")
        unknown = sorted(set(items) - {"exclude"})
        if unknown:
            raise UserError(f"unknown --prune option {unknown[0]!r}; use e.g. magnitude:0.5 or "
                            "2:4[,exclude=REGEX]")
        kwargs = dict(items)
        parts = head.strip().split(":")
        try:
            if len(parts) == 2 and parts[0] == "magnitude":
                cfg = cls("magnitude", float(parts[1]), **kwargs)
            elif len(parts) == 1:
                cfg = cls("magnitude", float(parts[0]), **kwargs)
            elif len(parts) == 2:
                n, m = int(parts[0]), int(parts[1])
                cfg = cls("nm", (m - n) / m if m > 0 else 0.0, m - n, m, **kwargs)
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"bad prune spec {text!r}; use magnitude:0.5 (unstructured fraction) "
                            "or 2:4 (keep N of every M)") from None
        if cfg.method == "nm" and not 0 < cfg.m - cfg.n <= cfg.m:
            raise UserError(f"bad N:M pattern {head!r}; keep N of every M with 0 < N ≤ M")
        if not 0 <= cfg.sparsity < 1:
            raise UserError(f"prune sparsity {cfg.sparsity} must be in [0, 1)")
        return cfg

    def describe(self) -> str:
        return (f"magnitude:{self.sparsity:g}" if self.method == "magnitude"
                else f"{self.m - self.n}:{self.m}")


def prunable_weights(model: ir.Model, parameter_map: Mapping[str, Mapping[str, str]] | None,
                     exclude: str = "") -> dict[str, tuple[str, int | None]]:
    """initializer name → (parameter name or the initializer's, its reduction axis) of every
    prunable MatMul/Gemm weight; the axis is None where its readers disagree on it."""
    names = {e["initializer"]: p for p, e in (parameter_map or {}).items()}
    out: dict[str, tuple[str, int | None]] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w, axis = node.inputs[1], 0  # the reduction axis of the matrix as the node reads it
        attr = node.attributes.get("transB")
        if node.op_type == "Gemm" and attr is not None and attr.value:
            axis = 1
        t = w.producer()
        if t is not None and t.op_type == "Transpose" and t.domain in ("", "ai.onnx"):
            perm = t.attributes.get("perm")
            if perm is not None and list(perm.value) != [1, 0]:
                continue
            w, axis = t.inputs[0], 1 - axis
        if w is None or w.const_value is None or w.name not in model.graph.initializers:
            continue
        if len(w.const_value.shape) != 2:
            continue
        label = names.get(w.name, w.name)
        if exclude and re.search(exclude, label):
            continue
        if w.name in out and out[w.name][1] != axis:
            axis = None
        out[w.name] = (label, axis)
    return out


class PrunePass(EdgecPass):
    name = "prune"
    exact = False

    def __init__(self, config: PruneConfig, parameter_map=None):
        super().__init__()
        self.config = config
        self.parameter_map = parameter_map

    def call(self, model: ir.Model) -> PassResult:
        cfg = self.config
        targets = prunable_weights(model, self.parameter_map, cfg.exclude)
        zeros_before = zeros_after = total = skipped = mixed = 0
        for init_name, (_, axis) in targets.items():
            value = model.graph.initializers[init_name]
            w = value.const_value.numpy()
            if cfg.method == "nm" and axis is None:
                mixed += 1  # readers disagree on the input dim: no one N:M pattern fits both
                continue
            if cfg.method == "nm" and w.shape[axis] % cfg.m:
                skipped += 1  # input dim not a multiple of M
                continue
            mask = _keep_mask(w.T, cfg).T if axis == 1 else _keep_mask(w, cfg)
            pruned = w * mask.astype(w.dtype)
            zeros_before += int(np.count_nonzero(w == 0))
            zeros_after += int(np.count_nonzero(pruned == 0))
            total += w.size
            value.const_value = ir.tensor(pruned, name=init_name)
        pruned_count = len(targets) - skipped - mixed
        if not pruned_count:
            why = (f" ({skipped} with an input dim not a multiple of {cfg.m})" if skipped
                   else f" (exclude={cfg.exclude})" if cfg.exclude else "")
            raise UserError(f"--prune found no MatMul/Gemm weight to prune{why}; drop --prune "
                            "or change its pattern or exclude=")
        stats = {"config": cfg.describe(), "weights_pruned": pruned_count,
                 "skipped_not_multiple_of_m": skipped,
                 **({"skipped_mixed_layouts": mixed} if mixed else {}), "elements": total,
                 "sparsity_before": zeros_before / total if total else 0.0,
                 "sparsity_after": zeros_after / total if total else 0.0}
        return PassResult(model, zeros_after != zeros_before, stats)


def _keep_mask(w: np.ndarray, cfg: PruneConfig) -> np.ndarray:
    a = np.abs(w)
    if cfg.method == "magnitude":
        k = int(round(cfg.sparsity * a.size))  # exactly k smallest go (ties broken by order)
        mask = np.ones(a.size, dtype=bool)
        mask[np.argsort(a, axis=None, kind="stable")[:k]] = False
        return mask.reshape(a.shape)
    groups = a.reshape(a.shape[0] // cfg.m, cfg.m, a.shape[1])  # M consecutive inputs per group
    order = np.argsort(groups, axis=1, kind="stable")
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, : cfg.n], False, axis=1)  # drop the n smallest of each M
    return mask.reshape(a.shape)
