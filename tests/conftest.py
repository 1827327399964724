"""Shared fixtures: exports and artifacts are built once per session (a dynamo export is ~5 s)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def _one_core_each() -> None:
    """Under pytest-xdist, each worker computes with its share of the cores: two workers on 2
    cores each ran torch and ONNX Runtime with 2 threads (ORT's spinning), oversubscribed."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers < 2 or threads >= (os.cpu_count() or 1):
        return
    import onnxruntime as ort

    torch.set_num_threads(threads)
    plain = ort.SessionOptions

    class Shared(plain):  # edgec calls ort.SessionOptions(); a target's config may set its own
        def __init__(self):
            super().__init__()
            self.intra_op_num_threads = threads

    ort.SessionOptions = Shared


_one_core_each()


_TIMING: dict = {}


def _untimed_compiles() -> None:
    """Each compile times its artifact (``pipeline._benchmark``), and a quantized CPU one also
    builds its fp32 graph for the target again and times the two interleaved
    (``fp32_speed.fp32_speedup``): ~1 s per compile over several hundred compiles, for figures
    the suite never asserts (those are benchmarks). Compiles here skip both, as a stand-in
    target does; a test that asserts the timing takes the ``timed_compiles`` fixture, which
    runs the real code on smaller budgets."""
    import edgec.fp32_speed
    import edgec.pipeline

    _TIMING.update(benchmark=edgec.pipeline._benchmark,
                   fp32_speedup=edgec.fp32_speed.fp32_speedup)
    edgec.pipeline._benchmark = lambda *a: {"skipped": "not measured in tests"}
    edgec.fp32_speed.fp32_speedup = lambda *a: None


_untimed_compiles()


@pytest.fixture
def timed_compiles(monkeypatch):
    """The compile's own timing, as users get it, on budgets of 0.5 s (latency) and 0.3 s (the
    fp32 graph beside a quantized one)."""
    import edgec.fp32_speed
    import edgec.pipeline

    monkeypatch.setattr(edgec.pipeline, "_benchmark", _TIMING["benchmark"])
    monkeypatch.setattr(edgec.pipeline, "BENCH_BUDGET_S", 0.5)
    monkeypatch.setattr(edgec.fp32_speed, "fp32_speedup", _TIMING["fp32_speedup"])
    monkeypatch.setattr(edgec.fp32_speed, "BUDGET_S", 0.3)


@pytest.fixture(scope="session", autouse=True)
def _export_each_registry_model_once():
    """A registry model's export is deterministic (seeded weights, fixed example inputs), and so
    is a checkpoint directory's while its files stay as they are (a real checkpoint's export is
    15-30 s), so the suite runs each (model or directory with its files' sizes and mtimes,
    config, shapes, generate, opset) export and its PyTorch check once and hands every compile a
    deep copy (passes edit the IR and its weights in place). Modules, files, and exports that
    fail are never cached."""
    import copy
    import dataclasses

    import onnx_ir as ir

    from edgec.exporters import sources
    from edgec.models import registry

    real, cache = sources.resolve_source, {}

    def copied(src):
        model = src.model.clone()
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().copy(), name=value.name)
        return dataclasses.replace(
            src, model=model, info=copy.deepcopy(src.info),
            parameter_map=copy.deepcopy(src.parameter_map),
            export_fidelity=copy.deepcopy(src.export_fidelity),
            feeds={k: v.copy() for k, v in src.feeds.items()},
            reference={k: v.copy() for k, v in src.reference.items()},
            trajectories={})  # recorded on the copy's own graph

    def resolve(source, config=None, example_inputs=None, dynamic_shapes=None, generate=False,
                opset=None):
        if example_inputs is not None or not isinstance(source, str):
            return real(source, config, example_inputs, dynamic_shapes, generate, opset)
        if source in registry.names():
            key = (source, config or "tiny", repr(dynamic_shapes), repr(generate), opset)
        elif (files := _checkpoint_files(source)) is not None:
            key = (files, config, repr(dynamic_shapes), repr(generate), opset)
        else:
            return real(source, config, example_inputs, dynamic_shapes, generate, opset)
        if key not in cache:
            cache[key] = real(source, config, example_inputs, dynamic_shapes, generate, opset)
        return copied(cache[key])

    resolve.uncached = real  # for tests of how a source is resolved
    sources.resolve_source = resolve
    yield
    sources.resolve_source = real


def _checkpoint_files(source: str):
    """A directory's files as (path, size, mtime) triples, or None when it is not a directory."""
    from pathlib import Path

    root = Path(source)
    if not root.is_dir():
        return None
    return (str(root.resolve()), tuple(sorted(
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in root.rglob("*") if f.is_file())))


class TinyMLP(torch.nn.Module):
    """A module edgec has never seen: Linear (transposed by the exporter), LayerNorm, GELU."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


@pytest.fixture(scope="session")
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(2, 5, 16),)


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory, tiny_mlp):
    """An .onnx file written by plain torch.onnx.export (not by edgec)."""
    module, inputs = tiny_mlp
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    program = torch.onnx.export(module, inputs, dynamo=True, input_names=["x"],
                                dynamic_shapes={"x": {0: "batch"}}, verbose=False)
    program.save(str(path))
    return path


class TinyCNN(torch.nn.Module):
    """Conv, BatchNorm, ReLU, MaxPool(2): no output for an image under 2x2 (OpenVINO refuses
    edgec's 1x1 example of a dynamic-H/W export)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, img):
        return torch.nn.functional.max_pool2d(torch.relu(self.norm(self.conv(img))), 2)


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory):
    """A dynamic batch/H/W CNN written by plain torch.onnx.export, input "img"."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    program = torch.onnx.export(
        TinyCNN().eval(), (torch.randn(2, 3, 8, 8),), dynamo=True, input_names=["img"],
        dynamic_shapes={"img": {0: "b", 2: "h", 3: "w"}}, verbose=False)
    program.save(str(path))
    return path


@pytest.fixture(scope="session")
def dit_tiny_artifacts(tmp_path_factory):
    """video-dit tiny compiled for ort-cpu (with --check) and openvino-cpu."""
    import edgec

    root = tmp_path_factory.mktemp("dit")
    ort_art = edgec.compile("video-dit", target="ort-cpu", output_dir=root / "ort",
                            config="tiny", check=True)
    ov_art = edgec.compile("video-dit", target="openvino-cpu", output_dir=root / "ov",
                           config="tiny")
    return ort_art, ov_art


@pytest.fixture(scope="session")
def torch_exported_session(tmp_path_factory):
    """Factory: export a registry model with plain torch.onnx.export, return an ORT session."""
    import onnxruntime as ort

    from edgec.models import registry

    def export(name: str, config: str = "tiny"):
        spec = registry.get(name)
        program = torch.onnx.export(
            spec.build(config), spec.example_inputs(config), dynamo=True,
            dynamic_shapes=spec.dynamic_shapes(config), input_names=list(spec.input_names),
            output_names=list(spec.output_names), verbose=False)
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        program.save(str(path))
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    return export


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def bert_checkpoint(tmp_path_factory):
    """A transformers BertModel with random weights saved as a local checkpoint.

    initializer_range 0.2 (not BERT's 0.02) makes attention peaked, so what the attention mask
    does matters: with near-uniform attention a destroyed mask would go unnoticed.
    """
    import transformers

    root = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     initializer_range=0.2)
    transformers.BertModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def pre_layernorm_decoder():
    """Factory: a small pre-LayerNorm decoder (γ/β, biases everywhere, GELU MLP) exported by the
    TorchScript exporter in ~0.2 s → (onnx_ir.Model, feeds). ``fused_qkv``: one [d, 3d] QKV
    Linear (GPT-2's shape) or q/k/v apart; ``positions``: learned position embeddings;
    ``beta``: False zeroes every LayerNorm shift."""

    def build(fused_qkv: bool = True, positions: bool = True, beta: bool = True):
        import io
        import warnings

        import onnx
        import onnx_ir as ir
        import torch.nn.functional as F
        from torch import nn

        class Block(nn.Module):
            def __init__(self, d: int, heads: int):
                super().__init__()
                self.heads = heads
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv = nn.Linear(d, 3 * d) if fused_qkv else None
                if not fused_qkv:
                    self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
                self.o = nn.Linear(d, d)
                self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

            def forward(self, x):
                b, n, d = x.shape
                h = self.ln1(x)
                if fused_qkv:
                    q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads
                                                  ).permute(2, 0, 3, 1, 4)
                else:
                    q, k, v = (p(h).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                               for p in (self.q, self.k, self.v))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
                return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

        class Decoder(nn.Module):
            def __init__(self, vocab=64, d=32, heads=4, seq=8):
                super().__init__()
                self.tok = nn.Embedding(vocab, d)
                self.pos = nn.Embedding(seq, d) if positions else None
                self.blocks = nn.ModuleList(Block(d, heads) for _ in range(2))
                self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

            def forward(self, ids):
                x = self.tok(ids)
                if self.pos is not None:
                    x = x + self.pos(torch.arange(ids.shape[1]))
                for block in self.blocks:
                    x = block(x)
                return self.head(self.ln(x))

        torch.manual_seed(0)
        module = Decoder().eval()
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias") or "ln" in name:
                    p.add_(0.3 * torch.randn_like(p))
                if not beta and "ln" in name and name.endswith("bias"):
                    p.zero_()
        ids = torch.randint(0, 64, (2, 8))
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (ids,), buf, dynamo=False, input_names=["ids"],
                              output_names=["logits"], opset_version=18)
        proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue()))
        return ir.from_proto(proto), {"ids": ids.numpy()}

    return build


# Sessions with a named SoC (the fp16 HTP: ``runtimes.qnn.FP16_OPTIONS``) pin the process's QNN
# HTP backend to that SoC, and later sessions in the process finalize graphs a fresh process
# refuses (``runtimes.qnn._first_soc``): run in one process after test_qnn_float_stream.py,
# the refusal tests of test_qnn_htp.py and test_qnn_legalize_htp.py failed. Its tests go last,
# so that nothing runs after them in the worker that takes them.
_SOC_PINNING = "test_qnn_float_stream.py"
# Each file's measured seconds (tests/file_seconds.json). The workers take whole files in
# collection order (``--no-loadscope-reorder`` in pyproject.toml: xdist's own order, most tests
# first, sent three of the five longest files near the end: the real decoder, the acceptance
# runs and the real checkpoint, with 7, 2 and 4 tests), so the longest go first and the short
# ones even out the end. A file not measured yet counts as the median.
_SECONDS = "file_seconds.json"


def pytest_collection_modifyitems(config, items):
    import json
    from pathlib import Path

    here = Path(__file__).parent
    seconds = json.loads((here / _SECONDS).read_text())["seconds"]
    median = sorted(seconds.values())[len(seconds) // 2]

    def weight(item) -> tuple[bool, float]:
        name = Path(os.path.relpath(item.path, here.parent)).as_posix()
        return item.path.name == _SOC_PINNING, -seconds.get(name, median)

    items.sort(key=weight)  # stable: a file's tests keep their order
