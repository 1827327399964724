"""ort-cpu: ONNX Runtime's CPU execution provider; the portable model.onnx is the artifact."""

from __future__ import annotations

from pathlib import Path

from edgec.errors import InternalError
from edgec.graph_passes.quantization.unsigned_weights import UnsignedWeightsPass
from edgec.targets.base import BuildResult, QuantScheme, Target

__all__ = ["ORT_CPU"]


# The weight blocks ONNX Runtime 1.31's CPU fuses into MatMulNBits (0: one scale per output
# channel, which it repacks): any other size (48, 512) stays a DequantizeLinear of the whole
# weight before a float MatMul, on every run.
MATMULNBITS_BLOCKS = (0, 16, 32, 64, 128, 256)

SCHEMES = {
    # u8 asymmetric activations × s8 symmetric per-channel weights: MLAS's fast int8 GEMM path.
    # Conv outputs quantized as well: ORT fuses DQ → Conv → Q into QLinearConv, its only int8 Conv.
    "w8a8": QuantScheme("w8a8", weights="int8", activations="uint8", fused_outputs=("Conv",),
                        reduce_range_pays=True),
    # int8 weight-only: uint8 weights with a scale and zero point per block of 32 input channels
    # (ONNX Runtime GenAI's int8), the embedding tables as int8 rows. ONNX Runtime fuses each
    # DequantizeLinear -> MatMul into MatMulNBits (bits=8), whose kernel rounds its input to int8
    # per block on the fly (accuracy_level 4, ORT's default; at level 1 the 8-bit kernel decoded
    # 30x slower than fp32). SmolLM2-135M (30 layers, AVX2; benchmarks/weight_only_int8.py):
    # decode 2.0 / 1.8x fp32 at a 128 / 1024-token prompt, KL 0.0037 nats/token (GenAI's int8:
    # 1.8 / 1.4x, KL 0.0042); per output channel (block=0, openvino-cpu's default) as fast but
    # KL 0.0062, the kernel's input rounding on top of the coarser grid (0.0033 on OpenVINO's
    # f32 compute). Prefill runs 0.6-0.7x fp32 there. It was u16 activations and s8 weights,
    # the NPU's form, which ORT CPU has no kernel for: every MatMul ran in float behind its
    # Q/DQ. Per channel, a tied head gets its own int8 weights (QuantScheme.tied_table_shared).
    "w8a16": QuantScheme("w8a16", weights="int8", activations=None, block_size=32, min_opset=21,
                         weight_backup_int8=True, weight_symmetric=False, partial_block=True,
                         tied_table_shared=False, block_sizes=MATMULNBITS_BLOCKS),
    "w4a16": QuantScheme("w4a16", weights="int4", activations=None, block_size=32,
                         min_opset=21, weight_backup_int8=True, weight_symmetric=False,
                         partial_block=True, block_sizes=MATMULNBITS_BLOCKS),
}


def _build(target: Target, model_path: Path, target_dir: Path, **options) -> BuildResult:
    import onnxruntime as ort

    from edgec.runtimes.ort import session_options

    # Creating a session is the legality check: unsupported ops or types fail here, not at run.
    # The source already loaded in ONNX Runtime (sources.py), so this model is edgec's output
    # (passes, quantization, opset conversion for a target whose schemes ORT CPU supports): a
    # load failure here is edgec's fault, never the user's, so none of it is a UserError.
    try:
        sess = ort.InferenceSession(str(model_path),
                                    sess_options=session_options(True, target.runtime_config),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise InternalError(
            f"ONNX Runtime CPU cannot load the rewritten model {model_path}: {first}. The source "
            "loaded, so this is an edgec bug: please report it with the traceback "
            "(EDGEC_DEBUG=1)") from e
    from edgec.targets.openvino_stateful import kv_pairs

    config = dict(target.runtime_config)
    if kv_pairs([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]):
        config.update(DECODER_CONFIG)  # a KV-cache decoder
    return BuildResult(
        runtime={"name": "ort", "model": "model.onnx", "providers": ["CPUExecutionProvider"],
                 "config": config},
        files=[],
    )


# A KV-cache decoder's step is ~150 small ops on one token: ORT's intra-op threads waking from
# sleep for each one cost more than the arithmetic. Spinning between ops (ORT's default, which
# ONNX Runtime GenAI and optimum keep) measured 2.2 -> 1.3-1.8 ms per decode step on llama
# small at a 128-token context (2 cores), and a decode loop is the only work on the cores.
DECODER_CONFIG = {"session.intra_op.allow_spinning": "1",
                  "session.inter_op.allow_spinning": "1"}



ORT_CPU = Target(
    name="ort-cpu",
    description="ONNX Runtime, CPU execution provider (fp32; the portable model.onnx runs as is)",
    runtime="ort",
    opset_range=(7, 23),
    static_shapes=False,
    precision="fp32",
    # No spin-waiting: ORT's intra-op threads otherwise spin between ops and fight over the
    # cores (2 here): with spinning the w8a8/fp32 ratio moved between batches of one run
    # (1.56–2.10×), without it it held (1.54–1.62×) at the same latency
    # (benchmarks/quantization.py).
    runtime_config={"graph_optimization_level": "ORT_ENABLE_ALL",
                    "session.intra_op.allow_spinning": "0",
                    "session.inter_op.allow_spinning": "0"},
    notes=("every standard ONNX op; dynamic shapes supported",),
    requires=("onnxruntime",),
    build=_build,
    schemes=SCHEMES,
    after_quantize=(UnsignedWeightsPass,),  # exact; only where this host's int8 saturates
)
