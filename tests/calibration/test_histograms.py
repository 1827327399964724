"""Histogram calibration (entropy, percentile, fp8's distribution) one sample and one group of
tensors at a time gives ONNX Runtime's histograms and ranges exactly."""

import contextlib
import io

import numpy as np
import pytest

from edgec.calibration.histograms import collect_histograms, within_budget
from edgec.calibration.ranges import _method, collect_ranges


@pytest.fixture(scope="module")
def model():
    """Heavy-tailed tensors of different ranges and signs (x³, a ReLU, a residual sum), a
    MatMul reading them; five samples whose ranges differ, so merging per-sample histograms the
    way ORT merges would rebin."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x2", "x"], ["c"]),
         helper.make_node("Relu", ["c"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["m"]),
         helper.make_node("Add", ["m", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 16])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return [{"x": (rng.standard_normal((64, 16)) * (0.5 + k)).astype(np.float32)}
            for k in range(5)]


def _ort(model, samples, method, tmp_path, **options):
    """ORT's own calibrator over every sample at once: (histograms, calibrator)."""
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator

    from edgec.onnx_io import save_model

    save_model(model, tmp_path / "m.onnx")
    calibrator = create_calibrator(tmp_path / "m.onnx", None,
                                   augmented_model_path=str(tmp_path / "a.onnx"),
                                   calibrate_method=_method(method),
                                   use_external_data_format=True, extra_options=options)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(io.StringIO()):
        calibrator.collect_data(Reader())
    return calibrator.collector.histogram_dict, calibrator


@pytest.mark.parametrize("magnitudes", [False, True])
def test_histograms_are_orts_whatever_the_grouping(model, samples, tmp_path, magnitudes):
    method, options = (("percentile", {"symmetric": True}) if magnitudes
                       else ("entropy", {"num_bins": 512}))
    want, calibrator = _ort(model, samples, method, tmp_path, **options)
    names = sorted(calibrator.tensors_to_calibrate)
    assert names == sorted(want) and len(names) == 6  # x, x2, c, r, m, y
    runs = []
    for budget in (1, 64 * 16 * 4 * 3, 1 << 30):  # each tensor alone, three, all at once
        got = collect_histograms(model, names, samples, calibrator.num_bins, magnitudes,
                                 budget=budget, progress=lambda i, n: runs.append((i, n)))
        for name in names:
            assert len(got[name]) == len(want[name])
            for a, b in zip(got[name], want[name]):
                assert np.asarray(a).dtype == np.asarray(b).dtype
                np.testing.assert_array_equal(a, b)
    # progress: the range sweep, then one run per sample and group (6, 2 and 1 groups)
    assert runs == [(i, n) for groups in (6, 2, 1)
                    for i, n in [(k, 10) for k in range(1, 6)]
                    + [(5 + k, 5 * (1 + groups)) for k in range(1, 5 * groups + 1)]]


@pytest.mark.parametrize("method,options", [
    ("entropy", {}), ("percentile", {}), ("distribution", {})])
def test_ranges_are_orts(model, samples, tmp_path, method, options):
    from edgec.calibration.ranges import ENTROPY_BINS, _entropy_stats, _stats

    if method == "entropy":
        options = {"num_bins": ENTROPY_BINS, "num_quantized_bins": 256}
    want, calibrator = _ort(model, samples, method, tmp_path, symmetric=False, **options)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = ({n: _entropy_stats(h, 256) for n, h in want.items()} if method == "entropy"
                    else {n: _stats(td) for n, td in calibrator.compute_data().data.items()})
    assert collect_ranges(model, samples, method) == expected


def test_groups_hold_the_budget_and_a_larger_tensor_alone():
    sizes = {"a": 3, "b": 3, "c": 10, "d": 1, "e": 4}
    assert within_budget(list(sizes), list(sizes.values()), 6) == [["a", "b"], ["c"], ["d", "e"]]
    assert within_budget(list(sizes), list(sizes.values()), 100) == [["a", "b", "c", "d", "e"]]


def test_memory_budget_is_a_quarter_of_what_is_available_within_bounds(tmp_path):
    from edgec.calibration.histograms import BUDGET, memory_budget

    info = tmp_path / "meminfo"
    for kb, want in ((16 << 20, 4 << 30), (1 << 20, BUDGET[0]), (256 << 20, BUDGET[1])):
        info.write_text(f"MemTotal: {2 * kb} kB\nMemAvailable: {kb} kB\n")
        assert memory_budget(str(info)) == want
    assert memory_budget(str(tmp_path / "none")) == 2 << 30


@pytest.mark.parametrize("magnitudes", [False, True])
def test_tensors_a_rewrite_left_untyped_get_the_same_histograms(model, samples, magnitudes):
    """qnn-legalize's lowered Transposes and SiLU's Max copy come out of their rewrites with no
    element type: percentile and entropy calibration on the NPU failed to serialize the graph
    they augment (``--quantize w8a8:method=percentile`` on video-dit, exit 1)."""
    names = ["x2", "c", "r", "m"]
    want = collect_histograms(model, names, samples, 128, magnitudes)
    untyped = model.clone()
    for node in untyped.graph:
        if node.outputs[0].name in ("x2", "c", "r"):  # Mul, Mul, Relu: element type unknown
            node.outputs[0].type = None
    assert all(v.dtype is None for n in untyped.graph for v in n.outputs
               if v.name in ("x2", "c", "r"))
    got = collect_histograms(untyped, names, samples, 128, magnitudes)
    for name in names:
        for a, b in zip(got[name], want[name]):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(a, b)
