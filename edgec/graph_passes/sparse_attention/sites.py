"""Attention sites in a graph, as onnxscript pattern rules (one class per form, tried in order):

    MatMul(Mul(Q,a), Mul(Kᵀ,b)) → Softmax → MatMul(·,V) ⇒ site(Q·ab, K, V)      SplitScaleScores
    MatMul(Q,Kᵀ)·s | MatMul(Q,Kᵀ)/s → Softmax → MatMul(·,V) ⇒ site(Q·s | Q/s, K, V)  ScaledScores
    MatMul(Q,Kᵀ) → Softmax → MatMul(·,V) ⇒ site(Q, K, V)                        UnscaledScores
    Attention(Q, K, V) ⇒ site(Q·scale, K, V), scale = its attribute or 1/√d          AttentionOp
    any of the three forms + Add(·, mask) → Softmax → MatMul(·,V) ⇒ site with mask   Masked*
    Add(other scores, mask) → Softmax → MatMul(·,V) ⇒ dense: "additive mask"     MaskedScores
    any other scores → Softmax → MatMul(·,V) ⇒ dense, with the reason           OtherScores

a, b, s are constant scalars (dynamo's SDPA splits √scale onto Q and Kᵀ); the softmax is over
the last axis; Attention (opset 23) is 4-D, same head counts, no mask/past/causal/softcap. Kᵀ is
read back to K through ``Transpose(K, perm=[0,1,3,2])`` or the exporter's ``Reshape([B·H,N,d])
→ Transpose(0,2,1) → Reshape([B,H,d,N])``, else an explicit Transpose is added. Q carries the
whole score scale, so ``softmax(q·kᵀ)·v`` is the site's output. The sparse rewrite is a whole
subgraph (``builder``), not a local one, so the rules only match; a node no rule matches counts
the reason of the rule whose check failed after matching the most nodes (the most specific).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

__all__ = ["AttentionSite", "find_attention_sites", "static_dim"]


@dataclasses.dataclass
class AttentionSite:
    q: ir.Value          # Q [B,H,N,d] carrying the whole score scale (softmax(q·kᵀ) is exact)
    k: ir.Value          # K [B,H,N,d] (a Transpose of Kᵀ added to the graph if needed)
    v: ir.Value
    softmax: ir.Node     # the Softmax, or the Attention op itself
    output: ir.Value     # the dense attention output this site replaces
    anchor: ir.Node      # the final MatMul
    mask: ir.Value | None = None  # additive mask added to q·kᵀ (broadcast to [B,H,N,N])


def _const_scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return float(tensor.numpy().reshape(())) if tensor is not None and tensor.size == 1 else None


def _not_4d(*values: ir.Value) -> bool:
    return any(x.shape is None or len(x.shape) != 4 for x in values)


def _verdict(*reasons: str | None) -> MatchResult:
    """Fails with the first reason given (a check lists them in the order they are reported)."""
    reason = next((r for r in reasons if r), None)
    return MatchResult().fail(reason) if reason else MatchResult()


def _reason(probs: ir.Value, scales=(), qkv=()) -> str | None:
    """The first failing check of a Softmax form: axis, then score scale, then Q/K/V ranks."""
    softmax = probs.producer()
    rank = len(softmax.inputs[0].shape) if softmax.inputs[0].shape is not None else None
    if rank is None or softmax.attributes.get_int("axis", -1) not in (-1, rank - 1):
        return "softmax not over the last axis"
    if any(_const_scalar(s) is None for s in scales):
        return "score scale is not a constant scalar"
    return "Q/K/V not 4-D [B,H,N,d]" if _not_4d(*qkv) else None


class _SiteRule(pattern.RewriteRuleClassBase):
    """Match-only: applied as a rewrite rule it declines; the pass builds the sparse subgraph.

    A Softmax form binds q, kt, v and the constant scalars named in ``scales``."""

    scales: tuple[str, ...] = ()

    def check(self, context, probs, q, kt, v, **m) -> MatchResult:
        return _verdict(_reason(probs, [m[s] for s in self.scales], (q, kt, v)))

    def rewrite(self, op, **_):
        return MatchResult().fail("attention sites are rewritten by SparseAttentionPass")

    def site(self, m: dict, root: ir.Node) -> dict:
        """q, kt (or k), v, the score scale and the mask, from a successful match's bindings."""
        scale = math.prod(_const_scalar(m[s]) for s in self.scales)
        return {"q": m["q"], "kt": m["kt"], "v": m["v"], "scale": scale, "mask": m.get("mask")}


class SplitScaleScores(_SiteRule):
    scales = ("a", "b")  # (Q·a)(Kᵀ·b) = (Q·ab)Kᵀ

    def pattern(self, op, q, a, kt, b, v):
        scores = op.MatMul(op.Mul(q, a), op.Mul(kt, b))
        return op.MatMul(op.Softmax(scores, _outputs=["probs"]), v)


class ScaledScores(_SiteRule):
    scales = ("s",)

    def pattern(self, op, q, kt, s, v):
        qk = op.MatMul(q, kt)
        scores = pattern.OrValue([op.Mul(qk, s), op.Div(qk, s)], tag_var="div",
                                 tag_values=[False, True])
        return op.MatMul(op.Softmax(scores, _outputs=["probs"]), v)

    def site(self, m: dict, root: ir.Node) -> dict:
        site = super().site(m, root)
        return {**site, "scale": 1.0 / site["scale"] if m["div"] else site["scale"]}


class UnscaledScores(_SiteRule):
    def pattern(self, op, q, kt, v):
        return op.MatMul(op.Softmax(op.MatMul(q, kt), _outputs=["probs"]), v)


class MaskedSplitScaleScores(SplitScaleScores):
    def pattern(self, op, q, a, kt, b, mask, v):
        scores = op.Add(op.MatMul(op.Mul(q, a), op.Mul(kt, b)), mask)
        return op.MatMul(op.Softmax(scores, _outputs=["probs"]), v)


class MaskedScaledScores(ScaledScores):
    def pattern(self, op, q, kt, s, mask, v):
        qk = op.MatMul(q, kt)
        scores = pattern.OrValue([op.Mul(qk, s), op.Div(qk, s)], tag_var="div",
                                 tag_values=[False, True])
        return op.MatMul(op.Softmax(op.Add(scores, mask), _outputs=["probs"]), v)


class MaskedUnscaledScores(UnscaledScores):
    def pattern(self, op, q, kt, mask, v):
        return op.MatMul(op.Softmax(op.Add(op.MatMul(q, kt), mask), _outputs=["probs"]), v)


class MaskedScores(_SiteRule):
    """A mask added to scores of none of the forms above: stays dense, says so."""

    def pattern(self, op, scores, mask, v):
        return op.MatMul(op.Softmax(op.Add(scores, mask), _outputs=["probs"]), v)

    def check(self, context, probs, **_) -> MatchResult:
        return _verdict(_reason(probs), "additive mask")


class OtherScores(_SiteRule):
    """Any other Softmax → MatMul(·, V): only says why it is none of the forms above."""

    def pattern(self, op, scores, v):
        return op.MatMul(op.Softmax(scores, _outputs=["probs"]), v)

    def check(self, context, probs, scores, **_) -> MatchResult:
        node = scores.producer()
        scaled = node is not None and node.op_type in ("Mul", "Div") and node.domain == ""
        return _verdict(_reason(probs, node.inputs[1:2] if scaled else ()),
                        "scores not produced by MatMul(Q, Kᵀ)")


class AttentionOp(_SiteRule):
    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, _allow_other_inputs=True)

    def check(self, context, q, k, v, **_) -> MatchResult:
        node, attrs = context.root, context.root.attributes
        if any(x is not None for x in node.inputs[3:]):
            return _verdict("Attention op with mask or past key/value")
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return _verdict("Attention op present key/value outputs are used")
        if any(attrs[a].value for a in ("is_causal", "softcap", "qk_matmul_output_mode")
               if a in attrs):
            return _verdict("Attention op with is_causal / softcap / qk output")
        if _not_4d(q, k, v):
            return _verdict("Attention op inputs not 4-D [B,H,N,d]")
        if q.shape[1] != k.shape[1]:
            return _verdict("Attention op with grouped key/value heads")
        no_scale = attrs.get_float("scale", None) is None
        return _verdict(no_scale and not isinstance(q.shape[3], int) and "head dim not static")

    def site(self, m: dict, root: ir.Node) -> dict:
        scale = root.attributes.get_float("scale", None)
        scale = 1.0 / math.sqrt(m["q"].shape[3]) if scale is None else scale
        return {"q": m["q"], "k": m["k"], "v": m["v"], "scale": scale}


class TransposedK(pattern.PatternBase):
    def pattern(self, op, k):
        return op.Transpose(k, perm=[0, 1, 3, 2])


class ReshapedTransposedK(pattern.PatternBase):
    """The dynamo exporter's Kᵀ: the last two axes swapped on a [B·H, N, d] view of K."""

    def pattern(self, op, k, flat_shape, shape):
        flat = op.Transpose(op.Reshape(k, flat_shape), perm=[0, 2, 1])
        return op.Reshape(flat, shape, _outputs=["kt"])

    def check(self, context, k, kt, **_) -> MatchResult:
        # the target shapes are computed, so K's and Kᵀ's inferred dims must show the swap
        same = not _not_4d(k, kt) and list(k.shape.dims) == [
            *kt.shape.dims[:2], kt.shape.dims[3], kt.shape.dims[2]]
        return _verdict(not same and "Kᵀ reshape does not give back K [B,H,N,d]")


SOFTMAX_RULES = (SplitScaleScores(), ScaledScores(), UnscaledScores(), MaskedSplitScaleScores(),
                 MaskedScaledScores(), MaskedUnscaledScores(), MaskedScores(), OtherScores())
ATTENTION_RULES = (AttentionOp(),)
K_PATTERNS = (TransposedK(), ReshapedTransposedK())


def _untransposed(model: ir.Model, kt: ir.Value) -> ir.Value | None:
    """K with ``kt == Transpose(K)`` when Kᵀ's producers show it (saves two copies of K)."""
    for rule in K_PATTERNS if kt.producer() is not None else ():
        match = rule.match(model, model.graph, kt.producer(), check_nodes_are_removable=False)
        if match:
            return match.bindings["k"]
    return None


def static_dim(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _match_site(model: ir.Model, node: ir.Node) -> tuple[ir.Node, dict | None, str]:
    """(root, site, "") for a Softmax or Attention node, or (root, None, why it stays dense):
    the first rule that matches gives the site, else the most specific failed check the reason."""
    root, rules = node, ATTENTION_RULES
    if node.op_type == "Softmax":  # the Softmax rules are rooted at the final MatMul(·, V)
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
            return node, None, "softmax output not consumed by one MatMul(·, V)"
        root, rules = uses[0].node, SOFTMAX_RULES
    tracer = pattern.MatchingTracer()  # match() returns None on a failed check: reason is here
    for rule in rules:
        match = rule.match(model, model.graph, root, check_nodes_are_removable=False,
                           tracer=tracer)
        if match:
            return root, rule.site(match.bindings, root), ""
    failed = [info.match_result for infos in tracer.best_matches_map.values() for info in infos
              if info.status == pattern.MatchStatus.CONDITION_FAILED]
    best = max(failed, key=lambda m: len(m.nodes), default=None)  # ties: the earlier rule
    return root, None, best.reason if best is not None else "not an attention form"


def _drop_nan_guards(model: ir.Model) -> None:
    """``Where(IsNaN(p), 0, p)`` after ``p = Softmax(Add(s, M))`` ⇒ ``p`` when M is a constant
    mask that leaves every row a visible key (then p has no NaN and the guard is the identity)."""
    from edgec.graph_passes.sparse_attention.mask import MASKED, mask_array

    for node in list(model.graph):
        if node.op_type != "Where" or node.domain != "" or len(node.inputs) != 3:
            continue
        cond, zero, p = node.inputs
        guard, softmax = cond.producer(), p.producer()
        if (guard is None or guard.op_type != "IsNaN" or guard.inputs[0] is not p
                or softmax is None or softmax.op_type != "Softmax"
                or _const_scalar(zero) != 0.0):
            continue
        add = softmax.inputs[0].producer()
        if add is None or add.op_type != "Add":
            continue
        m, _ = mask_array(model, add.inputs[1])
        if m is None or m.ndim < 1 or not (m > MASKED).any(axis=-1).all():
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], p)
        model.graph.remove(node, safe=True)
        if not guard.outputs[0].uses():
            model.graph.remove(guard, safe=True)


def find_attention_sites(model: ir.Model) -> tuple[list[AttentionSite], Counter]:
    """Attention sites of the main graph (adds a Transpose Kᵀ→K per site), and skip reasons."""
    sites, skipped = [], Counter()
    _drop_nan_guards(model)
    for node in list(model.graph):
        if node.domain != "" or node.op_type not in ("Softmax", "Attention"):
            continue
        root, m, reason = _match_site(model, node)
        if m is None:
            skipped[reason] += 1
            continue
        tape = ir.tape.Tape()
        k = m["k"] if "k" in m else _untransposed(model, m["kt"])
        if k is None:  # unknown producer: transpose back explicitly
            kt = m["kt"]
            k = tape.op("Transpose", [kt], {"perm": [0, 1, 3, 2]})
            k.dtype, k.shape = kt.dtype, ir.Shape([*kt.shape[:2], kt.shape[3], kt.shape[2]])
        q = m["q"]
        if m["scale"] != 1.0:  # Q carries the whole score scale, K's share included
            scale = tape.initializer(ir.tensor(np.array(m["scale"], q.dtype.numpy())),
                                     name=f"{node.name}_sparse_scale")
            q = tape.op("Mul", [q, scale])
            q.dtype, q.shape = m["q"].dtype, m["q"].shape
        model.graph.insert_before(root, tape.nodes)
        for init in tape.initializers:
            model.graph.register_initializer(init)
        sites.append(AttentionSite(q, k, m["v"], node, root.outputs[0], root, m.get("mask")))
    # Kᵀ → K Transposes of sites that end up skipped are removed by the pass's DCE.
    return sites, skipped
