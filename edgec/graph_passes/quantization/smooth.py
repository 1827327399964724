"""SmoothQuant outlier smoothing (``--quantize w8a8:smooth=0.5``), folded so the graph gains no op.

Trained transformers carry a few activation channels 20–100× larger than the rest; per-tensor
8-bit activations cannot hold them. SmoothQuant (Xiao et al. 2023) moves that range into the
weights that read the channel: per input channel j of the Linears a norm feeds,

    s_j = max|X_j|^α / max|W_j|^(1−α),     X' = X·diag(s)⁻¹,   W' = diag(s)·W

(X·W unchanged). Here the division is folded into the norm's own scale γ (and shift β), so a
norm qualifies when its output feeds only Linears with constant weights (pre-norm decoders:
q/k/v and gate/up; the final norm and the LM head). Post-norm encoders (the norm's output is
also the residual stream) and norms without a scale (AdaLN) are listed as skipped with the
reason. ``max|X_j|`` comes from the source's generated calibration samples (seeded, like
DartQuant's), so ``edgec calibrate`` and ``compile --calib`` smooth the same graph identically.
fp32 output is unchanged up to rounding (``exact``, checked per pass with ``--check``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult, register_constant

__all__ = ["SmoothQuantPass", "smoothing_scales", "channel_peaks"]

_CLIP = (1e-5, 1e5)


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α); 1 where either side is zero (nothing to move)."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    live = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[live] = x_max[live] ** alpha / w_max[live] ** (1 - alpha)
    return np.clip(s, *_CLIP)


class SmoothQuantPass(EdgecPass):
    name = "smooth"
    exact = True
    rtol = 1e-4

    def __init__(self, alpha: float, src, samples: Sequence[dict] | None = None):
        super().__init__()
        self.alpha, self.src, self.samples = alpha, src, samples

    def call(self, model: ir.Model) -> PassResult:
        from edgec.graph_passes.rotation.edit import WeightEditor
        from edgec.graph_passes.rotation.topology import const_array, find_norms

        sites, skipped = [], []
        for norm in find_norms(model.graph):
            readers = _readers(norm)
            if norm.scale is None or const_array(norm.scale) is None:
                skipped.append({"norm": norm.node.name, "reason": "the norm has no constant "
                                "scale to fold the smoothing into (AdaLN-style or none)"})
            elif isinstance(readers, str):
                skipped.append({"norm": norm.node.name, "reason": readers})
            else:
                sites.append((norm, readers))
        if not sites:
            return PassResult(model, False, {"alpha": self.alpha, "smoothed_norms": 0,
                                             "skipped": skipped})
        x_max = channel_peaks(model, [n.output.name for n, _ in sites], self.src, self.samples)
        editor = WeightEditor(model.graph)
        report = []
        for (norm, readers), xm in zip(sites, x_max):
            weights = [editor.weight(r) for r in readers]
            w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            s = smoothing_scales(xm, w_max, self.alpha)
            for r, w in zip(readers, weights):
                editor.set_weight(r, s[:, None] * w)
            self._fold_into_norm(model.graph, norm, s)
            report.append({"norm": norm.node.name, "readers": len(readers),
                           "act_max_before": round(float(xm.max()), 4),
                           "act_max_after": round(float((xm / s).max()), 4),
                           "scale_range": [round(float(s.min()), 4), round(float(s.max()), 4)]})
        editor.flush()
        return PassResult(model, True, {"alpha": self.alpha, "smoothed_norms": len(sites),
                                        "readers": sum(len(r) for _, r in sites),
                                        "norms": report, "skipped": skipped})

    @staticmethod
    def _fold_into_norm(graph: ir.Graph, norm, s: np.ndarray) -> None:
        """γ' = γ/s (β' = β/s) in fresh initializers, so a γ shared elsewhere stays as it was."""
        from edgec.graph_passes.rotation.topology import const_array

        for value in (norm.scale, norm.shift):
            if value is None:
                continue
            new = (const_array(value).astype(np.float64) / s).astype(const_array(value).dtype)
            name = f"{value.name}_smoothed"
            k = 0
            while name in graph.initializers:
                k += 1
                name = f"{value.name}_smoothed_{k}"
            fresh = register_constant(graph, name, new)
            for node in {norm.node, norm.scale_node} - {None}:
                for idx, inp in enumerate(node.inputs):
                    if inp is value:
                        node.replace_input_with(idx, fresh)
            if not list(value.uses()) and graph.initializers.get(value.name) is value:
                del graph.initializers[value.name]


def channel_peaks(model: ir.Model, names: list[str], src,
                  samples: Sequence[dict] | None = None) -> list[np.ndarray]:
    """Per-channel max |x| of each named tensor over the tokens of ``samples`` (None: the
    source's generated calibration samples)."""
    from edgec.calibration.samples import generated_samples, samples_for_model
    from edgec.runtimes.ort import model_feeds, open_model

    if samples is None:
        samples = samples_for_model(generated_samples(src)[0], model)
    aug = model.clone()
    values = {v.name: v for n in aug.graph for v in n.outputs}
    present = {v.name for v in aug.graph.outputs}
    aug.graph.outputs.extend(values[n] for n in names if n not in present)
    result = [None] * len(names)
    with open_model(aug, optimize=True) as session:
        for feeds in samples:
            out = session.run(model_feeds(aug, feeds))
            for i, name in enumerate(names):
                m = np.abs(out[name]).reshape(-1, out[name].shape[-1]).max(axis=0)
                result[i] = m if result[i] is None else np.maximum(result[i], m)
    return result


def _readers(norm):
    """The Linears (constant weights) reading the norm's output, or why it does not qualify."""
    from edgec.graph_passes.rotation.topology import as_linear

    out = norm.output
    if out.is_graph_output():
        return f"its output {out.name} is a graph output"
    readers = []
    for use in out.uses():
        if use.node.op_type == "Shape":
            continue
        lin = as_linear(use.node) if use.idx == 0 else None
        if lin is None or lin.node.inputs[0] is not out:
            return (f"its output also feeds {use.node.op_type} {use.node.name} (a post-norm "
                    "residual stream, a LoRA branch or another op), so the division cannot "
                    "fold into γ")
        readers.append(lin)
    return readers or "its output is not used"
