"""Per-channel weight quantization over whole weights (``ort_weights``): ORT's per-channel
results, element for element, on the ranges that take ORT's special cases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto
from onnxruntime.quantization import qdq_quantizer
from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

from edgec.graph_passes.quantization.ort_weights import (
    channel_params,
    fast_ort_weights,
    quantize_channels,
)


def _weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 10)).astype(np.float32)
    w[:, 0] = 0.0  # an empty range: ORT's scale 1, zero point 0
    w[:, 1] = np.abs(w[:, 1]) + 0.5  # positive only: the range widened to hold 0
    w[:, 2] = -np.abs(w[:, 2])  # negative only
    w[:, 3] *= 1e-30  # below float32's smallest normal once divided
    w[:, 4] *= 1e4
    w[5, 5] = 3e-3  # one value alone
    return w


@pytest.mark.parametrize("qtype", [TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                                   TensorProto.UINT16, TensorProto.INT4, TensorProto.UINT4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [1, 0])
def test_channels_at_once_are_orts_channel_by_channel(qtype, symmetric, axis):
    w = _weight()
    reduce_range = qtype == TensorProto.UINT8 and not symmetric
    least = 1e-4 if axis == 1 else None  # edgec's MinimumRealRange (lifts w[:, 0], w[:, 3])
    zero, scale = channel_params(w, axis, qtype, symmetric, reduce_range, least)
    q = quantize_channels(w, axis, qtype, zero, scale)
    for c in range(w.shape[axis]):
        channel = w.take(c, axis).ravel()
        z, s = compute_data_quant_params(channel, qtype, symmetric, reduce_range=reduce_range,
                                         min_real_range=least)
        assert zero[c].tobytes() == z.tobytes() and zero.dtype == z.dtype
        assert scale[c].tobytes() == s.tobytes() and scale.dtype == s.dtype
        expected = quantize_nparray(qtype, channel, s, z)
        assert q.take(c, axis).ravel().tobytes() == expected.tobytes()
    assert len(set(scale.tolist())) > w.shape[axis] // 2  # per channel, not one scale


def test_the_originals_come_back():
    calc = qdq_quantizer.QDQQuantizer.__dict__["_calc_initializer_quant_params"]
    quantize = qdq_quantizer.quantize_onnx_initializer
    with fast_ort_weights():
        assert qdq_quantizer.quantize_onnx_initializer is not quantize
        with fast_ort_weights():
            pass
        assert qdq_quantizer.QDQQuantizer.__dict__["_calc_initializer_quant_params"] is not calc
    assert qdq_quantizer.QDQQuantizer.__dict__["_calc_initializer_quant_params"] is calc
    assert qdq_quantizer.quantize_onnx_initializer is quantize
