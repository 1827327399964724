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


def _kl_threshold_loop(hist, edges, levels):
    """The reference search, one window at a time (TensorRT/MXNet's loop): P = the window with
    the clipped mass on its end bins, Q = the window merged into `levels` bins (remainder in
    the last) and spread over P's non-zero bins; both smoothed; the least KL(P||Q) wins."""
    def entropy(p, q):
        p, q = p / p.sum(), q / q.sum()
        return float((p * np.log(p / q)).sum())

    def smooth(x, eps=1e-4):
        zeros = x == 0
        return np.where(zeros, eps, x - eps * zeros.sum() / (~zeros).sum())

    hist = hist.astype(np.float64)
    zero = hist.size // 2
    best, best_kl = None, np.inf
    for i in range(levels // 2, zero + 1):
        start, end = zero - i, min(zero + i + 1, hist.size)
        window = hist[start:end]
        p = window.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[end:].sum()
        merge = window.size // levels
        q = np.zeros_like(p)
        for j in range(levels):
            stop = window.size if j == levels - 1 else (j + 1) * merge
            nonzero = p[j * merge:stop] != 0
            if nonzero.any():
                q[j * merge:stop] = window[j * merge:stop].sum() / nonzero.sum() * nonzero
        kl = entropy(smooth(p), smooth(q))
        if kl < best_kl:
            best, best_kl = (float(edges[start]), float(edges[end])), kl
    return best


def test_kl_threshold_matches_the_reference_loop():
    """The vectorized search picks the window the one-at-a-time loop picks; both clip."""
    from edgec.calibration.entropy import kl_threshold

    rng = np.random.default_rng(1)
    for data in (rng.standard_normal(20_000), rng.laplace(size=20_000),
                 np.concatenate([np.abs(rng.standard_normal(20_000)), [60.0]])):
        t = np.abs(data).max()
        hist, edges = np.histogram(data, 256, range=(-t, t))
        expected = _kl_threshold_loop(hist, edges, 32)
        assert kl_threshold(hist, edges, 32) == pytest.approx(expected)
        assert expected[1] < t
    hist, edges = np.histogram(rng.standard_normal(1000), 64)
    assert kl_threshold(hist, edges, 128) == (edges[0], edges[-1])  # more levels than bins


@pytest.mark.parametrize("target, scheme, bits", [("qnn-htp", "w8a8", 8), ("qnn-htp", "w8a16", 16),
                                                  ("openvino-cpu", "w8a8", 8)])
def test_calibration_request_carries_the_activation_width(target, scheme, bits):
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.targets import TARGETS

    t = TARGETS[target]
    request = QuantOptions.parse(f"{scheme}:method=entropy", t).calibration_request(t)
    assert (request.method, request.bits) == ("entropy", bits)


def test_statistics_run_right_after_their_tensor_and_stay_exact():
    """Calibration sessions run each statistic as soon as its tensor exists (priority order,
    statistics next to their producer), so tensors are freed as in a plain run: video-dit small
    on qnn-htp, ranges 11.0 → 2.9 GB and crest factors 10.3 → 5.3 GB peak. Same numbers."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from edgec.calibration.crest import _augmented, collect_crest
    from edgec.runtimes.ort import LEAN, session_options

    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["m"]),
         helper.make_node("Sub", ["m", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])], [two])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    r = np.maximum(x, 0)
    want = {"x": x, "r": r, "m": 2 * r, "y": 2 * r - x}

    ranges = collect_ranges(model, [{"x": x}], "minmax")
    for name, value in want.items():
        assert ranges[name]["lowest"] == pytest.approx(value.min())
        assert ranges[name]["highest"] == pytest.approx(value.max())
    crest = collect_crest(model, [{"x": x}])
    for name, value in want.items():
        assert crest[name] == pytest.approx(np.abs(value).max() / np.sqrt((value ** 2).mean()))

    ops = [n.op_type for n in _augmented(model)[0].graph]
    stats = ["Abs", "ReduceMax", "ReduceSumSquare", "Size"]
    assert ops == [*stats, "Relu", *stats, "Mul", *stats, "Sub", *stats]
    opts = session_options(optimize=False, config=LEAN)
    assert opts.execution_order.name == "PRIORITY_BASED" and not opts.enable_mem_pattern
    assert not opts.enable_cpu_mem_arena
