"""``Transpose(W)`` ⇒ ``Wᵀ`` for ``W`` an initializer: the weight as its own constant.

A head tied to the embedding table reads it through a Transpose. The HTP refused that Transpose
at 16 bits (qnn-htp's legalization), and weight-only quantization saw no weight to quantize there
(``blockwise``: the head stayed float, and the whole float table with it). Pure data movement,
bit exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

__all__ = ["FoldWeightTranspose"]


class FoldWeightTranspose(pattern.RewriteRuleClassBase):
    """Transpose(W) ⇒ Wᵀ for W an initializer (module docstring)."""

    def pattern(self, op, w):
        return op.Transpose(w, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, w, **_) -> MatchResult:
        result = MatchResult()
        if w.const_value is None or not w.is_initializer() or w.is_graph_input():
            return result.fail("the transposed value is not an initializer", w)
        return result

    def rewrite(self, op, w, out):
        data = w.const_value.numpy()
        perm = out.producer().attributes.get_ints("perm", None)
        folded = np.ascontiguousarray(np.transpose(data, perm))  # no perm: reversed axes
        return op.initializer(ir.tensor(folded), name=f"{out.name}_folded")
