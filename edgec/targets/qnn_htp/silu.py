"""SiLU's multiplicand as its own tensor, for the QNN HTP: x · Sigmoid(x) ⇒ Max(x, x) · Sigmoid(x).

At 16-bit activations the HTP computes a Mul of a tensor by the Sigmoid of that same tensor (the
exporter's SiLU, either operand order) at half its value once the input's range is wide: on the
x86 emulator (onnxruntime-qnn 2.7.0), x of std 2·10⁴ (quantized scale 2.4) was right, std 3·10⁴
and beyond (scale 3.3) came out ×0.500 exactly, at cosine 1.0 against ONNX Runtime on the same QDQ
graph. Adaptive Diffusion Terrain's trained UNet (w8a16) feeds its SiLUs inputs of ±2·10⁵ (scale
28.6), so every such activation was halved and the whole output departed from ONNX Runtime. The
same Mul with the Sigmoid read from another tensor holding the same values is right, as is the
SiLU once its multiplicand is a distinct tensor: Max(x, x) is x bit for bit (in IEEE float and,
calibrated to x's own range, in its QDQ form too); a Reshape to the same shape is not enough (the
HTP sees through it). Costs one elementwise Max per SiLU.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

__all__ = ["SiluOperandCopy"]


class SiluOperandCopy(pattern.RewriteRuleClassBase):
    """Mul(x, Sigmoid(x)) ⇒ Mul(Max(x, x), Sigmoid(x)); the commuted Mul is matched too."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def rewrite(self, op, x):
        copy, gate = op.Max(x, x), op.Sigmoid(x)
        for v in (copy, gate):  # typed at the source: later passes read element types
            v.type, v.shape = x.type, x.shape
        return op.Mul(copy, gate)
