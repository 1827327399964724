"""Accuracy-driven mixed precision (``--quantize w8a8:min_cos=0.99``).

1. Sensitivity, in one pass over cached activations: the fp32 graph runs once on held-out
   samples with every quantizable node's inputs and output exposed; each node's output is then
   recomputed in numpy with its inputs fake-quantized as the scheme will (activations with the
   calibrated ranges, u8/s8 or 16 bits where the plan says; weights symmetric per output channel
   at the scheme's width) and compared with the fp32 output: the node's own quantization error,
   with no recompile per node.
2. Selection: the nodes are ranked by that error, and the fewest most sensitive ones are kept in
   high precision (float on CPU targets and TensorRT, 16 bits on the NPU) such that the
   quantized graph's worst output cosine vs fp32 on the held-out samples reaches ``min_cos``:
   a doubling then bisection search, each probe one real quantization + run (log₂ N probes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["LayerError", "layer_errors", "search_exclusions", "worst_cosine"]

_BITS = {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int4": 4, "uint4": 4}


@dataclasses.dataclass(frozen=True)
class LayerError:
    node: str
    op: str
    error: float  # relative L2 error of the node's output with its inputs quantized

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "error": round(self.error, 6)}


def _fake_quant_activation(x: np.ndarray, lo: float, hi: float, bits: int,
                           symmetric: bool) -> np.ndarray:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2 ** bits - 1
    if symmetric:
        bound = max(abs(lo), abs(hi)) or 1e-8
        scale = 2 * bound / levels
        return np.clip(np.round(x / scale), -(levels // 2), levels // 2) * scale
    scale = (hi - lo) / levels or 1e-8
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, levels) - zero) * scale


def _fake_quant_weight(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric, per output channel (``axis``), as every edgec scheme quantizes MatMul weights."""
    bound = np.max(np.abs(w), axis=tuple(i for i in range(w.ndim) if i != axis % w.ndim),
                   keepdims=True)
    top = 2 ** (bits - 1) - 1
    scale = np.where(bound > 0, bound / top, 1.0)
    return np.clip(np.round(w / scale), -top - 1, top) * scale


def _candidates(model: ir.Model, op_types: Sequence[str], skip: set[str]) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in op_types and n.name not in skip
            and n.op_type in ("MatMul", "Gemm")]


def layer_errors(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], cache, scheme,
                 op_types: Sequence[str], skip: set[str], sixteen: set[str]
                 ) -> list[LayerError]:
    """Each quantizable MatMul/Gemm's own output error under the scheme, worst first."""
    from edgec.runtimes.ort import run_model

    nodes = _candidates(model, op_types, skip)
    if not nodes:
        return []
    probe = model.clone()
    by_name = {n.name: n for n in probe.graph}
    exposed: dict[str, ir.Value] = {}
    for node in nodes:
        for v in (*by_name[node.name].inputs[:2], by_name[node.name].outputs[0]):
            if v is not None and v.const_value is None and v.name not in exposed:
                exposed[v.name] = v
    graph_outputs = {v.name for v in probe.graph.outputs}
    probe.graph.outputs.extend(v for name, v in exposed.items() if name not in graph_outputs)
    runs = [run_model(probe, f) for f in feeds]
    act_bits, w_bits = _BITS[scheme.activations], _BITS[scheme.weights]
    errors = []
    for node in nodes:
        trans = node.op_type == "Gemm" and any(at.name == "transB" and at.value
                                               for at in node.attributes.values())
        num = den = 0.0
        for out in runs:
            raw, quant = [], []
            for v in node.inputs[:2]:
                if v.const_value is not None:  # a weight: [K, N] (Gemm transB: [N, K])
                    w = v.const_value.numpy().astype(np.float32)
                    raw.append(w)
                    quant.append(_fake_quant_weight(w, w_bits, 0 if trans else -1))
                    continue
                x = out[v.name].astype(np.float32)
                raw.append(x)
                rng = cache.tensors.get(v.name)
                bits = 16 if v.name in sixteen else act_bits
                quant.append(x if rng is None else _fake_quant_activation(
                    x, rng["lowest"], rng["highest"], bits, scheme.activation_symmetric))
            if trans:
                raw[1], quant[1] = raw[1].T, quant[1].T
            diff = np.matmul(quant[0], quant[1]) - np.matmul(raw[0], raw[1])
            num += float(np.sum(diff.astype(np.float64) ** 2))
            den += float(np.sum(out[node.outputs[0].name].astype(np.float64) ** 2))
        errors.append(LayerError(node.name, node.op_type, (num / den) ** 0.5 if den else 0.0))
    return sorted(errors, key=lambda e: -e.error)


def worst_cosine(outputs: Sequence[dict[str, np.ndarray]],
                 references: Sequence[dict[str, np.ndarray]]) -> float:
    """The worst cosine over samples and outputs (as the fidelity report measures it)."""
    worst = 1.0
    for got, ref in zip(outputs, references):
        for name, r in ref.items():
            g, r = np.asarray(got[name], np.float64).ravel(), np.asarray(r, np.float64).ravel()
            denom = np.linalg.norm(g) * np.linalg.norm(r)
            worst = min(worst, float(g @ r / denom) if denom else 1.0)
    return worst


def search_exclusions(ranked: Sequence[LayerError], measure: Callable[[int], float],
                      min_cos: float) -> tuple[int, float, list[dict[str, Any]]]:
    """The smallest k (keeping the k most sensitive nodes in high precision) whose measured
    cosine reaches ``min_cos``: doubling, then bisection. Returns (k, its cosine, probes)."""
    probes: list[dict[str, Any]] = []

    def probe(k: int) -> float:
        cos = measure(k)
        probes.append({"kept": k, "cosine": round(cos, 6)})
        return cos

    n = len(ranked)
    cos0 = probe(0)
    if cos0 >= min_cos or n == 0:
        return 0, cos0, probes
    lo, hi, hi_cos = 0, None, None
    k = 1
    while k <= n:
        c = probe(k)
        if c >= min_cos:
            hi, hi_cos = k, c
            break
        lo = k
        k = n if k == n else min(2 * k, n)
        if lo == n:
            break
    if hi is None:  # even every candidate kept does not reach the floor: keep them all
        return n, probes[-1]["cosine"], probes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = probe(mid)
        if c >= min_cos:
            hi, hi_cos = mid, c
        else:
            lo = mid
    return hi, hi_cos, probes
