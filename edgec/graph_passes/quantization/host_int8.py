"""Whether this CPU's int8 kernels saturate: x86-64 without VNNI.

Without VNNI, x86 int8 dot products (ONNX Runtime's MLAS, OpenVINO's oneDNN, the QNN HTP
emulator) multiply u8 activations by s8 weights with ``vpmaddubsw``, which adds each pair of
products into a saturating int16: two 255 × 127 products (64770) overflow it. ONNX Runtime's
documentation names the remedy, 7-bit weights (``reduce_range``: 2 × 255 × 63 fits). Measured
on an AVX2-only AMD EPYC, video-dit tiny w8a8 (floor off), cosine to PyTorch: ort-cpu
0.9899 → 0.9993, openvino-cpu 0.9898 → 0.9994 with 7-bit weights (SmolLM2-135M's first 4
layers, logits: 0.9933 → 0.9976 and 0.9926 → 0.9978); on VNNI hosts the 8-bit
weights stay (VNNI accumulates in int32). ``EDGEC_INT8_SATURATES=1|0`` overrides the detection
(an artifact built here for a host of the other kind).

ONNX Runtime's other remedy, ``session.x64quantprecision`` (s8 weights rewritten to u8 at load,
U8U8 kernels), would keep 8 bits on ort-cpu, but onnxruntime 1.31 fails to load edgec's QDQ
graphs with it ("AddInitializedOrtValue: Attempt to replace the existing tensor", video-dit
tiny w8a8 on this AVX2 host), so both CPU targets take 7-bit weights.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = ["int8_saturates", "saturates"]

_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
ENV = "EDGEC_INT8_SATURATES"


def saturates(machine: str, flags: set[str]) -> bool:
    """An x86-64 CPU with AVX2 and none of the VNNI flags (``flags``: /proc/cpuinfo's)."""
    x86 = machine.lower() in ("x86_64", "amd64")
    return x86 and "avx2" in flags and not any(f in flags for f in _VNNI)


@functools.lru_cache(maxsize=1)
def _detected() -> bool:
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("flags")), "")
    except OSError:
        return False
    return saturates(platform.machine(), set(line.split(":", 1)[-1].split()))


def int8_saturates() -> bool:
    """This host's answer (``EDGEC_INT8_SATURATES`` first, then /proc/cpuinfo)."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detected()
