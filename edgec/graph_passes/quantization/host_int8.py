"""Whether this CPU's int8 kernels saturate: x86-64 without VNNI.

Without VNNI, x86 int8 dot products (ONNX Runtime's MLAS, OpenVINO's oneDNN) multiply u8
activations by s8 weights with ``vpmaddubsw``, which adds each pair of products into a
saturating int16: two 255 × 127 products (64770) overflow it. Measured on an AVX2-only AMD EPYC,
video-dit tiny w8a8 (floor off), cosine to PyTorch: ort-cpu 0.9899, openvino-cpu 0.9898.
Where this says so, the CPU targets shift their int8 weights to uint8 (``unsigned_weights``:
exact, all 8 bits kept: 0.99955 and 0.99959), and ONNX Runtime runs that measure a QDQ graph (the
NPU's reference, the accuracy floor's probes) leave its fusions off (``runtimes.ort.exact_qdq``).
On VNNI hosts (int32 accumulation) nothing changes. ``EDGEC_INT8_SATURATES=1|0`` overrides the
detection (an artifact built here for a host of the other kind).

7-bit weights (ONNX Runtime's documented ``reduce_range``) avoid the overflow at the cost of a
bit (0.9993 / 0.9994 above; llama small logits 0.99951 vs 0.99965 with uint8 weights), and keep
ONNX Runtime's faster U8S8 kernels: its U8U8 ones run at 0.86-0.97× their speed, OpenVINO's
u8-weight path at 1.00-1.05× (``benchmarks/host_int8.py``). So they are ort-cpu's option
(``--quantize w8a8:reduce_range=true``), not the default. Tried and dropped:
``session.x64quantprecision`` (ORT rewriting s8 weights to u8 at
load) fails to load edgec's QDQ graphs in onnxruntime 1.31 ("AddInitializedOrtValue: Attempt to
replace the existing tensor").
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
