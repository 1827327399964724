"""Target: a device described as data (runtime, opsets, shape rules, precision) + its build step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from edgec.errors import UserError

__all__ = ["Target", "BuildResult", "QuantScheme"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What a build step produced: the runtime entry of the manifest and the files it wrote."""

    runtime: dict[str, Any]
    files: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How one scheme name (``w8a8``, ``w8a16``, ``w4a16``, ``fp8``) is realized on one target.

    The same name yields a different QDQ form per device; the quantization pass reads only this
    and the target's ``fully_quantized`` / ``qdq_options``.

    Attributes:
        name: the scheme name users pass to ``--quantize``.
        weights: ONNX element type of quantized weights (``int8``, ``uint8``, ``int4``,
            ``float8e4m3fn``).
        activations: element type of quantized activations (``uint8``, ``int8``, ``uint16``,
            ``float8e4m3fn``); ``None`` for weight-only schemes (no calibration needed).
        weight_symmetric: zero point 0 for weights (weight-only: signed blocks; else unsigned
            blocks with a zero point each).
        activation_symmetric: zero point 0 (or the type's midpoint for unsigned) for activations.
        per_channel: one weight scale per output channel (else per tensor).
        block_size: weights quantized in blocks of this many input channels (opset 21
            ``DequantizeLinear`` ``block_size``); ``None`` when not block-wise.
        block_scale_bits: with ``block_size`` on a calibrated scheme, each block's scale is an
            unsigned integer of this many bits times a float scale per output channel (the
            Qualcomm HTP's LPBQ form, ``graph_passes/quantization/lpbq.py``).
        op_types: op types whose inputs are quantized (on a fully quantized target its
            ``qdq_options`` decide instead).
        min_opset: lowest ONNX opset the QDQ form needs (16-bit and int4 need 21).
        quantize_bias: Gemm/Conv biases as int32 DequantizeLinear (ORT, QNN) or left float.
        quantize_outputs: Q/DQ on the outputs of the ``op_types`` too, so their consumers read
            8-bit values. False (the placement NNCF and TensorRT use): quantizers on their inputs
            only; outputs, bias adds and the residual stream stay float (a quantized tensor's
            readers other than the ``op_types``, e.g. a post-norm encoder's residual Adds, read
            the float tensor). Measured on a real pretrained BERT-family checkpoint: embedding
            cosine 0.917 → 0.987 (→ 0.991 with float residual readers) and faster on both
            CPU runtimes (ONNX Runtime fuses Q + DQ → MatMul into MatMulIntegerToFloat, OpenVINO
            runs int8 FullyConnected with an f32 output).
        fused_outputs: op types among ``op_types`` whose outputs get Q/DQ too, where the
            runtime has an integer kernel only for DQ → op → Q (``quantize_outputs`` False
            otherwise): ONNX Runtime CPU runs a Conv in int8 only as QLinearConv, with no integer
            Conv that writes float, so with quantizers on its inputs alone every Conv of the
            trained terrain UNet ran in float behind its DequantizeLinear (0.89× the fp32
            graph's speed). The output's readers read it rounded: the price of the integer
            kernel, which the accuracy floor's search counts (a Conv kept float loses it).
        signed_attention: the inputs of each MatMul between two activations (attention's
            Q·Kᵀ and P·V) as int8 symmetric unless never negative (P stays u8, zero point 0):
            OpenVINO runs such a MatMul in int8 only when its inputs have no zero point.
        quantize_before_layout: activation Q/DQ pairs moved above the Reshape/Transpose ops
            that feed them alone (exact); OpenVINO then runs fewer standalone FakeQuantize
            nodes. Not for ONNX Runtime, whose fused kernels want the DQ at the MatMul.
        outlier_crest: on a fully quantized target, activations whose crest factor (absmax /
            RMS over the calibration samples) exceeds this get 16 bits: 8 bits sized by a few
            outlier channels leave the typical values a handful of levels. None: by op only.
        stream_16bit: on a fully quantized target, the residual stream's sums (the ``Add``
            outputs norms read) get 16 bits: each is rounded once per layer and every later
            layer reads it, so 8-bit rounding adds up even where no outlier channel remains
            (after a rotation).
        head_w8a16: on a fully quantized target with 4-bit weights, the output head (each
            MatMul whose output is a graph output, through layout ops and constant adds only:
            an LM head) keeps 8-bit weights and a 16-bit input, as LLM w4 recipes keep the
            LM head in higher precision. Every logit reads all of its K inputs through it.
        head_float: on a target with float compute, the output heads (``head_w8a16``'s: an
            LM head, a DiT's final projection) stay float, as NVIDIA ModelOpt's and TensorRT-
            LLM's fp8 recipes keep ``lm_head``/``proj_out``: with per-tensor e4m3 scales the head
            held SmolLM2's logits KL at 0.073 nats (the default bound 0.05), float 0.007.
        weight_backup_int8: weight-only schemes: the last weighted MatMul on each path to an
            output (an LM head) gets int8 blocks and the embedding tables int8 rows, as NNCF's
            4-bit weight compression keeps them at 8 bits (``blockwise``). CPU targets only:
            TensorRT's weight-only blocks are int4.
        tied_table_shared: ``weight_backup_int8`` per channel (int8 w8a16): a head tied to an
            embedding table reads the lookup's int8 rows through a transposed per-row
            ``DequantizeLinear`` (one table in the file; ``blockwise._share_tied_tables``).
            False: the head gets int8 weights of its own, as any weight. ONNX Runtime CPU fused
            the shared form into MatMulNBits in a ``--generate`` graph but, in a prefill graph,
            fused the Transpose into the MatMul first and then dequantized the whole table on
            every run (SmolLM2-135M: 28 M weights); its own copy is always fused (+28 MB).
        partial_block: weight-only schemes: a weight whose input-channel count K is not a
            multiple of ``block_size`` ends in a shorter block (ONNX allows it; ONNX Runtime CPU
            fuses it into MatMulNBits as any other). False: its blocks are zero-padded to a
            whole one and the MatMul's input with them (a ``Pad`` of the activation), as
            OpenVINO's ONNX frontend refuses a partial block and TensorRT's is unprobed.
        float_stream: on a fully quantized target, the residual stream stays float: its sums,
            the norms that read them and ``outlier_split``'s branches are not quantized, and
            the HTP runs them in fp16 (on an HTP with fp16 units: ``runtimes.qnn.FP16_OPTIONS``);
            the MatMuls still read and write quantized tensors. A
            trained decoder's massive activations need the range (SmolLM2-135M writes 2.6e4
            on its first token, a 16-bit grid step of 0.4 for every other token's values).
        reduce_range_pays: ``--quantize ...:reduce_range=true`` is offered: the runtime's
            int8 kernels are ONNX Runtime CPU's, whose u8 × s8 (U8S8) kernels saturate on x86
            without VNNI (``host_int8``), where ``unsigned-weights`` shifts 8-bit weights to
            uint8 and ONNX Runtime takes its U8U8 kernels instead, 0.86–0.97× their speed
            (``benchmarks/host_int8.py``). Not on OpenVINO: its u8-weight path ran as fast as
            7-bit weights there (1.00–1.05×), so a bit would be lost for nothing.
        reduce_range: int8 weights on a 7-bit grid, [−64, 64] (ONNX Runtime's
            ``reduce_range``): a pair of u8 × s8 products then fits int16 (2·255·64 = 32640),
            so such a host runs the U8S8 kernels exactly, for one bit of weight precision
            (``unsigned-weights`` leaves them int8). Set from ``QuantOptions.reduce_range``.
        block_sizes: weight-only: the block sizes the runtime's kernels take, which
            ``QuantOptions.block`` must be one of (TensorRT's int4: 64 or 128); empty: any, or
            0 for one scale per output channel.
    """

    name: str
    weights: str
    activations: str | None
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    per_channel: bool = True
    block_size: int | None = None
    block_scale_bits: int | None = None
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    min_opset: int = 13
    quantize_bias: bool = True
    quantize_outputs: bool = False
    fused_outputs: tuple[str, ...] = ()
    signed_attention: bool = False
    quantize_before_layout: bool = False
    outlier_crest: float | None = None
    stream_16bit: bool = False
    head_w8a16: bool = False
    head_float: bool = False
    float_stream: bool = False
    weight_backup_int8: bool = False
    tied_table_shared: bool = True
    partial_block: bool = False
    reduce_range_pays: bool = False
    reduce_range: bool = False
    block_sizes: tuple[int, ...] = ()

    @property
    def calibrated(self) -> bool:
        """Whether the scheme needs activation statistics (static activation quantization)."""
        return self.activations is not None

    @property
    def weight_only(self) -> bool:
        """Block-wise weight dequantization feeding a float MatMul; activations stay float."""
        return self.activations is None


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target: everything the pipeline must know about it is a field here.

    Attributes:
        name: CLI name (``openvino-cpu``).
        description: one line for help texts.
        runtime: key of the session class in ``edgec.runtimes.RUNTIMES`` that loads the artifact.
        opset_range: ONNX default-domain opsets the target accepts (inclusive).
        static_shapes: the target needs every dim fixed at build time (the export is static).
        precision: compute precision of the unquantized artifact (``fp32``).
        runtime_config: settings the runtime applies (session options; recorded in the manifest).
        notes: op-support and behaviour notes (``edgec targets``).
        requires: importable module names the build needs (checked before building).
        build: ``(target, model_path, target_dir, **options) -> BuildResult``; writes the
            native artifact. ``options``: ``generation`` (the decoder's manifest entry)
            for a KV-cache decoder.
        schemes: quantization schemes the target offers, by name (``--quantize``).
        fully_quantized: the device has no float compute: a compile needs ``--quantize``, and
            every tensor gets Q/DQ (16 bits where 8 cannot hold it) instead of staying float.
        swappable_adapters: swappable LoRA adapters (float graph inputs) can run here.
        max_rank: the largest tensor rank the device takes (None: no limit).
        before_quantize: the device's exact legalization passes (classes), run on every compile
            for this target after the rewrites and before quantization.
        after_quantize: exact passes (classes) that bring the QDQ graph to the device's rules.
        qdq_options: ``(proto, scheme, plan) -> dict`` of ``quantize_static`` options for this
            device's QDQ form; None: the generic form from the scheme's fields.
        share_graphs: ``(graphs, target_dir, feeds, runtime) -> dict``: one device context for
            a static-cache decoder's prefill and decode graphs (weights stored once), or why
            not; None: the target keeps one native artifact per graph.
        socs: the devices (SoCs) a compile may name for its native artifact (``--soc``), by
            key; empty: the target builds one artifact for any device of its kind.
        kv_caches: the precisions a generation artifact's KV cache may be stored in
            (``--kv-cache``), each with the runtime setting that selects it; the first is the
            default (the decoder's own fp32). Empty: the cache is what the graph computes.
        locate_departure: ``(model_path, feeds) -> str | None``: where the device first departs
            from ONNX Runtime on the quantized graph (a sentence naming the node), run when the
            compile's device check finds a target bug; None: not offered.
    """

    name: str
    description: str
    runtime: str
    opset_range: tuple[int, int]
    static_shapes: bool
    precision: str
    runtime_config: Mapping[str, Any]
    notes: tuple[str, ...]
    requires: tuple[str, ...]
    build: Callable[..., BuildResult]
    schemes: Mapping[str, QuantScheme] = dataclasses.field(default_factory=dict)
    fully_quantized: bool = False
    swappable_adapters: bool = True
    max_rank: int | None = None
    before_quantize: tuple[type, ...] = ()
    after_quantize: tuple[type, ...] = ()
    qdq_options: Callable[..., dict[str, Any]] | None = None
    share_graphs: Callable[..., dict[str, Any]] | None = None
    locate_departure: Callable[..., str | None] | None = None
    socs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kv_caches: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def check_static(self, inputs: Iterable[Any], outputs: Iterable[Any]) -> None:
        """Refuse a graph input or output (``onnx_ir`` values) whose shape is unknown or has a
        dim that is not a fixed positive number, where the target needs static shapes. One check
        for the build (``compile``) and for ``calibrate`` before it calibrates, so both refuse the
        same graph with the same line (calibrate wrote a cache that no compile could use)."""
        if not self.static_shapes:
            return
        for kind, values in (("input", inputs), ("output", outputs)):
            for v in values:
                if v.is_initializer():  # an older ONNX file lists its weights as inputs
                    continue
                dims = None if v.shape is None else list(v.shape)
                if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
                    continue
                shape = [d if isinstance(d, int) and d else getattr(d, "value", None) or "?"
                         for d in dims or []]
                named = next((d for d in shape if isinstance(d, str) and d != "?"), "N")
                raise UserError(f"{self.name} needs static shapes, but {kind} {v.name!r} has "
                                f"shape {shape if dims is not None else 'unknown'}; export with "
                                "static shapes (dynamic_shapes={}, or fixed --config dims), or "
                                "fix an .onnx file's dims first: python -m onnxruntime.tools."
                                f"make_dynamic_shape_fixed --dim_param {named} --dim_value 1 "
                                "in.onnx out.onnx")
