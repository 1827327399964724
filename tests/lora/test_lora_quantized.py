"""A quantized base with swappable adapters (what Olive refuses): the base MatMuls are QDQ, the
adapter branches stay fp32, and switching adapters still adds each adapter's exact delta."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import edgec


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_quantized_base_swappable_adapters(target, adapter_dirs, exported_outputs, llama_source,
                                           tmp_path):
    dirs, merged = adapter_dirs
    art = edgec.compile("llama", target=target, output_dir=tmp_path / "q", config="tiny",
                        lora=[dirs["attn_mlp"], dirs["patterns"]], lora_mode="swappable",
                        quantize="w8a8")
    model = ir.load(art.path / "model.onnx")
    branch = [n for n in model.graph if "edgec.lora.branch" in n.metadata_props]
    assert branch and all(n.op_type != "DequantizeLinear" for n in branch)
    for n in branch:  # adapter inputs and branch tensors are never quantized
        for v in n.inputs:
            assert v.producer() is None or v.producer().op_type != "DequantizeLinear" or \
                not v.name.startswith("lora.")
    q_inputs = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert not any(name.startswith("lora.") for name in q_inputs)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) > 0
    sess = edgec.load(art.path)
    feeds = sess.default_feeds
    base_q = sess.run(feeds, adapter="base")["logits"]
    base_ref = llama_source().reference["logits"]
    assert _cos(base_q, base_ref) >= 0.99
    for name in ("attn_mlp", "patterns"):
        got = sess.run(feeds, adapter=name)["logits"]
        ref = exported_outputs(name, merged[name])["logits"]
        assert _cos(got, ref) >= 0.99, name
        # the adapter's own contribution survives quantization of the base
        assert _cos(got - base_q, ref - base_ref) >= 0.95, name
