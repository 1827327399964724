"""LoRA branch folding: a graph exported with its LoRA branches still in it becomes one MatMul.

    Add(MatMul(x, W), Mul(MatMul(MatMul(x, A), B), s))  ⇒  MatMul(x, W + s·A·B)
    Add(MatMul(x, W), MatMul(MatMul(x, A), B))          ⇒  MatMul(x, W + A·B)

(W [in, out], A [in, r], B [r, out] constant initializers, s a constant scalar; Add and Mul in
either operand order.) This is what PEFT's forward ``base(x) + lora_B(lora_A(x))·scaling``
exports to; several active adapters fold one after another. The rewrite is exact up to fp32
rounding (``exact = True``, checked by ``--check``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["RULES", "LoraFoldPass", "count_lora_branches"]


def _const2d(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None or len(v.const_value.shape) != 2:
        return None
    return v.const_value.numpy()


class _FoldBase(pattern.RewriteRuleClassBase):
    def check(self, context, x, w, a, b, s=None, **_) -> MatchResult:
        result = MatchResult()
        W, A, B = _const2d(w), _const2d(a), _const2d(b)
        if W is None or A is None or B is None:
            return result.fail("W, A and B must be constant 2-D initializers")
        if A.shape[0] != W.shape[0] or B.shape[1] != W.shape[1] or A.shape[1] != B.shape[0]:
            return result.fail(f"shapes W{W.shape} A{A.shape} B{B.shape} are not a LoRA branch")
        if A.shape[1] >= min(W.shape):
            return result.fail("the branch is not low-rank")
        if s is not None and (s.const_value is None or s.const_value.size != 1):
            return result.fail("the LoRA scale must be a constant scalar")
        return result

    def _fold(self, op, x, w, a, b, scale: float):
        W = w.const_value.numpy()
        delta = (a.const_value.numpy() @ b.const_value.numpy()) * np.float32(scale)
        merged = (W + delta.astype(W.dtype)).astype(W.dtype)
        if len(w.uses()) == 1 and w.is_initializer():  # the parameter map keeps pointing at W
            w.const_value = ir.tensor(merged, name=w.name)
            return op.MatMul(x, w)
        return op.MatMul(x, op.initializer(ir.tensor(merged), name=f"{w.name}_lora_folded"))


class FoldScaledBranch(_FoldBase):
    def pattern(self, op, x, w, a, b, s):
        return op.Add(op.MatMul(x, w), op.Mul(op.MatMul(op.MatMul(x, a), b), s))

    def rewrite(self, op, x, w, a, b, s):
        return self._fold(op, x, w, a, b, float(s.const_value.numpy().reshape(())))


class FoldBranch(_FoldBase):
    def pattern(self, op, x, w, a, b):
        return op.Add(op.MatMul(x, w), op.MatMul(op.MatMul(x, a), b))

    def rewrite(self, op, x, w, a, b):
        return self._fold(op, x, w, a, b, 1.0)


RULES = pattern.RewriteRuleSet([FoldScaledBranch.rule(), FoldBranch.rule()], commute=True)


def count_lora_branches(model: ir.Model) -> int:
    """How many foldable branches the graph has (matching only, nothing is changed)."""
    n = 0
    for node in model.graph:
        if node.op_type != "Add":
            continue
        for rule in RULES:
            if rule.match(model, model.graph, node, check_nodes_are_removable=False):
                n += 1
                break
    return n


class LoraFoldPass(EdgecPass):
    name = "lora-fold"
    exact = True
    rtol = 1e-4

    def call(self, model: ir.Model) -> PassResult:
        nodes = len(model.graph)
        folded = 0
        for _ in range(16):  # one sweep folds one adapter per site; stacked adapters need more
            count = RULES.apply_to_model(model)
            folded += count
            if not count:
                break
        if folded:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return PassResult(model, folded > 0, {"branches_folded": folded,
                                              "nodes_removed": nodes - len(model.graph)})
