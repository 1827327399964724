"""A quantized device judged against ONNX Runtime relative to ORT's own error vs fp32."""

import numpy as np
import pytest

from edgec.fidelity import QUANTIZED_AGREEMENT, judge_quantized


@pytest.mark.parametrize("device_vs_ort,ort_vs_ref,verdict", [
    (0.9995, 0.9990, "agrees"),       # a well-quantizing graph: the device matches ORT
    (0.996, 0.975, "graph"),          # planted outliers on OpenVINO (measured): the graph's doing
    (0.84, 0.926, "graph"),           # a real checkpoint on the HTP: ORT itself is far from fp32
    (0.95, 0.9995, "device"),         # ORT is close to fp32, the device is not: a target bug
    (0.9979, 0.9999, "device"),       # a small drift the graph does not explain: flagged
])
def test_verdicts(device_vs_ort, ort_vs_ref, verdict):
    got, message = judge_quantized(device_vs_ort, ort_vs_ref)
    assert got == verdict
    assert (message is None) == (verdict == "agrees")
    if verdict == "graph":
        assert "the quantized graph's own error" in message and "not the target" in message
    if verdict == "device":
        assert "although ONNX Runtime on it stays close" in message


def test_agreement_threshold_is_inclusive():
    assert judge_quantized(QUANTIZED_AGREEMENT, 0.5)[0] == "agrees"


def test_the_floor_is_measured_again_on_the_artifacts_runtime(caplog):
    """The floor's search runs ONNX Runtime on the QDQ graph; the built artifact's runtime is
    measured on the same held-out samples, and a miss there is said, not hidden."""
    from types import SimpleNamespace

    from edgec.fidelity import floor_on_target
    from edgec.graph_passes.quantization.mixed_precision import Floor

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3)).astype(np.float32)} for _ in range(2)]
    reference = [{"logits": rng.standard_normal((1, 4, 8))} for _ in feeds]
    floor = Floor(min_cos=0.98, max_kld=0.05, default=True)
    quantize = SimpleNamespace(floor_samples=(feeds, reference, [None, None], floor, None))
    searched = {"reached": True, "achieved": 0.999, "achieved_kld": 0.01}

    def device(noise):
        outs = iter([{"logits": r["logits"] + noise * rng.standard_normal((1, 4, 8))}
                     for r in reference])
        return SimpleNamespace(runtime="qnn-htp", run=lambda feed: next(outs))

    assert floor_on_target(device(0.01), [object(), quantize], searched) is None
    assert searched["on_target"]["reached"] and searched["on_target"]["kld"] < 0.001
    with caplog.at_level("WARNING"):
        note = floor_on_target(device(1.0), [quantize], searched)
    assert not searched["on_target"]["reached"] and searched["on_target"]["kld"] > 0.05
    assert not searched["reached"]  # held on ONNX Runtime only: not reached
    assert note.startswith("qnn-htp misses the accuracy floor") and note in caplog.text
    assert floor_on_target(device(1.0), [object()], {}) is None  # no floor ran: nothing to say

    def refuses(feed):
        raise ValueError("input 'past_0' is missing")

    assert floor_on_target(SimpleNamespace(runtime="openvino", run=refuses), [quantize],
                           searched) is None
    assert searched["on_target"] == {"runtime": "openvino",
                                     "skipped": "ValueError: input 'past_0' is missing"}


def test_the_second_search_holds_the_device_to_the_floor_asked():
    """The second compile searched at a moved floor (min_cos 0.99 where 0.98 was asked): the
    device meeting 0.98 reaches the floor even where ONNX Runtime missed the moved one, and a
    device under 0.98 misses it, said as before."""
    from types import SimpleNamespace

    from edgec.fidelity import floor_on_target
    from edgec.graph_passes.quantization.mixed_precision import Floor, worst_cosine

    rng = np.random.default_rng(2)
    reference = [{"y": rng.standard_normal((2, 16))} for _ in range(2)]
    moved = Floor(min_cos=0.99)
    quantize = SimpleNamespace(floor_samples=([{}, {}], reference, [None, None], moved, None))

    def device(noise):
        outs = [{"y": r["y"] + noise * rng.standard_normal((2, 16))} for r in reference]
        it = iter(outs)
        return SimpleNamespace(runtime="qnn-htp", run=lambda feed: next(it)), worst_cosine(
            outs, reference, [None, None])

    close, cos = device(0.17)
    assert 0.98 < cos < 0.99
    mixed = {"reached": False, "achieved": 0.9899}  # ONNX Runtime missed the moved floor
    assert floor_on_target(close, [quantize], mixed) is None  # no floor asked: as before
    assert not mixed["reached"]
    close, cos = device(0.17)
    assert 0.98 < cos < 0.99
    assert floor_on_target(close, [quantize], mixed, asked=Floor(min_cos=0.98)) is None
    assert mixed["reached"] and mixed["on_target"]["reached"]
    far, cos = device(0.3)
    assert cos < 0.98
    mixed = {"reached": True, "achieved": 0.9905}
    note = floor_on_target(far, [quantize], mixed, asked=Floor(min_cos=0.98))
    assert not mixed["reached"] and note.startswith("qnn-htp misses the accuracy floor "
                                                    "(min_cos=0.98)")


def test_a_device_shortfall_is_said_with_the_floor_that_leaves_room_for_it():
    """ORT held min_cos 0.98 at 0.9805; the device a little under it: the note names the floor
    to ask for (0.98 plus the device's shortfall), and the manifest records it."""
    import math
    from types import SimpleNamespace

    from edgec.fidelity import floor_on_target
    from edgec.graph_passes.quantization.mixed_precision import Floor, worst_cosine

    rng = np.random.default_rng(1)
    reference = [{"y": rng.standard_normal((2, 16))} for _ in range(2)]
    outputs = [{"y": r["y"] + 0.2 * rng.standard_normal((2, 16))} for r in reference]
    device = worst_cosine(outputs, reference, [None, None])
    assert 0.95 < device < 0.98
    floor = Floor(min_cos=0.98)
    quantize = SimpleNamespace(floor_samples=([{}, {}], reference, [None, None], floor, None))
    mixed = {"reached": True, "achieved": 0.9805}
    outs = iter(outputs)
    note = floor_on_target(SimpleNamespace(runtime="qnn-htp", run=lambda feed: next(outs)),
                           [quantize], mixed)
    room = f"min_cos={math.ceil((0.98 + 0.9805 - device) * 1e4 - 1e-6) / 1e4:g}"
    assert mixed["on_target"]["floor_with_room"] == room and not mixed["reached"]
    assert f"ask for {room} (the floor moved by this runtime's shortfall" in note
    from edgec.report import floor_line

    mixed.update(min_cos=0.98, kept=[], candidates=None)
    assert floor_line(mixed).endswith(f"which misses it (ask for {room})")


def test_a_device_far_from_ort_on_the_held_out_samples_is_judged_as_on_the_example(caplog):
    """hbert (LayerNorm outputs near ±45) w8a16 on qnn-htp: the floor held on ONNX Runtime
    (0.9997), the HTP ran the held-out samples at 0.73, and the compile shipped it as "min_cos
    0.98 reached", with advice (a tighter floor) that cannot help. A miss on the device makes
    the floor not reached, and is judged against ONNX Runtime on the same graph as the example
    is: a device far from it fails as a target bug naming where (on the worst sample), a
    smaller drift says the device is the problem, the graph's own error keeps the advice."""
    from types import SimpleNamespace

    import onnx_ir as ir
    from onnx import TensorProto, helper

    from edgec.errors import VerificationError
    from edgec.fidelity import floor_on_target
    from edgec.graph_passes.quantization.mixed_precision import Floor
    from edgec.report import floor_line

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                            ir_version=8))
    feeds = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(3)]

    def noisy(scale):
        return [{"y": f["x"] + scale * rng.standard_normal((1, 64)).astype(np.float32)}
                for f in feeds]

    def check(reference, device, located=None, min_cos=0.98):
        quantize = SimpleNamespace(floor_samples=(feeds, reference, [None] * 3,
                                                  Floor(min_cos=min_cos), None))
        outs = iter(device)
        session = SimpleNamespace(runtime="qnn-htp", run=lambda feed: next(outs))
        mixed = {"min_cos": min_cos, "reached": True, "achieved": 0.999}
        locate = None if located is None else lambda f: located.append(f) or "node 'qkv'"
        return floor_on_target(session, [quantize], mixed, model, locate), mixed

    exact = [{"y": f["x"].copy()} for f in feeds]  # ONNX Runtime on the graph: exact
    device = noisy(0.02)
    device[1] = {"y": -feeds[1]["x"]}  # one sample sign-flipped on the device
    located = []
    with pytest.raises(VerificationError, match="target bug: report it with the model "
                       r"\(node 'qkv'\)") as err:
        check(exact, device, located)
    assert "misses the accuracy floor" in str(err.value)
    assert "a tighter floor cannot help" in str(err.value)
    assert len(located) == 1 and located[0] is feeds[1]

    with caplog.at_level("WARNING"):  # off ONNX Runtime, not below 0.98 of it: a warning
        note, mixed = check(exact, noisy(0.12), min_cos=0.995)
    assert not mixed["reached"] and not mixed["on_target"]["reached"]
    assert 0.98 <= mixed["on_target"]["vs_onnxruntime_cosine"] < 0.998
    assert "the device is the problem" in note and "tighter floor cannot help" in note
    assert note in caplog.text
    line = floor_line({**mixed, "kept": [], "candidates": None})
    assert line.startswith("min_cos 0.995 not reached") and "which misses it" in line

    # ONNX Runtime itself near the floor (0.985) and the device within 4× that of it: the
    # graph's error, amplified; a tighter floor is the advice
    reference = [{"y": f["x"] + 0.17 * rng.standard_normal((1, 64))} for f in feeds]
    note, mixed = check(reference, noisy(0.2))
    assert not mixed["reached"] and "tighter floor (max_kld=, min_cos=)" in note


def test_the_floor_on_target_binds_each_feeds_adapter_as_the_session_does():
    """Swappable LoRA: the held-out feeds carry each adapter's LoRA inputs, which a session
    refuses as feeds (it binds them itself): the check was skipped ("unknown ['lora.…']") and
    the floor reported reached, measured on ORT alone. The session now runs each feed with its
    adapter, and an adapter that misses the floor is named."""
    from types import SimpleNamespace

    from edgec.fidelity import floor_on_target
    from edgec.graph_passes.quantization.mixed_precision import Floor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3)).astype(np.float32)
    feeds = [{"x": x, "lora.q.A": np.ones((3, 1), np.float32)} for _ in range(2)]
    reference = [{"y": rng.standard_normal((1, 8))} for _ in feeds]
    floor = Floor(min_cos=0.98)
    quantize = SimpleNamespace(floor_samples=(feeds, reference, [None, None], floor,
                                              ["a", "base"]))
    ran = []

    def run(feed, adapter=None):
        ran.append((sorted(feed), adapter))
        i = len(ran) - 1
        noise = 10.0 if adapter == "a" else 0.0  # adapter a runs badly on the device
        return {"y": reference[i]["y"] + noise * rng.standard_normal((1, 8))}

    session = SimpleNamespace(runtime="openvino", run=run,
                              inputs=[SimpleNamespace(name="x")])
    searched = {"reached": True, "achieved": 0.999}
    note = floor_on_target(session, [quantize], searched)
    assert ran == [(["x"], "a"), (["x"], "base")]
    on = searched["on_target"]
    assert not on["reached"] and on["adapters"]["base"] == {"cosine": 1.0}
    assert on["adapters"]["a"]["cosine"] < 0.98 and "(adapter a: cosine" in note


def test_the_summary_names_the_runtime_that_measured_the_target(tmp_path):
    """Without TensorRT, ORT measures a tensorrt artifact: the row said "tensorrt vs pytorch"."""
    import edgec
    from edgec.report import summary_rows

    art = edgec.compile("pose-prior", target="tensorrt", output_dir=tmp_path / "o")
    labels = [label for label, _ in summary_rows(art.report)]
    assert "onnxruntime vs pytorch" in labels and "tensorrt vs pytorch" not in labels


def test_a_floor_below_the_targets_fidelity_against_pytorch_is_not_reached(caplog):
    """An NPU decoder reported "accuracy floor ... reached (held out): cosine 0.9996" beside
    "onnxruntime-qnn (HTP) vs pytorch ... cosine 0.55": the held-out samples (empty KV buffers)
    missed what the example exercised. The built graphs' fidelity against the source holds the
    floor too, in report.json, the manifest and the printed line."""
    import copy

    from edgec.pipeline import _floor_against_source
    from edgec.report import _mixed_precision_section, floor_line, mixed_precision_stats

    def entry(logits, key=0.99998):
        return {"reference": "pytorch", "runtime": "onnxruntime-qnn (HTP)", "approximate": True,
                "outputs": {"logits": {"cosine": logits}, "present.0.key": {"cosine": key}}}

    def compiled(passes=(), **fidelity):
        mp = {"min_cos": 0.98, "max_kld": 0.05, "default": True, "reached": True,
              "achieved": 0.999597, "achieved_kld": 8.6e-05, "held_out": 4, "kept": [],
              "layer_errors": [], "precision": "w8a16", "candidates": None,
              "on_target": {"runtime": "onnxruntime-qnn (HTP)", "reached": True,
                            "cosine": 0.999584, "kld": 8.9e-05}}
        report = {"passes": [*passes, {"name": "mask-fill", "exact": True, "stats": {}},
                             {"name": "quantize", "exact": False,
                              "stats": {"mixed_precision": mp}}],
                  "fidelity": fidelity}
        return report, copy.deepcopy(report)

    report, manifest = compiled(target_vs_source=entry(0.5506),
                                decode_graph_vs_source=entry(0.5648))
    notes = {}
    with caplog.at_level("WARNING"):
        _floor_against_source(report, manifest, notes)
    for d in (report, manifest):
        mp = mixed_precision_stats(d)
        assert not mp["reached"]
        assert mp["vs_source"] == {"fidelity": "target_vs_source", "output": "logits",
                                   "runtime": "onnxruntime-qnn (HTP)", "reference": "pytorch",
                                   "cosine": 0.5506}
    line = floor_line(mixed_precision_stats(report))
    assert "not reached (held out, ONNX Runtime)" in line
    assert line.endswith("on the compile's example onnxruntime-qnn (HTP) vs pytorch: logits "
                         "cosine 0.5506")
    section = "\n".join(_mixed_precision_section(report))
    assert "not reached as quantized" in section
    assert "On the compile's example onnxruntime-qnn (HTP) vs pytorch: logits cosine 0.5506, " \
        "below the floor." in section
    assert "is not reached" in notes["notes"][0] and notes["notes"][0] in caplog.text

    # a companion graph below the floor counts as much as the main one
    report, manifest = compiled(target_vs_source=entry(0.9999),
                                decode_graph_vs_source=entry(0.9999, key=0.6))
    _floor_against_source(report, manifest, {})
    assert mixed_precision_stats(report)["vs_source"]["fidelity"] == "decode_graph_vs_source"
    # above the floor, just below it (one example is no contradiction of the held-out
    # samples), or with another approximation in the numbers: left as measured
    for report, manifest in (compiled(target_vs_source=entry(0.9999)),
                             compiled(target_vs_source=entry(0.85)),
                             compiled([{"name": "sparse-attention", "exact": False,
                                        "stats": {}}], target_vs_source=entry(0.55))):
        _floor_against_source(report, manifest, {})
        assert mixed_precision_stats(report)["reached"]
        assert "vs_source" not in mixed_precision_stats(manifest)



def _batch_model(path, op: str):
    """x [batch, 3] → y: ``concat`` joins a [1, 3] constant on axis 1 (fails at batch 2, as
    share=batch rainfusion did), ``mix`` scales every row by the batch's sum (mixes rows),
    ``sound`` scales it by a constant."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    one = helper.make_tensor("one", TensorProto.FLOAT, [1, 3], [1.0, 2.0, 3.0])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [0])
    nodes = {"concat": [helper.make_node("Concat", ["x", "one"], ["y"], axis=1)],
             "mix": [helper.make_node("ReduceSum", ["x", "axis"], ["s"]),
                     helper.make_node("Mul", ["x", "s"], ["y"])],
             "sound": [helper.make_node("Mul", ["x", "one"], ["y"])]}[op]
    graph = helper.make_graph(nodes, op, [x], [y], [one, axis])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              path)


@pytest.mark.parametrize("op, match", [
    ("concat", "ONNX Runtime cannot run the rewritten model on its example inputs repeated to "
               "batch 2 \\(they fit its inputs\\): .*Concat.*edgec bug"),
    ("mix", "at batch 2 .* vs batch 1: .* mixes up its batch rows")])
def test_a_graph_that_fails_at_another_batch_is_an_internal_error(tmp_path, op, match):
    """The compile verified one batch size: share=batch rainfusion passed at batch 1 and then
    failed every guidance pair; at the example's batch the ORT failure read as the user's
    ("could not run the model on these inputs", exit 2)."""
    from edgec.errors import InternalError
    from edgec.fidelity import other_batch
    from edgec.runtimes.ort import OrtSession

    _batch_model(tmp_path / "m.onnx", op)
    session = OrtSession(tmp_path / "m.onnx")
    with pytest.raises(InternalError, match=match):
        other_batch(session, {"x": np.ones((1, 3), np.float32)})
    if op == "concat":  # an example of batch 2: the first verification run fails so
        from types import SimpleNamespace

        from edgec.fidelity import target_fidelity

        src = SimpleNamespace(feeds={"x": np.ones((2, 3), np.float32)}, reference={})
        with pytest.raises(InternalError, match="on the source's example inputs"):
            target_fidelity(session, src, True, None)


def test_another_batch_of_a_sound_graph_is_recorded(tmp_path):
    from edgec.fidelity import other_batch
    from edgec.runtimes.ort import OrtSession

    _batch_model(tmp_path / "m.onnx", "sound")
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert other_batch(OrtSession(tmp_path / "m.onnx"), feeds) == {
        "batch": 4, "rtol": 1e-4, "max_rel": 0.0}
