"""Quantized compiles end to end: accuracy floors per target, cache reuse, TensorRT legality."""

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.errors import UserError

CPU_TARGETS = ["ort-cpu", "openvino-cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


def _attention_b_types(path):
    """The quantized types of the second inputs of MatMuls between two activations."""
    import onnx_ir as ir

    model = ir.load(path)
    types = set()
    for n in model.graph:
        if n.op_type != "MatMul":
            continue
        dqs = [v.producer() for v in n.inputs[:2]]
        if all(d is not None and d.op_type == "DequantizeLinear" for d in dqs) and \
                dqs[1].inputs[0].const_value is None:
            types.add(dqs[1].inputs[2].const_value.dtype.name)  # the zero point's type
    return types


def _quantized_after_layout(path):
    """QuantizeLinear nodes reading a Reshape/Transpose output that nothing else reads."""
    import onnx_ir as ir

    model = ir.load(path)
    return sum(1 for n in model.graph if n.op_type == "QuantizeLinear"
               and (p := n.inputs[0].producer()) is not None
               and p.op_type in ("Reshape", "Transpose") and len(n.inputs[0].uses()) == 1)


def _floor(art):
    """The quantize pass's accuracy floor entry (``mixed_precision``)."""
    return next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]


def _worst(art, key="cosine"):
    outs = art.report["fidelity"]["target_vs_source"]["outputs"].values()
    return min(e[key] for e in outs)


@pytest.mark.parametrize("target", [*CPU_TARGETS, "qnn-htp", "tensorrt"])
def test_bert_with_attention_mask_keeps_cosine(bert_checkpoint, tmp_path, target,
                                              timed_compiles):
    art = edgec.compile(str(bert_checkpoint), target=target, output_dir=tmp_path / "o",
                        config="batch=2,seq=16", quantize="w8a8")
    assert _worst(art) >= 0.98
    q = art.manifest["quantization"]
    assert q["calibration"]["how"] == "calibrated during compile"
    assert q["calibration"]["data"] == "random tokens with random padding"
    if target in ("openvino-cpu", "qnn-htp"):  # the device runs the same QDQ graph as ORT
        agree = art.report["fidelity"]["target_vs_source"]["vs_rewritten_onnx"]["outputs"]
        assert min(e["cosine"] for e in agree.values()) >= 0.998
    lat = art.report["latency"]
    if target == "qnn-htp":  # the HTP emulator: its one run's time, and no latency claimed
        assert "p50_ms" not in lat and "emulator" in lat["skipped"]
        assert lat["emulator_run_ms"] > 0
        assert "latency | not measured: ran on the QNN HTP emulator" in (
            art.path / "report.md").read_text()
        from typer.testing import CliRunner

        from edgec.cli import app

        bench = CliRunner().invoke(app, ["bench", str(art.path), "--iterations", "1"])
        assert bench.exit_code == 0 and "measured on the QNN HTP emulator" in " ".join(
            bench.stdout.split())
        # compare ran target/model_ctx.onnx, and listed it as "not compared"
        cmp = CliRunner().invoke(app, ["compare", str(art.path), str(art.path), "--json"])
        assert cmp.exit_code == 0 and json.loads(cmp.stdout)["not_compared"] == []
    elif target != "tensorrt":
        assert lat["p50_ms"] > 0
        # the quantized graph timed beside the fp32 graph on the same target, interleaved
        vs = lat["vs_fp32"]
        assert vs["speedup"] > 0 and vs["fp32_p50_ms"] > 0 and vs["rounds"] >= 3
        assert "the fp32 graph's speed on this machine" in " ".join(
            (art.path / "report.md").read_text().split())
    if target in ("qnn-htp", "tensorrt"):  # an emulator's or a stand-in's time says nothing
        assert "vs_fp32" not in lat
    from edgec.inspect import describe  # `edgec inspect` on an artifact with no latency too

    assert describe(art.path)["latency_p50_ms"] == lat.get("p50_ms")


@pytest.mark.parametrize("model", ["llama", "video-dit"])
@pytest.mark.parametrize("target", CPU_TARGETS)
def test_reference_models_w8a8(tmp_path, model, target):
    art = edgec.compile(model, target=target, output_dir=tmp_path / "o", config="tiny",
                        quantize="w8a8")
    assert _worst(art) >= 0.99
    ops = art.report["graph"]["ops"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    # the default accuracy floor: measured once as quantized, held, no per-layer analysis
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    assert mp["default"] and mp["min_cos"] == 0.98 and mp["reached"]
    assert [p["kept"] for p in mp["probes"]] == [0] and not mp["kept"] and not mp["layer_errors"]
    assert not mp["held_out_seen_by_calibration"]  # generated past the calibration samples
    # a language model's logits also hold the default KL divergence bound
    floor = "min_cos 0.98 and max_kld 0.05" if model == "llama" else "min_cos 0.98"
    assert (mp["max_kld"] == 0.05 and 0 <= mp["achieved_kld"] <= 0.05 if model == "llama"
            else mp["max_kld"] is None and "achieved_kld" not in mp)
    assert f"{floor} (the default floor) reached as quantized" in (
        art.path / "report.md").read_text()
    if model == "llama":  # attention's Kᵀ/V: s8 on OpenVINO (int8 kernels there), u8 on ORT
        assert _attention_b_types(art.path / "model.onnx") == {
            "openvino-cpu": {"INT8"}, "ort-cpu": {"UINT8"}}[target]
        # OpenVINO's quantizers sit above the head reshapes (exact), ORT's at the MatMul input
        after_layout = _quantized_after_layout(art.path / "model.onnx")
        assert (after_layout == 0) if target == "openvino-cpu" else (after_layout > 0)
    sess = art.load()
    out = sess.run(sess.default_feeds)
    assert all(v.size for v in out.values())


@pytest.mark.parametrize("model,scheme,floor", [
    ("llama", "w8a8", 0.99), ("video-dit", "w8a16", 0.99),
    # 8-bit activations everywhere (the HTP has no float); the timestep embedding's angles and
    # frequency table at 16 bits: measured 0.9988 (0.958 with the table at 8 bits; w8a16: 0.9996)
    ("video-dit", "w8a8", 0.995),
    # the dual-branch DiT: two outputs, two timestep paths; measured 0.9976 (0.703 before),
    # 0.9963 since calibration follows the sampler's trajectory (the example is an N(0, 1)
    # draw off it), the HTP 0.9978 from ORT on it: the judge's "graph" verdict, its drift of
    # the order of the graph's own error
    ("motion-dit", "w8a8", 0.99),
    # 4-bit MatMul weights, 8-bit activations: measured 0.990 on llama tiny (w4a16: 0.990)
    ("llama", "w4a8", 0.98)])
def test_qnn_htp_whole_graph_on_the_npu(tmp_path, model, scheme, floor):
    art = edgec.compile(model, target="qnn-htp", output_dir=tmp_path / "o", config="tiny",
                        quantize=scheme)
    assert _worst(art) >= floor
    rt = art.manifest["runtime"]
    assert rt["name"] == "qnn" and (art.path / rt["model"]).is_file()
    assert art.manifest["inputs"][0]["shape"] == list(art.load().default_feeds[
        art.manifest["inputs"][0]["name"]].shape)  # static shapes
    agree = art.report["fidelity"]["target_vs_source"]["vs_rewritten_onnx"]["outputs"]
    assert min(e["cosine"] for e in agree.values()) >= (0.997 if model == "motion-dit"
                                                        else 0.998)
    if scheme == "w4a8":  # block-wise int4 in the LPBQ form, and the device agrees (above)
        lpbq = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]["lpbq"]
        assert lpbq["weights"] > 0 and lpbq["block"] == 32 and lpbq["scale_bits"] == 4
        import onnx_ir as ir

        graph = ir.load(art.path / "model.onnx").graph
        blocked = [n for n in graph if n.op_type == "DequantizeLinear"
                   and "block_size" in n.attributes]
        assert len(blocked) == lpbq["weights"]
        assert all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in blocked)
        # the LM head at w8a16: int8 weights, 16-bit input
        stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
        (head,) = [n for n in graph if n.name in stats["heads_w8a16"]]
        weight_dq, input_dq = head.inputs[1].producer(), head.inputs[0].producer()
        assert weight_dq.inputs[0].const_value.dtype == ir.DataType.INT8
        assert input_dq.inputs[0].producer().inputs[2].const_value.dtype == ir.DataType.UINT16
    sess = edgec.load(art.path)  # reloads the precompiled EPContext model, fallback disabled
    assert sess.runtime.startswith("onnxruntime-qnn")
    out = sess.run(sess.default_feeds)
    assert all(v.size for v in out.values())


def test_qnn_htp_block_sparse_attention_on_the_npu(tmp_path):
    """Block-sparse attention on the NPU, first-frame sinks and a text prefix. Before: a rank-6
    K/V block Gather the HTP refused; then, in turn, inner-axis Gathers, batch-2 rank-5 Gathers
    and a Reshape regrouping the 16-bit softmax·V output that it computed wrong, and a block
    selection that tied on the HTP (+1e9 forced scores in TopK's input: one quantization step
    over every real score): device vs ORT 0.83 → 0.999 (measured 0.9992)."""
    import onnx_ir as ir

    art = edgec.compile("video-dit", target="qnn-htp", output_dir=tmp_path / "o", config="tiny",
                        quantize="w8a8",
                        sparse_attention="keep=0.25,block=8,qblock=16,min_seq=16,sink=frame")
    stats = {p["name"]: p["stats"] for p in art.report["passes"]}
    assert stats["sparse-attention"]["sites_rewritten"] == 2
    assert stats["qnn-legalize"]["gathers_to_leading_axis"] > 0
    agree = art.report["fidelity"]["target_vs_source"]["vs_rewritten_onnx"]["outputs"]
    assert min(e["cosine"] for e in agree.values()) >= 0.998
    assert _worst(art) >= 0.99  # vs dense PyTorch: measured 0.9965
    graph = ir.load(art.path / "model.onnx").graph
    for topk in (n for n in graph if n.op_type == "TopK"):  # block scores at 16 bits, no 1e9
        dq = topk.inputs[0].producer()
        assert dq.op_type == "DequantizeLinear"
        zero_point, scale = dq.inputs[2].const_value, dq.inputs[1].const_value.numpy()
        assert zero_point.dtype == ir.DataType.UINT16 and float(scale) < 1.0


def test_npu_floor_keeps_layers_at_w8a16_under_4_bit_weights(tmp_path):
    """On the NPU a kept layer is w8a16: 16-bit activations and 8-bit weights. With 16-bit
    activations alone, motion-dit tiny w4a8 missed the default floor with all 67 MatMuls kept
    (0.926 as quantized, 0.948 with all kept: its 4-bit weights were the loss); 0.984 with 16.
    A floor of 0.985: at the default 0.98, calibrated with a draw of conditions per sample, ORT
    met it with 12 kept (0.98008) and the HTP measured 0.97998, so the floor read not reached
    (the report's advice: a tighter floor leaves room for the device); 16 kept: 0.988. At
    0.985 on an AVX2-only host (ORT measuring the QDQ graph unfused there) 15 kept met it by
    2e-4 (0.98517) and the HTP measured 0.98510 or 0.98500 run to run, so the floor is 0.986,
    off the probes' values on both hosts (16 kept: 0.9871 there, 0.988 on VNNI). Held out on
    2 samples, not the default 4: each probe and the HTP emulator's measurement run on them
    (4 took 49 s here, 2 take 38 s)."""
    import onnx_ir as ir

    art = edgec.compile("motion-dit", target="qnn-htp", output_dir=tmp_path / "o",
                        config="tiny", quantize="w4a8:min_cos=0.986,held_out=2")
    stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    mp = stats["mixed_precision"]
    assert mp["probes"][0]["kept"] == 0 and mp["probes"][0]["cosine"] < 0.98
    assert mp["reached"] and mp["achieved"] >= 0.986 and mp["precision"] == "w8a16"
    assert 0 < len(mp["kept"]) == stats["kept_w8a16"] < mp["candidates"]
    kept = {e["node"] for e in mp["kept"]}
    weights = {}
    for node in ir.load(art.path / "model.onnx").graph:
        dq = node.inputs[1].producer() if node.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].is_initializer():
            weights[node.name] = dq.inputs[0].const_value.dtype
            if node.name in kept:
                zero = node.inputs[0].producer().inputs[2].const_value
                assert zero.dtype == ir.DataType.UINT16, node.name
    assert kept <= set(weights) and {weights[n] for n in kept} == {ir.DataType.INT8}
    assert ir.DataType.INT4 in {w for n, w in weights.items() if n not in kept}


class Wide(torch.nn.Module):
    """Dims that are multiples of 128, as TensorRT's int4 blocks need."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 256)
        self.b = torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.mark.parametrize("scheme", ["w8a8", "fp8", "w4a16"])
def test_tensorrt_graphs_are_legal(tmp_path, scheme):
    import onnx_ir as ir

    from edgec.targets import get
    from edgec.targets.tensorrt.rules import check_tensorrt_graph

    torch.manual_seed(0)
    art = edgec.compile(Wide().eval(), target="tensorrt", output_dir=tmp_path / "o",
                        example_inputs=(torch.randn(4, 256),), quantize=scheme,
                        calibration=None)
    model = ir.load(tmp_path / "o" / "model.onnx")
    assert check_tensorrt_graph(model, get("tensorrt").schemes[scheme]) == []
    assert any(n.op_type == "DequantizeLinear" for n in model.graph)
    assert art.manifest["runtime"]["engine"] is None and "TensorRT" in art.manifest["runtime"][
        "unavailable"]
    assert "latency was not measured" in art.report["fidelity"]["target_vs_source"]["stand_in"]
    assert _worst(art) >= 0.98


def test_fp8_scales_come_from_the_calibrated_absmax(tmp_path, caplog):
    """fp8 on TensorRT: each activation's float8 scale is its calibrated absmax / 448 (the
    method honoured, minmax by default), each weight's its own absmax / 448. ORT's float8
    scale (σ / 100.06, clipping at 4.48 σ) was the only one, whatever the method: llama
    tiny+outliers 0.982 logits cosine, SmolLM2-135M cut to 2 layers 0.765; it stays available
    as method=distribution."""
    import numpy as np
    import onnx_ir as ir

    cache = edgec.calibrate("llama", "tensorrt", tmp_path / "c", config="tiny+outliers",
                            quantize="fp8")
    assert cache.method == "minmax"
    art = edgec.compile("llama", target="tensorrt", output_dir=tmp_path / "a",
                        config="tiny+outliers", quantize="fp8", calibration=tmp_path / "c")
    assert art.manifest["quantization"]["calibration"]["method"] == "minmax"
    assert _worst(art) >= 0.995  # 0.9981 (ORT's σ scale: 0.9817)
    held = _floor(art)  # the default floor, measured
    assert held["reached"] and held["achieved"] >= 0.99 and not held["kept"]
    model = ir.load(tmp_path / "a" / "model.onnx")
    checked = 0
    for q in model.graph:
        x = q.inputs[0] if q.op_type == "QuantizeLinear" else None
        if x is None or x.const_value is not None:
            continue
        assert q.inputs[2].const_value.dtype == ir.DataType.FLOAT8E4M3FN
        st = cache.tensors[x.name]
        absmax = max(abs(st["lowest"]), abs(st["highest"]))
        assert float(q.inputs[1].const_value.numpy()) == pytest.approx(absmax / 448, rel=1e-6)
        checked += 1
    assert checked >= 8
    weights = [dq.inputs[0].const_value.numpy().astype(np.float32) for dq in model.graph
               if dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None]
    # absmax / 448: the largest weight on 448 and no other clipped to it (e4m3 steps by 32
    # there, so only weights within 3.6% of the largest round to it)
    assert weights and all(np.abs(w).max() == 448 for w in weights)
    assert max(int((np.abs(w) == 448).sum()) for w in weights) <= 8
    caplog.clear()
    old = edgec.compile("llama", target="tensorrt", output_dir=tmp_path / "d",
                        config="tiny+outliers", quantize="fp8:method=distribution,min_cos=0.99")
    assert old.manifest["quantization"]["calibration"]["method"] == "distribution"
    assert _worst(old) < 0.99  # ORT's σ-based scales clip the outliers
    # ... which no longer passes in silence: fp8's floor is measured, and a miss warned about
    assert not _floor(old)["reached"] and not _floor(old)["layer_errors"]
    assert "fp8 misses the accuracy floor min_cos=0.99" in caplog.text


def test_fp8_calibration_method_is_honoured_or_refused(tmp_path):
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.targets import TARGETS

    trt = TARGETS["tensorrt"]
    for spec, method in [("fp8", "minmax"), ("fp8:method=minmax", "minmax"),
                         ("fp8:method=percentile", "percentile"),
                         ("fp8:method=distribution", "distribution")]:
        assert QuantOptions.parse(spec, trt).calibration_request(trt).method == method
    with pytest.raises(UserError, match="method=entropy .* which float8 is not"):
        QuantOptions.parse("fp8:method=entropy", trt)
    with pytest.raises(UserError, match="method=distribution is ONNX Runtime's float8 scale"):
        QuantOptions.parse("w8a8:method=distribution", trt)


def test_bad_quantize_options(tmp_path):
    for q, match in [("w9", "no quantization scheme 'w9'"),
                     ("w8a8:method=best", "unknown calibration method"),
                     ("w8a8:bogus=1", "unknown --quantize option"),
                     ("fp8", "no quantization scheme 'fp8'")]:
        with pytest.raises(UserError, match=match):
            edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o", quantize=q)
    with pytest.raises(UserError, match="add --quantize"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o", calibration=tmp_path)
    assert not (tmp_path / "o").exists()


def test_cli_calibrate_then_reuse_and_refuse(tmp_path):
    """A compile that names no method= takes the cache's (README: the cache refuses another
    method only where the compile asks for one); another graph, target or method is refused."""
    runner = CliRunner()
    calib = tmp_path / "calib"
    res = runner.invoke(app, ["calibrate", "llama", "--target", "openvino-cpu", "-o", str(calib),
                              "--quantize", "w8a8:samples=4,method=percentile", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["samples"] == 4 and summary["tensors"] > 0
    cache = json.loads((calib / "calibration.json").read_text())
    assert cache["target"] == "openvino-cpu" and cache["method"] == "percentile"
    res = runner.invoke(app, ["compile", "llama", "-t", "openvino-cpu", "-o", str(tmp_path / "a"),
                              "-q", "w8a8", "--calib", str(calib), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["quantization"]["calibration"]["how"] == "reused cache"
    assert report["quantization"]["calibration"]["model_hash"] == cache["model_hash"]
    assert report["quantization"]["calibration"]["method"] == "percentile"
    for args, match in [(["-c", "tiny+outliers"], "does not match the model"),
                        (["-t", "ort-cpu"], "made for target 'openvino-cpu'"),
                        (["-q", "w8a8:method=minmax"], "made for method 'percentile'")]:
        base = ["compile", "llama", "-t", "openvino-cpu", "-o", str(tmp_path / "b"), "-q", "w8a8",
                "--calib", str(calib)]
        if args[0] in base:
            base[base.index(args[0]) + 1] = args[1]
        else:
            base += args
        res = runner.invoke(app, base)
        assert res.exit_code == 2 and match in res.output, res.output
        assert not (tmp_path / "b").exists()


def test_calibrate_from_npz(tmp_path):
    import numpy as np

    from edgec.models import registry

    sets = registry.get("llama").calibration_inputs("tiny", 3)
    np.savez(tmp_path / "s.npz", input_ids=np.stack([s[0].numpy() for s in sets]))
    cache = edgec.calibrate("llama", "ort-cpu", tmp_path / "c", data=tmp_path / "s.npz")
    assert cache.samples == 3 and cache.data == "file s.npz"
    with pytest.raises(UserError, match="samples=5, but s.npz holds 3 samples"):  # silently 3
        edgec.calibrate("llama", "ort-cpu", tmp_path / "c3", data=tmp_path / "s.npz",
                        quantize="w8a8:samples=5")
    assert not (tmp_path / "c3").exists()
    np.savez(tmp_path / "bad.npz", ids=np.zeros((3, 1, 8), np.int64))
    with pytest.raises(UserError, match="no array for input 'input_ids'"):
        edgec.calibrate("llama", "ort-cpu", tmp_path / "c2", data=tmp_path / "bad.npz")
    assert not (tmp_path / "c2").exists()


@pytest.mark.parametrize(("available", "asked", "split"), [
    (20, None, (16, "data")), (40, None, (36, "data")), (19, None, (None, "calibration")),
    (16, None, (None, "calibration")), (16, 8, (8, "data")), (16, 12, (12, "data")),
    (16, 13, (13, "calibration")), (None, 8, (8, "calibration"))])
def test_held_out_split(available, asked, split):
    from edgec.graph_passes.quantization.options import held_out_split

    assert held_out_split(available, asked) == split


@pytest.mark.parametrize(("available", "asked", "split"), [
    (24, None, (16, "data")), (23, None, (None, "calibration")), (24, 17, (17, "calibration")),
    (24, 16, (16, "data"))])
def test_held_out_split_with_more_held_out(available, asked, split):
    """held_out=8: the file's last 8 held out, calibration takes what remains before them."""
    from edgec.graph_passes.quantization.options import held_out_split

    assert held_out_split(available, asked, 8) == split


@pytest.mark.parametrize(("available", "options", "held"), [
    (None, {}, 4), (6, {}, 4), (20, {}, 4), (22, {}, 6), (24, {}, 8), (30, {}, 10),
    (40, {}, 13), (48, {}, 16), (200, {}, 16), (24, {"samples": 8}, 8),
    (24, {"samples": 18}, 6), (24, {"samples": 22}, 4), (200, {"held_out": 5}, 5),
    (6, {"held_out": 2}, 2)])
def test_held_out_grows_with_the_data_file(available, options, held):
    """Default held-out count: 4, and from a user's .npz one in three of its samples (at most 16)
    while calibration's own count (samples=, else 16) remains before them; held_out= is as given."""
    from edgec.graph_passes.quantization.options import QuantOptions

    assert QuantOptions("w8a8", **options).held_out_of(available) == held


@pytest.mark.parametrize(("count", "calibrated", "held", "source"), [
    (24, 16, 8, "data"), (6, 6, 4, "calibration")])
def test_floor_holds_out_samples_calibration_does_not_see(tmp_path, count, calibrated, held,
                                                          source):
    """A user's .npz with enough samples: the floor's held-out samples are its last third (24
    samples: 8) and calibration takes the rest; with too few, the last 4, which calibration sees
    too, and the report says so."""
    import numpy as np

    from edgec.models import registry

    sets = registry.get("llama").calibration_inputs("tiny", count)
    np.savez(tmp_path / "s.npz", input_ids=np.stack([s[0].numpy() for s in sets]))
    art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o", config="tiny",
                        quantize="w8a8", calibration=tmp_path / "s.npz")
    q = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    assert q["calibration"]["samples"] == calibrated and q["calibration"]["data"] == "file s.npz"
    mp = q["mixed_precision"]
    assert mp["held_out"] == held and mp["held_out_source"] == source
    assert mp["held_out_seen_by_calibration"] == (source == "calibration")
    said = "kept out of the calibration" if source == "data" else "which calibration saw too"
    assert said in (art.path / "report.md").read_text()
    # the CLI's row says it too (it said "held out" for samples calibration saw)
    from edgec.report import summary_rows

    row = dict(summary_rows(art.report))["accuracy floor"]
    assert ("(held out, ONNX Runtime)" in row) == (source == "data")
    assert ("(on samples calibration saw, ONNX Runtime)" in row) == (source == "calibration")
    # `calibrate --data` then `compile --calib CACHE`: the same ranges and the same floor. It
    # calibrated on the whole file and the floor took random tokens (all-MiniLM-L6-v2: 0.9802
    # where the file's own held-out sentences gave 0.9907)
    import hashlib

    cache = edgec.calibrate("llama", "ort-cpu", tmp_path / "c", config="tiny",
                            data=tmp_path / "s.npz")
    assert cache.samples == calibrated and cache.data == "file s.npz"
    assert cache.data_sha256 == hashlib.sha256((tmp_path / "s.npz").read_bytes()).hexdigest()
    assert cache.held_out == {"file": "held_out.npz", "samples": held, "source": source}
    kept = np.load(tmp_path / "c" / "held_out.npz")["input_ids"]
    assert np.array_equal(kept, np.load(tmp_path / "s.npz")["input_ids"][-held:])
    again = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o2", config="tiny",
                          quantize="w8a8", calibration=tmp_path / "c")
    q2 = next(p for p in again.report["passes"] if p["name"] == "quantize")["stats"]
    assert q2["calibration"]["how"] == "reused cache"
    assert q2["mixed_precision"]["held_out_source"] == source
    assert q2["mixed_precision"]["achieved"] == mp["achieved"]
    assert (tmp_path / "o2" / "model.onnx").read_bytes() == \
        (tmp_path / "o" / "model.onnx").read_bytes()


def test_gptq_under_a_data_cache_rounds_on_the_file(tmp_path, caplog):
    """`calibrate --data FILE` then `compile --calib CACHE` with gptq=true rounded the weights
    on generated random tokens, silently, where `--calib FILE.npz` rounds on the file: the cache
    stores the samples GPTQ takes now, and the two give the same artifact; a cache without them
    (an older edgec, or too large to store) says GPTQ rounds on generated samples."""
    import numpy as np

    from edgec.graph_passes.quantization.options import GPTQ_SAMPLES
    from edgec.models import registry

    sets = registry.get("llama").calibration_inputs("tiny", 20)
    np.savez(tmp_path / "s.npz", input_ids=np.stack([s[0].numpy() for s in sets]))
    scheme = "w8a8:gptq=true"

    def compile_(name, calibration):
        art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / name,
                            config="tiny", quantize=scheme, calibration=calibration)
        return next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]["gptq"]

    direct = compile_("o", tmp_path / "s.npz")
    cache = edgec.calibrate("llama", "ort-cpu", tmp_path / "c", config="tiny",
                            data=tmp_path / "s.npz", quantize=scheme)
    assert cache.calibration_samples == {"file": "calibration_samples.npz", "samples": 16}
    kept = np.load(tmp_path / "c" / "calibration_samples.npz")["input_ids"]
    assert np.array_equal(kept, np.load(tmp_path / "s.npz")["input_ids"][:16])
    caplog.clear()
    assert compile_("o2", tmp_path / "c") == direct
    assert (tmp_path / "o2" / "model.onnx").read_bytes() == \
        (tmp_path / "o" / "model.onnx").read_bytes()
    assert "GPTQ rounds on generated samples" not in caplog.text
    # an older cache: no stored samples, generated ones and one line saying so
    raw = json.loads((tmp_path / "c" / "calibration.json").read_text())
    del raw["calibration_samples"]
    (tmp_path / "c" / "calibration.json").write_text(json.dumps(raw))
    (tmp_path / "c" / "calibration_samples.npz").unlink()
    older = compile_("o3", tmp_path / "c")
    assert older["rows"] == GPTQ_SAMPLES * 2 * 16 != direct["rows"]
    assert ("the calibration cache was made from s.npz but does not store its samples"
            in caplog.text and "pass --calib FILE.npz for GPTQ on that file" in caplog.text)


def test_cli_calibrate_takes_the_compile_recipe_options(tmp_path):
    """A cache made by `edgec calibrate --prune ...` matches the compile with the same options."""
    runner = CliRunner()
    calib = tmp_path / "calib"
    res = runner.invoke(app, ["calibrate", "llama", "-t", "ort-cpu", "-o", str(calib),
                              "--prune", "2:4", "-q", "w8a8:samples=2", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compile", "llama", "-t", "ort-cpu", "-o", str(tmp_path / "a"),
                              "--prune", "2:4", "-q", "w8a8", "--calib", str(calib), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["quantization"]["calibration"]["how"] == "reused cache"
    assert [p["name"] for p in report["passes"] if p["name"] != "unsigned-weights"  # the host's
            ] == ["cleanup", "prune", "quantize"]
    res = runner.invoke(app, ["compile", "llama", "-t", "ort-cpu", "-o", str(tmp_path / "b"),
                              "-q", "w8a8", "--calib", str(calib)])
    assert res.exit_code == 2 and "does not match the model" in res.output


def _optimize_flags(monkeypatch) -> list[bool]:
    """Records each ``run_samples`` call's ``optimize`` (ORT's graph optimizations on)."""
    from edgec.runtimes import ort as ort_runtime

    flags, run = [], ort_runtime.run_samples

    def recording(model, samples, optimize=False):
        flags.append(optimize)
        return run(model, samples, optimize)

    monkeypatch.setattr(ort_runtime, "run_samples", recording)
    return flags


def test_mixed_precision_reaches_min_cos_with_the_fewest_float_layers(tmp_path, monkeypatch):
    """llama tiny+outliers w8a8 on ort-cpu: 0.984 worst held-out cosine as is; min_cos=0.99
    keeps the few MatMuls whose error alone moves the output most in float until it holds."""
    flags = _optimize_flags(monkeypatch)
    said = []
    art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o",
                        config="tiny+outliers", quantize="w8a8:min_cos=0.99",
                        progress=said.append)
    stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    mp = stats["mixed_precision"]
    assert mp["reached"] and mp["achieved"] >= 0.99 and mp["probes"][0]["cosine"] < 0.99
    kept = [e["node"] for e in mp["kept"]]
    assert 0 < len(kept) < mp["candidates"] // 2
    assert kept == [e["node"] for e in mp["layer_errors"][:len(kept)]]  # the most sensitive
    # the probes were edits of the quantized graph (keep_float); quantize_static's graph for
    # the choice computes the same (the kept MatMuls read float, shared inputs too)
    chosen = next(p for p in mp["probes"] if p["kept"] == len(kept))
    assert mp["rebuilt"] == {"cosine": chosen["cosine"]} and mp["achieved"] == chosen["cosine"]
    # the search ran ORT as the artifact runs, with its graph optimizations (on the trained
    # terrain UNet the unfused QDQ graph measured 0.9818 and the artifact 0.9795); the fp32
    # reference runs unfused (the first call), every probe fused
    assert flags[0] is False and flags[1:] and all(flags[1:])
    on = mp["on_target"]
    assert on["runtime"] == "onnxruntime" and on["cosine"] == pytest.approx(mp["achieved"],
                                                                              abs=2e-6)
    effects = [e["end_to_end"] for e in mp["layer_errors"]]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0
    assert len(mp["probes"]) <= 2 + 2 * len(mp["layer_errors"]).bit_length()
    assert stats["excluded_nodes"] >= len(kept)
    assert _worst(art) >= 0.985
    # the search says what it is doing: one sensitivity run per sample (one group here), then
    # a line per probe
    runs = [m for m in said if m.startswith("layer sensitivity: run ")]
    assert runs == [f"layer sensitivity: run {i}/4" for i in range(1, 5)], said
    assert sum(m.startswith("accuracy floor: measuring with the") for m in said) == \
        len(mp["probes"]) - 1
    png = (art.path / "report_layers.png").read_bytes()  # the per-layer chart, in report.md
    assert png.startswith(PNG) and len(png) > 1024
    assert "report_layers.png" not in art.manifest["hashes"]  # a report file, like report.md
    md = (art.path / "report.md").read_text()
    assert "![per-layer quantization error](report_layers.png)" in md
    assert all(f"| {name} |" in md for name in kept)
    # `edgec inspect` shows it too (it showed no quantization, and fidelity as max_rel only)
    info = json.loads(CliRunner().invoke(app, ["inspect", str(art.path), "--json"]).stdout)
    q = info["quantization"]
    assert q["scheme"] == "w8a8: int8 weights, uint8 activations" and q["kept_float"] == kept
    assert q["calibration"].startswith("calibrated during compile: 16 samples, minmax")
    # the given bound replaced the default floor, KL bound included, and the report says so
    assert mp["default_dropped"] == {"max_kld": 0.05}
    assert q["floor"].startswith("min_cos 0.99 (given, in place of the default floor: no max_kld "
                                 "bound; add max_kld=0.05 to hold it too) reached") and \
        f"{len(kept)} of {mp['candidates']} layers kept in float" in q["floor"]
    assert info["fidelity"]["target_vs_source"]["cosine"] == round(_worst(art), 7)
    with pytest.raises(UserError, match="min_cos must be a cosine"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "x",
                      quantize="w8a8:min_cos=2")
    assert not (tmp_path / "x").exists()


def test_floor_probes_compute_what_the_rebuilt_graph_computes_on_openvino(tmp_path,
                                                                          monkeypatch):
    """openvino-cpu moves activation quantizers above the attention heads' layout ops; a probe
    keeping a MatMul in float copies them over its float input. Without that a probe with every
    candidate kept still measured KL 0.0015 where the rebuilt graph gave 0 (SmolLM2 4 layers
    rotated), and on 30 layers the floor gave up (KL 0.157 as quantized, 0.166 all kept)."""
    flags = _optimize_flags(monkeypatch)
    art = edgec.compile("llama", target="openvino-cpu", output_dir=tmp_path / "o",
                        config="tiny+outliers", quantize="w8a8:max_kld=0.00000001",
                        rotate="hadamard")
    assert flags and not any(flags)  # not ORT's fusions: the QDQ graph's own semantics
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    chosen = next(p for p in mp["probes"] if p["kept"] == len(mp["kept"]))
    assert mp["reached"] and len(mp["kept"]) > 0
    assert mp["rebuilt"] == {"cosine": chosen["cosine"], "kld": chosen["kld"]}
    on = mp["on_target"]  # the same held-out samples on OpenVINO running the artifact
    assert on["runtime"] == "openvino" and set(on) == {"runtime", "reached", "cosine", "kld"}
    assert ("On openvino itself, the same samples: cosine"
            in (tmp_path / "o" / "report.md").read_text())
    from edgec.report import summary_rows  # what `edgec compile` prints

    line = dict(summary_rows(art.report))["accuracy floor"]
    assert line.startswith("max_kld 1e-08 (given, in place of the default floor: no min_cos "
                           "bound; add min_cos=0.98 to hold it too) reached (held out, ONNX "
                           "Runtime): cosine ")
    assert f"; on openvino cosine {on['cosine']:.4f}" in line
    assert line.endswith(f"; {len(mp['kept'])} of {mp['candidates']} layers kept in float")


def test_max_kld_keeps_layers_until_the_logits_distribution_holds(tmp_path, caplog):
    """llama tiny+outliers w8a8 on ort-cpu: worst held-out KL divergence 0.026 nats per token as
    quantized; max_kld=0.001 keeps the most sensitive MatMuls in float until it holds (no cosine
    floor: the user's bound replaces the default), which takes more than half of them here, so
    the compile says that most of the speed is gone. A model without logits is refused."""
    art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o",
                        config="tiny+outliers", quantize="w8a8:max_kld=0.001")
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    assert mp["max_kld"] == 0.001 and mp["min_cos"] is None and not mp["default"]
    assert mp["probes"][0]["kld"] > 0.01 and mp["achieved_kld"] <= 0.001 and mp["reached"]
    assert mp["candidates"] / 2 < len(mp["kept"]) < mp["candidates"]
    assert all(p["kld"] > 0.001 for p in mp["probes"] if p["kept"] < len(mp["kept"]))
    klds = [e["end_to_end_kld"] for e in mp["layer_errors"]]  # ranked by the KL bound's room
    assert klds == sorted(klds, reverse=True) and klds[0] > 0.001
    md = (art.path / "report.md").read_text()
    assert mp["default_dropped"] == {"min_cos": 0.98}
    assert "max_kld 0.001 (given, in place of the default floor: no min_cos bound" in md
    assert "| KL divergence alone |" in md
    assert f"kept {len(mp['kept'])} of {mp['candidates']} layers in float" in caplog.text
    with pytest.raises(UserError, match="does not have .*min_cos instead"):
        edgec.compile("video-dit", target="ort-cpu", output_dir=tmp_path / "x",
                      quantize="w8a8:max_kld=0.01")
    with pytest.raises(UserError, match="max_kld must be a positive"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "x",
                      quantize="w8a8:max_kld=-1")
    # built at once: 10**8 samples filled memory without a word
    with pytest.raises(UserError, match="samples=100000000: at most 4096"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "x",
                      quantize="w8a8:samples=100000000")
    assert not (tmp_path / "x").exists()


def test_default_floor_keeps_the_plain_quantization_when_precision_cannot_reach_it(tmp_path,
                                                                                 caplog):
    """On the NPU, llama tiny+outliers w8a8 is at 0.937 and every MatMul at 16 bits only
    reaches 0.961 (the error is in the norms and residual stream): the default floor says so
    and keeps the int8 graph rather than paying 16 bits everywhere for nothing; min_cos=0
    skips the measurement."""
    art = edgec.compile("llama", target="qnn-htp", output_dir=tmp_path / "o",
                        config="tiny+outliers", quantize="w8a8")
    stats = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"]
    mp = stats["mixed_precision"]
    assert mp["default"] and not mp["reached"] and mp["kept"] == []
    assert mp["achieved"] == mp["probes"][0]["cosine"] < 0.98 and len(mp["probes"]) > 1
    assert max(p["kept"] for p in mp["probes"]) == mp["candidates"] == len(mp["layer_errors"])
    assert "default accuracy floor min_cos=0.98 and max_kld=0.05 is not reached" in caplog.text
    assert "(the default floor) not reached" in (art.path / "report.md").read_text()
    off = edgec.compile("llama", target="qnn-htp", output_dir=tmp_path / "off",
                        config="tiny+outliers", quantize="w8a8:min_cos=0")
    off_stats = next(p for p in off.report["passes"] if p["name"] == "quantize")["stats"]
    assert "mixed_precision" not in off_stats
    assert off_stats["excluded_nodes"] == stats["excluded_nodes"]
    assert _worst(off) == pytest.approx(_worst(art), abs=1e-6)


def test_a_device_shortfall_searches_the_floor_again_with_room(tmp_path, monkeypatch, caplog):
    """The artifact's runtime misses a floor ONNX Runtime met (here made to: the first
    measurement on the target is replaced by a miss that leaves room at min_cos=0.995): the
    compile runs once more, its search held to 0.995, the target to the 0.99 asked, and the
    report says why it ran twice; one artifact, no staging left behind."""
    import edgec.fidelity
    from edgec.report import floor_line

    real, calls = edgec.fidelity.floor_on_target, []

    def first_misses(session, passes, mixed, model=None, locate=None, asked=None):
        calls.append(asked)
        note = real(session, passes, mixed, model, locate, asked=asked)
        if asked is None:  # the first build: made to miss by 0.002
            on = mixed["on_target"]
            mixed["on_target"] = {**on, "reached": False, "cosine": on["cosine"] - 0.002,
                                  "floor_with_room": "min_cos=0.995"}
            mixed["reached"] = False
            return "made to miss"
        return note

    monkeypatch.setattr(edgec.fidelity, "floor_on_target", first_misses)
    with caplog.at_level(logging.INFO, logger="edgec.pipeline"):
        art = edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o",
                            config="tiny+outliers", quantize="w8a8:min_cos=0.99")
    assert [c and c.describe() for c in calls] == [None, "min_cos=0.99"]
    mp = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    again = mp["searched_again"]
    assert again["searched_at"] == "min_cos=0.995" and again["asked"] == "min_cos=0.99"
    assert again["runtime"] == mp["on_target"]["runtime"]
    assert mp["min_cos"] == 0.99 and not mp["default"]  # the floor as asked
    assert mp["achieved"] >= 0.995  # the second search held the moved floor on ONNX Runtime
    assert len(mp["kept"]) >= again["first"]["kept"]
    assert mp["reached"] and mp["on_target"]["reached"]
    assert "compiling once more, the search held to min_cos=0.995" in caplog.text
    assert "searched again at min_cos=0.995" in floor_line(mp)
    assert "Searched again at min_cos=0.995" in (art.path / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _mixed_stats(n, kept):
    """A ``mixed_precision`` stats entry with ``n`` layers, effects over four decades."""
    layers = [{"node": f"/layers.{i}/mlp/MatMul", "op": "MatMul", "error": 0.01,
               "end_to_end": float(f"{10 ** (-2 - 4 * i / n):.3g}")} for i in range(n)]
    return {"min_cos": 0.99, "achieved": 0.9912, "held_out": 4, "reached": True,
            "candidates": n, "kept": layers[:kept], "precision": "float", "probes": [],
            "layer_errors": layers[::-1]}  # unsorted: the chart orders them itself


def test_layer_chart_caps_the_bars_to_the_worst(tmp_path):
    from edgec.report_chart import write_layer_chart

    chart = write_layer_chart(_mixed_stats(50, 3), tmp_path / "c.png")
    assert chart == {"file": "c.png", "layers": 50, "shown": 40}
    data = (tmp_path / "c.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 1024
    assert write_layer_chart(_mixed_stats(5, 0), tmp_path / "d.png")["shown"] == 5


def test_layer_chart_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from edgec import report as reports
    from edgec.report_chart import INSTALL_LINE, write_layer_chart

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    mp = _mixed_stats(50, 3)
    chart = write_layer_chart(mp, tmp_path / "c.png")
    assert chart == {"missing": "matplotlib"} and not (tmp_path / "c.png").exists()
    section = "\n".join(reports._mixed_precision_section(
        {"passes": [{"name": "quantize", "stats": {"mixed_precision": mp}}],
         "layer_chart": chart}))
    assert INSTALL_LINE in section and "report_layers.png" not in section
    assert "/layers.2/mlp/MatMul" in section  # the kept layers' table


def test_default_floor_applies_to_every_scheme():
    from edgec.graph_passes.quantization.mixed_precision import Floor
    from edgec.graph_passes.quantization.options import DEFAULT_MIN_COS, QuantOptions
    from edgec.targets import TARGETS

    def floor(spec, target="ort-cpu"):
        return QuantOptions.parse(spec, TARGETS[target]).floor_on(TARGETS[target])

    assert floor("w8a8") == Floor(DEFAULT_MIN_COS, default=True) and DEFAULT_MIN_COS == 0.98
    assert floor("w8a8:min_cos=0.995") == Floor(0.995)
    assert floor("w8a8:max_kld=0.02") == Floor(None, 0.02)  # the user's: no cosine floor
    assert floor("w8a8:min_cos=0.99,max_kld=0.02") == Floor(0.99, 0.02)
    assert floor("w8a8:min_cos=0") is None  # off
    assert floor("w8a16", "qnn-htp") == Floor(0.98, default=True)
    # weight-only: measured and warned about, not searched (w4a16 after --rotate with nearest
    # rounding: cosine 0.19 in silence)
    assert floor("w4a16") == Floor(0.98, default=True)
    assert floor("w4a16:min_cos=0") is None
    # an explicit floor too (it was refused while the default one was measured)
    assert floor("w4a16:min_cos=0.995,max_kld=0.01") == Floor(0.995, 0.01)
    # float8 activations: measured and warned about (no integer fake-quant to search with)
    assert floor("fp8", "tensorrt") == Floor(0.98, default=True)


def test_qnn_htp_w4a8_on_an_onnx_file_with_unnamed_nodes(tmp_path):
    """onnx.helper (and older exporters) leave node names empty; ONNX Runtime's QNN quantizer
    and LPBQ's fp32 lookup go by node name (an internal error before the cleanup named them)."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n)
               for n, s in (("w1", (64, 64)), ("w2", (64, 32)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              tmp_path / "unnamed.onnx")
    art = edgec.compile(tmp_path / "unnamed.onnx", target="qnn-htp", output_dir=tmp_path / "o",
                        quantize="w4a8")
    passes = {p["name"]: p["stats"] for p in art.report["passes"]}
    assert passes["cleanup"]["nodes_named"] == 3
    graph = ir.load(art.path / "model.onnx").graph
    assert all(n.name for n in graph) and len({n.name for n in graph}) == len(graph)
    assert any(n.op_type == "DequantizeLinear" and "block_size" in n.attributes for n in graph)


def test_held_out_samples_follow_the_cache_and_contradicting_samples_are_refused(tmp_path):
    """With a --calib cache of 32 generated samples the floor's held-out samples were generator
    samples 16–19, which the cache had seen, reported as unseen: they start after the cache's
    count now. samples= that contradicts the cache or a data file (used silently before: the
    cache's count, the file's) is refused."""
    from types import SimpleNamespace

    import numpy as np
    import onnx_ir as ir

    from edgec.calibration import CalibrationCache
    from edgec.calibration.samples import generated_samples
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.models import registry
    from edgec.targets import get as get_target

    ort = get_target("ort-cpu")

    def make(spec, calibration, src=None):
        return QuantOptions.parse(spec, ort).make_pass(ort, calibration, src, lambda m: None)

    src = SimpleNamespace(kind="registry", info={"name": "llama", "config": "tiny",
                                                 "input_names": ["input_ids"]})
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    cache = CalibrationCache("h", "ort-cpu", "w8a8", "minmax", 32, "model generator", {})
    held = make("w8a8", cache, src).held_out(model)
    after = generated_samples(src, 36)[0][32:]
    assert all(np.array_equal(h["input_ids"], a["input_ids"]) for h, a in zip(held, after))
    assert make("w8a8:samples=32", cache, src).held_out_source == "generated"
    with pytest.raises(UserError, match="samples=4, but the calibration cache was made from 32"):
        make("w8a8:samples=4", cache)
    sets = registry.get("llama").calibration_inputs("tiny", 8)
    np.savez(tmp_path / "d.npz", input_ids=np.stack([s[0].numpy() for s in sets]))
    make("w8a8:samples=8", tmp_path / "d.npz")
    with pytest.raises(UserError, match="samples=16, but d.npz holds 8 samples"):
        make("w8a8:samples=16", tmp_path / "d.npz")
    # held_out=N: N generator samples past the cache's count; more than a data file has, refused
    wide = make("w8a8:held_out=7", cache, src).held_out(model)
    assert len(wide) == 7 and all(np.array_equal(h["input_ids"], a["input_ids"])
                                  for h, a in zip(wide, generated_samples(src, 39)[0][32:]))
    with pytest.raises(UserError, match="held_out=9, but d.npz has 8 samples"):
        make("w8a8:held_out=9", tmp_path / "d.npz", src)
    make("w8a8:held_out=9,min_cos=0", tmp_path / "d.npz", src)  # no floor: none held out
    # calibrate --data: the same split, and a compile with another held_out= is refused
    sets = registry.get("llama").calibration_inputs("tiny", 22)
    np.savez(tmp_path / "e.npz", input_ids=np.stack([s[0].numpy() for s in sets]))
    made = edgec.calibrate("llama", "ort-cpu", tmp_path / "c6", config="tiny",
                           data=tmp_path / "e.npz", quantize="w8a8:held_out=6")
    assert made.samples == 16 and made.held_out["samples"] == 6
    assert made.held_out["source"] == "data"
    stored = CalibrationCache.load(tmp_path / "c6")
    with pytest.raises(UserError, match="held_out=8, but the calibration cache holds out 6"):
        make("w8a8:held_out=8", stored, src)
    assert np.array_equal(np.load(tmp_path / "c6" / "held_out.npz")["input_ids"],
                          np.load(tmp_path / "e.npz")["input_ids"][-6:])
    for bad in ("0", "1.5", "true", "300"):
        with pytest.raises(UserError, match="held_out"):
            make(f"w8a8:held_out={bad}", cache, src)
    with pytest.raises(UserError, match="held_out is how many samples the accuracy floor"):
        QuantOptions("w8a8", held_out=0)
