"""LoRA branch folding: a graph exported with its LoRA branches still in it becomes one MatMul.

    Add(MatMul(x, W), Mul(MatMul(MatMul(x, A), B), s))  ⇒  MatMul(x, W + s·A·B)
    Add(MatMul(x, W), MatMul(MatMul(x, A), B))          ⇒  MatMul(x, W + A·B)

(W [in, out], A [in, r], B [r, out] constant initializers, s a constant scalar; Add and Mul in
either operand order.) This is what PEFT's forward ``base(x) + lora_B(lora_A(x))·scaling``
exports to; several active adapters fold one after another. A Linear on 2-D inputs exports as
Gemm and a Conv layer's branch as two Convs (lora_A with the base's kernel, strides, pads and
dilations; lora_B 1×1), folded the same way:

    Add(Gemm(x, W, c), Mul(Gemm(Gemm(x, A), B), s))      ⇒  Gemm(x, W + s·B·A, c)
    Add(Conv(x, W, c), Mul(Conv(Conv(x, A), B), s))      ⇒  Conv(x, W + s·(B·A reshaped), c)

The rewrite is exact up to fp32 rounding (``exact = True``, checked by ``--check``).
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
        if _layer_branch(node) is not None:
            n += 1
            continue
        for rule in RULES:
            if rule.match(model, model.graph, node, check_nodes_are_removable=False):
                n += 1
                break
    return n


def _attrs(node: ir.Node) -> dict:
    return {a.name: a.value for a in node.attributes.values()}


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _layer_branch(add: ir.Node):
    """(base node, A, B, scale) where ``add`` is a Gemm's or Conv's output plus its LoRA branch
    (see the module docstring), else None."""
    if len(add.inputs) != 2 or any(v is None or v.producer() is None for v in add.inputs):
        return None
    for base_v, branch_v in (add.inputs, add.inputs[::-1]):
        base, top = base_v.producer(), branch_v.producer()
        if base.op_type not in ("Gemm", "Conv") or len(base_v.uses()) != 1:
            continue
        scale = 1.0
        if top.op_type == "Mul":
            consts = [_const(v) for v in top.inputs]
            k = next((i for i, c in enumerate(consts) if c is not None and c.size == 1), None)
            if k is None or top.inputs[1 - k].producer() is None:
                continue
            scale, top = float(consts[k].reshape(())), top.inputs[1 - k].producer()
        inner = top.inputs[0].producer() if top.inputs and top.inputs[0] is not None else None
        if top.op_type != base.op_type or inner is None or inner.op_type != base.op_type:
            continue
        if inner.inputs[0] is not base.inputs[0] or len(top.inputs) > 2 or len(inner.inputs) > 2:
            continue  # the branch reads the base's input; lora_A / lora_B carry no bias
        W, A, B = _const(base.inputs[1]), _const(inner.inputs[1]), _const(top.inputs[1])
        if W is None or A is None or B is None:
            continue
        if base.op_type == "Gemm":
            if any(_attrs(n).get("transA", 0) or _attrs(n).get("alpha", 1.0) != 1.0
                   for n in (base, inner, top)) or W.ndim != 2:
                continue
        elif not _conv_branch(base, inner, top, W, A, B):
            continue
        return base, inner, top, scale
    return None


def _conv_branch(base: ir.Node, inner: ir.Node, top: ir.Node, W, A, B) -> bool:
    """lora_A convolves as the base does (same attributes, same kernel); lora_B is 1×1 with
    the defaults; no groups."""
    if _attrs(inner) != _attrs(base) or _attrs(base).get("group", 1) != 1:
        return False
    b_attrs = _attrs(top)
    plain = all(v == 1 for k in ("strides", "dilations") for v in b_attrs.get(k, [1])) and \
        not any(b_attrs.get("pads", [0])) and b_attrs.get("group", 1) == 1 and \
        b_attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    return (plain and A.shape[1:] == W.shape[1:] and B.shape[0] == W.shape[0]
            and B.shape[1] == A.shape[0] and all(d == 1 for d in B.shape[2:]))


def _as_read(m: np.ndarray, gemm: ir.Node) -> np.ndarray:
    """A Gemm's second input as the product reads it (transposed where ``transB``); its own
    inverse."""
    return m.T if _attrs(gemm).get("transB", 0) else m


def _fold_layer_branches(model: ir.Model) -> int:
    """Fold every Gemm / Conv LoRA branch (``_layer_branch``) into its base weight."""
    folded = 0
    for add in list(model.graph):
        out = add.outputs[0]
        if add.op_type != "Add" or not (out.uses() or out.is_graph_output()):
            continue  # a branch folded in an earlier sweep, its nodes not yet removed
        found = _layer_branch(add)
        if found is None:
            continue
        base, inner, top, scale = found
        w = base.inputs[1]
        W, A, B = (v.const_value.numpy() for v in (w, inner.inputs[1], top.inputs[1]))
        if base.op_type == "Gemm":  # as [in, out] whatever each node's transB
            delta = (_as_read(A, inner) @ _as_read(B, top)) * np.float32(scale)
            delta = _as_read(delta, base)  # back into the base weight's layout
        else:
            delta = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W.shape) * \
                np.float32(scale)
        merged = (W + delta.astype(W.dtype)).astype(W.dtype)
        if len(w.uses()) == 1 and w.is_initializer():  # the parameter map keeps pointing at W
            w.const_value = ir.tensor(merged, name=w.name)
        else:
            new = ir.Value(name=f"{w.name}_lora_folded", const_value=ir.tensor(merged),
                           shape=ir.Shape(merged.shape), type=w.type)
            model.graph.register_initializer(new)
            base.replace_input_with(1, new)
        output = out.is_graph_output()
        out.replace_all_uses_with(base.outputs[0], replace_graph_outputs=True)
        if output:  # the graph output keeps its name
            name, out.name = out.name, f"{out.name}_lora_branch"
            base.outputs[0].name = name
        folded += 1
    return folded


class LoraFoldPass(EdgecPass):
    name = "lora-fold"
    exact = True
    rtol = 1e-4

    def call(self, model: ir.Model) -> PassResult:
        nodes = len(model.graph)
        folded = 0
        for _ in range(16):  # one sweep folds one adapter per site; stacked adapters need more
            count = RULES.apply_to_model(model) + _fold_layer_branches(model)
            folded += count
            if not count:
                break
        if folded:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return PassResult(model, folded > 0, {"branches_folded": folded,
                                              "nodes_removed": nodes - len(model.graph)})
