"""onnxruntime.quantization's graph scans without their per-item Python calls.

``quantize_static`` rewires each tensor it quantizes by scanning every node of the graph and
calling ``replace_node_input`` on each (an assert, an ``isinstance`` and a loop per node), and
looks initializers up by building a list of every initializer with that name. Both are linear
per tensor, so quadratic per graph (4 M ``replace_node_input`` calls over a floor search's nine
builds of motion-dit tiny's 1.7k-node graph). The same scans here test membership in C first
and stop at the first match, with the same results (the first initializer of a name, every
occurrence of an input replaced). Measured per ``quantize_static`` call: motion-dit tiny on
qnn-htp 1.59 → 1.40 s, on ort-cpu 0.66 → 0.58 s; SmolLM2-135M (30 layers) on qnn-htp
27.0 → 24.2 s (the rest is ORT's per-channel scale arithmetic and file I/O).
Only inside :func:`fast_ort_scans`, which the quantize pass holds around ``quantize_static``;
onnxruntime is pinned to 1.31 (pyproject), whose functions these replace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["fast_ort_scans"]

def _replace_in(names, old: str, new: str) -> None:
    if old in names:  # a C-level scan of the node's names
        for j, name in enumerate(names):
            if name == old:
                names[j] = new


def _replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
    for node in self.model.graph.node:
        _replace_in(node.input, old_input_name, new_input_name)


def _replace_output_of_all_nodes(self, old_output_name: str, new_output_name: str) -> None:
    for node in self.model.graph.node:
        _replace_in(node.output, old_output_name, new_output_name)


def _find_by_name(item_name, item_list):
    return next((item for item in item_list if item.name == item_name), None)


def _get_initializer(self, name):
    return _find_by_name(name, self.model.graph.initializer)


def _targets():
    """(holder, attribute, replacement) for every place onnxruntime 1.31 keeps these."""
    from onnxruntime.quantization import base_quantizer, onnx_model, qdq_quantizer, quant_utils
    from onnxruntime.quantization.operators import matmul

    out = [(onnx_model.ONNXModel, "replace_input_of_all_nodes", _replace_input_of_all_nodes),
           (onnx_model.ONNXModel, "replace_output_of_all_nodes", _replace_output_of_all_nodes),
           (onnx_model.ONNXModel, "get_initializer", _get_initializer)]
    for module in (quant_utils, onnx_model, base_quantizer, qdq_quantizer, matmul):
        if getattr(module, "find_by_name", None) is not None:
            out.append((module, "find_by_name", _find_by_name))
    return out


@contextlib.contextmanager
def fast_ort_scans() -> Iterator[None]:
    """onnxruntime.quantization's node and initializer scans replaced while the block runs (a
    nested block restores what it found)."""
    targets = _targets()
    saved = [(holder, name, getattr(holder, name)) for holder, name, _ in targets]
    for holder, name, fn in targets:
        setattr(holder, name, fn)
    try:
        yield
    finally:
        for holder, name, fn in saved:
            setattr(holder, name, fn)
