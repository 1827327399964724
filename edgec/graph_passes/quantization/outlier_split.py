"""Outlier-channel split of FFN down projections (``--quantize w8a8:split=R``), exact in float.

A trained decoder's SwiGLU output carries *massive activations* in a few channels: SmolLM2-135M's
layer 11 down projection reads channel 1229 at up to 3080 and channel 1487 at up to 1964 (on the
first token and on others), where the median channel peaks near 1. One per-tensor grid over that
input leaves the other 1534 channels a handful of levels at 8 bits, and the HTP's 16-bit MatMul
loses precision where such a spike sets its range (README, "A real LLaMA-family decoder").
LLM.int8() answers this by computing the outlier feature dimensions apart; here that is a graph
rewrite: the FFN is a sum over its inner channels, so the channels J whose calibrated peak is at
least ``ratio`` × the median channel's go to a branch of their own:

    y = act(x·W_g, x·W_u)·W_d
      = act(x·W_g[:, R], x·W_u[:, R])·W_d[R, :]  +  act(x·W_g[:, J], x·W_u[:, J])·W_d[J, :]

(R the other channels; ``act`` any elementwise function of the projections, SwiGLU or GELU), so
each branch's tensors get their own ranges. The outlier branch's nodes are tagged
(``OUTLIER_TAG``): float on the CPU targets and TensorRT (a K=|J| MatMul: nearly free), 16-bit on
a fully quantized target. Peaks come from the source's generated calibration samples (seeded, as
SmoothQuant's), at most ``MAX_SHARE`` of a projection's channels are split, and a down projection
whose input is not an elementwise function of Linears reading one tensor is left alone (reported).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["OutlierSplitPass", "OUTLIER_TAG", "outlier_channels"]

OUTLIER_TAG = "edgec.outlier_split"
MAX_SHARE = 1 / 64  # at most this share of a down projection's input channels are split off
_ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "Silu",
                "HardSigmoid", "HardSwish", "Softplus", "Pow", "Sqrt", "Neg", "Identity"}


def outlier_channels(peaks: np.ndarray, ratio: float, max_share: float = MAX_SHARE) -> np.ndarray:
    """Indices (sorted) of the channels whose peak is ≥ ``ratio`` × the median channel's peak,
    the largest ``max_share`` of all channels at most."""
    peaks = np.asarray(peaks, np.float64)
    median = float(np.median(peaks))
    if median <= 0:
        return np.zeros(0, np.int64)
    big = np.flatnonzero(peaks >= ratio * median)
    cap = max(1, int(len(peaks) * max_share))
    return np.sort(big[np.argsort(-peaks[big])][:cap])


class OutlierSplitPass(EdgecPass):
    name = "outlier-split"
    exact = True
    rtol = 1e-4

    def __init__(self, ratio: float, src, samples: Sequence[dict] | None = None):
        super().__init__()
        self.ratio, self.src, self.samples = ratio, src, samples

    def call(self, model: ir.Model) -> PassResult:
        from edgec.graph_passes.quantization.smooth import channel_peaks
        from edgec.graph_passes.rotation.topology import analyze

        sites, skipped = [], []
        for down in analyze(model.graph).ffn_down:
            branch = _branch(down)
            if isinstance(branch, str):
                skipped.append({"node": down.node.name, "reason": branch})
            else:
                sites.append((down, *branch))
        stats = {"ratio": self.ratio, "split": [], "skipped": skipped}
        if not sites:
            return PassResult(model, False, stats)
        peaks = channel_peaks(model, [d.input.name for d, _, _ in sites], self.src, self.samples)
        for (down, linears, nodes), peak in zip(sites, peaks):
            keep = outlier_channels(peak, self.ratio)
            if len(keep) == 0:
                continue
            _split(model.graph, down, linears, nodes, keep)
            rest = np.delete(peak, keep)
            stats["split"].append({"node": down.node.name, "channels": keep.tolist(),
                                   "peak": round(float(peak[keep].max()), 3),
                                   "rest_peak": round(float(rest.max()), 3)})
        return PassResult(model, bool(stats["split"]), stats)


def _branch(down):
    """(the Linears, the elementwise nodes in graph order) that make ``down``'s input, or why
    the FFN cannot be split."""
    from edgec.graph_passes.rotation.topology import as_linear

    if down.node.op_type != "MatMul" or down.bias_node is not None or down.lora_add is not None:
        return "the down projection is not a plain MatMul with a constant weight"
    linears, nodes, seen, todo = {}, {}, set(), [down.input]
    source = None
    while todo:
        v = todo.pop()
        if v.name in seen:
            continue
        seen.add(v.name)
        p = v.producer()
        lin = as_linear(p) if p is not None and p.op_type == "MatMul" else None
        if lin is not None and lin.bias_node is None and lin.lora_add is None \
                and lin.transposed_source is None:
            if source is not None and lin.input is not source:
                return "the projections feeding it read different tensors"
            source = lin.input
            linears[p.name] = lin
            continue
        if p is None or p.op_type not in _ELEMENTWISE or p.domain not in ("", "ai.onnx"):
            return f"its input is made by {p.op_type if p else 'a graph input'}, not elementwise"
        nodes[p.name] = p
        for i in p.inputs:
            if i is None:
                continue
            if i.const_value is not None:
                if i.const_value.size != 1:
                    return f"{p.name} reads a per-channel constant"
                continue
            todo.append(i)
    if not linears:
        return "no projection feeds it"
    inside = set(nodes) | {down.node.name}
    for n in (*nodes.values(), *(lin.node for lin in linears.values())):
        for use in n.outputs[0].uses():
            if use.node.name not in inside or n.outputs[0].is_graph_output():
                return f"{n.outputs[0].name} is also read outside the FFN"
    order = [n for n in down.node.graph if n.name in nodes]
    return list(linears.values()), order


def _split(graph: ir.Graph, down, linears, nodes, keep: np.ndarray) -> None:
    """Rewrite in place: the projections keep the channels not in ``keep``; a tagged copy of
    the FFN computes ``keep``'s, and an Add joins the two down projections' outputs."""
    from edgec.graph_passes.rotation.edit import WeightEditor
    from edgec.graph_passes.rotation.topology import const_array

    editor = WeightEditor(graph)

    def outlier_part(lin, rows: np.ndarray) -> ir.Value:
        """``rows`` (the weight's part for the split channels) as a constant of its dtype."""
        dtype = const_array(lin.node.inputs[1]).dtype
        return editor.constant(np.ascontiguousarray(rows.astype(dtype)),
                               lin.node.inputs[1].name, "_outliers")

    mapped: dict[int, ir.Value] = {}  # id(value in the kept FFN) → its outlier-branch copy

    def copy(node: ir.Node, inputs: list, like: ir.Value) -> ir.Node:
        new = ir.Node(node.domain, node.op_type, inputs, attributes=list(
            node.attributes.values()), name=editor.fresh(node.name, "_outliers"))
        new.metadata_props[OUTLIER_TAG] = "outlier channels"
        new.outputs[0].name = editor.fresh(like.name, "_outliers")
        new.outputs[0].dtype, new.outputs[0].shape = like.dtype, like.shape
        return new

    for lin in linears:
        w = editor.weight(lin)
        editor.set_weight(lin, np.delete(w, keep, axis=1))
        new = copy(lin.node, [lin.input, outlier_part(lin, w[:, keep])], lin.output)
        graph.insert_after(lin.node, new)
        mapped[id(lin.output)] = new.outputs[0]
    for n in nodes:
        new = copy(n, [mapped.get(id(i), i) for i in n.inputs], n.outputs[0])
        graph.insert_after(n, new)
        mapped[id(n.outputs[0])] = new.outputs[0]
    w = editor.weight(down)
    editor.set_weight(down, np.delete(w, keep, axis=0))
    out = down.node.outputs[0]
    branch = copy(down.node, [mapped[id(down.input)], outlier_part(down, w[keep])], out)
    uses = list(out.uses())
    join = ir.node("Add", [out, branch.outputs[0]], name=editor.fresh(down.node.name, "_join"))
    join.outputs[0].dtype, join.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(down.node, [branch, join])
    for user, index in uses:
        user.replace_input_with(index, join.outputs[0])
    if out.is_graph_output():  # the graph output keeps its name, now on the sum
        idx = [i for i, g in enumerate(graph.outputs) if g is out][0]
        join.outputs[0].name, out.name = out.name, editor.fresh(out.name, "_rest")
        graph.outputs[idx] = join.outputs[0]
    else:
        join.outputs[0].name = editor.fresh(out.name, "_joined")
    editor.flush()
    for v in (*(lin.output for lin in linears), *(n.outputs[0] for n in nodes)):
        _last_dim(v, w.shape[0] - len(keep))  # the kept FFN is narrower now
    for v in mapped.values():
        _last_dim(v, len(keep))


def _last_dim(v: ir.Value, size: int) -> None:
    if v.shape is not None and len(v.shape):
        v.shape = ir.Shape([*list(v.shape)[:-1], size])
