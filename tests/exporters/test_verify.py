import numpy as np
import pytest

from edgec.errors import VerificationError
from edgec.exporters.verify import assert_close, compare_outputs


def test_metrics_are_norm_wise(rng):
    ref = rng.standard_normal((4, 8)).astype(np.float32)
    got = ref.copy()
    got[0, 0] += 0.01 * np.abs(ref).max()
    e = compare_outputs({"y": got}, {"y": ref})["y"]
    assert e["max_rel"] == pytest.approx(0.01, rel=1e-3)
    assert 0.999 < e["cosine"] < 1.0
    assert e["shape"] == [4, 8]


def test_assert_close_names_output_and_amount(rng):
    ref = rng.standard_normal(10)
    errors = compare_outputs({"a": ref, "b": ref * 1.1}, {"a": ref, "b": ref})
    assert_close({"a": errors["a"]}, 1e-6, "x")
    with pytest.raises(VerificationError, match=r"output 'b' differs by max relative error 0\.1"):
        assert_close(errors, 1e-3, "candidate vs reference")


def test_shape_mismatch_missing_and_nan_are_failures(rng):
    ref = rng.standard_normal((2, 3))
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs({"y": ref.T}, {"y": ref})
    with pytest.raises(VerificationError, match="missing"):
        compare_outputs({}, {"y": ref})
    bad = ref.copy()
    bad[0, 0] = np.nan
    e = compare_outputs({"y": bad}, {"y": ref})["y"]
    with pytest.raises(VerificationError):
        assert_close({"y": e}, 1.0, "nan")


def test_integer_outputs_compare_exactly():
    e = compare_outputs({"i": np.array([1, 2, 4])}, {"i": np.array([1, 2, 3])})["i"]
    assert e["max_rel"] == 1.0 and e["cosine"] == 0.0
    assert compare_outputs({"i": np.arange(3)}, {"i": np.arange(3)})["i"]["max_rel"] == 0.0
