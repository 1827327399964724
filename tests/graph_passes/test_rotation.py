"""Rotation pass: exact in fp32 (≤ 1e-4 relative, checked by the PassManager) on every
architecture it meets, complete on pre-norm decoders, partial with reasons where R1 cannot pass,
and what rotating is for: a flatter residual stream."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest

from edgec.errors import UserError
from edgec.graph_passes import PassManager
from edgec.graph_passes.rotation import RotatePass
from edgec.graph_passes.rotation.hadamard import (
    apply_left_transpose,
    hadamard,
    kron,
    orthogonal_factors,
    random_hadamard,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HF = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2)


def rotate(model: ir.Model, feeds, **kwargs):
    """Rotate a copy of ``model`` under PassManager(check=True); (rotated model, its record)."""
    pm = PassManager([RotatePass(**kwargs)], check=True, feeds=feeds)
    out = pm(model.clone())
    record = pm.records[0]
    assert record.check["rtol"] == 1e-4
    assert all(e["max_rel"] <= 1e-4 for e in record.check["outputs"].values())
    return out, record


@pytest.fixture(scope="module")
def llama():
    """`llama tiny` with planted outlier channels and a tied LM head (one export covers both)."""
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny+outliers+tied")


# Qwen2 is transformers' LLaMA code plus q/k/v biases; add "LlamaForCausalLM" here to test that
# too (one more export, ~6 s: left out of the suite's time budget, measured exact at 3e-7).
@pytest.fixture(scope="module", params=["Qwen2ForCausalLM"])
def hf_decoder(request, tmp_path_factory):
    """A transformers decoder with random weights, non-trivial norm scales and (Qwen2) q/k/v
    biases, saved as a local checkpoint and exported by edgec."""
    import torch
    import transformers

    from edgec.exporters.sources import resolve_source

    arch = request.param
    config_cls = transformers.LlamaConfig if arch.startswith("Llama") else transformers.Qwen2Config
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config_cls(**HF))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("hf") / arch
    model.save_pretrained(path)
    return arch, resolve_source(str(path), "batch=2,seq=8")


def _perturb(model) -> None:
    """Biases N(0, 0.5) and norm scales 1 + 0.3·N(0, 1): at default init one γ = 1 / β = 0
    initializer is shared by every norm and bias, so a wrong fold cannot show."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.fixture(scope="module", params=["GemmaForCausalLM", "GPT2LMHeadModel"])
def hf_other(request, tmp_path_factory):
    """Decoders whose graphs differ from LLaMA's where R1 passes: Gemma scales the embedding by
    √d, with one KV head (MQA); GPT-2's Conv1D flattens [b, s, d] → [b·s, d] around each Gemm,
    with a fused QKV and a tied head. Non-trivial norm scales and biases as in ``hf_decoder``."""
    import torch
    import transformers

    from edgec.exporters.sources import resolve_source

    arch = request.param
    if arch.startswith("Gemma"):
        config = transformers.GemmaConfig(**{**HF, "num_key_value_heads": 1}, head_dim=16)
    else:
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                         n_positions=64)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config)
    _perturb(model)
    path = tmp_path_factory.mktemp("hf") / arch
    model.save_pretrained(path)
    return arch, resolve_source(str(path), "batch=2,seq=8")


def test_hadamard_constructions_and_factored_sizes():
    for n in (12, 20, 28, 44, 64):  # Paley I, Paley I, Paley II, Paley I, Sylvester
        h = hadamard(n)
        assert h is not None and set(np.unique(h)) == {-1, 1}
        np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    assert hadamard(43) is None
    assert [f.shape[0] for f in orthogonal_factors(172)] == [4, 43]  # llama tiny's FFN width
    assert [f.shape[0] for f in orthogonal_factors(11008)] == [256, 43]  # LLaMA-2-7B's
    assert [f.shape[0] for f in orthogonal_factors(4096)] == [64, 64]
    factors = orthogonal_factors(172, seed=3)
    m = kron(factors)
    np.testing.assert_allclose(m @ m.T, np.eye(172), atol=1e-12)
    w = np.random.default_rng(0).standard_normal((172, 5))
    np.testing.assert_allclose(apply_left_transpose(factors, w), m.T @ w, atol=1e-12)
    r = random_hadamard(64, seed=1)
    np.testing.assert_allclose(r @ r.T, np.eye(64), atol=1e-12)
    assert np.allclose(np.abs(r), 1 / 8)  # a spread matrix: every entry ±1/√n
    np.testing.assert_array_equal(r, random_hadamard(64, seed=1))
    assert not np.array_equal(r, random_hadamard(64, seed=2))


def test_llama_is_rotated_exactly_and_its_residual_stream_flattens(llama):
    from edgec.calibration.crest import collect_crest
    from edgec.graph_passes.rotation import analyze

    stream = [v.name for v in analyze(llama.model.graph).stream.values]
    model, record = rotate(llama.model, llama.feeds, parameter_map=llama.parameter_map,
                           online_r4=True)
    s = record.stats
    assert (s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["head_dim"]) == (2, 64, 4, 2, 16)
    assert (s["norms_folded"], s["r2"], s["r4"], s["skipped"]) == (5, 2, 2, [])
    assert s["r1"] == 1 + 2 * 7 + 1  # embedding, q/k/v/o/gate/up/down per layer, lm_head
    assert "norm.weight" in s["folded_parameters"]
    # tied embeddings were split: the Gather keeps the table, the LM head has its own weight
    graph = model.graph
    gather = next(n for n in graph if n.op_type == "Gather" and n.inputs[0].const_value is not None)
    head = graph.outputs[0].producer()
    assert head.op_type == "MatMul" and head.inputs[1].producer() is None
    assert head.inputs[1] is not gather.inputs[0] and s["initializers_split"] >= 1
    assert not any(n.op_type == "Transpose" and n.inputs[0] is gather.inputs[0] for n in graph)
    r4 = [n for n in graph if n.metadata_props.get("edgec.rotation") == "r4"]
    assert sorted(n.op_type for n in r4) == sorted(["Reshape", "MatMul", "MatMul", "Shape",
                                                    "Reshape"] * 2)  # 172 = 4 ⊗ 43, per layer
    # the point of rotating: the planted outlier channels are spread over the whole stream
    before = collect_crest(llama.model, [llama.feeds])
    after = collect_crest(model, [llama.feeds])
    for name in stream:
        assert after[name] < 0.6 * before[name], (name, before[name], after[name])


def test_hf_decoders_rotate_completely(hf_decoder):
    arch, src = hf_decoder
    nodes = len(src.model.graph)
    model, record = rotate(src.model, src.feeds, parameter_map=src.parameter_map)
    s = record.stats
    assert s["skipped"] == [] and (s["layers"], s["kv_heads"], s["norms_folded"]) == (2, 2, 5)
    assert s["r1"] == 16 and s["r2"] == 2 and s["r4"] == 0
    assert len(model.graph) == nodes - 5  # the γ Muls folded away; R1/R2 add no node
    biases = [n for n in model.graph if n.op_type == "Add" and any(
        v.const_value is not None and len(v.shape) == 1 for v in n.inputs)]
    assert len(biases) == (6 if arch.startswith("Qwen2") else 0)  # q/k/v biases kept (rotated)


def test_gemma_and_gpt2_rotate(hf_other):
    """R1 stopped at Gemma's √d embedding scale (a Mul by a scalar on the stream: it commutes)
    and at GPT-2's Reshape to [b·s, d] before each Gemm (it keeps the last axis); GPT-2's R2 at
    the Reshape back and the Split of the fused QKV."""
    arch, src = hf_other
    model, record = rotate(src.model, src.feeds, parameter_map=src.parameter_map, online_r4=True)
    s = record.stats
    if arch.startswith("Gemma"):  # and R2 stopped at the Reshape to one KV head
        assert s["skipped"] == [] and (s["heads"], s["kv_heads"], s["r2"]) == (4, 1, 2)
        assert (s["hidden"], s["norms_folded"], s["r1"], s["r4"]) == (64, 5, 16, 2)
        return
    assert s["skipped"] == []
    assert (s["hidden"], s["norms_folded"], s["r2"], s["r4"], s["heads"]) == (64, 5, 2, 2, 4)
    assert s["r1"] == 2 + 2 * 4 + 1  # wte and wpe, c_attn/c_proj/c_fc/c_proj per layer, head
    # the tied head reads its own rotated weight (and a bias: ln_f's β), the Gather the table
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value
                  is not None and n.inputs[0].shape[0] == 128)
    add = model.graph.outputs[0].producer()
    head = next(v.producer() for v in add.inputs if v.producer() is not None)
    assert add.op_type == "Add" and head.op_type == "MatMul"
    assert head.inputs[1] is not gather.inputs[0] and list(head.inputs[1].shape) == [64, 128]


def test_video_dit_gets_r2_and_r4_and_says_why_not_r1(dit_tiny_artifacts):
    from edgec.onnx_io import load_onnx

    art = dit_tiny_artifacts[0]
    model = load_onnx(art.path / "model.onnx")
    _, record = rotate(model, art.load().default_feeds, online_r4=True)
    s = record.stats
    assert (s["r1"], s["r2"], s["r4"], s["heads"], s["head_dim"]) == (0, 2, 2, 4, 16)
    (skip,) = s["skipped"]
    assert skip["rotation"] == "r1" and "AdaLN" in skip["reason"]
    assert any(n.name == skip["node"] for n in model.graph)
    # the CLI's and report.md's rotate row (only report.json's stats said R1 was skipped)
    from edgec.report import rotation_line

    line = rotation_line(s)
    assert line.startswith("hadamard: R2 in 2 attention layers, R4 before 2 FFN down")
    assert f"; R1 skipped at {skip['node']}: modulated: " in line and "(AdaLN)" in line
    assert rotation_line({**s, "r4": 0}).endswith("; no online R4 (r4=true adds it)")


def test_bert_post_norm_gets_r2_and_r4_and_says_why_not_r1(bert_checkpoint, caplog):
    from edgec.exporters.sources import resolve_source

    src = resolve_source(str(bert_checkpoint), "batch=2,seq=8")
    with caplog.at_level("WARNING", logger="edgec"):
        _, record = rotate(src.model, src.feeds, online_r4=True)
    s = record.stats
    assert (s["r1"], s["r2"], s["r4"], s["heads"]) == (0, 2, 2, 4)
    (skip,) = s["skipped"]
    assert skip["rotation"] == "r1" and skip["reason"].startswith("post-norm")
    # a partial rotation is a warning that says what was skipped (the report row stays)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("--rotate hadamard rotated the graph only in part: R1 skipped at "
                              f"{skip['node']}: post-norm: ")


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """A tiny OPT (pre-LayerNorm, learned positions, ReLU FFN, tied head), with non-trivial
    LayerNorm scales and shifts and biases everywhere as in ``hf_other`` (at default init every
    γ is 1 and every β and bias 0, and the exporter shares those initializers, so a wrong fold
    or a stream left uncentred would not show)."""
    import torch
    import transformers

    from edgec.exporters.sources import resolve_source

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(config)
    _perturb(model)
    path = tmp_path_factory.mktemp("hf") / "opt"
    model.save_pretrained(path)
    return resolve_source(str(path), "batch=2,seq=8")


def test_opt_rotates_completely_through_its_reshaped_stream(opt):
    """OPT flattens the residual stream to [b·s, d] before each FFN half and views it back after
    (``hidden_states.reshape(-1, d)``), so its FFN LayerNorm and residual Add, the next layer's
    and the final norm read a Reshape of the stream: R1 was skipped there ("0 norms read the
    stream value add_179"). Those Reshapes keep the hidden axis, so R1 passes them."""
    from edgec.graph_passes.rotation import analyze
    from edgec.report import rotation_line

    stream = analyze(opt.model.graph).stream
    assert [list(n.inputs[0].shape)[-1] for n in stream.reshapes] == [64] * 4  # 2 per layer
    assert [len(v.shape) for v in stream.values] == [3, 2, 3, 2, 3]  # the norms' inputs
    model, record = rotate(opt.model, opt.feeds, parameter_map=opt.parameter_map,
                           online_r4=None)  # None, as --rotate hadamard gives: R4 with R1
    s = record.stats
    assert s["skipped"] == [] and (s["hidden"], s["heads"], s["head_dim"]) == (64, 4, 16)
    assert (s["norms_folded"], s["r2"], s["r4"]) == (5, 2, 2)
    assert s["r1"] == 2 + 2 * 6 + 1  # tokens and positions, q/k/v/o/fc1/fc2 per layer, head
    assert not any(n.op_type == "LayerNormalization" for n in model.graph)  # zero-mean: RMS
    assert rotation_line(s) == ("hadamard: R1 on 15 weights, R2 in 2 attention layers, R4 "
                                "before 2 FFN down projections")


def _reshaped_stream(shape: list[int], other_reader: bool) -> ir.Model:
    """ids → E → h0; h1 = h0 + LN0(h0)·W0; LN1 reads Reshape(h1, ``shape``), and the head W1
    reads LN1's output reshaped back to [2, 4, 8]; ``other_reader``: h1 is a graph output too."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))

    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 4]))
    table, w0 = const("E", rng.standard_normal((16, 8), dtype=np.float32)), const(
        "W0", rng.standard_normal((8, 8), dtype=np.float32))
    w1 = const("W1", rng.standard_normal((8, 16), dtype=np.float32))
    g8, b8 = (const(n, rng.standard_normal(8, dtype=np.float32)) for n in ("g8", "b8"))
    g1, b1 = (const(n, rng.standard_normal(shape[-1], dtype=np.float32)) for n in ("g1", "b1"))
    split, back = const("split", np.array(shape)), const("back", np.array([2, 4, 8]))
    gather = ir.node("Gather", [table, ids], name="embed")
    ln0 = ir.node("LayerNormalization", [gather.outputs[0], g8, b8], name="ln0")
    mm0 = ir.node("MatMul", [ln0.outputs[0], w0], name="mm0")
    add = ir.node("Add", [gather.outputs[0], mm0.outputs[0]], name="add")
    reshape = ir.node("Reshape", [add.outputs[0], split], name="reshape")
    ln1 = ir.node("LayerNormalization", [reshape.outputs[0], g1, b1], name="ln1")
    unsplit = ir.node("Reshape", [ln1.outputs[0], back], name="unsplit")
    head = ir.node("MatMul", [unsplit.outputs[0], w1], name="head")
    nodes = [gather, ln0, mm0, add, reshape, ln1, unsplit, head]
    for n in nodes:
        n.outputs[0].name = n.name
        n.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    for n, dims in ((gather, [2, 4, 8]), (ln0, [2, 4, 8]), (mm0, [2, 4, 8]), (add, [2, 4, 8]),
                    (reshape, shape), (ln1, shape), (unsplit, [2, 4, 8]), (head, [2, 4, 16])):
        n.outputs[0].shape = ir.Shape(dims)
    outputs = [head.outputs[0]] + ([add.outputs[0]] if other_reader else [])
    graph = ir.Graph([ids], outputs, nodes=nodes, opset_imports={"": 20},
                     initializers=[table, w0, w1, g8, b8, g1, b1, split, back])
    return ir.Model(graph, ir_version=10)


def test_a_reshape_of_the_stream_stops_r1_only_where_it_changes_the_hidden_axis_or_others_read():
    """R1 follows a Reshape of the stream that keeps the last axis and is the stream value's one
    reader (OPT, above); one that splits the hidden axis ([2, 4, 8] → [2, 4, 2, 4], a norm per
    half), or a stream value that something else reads too, stops it, and the skip names the
    Reshape and which of the two failed."""
    from edgec.graph_passes.rotation import analyze

    model = _reshaped_stream([8, 8], other_reader=False)
    topo = analyze(model.graph)
    assert [n.name for n in topo.stream.reshapes] == ["reshape"] and topo.skipped == []
    ids = np.random.default_rng(1).integers(0, 16, (2, 4))
    _, record = rotate(model, {"ids": ids})  # a stream that is not zero-mean, γ and β ≠ 1, 0
    assert record.stats["skipped"] == [] and record.stats["r1"] == 4  # E, W0 on both sides, W1
    for shape, other, why in (([2, 4, 2, 4], False, "that Reshape does not keep the last "
                               "(hidden) axis, so a rotation of that axis does not pass it"),
                              ([8, 8], True, "add is also a graph output")):
        model = _reshaped_stream(shape, other)
        topo = analyze(model.graph)
        (skip,) = topo.skipped
        assert topo.stream is None and (skip.rotation, skip.node) == ("r1", "reshape")
        assert skip.reason.startswith("the residual stream itself is reshaped: reshape (Reshape) "
                                      f"turns add into reshape, which the norm ln1 reads, and "
                                      f"{why}; R1 follows a Reshape of the stream only where ")
        with pytest.raises(UserError, match=r"R1 skipped at reshape: the residual stream itself"):
            RotatePass()(model)  # nothing else to rotate: no attention, no FFN down projection


def test_pre_layernorm_decoder_becomes_rms_and_rotates_completely(pre_layernorm_decoder):
    model, feeds = pre_layernorm_decoder()
    rotated, record = rotate(model, feeds, online_r4=True)
    s = record.stats
    assert s["skipped"] == [] and (s["hidden"], s["heads"], s["head_dim"]) == (32, 4, 8)
    assert (s["norms_folded"], s["r2"], s["r4"]) == (5, 2, 2)  # R2 inside the fused QKV weight
    assert s["r1"] == 2 + 2 * 4 + 1  # token table, position constant, qkv/o/fc1/fc2, head
    assert not any(n.op_type == "LayerNormalization" for n in rotated.graph)


def test_graph_without_norms_and_bad_options_are_user_errors():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    w = ir.Value(name="w", const_value=ir.tensor(np.eye(8, dtype=np.float32), name="w"))
    node = ir.node("MatMul", [x, w])
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[w],
                              opset_imports={"": 20}), ir_version=10)
    with pytest.raises(UserError, match="no RMSNorm or LayerNorm"):
        RotatePass()(model)
    # a norm but nothing R1, R2 or R4 can pass: refused (it said "nothing rotated" and exit 0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    w = ir.Value(name="w", const_value=ir.tensor(np.eye(8, dtype=np.float32), name="w"))
    gamma = ir.Value(name="g", const_value=ir.tensor(np.ones(8, dtype=np.float32), name="g"))
    norm = ir.node("LayerNormalization", [x, gamma], name="ln")
    node = ir.node("MatMul", [norm.outputs[0], w], name="mm")
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[norm, node], initializers=[w, gamma],
                              opset_imports={"": 20}), ir_version=10)
    with pytest.raises(UserError, match=r"^--rotate hadamard found nothing it can rotate exactly "
                       r"in this graph \(R1 skipped at x: the residual stream starts at a graph "
                       r"input; R2: no attention block found\); compile without --rotate$"):
        RotatePass(online_r4=True)(model)
    with pytest.raises(UserError, match="unknown rotation"):
        RotatePass("spinquant")
    with pytest.raises(UserError, match="calibrated rotations"):
        RotatePass("dartquant")


def test_r4_default_is_off_on_a_fully_quantized_target():
    """R4 by default where R1 passes, except on a fully quantized target (qnn-htp: the spiking
    down-projection inputs are 16-bit there already); r4=true still asks for it."""
    from types import SimpleNamespace

    from edgec.graph_passes.rotation.options import RotateOptions
    from edgec.targets import get as get_target

    src = SimpleNamespace(parameter_map=None)
    npu, cpu = get_target("qnn-htp"), get_target("openvino-cpu")
    assert npu.fully_quantized and not cpu.fully_quantized
    default = RotateOptions.parse("hadamard")
    assert default.make_pass(src, target=npu).online_r4 is False
    assert default.make_pass(src, target=cpu).online_r4 is None  # None: with R1
    assert RotateOptions.parse("hadamard:r4=true").make_pass(src, target=npu).online_r4 is True
    assert default.make_pass(src, target=npu).__class__ is RotatePass
