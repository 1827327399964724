"""onnxruntime.quantization's per-channel weight quantization, one array operation per weight.

``quantize_static`` computes a per-channel weight's scales and zero points one output channel at
a time (a Python call with a dozen numpy scalar operations per channel), and quantizes the
weight one channel at a time again. SmolLM2-135M has 205k weight channels: most of a
``quantize_static`` call once its graph scans were indexed (``ort_scans``). Here both run over
the whole weight at once, computing what ORT's functions compute per channel, element for
element: the range widened to hold 0 and to ORT's ``min_real_range`` (symmetric: ±max|w|),
scale = range / (qmax − qmin) in float64 then float32 (1 where that is below float32's smallest
normal, zero point 0), the zero point rounded half to even in the quantized type, and
``round(w / scale) + zero point`` clipped in float32. The graph written is byte for byte ORT's
(tests).

What it does not cover goes to ORT's own code unchanged: block-wise weights, scales given as
overrides, per-channel ``rmin``/``rmax`` overrides, float8, empty channels. Only inside
:func:`fast_ort_weights`, which the quantize pass holds around ``quantize_static``
(onnxruntime 1.31, pinned in pyproject).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["fast_ort_weights"]


def _integer(quant_type) -> bool:
    from onnx import TensorProto

    return quant_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                          TensorProto.UINT16, TensorProto.INT4, TensorProto.UINT4)


def channel_params(data: np.ndarray, axis: int, quant_type, symmetric: bool,
                   reduce_range: bool, min_real_range: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(zero points, scales), one per slice of ``data`` along ``axis``, as ORT's
    ``compute_data_quant_params`` gives them slice by slice (``min_real_range``: the least
    range, rmax raised to rmin + it)."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=symmetric)
    others = tuple(i for i in range(data.ndim) if i != axis)
    rmin = np.minimum(data.min(axis=others), np.zeros((), data.dtype))
    rmax = np.maximum(data.max(axis=others), np.zeros((), data.dtype))
    if min_real_range is not None:
        rmax = np.maximum(rmax, rmin + np.asarray(min_real_range, dtype=data.dtype))
    if symmetric:
        rmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin = -rmax
    span = np.float64(qmax) - np.float64(qmin)
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / span
    tiny = scale < np.finfo(data.dtype).tiny
    if symmetric:
        middle = np.round((qmin + qmax) / np.array(2.0, dtype=np.float64))
        zero = np.full(scale.shape, middle, np.float64)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.round(np.float64(qmin) - rmin / scale)
    zero = np.where(tiny, 0.0, zero)
    scale = np.where(tiny, 1.0, scale)
    return np.array(zero, dtype=qmin.dtype), scale.astype(data.dtype)


def quantize_channels(data: np.ndarray, axis: int, quant_type, zero: np.ndarray,
                      scale: np.ndarray) -> np.ndarray:
    """``data`` on each channel's grid, as ORT's ``quantize_nparray`` does channel by channel."""
    from onnxruntime.quantization.quant_utils import (
        ONNX_TYPE_TO_NP_TYPE,
        get_qmin_qmax_for_qType,
    )

    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    shape = [1] * data.ndim
    shape[axis] = -1
    q = np.asarray((data.astype(np.float32) / scale.reshape(shape)).round()
                   + zero.reshape(shape))
    np.clip(q, qmin, qmax, out=q)
    return q.astype(ONNX_TYPE_TO_NP_TYPE[quant_type])


def _calc_initializer_quant_params(original):
    """ORT's ``QDQQuantizer._calc_initializer_quant_params`` with the plain per-channel weights
    computed here and every other tensor left to ``original``."""
    def calc(self) -> dict[str, Any]:
        from onnxruntime.quantization.base_quantizer import QuantizationParams
        from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType
        from onnxruntime.quantization.quant_utils import tensor_proto_to_array

        ours: dict[str, Any] = {}
        # the first initializer of each name, as ORT's lookup finds it
        inits = {i.name: i for i in reversed(list(self.model.initializer()))}
        for name, info in self.tensors_to_quantize.items():
            init = inits.get(name)
            if init is None or self.tensor_quant_overrides.overrides_scale_zp(name):
                continue
            overrides = self.tensor_quant_overrides.get(name, [{}])
            weight = info.tensor_type is QDQQuantTensorType.WEIGHT
            quant_type = overrides[0]["quant_type"].tensor_type if "quant_type" in overrides[0] \
                else (self.weight_qType if weight else self.activation_qType)
            axis = overrides[0].get("axis", info.axis)
            if (axis is None or (weight and self.block_size > 0) or not _integer(quant_type)
                    or any("rmin" in o or "rmax" in o for o in overrides)):
                continue
            data = tensor_proto_to_array(init)
            axis = axis + data.ndim if axis < 0 else axis
            if not 0 <= axis < data.ndim or data.size == 0:
                continue  # ORT's own error, or its empty-channel case
            zero, scale = channel_params(data, axis, quant_type,
                                         overrides[0].get("symmetric", True),
                                         overrides[0].get("reduce_range", self.reduce_range),
                                         self.min_real_range)
            ours[name] = QuantizationParams(zero_point=zero, scale=scale, quant_type=quant_type,
                                            axis=axis)
        everything = self.tensors_to_quantize
        self.tensors_to_quantize = {k: v for k, v in everything.items() if k not in ours}
        try:
            theirs = original(self)
        finally:
            self.tensors_to_quantize = everything
        return {k: ours[k] if k in ours else theirs[k] for k in everything
                if k in ours or k in theirs}
    return calc


def _quantize_onnx_initializer(original):
    """ORT's ``quantize_onnx_initializer`` with per-channel integer weights quantized at once."""
    def quantize(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None,
                 block_size=0):
        if axis is None or block_size > 0 or not _integer(quant_type):
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name,
                            block_size)
        import onnx
        from onnxruntime.quantization.quant_utils import (
            TENSOR_NAME_QUANT_SUFFIX,
            pack_bytes_to_4bit,
            tensor_proto_to_array,
        )

        data = tensor_proto_to_array(weight)
        q = quantize_channels(data, axis, quant_type, np.asarray(zero_point), np.asarray(scale))
        name = quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        if quant_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            return onnx.helper.make_tensor(name, quant_type, weight.dims,
                                           bytes(pack_bytes_to_4bit(q.tobytes())), raw=True)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(quant_type)
        return onnx.numpy_helper.from_array(np.asarray(q, dtype=dtype).reshape(weight.dims), name)
    return quantize


@contextlib.contextmanager
def fast_ort_weights() -> Iterator[None]:
    """ORT's per-channel weight scales and weight quantization vectorized while the block runs
    (a nested block restores what it found)."""
    from onnxruntime.quantization import qdq_quantizer

    holder = qdq_quantizer.QDQQuantizer
    saved = (holder.__dict__["_calc_initializer_quant_params"],
             qdq_quantizer.quantize_onnx_initializer)
    holder._calc_initializer_quant_params = _calc_initializer_quant_params(saved[0])
    qdq_quantizer.quantize_onnx_initializer = _quantize_onnx_initializer(saved[1])
    try:
        yield
    finally:
        holder._calc_initializer_quant_params, qdq_quantizer.quantize_onnx_initializer = saved
