"""Quantization pass: the QDQ form each scheme asks for, masks kept out, accuracy floors."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from edgec.calibration import collect_cache
from edgec.errors import UserError
from edgec.exporters.verify import compare_outputs
from edgec.graph_passes.quantization.mask_fill import MaskFillPass
from edgec.graph_passes.quantization.options import QuantOptions
from edgec.graph_passes.quantization.quantize import QuantizePass
from edgec.graph_passes.quantization.select import (
    output_heads,
    plan_quantization,
    residual_sums,
)
from edgec.runtimes.ort import run_model
from edgec.targets import get


@pytest.fixture(scope="module")
def llama_src():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny")


@pytest.fixture(scope="module")
def bert_src(bert_checkpoint):
    from edgec.exporters.sources import resolve_source

    return resolve_source(str(bert_checkpoint), "batch=2,seq=16")


def _clone(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _quantize(src, target, scheme, **opts):
    tgt = get(target)
    options = QuantOptions.parse({"scheme": scheme, **opts}, tgt)
    model = _clone(src.model)
    if tgt.fully_quantized:
        model = MaskFillPass(options.mask_fill)(model).model
    for p in tgt.before_quantize:
        model = p()(model).model
    s = options.scheme_on(tgt)
    cache = collect_cache(model, options.calibration_request(tgt), src) if s.calibrated else None
    result = QuantizePass(s, tgt, cache, options.exclude)(model)
    return result.model, result


def _cosine(out, ref):
    return min(e["cosine"] for e in compare_outputs(out, ref).values())


def _dq_inits(model):
    """(weight dtype, scale shape, attributes) of DequantizeLinear nodes fed by initializers."""
    rows = []
    for n in model.graph:
        if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None:
            rows.append((n.inputs[0].const_value.dtype, n.inputs[1].const_value.shape,
                         {k: a.value for k, a in n.attributes.items()}))
    return rows


def test_w8a8_form_and_accuracy(llama_src):
    model, result = _quantize(llama_src, "ort-cpu", "w8a8")
    assert result.stats["quantize_linear"] > 0
    weights = _dq_inits(model)
    assert weights and all(dt == ir.DataType.INT8 for dt, _, _ in weights)
    assert any(len(shape) == 1 and shape[0] > 1 for _, shape, _ in weights), "per-channel scales"
    acts = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert all(n.inputs[2].const_value.dtype == ir.DataType.UINT8 for n in acts)
    assert _cosine(run_model(model, llama_src.feeds), llama_src.reference) >= 0.99
    # quantizing it again: ORT's quantizer skipped it silently on ort-cpu ("w8a8", cosine 1)
    # and redeclared tensors on qnn-htp (an internal error)
    again = dataclasses.replace(llama_src, model=model)
    with pytest.raises(UserError, match="already quantized .* compile its float model"):
        _quantize(again, "ort-cpu", "w8a8")


def test_w4a16_is_blockwise_weight_only(llama_src):
    model, result = _quantize(llama_src, "openvino-cpu", "w4a16")
    assert result.stats["quantize_linear"] == 0
    weights = _dq_inits(model)
    assert weights and all(attrs.get("block_size") == 32 for _, _, attrs in weights)
    # asymmetric blocks (uint4, a zero point per block), the LM head (the last weighted
    # MatMul) in 8-bit blocks and the embedding by int8 rows, as NNCF's 4-bit compression
    # keeps them; every other MatMul 4-bit
    assert [dt for dt, _, _ in weights].count(ir.DataType.UINT8) == 1
    assert result.stats["weights_int8"] and result.stats["embeddings_int8"]
    assert all(dt == ir.DataType.UINT4 for dt, _, _ in weights if dt != ir.DataType.UINT8)
    # every MatMul weight, the FFN down projections' K = 172 (not a multiple of 32) included:
    # they were left float under a report saying int4
    assert "skipped" not in result.stats and not [
        n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value
        is not None and n.inputs[1].const_value.dtype == ir.DataType.FLOAT]
    assert all(len(n.inputs) == 3 for n in model.graph if n.op_type == "DequantizeLinear"
               and n.inputs[0].const_value is not None)
    gathers = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value
               is not None and len(n.inputs[0].const_value.shape) == 2]
    assert {n.inputs[0].const_value.dtype for n in gathers} <= {ir.DataType.INT8,
                                                                ir.DataType.FLOAT}
    assert any(n.inputs[0].const_value.dtype == ir.DataType.INT8 for n in gathers)
    assert model.opset_imports[""] >= 21
    assert _cosine(run_model(model, llama_src.feeds), llama_src.reference) >= 0.99


def test_w8a16_on_openvino_is_int8_weight_only_per_channel(llama_src):
    """openvino-cpu's w8a16: uint8 weights with a scale and zero point per output channel (a
    plain per-axis DequantizeLinear, no blocks and so no Pad however K divides), activations
    float, the embedding as int8 rows."""
    model, result = _quantize(llama_src, "openvino-cpu", "w8a16")
    assert result.stats["quantize_linear"] == 0 and result.stats["embeddings_int8"]
    assert "weights_int8" not in result.stats  # every weight is int8: no "backups" to name
    by_out = {n.outputs[0].name: n for n in model.graph}
    matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer()
               is not None and n.inputs[1].producer().op_type == "DequantizeLinear"]
    assert matmuls and not [n for n in model.graph if n.op_type == "Pad"]
    for mm in matmuls:
        dq = by_out[mm.inputs[1].name]
        q, scale, zero = (v.const_value for v in dq.inputs)
        assert q.dtype == zero.dtype == ir.DataType.UINT8 and "block_size" not in dq.attributes
        k, n = q.shape
        assert scale.shape == zero.shape == (n,) and dq.attributes["axis"].value == 1
        w = (q.numpy().astype(np.float32) - zero.numpy()) * scale.numpy()
        source = llama_src.model.graph.initializers[dq.inputs[0].name.removesuffix("_q")]
        assert (np.abs(w - source.const_value.numpy()).max(axis=0) <= scale.numpy() * 0.501).all()
        assert np.ptp(q.numpy(), axis=0).max() == 255  # each column spends its whole grid
    assert not [n.name for n in model.graph if n.op_type == "MatMul" and
                n.inputs[1].const_value is not None and
                n.inputs[1].const_value.dtype == ir.DataType.FLOAT]
    assert _cosine(run_model(model, llama_src.feeds), llama_src.reference) >= 0.9999


def test_w8a16_tied_head_reads_the_lookups_int8_table():
    """A head tied to the embedding table reads the lookup's int8 rows (per row = per output
    channel of the head): one int8 table, where folding the head into its own weight stored it
    twice (SmolLM2-135M: 164 MB vs optimum-intel's 135 MB). The host-int8 shift leaves it shared
    (a uint8 copy would be a second table) and the graph is weight-only: no saturation."""
    from edgec.exporters.sources import resolve_source
    from edgec.graph_passes.quantization.unsigned_weights import UnsignedWeightsPass, weight_forms

    src = resolve_source("llama", "tiny+tied")
    model, result = _quantize(src, "openvino-cpu", "w8a16")
    assert result.stats["heads_sharing_the_table"] and result.stats["embeddings_int8"]
    tables = [v for v in model.graph.initializers.values() if v.const_value is not None
              and tuple(v.const_value.shape) == (256, 64)]
    assert [t.const_value.dtype for t in tables] == [ir.DataType.INT8]  # once, int8, no float
    (table,) = tables
    readers = sorted(u.op_type for u, _ in table.uses())
    assert readers == ["DequantizeLinear", "Gather"]
    (head,) = [n for n in model.graph if n.name in result.stats["heads_sharing_the_table"]]
    assert head.inputs[1].producer().op_type == "Transpose"
    model = UnsignedWeightsPass()(model).model
    assert [u.op_type for u, _ in table.uses()] and table.name in model.graph.initializers
    assert not [v for v in model.graph.initializers.values() if v.name.startswith(table.name)
                and v.const_value.dtype == ir.DataType.UINT8]
    assert weight_forms(model) == {}
    assert _cosine(run_model(model, src.feeds), src.reference) >= 0.9999


def test_w8a16_on_ort_is_blocks_onnx_runtime_fuses_with_a_head_of_its_own():
    """ort-cpu's w8a16: uint8 blocks of 32 input channels (a K of 172 ends in a shorter block,
    no Pad), the embedding as int8 rows; per channel (block=0) a tied head still gets int8
    weights of its own, not a DequantizeLinear of the table's rows through a Transpose, which
    ONNX Runtime left unfused in a prefill graph (the whole table dequantized every run). In
    ONNX Runtime every weight's DequantizeLinear -> MatMul becomes an 8-bit MatMulNBits."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    from edgec.exporters.sources import resolve_source

    src = resolve_source("llama", "tiny+tied")
    for block in (None, 0):
        model, result = _quantize(src, "ort-cpu", "w8a16", **({} if block is None
                                                               else {"block": block}))
        assert result.stats["block_size"] == (32 if block is None else None)
        assert "heads_sharing_the_table" not in result.stats and result.stats["embeddings_int8"]
        assert not [n for n in model.graph if n.op_type in ("Pad", "Transpose")
                    and n.outputs[0].uses() and all(u.op_type == "MatMul"
                                                    for u, _ in n.outputs[0].uses())
                    and n.inputs[0].producer() is not None
                    and n.inputs[0].producer().op_type == "DequantizeLinear"]
        assert _cosine(run_model(model, src.feeds), src.reference) >= 0.9999
        with tempfile.TemporaryDirectory() as tmp:
            path, fused = Path(tmp) / "m.onnx", Path(tmp) / "fused.onnx"
            ir.save(model, path)
            opts = ort.SessionOptions()
            opts.optimized_model_filepath = str(fused)
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            nodes = onnx.load(str(fused)).graph.node
        weighted = sum(1 for n in src.model.graph if n.op_type in ("MatMul", "Gemm")
                       and n.inputs[1] is not None and (n.inputs[1].const_value is not None or (
                           n.inputs[1].producer() is not None
                           and n.inputs[1].producer().op_type == "Transpose")))
        assert [n.op_type for n in nodes].count("MatMulNBits") == weighted > 0, block
        assert "DequantizeLinear" not in [n.op_type for n in nodes], block


def test_block_sets_a_weight_only_schemes_blocks(llama_src):
    """``block=N``: N input channels per weight scale (0: per output channel), on the weight-only
    schemes; refused on a static scheme and, on TensorRT and ONNX Runtime CPU, outside the sizes
    their kernels take."""
    from edgec.targets import get

    def scheme(spec, target="openvino-cpu"):
        return QuantOptions.parse(spec, get(target)).scheme_on(get(target))

    assert (scheme("w8a16:block=64").block_size, scheme("w8a16:block=64").min_opset) == (64, 21)
    assert scheme("w8a16").block_size is None and scheme("w8a16").min_opset == 13
    assert (scheme("w4a16:block=0", "ort-cpu").block_size,
            scheme("w4a16:block=0", "ort-cpu").min_opset) == (None, 21)  # int4 needs 21
    assert scheme("w4a16:block=64", "tensorrt").block_size == 64
    for spec, target, match in (("w4a16:block=32", "tensorrt", "blocks of 64 or 128 only"),
                                ("w8a8:block=64", "openvino-cpu", "quantizes activations too"),
                                ("w4a16:block=8", "ort-cpu", "from 16 to 4096"),
                                ("w4a16:block=true", "ort-cpu", "block"),
                                # ORT CPU fuses 16..256 (powers of two) and per channel only
                                ("w8a16:block=48", "ort-cpu",
                                 r"blocks of 16 or 32 or 64 or 128 or 256 \(or 0, per channel\)"),
                                ("w4a16:block=512", "ort-cpu", "blocks of 16 or")):
        with pytest.raises(UserError, match=match):
            QuantOptions.parse(spec, get(target))
    model, result = _quantize(llama_src, "openvino-cpu", "w8a16", block=64)
    blocks = {attrs.get("block_size") for _, _, attrs in _dq_inits(model)}
    assert blocks == {64} and result.stats["block_size"] == 64
    # llama tiny's FFN down projection (K = 172) is zero-padded to 192 on OpenVINO
    assert [n for n in model.graph if n.op_type == "Pad"]
    assert _cosine(run_model(model, llama_src.feeds), llama_src.reference) >= 0.9999
    model, _ = _quantize(llama_src, "ort-cpu", "w4a16", block=0)  # int4 per output channel
    assert not {attrs.get("block_size") for _, _, attrs in _dq_inits(model)} - {None}
    assert _cosine(run_model(model, llama_src.feeds), llama_src.reference) >= 0.95


def test_mask_and_integer_paths_are_not_quantized(bert_src):
    plan = plan_quantization(bert_src.model, False)
    by_name = {n.name: n for n in bert_src.model.graph}
    excluded_ops = {by_name[n].op_type for n in plan.nodes_to_exclude}
    assert "Softmax" in excluded_ops and "MatMul" not in excluded_ops
    model, _ = _quantize(bert_src, "ort-cpu", "w8a8")
    for n in model.graph:  # no Q/DQ on a tensor that carries the mask or an integer path
        if n.op_type == "QuantizeLinear":
            assert n.inputs[0].name not in plan.mask_tensors


def test_qnn_plan_keeps_scores_and_masks_16bit(bert_src):
    plan = plan_quantization(bert_src.model, True)
    softmax = [n for n in bert_src.model.graph if n.op_type == "Softmax"]
    for n in softmax:
        assert n.inputs[0].name in plan.tensors_16bit and n.outputs[0].name in plan.tensors_16bit
    assert not plan.nodes_to_exclude


def _timestep_embedding() -> ir.Model:
    """``t[:, None] · freqs`` → Sin/Cos → a MatMul, as a diffusion model embeds its timestep."""
    t = ir.Value(name="t", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 1]))
    freqs = np.exp(-np.log(1e4) * np.arange(8, dtype=np.float32) / 8)[None]
    f, w = (ir.Value(name=n, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(a.shape),
                     const_value=ir.tensor(a, name=n))
            for n, a in (("freqs", freqs.astype(np.float32)), ("w", np.ones((16, 4), np.float32))))
    mul = ir.node("Mul", [t, f], name="angle")
    sin, cos = ir.node("Sin", [mul.outputs[0]], name="sin"), ir.node("Cos", [mul.outputs[0]],
                                                                          name="cos")
    cat = ir.node("Concat", [sin.outputs[0], cos.outputs[0]], attributes={"axis": -1},
                  name="cat")
    mm = ir.node("MatMul", [cat.outputs[0], w], name="mlp")
    for node in (mul, sin, cos, cat, mm):
        node.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([t], [mm.outputs[0]], nodes=[mul, sin, cos, cat, mm],
                     initializers=[f, w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


def test_qnn_plan_keeps_the_angle_chain_and_its_frequency_table_16bit():
    """A timestep embedding's frequency table spans 1 to 1e-4: on an 8-bit grid the low
    frequencies round away (video-dit tiny on the HTP, held-out cosine 0.85 → 0.9985)."""
    model = _timestep_embedding()
    sixteen = set(plan_quantization(model, True).tensors_16bit)
    angle = model.graph.node("angle").outputs[0].name
    assert {"freqs", angle} <= sixteen
    assert "w" not in sixteen  # the MatMul's weight keeps the scheme's width
    assert not set(plan_quantization(model, False).tensors_16bit)


def test_qnn_plan_keeps_what_only_feeds_a_topk_16bit():
    """Block selection: pooled q/k → scores → TopK. Those values only pick indices, and 8-bit
    ties picked other blocks on the HTP than in ORT; q itself (also read by attention) keeps
    the scheme's width."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    q = ir.Value(name="q", type=f32, shape=ir.Shape([1, 2, 8, 4]))
    kt = ir.Value(name="kt", type=f32, shape=ir.Shape([1, 2, 4, 8]))
    axes, k = (ir.Value(name=n, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                        const_value=ir.tensor(np.array([v], np.int64), name=n))
               for n, v in (("axes", 2), ("k", 2)))
    pool = ir.node("ReduceMean", [q, axes], name="pool")
    score = ir.node("MatMul", [pool.outputs[0], kt], name="score")
    shape = ir.node("Shape", [score.outputs[0]], name="shape")
    top = ir.node("TopK", [score.outputs[0], k], num_outputs=2, name="top")
    attn = ir.node("MatMul", [q, kt], name="attn")
    for node in (pool, score, attn):
        node.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([q, kt], [top.outputs[1], attn.outputs[0], shape.outputs[0]],
                     nodes=[pool, score, shape, top, attn], initializers=[axes, k],
                     opset_imports={"": 18})
    sixteen = set(plan_quantization(ir.Model(graph, ir_version=9), True).tensors_16bit)
    assert {pool.outputs[0].name, score.outputs[0].name} <= sixteen  # a Shape reads no values
    assert "q" not in sixteen and attn.outputs[0].name not in sixteen


@pytest.mark.parametrize("src,first", [("llama_src", 1), ("bert_src", 0)])
def test_qnn_residual_stream_at_16_bits_only_where_the_scheme_asks(src, first, request):
    """The residual sums norms read get 16 bits with ``stream``: every norm's input but the
    pre-norm decoder's first (the embedding lookup; BERT's embeddings are summed by an Add)."""
    from edgec.graph_passes.rotation.topology import find_norms

    src = request.getfixturevalue(src)
    sums = residual_sums(src.model)
    norms = find_norms(src.model.graph)
    assert len(sums) == len(norms) - first and len(sums) >= 2
    assert all(n.input.producer().op_type == "Add" for n in norms if n.input.name in sums)
    plain = set(plan_quantization(src.model, True).tensors_16bit)
    with_stream = set(plan_quantization(src.model, True, stream=True).tensors_16bit)
    assert sums <= with_stream and not sums <= plain
    assert set(plan_quantization(src.model, False, stream=True).tensors_16bit) == set()


def test_a_dits_stream_entry_joining_text_and_video_tokens_is_a_stream_tensor():
    """A norm reading a Concat (a DiT's text and video tokens joined into one stream) reads the
    stream's entry: 16 bits with ``stream`` (video-dit tiny on the HTP, trajectory-calibrated:
    floor held-out 0.9941 -> 0.9954, 16-step sample 0.9926 -> 0.9942); a Concat nothing
    normalizes is not the stream."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes = [h.make_node("Concat", ["text", "video"], ["tokens"], axis=1),
             h.make_node("LayerNormalization", ["tokens", "g", "b"], ["normed"], axis=-1),
             h.make_node("MatMul", ["normed", "w"], ["q"]),
             h.make_node("Concat", ["q", "q"], ["other"], axis=1)]
    inits = [h.make_tensor("g", T.FLOAT, [8], [1.0] * 8),
             h.make_tensor("b", T.FLOAT, [8], [0.0] * 8),
             h.make_tensor("w", T.FLOAT, [8, 8], [0.1] * 64)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("text", T.FLOAT, [1, 2, 8]),
                                      h.make_tensor_value_info("video", T.FLOAT, [1, 4, 8])],
                         [h.make_tensor_value_info("other", T.FLOAT, [1, 12, 8])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    assert residual_sums(model) == {"tokens"}


def test_output_head_found_and_kept_at_16_bit_input_where_asked(llama_src, bert_src):
    """The LM head is the one MatMul writing a graph output (logits); BERT's last_hidden_state
    comes from a LayerNorm, so it has none. ``head`` puts the head's input at 16 bits."""
    heads = output_heads(llama_src.model)
    assert len(heads) == 1
    (node,) = [n for n in llama_src.model.graph if n.name in heads]
    assert node.op_type == "MatMul" and node.inputs[1].const_value.shape[-1] == int(
        llama_src.info["hyperparameters"]["vocab"])
    assert output_heads(bert_src.model) == set()
    plain = plan_quantization(llama_src.model, True)
    with_head = plan_quantization(llama_src.model, True, head=True)
    assert node.inputs[0].name in with_head.tensors_16bit
    assert node.inputs[0].name not in plain.tensors_16bit and not plain.head_nodes
    assert with_head.head_nodes == [node.name]


def test_a_tied_head_is_found_and_fp8_keeps_it_float():
    """A head tied to the embedding reads the table through a Transpose: it was no head
    (SmolLM2's fp8 then missed its KL bound, 0.073 against 0.05; float 0.007)."""
    from edgec.exporters.sources import resolve_source

    tied = resolve_source("llama", "tiny+tied")
    (head,) = output_heads(tied.model)
    node = next(n for n in tied.model.graph if n.name == head)
    assert node.inputs[1].producer().op_type == "Transpose"
    plan = plan_quantization(tied.model, False, head_float=True)
    assert head in plan.nodes_to_exclude and plan.reasons[head].startswith("output head")
    assert head not in plan_quantization(tied.model, False).nodes_to_exclude
    model, result = _quantize(tied, "tensorrt", "fp8")
    assert result.stats["heads_float"] == [head]
    weights = {n.name: n.inputs[1].producer() for n in model.graph if n.name == head}
    assert weights[head].op_type == "Transpose"  # still reads the float table


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_w4a16_quantizes_a_tied_head_and_drops_the_float_table(target):
    """A head tied to the embedding reads the table through a Transpose, so w4a16 left it float,
    and the whole float table with it beside the int8 rows the lookup reads (SmolLM2-135M:
    28 M of its 135 M parameters). The head now reads its own int8 copy, as an untied one."""
    from edgec.exporters.sources import resolve_source

    tied = resolve_source("llama", "tiny+tied")
    (head,) = output_heads(tied.model)
    model, result = _quantize(tied, target, "w4a16")
    node = next(n for n in model.graph if n.name == head)
    dq = node.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear"
    assert dq.inputs[0].const_value.dtype in (ir.DataType.UINT8, ir.DataType.INT8)
    floats = [v.name for v in model.graph.initializers.values() if v.const_value is not None
              and v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2
              and v.const_value.shape[0] == 256]  # vocab rows: the table or its transpose
    assert not [n for n in floats if "scale" not in n]
    assert result.stats["weights_int8"] == [head]
    assert _cosine(run_model(model, tied.feeds), tied.reference) >= 0.99


def test_bert_w8a8_beats_naive_quantization(bert_src, tmp_path):
    """A naive quantize_static over the whole graph quantizes the mask; edgec does not."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from edgec.calibration.samples import generated_samples
    from edgec.onnx_io import save_model
    from edgec.runtimes.ort import OrtSession

    samples, _ = generated_samples(bert_src, 8)
    save_model(bert_src.model, tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "naive.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    naive = _cosine(OrtSession(tmp_path / "naive.onnx").run(bert_src.feeds), bert_src.reference)
    model, _ = _quantize(bert_src, "ort-cpu", "w8a8")
    ours = _cosine(run_model(model, bert_src.feeds), bert_src.reference)
    assert ours >= 0.98 and naive < 0.95 and ours > naive


def test_user_exclusion_by_op_type_and_unknown_name(llama_src):
    # every MatMul excluded: a float artifact reported as w8a8 before
    with pytest.raises(UserError, match="exclude=MatMul leaves nothing to quantize"):
        _quantize(llama_src, "ort-cpu", "w8a8", exclude=("MatMul",))
    first = next(n.name for n in llama_src.model.graph if n.op_type == "MatMul")
    model, result = _quantize(llama_src, "ort-cpu", "w8a8", exclude=(first,))
    assert result.stats["excluded_nodes"] >= 1 and result.stats["quantize_linear"] > 0
    with pytest.raises(UserError, match="names no node or op type") as e:
        _quantize(llama_src, "ort-cpu", "w8a8", exclude=("NoSuchNode",))
    # real names to use (it pointed at `edgec inspect`, which lists op types only)
    assert f"their nodes: {first}, " in str(e.value) and "edgec inspect" not in str(e.value)
    with pytest.raises(UserError, match=f"close matches: {first}"):
        _quantize(llama_src, "ort-cpu", "w8a8", exclude=(first + "_x",))
    with pytest.raises(UserError, match="close matches: MatMul"):
        _quantize(llama_src, "ort-cpu", "w8a8", exclude=("Matmul",))


def test_mask_fill_is_exact_and_bounds_the_constant(bert_src):
    model = _clone(bert_src.model)
    result = MaskFillPass(100.0)(model)
    assert result.stats["fills_bounded"] >= 1
    consts = [v.const_value.numpy() for v in result.model.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype.is_floating_point()]
    assert all(np.all(c > -1e4) for c in consts)
    errors = compare_outputs(run_model(result.model, bert_src.feeds),
                             run_model(bert_src.model, bert_src.feeds))
    assert max(e["max_rel"] for e in errors.values()) <= 1e-5


def _opset17_model():
    """x → ReduceMean(axes attribute, as opset < 18 has it) → Sub → MatMul: a real conversion."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], rng.standard_normal(32).tolist())
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
         helper.make_node("Sub", ["x", "m"], ["c"]),
         helper.make_node("MatMul", ["c", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def test_scheme_needing_a_newer_opset_converts_the_graph_and_leaves_its_input_alone():
    import types

    model = _opset17_model()
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    src = types.SimpleNamespace(kind="onnx", info={"input_names": ["x"]}, feeds=feeds)
    tgt = get("ort-cpu")
    options = QuantOptions.parse("w8a16:block=16", tgt)  # weight blocks need opset 21
    cache = collect_cache(model, options.calibration_request(tgt), src)
    before = ir.to_proto(model).SerializeToString(deterministic=True)
    result = QuantizePass(options.scheme_on(tgt), tgt, cache)(model)
    assert ir.to_proto(model).SerializeToString(deterministic=True) == before  # functional
    assert model.opset_imports[""] == 17 and result.model.opset_imports[""] == 21
    reduce = next(n for n in result.model.graph if n.op_type == "ReduceMean")
    assert "axes" not in reduce.attributes and len(reduce.inputs) == 2  # axes became an input
    ref = run_model(model, feeds)["y"]
    got = run_model(result.model, feeds)["y"]  # ORT refuses an attribute-axes ReduceMean at 21
    assert _cosine({"y": got}, {"y": ref}) >= 0.999


def test_weight_only_quantization_leaves_its_input_model_alone(llama_src):
    model = _clone(llama_src.model)
    before = (len(model.graph), sorted(model.graph.initializers), model.opset_imports[""])
    tgt = get("ort-cpu")
    result = QuantizePass(tgt.schemes["w4a16"], tgt)(model)
    assert result.model is not model and result.stats["weights_blockwise"] > 0
    assert (len(model.graph), sorted(model.graph.initializers), model.opset_imports[""]) == before


def test_quantizing_does_not_touch_the_root_logger_level(llama_src, monkeypatch):
    import logging

    import onnxruntime.quantization as oq

    seen = []
    real = oq.quantize_static

    def spy(*args, **kwargs):
        seen.append(logging.getLogger().level)
        return real(*args, **kwargs)

    monkeypatch.setattr(oq, "quantize_static", spy)
    level = logging.getLogger().level
    _quantize(llama_src, "ort-cpu", "w8a8")
    assert seen == [level] and logging.getLogger().level == level


def test_excluded_matmul_runs_at_w8a16_on_a_fully_quantized_target():
    from edgec.targets.qnn_htp.qdq import _matmul_weights

    model = _timestep_embedding()
    plan = plan_quantization(model, True, exclude=("mlp",))
    assert plan.wide_nodes == ["mlp"] and "mlp" not in plan.nodes_to_exclude
    assert model.graph.node("mlp").outputs[0].name in plan.tensors_16bit
    kinds = _matmul_weights(model, "int4", set(plan.wide_nodes))
    assert str(kinds["w"][0]["quant_type"]).endswith("QInt8")
    assert str(_matmul_weights(model, "int4")["w"][0]["quant_type"]).endswith("QInt4")
    assert not plan_quantization(model, False, exclude=("mlp",)).wide_nodes


def test_blockwise_quantizes_a_shared_weight_once(rng):
    """One Linear called twice (pose-prior): two Gemms read one weight; it was registered twice."""
    import types

    from edgec.graph_passes.quantization.blockwise import blockwise_weights

    w = rng.standard_normal((32, 32)).astype(np.float32)  # [out, in], transB=1
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 32]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    first = ir.node("Gemm", [x, wv], attributes={"transB": 1}, name="g0")
    second = ir.node("Gemm", [first.outputs[0], wv], attributes={"transB": 1}, name="g1")
    second.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], second.outputs, nodes=[first, second], initializers=[wv],
                              opset_imports={"": 21}), ir_version=10)
    stats = blockwise_weights(model, types.SimpleNamespace(weights="int4", block_size=32,
                                                           weight_backup_int8=False,
                                                           weight_symmetric=True,
                                                           partial_block=False), set())
    assert stats["weights_blockwise"] == 1
    assert sorted(model.graph.initializers) == ["w_q", "w_scale"]
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 1
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    inits = model.graph.initializers  # both Gemms read the one dequantized [out, in] weight
    wd = inits["w_q"].const_value.numpy().astype(np.float32) * inits["w_scale"].const_value.numpy()
    np.testing.assert_allclose(run_model(model, feeds)["y"], feeds["x"] @ wd.T @ wd.T, rtol=1e-4,
                               atol=1e-4)
    assert np.abs(wd - w).max() <= np.abs(w).max() / 7  # an int4 grid of w, one block per row


def test_weight_only_backups_last_layers_and_embedding_rows(rng):
    """weight_backup_int8: the last weighted MatMul on each path to an output gets int8 blocks
    (a BERT's last FFN projection, through its residual Add and norm), every other int4; a
    table read by two Gathers is stored once as int8 rows with a scale per row, a Gather that
    was a graph output keeps the output's name, and the ids keep their index bound."""
    import types

    from edgec.exporters.index_inputs import index_bounds
    from edgec.graph_passes.quantization.blockwise import blockwise_weights, last_weighted

    table = rng.standard_normal((50, 32)).astype(np.float32)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 3]))
    tv = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    v1, v2 = (ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in
              (("w1", w1), ("w2", w2)))
    emb = ir.node("Gather", [tv, ids], attributes={"axis": 0}, name="embed")
    emb.outputs[0].name = "emb"
    again = ir.node("Gather", [tv, ids], attributes={"axis": 0}, name="embed_again")
    again.outputs[0].name = "emb_again"
    m1 = ir.node("MatMul", [emb.outputs[0], v1], name="m1")
    m2 = ir.node("MatMul", [m1.outputs[0], v2], name="m2")
    add = ir.node("Add", [m2.outputs[0], emb.outputs[0]], name="residual")
    add.outputs[0].name = "y"
    graph = ir.Graph([ids], [add.outputs[0], again.outputs[0]],
                     nodes=[emb, again, m1, m2, add], initializers=[tv, v1, v2],
                     opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert last_weighted(model) == {"m2"}
    feeds = {"ids": rng.integers(0, 50, (2, 3))}
    before = run_model(model, feeds)
    stats = blockwise_weights(model, types.SimpleNamespace(weights="int4", block_size=32,
                                                           weight_backup_int8=True,
                                                           weight_symmetric=True,
                                                           partial_block=False), set())
    assert stats["weights_int8"] == ["m2"] and stats["embeddings_int8"] == ["table"]
    inits = model.graph.initializers
    assert "table" not in inits and inits["table_q"].const_value.dtype == ir.DataType.INT8
    assert inits["w2_q"].const_value.dtype == ir.DataType.INT8
    assert inits["w1_q"].const_value.dtype == ir.DataType.INT4
    assert [o.name for o in model.graph.outputs] == ["y", "emb_again"]
    after = run_model(model, feeds)
    rows = table[feeds["ids"]]
    step = np.abs(rows).max(-1, keepdims=True) / 127  # one int8 step of each gathered row
    assert np.all(np.abs(after["emb_again"] - rows) <= step / 2 + 1e-6)
    assert _cosine(after, before) > 0.99
    assert index_bounds(model)["ids"]["index_bound"] == 50


def test_asymmetric_blocks_spend_every_level_on_the_block(rng):
    """weight_symmetric=False: uint4 with a zero point per block over [min(w, 0), max(w, 0)];
    a block of positive weights uses all 16 levels (symmetric int4 would use 8 of them)."""
    import types

    from edgec.graph_passes.quantization.blockwise import blockwise_weights

    w = np.abs(rng.standard_normal((32, 4))).astype(np.float32)  # [K, N], all positive
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 32]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, wv], name="mm")
    mm.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], mm.outputs, nodes=[mm], initializers=[wv],
                              opset_imports={"": 21}), ir_version=10)
    scheme = types.SimpleNamespace(weights="int4", block_size=32, weight_backup_int8=False,
                                   weight_symmetric=False, partial_block=False)
    blockwise_weights(model, scheme, set())
    inits = model.graph.initializers
    q = inits["w_q"].const_value.numpy().astype(np.float32)
    s, z = inits["w_scale"].const_value.numpy(), inits["w_zero_point"].const_value.numpy()
    assert inits["w_q"].const_value.dtype == ir.DataType.UINT4 and len(np.unique(q)) > 8
    wd = (q - z.astype(np.float32)) * s
    assert np.abs(wd - w).max() <= w.max(0).max() / 15 / 2 + 1e-6  # half a step of max / 15
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    np.testing.assert_allclose(run_model(model, feeds)["y"], feeds["x"] @ wd, rtol=1e-4,
                               atol=1e-4)


def _odd_k_model(rng):
    """x [2, 3, 90] → MatMul W1 [90, 150] → Relu → MatMul W2 [150, 20]: no K a multiple of 32."""
    w1 = rng.standard_normal((90, 150)).astype(np.float32)
    w2 = rng.standard_normal((150, 20)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, 90]))
    v1, v2 = (ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in
              (("w1", w1), ("w2", w2)))
    m1 = ir.node("MatMul", [x, v1], name="m1")
    act = ir.node("Relu", [m1.outputs[0]], name="act")
    m2 = ir.node("MatMul", [act.outputs[0], v2], name="m2")
    m2.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], m2.outputs, nodes=[m1, act, m2], initializers=[v1, v2],
                             opset_imports={"": 17}), ir_version=10)


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "tensorrt"])
def test_w4a16_quantizes_a_k_that_is_not_a_multiple_of_the_block(rng, target):
    """K = 90 and 150 in blocks of 32 (128 on TensorRT): a partial last block where ONNX Runtime
    takes one, else the weight and the MatMul's input zero-padded to whole blocks (OpenVINO's
    frontend refuses a partial block). Both weights were left float, reported as int4."""
    model = _odd_k_model(rng)
    feeds = {"x": rng.standard_normal((2, 3, 90)).astype(np.float32)}
    ref = run_model(model, feeds)
    tgt = get(target)
    scheme = tgt.schemes["w4a16"]
    result = QuantizePass(scheme, tgt)(_clone(model))
    q = result.model
    assert "skipped" not in result.stats and result.stats["weights_blockwise"] == 2
    weights = {n.name: n.inputs[1].producer() for n in q.graph if n.op_type == "MatMul"}
    assert all(dq is not None and dq.op_type == "DequantizeLinear" for dq in weights.values())
    kinds = {dq.inputs[0].const_value.dtype for dq in weights.values()}
    assert kinds <= {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.UINT8}
    k = {name: dq.inputs[0].const_value.shape[0] for name, dq in weights.items()}
    block = scheme.block_size
    pads = [n for n in q.graph if n.op_type == "Pad"]
    if scheme.partial_block:
        assert k == {"m1": 90, "m2": 150} and not pads
        assert weights["m1"].inputs[1].const_value.shape[0] == 3  # ceil(90 / 32) blocks
    else:
        assert k == {"m1": -(-90 // block) * block, "m2": -(-150 // block) * block}
        assert len(pads) == 2
    got = run_model(q, feeds)
    assert _cosine(got, ref) >= 0.98  # the w4a16 floor
    if target == "openvino-cpu":  # its frontend takes the padded form and agrees (it may
        import openvino as ov  # compute in bf16 on this CPU)

        ov_out = ov.Core().compile_model(_ov_model(q), "CPU")(feeds)
        assert _cosine({"y": next(iter(ov_out.values()))}, got) >= 0.999


def _ov_model(model):
    import tempfile

    import openvino as ov

    with tempfile.TemporaryDirectory() as d:
        ir.save(model, f"{d}/m.onnx")
        return ov.Core().read_model(f"{d}/m.onnx")


def test_weight_only_report_names_what_it_left_float(rng):
    """A weight the pass cannot quantize (a Gemm with transA, here the last layer) is named with
    its reason in the stats, the manifest's quantization entry and the scheme line, and the
    int8 backups list only what was applied (it listed that float Gemm as int8)."""
    import types

    from edgec.graph_passes.quantization.blockwise import blockwise_weights
    from edgec.report import quantization_entry, scheme_line

    model = _odd_k_model(rng)
    act = model.graph.node("act")
    flat = ir.node("Reshape", [act.outputs[0], ir.Value(
        name="shape", const_value=ir.tensor(np.array([6, 150], np.int64)))], name="flat")
    model.graph.register_initializer(flat.inputs[1])
    cols = ir.node("Transpose", [flat.outputs[0]], attributes={"perm": [1, 0]}, name="cols")
    wh = ir.Value(name="wh", const_value=ir.tensor(
        rng.standard_normal((150, 20)).astype(np.float32), name="wh"))
    model.graph.register_initializer(wh)
    gemm = ir.node("Gemm", [cols.outputs[0], wh], attributes={"transA": 1},
                   name="head")  # a weighted Gemm the pass cannot block (transA)
    model.graph.insert_after(act, [flat, cols, gemm])
    gemm.outputs[0].name = "z"
    model.graph.outputs.append(gemm.outputs[0])
    scheme = types.SimpleNamespace(weights="int4", block_size=32, weight_backup_int8=True,
                                   weight_symmetric=False, partial_block=True)
    stats = blockwise_weights(model, scheme, set())
    assert stats["skipped"] == {"head": "Gemm with transA=1"}
    assert stats["weights_int8"] == ["m2"]  # "head" was a planned backup, never applied
    tgt = get("ort-cpu")
    record = types.SimpleNamespace(name="quantize", stats={
        **stats, "scheme": dataclasses.asdict(tgt.schemes["w4a16"]), "config": {"exclude": []}})
    entry = quantization_entry([record])
    assert entry["weights_float"] == {"head": "Gemm with transA=1"}
    assert scheme_line(entry).endswith("; 1 weight left float: head (Gemm with transA=1)")


def test_weight_only_scheme_that_quantizes_nothing_is_refused(rng):
    """Only a 3-D MatMul weight: w4a16 would have written a float artifact reported as w4a16."""
    w = rng.standard_normal((2, 32, 8)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4, 32]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, wv], name="bmm")
    mm.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], mm.outputs, nodes=[mm], initializers=[wv],
                              opset_imports={"": 21}), ir_version=10)
    tgt = get("ort-cpu")
    with pytest.raises(UserError, match=r"w4a16: no weight it can quantize .*bmm: weight is "
                                        r"3-D.*reported as w4a16"):
        QuantizePass(tgt.schemes["w4a16"], tgt)(model)


def test_a_float16_model_is_refused_in_one_line(tmp_path):
    """ORT's quantizer wrote float32 scales beside float16 weights: an internal InvalidGraph
    error on every target."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import edgec

    w = numpy_helper.from_array(np.ones((4, 4), np.float16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])],
                              [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), tmp_path / "half.onnx")
    with pytest.raises(UserError, match=r"16-bit floats \('x'\); --quantize takes a float32"):
        edgec.compile(str(tmp_path / "half.onnx"), target="ort-cpu", output_dir=tmp_path / "o",
                      quantize="w8a8")
    assert not (tmp_path / "o").exists()
