"""qnn-htp: Qualcomm's Hexagon NPU through ONNX Runtime's QNN EP, as data (the build is ``build``).

Quantized (QDQ) models only; every tensor is quantized; static shapes; rank ≤ 5. ``legalize``
holds the exact rewrites the HTP needs before quantization, ``fuse_rmsnorm`` the RMSNorm fusion
its quantized norms need, ``qdq`` its QDQ form, ``build`` the EPContext compile and the
diagnosis of what the HTP cannot run, ``soc`` the Snapdragons a compile may name (``--soc``).
"""

from __future__ import annotations

from edgec.targets.base import QuantScheme, Target
from edgec.targets.qnn_htp.divergence import locate_departure
from edgec.targets.qnn_htp.epcontext import build
from edgec.targets.qnn_htp.fuse_rmsnorm import FuseRmsNormPass
from edgec.targets.qnn_htp.legalize import MAX_RANK, QnnLegalizePass
from edgec.targets.qnn_htp.qdq import qdq_options
from edgec.targets.qnn_htp.shared_context import share_context
from edgec.targets.qnn_htp.soc import SOCS

__all__ = ["QNN_HTP"]


QNN_HTP = Target(
    name="qnn-htp",
    description="Qualcomm Hexagon NPU via ONNX Runtime's QNN EP (HTP; emulated on x86_64), "
                "quantized QDQ models precompiled to an EPContext binary",
    runtime="qnn",
    opset_range=(13, 23),
    static_shapes=True,
    precision="quantized (QDQ)",
    runtime_config={"backend": "htp", "session.disable_cpu_ep_fallback": "1",
                    "provider_options": {"offload_graph_io_quantization": "0"}},
    notes=(
        ("quantized QDQ models only (--quantize w8a8 | w8a16 | w4a16 | w4a8); no CPU fallback: "
         "a node the HTP cannot run fails the build with its name"),
        "static shapes only; tensors of rank <= 5 (qnn-legalize lowers rank-6+ Transposes)",
        ("no Mish kernel (qnn-legalize writes x*tanh(softplus(x))); at 16 bits an Add/Mul "
         "broadcast over the batch that feeds a LayerNormalization is miscomputed (qnn-legalize "
         "tiles the operand to full shape; Expand does not help); at 16 bits a "
         "LayerNormalization whose bias is its scale tensor (equal constants the cleanup "
         "merged) is miscomputed too (qnn-legalize gives the bias its own copy)"),
        ("GatherND on bool data is rejected and an IsNaN->Where guard after Softmax fails to "
         "finalize (qnn-legalize rewrites both before quantization); -inf/float-min attention "
         "masks destroy the quantized Softmax input range (mask-fill bounds them)"),
        ("a Gather along any axis but the first returns wrong rows (qnn-legalize moves the "
         "axis to the front with Transposes); so does a rank-5 Gather over a batch of 2, and a "
         "Reshape regrouping the batch axes of a 16-bit MatMul's output (block-sparse "
         "attention avoids both on this target); TopK's input is 16-bit (8-bit ties pick "
         "other blocks than ONNX Runtime)"),
        ("Where needs both data inputs quantized to the output's type (a float constant, as "
         "ONNX Runtime's quantizer leaves it without ForceQuantizeNoInputCheck, or a uint8 "
         "input beside a uint16 one fails to finalize)"),
        ("LayerNormalization weights must be unsigned (uint8/uint16); signed int8/int4 ones "
         "are rejected, so only MatMul weights are signed (int8/int4, symmetric per channel) "
         "and every other weight is uint8 per tensor"),
        ("int4 weights must be symmetric (zero point 0; the HTP miscomputes negative int4 zero "
         "points); w4a16 quantizes MatMul weights only, per output channel, others stay uint8"),
        ("block-wise int4 weights run only in the LPBQ form (per-block 4-bit integer scales x a "
         "float per output channel) with 8-bit activations: a plain block-wise DequantizeLinear "
         "goes to the CPU even with enable_block_quant_weight_optimization=1, and 8-bit block "
         "scales or 16-bit activations disagree with ONNX Runtime (measured, QNN 2.51)"),
        ("a 16-bit embedding Gather output beside its 8-bit table, or a 16-bit norm input "
         "read by an 8-bit normalizing Mul, fails to finalize (QNN_COMMON_ERROR_MEM_ALLOC): "
         "the 16-bit residual stream is the residual Adds' outputs only"),
        ("an RMSNorm on the residual stream runs as one RMSNormalization (qnn-fuse-rmsnorm, "
         "opset 23), input and output at 16 bits: decomposed, its per-tensor quantized mean "
         "square cannot hold a trained decoder's massive first token beside the others (every "
         "other token's rounds to 0); RMSNormalization at 16 bits in / 8 out fails to finalize"),
        "int64 token ids and the embedding Gather run on the NPU as they are",
        ("--quantize ...:stream=fp16 keeps the residual stream (its sums, the norms reading "
         "them, split branches) float, which the HTP runs in fp16: such a graph is built for an "
         "fp16 HTP (soc_model 60, Snapdragon X Elite, HTP v73, unless --soc names another "
         "with fp16 units: HTP v69 on); named no SoC, the x86 emulator "
         "computes float ops in fp32, which no device does, and cannot finalize a float "
         "RMSNormalization"),
    ),
    requires=("onnxruntime", "onnxruntime_qnn"),
    build=build,
    fully_quantized=True,
    swappable_adapters=False,
    max_rank=MAX_RANK,
    before_quantize=(QnnLegalizePass, FuseRmsNormPass),
    qdq_options=qdq_options,
    share_graphs=share_context,
    locate_departure=locate_departure,
    socs=SOCS,
    schemes={
        # MatMul weights int8 symmetric per output channel; every other weight (LayerNorm takes
        # only unsigned ones) u8 per tensor. Activations u8, and 16 bits for tensors whose crest
        # factor exceeds 16 (a real BERT-family checkpoint: embedding cosine 0.72 → 0.99), and
        # for the residual stream's sums (llama small+outliers, Hadamard: 0.981 → 0.992).
        "w8a8": QuantScheme("w8a8", "int8", "uint8", op_types=("MatMul",), outlier_crest=16.0,
                            stream_16bit=True),
        "w8a16": QuantScheme("w8a16", "int8", "uint16", op_types=("MatMul",), min_opset=21),
        "w4a16": QuantScheme("w4a16", "int4", "uint16", weight_symmetric=True, per_channel=True,
                             op_types=("MatMul",), min_opset=21),
        # 4-bit MatMul weights with 8-bit activations, 16 bits where a tensor's crest factor
        # needs them and for the residual stream, as w8a8. Weights symmetric in blocks of 32
        # input channels, 4-bit block scales × a float per output channel (LPBQ); per output
        # channel where the MatMul reads 16 bits (LPBQ with 16-bit inputs disagreed with ORT)
        "w4a8": QuantScheme("w4a8", "int4", "uint8", weight_symmetric=True, per_channel=True,
                            op_types=("MatMul",), min_opset=21, outlier_crest=16.0,
                            stream_16bit=True, block_size=32, block_scale_bits=4,
                            head_w8a16=True),
    },
)
