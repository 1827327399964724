"""openvino-cpu: OpenVINO native IR (.xml/.bin) run by the OpenVINO CPU plugin at fp32.

OpenVINO's CPU plugin defaults to bf16 on CPUs with AVX512-BF16/AMX, and ``save_model``
defaults to compressing weights to fp16; both would silently break fp32 fidelity, so the build
keeps fp32 weights and the runtime pins ``INFERENCE_PRECISION_HINT=f32``. The stateful decoder's
fused attention also keeps its KV cache in ``KV_CACHE_PRECISION`` (u8/bf16 by default on such
CPUs: 4e-3 relative error on logits), so that is pinned to f32 too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgec.errors import InternalError, UserError
from edgec.graph_passes.quantization.unsigned_weights import UnsignedWeightsPass
from edgec.runtimes.openvino_paged import BLOCK_SIZE, paged_model
from edgec.targets.base import BuildResult, QuantScheme, Target
from edgec.targets.openvino_int64 import int64_in_32_bits, warned_before
from edgec.targets.openvino_legalize import OpenVINOLegalizePass
from edgec.targets.openvino_stateful import kv_pairs, make_stateful

__all__ = ["OPENVINO_CPU"]

logger = logging.getLogger(__name__)


SCHEMES = {
    # OpenVINO's low-precision transformations want u8 (asymmetric) activations and i8
    # symmetric per-output-channel weights; they turn the QDQ pairs into int8 (VNNI) kernels.
    # Attention's Q, Kᵀ and V as s8 symmetric: a MatMul between two activations with zero
    # points runs in fp32 here, without them in int8 (all-MiniLM-L6-v2 at 128 tokens: 2.30× →
    # 2.62× fp32, min embedding cosine 0.9919 → 0.9912; see signed_attention_overrides).
    # Quantizers above the head reshapes, where NNCF puts them (see _quantize_before_layout).
    "w8a8": QuantScheme("w8a8", weights="int8", activations="uint8", signed_attention=True,
                        quantize_before_layout=True),
    "w4a16": QuantScheme("w4a16", weights="int4", activations=None, block_size=32,
                         min_opset=21, weight_backup_int8=True, weight_symmetric=False),
    # int8 weight-only: one uint8 grid and zero point per output channel (NNCF's INT8_ASYM,
    # optimum-intel's --weight-format int8), the embedding table as int8 rows; the CPU plugin
    # runs it as a FullyConnected decompressing u8 weights, f32 compute. A decode step reads a
    # quarter of the weight bytes: SmolLM2-135M (30 layers, AVX2) 1.53-1.71x fp32's tokens/s,
    # as OpenVINO GenAI on optimum-intel's int8 (1.57-1.71x), where w8a8 decodes no faster than
    # fp32 (benchmarks/weight_only_int8.py). A head tied to the embedding reads the table's int8
    # rows (blockwise._share_tied_tables): 136 MB, optimum-intel's 135. block=64 halves the KL
    # divergence on real text (0.0033 -> 0.0016 nats/token) at 0.80-0.87x the speed.
    "w8a16": QuantScheme("w8a16", weights="int8", activations=None, weight_backup_int8=True,
                         weight_symmetric=False),
}

# The KV cache of a generation artifact (--kv-cache): the CPU plugin stores it in the precision
# KV_CACHE_PRECISION names, in the stateful model's variables and in the paged blocks alike.
# u8 is what the plugin (and OpenVINO GenAI) use by default: keys quantized per channel within
# each 32-token block, values per token, each with an f32 scale and zero point stored in the
# block; f16 halves the cache. u4 crashed the stateful model (heap corruption, 2026.4) and bf16
# needs a CPU with bf16: neither is offered.
KV_CACHES = {
    "f32": {"KV_CACHE_PRECISION": "f32"},
    "f16": {"KV_CACHE_PRECISION": "f16"},
    "u8": {"KV_CACHE_PRECISION": "u8"},
}

# What OpenVINO's ONNX frontend says when an op (or an op's use) has no conversion for it.
_UNSUPPORTED = ("No conversion rule", "not supported")


def _input_is_output(graph) -> bool:
    """Whether a graph output of the ONNX graph is one of its inputs, passed through."""
    return bool({i.name for i in graph.input} & {o.name for o in graph.output})


def _build(target: Target, model_path: Path, target_dir: Path, **options) -> BuildResult:
    import onnx
    import openvino as ov
    from openvino.frontend import OpConversionFailure

    proto = onnx.load(str(model_path), load_external_data=False)  # the graph, not its weights
    try:
        # convert_model splits its path argument at commas (a list of files), so a directory
        # named like "out-keep=0.25,layer=2" would fail; the core's reader takes it whole.
        # convert_model also splits a graph input that is also a graph output into two
        # parameters (x, x_1; the output renamed x_1): the reader keeps one.
        reader = "," in str(model_path) or _input_is_output(proto.graph)
        ov_model = (ov.Core().read_model(str(model_path)) if reader else
                    ov.convert_model(str(model_path)))
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if any(m in ln for m in _UNSUPPORTED)), None)
        # Only an op the frontend cannot convert is the model's fault (unsupported on this
        # target). OpConversionFailure also reports ops that convert but fail validation (type
        # mismatches): the model edgec wrote is broken, as is any other failure here.
        if isinstance(e, OpConversionFailure) and detail:
            raise UserError(f"OpenVINO cannot convert the model: {detail}") from e
        # The frontend's first lines are boilerplate ("Check 'false' failed at ..."): name the op.
        first = detail or next((ln for ln in lines if "Conversion failed for" in ln),
                               lines[0] if lines else type(e).__name__)
        raise InternalError(
            f"OpenVINO failed to convert the rewritten model {model_path} "
            f"({type(e).__name__}: {first}); this is an edgec or OpenVINO bug: please report "
            "it with the traceback (EDGEC_DEBUG=1)") from e
    notes: list[str] = []
    runtime = {"name": "openvino", "model": "target/model.xml", "device": "CPU",
               "config": dict(target.runtime_config)}
    # the CPU plugin holds int64 in 32 bits: feeds checked at every run, outputs warned of
    narrow = int64_in_32_bits(proto)
    runtime["int64_in_32_bits"] = narrow
    if narrow["outputs"]:
        note = (f"int64 outputs {narrow['outputs']} are computed by arithmetic, which "
                f"{target.name} runs in 32 bits: values outside [-2**31, 2**31) wrap (or "
                "saturate) there, with no error; use ort-cpu where they can be that large")
        if not warned_before(target_dir / "model.xml"):
            logger.warning("%s", note)
        notes.append(note)
    names = [p.get_any_name() for p in ov_model.inputs]
    pairs = kv_pairs(names, [o.get_any_name() for o in ov_model.outputs])
    if pairs:  # a KV-cache decoder: the cache lives in OpenVINO (stateful, beam_idx)
        shape = ov_model.input(next(iter(pairs))).get_partial_shape()
        make_stateful(ov_model)
        kv_heads, head_dim = shape[1].get_length(), shape[3].get_length()
        runtime["stateful"] = {"pairs": pairs, "kv_shape": [kv_heads, head_dim]}
        kv_cache = (options.get("generation") or {}).get("kv_cache")
        if kv_cache:  # the plugin keeps the cache in this precision, stateful or paged
            runtime["config"].update(target.kv_caches[kv_cache])
            runtime["stateful"]["kv_cache"] = kv_cache
        # generate's fast path: the same IR in paged form (made again at load; checked here)
        outputs = {o.get_any_name() for o in ov_model.outputs}
        from edgec.exporters.decoder import checkpoint_meta, has_sliding_window  # imports torch

        if "attention_scores" in outputs:  # read from the full cache, which paging replaces
            paged, why = None, "the decoder outputs attention_scores over its whole cache"
        elif has_sliding_window(checkpoint_meta(model_path.parent)):
            # the transformation drops the graph's mask, window included: paged attention
            # attended over the whole cache (Mistral sliding_window 8: other tokens than HF)
            paged, why = None, "its sliding-window attention would attend over the whole cache"
        else:
            paged, why = paged_model(ov_model.clone(), len(pairs) // 2)
        if paged is not None:
            runtime["stateful"]["paged"] = {"block_size": BLOCK_SIZE}
        else:
            notes.append(f"generate runs the stateful model, not the paged one: {why}")
    target_dir.mkdir(parents=True, exist_ok=True)
    xml = target_dir / "model.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return BuildResult(runtime=runtime, files=["target/model.xml", "target/model.bin"],
                       notes=notes)


OPENVINO_CPU = Target(
    name="openvino-cpu",
    description="OpenVINO CPU plugin, native IR (model.xml/.bin), fp32 inference precision",
    runtime="openvino",
    opset_range=(7, 23),
    static_shapes=False,
    precision="fp32",
    runtime_config={"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                    "KV_CACHE_PRECISION": "f32"},
    notes=("ops as supported by OpenVINO's ONNX frontend; dynamic shapes supported",),
    requires=("openvino",),
    before_quantize=(OpenVINOLegalizePass,),
    after_quantize=(UnsignedWeightsPass,),  # exact; only where this host's int8 saturates
    build=_build,
    schemes=SCHEMES,
    kv_caches=KV_CACHES,
)
