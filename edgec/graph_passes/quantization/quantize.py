"""Quantization: fp32 graph ⇒ QDQ graph in the form the target's scheme asks for.

    MatMul(x, W)  ⇒  MatMul(DQ(Q(x; s_x, z_x)), DQ(W_q; s_w[, block]))      (per QuantScheme)

onnxruntime.quantization does the insertion (``quantize_static`` in QDQ format from cached
ranges, with the options the target's ``qdq_options`` gives, else the generic form below).
Block-wise weight-only int4 is done here (``blockwise``): ORT's MatMulNBitsQuantizer writes
negative scales in symmetric mode, which TensorRT refuses. This pass adds what ORT lacks: the
choice of what not to quantize (masks, integer paths, user exclusions; see ``select``), 16-bit
tensors on fully quantized targets, a real opset conversion where the scheme needs a newer opset,
and ranges from an edgec calibration cache (reused or collected on the graph this pass receives).
The pass is functional (its input is left as it was) and approximating: the pipeline reports its
error against the fp32 model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import PassResult
from edgec.graph_passes.quantization.blockwise import blockwise_weights
from edgec.graph_passes.quantization.options import DEFAULT_MAX_KLD, DEFAULT_MIN_COS
from edgec.graph_passes.quantization.select import (
    FLOAT_NODES_KEY,
    FLOAT_STREAM_REASON,
    plan_quantization,
)

__all__ = ["QuantizePass", "quant_type", "generic_qdq_options", "float8_overrides",
           "FLOAT8_MAX"]

logger = logging.getLogger(__name__)


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    table = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int16": QuantType.QInt16,
             "uint16": QuantType.QUInt16, "int4": QuantType.QInt4, "uint4": QuantType.QUInt4,
             "float8e4m3fn": QuantType.QFLOAT8E4M3FN}
    return table[name]


def generic_qdq_options(model: ir.Model, path: Path, scheme, plan, method) -> dict[str, Any]:
    """``quantize_static`` options straight from the scheme's fields (CPU targets, TensorRT)."""
    return dict(activation_type=quant_type(scheme.activations),
                weight_type=quant_type(scheme.weights),
                op_types_to_quantize=list(scheme.op_types), per_channel=scheme.per_channel,
                nodes_to_exclude=plan.nodes_to_exclude, reduce_range=scheme.reduce_range,
                extra_options={"ActivationSymmetric": scheme.activation_symmetric,
                               "WeightSymmetric": scheme.weight_symmetric,
                               "QuantizeBias": scheme.quantize_bias,
                               "MinimumRealRange": 1e-4,
                               **({} if scheme.quantize_outputs else {
                                   "OpTypesToExcludeOutputQuantization": [
                                       t for t in scheme.op_types
                                       if t not in scheme.fused_outputs]})})


def signed_attention_overrides(model: ir.Model, excluded: set[str], cache) -> dict[str, Any]:
    """``TensorQuantOverrides`` giving both inputs of each MatMul between two activations
    (attention's Q·Kᵀ and P·V) s8 symmetric, except an input that is never negative (the
    softmax probabilities P, which stay u8 with a zero point of 0): OpenVINO runs such a MatMul
    in int8 only when its inputs have no zero point, and in fp32 otherwise.

    Measured on all-MiniLM-L6-v2 at 128 tokens on OpenVINO (one interleaved run, no mixed
    precision): 2.30× fp32 with u8 inputs, 2.57× with Kᵀ/V s8, 2.62× with Q, Kᵀ and V s8 (every
    attention MatMul int8, as NNCF places them); min embedding cosine on real sentences 0.9919
    / 0.9909 / 0.9912."""
    signed = [{"quant_type": quant_type("int8"), "symmetric": True}]
    out: dict[str, Any] = {}
    for n in model.graph:
        if n.op_type != "MatMul" or n.name in excluded or not all(
                v is not None and v.const_value is None for v in n.inputs[:2]):
            continue
        for v in n.inputs[:2]:
            stats = cache.tensors.get(v.name)
            if stats is not None and stats["lowest"] < 0:
                out[v.name] = signed
    return out


# The largest finite magnitude of each float8 type a scheme may name.
FLOAT8_MAX = {"float8e4m3fn": 448.0}


def float8_overrides(model: ir.Model, cache, scheme) -> dict[str, Any]:
    """``TensorQuantOverrides`` giving every calibrated activation and every weight of the
    scheme's ops a float8 scale of absmax / 448: the largest calibrated (or weight) magnitude
    lands on e4m3's largest value, as TensorRT's and ModelOpt's fp8 recipes set it.

    ONNX Runtime's quantizer sets a float8 scale from the standard deviation alone, whatever
    the calibration method (σ / σ of all finite e4m3 values, σ_f8 = 100.06: a Gaussian fit
    that clips at 4.48 σ), for activations and weights. LLM activations are heavy-tailed:
    SmolLM2-135M cut to 2 layers had tensors clipped at ±7.2 with an absmax of 25, and its
    TensorRT fp8 logits fell to cosine 0.765 vs fp32 (w8a8 on the same target: 0.9997).
    The scale is per tensor (the scheme has ``per_channel=False``)."""
    import ml_dtypes
    import numpy as np

    if scheme.per_channel:
        raise ValueError("float8 scales from absmax are per tensor; the scheme is per channel")
    top = FLOAT8_MAX[scheme.activations]
    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)

    def entry(absmax: float) -> list[dict[str, Any]]:
        # at least MinimumRealRange's 1e-4 wide, as the integer schemes
        return [{"scale": np.array(max(absmax, 5e-5) / top, dtype=np.float32),
                 "zero_point": zero}]

    out = {name: entry(max(abs(float(np.min(st["lowest"]))), abs(float(np.max(st["highest"])))))
           for name, st in cache.tensors.items()}
    for node in model.graph:
        if node.op_type not in scheme.op_types:
            continue
        for v in node.inputs[:2]:  # MatMul/Gemm/Conv weights; biases stay float
            if v is not None and v.const_value is not None and v.name in model.graph.initializers:
                out[v.name] = entry(float(np.abs(v.const_value.numpy()).max()))
    return out


class _DropOrtQuantizationRecords(logging.Filter):
    """quantize_static logs "consider pre-processing" warnings on the root logger every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


@contextlib.contextmanager
def _quiet_ort_quantization() -> Iterator[None]:
    # A filter on the root logger sees only records logged on it directly (ORT's); no level of
    # any logger changes, and every other library's records pass.
    root, quiet = logging.getLogger(), _DropOrtQuantizationRecords()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


Ranges = Callable[[ir.Model], tuple[Any, str]]


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                  "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger",
                  "MatMulNBits"}


def _nothing_quantized(s, exclude: tuple[str, ...], skipped: dict[str, str] | None = None
                       ) -> str:
    """The refusal of a scheme that would quantize nothing (a float artifact, reported as
    quantized)."""
    if exclude:
        why = f"exclude={','.join(exclude)} leaves nothing to quantize"
    elif skipped:
        first = next(iter(skipped.items()))
        why = f"no weight it can quantize ({len(skipped)} left float; {first[0]}: {first[1]})"
    else:
        ops = ("MatMul", "Gemm") if s.weight_only else s.op_types
        why = f"the model has no op {s.name} quantizes here ({', '.join(ops)})"
    return (f"--quantize {s.name}: {why}; drop --quantize or what excludes every layer (the "
            f"artifact would be float, reported as {s.name})")


def _generated_note(source: str) -> str:
    """What a miss on generated samples may mean: a trained language model's logits on random
    token ids are far more fragile than on text (SmolLM2-135M w8a16 on openvino-cpu: held-out
    cosine 0.880, KL 0.57 on random tokens, 0.9987 and 0.0051 on held-out text; on 512 tokens of
    English 0.9896, KL 0.0033, as optimum-intel's int8 on the same text: 0.9888, 0.0034)."""
    if source == "text":
        return ("; these samples were a checkpoint's windows of edgec's English passages: give "
                "samples of your own domain with --calib FILE.npz (a decoder's: input_ids alone)")
    if source != "generated":
        return ""
    return ("; these samples were generated (a language model's: random token ids, on which a "
            "trained model is far more fragile than on text): give real samples with --calib "
            "FILE.npz (a decoder's: input_ids alone) to measure the floor on them")


class QuantizePass(ir.passes.FunctionalPass):
    """Quantize with ``scheme`` (a targets.QuantScheme) in ``target``'s form.

    ``ranges``: a CalibrationCache, or ``model -> (cache, how)`` called with the graph this pass
    receives (check a given cache against it, or calibrate it now); None for weight-only schemes.
    """

    name = "quantize"
    exact = False
    rtol = None

    def __init__(self, scheme, target, ranges: Any = None, exclude: tuple[str, ...] = (),
                 floor=None, held_out: Callable | None = None, gptq: Callable | None = None,
                 held_out_source: str = "generated",
                 progress: Callable[[str], None] | None = None,
                 bindings: Callable | None = None, keep_zeros: bool = False,
                 sampling: Mapping[str, Any] | None = None, sample_steps: int | None = None):
        super().__init__()
        # what the floor's search is doing, for the compile's progress (sensitivity runs for
        # half an hour on an 8192-token DiT, silent before)
        self.progress = progress or (lambda message: None)
        self.gptq = gptq  # calibration samples for GPTQ weight rounding (None: nearest)
        self._gptq_memo: dict[str, Any] = {}
        self.keep_zeros = keep_zeros  # pruned weights: GPTQ keeps their exact zeros
        self._block_stats: dict[int, dict[str, Any]] = {}  # LPBQ stats per quantized graph
        if scheme.calibrated and ranges is None:
            raise ValueError(f"scheme {scheme.name} needs calibration ranges")
        self.scheme, self.target, self.ranges, self.exclude = scheme, target, ranges, tuple(exclude)
        self.floor, self.held_out = floor, held_out  # mixed_precision.Floor or None
        # where held_out's samples come from: "generated" (past the calibration count), "data"
        # (a user's .npz, kept out of calibration), "calibration" (a user's .npz, seen by it)
        self.held_out_source = held_out_source
        # model → a swappable-LoRA graph's adapters (name, feeds): the floor holds for each
        self.bindings = bindings
        # what the floor was measured on, for the compile to measure the built artifact's
        # runtime on it too: (held-out feeds, fp32 outputs, masks, Floor, the adapter bound in
        # each feed or None); None: no floor ran
        self.floor_samples = None
        # a denoiser's sampling entry: the floor also measures a whole generation
        # (``sample_check``), which compounds what each call loses
        self.sampling = sampling
        self.sample_steps = sample_steps  # None: sample_check.SAMPLE_STEPS; 0: no sample

    def call(self, model: ir.Model) -> PassResult:
        s = self.scheme
        quantized = sum(n.op_type in QUANTIZED_OPS for n in model.graph)
        if quantized:  # ORT's quantizer would skip it (ort-cpu) or redeclare tensors (QNN)
            raise UserError(f"the model is already quantized ({quantized} QuantizeLinear/"
                            "DequantizeLinear or integer nodes); compile its float model with "
                            "--quantize (or this one without --quantize, on a target that "
                            "takes models as they are: ort-cpu, openvino-cpu; tensorrt where "
                            "its quantization is TensorRT's, symmetric int8)")
        half = next((v.name for v in (*model.graph.inputs, *model.graph.initializers.values())
                     if v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)), None)
        if half is not None:  # ORT's quantizer wrote float32 scales beside it: InvalidGraph
            raise UserError(f"the model computes in 16-bit floats ({half!r}); --quantize takes "
                            "a float32 model: export it in float32 and quantize that")
        unknown = [e for e in self.exclude if not any(n.name == e or n.op_type == e
                                                       for n in model.graph)]
        floor = self.floor and self.floor.for_outputs([v.name for v in model.graph.outputs],
                                                      DEFAULT_MAX_KLD)
        if unknown:
            raise UserError(_unknown_exclusion(model, unknown[0], s.op_types))
        cache, how = (None, None)
        if s.calibrated:
            cache, how = self.ranges(model) if callable(self.ranges) else (self.ranges, "given")
        outliers = _outliers(cache, s) if self.target.fully_quantized else set()
        plan = plan_quantization(model, self.target.fully_quantized, self.exclude, outliers,
                                 s.stream_16bit, s.head_w8a16, s.float_stream, s.head_float)
        if s.float_stream and cache is not None:
            _check_fp16_stream(model, plan, cache)
        work = _at_opset(model.clone(), s.min_opset)  # the input model stays as it was
        extra: dict[str, Any] = {}
        if s.weight_only:
            extra = blockwise_weights(work, s, set(plan.nodes_to_exclude))
            if not extra["weights_blockwise"] and not extra.get("embeddings_int8"):
                raise UserError(_nothing_quantized(s, self.exclude, extra.get("skipped")))
            quantized = self._rounded(model, work)
            if floor is not None:  # measured and warned about: no activation to search
                quantized, plan, extra["mixed_precision"] = self._mixed(model, quantized, plan,
                                                                        cache, outliers, floor)
        else:
            quantized = self._static(work, plan, cache)
            if not any(n.op_type == "DequantizeLinear" for n in quantized.graph):
                raise UserError(_nothing_quantized(s, self.exclude))
            if floor is not None:
                quantized, plan, extra["mixed_precision"] = self._mixed(model, quantized, plan,
                                                                        cache, outliers, floor)
        if self.gptq is not None:  # the stats of the GPTQ run on the graph kept
            extra.update(self._gptq_memo["stats"][id(quantized)])
        extra.update(self._block_stats.get(id(quantized), {}))
        if extra.get("skipped"):  # named in the report and the manifest too
            logger.warning("%s: %s weights left in float (%s)", s.name, len(extra["skipped"]),
                           "; ".join(f"{n}: {why}" for n, why in extra["skipped"].items()))
        ops = Counter(n.op_type for n in quantized.graph)
        quantized.metadata_props.update(model.metadata_props)
        stats: dict[str, Any] = {
            "config": {"scheme": s.name, "weights": s.weights, "activations": s.activations,
                       "method": cache.method if cache else None, "exclude": list(self.exclude)},
            "scheme": dataclasses.asdict(s),
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0),
            "excluded_nodes": len(plan.nodes_to_exclude),
            "tensors_16bit": len(plan.tensors_16bit),
            "outlier_tensors_16bit": len(outliers),
            "stream_tensors_16bit": len(plan.stream_tensors),
            "heads_w8a16": list(plan.head_nodes),
            "heads_float": sorted(n for n, why in plan.reasons.items()
                                  if why.startswith("output head")),
            "kept_w8a16": len(plan.wide_nodes),
            "mask_tensors": len(plan.mask_tensors),
            "opset": quantized.opset_imports.get(""),
            **extra,
        }
        if cache is not None:
            stats["calibration"] = {"how": how, "method": cache.method, "samples": cache.samples,
                                    "data": cache.data, "model_hash": cache.model_hash,
                                    "seconds": round(cache.seconds, 3),
                                    "tensors": len(cache.tensors)}
        return PassResult(quantized, True, stats)

    def _mixed(self, model: ir.Model, quantized: ir.Model, plan, cache, outliers, floor):
        """Keep the fewest most sensitive layers in high precision so that the held-out samples
        hold the floor (see ``mixed_precision``). The graph as quantized is measured first; the
        per-layer analysis runs only when it misses."""
        from edgec.graph_passes.quantization.keep_float import keep_float
        from edgec.graph_passes.quantization.mixed_precision import (
            Floor,
            integer_activations,
            layer_errors,
            quantized_widths,
            search_exclusions,
        )
        from edgec.runtimes.ort import run_samples

        s, fq = self.scheme, self.target.fully_quantized
        feeds, adapters = self._held_out(model)
        masks = [f.get("attention_mask") for f in feeds]
        reference = run_samples(model, feeds)
        # on a target whose runtime is ONNX Runtime the probes run as the artifact will, with
        # its graph optimizations (QDQ fused into integer kernels, whose rounding differs from
        # the QDQ graph's): the unfused run met a floor that the artifact then missed (trained
        # terrain UNet, w8a8 on ort-cpu: 0.9818 searched, 0.9795 on the artifact)
        fused = self.target.runtime == "ort"
        built = {0: (quantized, plan)}  # graphs quantize_static made, by layers kept
        measured: dict[int, dict[str, float]] = {}
        each: dict[int, dict[str, dict[str, float]]] = {}  # per adapter bound (swappable LoRA)
        ranked: list = []

        def build(k: int):
            if k not in built:
                names = tuple(e.node for e in ranked[:k])
                p = plan_quantization(model, fq, self.exclude + names, outliers, s.stream_16bit,
                                      s.head_w8a16, s.float_stream, s.head_float)
                built[k] = (self._static(_at_opset(model.clone(), s.min_opset), p, cache), p)
            return built[k]

        def probe(k: int) -> ir.Model:
            """The graph with the k most sensitive layers kept: on a target where that means
            float, the k = 0 graph edited (``keep_float``), else quantized again."""
            if k not in built and not fq:
                try:
                    kept = [e.node for e in ranked[:k]]
                    edited = keep_float(quantized, model, kept)
                    if s.fused_outputs:  # a kept Conv's readers read its float output again
                        _float_for_other_readers(edited, set(s.op_types),
                                                 set(plan.nodes_to_exclude) | set(kept),
                                                 set(s.fused_outputs))
                    return edited
                except LookupError as e:
                    logger.debug("probe rebuilt: %s", e)
            return build(k)[0]

        def measure(k: int) -> dict[str, float]:
            if k not in measured:
                if k:
                    self.progress(f"accuracy floor: measuring with the {k} most sensitive "
                                  f"layers in {'16 bits' if fq else 'float'}")
                outputs = run_samples(probe(k), feeds, optimize=fused)
                measured[k] = floor.score(outputs, reference, masks)
                each[k] = floor.by_adapter(outputs, reference, masks, adapters)
            return measured[k]

        self.floor_samples = (feeds, reference, masks, floor, adapters)
        self.progress(f"accuracy floor {floor.describe()}: measuring the quantized graph on "
                      f"{len(feeds)} held-out samples")
        first = measure(0)
        # float8 (fp8): measured and warned about, not searched: the per-layer analysis
        # fake-quantizes integer activations only
        searchable = integer_activations(s)
        if not floor.met(first) and searchable:
            self.progress(f"accuracy floor not met as quantized ({_fmt(first)}): measuring each "
                          "layer's sensitivity")
            ranked = layer_errors(model, feeds, cache, s, s.op_types,
                                  set(plan.nodes_to_exclude), set(plan.tensors_16bit), floor,
                                  kept_bits=16 if fq else None,
                                  widths=quantized_widths(quantized),
                                  progress=lambda i, n: self.progress(
                                      f"layer sensitivity: run {i}/{n}"))
        k, score, probes = search_exclusions(ranked, measure, floor.met)
        rebuilt = None
        if k not in built and (floor.met(score) or not floor.default):
            # the choice as quantize_static makes it, measured again: what the artifact holds
            outputs = run_samples(build(k)[0], feeds, optimize=fused)
            rebuilt = floor.score(outputs, reference, masks)
            each[k] = floor.by_adapter(outputs, reference, masks, adapters)
            if floor.met(score) and not floor.met(rebuilt):
                logger.warning("the quantized graph with %d layers kept measured %s where its "
                               "probe measured %s", k, _fmt(rebuilt), _fmt(score))
            score = rebuilt
        if not searchable and not floor.met(score):
            # weight-only: 4-bit weights after a rotation with nearest rounding (llama
            # tiny+outliers w4a16 hadamard: cosine 0.19) exited 0 with no word
            remedy = ("try " + ("gptq=true, " if self.gptq is None else "")
                      + "exclude= on the most sensitive layers (kept float), or w8a8"
                      if s.weight_only
                      else "keep the sensitive layers float with exclude= (an LM head first: "
                      "SmolLM2-135M's cost fp8 its KL bound), or use w8a8, which searches")
            logger.warning("%s misses the accuracy floor %s on %d held-out samples (%s), and "
                           "has no per-layer precision search: %s%s", s.name, floor.describe(),
                           len(feeds), _fmt(score), remedy, _generated_note(self.held_out_source))
        elif not floor.met(score) and floor.default and k:
            # not the user's floor: keeping every layer in high precision buys speed for
            # nothing when even that misses it; keep the plain quantization and say so
            logger.warning("the default accuracy floor %s is not reached (%s as quantized, %s "
                           "with all %d candidates in high precision); kept the plain "
                           "quantization (--rotate, smooth=, gptq=true or a 16-bit scheme act "
                           "where per-layer precision cannot)", floor.describe(), _fmt(first),
                           _fmt(score), len(ranked))
            k, score, rebuilt = 0, first, None
        elif not floor.met(score):
            logger.warning("%s not reached: %s with all %d candidates kept", floor.describe(),
                           _fmt(score), len(ranked))
        elif 2 * k > len(ranked):
            logger.warning("holding %s kept %d of %d layers in %s: most of what quantization "
                           "buys is gone (--rotate, smooth= or gptq=true can hold it with fewer)",
                           floor.describe(), k, len(ranked), "16 bits" if fq else "float")
        entry = {"min_cos": floor.min_cos, "max_kld": floor.max_kld, "default": floor.default,
                 "achieved": round(score["cosine"], 6),
                 "held_out": len(feeds) // len(set(adapters or [None])),
                 "held_out_source": self.held_out_source,
                 # a user's .npz too small to spare them: calibration saw them (optimistic)
                 "held_out_seen_by_calibration": self.held_out_source == "calibration",
                 "reached": floor.met(score), "candidates": len(ranked) or None,
                 "kept": [e.to_json() for e in ranked[:k]],
                 "precision": "w8a16" if fq else "float", "probes": probes,
                 "layer_errors": [e.to_json() for e in ranked]}
        if "kld" in score:
            entry["achieved_kld"] = round(score["kld"], 6)
        if not floor.default:  # a bound given replaces the default floor: say which it dropped
            default = Floor(DEFAULT_MIN_COS, default=True).for_outputs(
                [v.name for v in model.graph.outputs], DEFAULT_MAX_KLD)
            dropped = {b: getattr(default, b) for b in ("min_cos", "max_kld")
                       if getattr(floor, b) is None and getattr(default, b) is not None}
            if dropped:
                entry["default_dropped"] = dropped
        if adapters:  # each adapter's own score: which one a miss is on
            entry["adapters"] = each[k]
        if rebuilt is not None:  # the probes were edits of the k = 0 graph (keep_float)
            entry["rebuilt"] = {m: round(v, 6) for m, v in rebuilt.items()}
        if self.sampling and self.sample_steps != 0:
            entry["sample"] = self._whole_sample(model, built[k][0], feeds[0], floor)
        return (*built[k], entry)

    def _whole_sample(self, model: ir.Model, quantized: ir.Model, feeds, floor
                      ) -> dict[str, Any]:
        """A whole generation of the graph kept against the fp32 graph's (``sample_check``)."""
        from edgec.graph_passes.quantization.sample_check import SAMPLE_STEPS, whole_sample

        steps = self.sample_steps or SAMPLE_STEPS
        self.progress(f"accuracy floor: a {steps}-step generation, fp32 and quantized")
        return whole_sample(model, quantized, self.sampling, feeds, floor.min_cos, steps)

    def _held_out(self, model: ir.Model) -> tuple[list[dict], list[str] | None]:
        """The floor's held-out samples and, on a swappable-LoRA graph, each of them again with
        each adapter it ships bound (the adapter of each feed): held on the base alone, the
        floor was reported reached while the default adapter ran at cosine 0.88."""
        feeds = self.held_out(model)
        bound = self.bindings(model) if self.bindings else []
        if not bound:
            return feeds, None
        return ([{**x, **b} for _, b in bound for x in feeds],
                [name for name, _ in bound for _ in feeds])

    def _static(self, model: ir.Model, plan, cache) -> ir.Model:
        from onnxruntime.quantization import QuantFormat, quantize_static
        from onnxruntime.quantization.calibrate import save_tensors_data

        from edgec.graph_passes.quantization.ort_scans import fast_ort_scans
        from edgec.graph_passes.quantization.ort_weights import fast_ort_weights
        from edgec.onnx_io import save_model

        s = self.scheme
        tensors = cache.to_tensors_data()
        absmax_float8 = (s.activations or "").startswith("float8") and (
            cache.method != "distribution")  # distribution: ORT's own σ-based scale
        if absmax_float8:
            # quantize_static takes float8 only from a Distribution cache; every float8 scale
            # comes from float8_overrides, so the label is all it reads
            from onnxruntime.quantization import CalibrationMethod

            tensors.calibration_method = CalibrationMethod.Distribution
        options = self.target.qdq_options or generic_qdq_options
        with (tempfile.TemporaryDirectory(prefix="edgec-quant-") as tmp,
              _quiet_ort_quantization(), fast_ort_scans(), fast_ort_weights()):
            src, out, ranges = (Path(tmp) / n for n in ("fp32.onnx", "quantized.onnx",
                                                         "ranges.json"))
            _unshare_biases(model)
            save_model(model, src)  # with external data: no 2 GB protobuf limit
            save_tensors_data(tensors, ranges)
            kwargs = options(model, src, self.scheme, plan, tensors.calibration_method)
            if self.scheme.signed_attention:
                kwargs["extra_options"]["TensorQuantOverrides"] = signed_attention_overrides(
                    model, set(plan.nodes_to_exclude), cache)
            if absmax_float8:
                kwargs["extra_options"].setdefault("TensorQuantOverrides", {}).update(
                    float8_overrides(model, cache, s))
            try:
                quantize_static(str(src), str(out), None, quant_format=QuantFormat.QDQ,
                                calibrate_method=tensors.calibration_method,
                                use_external_data_format=True,
                                calibration_cache_path=str(ranges), **kwargs)
            except KeyError as e:
                raise UserError(f"the calibration cache has no range for tensor {e}; it was "
                                "made for another graph: re-run `edgec calibrate`") from None
            except ValueError as e:  # ORT: "Quantization parameters are not specified for ..."
                if "not specified for" not in str(e):
                    raise
                found = re.search(r"for (?:param )?(\S+?)\.?(?:\s|$)", str(e))
                tensor = found.group(1) if found else "?"
                raise UserError(f"the calibration cache has no range for tensor {tensor!r} "
                                "(the cache is incomplete or edited): re-run `edgec calibrate`"
                                ) from None
            quantized = ir.load(out)
            ir.external_data.load_to_model(quantized)  # the temp dir goes away
        if self.target.fully_quantized and plan.nodes_to_exclude:
            _float_readers_skip_converts(quantized, set(plan.nodes_to_exclude))
            quantized.metadata_props[FLOAT_NODES_KEY] = str(len(plan.nodes_to_exclude))
        if not (self.target.fully_quantized or self.scheme.quantize_outputs):
            _float_for_other_readers(quantized, set(self.scheme.op_types),
                                     set(plan.nodes_to_exclude), set(self.scheme.fused_outputs))
        if self.scheme.quantize_before_layout:
            _quantize_before_layout(quantized)
        if s.block_size and s.block_scale_bits:  # block-wise weights in the device's LPBQ form
            from edgec.graph_passes.quantization.lpbq import lpbq_weights

            self._block_stats[id(quantized)] = lpbq_weights(model, quantized, s.block_size,
                                                            s.block_scale_bits)
        return self._rounded(model, quantized)

    def _rounded(self, fp32: ir.Model, quantized: ir.Model) -> ir.Model:
        """GPTQ's weight integers in place of nearest rounding, when asked for (``gptq``);
        ``fp32`` is the graph ``quantized`` was made from (its activations give H)."""
        if self.gptq is None:
            return quantized
        from edgec.graph_passes.quantization.gptq import gptq_weights

        memo = self._gptq_memo
        if "samples" not in memo:
            memo["samples"] = self.gptq(fp32)
        memo.setdefault("stats", {})[id(quantized)] = gptq_weights(
            fp32, quantized, memo["samples"], memo, keep_zeros=self.keep_zeros,
            reduce_range=self.scheme.reduce_range)
        return quantized


def _unknown_exclusion(model: ir.Model, name: str, op_types) -> str:
    """The one line refusing ``exclude=name``: the graph's closest node names and op types, else
    a few nodes of the op types the scheme quantizes. It pointed at `edgec inspect`, which lists
    op types only; the names are those of the graph the quantize stage receives (after
    rotation, splits...)."""
    import difflib

    names = [n.name for n in model.graph if n.name]
    ops = sorted({n.op_type for n in model.graph})
    close = difflib.get_close_matches(name, names + ops, n=5, cutoff=0.6)
    if close:
        hint = f"close matches: {', '.join(close)}"
    else:
        quantized = [n.name for n in model.graph if n.name and n.op_type in set(op_types)]
        some = ", ".join(quantized[:5]) + (f" (of {len(quantized)})" if len(quantized) > 5
                                           else "")
        hint = (f"op types it quantizes: {', '.join(op_types)}"
                + (f"; their nodes: {some}" if quantized else ""))
    return f"--quantize exclude={name!r} names no node or op type of the model; {hint}"


# ops whose input 2 onnxruntime.quantization quantizes as a bias (int32, scale from inputs 0 and 1)
_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "InstanceNormalization",
                       "LayerNormalization", "BatchNormalization"})


def _unshare_biases(model: ir.Model) -> int:
    """Give each node its own copy of a bias initializer that several such nodes share.

    quantize_static copies a shared bias itself, but names the copy ``{name}{n}`` after checking
    initializer names only: the exporter's ``val_20`` (the zeros bias every GroupNorm's
    InstanceNormalization shares) became ``val_207``, an existing activation's name, and the
    quantizer failed with "Quantization parameter shared mode is not supported for weight yet".
    """
    graph = model.graph
    taken = {v.name for node in graph for v in (*node.inputs, *node.outputs) if v is not None}
    taken |= set(graph.initializers) | {v.name for v in graph.inputs}
    copies = 0
    for value in list(graph.initializers.values()):
        users = [(n, i) for n, i in value.uses() if i == 2 and n.op_type in _BIAS_OPS]
        if len(users) < 2 or value.const_value is None:
            continue
        for k, (node, i) in enumerate(users[1:], 1):
            name = f"{value.name}_copy{k}"
            while name in taken:
                name += "_"
            taken.add(name)
            copy = ir.Value(name=name, type=value.type, shape=value.shape,
                            const_value=ir.tensor(value.const_value.numpy().copy(), name=name))
            graph.register_initializer(copy)
            node.replace_input_with(i, copy)
            copies += 1
    return copies


def _float_readers_skip_converts(model: ir.Model, excluded: set[str]) -> int:
    """On a fully quantized target, give each float (``excluded``) node the first
    DequantizeLinear of the tensor it reads: ONNX Runtime's QNN config counts a float reader as
    one of the default activation type and converts a 16-bit tensor to it
    (``DQ16 → Q8 → DQ8 → reader``), so a float residual Add read the 16-bit output of a down
    projection at 8 bits (SmolLM2-135M, R1 + R2, fp16 stream: logits relative error on ONNX
    Runtime 0.136 so, 0.034 reading the 16-bit tensor). The MatMul keeps its output Q/DQ, which
    the HTP's quantized MatMul needs. Returns the number of inputs rewired."""
    rewired = 0
    for node in model.graph:
        if node.name not in excluded:
            continue
        for index, v in enumerate(node.inputs):
            first = v
            while _converted_from(first) is not None:
                first = _converted_from(first)
            if first is not v:
                node.replace_input_with(index, first)
                rewired += 1
    if rewired:  # the converts nothing reads now
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return rewired


def _converted_from(v: ir.Value | None) -> ir.Value | None:
    """``x`` where ``v`` is ``DQ(Q(x))`` and ``x`` itself a DequantizeLinear's output (a
    convert between two quantized types), else None."""
    dq = v.producer() if v is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None:
        return None
    x = q.inputs[0]
    return x if x.producer() is not None and x.producer().op_type == "DequantizeLinear" else None


def _float_for_other_readers(model: ir.Model, op_types: set[str],
                             excluded: set[str] = frozenset(),
                             fused: set[str] = frozenset()) -> int:
    """Give every reader of a quantized activation that is not a quantized op the float
    tensor back: ``x → Q → DQ → {MatMul, Add}`` becomes ``DQ → MatMul`` and ``x → Add``. The
    same for the ``excluded`` nodes (kept in float): quantize_static leaves an excluded MatMul
    reading the DequantizeLinear of an input it shares with quantized ones (q/k/v's normed
    input), so a projection kept in float still read 8-bit activations (llama tiny+outliers,
    ort-cpu, q/k/v of layer 0 kept: worst cosine 0.9888 so, 0.9916 reading float).

    quantize_static rewires *every* consumer of a tensor it quantizes for a MatMul to the
    DequantizeLinear's output. In a post-norm encoder the norm's output is also the residual
    stream, so the residual Adds read it at 8 bits (all-MiniLM-L6-v2: values up to 28, a step
    of 0.14) though no integer kernel consumes them there. On the CPU targets and TensorRT the
    placement is quantizers on the inputs of quantized ops only, as NNCF places them.

    ``fused``: op types whose quantized outputs stay quantized for every reader (the scheme's
    ``fused_outputs``: ONNX Runtime fuses DQ → Conv → Q into QLinearConv only where the Q is
    the Conv's one reader), unless the node is excluded; a pair left with no reader goes.
    Returns the number of inputs rewired.
    """
    rewired = 0
    for dq in list(model.graph):
        if dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
            continue
        q = dq.inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None:
            continue
        x = q.inputs[0]
        if x.const_value is not None:  # a weight: its readers are the quantized op
            continue
        maker = x.producer()
        if maker is not None and maker.op_type in fused and maker.name not in excluded:
            continue
        for node, index in list(dq.outputs[0].uses()):
            if node.op_type not in op_types or node.name in excluded:
                node.replace_input_with(index, x)
                rewired += 1
        if not dq.outputs[0].uses() and dq.outputs[0] not in model.graph.outputs:
            model.graph.remove(dq, safe=True)
            if not q.outputs[0].uses():
                model.graph.remove(q, safe=True)
    return rewired


_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _quantize_before_layout(model: ir.Model) -> int:
    """Move each per-tensor Q/DQ pair above the layout ops that feed it alone:
    ``y → Reshape → Transpose → Q → DQ → MatMul`` becomes ``y → Q → DQ → Reshape → Transpose →
    MatMul``. Exact (a per-tensor quantizer commutes with moving elements), and where NNCF puts
    them: ORT's quantizer places them at the MatMul input, after attention's head reshapes, and
    OpenVINO then runs 30 standalone FakeQuantize nodes on all-MiniLM-L6-v2 instead of 18 and
    is slower (2.59× → 2.67× fp32 at 128 tokens once moved, NNCF 2.65×, same run). Returns the
    number of moves."""
    moved = 0
    for q in [n for n in model.graph if n.op_type == "QuantizeLinear"]:
        while (layout := _movable_past(q)) is not None:  # up through a chain of layout ops
            x, dq = q.inputs[0], next(n for n, _ in q.outputs[0].uses())
            uses = list(dq.outputs[0].uses())
            q.replace_input_with(0, layout.inputs[0])
            layout.replace_input_with(0, dq.outputs[0])
            for node, index in uses:
                node.replace_input_with(index, x)
            moved += 1
    if moved:
        model.graph.sort()
    return moved


def _movable_past(q: ir.Node) -> ir.Node | None:
    """The layout op a per-tensor activation Q (read by one DQ) can move above: it feeds the Q
    alone and its output is not a graph output."""
    x, scale = q.inputs[0], q.inputs[1]
    layout = x.producer() if x is not None else None
    if (layout is None or layout.op_type not in _LAYOUT_OPS or len(x.uses()) != 1
            or x.is_graph_output() or scale.const_value is None or scale.const_value.size != 1
            or layout.inputs[0] is None or layout.inputs[0].const_value is not None):
        return None
    readers = [n for n, _ in q.outputs[0].uses()]
    if len(readers) != 1 or readers[0].op_type != "DequantizeLinear":
        return None
    return layout


def _outliers(cache, scheme) -> set[str]:
    """Tensors whose measured crest factor exceeds the scheme's limit (8 bits cannot hold)."""
    if cache is None or scheme.outlier_crest is None:
        return set()
    if any("crest" not in s for s in cache.tensors.values()):
        raise UserError("the calibration cache has no per-tensor crest factors, which scheme "
                        f"{scheme.name} uses to choose 16-bit tensors (made by an older edgec?); "
                        "re-run `edgec calibrate`")
    return {name for name, s in cache.tensors.items() if s["crest"] > scheme.outlier_crest}


FP16_MAX = 65504.0  # the largest finite float16


def _check_fp16_stream(model: ir.Model, plan, cache) -> None:
    """``stream=fp16``: the residual stream's sums run in fp16 on the device, so a sum whose
    calibrated range passes fp16's largest value would be inf there (trained networks reach
    it: Adaptive Diffusion Terrain's UNet carries ~10⁹ in its residual stream; fp16 T5 is known
    to overflow the same way). Refused before anything is built, naming the largest."""
    worst = None
    for node in model.graph:
        if plan.reasons.get(node.name) != FLOAT_STREAM_REASON:
            continue
        for v in node.outputs:
            r = cache.tensors.get(v.name)
            peak = r and max(abs(r["lowest"]), abs(r["highest"]))
            if peak and peak > FP16_MAX and (worst is None or peak > worst[1]):
                worst = (v.name, peak)
    if worst:
        raise UserError(f"stream=fp16 keeps the residual stream in fp16 on the device, but "
                        f"{worst[0]!r} reaches {worst[1]:.3g} on the calibration samples, "
                        f"beyond fp16's largest value ({FP16_MAX:g}): it would be inf there; "
                        "use stream=16bit (the default)")


def _fmt(score: dict[str, float]) -> str:
    return ", ".join(f"{'cosine' if m == 'cosine' else 'KL'} {v:.4f}" for m, v in score.items())


def _at_opset(model: ir.Model, minimum: int) -> ir.Model:
    """``model`` converted to opset ``minimum`` when below it (ops rewritten where their
    signature changed, e.g. ReduceMean's ``axes`` attribute → input at 18); refused if the
    converter cannot."""
    opset = model.opset_imports.get("", 0)
    if opset >= minimum:
        return model
    from onnxscript.version_converter import ConvertVersionPass

    try:
        ConvertVersionPass(target_version=minimum, fallback=True)(model)
    except Exception as e:  # noqa: BLE001 — the converter's failure is reported as a refusal
        raise UserError(f"the model uses ONNX opset {opset} and this quantization scheme needs "
                        f"opset {minimum}, but the version converter failed "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-export "
                        f"the model at opset {minimum}") from None
    if model.opset_imports.get("", 0) != minimum:
        raise UserError(f"the model uses ONNX opset {opset} and this quantization scheme needs "
                        f"opset {minimum}, which the version converter could not reach; "
                        f"re-export the model at opset {minimum}")
    return model
