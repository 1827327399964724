"""A quantized device judged against ONNX Runtime relative to ORT's own error vs fp32."""

import pytest

from edgec.fidelity import QUANTIZED_AGREEMENT, judge_quantized


@pytest.mark.parametrize("device_vs_ort,ort_vs_ref,verdict", [
    (0.9995, 0.9990, "agrees"),       # a well-quantizing graph: the device matches ORT
    (0.996, 0.975, "graph"),          # planted outliers on OpenVINO (measured): the graph's doing
    (0.84, 0.926, "graph"),           # a real checkpoint on the HTP: ORT itself is far from fp32
    (0.95, 0.9995, "device"),         # ORT is close to fp32, the device is not: a target bug
    (0.9979, 0.9999, "device"),       # a small drift the graph does not explain: flagged
])
def test_verdicts(device_vs_ort, ort_vs_ref, verdict):
    got, message = judge_quantized(device_vs_ort, ort_vs_ref)
    assert got == verdict
    assert (message is None) == (verdict == "agrees")
    if verdict == "graph":
        assert "the quantized graph's own error" in message and "not the target" in message
    if verdict == "device":
        assert "although ONNX Runtime on it stays close" in message


def test_agreement_threshold_is_inclusive():
    assert judge_quantized(QUANTIZED_AGREEMENT, 0.5)[0] == "agrees"
