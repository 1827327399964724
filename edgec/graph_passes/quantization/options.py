"""``--quantize SCHEME[:k=v,...]`` (Python ``quantize=``) and the quantize stage it makes.

    options → scheme on the target → ranges (a cache checked against the graph, or calibrated
    now on the graph the passes before produced) → QuantizePass
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgec.errors import UserError
from edgec.options import convert_items, split_spec

logger = logging.getLogger(__name__)

__all__ = ["QuantOptions", "HELD_OUT", "DEFAULT_MIN_COS", "DEFAULT_MAX_KLD", "held_out_split",
           "gptq_of_data"]

# --quantize stream=: the residual stream on a fully quantized target (QuantScheme.float_stream
# and stream_16bit)
STREAMS = ("fp16", "16bit", "8bit")
HELD_OUT = 4  # samples mixed precision measures the quantized graph on (``held_out=`` sets it)
# ... and from a user's .npz with room for more: one in HELD_OUT_SHARE of its samples, at most
# MAX_DEFAULT_HELD_OUT, while calibration keeps its own (samples=, else DEFAULT_SAMPLES). The
# search keeps the fewest layers that hold the held-out samples, so it fits them: on the trained
# terrain UNet (24 samples, w8a8) 4 held out read 0.984 (ort-cpu) and 0.990 (openvino-cpu)
# where the worst of 16 unseen generations fell to 0.842 and 0.955; 8 held out (what 24 now
# gives), the worst unseen held 0.983 and 0.977 at nearly the same speed (README § the trained
# denoiser). Each of the floor's probes runs on all of them: 16 bounds the search's time.
HELD_OUT_SHARE = 3
MAX_DEFAULT_HELD_OUT = 16
MAX_HELD_OUT = 256  # each probe of the floor's search runs the graph on all of them
# Samples GPTQ's Hessians come from when the model's generator makes them (a user's .npz: all of
# it). More than the ranges need: H = XᵀX of a [rows, K] activation must see many more rows
# than K, or GPTQ fits the calibration rows and not the data (llama small+outliers, hadamard,
# w4a8 on the HTP, K up to 1376: logits rel. error 0.192 from 16 samples of 128 tokens, 0.182
# from 64, 0.179 from 128, 0.178 from 256). 128 as the GPTQ paper's 128 calibration segments.
GPTQ_SAMPLES = 128
# The floor a scheme holds when no ``min_cos`` is given: the worst held-out output cosine vs
# fp32. Below it the most sensitive layers are kept in high precision (a calibrated integer
# scheme; fp8 and weight-only ones warn). 0.98
# and not 0.99: plain w8a8 on a real checkpoint (all-MiniLM-L6-v2, held-out 0.991) keeps its
# full int8 speed with room to spare, while a quantization that breaks a model (llama
# small+outliers on the CPU targets: 0.975) is repaired by default. ``min_cos=0`` turns it off.
DEFAULT_MIN_COS = 0.98
# ... and, on a model with a ``logits`` output, the worst held-out mean KL divergence of its
# next-token distribution from fp32's (nats per token), which a logits cosine barely sees:
# SmolLM2-135M's first 4 layers w8a8 on openvino-cpu held cosine 0.992 at KL 0.19 and top-1
# agreement 70%; rotated, KL 0.005 and top-1 95%. 0.05 is about what a 4-bit weight-only
# llama.cpp quantization costs (IQ4_XS: 0.043, llama.cpp PR #12557; its q8_0 costs LLaMA-3-8B
# 0.0014, PR #6936): lenient, but far below a broken quantization's.
DEFAULT_MAX_KLD = 0.05


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """What ``quantize=`` / ``--quantize SCHEME[:k=v,...]`` asks for.

    ``method=minmax|percentile|entropy``, for fp8 ``minmax|percentile|distribution``
    (ORT's σ-based float8 scale); ``exclude=A;B`` (node names or op types kept in high
    precision: float on CPU targets, 16-bit on fully quantized ones); ``samples=N`` (calibration
    samples, default 16); ``mask_fill=F`` (the bounded attention-mask fill on fully quantized
    targets, default 100); ``min_cos=F`` (accuracy-driven mixed precision: keep the fewest most
    sensitive layers in high precision so that the worst output cosine vs fp32 on held-out
    samples reaches F; without it a default floor of 0.98 applies, measured once and searched
    only when missed (fp8 and weight-only schemes: measured and warned about), and on a
    model with a ``logits`` output also a worst KL divergence of 0.05 nats per token;
    ``min_cos=0`` turns it off); ``max_kld=F``
    (the same search until the worst held-out mean KL divergence of the ``logits`` output's
    next-token distribution from fp32's is at most F nats per token); ``smooth=α``
    (SmoothQuant: activation outlier ranges moved into the weights the norms feed, folded
    into the norms' scales; α in (0, 1), 0.5 typical); ``split=R`` (the FFN inner channels
    whose calibrated peak is ≥ R × the median channel's computed by a branch of their own, float
    on CPU targets and 16-bit on the NPU: ``outlier_split``; R > 1, e.g. 100);
    ``gptq=true|false`` (weight integers chosen by GPTQ's error feedback on the calibration
    samples' activations instead of rounded to nearest; what 4-bit weights after a rotation
    need, so on by default there: ``gptq_on``); ``stream=fp16|16bit|8bit`` (fully quantized
    targets: the residual stream's sums, the norms reading them and split branches kept float,
    which the HTP runs in fp16, or the sums on a 16- or 8-bit grid; the scheme's default
    otherwise, 16 bits for w8a8/w4a8 on qnn-htp); ``sample_steps=N`` (a denoiser's floor also
    compares a whole N-step generation with fp32's, ``sample_check``: default 16, 0 skips it,
    which costs 4 N runs of each graph guided: minutes on a `small` video DiT); ``held_out=N``
    (the samples the floor is held on: the last N of a user's .npz, kept out of calibration
    where enough remain, else N more from the model's generator; default 4, and from a .npz
    with room for more one in three of its samples, up to 16, while calibration's 16 (or
    samples=) remain before them: ``held_out_of``. The search keeps the fewest layers that hold
    them, so a few samples over-promise: on the trained terrain UNet, w8a8 on ort-cpu, 4 held
    out read 0.984 where the worst of 16 unseen generations fell to 0.842; held out on 8, that
    worst held 0.983); ``reduce_range=true`` (w8a8 on ort-cpu: int8 weights on a 7-bit grid,
    [−64, 64], as ONNX Runtime's ``reduce_range``: on x86 without VNNI, where 8-bit weights
    would saturate the u8 × s8 kernels and are shifted to uint8 instead (``unsigned-weights``),
    ONNX Runtime keeps its faster U8S8 kernels, for one bit of weight precision:
    ``QuantScheme.reduce_range_pays``); ``block=N`` (weight-only schemes: N input channels per
    weight scale, 16 to 4096, or 0 for one per output channel; the scheme's own otherwise: 32
    for w4a16 and ort-cpu's w8a16, per channel for openvino-cpu's w8a16; SmolLM2-135M w8a16
    on openvino-cpu: block=64 halves the KL divergence on text, 0.0033 → 0.0016 nats/token,
    at 0.80–0.87× the decode speed; tensorrt's int4 kernels take 64 or 128 only, ort-cpu's
    MatMulNBits 16 to 256 in powers of two or per channel: ``QuantScheme.block_sizes``).
    """

    scheme: str
    method: str | None = None
    exclude: tuple[str, ...] = ()
    samples: int | None = None
    mask_fill: float = 100.0
    min_cos: float | None = None
    max_kld: float | None = None
    smooth: float | None = None
    split: float | None = None  # outlier_split's ratio
    gptq: bool | None = None  # None: on for 4-bit weights after a rotation (gptq_on)
    stream: str | None = None  # the residual stream on a fully quantized target (STREAMS)
    sample_steps: int | None = None  # the floor's whole sample (None: SAMPLE_STEPS; 0: none)
    held_out: int | None = None  # the floor's held-out samples (None: HELD_OUT)
    reduce_range: bool | None = None  # 7-bit int8 weights (QuantScheme.reduce_range)
    block: int | None = None  # weight-only: input channels per weight block (0: per channel)

    def __post_init__(self):
        from edgec.calibration.ranges import METHODS

        if self.method is not None and self.method not in METHODS:
            raise UserError(f"unknown calibration method {self.method!r}; use one of "
                            f"{', '.join(METHODS)}")
        from edgec.calibration.samples import MAX_SAMPLES

        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise UserError("--quantize samples must be a positive integer")
        if self.samples is not None and self.samples > MAX_SAMPLES:
            raise UserError(f"--quantize samples={self.samples}: at most {MAX_SAMPLES} "
                            "(calibration ranges settle within a few hundred samples)")
        for name in ("mask_fill", "min_cos", "max_kld", "smooth", "split"):
            value = getattr(self, name)  # nan passes every range check below as False...
            if isinstance(value, float) and not math.isfinite(value):  # ... inf some
                raise UserError(f"--quantize {name} must be a finite number, not {value!r}")
        # a fill of 1e4 or more is itself what the stage replaces ("minus infinity": 1e39 was
        # -inf in float32), and below 1 it barely masks (1e-45 unmasked the attention)
        if isinstance(self.mask_fill, bool) or not isinstance(self.mask_fill, (int, float)) \
                or not 1 <= self.mask_fill < 1e4:
            raise UserError(f"--quantize mask_fill={self.mask_fill!r}: give the fill's size, a "
                            "number in [1, 10000) (default 100; the mask becomes -mask_fill)")
        object.__setattr__(self, "mask_fill", float(self.mask_fill))
        if self.min_cos is not None and not (isinstance(self.min_cos, (int, float))
                                             and 0 <= self.min_cos < 1):
            raise UserError(f"--quantize min_cos must be a cosine between 0 and 1 (e.g. 0.99; "
                            f"0 turns the default floor off), not {self.min_cos!r}")
        if self.max_kld is not None and not (isinstance(self.max_kld, (int, float))
                                             and self.max_kld > 0):
            raise UserError(f"--quantize max_kld must be a positive KL divergence in nats per "
                            f"token (e.g. 0.02), not {self.max_kld!r}")
        if self.smooth is not None and not (isinstance(self.smooth, (int, float))
                                            and 0 < self.smooth < 1):
            raise UserError(f"--quantize smooth is SmoothQuant's migration strength α, between "
                            f"0 and 1 (e.g. 0.5), not {self.smooth!r}")
        if self.split is not None and not (isinstance(self.split, (int, float))
                                           and self.split > 1):
            raise UserError(f"--quantize split is how many times the median channel's peak an "
                            f"FFN channel must reach to be split off, above 1 (e.g. 100), not "
                            f"{self.split!r}")
        if self.sample_steps is not None and (
                isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int)
                or not 0 <= self.sample_steps <= 1000):
            raise UserError(f"--quantize sample_steps is how many steps the floor's whole "
                            f"sample takes: an integer from 0 (none) to 1000 (default 16), not "
                            f"{self.sample_steps!r}")
        if self.held_out is not None and (
                isinstance(self.held_out, bool) or not isinstance(self.held_out, int)
                or not 1 <= self.held_out <= MAX_HELD_OUT):
            raise UserError(f"--quantize held_out is how many samples the accuracy floor is "
                            f"held on: an integer from 1 to {MAX_HELD_OUT} (default {HELD_OUT}; "
                            f"from a .npz, up to {MAX_DEFAULT_HELD_OUT}), not {self.held_out!r}")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(
                self.block, int) or not (self.block == 0 or 16 <= self.block <= 4096)):
            raise UserError(f"--quantize block is how many input channels share a weight scale "
                            f"(weight-only schemes): an integer from 16 to 4096 (e.g. 32, 64, "
                            f"128), or 0 for one scale per output channel, not {self.block!r}")
        if self.stream is not None and self.stream not in STREAMS:
            raise UserError(f"--quantize stream is how a fully quantized target holds the "
                            f"residual stream: one of {', '.join(STREAMS)}, not {self.stream!r}")
        object.__setattr__(self, "exclude", tuple(e for e in self.exclude if e))

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | QuantOptions, target) -> QuantOptions:
        """From ``"w8a8:method=entropy"``, ``{"scheme": "w8a8", ...}`` or options; checked
        against the schemes ``target`` offers."""
        if isinstance(spec, cls):
            opts = spec
            mask_fill = spec.mask_fill != cls.mask_fill
        else:
            if isinstance(spec, Mapping):
                items = dict(spec)
                scheme = items.pop("scheme", None)
            else:
                scheme, items = split_spec(spec, "--quantize", head=":")
            if not scheme:
                raise UserError("--quantize needs a scheme: SCHEME[:k=v,...] with SCHEME one of "
                                f"{', '.join(target.schemes) or 'none'} on {target.name}")
            opts = cls(scheme=scheme, **convert_items(cls, items, "--quantize", ("scheme",)))
            mask_fill = "mask_fill" in items
        if opts.scheme not in target.schemes:
            offered = ", ".join(target.schemes) or "none"
            raise UserError(f"target {target.name} has no quantization scheme {opts.scheme!r}; "
                            f"it offers: {offered}")
        activations = target.schemes[opts.scheme].activations or ""
        if opts.method == "entropy" and activations.startswith("float8"):
            raise UserError(f"--quantize {opts.scheme}: method=entropy searches a clipping "
                            "threshold for an evenly spaced integer grid, which float8 is not; "
                            "use minmax (the default), percentile or distribution")
        if opts.method == "distribution" and not activations.startswith("float8"):
            raise UserError(f"--quantize {opts.scheme}: method=distribution is ONNX Runtime's "
                            "float8 scale (from the standard deviation) and sets no integer "
                            "range; use minmax (the default), percentile or entropy")
        if opts.stream is not None and not target.fully_quantized:
            raise UserError(f"--quantize stream={opts.stream} places the residual stream on a "
                            f"fully quantized target (qnn-htp); on {target.name} it stays "
                            "float already: drop stream")
        if opts.reduce_range and not target.schemes[opts.scheme].reduce_range_pays:
            offered = [n for n, sc in target.schemes.items() if sc.reduce_range_pays]
            why = (f"on {target.name} only {', '.join(offered)} takes it" if offered else
                   f"{target.name} gains nothing from it (OpenVINO runs uint8 weights as fast; "
                   f"TensorRT and the HTP have no such kernels)")
            raise UserError(f"--quantize reduce_range keeps int8 weights within ±64 for ONNX "
                            f"Runtime's CPU int8 kernels on hosts without VNNI (ort-cpu w8a8); "
                            f"{why}: drop reduce_range")
        if opts.block is not None:
            chosen = target.schemes[opts.scheme]
            if not chosen.weight_only:
                offered = [n for n, sc in target.schemes.items() if sc.weight_only]
                raise UserError(f"--quantize block={opts.block} sizes the weight blocks of a "
                                f"weight-only scheme ({' or '.join(offered) or 'none'} on "
                                f"{target.name}); {opts.scheme} quantizes activations too: "
                                "drop block")
            if chosen.block_sizes and opts.block not in chosen.block_sizes:
                raise UserError(f"--quantize block={opts.block}: {target.name}'s {opts.scheme} "
                                f"kernels take blocks of "
                                f"{' or '.join(str(b) for b in chosen.block_sizes if b)}"
                                f"{' (or 0, per channel)' if 0 in chosen.block_sizes else ''}"
                                " only: give one of them, or drop block")
        if mask_fill and not target.fully_quantized:  # it was accepted and did nothing
            raise UserError(f"--quantize mask_fill={opts.mask_fill:g} bounds the attention masks "
                            f"of a fully quantized target (qnn-htp); on {target.name} they stay "
                            "float: drop mask_fill")
        return opts

    def scheme_on(self, target):
        """The target's scheme, with ``stream``, ``reduce_range`` and ``block`` applied where
        given."""
        scheme = target.schemes[self.scheme]
        if self.block is not None and scheme.weight_only:
            # blocks need opset 21's DequantizeLinear(block_size); per channel, 4 bits still do
            scheme = dataclasses.replace(
                scheme, block_size=self.block or None,
                min_opset=21 if self.block or scheme.weights == "int4" else 13)
        if self.reduce_range and scheme.reduce_range_pays:
            scheme = dataclasses.replace(scheme, reduce_range=True)
        if self.stream is None or not target.fully_quantized:
            return scheme
        return dataclasses.replace(scheme, float_stream=self.stream == "fp16",
                                   stream_16bit=self.stream == "16bit")

    def bits_on(self, target) -> tuple[int, int]:
        """(weights, activations): the scheme's integer widths on ``target`` (8 where a side is
        not an integer type)."""
        scheme = self.scheme_on(target)
        return activation_bits(scheme.weights), activation_bits(scheme.activations)

    def head_bits_on(self, target) -> tuple[int, int]:
        """``bits_on`` for an output head (an LM head), which ``QuantScheme.head_w8a16`` keeps at
        8-bit weights and a 16-bit input."""
        scheme = self.scheme_on(target)
        return (8, 16) if scheme.head_w8a16 and target.fully_quantized else self.bits_on(target)

    def method_on(self, target) -> str:
        """The calibration method: as asked, else minmax (float8 included: its scales are set
        from the calibrated absmax, ``quantize.float8_overrides``; ``distribution`` asks for
        ORT's own float8 scale, σ / σ(e4m3 values), which clips at 4.48 σ)."""
        return self.method or "minmax"

    def held_out_of(self, available: int | None) -> int:
        """The samples the floor is held on: ``held_out``; else, from a user's .npz of
        ``available`` samples, one in HELD_OUT_SHARE of them (at most MAX_DEFAULT_HELD_OUT)
        while the calibration's count remains before them; else HELD_OUT (generated samples,
        a cache, or a file too small to spare more)."""
        if self.held_out:
            return self.held_out
        if available is None:
            return HELD_OUT
        from edgec.calibration.samples import DEFAULT_SAMPLES

        spare = available - (self.samples or DEFAULT_SAMPLES)
        return max(HELD_OUT, min(available // HELD_OUT_SHARE, spare, MAX_DEFAULT_HELD_OUT))

    def check_held_out(self, available: int | None, name: str) -> None:
        """Refuse ``held_out`` above the ``available`` samples of the data file ``name``."""
        if self.held_out and available is not None and self.held_out > available:
            raise UserError(f"--quantize held_out={self.held_out}, but {name} has "
                            f"{available} samples; give held_out= at most {available}, or a "
                            "file with more samples")

    def floor_on(self, target):
        """The ``mixed_precision.Floor`` the quantize stage holds on held-out samples: what
        ``min_cos``/``max_kld`` ask, else the default floor (its KL bound is added where the
        model has logits); None: no measurement. A float8 or weight-only scheme's floor is
        measured and warned about, not searched (the per-layer analysis fake-quantizes integer
        activations): fp8 with ORT's σ-based scales gave SmolLM2-135M (2 layers) cosine 0.765
        in silence, and w4a16 after --rotate on llama tiny+outliers 0.19."""
        from edgec.graph_passes.quantization.mixed_precision import Floor

        if self.min_cos is not None or self.max_kld is not None:
            if not self.min_cos and self.max_kld is None:
                return None  # min_cos=0: off
            return Floor(self.min_cos or None, self.max_kld)
        return Floor(DEFAULT_MIN_COS, default=True)

    def gptq_on(self, target, rotated: bool) -> bool:
        """GPTQ as asked, else on where nearest rounding is known to break: 4-bit weights after
        a rotation, which spreads any massive activation channel over every weight's rounding
        error (llama small+outliers, hadamard, w4a8 on the HTP: logits cosine 0.56 nearest,
        0.98 GPTQ; tiny+outliers w4a16 on ort-cpu, weight-only: 0.19 nearest, 0.94 GPTQ)."""
        if self.gptq is not None:
            return self.gptq
        return rotated and self.scheme_on(target).weights in ("int4", "uint4")

    def calibration_request(self, target, data: Path | None = None):
        """What calibrating for this scheme on ``target`` means, as plain data."""
        from edgec.calibration import CalibrationRequest

        scheme = self.scheme_on(target)
        return CalibrationRequest(
            target=target.name, scheme=scheme.name, method=self.method_on(target),
            symmetric=scheme.activation_symmetric,
            op_types=None if target.fully_quantized else tuple(scheme.op_types),
            samples=self.samples, data=data,
            crest=target.fully_quantized and scheme.outlier_crest is not None,
            bits=activation_bits(scheme.activations))

    def make_pass(self, target, calibration, src, step: Callable[[str], None],
                  rotated: bool = False, bindings: Callable | None = None,
                  pruned: bool = False):
        """The QuantizePass of a compile: ``calibration`` is a cache, an .npz path or None;
        ``rotated``: a rotation ran before (GPTQ's default, ``gptq_on``); ``bindings``: model →
        the adapters a swappable-LoRA graph ships (``edgec.lora.binding.adapter_bindings``),
        bound in turn for calibration and each for the floor; ``pruned``: the weights' zeros
        are a pruning mask (--prune, sparse-merge) that GPTQ keeps."""
        from edgec.calibration import CalibrationCache
        from edgec.calibration.samples import (
            check_sample_count,
            default_sample_count,
            npz_sample_count,
        )
        from edgec.graph_passes.quantization.quantize import QuantizePass

        scheme = self.scheme_on(target)
        if scheme.reduce_range:
            _warn_reduce_range_on_vnni()
        given = calibration if isinstance(calibration, CalibrationCache) else None
        data = calibration if isinstance(calibration, Path) else None
        floor = self.floor_on(target)
        available = npz_sample_count(data) if data else None
        if data and self.samples:
            check_sample_count(self.samples, available, data.name)
        if data and floor:
            self.check_held_out(available, data.name)
        if given is not None and self.samples and self.samples != given.samples:
            # the cache's ranges are reused as they are: samples= was ignored, the report said
            # the cache's count. Named by its directory: an NPU decode graph's (``decode/``)
            # holds DECODE_SAMPLES where the prefill graph's holds 16
            where = getattr(given, "_directory", None)
            where = f" ({where})" if where else ""
            raise UserError(f"--quantize samples={self.samples}, but the calibration cache"
                            f"{where} was made from {given.samples} samples; drop samples= to "
                            f"reuse it, or "
                            f"re-run `edgec calibrate` with samples={self.samples}")
        # generated samples calibration took: the floor's held-out samples and GPTQ's come after
        # them (with a cache, its own count: they fell inside a larger cache's samples); the
        # default count is the graph's own (an NPU decode graph's is larger)
        count = given.samples if given is not None else self.samples or default_sample_count(src)
        # a user's .npz: the floor's held-out samples are its last n_held, kept out of the
        # calibration when enough remain (held_out_split); else calibration sees them too
        n_held = self.held_out_of(available if floor else None)
        calibrated, source = held_out_split(available if floor else None, self.samples, n_held)
        if data is not None and not scheme.calibrated and not self.gptq_on(target, rotated):
            # weight-only with nearest rounding: nothing is fitted to the file, so its held-out
            # samples are unseen however few remain (a 16-sample file was reported "seen by
            # calibration: an optimistic measure")
            source = "data"
        # a cache calibrated from a user's .npz stores the same held-out samples beside it
        kept = given.held_out_file() if given is not None and floor else None
        if kept is not None and self.held_out and self.held_out != given.held_out["samples"]:
            raise UserError(f"--quantize held_out={self.held_out}, but the calibration cache "
                            f"holds out {given.held_out['samples']} samples of its data file for "
                            f"the floor; drop held_out= to use them, or re-run `edgec calibrate` "
                            f"with held_out={self.held_out}")
        if data is None:
            source = given.held_out["source"] if kept is not None else generated_source(src)
        request = dataclasses.replace(self.calibration_request(target, data), samples=calibrated)
        checked_method = request.method if self.method else None

        def ranges(model):
            from edgec.calibration import collect_cache, model_hash

            if given is not None:
                from edgec.calibration.cache import adapters_bound

                given.check(model_hash(model), target.name, scheme.name, checked_method,
                            adapters_bound(bindings(model) if bindings else None))
                gen = src.info.get("generation") or {}
                empty = given.data.startswith("prefill prompts (empty KV cache)")
                if gen.get("cache") == "static" and empty:
                    # made before the buffers were filled: its past ranges are [0, 1e-4], so
                    # every cached key/value would read as zero on the device
                    raise UserError("the calibration cache was made over an empty KV buffer (an "
                                    "older edgec): its past-key/value ranges are zero, and the "
                                    "decoder would ignore its cache; re-run `edgec calibrate`")
                return given, "reused cache"
            step("calibrating activation ranges")
            cache = collect_cache(model, request, src,
                                  lambda i, n: step(f"calibrating: run {i}/{n}"),
                                  bindings(model) if bindings else None)
            return cache, "calibrated during compile"

        def samples(model, extra: int = 0, skip: int = 0, file: Path | None = None):
            """A user's .npz (all of it; ``file``: that one), else the model's generator: the
            calibration count plus ``extra`` more, less the first ``skip``."""
            from edgec.calibration.samples import (
                generated_samples,
                samples_for_model,
                source_samples_from_npz,
            )

            if file or data is not None:
                found = source_samples_from_npz(file or data, src)
            else:
                found = generated_samples(src, count + extra, skip)[0]
            return samples_for_model(found, model, bindings(model) if bindings else None)

        def gptq_samples(model):
            """GPTQ's activations: a user's .npz (but its held-out samples when calibration
            leaves them out), or those a cache calibrated from one stored, else
            ``GPTQ_SAMPLES`` from the generator, the calibration samples first and never the
            held-out ones."""
            if data is not None:
                return gptq_of_data(samples(model), source, n_held)
            stored = given.calibration_samples_file() if given is not None else None
            if stored is not None:
                return samples(model, file=stored)
            if given is not None and given.made_from_data():
                # an older cache, or the file's samples were too large to store: the generator's
                # rounded silently where `--calib FILE.npz` rounds on the file
                logger.warning("the calibration cache was made from %s but does not store its "
                               "samples (an older edgec, or over the size limit): GPTQ rounds "
                               "on generated samples; pass --calib FILE.npz for GPTQ on that "
                               "file", given.data.removeprefix("file "))
            more = samples(model, n_held + max(0, GPTQ_SAMPLES - count))
            return more[:count] + more[count + n_held:]

        def held_out(model):
            """Samples the floor measures on: the model's generator past the calibration count,
            else the last ``held_out_of(n)`` of a user's .npz of n, or those a cache calibrated from
            one stored (``source`` says whether calibration saw them)."""
            if kept is not None:
                return samples(model, file=kept)
            return samples(model, n_held, skip=0 if data is not None else count)[-n_held:]

        if self.smooth is not None and not scheme.calibrated:
            raise UserError(f"smooth moves activation ranges into the weights; {scheme.name} is "
                            "weight-only (activations stay float), drop smooth")
        if self.method and not scheme.calibrated:
            raise UserError(f"method={self.method} chooses how activation ranges are "
                            f"calibrated; {scheme.name} is weight-only, drop method")
        return QuantizePass(scheme, target, ranges if scheme.calibrated else None, self.exclude,
                            floor=floor, held_out=held_out, held_out_source=source,
                            gptq=gptq_samples if self.gptq_on(target, rotated) else None,
                            progress=step, bindings=bindings, keep_zeros=pruned,
                            sampling=src.info.get("sampling") if src is not None else None,
                            sample_steps=self.sample_steps)


def generated_source(src) -> str:
    """Where the floor's generated held-out samples come from: ``"text"``, a checkpoint's
    windows of edgec's passages (``calibration.text``), else ``"generated"``."""
    from edgec.calibration.text import calibrates_on_text

    return "text" if src is not None and calibrates_on_text(src) else "generated"


def _warn_reduce_range_on_vnni() -> None:
    """7-bit weights buy speed only where the host's int8 kernels saturate on 8-bit ones; on a
    VNNI host they cost a bit for nothing, unless the artifact is meant for another host."""
    from edgec.graph_passes.quantization.host_int8 import ENV, int8_saturates

    if not int8_saturates():
        logger.warning("--quantize reduce_range=true: this host's int8 kernels do not saturate "
                       "(VNNI), so 7-bit weights cost a bit of precision and gain no speed here; "
                       "kept as asked, for an artifact meant for a host without VNNI (%s=1 "
                       "says so and silences this)", ENV)


def gptq_of_data(found: list, source: str, held: int = HELD_OUT) -> list:
    """The samples of a user's .npz (``found``) GPTQ takes: all but the floor's ``held``
    held-out ones where calibration leaves them out (``source`` "data", ``held_out_split``)."""
    return found[:-held] if source == "data" else found


def held_out_split(available: int | None, asked: int | None, held: int = HELD_OUT
                   ) -> tuple[int | None, str]:
    """(samples calibration takes from the front of a user's .npz of ``available`` samples
    (None: all of them), where the floor's held-out samples, its last ``held``, come from):
    ``"data"`` where calibration leaves them out, i.e. ``asked`` (``samples=``) stops before
    them, or, with none asked, at least DEFAULT_SAMPLES remain for calibration; else
    ``"calibration"``: too few samples to spare, calibration sees them too (an optimistic
    measure, said in the report). ``available`` None: no file, or no floor to hold."""
    from edgec.calibration.samples import DEFAULT_SAMPLES

    if available is None:
        return asked, "calibration"
    rest = available - held
    if asked is not None:
        return asked, "data" if asked <= rest else "calibration"
    return (rest, "data") if rest >= DEFAULT_SAMPLES else (None, "calibration")


def activation_bits(element_type: str | None) -> int:
    """8 for ``uint8``/``int8``, 16 for ``uint16``...; 8 where activations are not integers."""
    from edgec.graph_passes.quantization.mixed_precision import _BITS

    return _BITS.get(element_type, 8)
