"""Activation range calibrators: each method gives the ranges its name promises."""

import numpy as np
import pytest

from edgec.calibration.ranges import collect_ranges
from edgec.graph_passes.quantization.options import activation_bits


@pytest.fixture(scope="module")
def matmul_model():
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 16])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


@pytest.fixture(scope="module")
def outlier_samples():
    """Gaussian activations with one value in ~10⁴ forty times larger (a sparse outlier)."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(8):
        x = rng.standard_normal((64, 16)).astype(np.float32)
        x[rng.integers(64), rng.integers(16)] = 40.0
        samples.append({"x": x})
    return samples


def test_entropy_clips_a_sparse_outlier_where_minmax_keeps_it(matmul_model, outlier_samples):
    minmax = collect_ranges(matmul_model, outlier_samples, "minmax")["x"]
    entropy = collect_ranges(matmul_model, outlier_samples, "entropy")["x"]
    assert minmax["highest"] == pytest.approx(40.0)
    # the KL threshold keeps the Gaussian body (|x| ≲ 4-5) and drops the outlier
    assert 2.0 < entropy["highest"] < 0.5 * minmax["highest"]
    assert minmax["lowest"] <= entropy["lowest"] < 0  # never wider than the data


def test_entropy_at_16_bits_has_nothing_to_clip(matmul_model, outlier_samples):
    minmax = collect_ranges(matmul_model, outlier_samples, "minmax")["x"]
    entropy16 = collect_ranges(matmul_model, outlier_samples, "entropy", bits=16)["x"]
    assert entropy16["highest"] == pytest.approx(minmax["highest"], rel=1e-3)


@pytest.mark.parametrize("element, bits", [("uint8", 8), ("int8", 8), ("uint16", 16),
                                            ("int16", 16), (None, 8), ("float8e4m3fn", 8)])
def test_activation_bits(element, bits):
    assert activation_bits(element) == bits
