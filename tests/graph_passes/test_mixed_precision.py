"""Mixed precision's measurements: end-to-end effect of one node's error, mask-aware cosine."""

import numpy as np
import onnx_ir as ir
import pytest

from edgec.graph_passes.quantization.mixed_precision import (
    Floor,
    LayerError,
    end_to_end_effects,
    layer_errors,
    search_exclusions,
    worst_cosine,
    worst_kld,
)


def _two_layer_model(w1: np.ndarray, w2: np.ndarray, out: str = "y") -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, 4]))
    c1 = ir.Value(name="w1", const_value=ir.tensor(w1))
    c2 = ir.Value(name="w2", const_value=ir.tensor(w2))
    m1 = ir.node("MatMul", [x, c1], name="mm1")
    relu = ir.node("Relu", m1.outputs, name="relu")
    m2 = ir.node("MatMul", [relu.outputs[0], c2], name="mm2")
    m2.outputs[0].name = out
    graph = ir.Graph([x], m2.outputs, nodes=[m1, relu, m2], initializers=[c1, c2],
                     opset_imports={"": 17}, name="g")
    return ir.Model(graph, ir_version=9)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_end_to_end_effect_propagates_one_nodes_error_through_the_fp32_rest():
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))
    model = _two_layer_model(w1, w2)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    d1 = 0.3 * rng.standard_normal((5, 8)).astype(np.float32)
    d2 = 0.3 * rng.standard_normal((5, 3)).astype(np.float32)
    effects = [c for c, k in end_to_end_effects(model, [{"x": x}], ["mm1", "mm2"],
                                                [[d1], [d2]])]
    y = np.maximum(x @ w1, 0) @ w2
    expect1 = 1 - _cos(np.maximum(x @ w1 + d1, 0) @ w2, y)  # through the Relu and mm2
    expect2 = 1 - _cos(y + d2, y)  # mm2's output is the graph output itself
    np.testing.assert_allclose(effects, [expect1, expect2], rtol=1e-4, atol=1e-7)
    assert effects[0] > 0 and effects[1] > 0
    assert [v.name for v in model.graph.outputs] == ["y"]  # the probe was a copy


def test_end_to_end_kl_effect_and_the_floor_ranks_by_the_bound_that_binds():
    """With a KL bound the effect also carries the logits' KL divergence, and ``Floor.share``
    ranks first the layer that uses up most of either bound's room, not the cosine's alone."""
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))
    model = _two_layer_model(w1, w2, out="logits")
    x = rng.standard_normal((5, 4)).astype(np.float32)
    d2 = 0.3 * rng.standard_normal((5, 3)).astype(np.float32)
    [(cos, kld)] = end_to_end_effects(model, [{"x": x}], ["mm2"], [[d2]], kld=True)
    y = np.maximum(x @ w1, 0) @ w2
    expect = worst_kld([{"logits": y + d2}], [{"logits": y}])
    assert kld == pytest.approx(expect, rel=1e-4) and kld > 0 and cos > 0
    assert end_to_end_effects(model, [{"x": x}], ["mm2"], [[d2]])[0][1] is None
    # a layer that barely moves the cosine but changes which token wins, beside one that
    # moves the cosine more and the distribution less
    shifts, scales = (LayerError("shift", "MatMul", 0.1, end_to_end=0.001, end_to_end_kld=0.04),
                      LayerError("scale", "MatMul", 0.1, end_to_end=0.004, end_to_end_kld=0.001))
    both = Floor(min_cos=0.98, max_kld=0.05)
    assert both.share(shifts) == pytest.approx(0.8) and both.share(scales) == pytest.approx(0.2)
    assert Floor(min_cos=0.98).share(shifts) < Floor(min_cos=0.98).share(scales)
    assert Floor(max_kld=0.05).share(shifts) > Floor(max_kld=0.05).share(scales)


def test_layer_error_counts_only_what_keeping_the_layer_removes():
    """On the NPU a kept layer runs at w8a16: the error it is ranked by is its 8-bit
    activations' and, under a 4-bit scheme, its weights' 4 bits. With its input and output at
    16 bits already and 8-bit weights there is nothing to remove, however wide its range."""
    from types import SimpleNamespace

    rng = np.random.default_rng(2)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))
    model = _two_layer_model(w1, w2)
    feeds = [{"x": rng.standard_normal((5, 4)).astype(np.float32)}]
    wide = {"lowest": -3000.0, "highest": 3000.0}  # a massive activation's range
    cache = SimpleNamespace(tensors={"x": wide, "mm1_out": {"lowest": -10.0, "highest": 10.0}})
    model.graph.node("mm1").outputs[0].name = "mm1_out"
    scheme = SimpleNamespace(activations="uint8", weights="int4", activation_symmetric=False)

    def error(sixteen, kept_bits, weights="int4"):
        found = layer_errors(model, feeds, cache, SimpleNamespace(**{**vars(scheme),
                                                                     "weights": weights}),
                             ("MatMul",), {"mm2"}, sixteen, kept_bits=kept_bits)
        return next(e.error for e in found if e.node == "mm1")

    # float when kept (CPU): the 4-bit weight and the 16-bit input's coarse step both count
    assert error({"x", "mm1_out"}, None) > 0.05
    assert error(set(), 16) > 0.05  # 8-bit activations over ±3000: keeping at 16 bits helps
    # 16-bit already: keeping removes the 4-bit weights' error only, nothing under int8 weights
    assert error({"x", "mm1_out"}, 16) > 0.01
    assert error({"x", "mm1_out"}, 16, weights="int8") == 0.0
    assert 0 < error({"x"}, 16, "int8") < error(set(), 16, "int8")  # the output's 8 bits count


def test_layer_error_reads_the_widths_the_quantized_graph_has(tmp_path):
    """ONNX Runtime's QNN config makes the output of a MatMul reading a 16-bit input 16-bit,
    converted to 8 bits for an 8-bit reader: the plan said 8. Where no reader needs the convert
    (a graph output: SmolLM2's LM head on the NPU), keeping the layer at 16 bits changes
    nothing, yet ranked by the plan its output's 8 bits counted as an error it would remove
    (it ranked first; probes keeping it measured the KL of none kept). ``quantized_widths``
    reads what the readers see from the QDQ graph."""
    from types import SimpleNamespace

    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from edgec.graph_passes.quantization.mixed_precision import quantized_widths

    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))
    model = _two_layer_model(w1, w2)
    model.graph.node("mm1").outputs[0].name = "mm1_out"
    model.graph.node("relu").outputs[0].name = "h"
    ir.save(model, tmp_path / "f.onnx")
    samples = [{"x": rng.standard_normal((5, 4)).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    def widths_with(sixteen):
        cfg = get_qnn_qdq_config(str(tmp_path / "f.onnx"), Reader(),
                                 activation_type=QuantType.QUInt8,
                                 weight_type=QuantType.QUInt8,
                                 init_overrides={t: [{"quant_type": QuantType.QUInt16}]
                                                 for t in sixteen})
        quantize(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), cfg)
        return quantized_widths(ir.load(tmp_path / "q.onnx"), ["mm1", "mm2"])

    # mm1's output is 16-bit, and its reader (the Relu, 8-bit out) sees it converted to 8
    assert widths_with({"x"}) == {"mm1": [16, 8, 8], "mm2": [8, 8, 8]}
    widths = widths_with({"x", "h"})
    assert widths["mm2"] == [16, 8, 16]  # the graph output y: 16 bits though the plan said 8

    cache = SimpleNamespace(tensors={n: {"lowest": -8.0, "highest": 8.0}
                                     for n in ("x", "mm1_out", "h", "y")})
    scheme = SimpleNamespace(activations="uint8", weights="int8", activation_symmetric=False)

    def error(w):
        found = layer_errors(model, samples, cache, scheme, ("MatMul",), {"mm1"}, {"x", "h"},
                             kept_bits=16, widths=w)
        return next(e.error for e in found if e.node == "mm2")

    assert error(None) > 1e-3  # the plan: an 8-bit output to remove
    assert error(widths) == 0.0  # as quantized: 16 bits in and out already


def test_the_floor_with_room_for_a_devices_shortfall():
    """ONNX Runtime held cosine 0.9801 where the device gave 0.9791: the floor moves by the
    0.001 the device lost (rounded outward), and only the bounds the device missed move."""
    floor = Floor(min_cos=0.98, max_kld=0.05)
    assert floor.with_room({"cosine": 0.9801, "kld": 0.01},
                           {"cosine": 0.9791, "kld": 0.02}) == "min_cos=0.981"
    assert floor.with_room({"cosine": 0.985, "kld": 0.04},
                           {"cosine": 0.975, "kld": 0.0612}) == "min_cos=0.99,max_kld=0.0288"
    assert Floor(min_cos=0.99).with_room({"cosine": 0.999}, {"cosine": 0.98}) is None  # ≥ 1
    assert Floor(max_kld=0.05).with_room({"cosine": 1.0, "kld": 0.049},
                                         {"cosine": 1.0, "kld": 0.2}) is None  # ≤ 0
    assert floor.with_room({"cosine": 0.99}, {"cosine": 0.99, "kld": 0.01}) is None  # met


def test_worst_cosine_leaves_padded_positions_out():
    mask = np.array([[0, 0, 1, 1]])
    ref = np.ones((1, 4, 3), np.float32)
    got = ref.copy()
    got[0, :2] = -50.0  # garbage where the mask is 0
    assert worst_cosine([{"h": got}], [{"h": ref}]) < 0
    assert worst_cosine([{"h": got}], [{"h": ref}], [mask]) == 1.0
    pooled = {"p": np.ones((1, 3))}  # not per token: compared whole
    assert worst_cosine([pooled], [pooled], [mask]) == 1.0


def test_worst_kld_is_the_next_token_divergence_on_unpadded_positions():
    """KL(p_ref ‖ p_got) of softmax over the last axis, mean over positions, worst sample; a
    shift of every logit (softmax-invariant) costs nothing, a swapped winner does."""
    ref = np.log(np.array([[[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]]))  # [1, 2, 3]
    got = ref[..., [1, 0, 2]]  # the first two classes swapped
    p = np.exp(ref[0])
    expected = (p * (np.log(p) - np.log(p[:, [1, 0, 2]]))).sum(-1)
    assert worst_kld([{"logits": ref + 3.0}], [{"logits": ref}]) < 1e-12
    assert np.isclose(worst_kld([{"logits": got}], [{"logits": ref}]), expected.mean())
    assert np.isclose(worst_kld([{"logits": got}], [{"logits": ref}], [np.array([[1, 0]])]),
                      expected[0])  # the padded position is left out
    two = [{"logits": ref}, {"logits": got}]
    assert np.isclose(worst_kld(two, [{"logits": ref}] * 2), expected.mean())  # the worst


def test_search_keeps_layers_until_the_kl_bound_holds_as_well_as_the_cosine():
    """A floor with both criteria: the cosine alone holds at k=0, the KL divergence needs 3."""
    ranked = [LayerError(f"n{i}", "MatMul", 0.1) for i in range(8)]
    floor = Floor(0.98, 0.05)

    def measure(k):
        return {"cosine": 0.99, "kld": 0.2 / (1 + k)}  # 0.2, 0.1, 0.067, 0.05, ...

    k, score, probes = search_exclusions(ranked, measure, floor.met)
    assert k == 3 and score["kld"] == 0.05 and floor.met(score)
    assert [p["kept"] for p in probes] == [0, 1, 2, 4, 3]
    assert Floor(0.98).met({"cosine": 0.99})  # no KL bound: not measured, not needed
    k, _, _ = search_exclusions(ranked, measure, Floor(0.98).met)
    assert k == 0


def test_layer_errors_in_node_groups_are_the_same_as_all_at_once():
    """Sensitivity holds one sample's activations of a group of nodes within a memory budget
    (video-dit small's 2 GB score tensors did not fit all at once); any grouping gives the same
    errors, effects and ranking."""
    from types import SimpleNamespace

    from edgec.calibration.histograms import within_budget
    from edgec.graph_passes.quantization.mixed_precision import Floor, _node_bytes

    rng = np.random.default_rng(5)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3)))
    model = _two_layer_model(w1, w2)
    feeds = [{"x": rng.standard_normal((5, 4)).astype(np.float32) * (1 + k)} for k in range(3)]
    cache = SimpleNamespace(tensors={n: {"lowest": -6.0, "highest": 6.0}
                                     for n in ("x", "mm1_out", "relu_out", "y")})
    model.graph.node("mm1").outputs[0].name = "mm1_out"
    model.graph.node("relu").outputs[0].name = "relu_out"
    scheme = SimpleNamespace(activations="uint8", weights="int8", activation_symmetric=False)

    runs = []

    def errors(budget):
        runs.clear()
        return layer_errors(model, feeds, cache, scheme, ("MatMul",), set(), set(),
                            floor=Floor(min_cos=0.99), budget=budget,
                            progress=lambda i, n: runs.append((i, n)))

    together = errors(1 << 30)
    assert runs == [(1, 3), (2, 3), (3, 3)]  # one group: a run per sample
    apart = errors(1)
    assert runs == [(i, 6) for i in range(1, 7)]  # two groups
    assert [e.node for e in apart] == [e.node for e in together]
    assert [e.to_json() for e in apart] == [e.to_json() for e in together]
    assert all(e.error > 0 and e.end_to_end > 0 for e in together)
    from edgec.calibration.histograms import tensor_bytes

    mm1, mm2 = model.graph.node("mm1"), model.graph.node("mm2")
    sizes = tensor_bytes(model, ["x", "mm1_out", "relu_out", "y"], feeds[0])  # x: [5, 4]
    assert sizes == {"x": 80, "mm1_out": 160, "relu_out": 160, "y": 60}
    # the activation input once, the output three times (exposed, δ, zeros); weights never
    assert _node_bytes(mm1, sizes) == 80 + 3 * 160 and _node_bytes(mm2, sizes) == 160 + 3 * 60
    nbytes = [_node_bytes(n, sizes) for n in (mm1, mm2)]
    assert within_budget([mm1, mm2], nbytes, 1) == [[mm1], [mm2]]
    assert within_budget([mm1, mm2], nbytes, 1 << 20) == [[mm1, mm2]]


def test_layer_errors_in_row_blocks_are_the_same_as_whole(monkeypatch):
    """A node's δ is computed in row blocks of its first input (a 2.2 GB score product was ~6
    copies of itself in numpy at once): the same δ, error and effects as whole, for a batched
    product of two activations (attention scores, then probabilities × values) on the NPU's
    16-bit kept path and the CPU's float one, and for a weight MatMul."""
    from types import SimpleNamespace

    import edgec.graph_passes.quantization.mixed_precision as mp

    f = ir.DataType.FLOAT
    q, k = (ir.Value(name=n, type=ir.TensorType(f), shape=ir.Shape([2, 16, 4])) for n in "qk")
    w = ir.Value(name="w", const_value=ir.tensor(
        np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)))
    kt = ir.node("Transpose", [k], attributes={"perm": [0, 2, 1]}, name="kt")
    scores = ir.node("MatMul", [q, kt.outputs[0]], name="scores")
    probs = ir.node("Softmax", scores.outputs, attributes={"axis": -1}, name="softmax")
    mix = ir.node("MatMul", [probs.outputs[0], k], name="mix")
    proj = ir.node("MatMul", [mix.outputs[0], w], name="proj")
    nodes = [kt, scores, probs, mix, proj]
    for n in nodes:
        n.outputs[0].name = f"{n.name}_out"
    proj.outputs[0].name = "y"
    model = ir.Model(ir.Graph([q, k], proj.outputs, nodes=nodes, initializers=[w],
                              opset_imports={"": 17}, name="g"), ir_version=9)
    rng = np.random.default_rng(7)
    feeds = [{n: rng.standard_normal((2, 16, 4)).astype(np.float32) for n in "qk"}
             for _ in range(2)]
    cache = SimpleNamespace(tensors={n: {"lowest": -3.0, "highest": 3.0}
                                     for n in ("q", "k", "kt_out", "scores_out",
                                               "softmax_out", "mix_out", "y")})
    scheme = SimpleNamespace(activations="uint8", weights="int8", activation_symmetric=False)
    seen, squares = set(), mp._squares
    monkeypatch.setattr(mp, "_squares", lambda x: seen.add(x.shape) or squares(x))

    def errors(rows_bytes, kept_bits):
        monkeypatch.setattr(mp, "_ROWS_BYTES", rows_bytes)
        seen.clear()
        found = layer_errors(model, feeds, cache, scheme, ("MatMul",), set(), set(),
                             kept_bits=kept_bits)
        return {e.node: e for e in found}, set(seen)

    for kept_bits in (None, 16):
        whole, whole_shapes = errors(1 << 30, kept_bits)
        blocks, block_shapes = errors(2 * 16 * 4 * 4, kept_bits)  # 4 rows of a [2, 16, 16] score
        assert (2, 4, 16) in block_shapes and (2, 4, 16) not in whole_shapes  # blocks taken
        assert set(whole) == set(blocks) == {"scores", "mix", "proj"}
        for name, e in whole.items():
            assert e.error > 0 and blocks[name].error == pytest.approx(e.error, rel=1e-6)
            assert blocks[name].end_to_end == pytest.approx(e.end_to_end, rel=1e-4, abs=1e-9)


def test_a_quantized_conv_is_a_candidate_with_its_own_error():
    """A Conv the scheme quantizes (a DiT's patch embedding on the CPU targets) is ranked with
    the MatMuls: its δ is ONNX Runtime's Conv on the kept and the planned input and weight
    (video-dit tiny: with every MatMul kept, the patch embedding held min_cos=0.99999 out of
    reach). A 1×1 Conv is a matmul over channels, which gives the expected error here."""
    from types import SimpleNamespace

    rng = np.random.default_rng(8)
    f = ir.DataType.FLOAT
    x = ir.Value(name="x", type=ir.TensorType(f), shape=ir.Shape([1, 3, 4, 4]))
    w_np = rng.standard_normal((5, 3, 1, 1)).astype(np.float32)
    b_np = rng.standard_normal(5).astype(np.float32)
    w2_np = rng.standard_normal((4, 2)).astype(np.float32)
    w, b, w2 = (ir.Value(name=n, const_value=ir.tensor(a))
                for n, a in (("w", w_np), ("b", b_np), ("w2", w2_np)))
    conv = ir.node("Conv", [x, w, b], attributes={"kernel_shape": [1, 1]}, name="conv")
    conv.outputs[0].name = "c"
    mm = ir.node("MatMul", [conv.outputs[0], w2], name="mm")
    mm.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], mm.outputs, nodes=[conv, mm], initializers=[w, b, w2],
                              opset_imports={"": 17}, name="g"), ir_version=9)
    feeds = [{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}]
    cache = SimpleNamespace(tensors={"x": {"lowest": -4.0, "highest": 4.0},
                                     "c": {"lowest": -9.0, "highest": 9.0}})
    scheme = SimpleNamespace(activations="uint8", weights="int8", activation_symmetric=False)
    found = {e.node: e for e in layer_errors(model, feeds, cache, scheme, ("MatMul", "Conv"),
                                             set(), set())}
    assert set(found) == {"conv", "mm"}
    assert "conv" not in {e.node for e in layer_errors(model, feeds, cache, scheme, ("MatMul",),
                                                       set(), set())}  # not quantized: no
    from edgec.graph_passes.quantization.mixed_precision import (
        fake_quant_activation,
        fake_quant_weight,
    )

    xs = feeds[0]["x"]
    w_mat = w_np[:, :, 0, 0]
    kept = np.einsum("oc,nchw->nohw", w_mat, xs) + b_np[None, :, None, None]
    planned = np.einsum("oc,nchw->nohw", fake_quant_weight(w_np, 8, 0)[:, :, 0, 0],
                        fake_quant_activation(xs, -4.0, 4.0, 8, False)) + \
        b_np[None, :, None, None]
    expected = np.linalg.norm(planned - kept) / np.linalg.norm(kept)
    assert found["conv"].error == pytest.approx(expected, rel=1e-4) and expected > 1e-3
    assert found["conv"].end_to_end > 0
    # ort-cpu's Conv output is quantized too (QLinearConv): kept float, its readers lose that
    # rounding as well, so it is part of the error; the output's width comes from the graph
    fused = SimpleNamespace(**vars(scheme), fused_outputs=("Conv",))
    with_output = {e.node: e for e in layer_errors(
        model, feeds, cache, fused, ("MatMul", "Conv"), set(), set(),
        widths={"conv": [8, 8, 8], "mm": [8, None, None]})}
    rounded = fake_quant_activation(planned.astype(np.float32), -9.0, 9.0, 8, False)
    expected_out = np.linalg.norm(rounded - kept) / np.linalg.norm(kept)
    assert with_output["conv"].error == pytest.approx(expected_out, rel=1e-4)
    assert expected_out != pytest.approx(expected, rel=1e-2)
    assert with_output["mm"].error == pytest.approx(found["mm"].error, rel=1e-6)  # a MatMul


def test_non_finite_outputs_do_not_read_as_the_floor_held():
    """min(1.0, nan) is 1.0: a w8a8 graph whose every output was NaN held the floor at
    "held-out cosine 1.0000"; NaN/inf at the same places in both stay equal (compare_outputs)."""
    ref = np.arange(1.0, 9.0).reshape(2, 4)
    nan = np.full_like(ref, np.nan)
    assert worst_cosine([{"h": nan}], [{"h": ref}]) == 0.0
    assert worst_cosine([{"h": ref}, {"h": np.where(ref > 7, np.inf, ref)}],
                        [{"h": ref}, {"h": ref}]) == 0.0
    both = np.where(ref > 7, np.nan, ref)
    assert worst_cosine([{"h": both}], [{"h": both}]) == 1.0
    assert worst_kld([{"logits": nan[None]}], [{"logits": ref[None]}]) == np.inf
    assert worst_kld([{"logits": both[None]}], [{"logits": both[None]}]) == 0.0
