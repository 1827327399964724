"""The attention-site rules of sparse_attention.sites, one form at a time: the rule that matches,
its bindings, ``softmax(q·kᵀ)·v`` from the site's values against the dense output in ORT, and
the reason each non-site is counted with."""

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxscript.rewriter import pattern

from edgec.exporters.torch_export import export_module
from edgec.graph_passes.sparse_attention.mask import mask_array
from edgec.graph_passes.sparse_attention.sites import (
    AttentionOp,
    MaskedScores,
    OtherScores,
    ScaledScores,
    SplitScaleScores,
    UnscaledScores,
    find_attention_sites,
)

B, H, N, D = 1, 2, 6, 4
RNG = np.random.default_rng(0)
FEEDS = {n: RNG.standard_normal((B, H, N, D)).astype(np.float32) for n in "qkv"}
DYN = {n: {2: "n"} for n in "qkv"}


class SDPA(torch.nn.Module):  # dynamo splits √scale onto Q and Kᵀ
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class ScaleMul(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * 0.25, dim=-1) @ v


class Masked(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


@pytest.fixture(scope="module")
def exported():
    x = [torch.from_numpy(FEEDS[n]) for n in "qkv"]
    return {"sdpa_static": export_module(SDPA(), x).model,
            "sdpa_dynamic": export_module(SDPA(), x, DYN).model,
            "scale_mul": export_module(ScaleMul(), x, DYN).model,
            "masked": export_module(Masked(), x + [torch.zeros(1, 1, N, N)]).model}


def _model(nodes, inputs, inits=(), opset=18, outputs=("output",)):
    """A helper-built graph, shape-inferred (the softmax axis check reads the scores' rank)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                     for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[helper.make_tensor(n, TensorProto.FLOAT, [], [x]) for n, x in inits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)  # ORT 1.31 reads up to 10
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


QKV = {n: [B, H, N, D] for n in "qkv"}
KT = helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])
QK = helper.make_node("MatMul", ["q", "kt"], ["s"])
PV = helper.make_node("MatMul", ["p", "v"], ["output"])


def _softmax(scores="s", axis=-1):
    return helper.make_node("Softmax", [scores], ["p"], axis=axis)


def _attention(inputs=("q", "k", "v"), outputs=("output",), **attrs):
    return helper.make_node("Attention", list(inputs), list(outputs), **attrs)


def _root(model, op_type):
    def is_root(n):  # the Attention node, or the MatMul(Softmax(·), V)
        p = n.inputs[0].producer()
        return op_type == "Attention" or p is not None and p.op_type == "Softmax"
    return next(n for n in model.graph if n.op_type == op_type and is_root(n))


def _site_values(model, site, feeds):
    """ORT values of the site's q, k, v and of the dense output it replaces."""
    values = [site.q, site.k, site.v, site.output]
    outs = []
    for i, value in enumerate(values):
        node = ir.node("Identity", [value])
        node.outputs[0].name, node.outputs[0].dtype = f"_site{i}", value.dtype
        model.graph.append(node)
        outs.append(node.outputs[0])
    model.graph.outputs.extend(outs)
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([o.name for o in outs], feeds)


def _assert_site(model, rule, feeds=FEEDS, scale=None, q="q", kt="k"):
    """``rule`` matches at the site's root with the bindings given; the site is exact."""
    root = _root(model, "Attention" if isinstance(rule, AttentionOp) else "MatMul")
    match = rule.match(model, model.graph, root, check_nodes_are_removable=False)
    assert match, f"{type(rule).__name__} does not match"
    bound = rule.site(match.bindings, root)
    k = bound["k"] if "k" in bound else bound["kt"]
    assert (bound["q"].name, k.name, bound["v"].name) == (q, kt, "v")
    assert bound["scale"] == pytest.approx(scale, rel=1e-6)
    sites, skipped = find_attention_sites(model)
    assert len(sites) == 1 and not skipped
    q, k, v, out = (x.astype(np.float64) for x in _site_values(model, sites[0], feeds))
    w = np.exp(q @ k.swapaxes(-1, -2))
    np.testing.assert_allclose(w / w.sum(-1, keepdims=True) @ v, out, rtol=1e-5, atol=1e-5)
    return sites[0]


@pytest.mark.parametrize("name", ["sdpa_static", "sdpa_dynamic"])
def test_split_scale_sdpa(exported, name):
    model = exported[name].clone()
    scores = _root(model, "MatMul").inputs[0].producer().inputs[0].producer()
    kt = scores.inputs[1].producer().inputs[0].name  # MatMul(Mul(Q,√s), Mul(Kᵀ,√s)): that Kᵀ
    site = _assert_site(model, SplitScaleScores(), scale=D ** -0.5, kt=kt)
    # static shapes show the Reshape-Transpose-Reshape Kᵀ is K: K is used as is, its √scale
    # folded into Q; dynamic ones do not, and K is transposed back explicitly
    assert (site.k.name == "k") == (name == "sdpa_static")


def test_scaled_mul_exported(exported):
    site = _assert_site(exported["scale_mul"].clone(), ScaledScores(), scale=0.25, kt="transpose")
    assert site.k.name == "k"


def test_scaled_div():
    div = helper.make_node("Div", ["s", "c"], ["sd"])
    model = _model([KT, QK, div, _softmax("sd"), PV], QKV, [("c", 2.0)])
    _assert_site(model, ScaledScores(), scale=0.5, kt="kt")


def test_unscaled_with_an_unknown_kt_producer():
    inputs = {**QKV, "kt": [B, H, D, N]}  # Kᵀ a graph input: a Transpose back is added
    model = _model([QK, _softmax(), PV], inputs)
    feeds = {**FEEDS, "kt": FEEDS["k"].swapaxes(-1, -2).copy()}
    site = _assert_site(model, UnscaledScores(), feeds, scale=1.0, kt="kt")
    assert site.k.producer().op_type == "Transpose"


def test_split_scale_that_is_not_constant_falls_back_to_unscaled():
    muls = [helper.make_node("Mul", [x, "a"], [f"{x}a"]) for x in ("q", "kt")]
    qk = helper.make_node("MatMul", ["qa", "kta"], ["s"])
    model = _model([KT, *muls, qk, _softmax(), PV], {**QKV, "a": []})
    root = _root(model, "MatMul")
    assert not SplitScaleScores().match(model, model.graph, root, check_nodes_are_removable=False)
    feeds = {**FEEDS, "a": np.array(0.7, np.float32)}
    site = _assert_site(model, UnscaledScores(), feeds, scale=1.0, q="qa", kt="kta")
    assert site.q.name == "qa" and site.k.producer().op_type == "Transpose"


@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_op(scale):
    attrs = {} if scale is None else {"scale": scale}
    model = _model([_attention(**attrs)], QKV, opset=23)
    _assert_site(model, AttentionOp(), scale=scale or D ** -0.5)


def test_masked_scores_are_a_site_whose_runtime_mask_is_named(exported):
    """A masked softmax is found as a site carrying its mask; a mask fed at run time cannot be
    planned at compile time, and the reason says which input it is."""
    model = exported["masked"].clone()
    assert not MaskedScores().match(model, model.graph, _root(model, "MatMul"),
                                    check_nodes_are_removable=False)
    sites, skipped = find_attention_sites(model)
    assert skipped == Counter() and len(sites) == 1
    assert sites[0].mask is not None and sites[0].mask.name == "mask"
    assert mask_array(model, sites[0].mask) == (None, "mask depends on graph input 'mask'")


RELU = helper.make_node("Relu", ["q"], ["s"])
FLAT = {n: [B, N, H * D] for n in "qkv"}  # [B, N, H·d]: Attention's 3-D layout
SOFTMAX_SKIPS = {  # reason: (nodes, graph inputs)
    "softmax not over the last axis": ([KT, QK, _softmax(axis=2), PV], QKV),
    "score scale is not a constant scalar": (
        [KT, QK, helper.make_node("Mul", ["s", "c"], ["sc"]), _softmax("sc"), PV],
        {**QKV, "c": []}),
    "scores not produced by MatMul(Q, Kᵀ)": ([RELU, _softmax(), PV], QKV),
    "softmax output not consumed by one MatMul(·, V)": (
        [KT, QK, helper.make_node("Softmax", ["s"], ["output"])], QKV),
    "Q/K/V not 4-D [B,H,N,d]": ([QK, _softmax(), PV], {"q": [H, N, D], "kt": [H, D, N],
                                                       "v": [H, N, D]}),
}
ATTENTION_SKIPS = {
    "Attention op with mask or past key/value": (
        [_attention(("q", "k", "v", "m"))], {**QKV, "m": [N, N]}),
    "Attention op present key/value outputs are used": (
        [_attention(outputs=("output", "pk", "pv"))], QKV),
    "Attention op with is_causal / softcap / qk output": ([_attention(is_causal=1)], QKV),
    "Attention op with grouped key/value heads": (
        [_attention()], {**QKV, "k": [B, 1, N, D], "v": [B, 1, N, D]}),
    "Attention op inputs not 4-D [B,H,N,d]": ([_attention(q_num_heads=H, kv_num_heads=H)], FLAT),
    "head dim not static": ([_attention()], {n: [B, H, N, "d"] for n in "qkv"}),
}


@pytest.mark.parametrize("reason", [*SOFTMAX_SKIPS, *ATTENTION_SKIPS])
def test_non_sites_are_counted_with_their_reason(reason):
    nodes, inputs = SOFTMAX_SKIPS.get(reason) or ATTENTION_SKIPS[reason]
    outputs = ("output", "pk") if "present" in reason else ("output",)
    model = _model(nodes, inputs, opset=23 if reason in ATTENTION_SKIPS else 18, outputs=outputs)
    if "scores not produced" in reason:  # none of the forms: the catch-all rule names it
        root = _root(model, "MatMul")
        assert not OtherScores().match(model, model.graph, root, check_nodes_are_removable=False)
    assert find_attention_sites(model) == ([], Counter({reason: 1}))


def test_rules_decline_to_rewrite(exported):
    model = exported["scale_mul"].clone()
    before = [n.op_type for n in model.graph]
    rules = [r.rule() for r in (SplitScaleScores, ScaledScores, UnscaledScores, MaskedScores,
                                OtherScores, AttentionOp)]
    assert pattern.RewriteRuleSet(rules).apply_to_model(model) == 0
    assert [n.op_type for n in model.graph] == before
