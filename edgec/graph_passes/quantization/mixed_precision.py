"""Accuracy-driven mixed precision (``--quantize w8a8:min_cos=0.99``).

1. Sensitivity, in one pass over cached activations: the fp32 graph runs once on held-out
   samples with every quantizable node's inputs and output exposed; each node's output is then
   recomputed in numpy as planned (activations fake-quantized with the calibrated ranges, at the
   widths the quantized graph gives them, ``quantized_widths``; weights symmetric per output
   channel at the scheme's width) and as kept (float on the CPU targets and TensorRT; on the NPU
   its activations, output included, at 16 bits and its weights at 8 bits, w8a16). The difference is
   what keeping the node removes (``error``).
2. End-to-end effect: one more graph, built once, adds an input ``δ`` to every candidate's
   output; each node's error is injected alone (its δ = the difference above, every other δ
   zero) and the rest of the network runs in fp32, so ``end_to_end`` = 1 − worst output cosine
   with only that node quantized (and, for a KL bound, ``end_to_end_kld``). A local error says
   little about how much the layers after it amplify it (on all-MiniLM-L6-v2 the layer that
   matters, layer 0's FFN down projection, ranks 29th of 48 by its own error). N runs per
   sample, no recompile per node.
3. Selection: the nodes are ranked by the share of the floor's room each uses alone
   (``Floor.share``), and the fewest most sensitive ones are kept in high precision such that
   the quantized graph holds the ``Floor`` on the held-out samples (worst output cosine vs fp32
   at least ``min_cos``; on a language model's ``logits``, worst per-sample mean KL divergence
   at most ``max_kld``): a doubling then bisection search (log₂ N probes), each probe the k = 0
   graph edited where kept means float (``keep_float``), quantized again on the NPU.

Both are measured on what a user reads: where the samples carry an ``attention_mask`` and an
output is per token ([batch, seq, ...]), padded positions are left out.

Why a KL divergence for logits: a cosine over a vocabulary's logits is dominated by their shared
shape, not by which token wins. SmolLM2-135M's first 4 layers, w8a8 on openvino-cpu: held-out
logits cosine 0.992 (the default 0.98 held) with top-1 agreement 70% and mean KL divergence
0.19 nats per token; after ``--rotate hadamard``: cosine 0.9999, top-1 95%, KL 0.005.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["LayerError", "layer_errors", "search_exclusions", "worst_cosine", "worst_kld",
           "Floor", "integer_activations", "fake_quant_activation",
           "fake_quant_weight"]

LOGITS = "logits"  # the output a KL divergence floor reads (Hugging Face's and edgec's LMs)

_BITS = {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int4": 4, "uint4": 4}


def integer_activations(scheme) -> bool:
    """Whether ``scheme`` quantizes activations to integers from calibrated ranges (what the
    sensitivity analysis below can fake-quantize)."""
    return bool(scheme.calibrated and scheme.activations in _BITS)


@dataclasses.dataclass(frozen=True)
class LayerError:
    node: str
    op: str
    error: float  # relative L2 error of the node's output with its inputs quantized
    end_to_end: float = 0.0  # 1 − worst output cosine with only this node quantized
    # worst logits KL divergence with only this node quantized (measured for a KL floor)
    end_to_end_kld: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "error": round(self.error, 6),
                "end_to_end": float(f"{self.end_to_end:.3g}"),
                **({} if self.end_to_end_kld is None
                   else {"end_to_end_kld": float(f"{self.end_to_end_kld:.3g}")})}


def fake_quant_activation(x: np.ndarray, lo: float, hi: float, bits: int,
                          symmetric: bool) -> np.ndarray:
    """``x`` through a static per-tensor ``bits``-bit grid over [lo, hi] (widened to hold 0, as
    ONNX Runtime's quantizer does), asymmetric with an integer zero point or symmetric; in
    ``x``'s dtype (a float64 zero point made float32 score tensors twice their size)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2 ** bits - 1
    if symmetric:
        bound = max(abs(lo), abs(hi)) or 1e-8
        scale = 2 * bound / levels
        return np.clip(np.round(x / scale), -(levels // 2), levels // 2) * scale
    scale = (hi - lo) / levels or 1e-8
    zero = float(np.round(-lo / scale))
    return (np.clip(np.round(x / scale) + zero, 0, levels) - zero) * scale


def fake_quant_weight(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric, per output channel (``axis``), as every edgec scheme quantizes MatMul weights."""
    bound = np.max(np.abs(w), axis=tuple(i for i in range(w.ndim) if i != axis % w.ndim),
                   keepdims=True)
    top = 2 ** (bits - 1) - 1
    scale = np.where(bound > 0, bound / top, 1.0)
    return np.clip(np.round(w / scale), -top - 1, top) * scale


def quantized_widths(qdq: ir.Model, names: Sequence[str] | None = None
                     ) -> dict[str, list[int | None]]:
    """For each node in ``names`` (None: every node), the widths its inputs and its output have
    in the QDQ graph ``qdq`` (``[input 0, input 1, output]``: the zero point's type of the
    DequantizeLinear it reads; the narrowest its output's readers see; None where there is
    none). What the plan asks is not all there is: ONNX Runtime's QNN config makes the output of
    an op that reads a 16-bit activation 16-bit, converted to 8 for 8-bit readers (SmolLM2's LM
    head: planned 8-bit logits, and 16-bit ones with no reader to convert for)."""
    wanted = None if names is None else set(names)
    out: dict[str, list[int | None]] = {}
    for node in qdq.graph:
        if wanted is not None and node.name not in wanted:
            continue
        widths: list[int | None] = []
        for v in list(node.inputs[:2]) + [None] * (2 - len(node.inputs[:2])):
            p = v.producer() if v is not None else None
            widths.append(_width(p) if p is not None and p.op_type == "DequantizeLinear"
                          else None)
        widths.append(_read_width(node.outputs[0]))
        out[node.name] = widths
    return out


def _read_width(value: ir.Value) -> int | None:
    """The narrowest width ``value``'s readers see through its QuantizeLinear and any convert
    chain after it (Q16 → DQ → Q8 → DQ: the readers see 8 bits); None where none quantizes it."""
    widths = []
    for q, _ in value.uses():
        if q.op_type != "QuantizeLinear" or (width := _width(q)) is None:
            continue
        after = [_read_width(dq.outputs[0]) for dq, _ in q.outputs[0].uses()
                 if dq.op_type == "DequantizeLinear"]
        widths.append(min([width, *(w for w in after if w is not None)]))
    return min(widths) if widths else None


def _width(qdq_node: ir.Node) -> int | None:
    """The integer width a QuantizeLinear makes or a DequantizeLinear reads."""
    zero = qdq_node.inputs[2] if len(qdq_node.inputs) > 2 else None
    dtype = zero.dtype if zero is not None else (
        qdq_node.inputs[0].dtype if qdq_node.op_type == "DequantizeLinear" else None)
    return dtype.bitwidth if dtype is not None and dtype.is_integer() else None


_CANDIDATES = ("MatMul", "Gemm", "Conv")


def _candidates(model: ir.Model, op_types: Sequence[str], skip: set[str]) -> list[ir.Node]:
    """The quantized nodes the search may keep: MatMul/Gemm, and Conv where the scheme quantizes
    it (the CPU targets: a DiT's patch embedding was the one quantized op left when every
    MatMul was kept, and the floor could not reach past it)."""
    return [n for n in model.graph if n.op_type in op_types and n.name not in skip
            and n.op_type in _CANDIDATES
            and (n.op_type != "Conv" or (len(n.inputs) > 1 and n.inputs[1] is not None
                                         and n.inputs[1].const_value is not None))]


def layer_errors(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], cache, scheme,
                 op_types: Sequence[str], skip: set[str], sixteen: set[str],
                 floor: Floor | None = None, kept_bits: int | None = None,
                 widths: dict[str, list[int | None]] | None = None,
                 budget: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[LayerError]:
    """Each quantizable MatMul/Gemm/Conv's own output error under the scheme and its end-to-end
    effect, the ones ``floor`` (``Floor.share``; None: cosine alone) suffers most from first.

    The error is what keeping the node in high precision removes: the node as planned minus
    the node kept. ``kept_bits`` None: kept means float (the CPU targets, TensorRT). 16: the
    NPU, where a kept node's activations (inputs and output) go to 16 bits and its weights to
    8 (w8a16; the scheme's width where that is 8 already), so under w8a8 an input at 16 bits
    already and the weight count for nothing.
    Counting them ranked first on SmolLM2-135M's HTP floor the down projections whose inputs
    are 16-bit already for their massive activations (a ±3000 range: a 16-bit step of 0.09),
    and the probes keeping the first four measured the KL of none kept.

    ``widths`` (``quantized_widths`` of the quantized graph): the widths the node's activations
    really have as planned, where the plan's ``sixteen`` is not all there is.

    ``budget``: bytes of one sample's activations held at once (default
    ``calibration.histograms.memory_budget()``); nodes are analysed in groups within it, with the
    same results. ``progress(i, n)``: after each of the n runs (a group's exposed run on one
    sample and its injections)."""
    from edgec.calibration.histograms import (
        expose,
        memory_budget,
        tensor_bytes,
        within_budget,
    )
    from edgec.runtimes.ort import model_feeds, open_model

    nodes = _candidates(model, op_types, skip)
    if not nodes:
        return []
    act_bits, w_bits = _BITS[scheme.activations], _BITS[scheme.weights]

    def activation(x: np.ndarray, name: str, bits: int | None) -> np.ndarray:
        rng = cache.tensors.get(name)
        if bits is None or rng is None:
            return x
        return fake_quant_activation(x, rng["lowest"], rng["highest"], bits,
                                     scheme.activation_symmetric)

    def planned_bits(name: str, width: int | None) -> int:
        """The width a tensor has as planned: the quantized graph's, else the plan's."""
        return width or (16 if name in sixteen else act_bits)

    def weights(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """A weight as kept (float; on the NPU w8a16's 8 bits, or the scheme's where that is
        8 already) and as planned, symmetric per output channel (``axis``)."""
        wq = fake_quant_weight(w, w_bits, axis)
        kept = w if kept_bits is None else wq if w_bits >= 8 else fake_quant_weight(w, 8, axis)
        return kept, wq

    fused = set(getattr(scheme, "fused_outputs", ()))

    def outputs(y_kept: np.ndarray, y_quant: np.ndarray, name: str,
                width: int | None, op_type: str) -> np.ndarray:
        """Planned minus kept (in ``y_quant``); a fully quantized target quantizes the output
        too, and a float one the outputs of its ``fused_outputs`` ops (kept: float)."""
        if kept_bits is not None:
            y_kept = activation(y_kept, name, kept_bits)
            y_quant = activation(y_quant, name, planned_bits(name, width))
        elif op_type in fused and width is not None:
            y_quant = activation(y_quant, name, width)
        y_quant -= y_kept
        return y_quant

    def conv_delta(node: ir.Node, out: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """A Conv's δ through ONNX Runtime's own kernel: the node alone, run on its input and
        weight as kept and as planned (weights per output channel, axis 0; the bias as fp32:
        its int32 grid at the input × weight scale is far finer than either)."""
        planned = (widths or {}).get(node.name) or [None, None, None]
        x_name = node.inputs[0].name
        x = np.asarray(out[x_name], np.float32)
        w_kept, wq = weights(node.inputs[1].const_value.numpy().astype(np.float32), 0)
        rest = [v.const_value.numpy() for v in node.inputs[2:] if v is not None]
        with open_model(_alone(model, node, [x.ndim, w_kept.ndim, *(r.ndim for r in rest)])
                        ) as session:
            y_kept = session.run(_alone_feeds(activation(x, x_name, kept_bits), w_kept,
                                              rest))["y"]
            y_quant = session.run(_alone_feeds(
                activation(x, x_name, planned_bits(x_name, planned[0])), wq, rest))["y"]
        d = outputs(y_kept, y_quant, node.outputs[0].name, planned[2], node.op_type)
        d = d.astype(np.float32, copy=False)
        return d, _squares(d)

    def delta(node: ir.Node, out: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """The node's output as planned minus as kept on one sample's exposed tensors, and
        the sum of its squares. Computed in row blocks of the first input (``_ROWS_BYTES`` of
        output each): a whole score-sized product (video-dit small: 2.2 GB) with its kept and
        quantized inputs, outputs and their difference was ~6 of them in numpy at once."""
        trans = node.op_type == "Gemm" and any(at.name == "transB" and at.value
                                               for at in node.attributes.values())
        out_name = node.outputs[0].name
        planned = (widths or {}).get(node.name) or [None, None, None]
        kept, quant = [], []
        for v, width in zip(node.inputs[:2], planned):
            if v.const_value is not None:  # a weight: [K, N] (Gemm transB: [N, K])
                w_kept, wq = weights(v.const_value.numpy().astype(np.float32),
                                     0 if trans else -1)
                kept.append(w_kept)
                quant.append(wq)
            else:
                kept.append((v.name, kept_bits))
                quant.append((v.name, planned_bits(v.name, width)))

        def block(pick: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
            """Planned minus kept on the rows ``pick`` takes from the first input."""
            pairs = []
            for i, (k, q) in enumerate(zip(kept, quant)):
                if isinstance(k, tuple):  # an activation (name, bits): fake-quantized here
                    x = np.asarray(out[k[0]], np.float32)
                    x = pick(x) if i == 0 else x
                    k, q = activation(x, *k), activation(x, *q)
                elif i == 0:
                    k, q = pick(k), pick(q)
                pairs.append((k.T, q.T) if trans and i == 1 else (k, q))
            (k0, q0), (k1, q1) = pairs
            return outputs(np.matmul(k0, k1), np.matmul(q0, q1), out_name, planned[2],
                           node.op_type)

        result = out[out_name]
        first, second = (np.shape(out[v.name]) if v.const_value is None else v.const_value.shape
                         for v in node.inputs[:2])
        rows = first[-2] if len(first) >= 2 and len(second) >= 2 else 1
        step = max(1, int(_ROWS_BYTES * rows // max(result.nbytes, 1)))
        if step >= rows:
            d = block(lambda x: x).astype(np.float32, copy=False)
            return d, _squares(d)
        d = np.empty(result.shape, np.float32)
        total = 0.0
        for r in range(0, rows, step):
            part = block(lambda x, r=r: x[..., r:r + step, :])
            d[..., r:r + step, :] = part  # the output's rows are the first input's
            total += _squares(part)
        return d, total

    # One group of nodes and one sample at a time (the group's exposed tensors, its δs, their
    # injections), so memory holds one sample's activations of as many nodes as ``budget``
    # allows: on video-dit small (8192 tokens, 2 GB score tensors) every node at once did not
    # fit. A graph that fits runs as one group, one exposed run per sample.
    kld = floor is not None and floor.max_kld is not None
    num, den = np.zeros(len(nodes)), np.zeros(len(nodes))
    effects, klds = np.zeros(len(nodes)), np.zeros(len(nodes))
    index = {node.name: i for i, node in enumerate(nodes)}
    sizes = tensor_bytes(model, _activations(nodes), model_feeds(model, feeds[0]))
    groups = within_budget(nodes, [_node_bytes(n, sizes) for n in nodes],
                           budget or memory_budget())
    done, total = 0, len(groups) * len(feeds)
    for group in groups:
        with contextlib.ExitStack() as stack:
            probe = expose(model, _activations(group))
            exposing = stack.enter_context(open_model(probe))
            injector = injecting = None
            for feed in feeds:
                out = exposing.run(model_feeds(probe, feed))
                deltas = []
                for node in group:
                    i = index[node.name]
                    d, squares = (conv_delta if node.op_type == "Conv" else delta)(node, out)
                    deltas.append(d)
                    num[i] += squares
                    den[i] += _squares(out[node.outputs[0].name])
                del out
                if injector is None:
                    injector = _Injector(model, [n.name for n in group],
                                         [d.ndim for d in deltas])
                    injecting = stack.enter_context(open_model(injector.graph, optimize=True))
                found = injector.effects(injecting, feed, deltas, kld)
                del deltas
                for node, (c, k) in zip(group, found):
                    i = index[node.name]
                    effects[i], klds[i] = max(effects[i], c), max(klds[i], k or 0.0)
                done += 1
                if progress is not None:
                    progress(done, total)
    errors = [LayerError(node.name, node.op_type, float((num[i] / den[i]) ** 0.5)
                         if den[i] else 0.0, float(effects[i]),
                         float(klds[i]) if kld else None) for i, node in enumerate(nodes)]
    floor = floor or Floor(min_cos=0.0)
    return sorted(errors, key=lambda e: (-floor.share(e), -e.end_to_end, -e.error))


_ROWS_BYTES = 64 << 20  # one row block of a node's output in sensitivity's numpy


def _alone(model: ir.Model, node: ir.Node, ranks: Sequence[int]) -> ir.Model:
    """``node`` alone in a graph whose inputs are its inputs (``x``, ``w``, ``b``: of
    ``ranks``)."""
    f = ir.DataType.FLOAT
    inputs = [ir.Value(name=n, type=ir.TensorType(f), shape=ir.Shape([None] * r))
              for n, r in zip(("x", "w", "b"), ranks)]
    alone = ir.node(node.op_type, inputs, domain=node.domain, name=node.name,
                    attributes={a.name: a.value for a in node.attributes.values()})
    alone.outputs[0].name, alone.outputs[0].type = "y", ir.TensorType(f)
    graph = ir.Graph(inputs, alone.outputs, nodes=[alone],
                     opset_imports=dict(model.graph.opset_imports), name="alone")
    return ir.Model(graph, ir_version=model.ir_version)


def _alone_feeds(x: np.ndarray, w: np.ndarray, rest: Sequence[np.ndarray]
                 ) -> dict[str, np.ndarray]:
    feeds = {"x": np.asarray(x, np.float32), "w": np.asarray(w, np.float32)}
    if rest:
        feeds["b"] = np.asarray(rest[0], np.float32)
    return feeds


def _squares(x: np.ndarray) -> float:
    """Σ x² in float64, a row block at a time (no float64 copy of a whole score tensor)."""
    flat = x.reshape(-1)
    step = _ROWS_BYTES // 8
    return float(sum(np.dot(c, c) for c in (flat[i:i + step].astype(np.float64)
                                            for i in range(0, flat.size, step))))


def _activations(nodes: Sequence[ir.Node]) -> list[str]:
    """The names of ``nodes``' activation inputs and outputs (weights left out), once each."""
    return list(dict.fromkeys(v.name for node in nodes for v in (*node.inputs[:2],
                                                                 node.outputs[0])
                              if v is not None and v.const_value is None))


def _node_bytes(node: ir.Node, sizes: dict[str, int]) -> int:
    """What sensitivity holds for ``node`` on one sample (``sizes``: bytes per tensor): its
    exposed activation inputs and output, and the output-sized δ and zeros it injects."""
    inputs = sum(sizes.get(v.name, 0) for v in node.inputs[:2]
                 if v is not None and v.const_value is None)
    return inputs + 3 * sizes.get(node.outputs[0].name, 0)


def end_to_end_effects(model: ir.Model, feeds: Sequence[dict[str, np.ndarray]],
                       names: Sequence[str], deltas: Sequence[Sequence[np.ndarray]],
                       kld: bool = False) -> list[tuple[float, float | None]]:
    """(1 − worst output cosine vs fp32, and with ``kld`` the worst ``logits`` KL divergence)
    with ``deltas[i][s]`` added to node ``names[i]``'s output on sample ``s`` (every other node
    exact): one graph with a δ input per node, N runs per sample."""
    from edgec.runtimes.ort import open_model

    injector = _Injector(model, names, [d[0].ndim for d in deltas])
    effects, klds = np.zeros(len(names)), np.zeros(len(names))
    with open_model(injector.graph, optimize=True) as session:
        for s, feed in enumerate(feeds):
            found = injector.effects(session, feed, [d[s] for d in deltas], kld)
            for i, (c, k) in enumerate(found):
                effects[i], klds[i] = max(effects[i], c), max(klds[i], k or 0.0)
    return [(float(c), float(k) if kld else None) for c, k in zip(effects, klds)]


class _Injector:
    """End-to-end effects: one graph with a δ input added to each node's output, so the error
    of one node alone (every other δ zero, the rest of the network fp32) gives 1 − the worst
    output cosine vs fp32 (and the worst ``logits`` KL divergence): N runs per sample."""

    def __init__(self, model: ir.Model, names: Sequence[str], ranks: Sequence[int]):
        probe = model.clone()
        by_name = {n.name: n for n in probe.graph}
        self.inputs = []
        for i, (name, rank) in enumerate(zip(names, ranks)):
            out = by_name[name].outputs[0]
            delta = ir.Value(name=f"edgec_delta_{i}",
                             type=ir.TensorType(out.dtype or ir.DataType.FLOAT),
                             shape=ir.Shape([None] * rank))
            uses = list(out.uses())
            add = ir.node("Add", [out, delta], name=f"edgec_delta_add_{i}")
            probe.graph.insert_after(by_name[name], add)
            for user, index in uses:
                user.replace_input_with(index, add.outputs[0])
            for j, g in enumerate(probe.graph.outputs):
                if g is out:  # the graph output keeps its name and carries the injected error
                    keep, out.name = out.name, f"edgec_delta_raw_{i}"
                    add.outputs[0].name = keep
                    probe.graph.outputs[j] = add.outputs[0]
            self.inputs.append(delta)
        probe.graph.inputs.extend(self.inputs)
        self.model, self.graph = model, probe

    def effects(self, session, feed: dict[str, np.ndarray], deltas: Sequence[np.ndarray],
                kld: bool) -> list[tuple[float, float | None]]:
        """Per node: its ``deltas`` entry alone injected on ``feed`` (``session``: ``graph``)."""
        from edgec.runtimes.ort import model_feeds

        mask = feed.get("attention_mask")
        feed = model_feeds(self.model, feed)
        zeros = {d.name: np.zeros(x.shape, d.dtype.numpy())
                 for d, x in zip(self.inputs, deltas)}
        reference = session.run({**feed, **zeros})
        found = []
        for d, x in zip(self.inputs, deltas):
            got = session.run({**feed, **zeros, d.name: x.astype(d.dtype.numpy())})
            found.append((1.0 - worst_cosine([got], [reference], [mask]),
                          worst_kld([got], [reference], [mask]) if kld else None))
        return found


def worst_cosine(outputs: Sequence[dict[str, np.ndarray]],
                 references: Sequence[dict[str, np.ndarray]],
                 masks: Sequence[np.ndarray | None] | None = None) -> float:
    """The worst cosine over samples and outputs; with a sample's ``attention_mask`` [B, S], a
    per-token output [B, S, ...] is compared on the unpadded positions only."""
    worst = 1.0
    for i, (got, ref) in enumerate(zip(outputs, references)):
        mask = None if masks is None else masks[i]
        for name, r in ref.items():
            g, r = _unpadded(got[name], r, mask)
            worst = min(worst, _cosine(g.ravel(), r.ravel()))
    return worst


def _cosine(g: np.ndarray, r: np.ndarray) -> float:
    """Cosine of two flat outputs, NaN/±inf as ``compare_outputs`` takes them: where they sit
    at the same places with the same values in both they are left out, anywhere else the
    cosine is 0. A NaN cosine compared as "not below" every worst: a w8a8 graph whose every
    output was NaN (an inf in the calibration data) held the floor at "cosine 1.0000"."""
    fg, fr = np.isfinite(g), np.isfinite(r)
    if not (fg.all() and fr.all()):
        same = (fg & fr) | (np.isnan(g) & np.isnan(r)) | (~fg & ~fr & (g == r))
        if not same.all():
            return 0.0
        g, r = g[fg & fr], r[fg & fr]
    denom = np.linalg.norm(g) * np.linalg.norm(r)
    cos = float(g @ r / denom) if denom else 1.0
    return cos if math.isfinite(cos) else 0.0


def worst_kld(outputs: Sequence[dict[str, np.ndarray]],
              references: Sequence[dict[str, np.ndarray]],
              masks: Sequence[np.ndarray | None] | None = None) -> float:
    """The worst over samples of the mean over positions of KL(softmax(ref) ‖ softmax(got)) of
    the ``logits`` output (nats per token; padded positions left out as in ``worst_cosine``)."""
    worst = 0.0
    for i, (got, ref) in enumerate(zip(outputs, references)):
        mask = None if masks is None else masks[i]
        g, r = _unpadded(got[LOGITS], ref[LOGITS], mask)
        g, r = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
        fg, fr = np.isfinite(g), np.isfinite(r)
        if not (fg.all() and fr.all()):  # NaN logits: max() kept the finite worst, and the
            # floor held on NaN outputs; rows non-finite alike in both are left out (as cosine)
            same = (fg & fr) | (np.isnan(g) & np.isnan(r)) | (~fg & ~fr & (g == r))
            if not same.all():
                return math.inf
            keep = (fg & fr).all(-1)
            g, r = g[keep], r[keep]
        g, r = _log_softmax(g), _log_softmax(r)
        kld = float((np.exp(r) * (r - g)).sum(-1).mean()) if len(r) else 0.0
        worst = max(worst, kld if math.isfinite(kld) else math.inf)
    return worst


def _unpadded(got, ref, mask) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies, the positions an ``attention_mask`` [B, S] pads left out of a per-token
    output [B, S, ...]; whole where there is no mask or the output is not per token."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if mask is not None and np.ndim(mask) == 2 and r.shape[:2] == np.shape(mask):
        keep = np.asarray(mask) != 0
        g, r = g[keep], r[keep]
    return g, r


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Floor:
    """What the quantized graph must hold on the held-out samples: worst output cosine ≥
    ``min_cos`` and, where set, worst ``logits`` KL divergence ≤ ``max_kld`` (None: not
    measured). ``default``: edgec's floor, not the user's."""

    min_cos: float | None = None
    max_kld: float | None = None
    default: bool = False

    def for_outputs(self, names: Sequence[str], default_kld: float) -> Floor:
        """This floor on a model with these outputs: the default gains the KL bound where there
        are ``logits``; a user's KL bound without them is refused (one line)."""
        if LOGITS in names:
            return (dataclasses.replace(self, max_kld=default_kld)
                    if self.default and self.max_kld is None else self)
        if self.max_kld is not None:
            from edgec.errors import UserError

            raise UserError(f"max_kld bounds the KL divergence of a language model's "
                            f"'{LOGITS}' output, which this model does not have (its outputs: "
                            f"{', '.join(names)}); bound its cosine with min_cos instead")
        return self

    def score(self, outputs, references, masks) -> dict[str, float]:
        score = {"cosine": worst_cosine(outputs, references, masks)}
        if self.max_kld is not None:
            score["kld"] = worst_kld(outputs, references, masks)
        return score

    def by_adapter(self, outputs, references, masks, adapters: Sequence[str] | None
                   ) -> dict[str, dict[str, float]]:
        """``score`` over the samples of each adapter bound (``adapters``: one name a sample,
        None: no adapters, ``{}``), rounded as the report shows them."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapters or ()):
            groups.setdefault(name, []).append(i)
        return {name: {k: round(v, 6) for k, v in self.score(
            [outputs[i] for i in idx], [references[i] for i in idx],
            [masks[i] for i in idx]).items()} for name, idx in groups.items()}

    def met(self, score: dict[str, float]) -> bool:
        return ((self.min_cos is None or score["cosine"] >= self.min_cos)
                and (self.max_kld is None or score["kld"] <= self.max_kld))

    def share(self, layer: LayerError) -> float:
        """How much of this floor's room one layer's quantization uses up alone: its cosine
        effect over 1 − min_cos, or its KL effect over max_kld, whichever is larger. Ranking by
        it puts first the layers the bound that binds suffers from: a cosine ranking on a
        language model misses the ones that move which token wins."""
        cos = layer.end_to_end / (1.0 - self.min_cos) if self.min_cos and self.min_cos < 1 else (
            layer.end_to_end if self.min_cos is not None else 0.0)
        kld = (layer.end_to_end_kld / self.max_kld
               if self.max_kld and layer.end_to_end_kld is not None else 0.0)
        return max(cos, kld)

    def with_room(self, searched: dict[str, float], device: dict[str, float]) -> str | None:
        """The floor (``min_cos=...,max_kld=...``) that leaves room for a device's shortfall:
        each bound ``device`` misses, moved by how much worse the device measured than
        ``searched`` (ONNX Runtime on the same held-out samples), rounded outward at 1e-4.
        A search held to it keeps layers until ONNX Runtime clears the device's difference
        too (about: keeping more layers changes the difference). None where no bound can move
        that far (a cosine at 1, a KL bound at 0)."""
        parts = []
        if self.min_cos is not None and device["cosine"] < self.min_cos:
            room = max(searched["cosine"] - device["cosine"], 0.0)
            tighter = math.ceil((self.min_cos + room) * 1e4 - 1e-6) / 1e4
            if tighter >= 1:
                return None
            parts.append(f"min_cos={tighter:g}")
        if self.max_kld is not None and device["kld"] > self.max_kld:
            room = max(device["kld"] - searched.get("kld", 0.0), 0.0)
            tighter = math.floor((self.max_kld - room) * 1e4 + 1e-6) / 1e4
            if tighter <= 0:
                return None
            parts.append(f"max_kld={tighter:g}")
        return ",".join(parts) or None

    def describe(self) -> str:
        parts = ([f"min_cos={self.min_cos:g}"] if self.min_cos is not None else []) + (
            [f"max_kld={self.max_kld:g}"] if self.max_kld is not None else [])
        return " and ".join(parts)


def search_exclusions(ranked: Sequence[LayerError], measure: Callable[[int], dict[str, float]],
                      met: Callable[[dict[str, float]], bool]
                      ) -> tuple[int, dict[str, float], list[dict[str, Any]]]:
    """The smallest k (keeping the k most sensitive nodes in high precision) whose measured
    score (``Floor.score``) ``met`` accepts: doubling, then bisection. Returns (k, its score,
    probes)."""
    probes: list[dict[str, Any]] = []

    def probe(k: int) -> dict[str, float]:
        score = measure(k)
        probes.append({"kept": k, **{m: round(v, 6) for m, v in score.items()}})
        return score

    n = len(ranked)
    s0 = probe(0)
    if met(s0) or n == 0:
        return 0, s0, probes
    lo, hi, hi_score = 0, None, None
    k, last = 1, s0
    while k <= n:
        last = probe(k)
        if met(last):
            hi, hi_score = k, last
            break
        lo = k
        k = n if k == n else min(2 * k, n)
        if lo == n:
            break
    if hi is None:  # even every candidate kept does not reach the floor: keep them all
        return n, last, probes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = probe(mid)
        if met(c):
            hi, hi_score = mid, c
        else:
            lo = mid
    return hi, hi_score, probes
