"""qnn-fuse-rmsnorm: each decomposed RMSNorm on the residual stream becomes one ``RMSNormalization``
op (ONNX opset 23).

    x → Pow(x, 2) → ReduceMean(last axis) → Add(eps) → Sqrt → Div(1, ·) → Mul(x, ·) [→ Mul(γ)]
                                                      ⇒  RMSNormalization(x, γ or ones)

Why, measured on SmolLM2-135M-Instruct (30 layers, trained weights) on the HTP: its first token
carries a massive activation (|x| up to 2.5e4 in two residual channels from layer 12 on, against
at most ~200 on the other tokens), so the mean square a decomposed norm computes spans 18 to
1.1e6 across the tokens of one tensor. Quantized per tensor, that intermediate has a step of
4,400 at 8 bits (17 at 16 bits): every ordinary token's mean square rounds to 0, its
1/sqrt(0 + eps) is ~300 times too large, and the whole decoder's logits lost all resemblance to
fp32 (cosine 0.004, perplexity 1.7e15). No precision choice per tensor can hold that range; the
fused op keeps the intermediates inside one HTP kernel, so only its input (the 16-bit residual)
and its output are quantized. The HTP runs it when input and output have the same width (16/16
or 8/8; a 16-bit input with an 8-bit output fails to finalize, QNN_COMMON_ERROR_MEM_ALLOC), which
``select`` arranges (``norm_outputs``).

Only norms that read a residual sum (an ``Add`` output, which ``select`` keeps at 16 bits) are
fused: a norm on an 8-bit tensor (video-dit's QK norms) ran at 8 in / 8 out less accurately than
its decomposed form on the HTP (the DiT's worst output cosine 0.958 → 0.950, ONNX Runtime on both
graphs 0.957), and its input's 8 bits bound the mean square's spread anyway.

The model is converted to opset 23 first when it is older (``onnxscript``'s version converter);
where that fails the norms stay decomposed and the stats say why. Exact in fp32 (the same
operations in one kernel; ONNX Runtime's CPU kernel computes in float32 as the exporter's graph
does), ``rtol`` 1e-5.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes._infra import register_constant as _const
from edgec.graph_passes.rotation.topology import find_norms

__all__ = ["FuseRmsNormPass", "RMS_OPSET"]

logger = logging.getLogger(__name__)

RMS_OPSET = 23  # RMSNormalization's first opset


def _decomposed_rms(graph: ir.Graph):
    """Decomposed RMSNorms reading the residual stream (an ``Add`` output, 16-bit on the NPU)."""
    return [n for n in find_norms(graph) if n.kind == "rms" and n.node.op_type != "RMSNormalization"
            and (n.scale is not None or _width(n.input) is not None)
            and n.input.producer() is not None and n.input.producer().op_type == "Add"]


def _width(value: ir.Value) -> int | None:
    dims = value.shape
    return dims[-1] if dims is not None and len(dims) and isinstance(dims[-1], int) else None


class FuseRmsNormPass(EdgecPass):
    """Fuse decomposed RMSNorms into ``RMSNormalization`` (module docstring)."""

    name = "qnn-fuse-rmsnorm"
    exact = True
    rtol = 1e-5

    def call(self, model: ir.Model) -> PassResult:
        norms = _decomposed_rms(model.graph)
        if not norms:
            return PassResult(model, False, {"rmsnorms_fused": 0})
        opset = model.opset_imports.get("", 0)
        if opset < RMS_OPSET:
            from onnxscript.version_converter import ConvertVersionPass

            try:
                ConvertVersionPass(target_version=RMS_OPSET, fallback=True)(model)
            except Exception as e:  # noqa: BLE001 — reported: the norms stay as they are
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                logger.warning("qnn-fuse-rmsnorm: opset %d → %d failed (%s); RMSNorms stay "
                               "decomposed", opset, RMS_OPSET, why)
                return PassResult(model, False, {"rmsnorms_fused": 0, "skipped": why})
            norms = _decomposed_rms(model.graph)  # the converter rebuilt nodes
        graph = model.graph
        for k, norm in enumerate(norms):
            scale = norm.scale
            if scale is None:  # γ folded away (a rotation): RMSNormalization needs one
                dtype = norm.input.dtype.numpy() if norm.input.dtype is not None else np.float32
                scale = _const(graph, f"{norm.node.name}_rms_ones",
                               np.ones(_width(norm.input), dtype))
            fused = ir.node("RMSNormalization", [norm.input, scale],
                            attributes={"axis": -1, "epsilon": float(norm.eps)},
                            name=f"{norm.node.name}_rmsnorm")
            last = norm.scale_node if norm.scale_node is not None else norm.node
            graph.insert_after(last, fused)
            out, new = norm.output, fused.outputs[0]
            new.name, new.shape = f"{out.name}_rms", out.shape
            new.type = out.type if out.type is not None else norm.input.type
            if out.is_graph_output():  # the graph output keeps its name
                name = out.name
                out.name = f"{name}_decomposed_{k}"
                new.name = name
            ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return PassResult(model, True, {"rmsnorms_fused": len(norms),
                                        "opset": model.opset_imports.get("", 0)})
