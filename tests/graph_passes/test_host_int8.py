"""7-bit weights where the host's int8 kernels saturate (x86 without VNNI), 8 elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.graph_passes.quantization.host_int8 import ENV, int8_saturates, saturates


def test_only_x86_with_avx2_and_no_vnni_saturates(monkeypatch):
    assert saturates("x86_64", {"avx2", "fma"})
    assert not saturates("x86_64", {"avx2", "avx512f", "avx512_vnni"})
    assert not saturates("x86_64", {"avx2", "avx_vnni"})
    assert not saturates("aarch64", {"asimd"})
    monkeypatch.setenv(ENV, "1")
    assert int8_saturates()
    monkeypatch.setenv(ENV, "0")
    assert not int8_saturates()


def _widest_int8_weight(model) -> int:
    """The largest |integer| among the int8 constants DequantizeLinear reads."""
    return max(int(np.abs(n.inputs[0].const_value.numpy().astype(np.int32)).max())
               for n in model.graph if n.op_type == "DequantizeLinear"
               and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.dtype.name == "INT8")


@pytest.fixture(scope="module")
def llama_tiny():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny")


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "qnn-htp"])
def test_cpu_targets_take_7_bit_weights_where_the_host_saturates(llama_tiny, monkeypatch,
                                                                 target):
    from edgec.calibration import collect_cache
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.graph_passes.quantization.quantize import QuantizePass
    from edgec.targets import get

    tgt = get(target)
    options = QuantOptions.parse({"scheme": "w8a8", "min_cos": 0.0}, tgt)
    s = options.scheme_on(tgt)
    work = llama_tiny.model.clone()
    for p in tgt.before_quantize:
        work = p()(work).model
    cache = collect_cache(work, options.calibration_request(tgt), llama_tiny)

    def weights(saturating: str) -> tuple[int, dict]:
        monkeypatch.setenv(ENV, saturating)
        result = QuantizePass(s, tgt, cache)(work.clone())
        return _widest_int8_weight(result.model), result.stats

    (wide, plain), (narrow, stats) = weights("0"), weights("1")
    assert wide == 127 and "weights_7bit" not in plain
    if target == "qnn-htp":  # the NPU is the device, not this host: its weights stay 8-bit
        assert narrow == 127 and "weights_7bit" not in stats
    else:
        assert narrow <= 64 and "VNNI" in stats["weights_7bit"]


def test_gptq_keeps_7_bit_weights_within_their_range(llama_tiny, monkeypatch):
    """GPTQ's error feedback and clipped scales move integers; at 7 bits they stay within ±64
    (the full int8 range would saturate the host's kernels again)."""
    from edgec.calibration import collect_cache
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.graph_passes.quantization.quantize import QuantizePass
    from edgec.targets import get

    tgt = get("ort-cpu")
    options = QuantOptions.parse({"scheme": "w8a8", "min_cos": 0.0}, tgt)
    work = llama_tiny.model.clone()
    cache = collect_cache(work, options.calibration_request(tgt), llama_tiny)
    rng = np.random.default_rng(0)
    samples = [{k: rng.integers(0, 64, size=v.shape).astype(v.dtype) if v.dtype.kind == "i"
                else v for k, v in llama_tiny.feeds.items()} for _ in range(4)]
    monkeypatch.setenv(ENV, "1")
    result = QuantizePass(options.scheme_on(tgt), tgt, cache,
                          gptq=lambda model: samples)(work.clone())
    assert result.stats["gptq"]["weights"] > 0
    assert _widest_int8_weight(result.model) <= 64
