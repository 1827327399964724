import dataclasses

import pytest

from edgec import targets
from edgec.errors import UserError


def test_targets_are_frozen_data():
    t = targets.get("openvino-cpu")
    assert t.runtime == "openvino" and t.precision == "fp32"
    # fp32 fidelity on bf16-capable CPUs depends on this being pinned
    assert t.runtime_config["INFERENCE_PRECISION_HINT"] == "f32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "x"
    assert targets.get("ort-cpu").runtime == "ort"


def test_unknown_target_lists_known_ones():
    with pytest.raises(UserError, match="choose one of: ort-cpu, openvino-cpu"):
        targets.get("tpu")


def test_openvino_keeps_fp32_weights(dit_tiny_artifacts):
    ov_dir = dit_tiny_artifacts[1].path
    bin_bytes = (ov_dir / "target" / "model.bin").stat().st_size
    onnx_bytes = (ov_dir / "model.onnx.data").stat().st_size
    # fp16 compression would halve the weights; fp32 keeps them about the same size
    assert bin_bytes > 0.9 * onnx_bytes
    assert 'element_type="f16"' not in (ov_dir / "target" / "model.xml").read_text()
