"""tensorrt: an NVIDIA TensorRT engine built from the TensorRT-legal model.onnx, as data.

``rules`` holds TensorRT's Q/DQ rules and their checker, ``legalize`` the exact rewrite into
TensorRT's symmetric signed form (run after quantization), ``build`` the engine build.
"""

from __future__ import annotations

from edgec.targets.base import QuantScheme, Target
from edgec.targets.tensorrt.engine import TIMING_CACHE_ENV, build, optimization_profile
from edgec.targets.tensorrt.legalize import TensorRTLegalizePass

__all__ = ["TENSORRT", "TIMING_CACHE_ENV", "optimization_profile"]

SCHEMES = {
    # TensorRT quantizes symmetrically into signed types only: int8 per-channel weights on the
    # output-channel axis, int8 per-tensor activations (Q/DQ fuse into int8 GEMM/conv kernels).
    # Biases stay float: TensorRT has no int32 Q/DQ (it fuses the float bias into the GEMM).
    "w8a8": QuantScheme("w8a8", weights="int8", activations="int8", activation_symmetric=True,
                        quantize_bias=False),
    # FP8 E4M3, per-tensor scales (Ada/Hopper and later GPUs).
    "fp8": QuantScheme("fp8", weights="float8e4m3fn", activations="float8e4m3fn",
                       activation_symmetric=True, per_channel=False, min_opset=19,
                       quantize_bias=False, head_float=True),
    # int4 weight-only: block-wise DQ (block 128 along K) feeding a high-precision MatMul.
    "w4a16": QuantScheme("w4a16", weights="int4", activations=None, block_size=128,
                         op_types=("MatMul",), min_opset=21, block_sizes=(64, 128)),
}


TENSORRT = Target(
    name="tensorrt",
    description="NVIDIA TensorRT engine (target/model.plan), explicit Q/DQ quantization; "
                "without TensorRT the checked TensorRT-legal model.onnx",
    runtime="tensorrt",
    opset_range=(9, 24),
    static_shapes=False,
    precision="fp32",
    runtime_config={},
    notes=(("TensorRT takes one optimization profile: dynamic dims run from 1 to the example "
            "size, within the model's stored dim ranges (swappable LoRA ranks: from 1 to the sum "
            "of the compiled adapters' ranks)"),
           ("quantized graphs must follow TensorRT's Q/DQ rules (symmetric int8/fp8, int4 "
            "weight-only blocks); the build checks them and names the node that breaks one"),
           "building the engine needs an NVIDIA GPU and pip install 'edgec[tensorrt]'"),
    requires=(),
    build=build,
    schemes=SCHEMES,
    after_quantize=(TensorRTLegalizePass,),
)
