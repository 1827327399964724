"""qnn-legalize's rewrite rules on tiny graphs: the op list after, outputs before/after in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as H
from onnx import numpy_helper as nh
from onnxscript.rewriter import MatchStatus, pattern

from edgec.targets.qnn_htp.legalize import (
    RULES,
    DropSoftmaxNanGuard,
    FoldWeightTranspose,
    GatherNDToGather,
    GatherToLeadingAxis,
    QnnLegalizePass,
    ReciprocalToDiv,
    block_broadcast_repeats,
)

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = H.make_graph(nodes, "g", inputs, outputs, list(inits))
    # ORT 1.31 loads at most IR version 10; onnx.helper would stamp a newer one
    return H.make_model(graph, opset_imports=[H.make_opsetid("", 21)], ir_version=10)


def _run(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no ORT fusions
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _legalize(model: onnx.ModelProto, feeds, rtol=0.0, atol=0.0):
    """Run the pass; assert the outputs (same names) agree within rtol/atol (default: bit exact)."""
    before = _run(model, feeds)
    made = {o for node in model.graph.node for o in node.output}
    result = QnnLegalizePass()(ir.from_proto(model))
    # new tensors are typed at the source: untyped ones made calibration's histogram ops
    # untyped (percentile on qnn-htp failed to serialize); motion-dit tiny had 12
    untyped = [v.name for node in result.model.graph for v in node.outputs
               if v.name not in made and v.dtype is None]
    assert not untyped, untyped
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto, full_check=True)
    after = _run(proto, feeds)
    assert list(after) == list(before)  # graph output names and order kept
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=rtol, atol=atol)
    return result, [n.op_type for n in result.model.graph]


def _reason(rule_cls, model: onnx.ModelProto, op_type: str) -> str:
    """Match one rule on the first `op_type` node; it must fail its check: return the reason."""
    m = ir.from_proto(model)
    node = next(n for n in m.graph if n.op_type == op_type)
    rule, tracer = rule_cls.rule(), pattern.MatchingTracer()
    assert rule.match(m, m.graph, node, tracer=tracer) is None
    [info] = tracer.best_matches_map[rule]
    assert info.status is MatchStatus.CONDITION_FAILED
    return info.match_result.reason


def _vi(name, elem, shape):
    return H.make_tensor_value_info(name, elem, shape)


# --- GatherND(data, constant indices) ⇒ Reshape → Gather -----------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
@pytest.mark.parametrize("idx", [[[-1, 2], [0, -4], [2, 0]],  # k=2 of rank 3, negative indices
                                 [[[1, -1, 4]], [[-3, 0, -5]]],  # k=rank: one element per row
                                 [-2]])  # indices of shape [1]: one slice
def test_gathernd_constant_indices(dtype, idx):
    idx = np.array(idx, np.int64)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    out_shape = [*idx.shape[:-1], *[3, 4, 5][idx.shape[-1]:]]
    model = _model([H.make_node("GatherND", ["x", "idx"], ["y"], name="gnd")],
                   [_vi("x", elem, [3, 4, 5])], [_vi("y", elem, out_shape)],
                   [nh.from_array(idx, "idx")])
    feeds = {"x": (RNG.standard_normal((3, 4, 5)) > 0).astype(dtype) if dtype == np.bool_
             else RNG.standard_normal((3, 4, 5)).astype(dtype)}
    result, ops = _legalize(model, feeds)  # the graph output "y" is now the Gather's
    assert ops == ["Reshape", "Gather"]
    assert result.stats["gathernd_rewritten"] == 1 and result.modified


def test_gathernd_sites_sharing_indices():
    # one site feeds a graph output, the other an op; the new initializers must not collide
    idx = nh.from_array(np.array([[1, -1], [0, 0]], np.int64), "idx")
    model = _model([H.make_node("GatherND", ["a", "idx"], ["ga"], name="g"),
                    H.make_node("GatherND", ["b", "idx"], ["gb"], name="g2"),
                    H.make_node("Relu", ["gb"], ["z"], name="relu")],
                   [_vi("a", T.FLOAT, [2, 3]), _vi("b", T.FLOAT, [2, 3, 4])],
                   [_vi("ga", T.FLOAT, [2]), _vi("z", T.FLOAT, [2, 4])], [idx])
    feeds = {"a": RNG.standard_normal((2, 3)).astype(np.float32),
             "b": RNG.standard_normal((2, 3, 4)).astype(np.float32)}
    result, ops = _legalize(model, feeds)
    assert ops == ["Reshape", "Gather", "Reshape", "Gather", "Relu"]
    assert result.stats["gathernd_rewritten"] == 2


def test_gathernd_non_constant_indices_left_alone():
    model = _model([H.make_node("GatherND", ["x", "idx"], ["y"], name="gnd")],
                   [_vi("x", T.FLOAT, [3, 4]), _vi("idx", T.INT64, [2, 2])],
                   [_vi("y", T.FLOAT, [2])])
    feeds = {"x": RNG.standard_normal((3, 4)).astype(np.float32),
             "idx": np.array([[2, -1], [0, 3]], np.int64)}
    result, ops = _legalize(model, feeds)
    assert ops == ["GatherND"] and result.stats["gathernd_rewritten"] == 0
    assert not result.modified
    assert _reason(GatherNDToGather, model, "GatherND") == "indices are not a constant"


def test_gathernd_batch_dims_and_dynamic_shape_reasons():
    idx = nh.from_array(np.array([[1], [0]], np.int64), "idx")
    batched = _model([H.make_node("GatherND", ["x", "idx"], ["y"], batch_dims=1)],
                     [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [2])], [idx])
    assert "batch_dims=1" in _reason(GatherNDToGather, batched, "GatherND")
    dynamic = _model([H.make_node("GatherND", ["x", "idx"], ["y"])],
                     [_vi("x", T.FLOAT, ["n", 3])], [_vi("y", T.FLOAT, [2, 3])], [idx])
    assert "not static" in _reason(GatherNDToGather, dynamic, "GatherND")


# --- Where(IsNaN(p), c, p), p = Softmax(·) ⇒ p ----------------------------------------------

def _guard(p_op: str = "Softmax", tail: bool = True, outputs=("y",)):
    nodes = [H.make_node(p_op, ["x"], ["p"], name="p_op"),
             H.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
             H.make_node("Where", ["nan", "zero", "p"], ["g"], name="nan_guard")]
    if tail:
        nodes.append(H.make_node("Mul", ["g", "x"], ["y"], name="use"))
    return _model(nodes, [_vi("x", T.FLOAT, [1, 2, 4, 4])],
                  [_vi(o, T.FLOAT, [1, 2, 4, 4]) for o in outputs],
                  [nh.from_array(np.zeros((), np.float32), "zero")])


FEEDS = {"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)}


def test_nan_guard_removed():
    result, ops = _legalize(_guard(), FEEDS, rtol=1e-6)
    assert ops == ["Softmax", "Mul"] and result.stats["nan_guards_removed"] == 1


def test_nan_guard_on_graph_output_keeps_its_name():
    result, ops = _legalize(_guard(tail=False, outputs=("g",)), FEEDS, rtol=1e-6)
    assert ops == ["Softmax"] and result.stats["nan_guards_removed"] == 1
    assert [v.name for v in result.model.graph.outputs] == ["g"]


@pytest.mark.parametrize(("outputs", "expected"), [(("p", "y"), ["Softmax", "Identity", "Mul"]),
                                                   (("p", "g"), ["Softmax", "Identity"])])
def test_guarded_softmax_output_is_graph_output(outputs, expected):
    # p keeps its name as an output; the guard's user (or output) reads an Identity of it
    model = _guard(tail="y" in outputs, outputs=outputs)
    result, ops = _legalize(model, FEEDS, rtol=1e-6)
    assert ops == expected
    assert [v.name for v in result.model.graph.outputs] == list(outputs)
    assert result.stats["nan_guards_removed"] == 1


def test_nan_guard_not_after_softmax_left_alone():
    model = _guard(p_op="Relu")
    result, ops = _legalize(model, FEEDS)
    assert ops == ["Relu", "IsNaN", "Where", "Mul"] and result.stats["nan_guards_removed"] == 0
    assert not result.modified
    assert _reason(DropSoftmaxNanGuard, model, "Where") == (
        "the guarded value is not a Softmax output")


# --- Mish(x) ⇒ x · Tanh(Softplus(x)) ------------------------------------------------------------

@pytest.mark.parametrize("tail", [False, True])
def test_mish_expanded_exactly(tail):
    # ONNX Runtime itself runs Mish as this function body: bit exact on the CPU
    nodes = [H.make_node("Mish", ["x"], ["m"], name="mish")]
    if tail:
        nodes.append(H.make_node("Add", ["m", "x"], ["y"], name="use"))
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3, 8])], [_vi("y" if tail else "m", T.FLOAT,
                                                                [2, 3, 8])])
    x = (RNG.standard_normal((2, 3, 8)) * 8).astype(np.float32)  # up to |x| ~ 30: both tails
    x[0, 0, :4] = [-100.0, 100.0, 0.0, -0.0]
    result, ops = _legalize(model, {"x": x})
    assert ops == ["Softplus", "Tanh", "Mul", *(["Add"] if tail else [])]
    assert result.stats["mish_expanded"] == 1 and result.modified
    assert [v.name for v in result.model.graph.outputs] == ["y" if tail else "m"]


# --- x · Sigmoid(x) ⇒ Max(x, x) · Sigmoid(x) ----------------------------------------------------

@pytest.mark.parametrize("order", [("x", "s"), ("s", "x")])
def test_silu_multiplicand_copied_bit_exact(order):
    nodes = [H.make_node("Sigmoid", ["x"], ["s"], name="sig"),
             H.make_node("Mul", list(order), ["y"], name="silu")]
    model = _model(nodes, [_vi("x", T.FLOAT, [1, 4, 8, 8])], [_vi("y", T.FLOAT, [1, 4, 8, 8])])
    x = (RNG.standard_normal((1, 4, 8, 8)) * 1e5).astype(np.float32)
    x[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    result, ops = _legalize(model, {"x": x})
    assert ops == ["Max", "Sigmoid", "Mul"] and result.stats["silu_operands_copied"] == 1
    mx = next(n for n in result.model.graph if n.op_type == "Max")
    assert mx.inputs[0] is mx.inputs[1] and mx.inputs[0].name == "x"


def test_mul_by_sigmoid_of_another_tensor_left_alone():
    nodes = [H.make_node("Sigmoid", ["g"], ["s"]), H.make_node("Mul", ["x", "s"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 8]), _vi("g", T.FLOAT, [2, 8])],
                   [_vi("y", T.FLOAT, [2, 8])])
    result = QnnLegalizePass()(ir.from_proto(model))
    assert result.stats["silu_operands_copied"] == 0 and not result.modified


# --- LayerNormalization(x, w, w) ⇒ LayerNormalization(x, w, copy of w) ---------------------------

def test_layernorm_bias_shared_with_its_scale_is_copied():
    w = nh.from_array(np.ones(8, np.float32), "w")  # LNs whose scale and bias are both ones
    nodes = [H.make_node("LayerNormalization", ["x", "w", "w"], ["a"], name="ln1", epsilon=1e-5),
             H.make_node("LayerNormalization", ["a", "w", "w"], ["y"], name="ln2", axis=-1)]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 4, 8])], [_vi("y", T.FLOAT, [2, 4, 8])], [w])
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    result, ops = _legalize(model, {"x": x})  # bit exact
    assert ops == ["LayerNormalization"] * 2
    assert result.stats["layernorm_biases_unshared"] == 2
    lns = [n for n in result.model.graph if n.op_type == "LayerNormalization"]
    biases = {n.inputs[2].name for n in lns}
    assert len(biases) == 2 and "w" not in biases  # a copy each, the scale left as it was
    assert all(n.inputs[1].name == "w" for n in lns)
    assert lns[0].attributes["epsilon"].as_float() == pytest.approx(1e-5)


# --- a ∘ b → (elementwise)* → LayerNormalization, b a block broadcast ⇒ a ∘ Tile(b) ------------

@pytest.mark.parametrize(("dims", "out", "reps"), [
    ([8, 16], [2, 8, 16], [2, 1, 1]),  # positional table over the batch
    ([1, 8, 16], [2, 8, 16], [2, 1, 1]),
    ([8, 1], [2, 8, 16], [2, 1, 1]),  # per-row scale: the batch only, the last axis stays
    ([2, 1, 8, 16], [2, 3, 8, 16], [1, 3, 1, 1]),  # rank 4, over the heads
    ([8, 16], [2, 3, 8, 16], [2, 3, 1, 1]),
    ([16], [2, 8, 16], None),  # a bias over rows and batch: right on the HTP, left alone
    ([1, 1, 16], [2, 8, 16], None),
    ([2, 1, 16], [2, 8, 16], None),  # over the rows only
    ([2, 8, 1], [2, 8, 16], None),
    ([1], [2, 8, 16], None),
    ([2, 8, 16], [2, 8, 16], None),
    ([8, 16], [1, 8, 16], None),  # batch 1: no broadcast
])
def test_block_broadcast_repeats(dims, out, reps):
    assert block_broadcast_repeats(dims, out) == reps


def _ln_model(x_shape, p_shape, op="Add", between=(), p_first=False, p_init=False,
              extra_outputs=()):
    d = x_shape[-1]
    inputs = ["p", "x"] if p_first else ["x", "p"]
    nodes, h = [H.make_node(op, inputs, ["h"], name="bin")], "h"
    for i, mid in enumerate(between):
        args = [h, "s"] if mid in ("Mul", "Add") else [h]
        nodes.append(H.make_node(mid, args, [f"m{i}"], name=f"mid{i}"))
        h = f"m{i}"
    nodes.append(H.make_node("LayerNormalization", [h, "g", "b"], ["y"], axis=-1, epsilon=1e-5,
                             name="ln"))
    inits = [nh.from_array((RNG.standard_normal(d) * 0.5 + 1).astype(np.float32), "g"),
             nh.from_array((RNG.standard_normal(d) * 0.1).astype(np.float32), "b"),
             nh.from_array(np.array([1.5], np.float32), "s")]
    p = RNG.standard_normal(p_shape).astype(np.float32)
    inputs = [_vi("x", T.FLOAT, x_shape)]
    if p_init:
        inits.append(nh.from_array(p, "p"))
    else:
        inputs.append(_vi("p", T.FLOAT, p_shape))
    outputs = [_vi("y", T.FLOAT, x_shape), *(_vi(o, T.FLOAT, x_shape) for o in extra_outputs)]
    feeds = {"x": RNG.standard_normal(x_shape).astype(np.float32)}
    if not p_init:
        feeds["p"] = p
    return _model(nodes, inputs, outputs, inits), feeds


@pytest.mark.parametrize(("kw", "expected"), [
    (dict(x_shape=[2, 8, 16], p_shape=[8, 16]),
     ["Reshape", "Tile", "Add", "LayerNormalization"]),
    (dict(x_shape=[2, 8, 16], p_shape=[1, 8, 16], p_init=True),  # a positional embedding
     ["Tile", "Add", "LayerNormalization"]),
    (dict(x_shape=[2, 8, 16], p_shape=[8, 16], op="Mul", between=("Relu", "Add")),
     ["Reshape", "Tile", "Mul", "Relu", "Add", "LayerNormalization"]),
    (dict(x_shape=[2, 8, 16], p_shape=[1, 8, 16], op="Sub", p_first=True),
     ["Tile", "Sub", "LayerNormalization"]),
    (dict(x_shape=[2, 3, 8, 16], p_shape=[2, 1, 8, 16], between=("Mul",)),
     ["Tile", "Add", "Mul", "LayerNormalization"]),
])
def test_block_broadcast_before_layernorm_tiled_exactly(kw, expected):
    model, feeds = _ln_model(**kw)
    result, ops = _legalize(model, feeds)  # a copy of the operand: bit exact
    assert ops == expected
    assert result.stats["broadcasts_tiled"] == 1 and result.modified
    binary = next(n for n in result.model.graph if n.name == "bin")
    tiled = binary.inputs[0 if kw.get("p_first") else 1]
    assert tiled.producer().op_type == "Tile" and list(tiled.shape) == kw["x_shape"]


def test_block_broadcast_on_graph_output_keeps_names():
    model, feeds = _ln_model([2, 8, 16], [8, 16], extra_outputs=("h",))
    result, ops = _legalize(model, feeds)
    assert ops == ["Reshape", "Tile", "Add", "LayerNormalization"]
    assert [v.name for v in result.model.graph.outputs] == ["y", "h"]


@pytest.mark.parametrize("kw", [
    dict(x_shape=[2, 8, 16], p_shape=[16]),  # a bias
    dict(x_shape=[2, 8, 16], p_shape=[2, 1, 16]),  # over the rows only
    dict(x_shape=[1, 8, 16], p_shape=[8, 16]),  # batch 1
    dict(x_shape=[2, 8, 16], p_shape=[8, 16], between=("Softmax",)),  # no LayerNorm reached
])
def test_block_broadcast_left_alone(kw):
    model, feeds = _ln_model(**kw)
    result, ops = _legalize(model, feeds)
    assert "Tile" not in ops and result.stats["broadcasts_tiled"] == 0
    assert not result.modified


def test_block_broadcast_dynamic_shape_left_alone():
    model, _ = _ln_model([2, 8, 16], [8, 16])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    result = QnnLegalizePass()(ir.from_proto(model))
    assert result.stats["broadcasts_tiled"] == 0 and not result.modified


def test_rule_set_holds_the_local_rules():
    assert [r.name for r in RULES] == ["GatherNDToGather", "DropSoftmaxNanGuard",
                                       "MishToSoftplusTanh", "UnshareLayerNormBias",
                                       "ReciprocalToDiv", "GatherToLeadingAxis",
                                       "FoldWeightTranspose"]


# --- Gather(x, i, axis=a ≠ 0) ⇒ Transpose → Gather(axis=0) → Transpose ------------------------

@pytest.mark.parametrize("axis,idx_shape", [(2, (5,)), (-1, (2, 3)), (1, ()), (3, (2, 1, 2))])
def test_gather_on_an_inner_axis_moves_to_the_leading_axis_bit_exact(axis, idx_shape):
    shape = (2, 3, 6, 4)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, shape[axis], idx_shape).astype(np.int64)
    model = _model([H.make_node("Gather", ["x", "i"], ["y"], axis=axis)],
                   [H.make_tensor_value_info("x", T.FLOAT, shape)],
                   [H.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(idx, "i")])
    result, ops = _legalize(model, {"x": rng.standard_normal(shape).astype(np.float32)})
    assert result.stats["gathers_to_leading_axis"] == 1
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.attributes.get_int("axis", 0) == 0
    assert ops == (["Transpose", "Gather"] if idx_shape == () else
                   ["Transpose", "Gather", "Transpose"])


def test_gather_on_the_leading_axis_left_alone():
    model = _model([H.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                   [H.make_tensor_value_info("x", T.FLOAT, (6, 4))],
                   [H.make_tensor_value_info("y", T.FLOAT, None)],
                   [nh.from_array(np.array([3, 1], np.int64), "i")])
    assert "leading axis" in _reason(GatherToLeadingAxis, model, "Gather")


# --- Reciprocal(x) ⇒ Div(1, x) ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [T.FLOAT, T.FLOAT16])
def test_reciprocal_becomes_div_bit_exact(dtype):
    # the exporter's torch.rsqrt (RMSNorm): Sqrt → Reciprocal → Mul; 1/x and 1 ÷ x are one IEEE op
    nodes = [H.make_node("Sqrt", ["x"], ["s"], name="sqrt"),
             H.make_node("Reciprocal", ["s"], ["r"], name="rsqrt"),
             H.make_node("Mul", ["x", "r"], ["y"], name="scale")]
    model = _model(nodes, [_vi("x", dtype, [2, 3, 8])], [_vi("y", dtype, [2, 3, 8])])
    # an untyped input (no value_info): the constant's type is unknown, the node left alone
    assert _reason(ReciprocalToDiv, model, "Reciprocal") == (
        "the input's element type is unknown or not a float")
    model = onnx.shape_inference.infer_shapes(model)  # typed, as the exporter's graphs are
    x = np.abs(RNG.standard_normal((2, 3, 8))) * 0.01
    x[0, 0, 0] = 0.0  # 1/0 = inf either way
    result, ops = _legalize(model, {"x": x.astype(np.float16 if dtype == T.FLOAT16
                                                  else np.float32)})
    assert ops == ["Sqrt", "Div", "Mul"] and result.stats["reciprocals_to_div"] == 1
    div = next(n for n in result.model.graph if n.op_type == "Div")
    assert div.inputs[0].const_value.numpy().tolist() == 1.0  # a scalar: no broadcast change
    assert div.inputs[0].dtype == div.inputs[1].dtype


# --- Transpose(W) ⇒ Wᵀ (a tied lm_head) ----------------------------------------------------------

def test_tied_head_transpose_folded_into_its_own_weight():
    # the exporter's tied head: the embedding table E read by Gather and, transposed, by the head
    e = nh.from_array(RNG.standard_normal((50, 8)).astype(np.float32), "E")
    nodes = [H.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             H.make_node("Transpose", ["E"], ["Et"], name="head_t"),
             H.make_node("MatMul", ["h", "Et"], ["logits"], name="head")]
    model = _model(nodes, [_vi("ids", T.INT64, [2, 5])], [_vi("logits", T.FLOAT, [2, 5, 50])], [e])
    ids = RNG.integers(0, 50, (2, 5)).astype(np.int64)
    result, ops = _legalize(model, {"ids": ids})  # bit exact
    assert ops == ["Gather", "MatMul"] and result.stats["weight_transposes_folded"] == 1
    head = next(n for n in result.model.graph if n.op_type == "MatMul")
    np.testing.assert_array_equal(head.inputs[1].const_value.numpy(), nh.to_array(e).T)
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.inputs[0].name == "E"  # the table itself is untouched


def test_transpose_of_an_activation_left_alone():
    nodes = [H.make_node("Transpose", ["x"], ["y"], perm=[1, 0], name="t")]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 4])], [_vi("y", T.FLOAT, [4, 3])])
    assert _reason(FoldWeightTranspose, model, "Transpose") == (
        "the transposed value is not an initializer")


# --- Einsum(a, b), a batched matrix product ⇒ Transpose → Reshape → MatMul → … -------------------

def _einsum_relu(equation, a, b):
    """Einsum(a, b) → Relu, and random feeds of shapes ``a`` and ``b``."""
    model = _model([H.make_node("Einsum", ["a", "b"], ["e"], equation=equation, name="einsum"),
                    H.make_node("Relu", ["e"], ["y"], name="relu")],
                   [_vi("a", T.FLOAT, a), _vi("b", T.FLOAT, b)], [_vi("y", T.FLOAT, None)])
    return model, {"a": RNG.standard_normal(a).astype(np.float32),
                   "b": RNG.standard_normal(b).astype(np.float32)}


@pytest.mark.parametrize("equation, a, b", [
    ("bct,bcs->bts", (2, 8, 6), (2, 8, 5)),   # a UNet attention block's scores (terrain UNet)
    ("bts,bcs->bct", (2, 6, 5), (2, 8, 5)),   # and its weighted values
    ("bhqd,bhkd->bhqk", (1, 3, 4, 8), (1, 3, 5, 8)),
    ("ij,jk->ik", (4, 6), (6, 3)),
    ("bij,jk->bki", (2, 4, 6), (6, 3)),       # a free index order the output changes
    ("bnc,cd->bdn", (2, 5, 4), (4, 3)),
])
def test_einsum_lowered_to_matmul(equation, a, b):
    model, feeds = _einsum_relu(equation, a, b)
    result, ops = _legalize(model, feeds, rtol=1e-5, atol=1e-6)
    assert result.stats["einsums_lowered"] == 1
    assert "Einsum" not in ops and ops.count("MatMul") == 1 and ops[-1] == "Relu"
    want = np.maximum(np.einsum(equation, feeds["a"], feeds["b"]), 0)
    np.testing.assert_allclose(_run(ir.to_proto(result.model), feeds)["y"], want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("equation, a, b", [
    ("bii,bij->bj", (2, 3, 3), (2, 3, 4)),   # a repeated index (a diagonal)
    ("ij,kl->ijkl", (2, 3), (4, 5)),         # an outer product: no contracted index is fine,
    ("ijk,jl->il", (2, 3, 4), (3, 5)),       # but k is summed within one operand only
    ("...ij,...jk->...ik", (2, 3, 4), (2, 4, 5)),
])
def test_einsum_outside_the_batched_product_form_is_left_alone(equation, a, b):
    from edgec.targets.qnn_htp.einsum import einsum_plan

    model, feeds = _einsum_relu(equation, a, b)
    plan = einsum_plan(equation, list(a), list(b))
    result, ops = _legalize(model, feeds, rtol=1e-5, atol=1e-6)
    if equation == "ij,kl->ijkl":  # an outer product is a MatMul with K = 1
        assert plan is not None and result.stats["einsums_lowered"] == 1
    else:
        assert plan is None and result.stats["einsums_lowered"] == 0 and "Einsum" in ops


def test_einsum_shapes_matter_only_where_indices_merge_and_graph_outputs_keep_names():
    # merging i and j into M needs their sizes: a dynamic dim leaves the Einsum alone
    dyn = _model([H.make_node("Einsum", ["a", "b"], ["y"], equation="ijk,kl->ijl")],
                 [_vi("a", T.FLOAT, ["n", 2, 4]), _vi("b", T.FLOAT, [4, 3])],
                 [_vi("y", T.FLOAT, None)])
    assert QnnLegalizePass()(ir.from_proto(dyn)).stats["einsums_lowered"] == 0
    # one index in each of M, K, N is MatMul's own form: unknown sizes (an exported attention
    # block's Shape → Concat → Reshape) do not matter
    attn = _model([H.make_node("Einsum", ["a", "b"], ["e"], equation="bct,bcs->bts"),
                   H.make_node("Relu", ["e"], ["y"])],
                  [_vi("a", T.FLOAT, ["n", 8, "t"]), _vi("b", T.FLOAT, ["n", 8, "s"])],
                  [_vi("y", T.FLOAT, None)])
    feeds = {"a": RNG.standard_normal((2, 8, 6)).astype(np.float32),
             "b": RNG.standard_normal((2, 8, 5)).astype(np.float32)}
    result, ops = _legalize(attn, feeds, rtol=1e-5, atol=1e-6)
    assert result.stats["einsums_lowered"] == 1 and ops == ["Transpose", "MatMul", "Relu"]
    out = _model([H.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bkj->bki")],
                 [_vi("a", T.FLOAT, [2, 4, 3]), _vi("b", T.FLOAT, [2, 5, 3])],
                 [_vi("y", T.FLOAT, None)])
    feeds = {"a": RNG.standard_normal((2, 4, 3)).astype(np.float32),
             "b": RNG.standard_normal((2, 5, 3)).astype(np.float32)}
    result, ops = _legalize(out, feeds, rtol=1e-5, atol=1e-6)  # same output names (asserted)
    assert result.stats["einsums_lowered"] == 1 and ops == ["Transpose", "MatMul", "Transpose"]


def test_unnamed_einsums_get_unique_node_and_constant_names():
    """Two unnamed Einsums made two nodes named ``einsum_matmul`` (and two ``einsum_a_shape``
    constants), which ONNX Runtime's quantizer refused: "two nodes with same node name"."""
    model = _model([H.make_node("Einsum", ["a", "b"], ["e"], equation="ijk,kl->ijl"),
                    H.make_node("Einsum", ["e", "c"], ["y"], equation="ijl,lm->ijm")],
                   [_vi("a", T.FLOAT, [2, 3, 4]), _vi("b", T.FLOAT, [4, 5]),
                    _vi("c", T.FLOAT, [5, 2])], [_vi("y", T.FLOAT, None)])
    feeds = {n: RNG.standard_normal(s).astype(np.float32)
             for n, s in (("a", (2, 3, 4)), ("b", (4, 5)), ("c", (5, 2)))}
    result, ops = _legalize(model, feeds, rtol=1e-5, atol=1e-6)
    assert result.stats["einsums_lowered"] == 2 and ops.count("MatMul") == 2
    names = [n.name for n in result.model.graph]
    assert all(names) and len(set(names)) == len(names)
    consts = [n for n in result.model.graph.initializers if n.endswith("_shape")]
    assert len(consts) == 6 and len(set(consts)) == 6  # a, b and out shapes of each

