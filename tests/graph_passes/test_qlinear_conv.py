"""ort-cpu w8a8 quantizes each Conv's output too, the form ONNX Runtime runs as QLinearConv (its
only int8 Conv); the accuracy floor counts that rounding and a Conv it keeps float loses it."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import edgec


class _Block(torch.nn.Module):
    """conv → SiLU → conv, plus a 1×1 skip conv of the input: a UNet block's shape."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.skip = torch.nn.Conv2d(3, 8, 1)

    def forward(self, img):
        return self.c2(torch.nn.functional.silu(self.c1(img))) + self.skip(img)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("qconv")
    block = _Block().eval()
    example = (torch.randn(1, 3, 12, 12),)
    rows = [("ort-cpu", "w8a8:min_cos=0"), ("ort-cpu", "w8a8:min_cos=0.99999"),
            ("openvino-cpu", "w8a8:min_cos=0")]
    arts = {(t, q): edgec.compile(block, target=t, output_dir=root / f"{t}-{i}",
                                  example_inputs=example, quantize=q)
            for i, (t, q) in enumerate(rows)}
    return block, arts


def _convs(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Conv"]


def _output_quantized(node: ir.Node) -> bool:
    return any(u.node.op_type == "QuantizeLinear" for u in node.outputs[0].uses())


def _ort_optimized_ops(path, tmp_path) -> list[str]:
    """The op types of ONNX Runtime's optimized graph (its CPU EP's QDQ fusions applied)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in ir.load(tmp_path / "fused.onnx").graph]


def test_ort_cpu_conv_outputs_are_quantized_and_run_as_qlinearconv(compiled, tmp_path):
    _, arts = compiled
    art = arts["ort-cpu", "w8a8:min_cos=0"]
    model = ir.load(art.path / "model.onnx")
    convs = _convs(model)
    assert len(convs) == 3
    for conv in convs:  # the Q is the Conv's one reader: what ORT's QDQ fusion asks
        assert [u.node.op_type for u in conv.outputs[0].uses()] == ["QuantizeLinear"]
    # ONNX Runtime's optimized graph: every Conv an integer QLinearConv, none left in float
    fused = _ort_optimized_ops(art.path / "model.onnx", tmp_path)
    assert fused.count("QLinearConv") == 3 and "Conv" not in fused
    # OpenVINO has int8 Conv with a float output: its Conv outputs stay float
    ov = ir.load(arts["openvino-cpu", "w8a8:min_cos=0"].path / "model.onnx")
    assert not any(_output_quantized(c) for c in _convs(ov))
    x = np.random.default_rng(3).standard_normal((1, 3, 12, 12)).astype(np.float32)
    ref = compiled[0](torch.from_numpy(x)).detach().numpy().ravel()
    got = edgec.load(art.path).run({"img": x})
    y = np.asarray(next(iter(got.values()))).ravel()
    assert float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref)) > 0.995


def test_a_conv_the_floor_keeps_float_has_no_output_rounding(compiled):
    """The floor's probes (the quantized graph edited) and the graph quantize_static rebuilds
    with the kept Convs excluded measure the same: a kept Conv's readers read its float output
    in both (before, its output Q/DQ stayed in the probes: "all kept" still rounded them)."""
    art = compiled[1]["ort-cpu", "w8a8:min_cos=0.99999"]
    quant = next(p for p in art.report["passes"] if p["name"] == "quantize")
    mp = quant["stats"]["mixed_precision"]
    assert mp["kept"] and mp["precision"] == "float"
    assert mp["rebuilt"]["cosine"] == pytest.approx(mp["achieved"], abs=1e-5)
    model = ir.load(art.path / "model.onnx")
    kept = {e["node"] for e in mp["kept"]}
    for conv in _convs(model):
        assert _output_quantized(conv) == (conv.name not in kept), conv.name


def test_a_diffusers_unet_runs_every_conv_as_qlinearconv(tmp_path):
    """A Hugging Face module (diffusers' UNet2DModel: GroupNorm, attention, skip concatenations,
    a ModelOutput) through the same placement: all 25 Convs QLinearConv in ONNX Runtime's
    optimized graph, cosine 0.9989 vs the module measured (random weights; the trained UNet's
    figures: benchmarks/real_denoiser.py)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    example = (torch.randn(1, 3, 16, 16), torch.tensor([10]))
    art = edgec.compile(unet, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=example, quantize="w8a8:min_cos=0")
    convs = _convs(ir.load(art.path / "model.onnx"))
    assert len(convs) == 25 and all(_output_quantized(c) for c in convs)
    fused = _ort_optimized_ops(art.path / "model.onnx", tmp_path)
    assert fused.count("QLinearConv") == 25 and "Conv" not in fused
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        ref = unet(x, t).sample.numpy().ravel()
    session = edgec.load(art.path)
    names = [i.name for i in session.inputs]
    got = session.run(dict(zip(names, (x.numpy(), t.numpy()), strict=True)))
    y = np.asarray(next(iter(got.values()))).ravel()
    assert float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref)) > 0.99
