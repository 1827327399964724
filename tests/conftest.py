"""Shared fixtures: exports and artifacts are built once per session (a dynamo export is ~5 s)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _export_each_registry_model_once():
    """A registry model's export is deterministic (seeded weights, fixed example inputs), so the
    suite runs each (model, config, shapes, generate, opset) export and its PyTorch check once
    and hands every compile a deep copy (passes edit the IR and its weights in place). Sources
    that are modules, files or checkpoints, and exports that fail, are never cached."""
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
            reference={k: v.copy() for k, v in src.reference.items()})

    def resolve(source, config=None, example_inputs=None, dynamic_shapes=None, generate=False,
                opset=None):
        if not (isinstance(source, str) and source in registry.names()
                and example_inputs is None):
            return real(source, config, example_inputs, dynamic_shapes, generate, opset)
        key = (source, config or "tiny", repr(dynamic_shapes), repr(generate), opset)
        if key not in cache:
            cache[key] = real(source, config, example_inputs, dynamic_shapes, generate, opset)
        return copied(cache[key])

    sources.resolve_source = resolve
    yield
    sources.resolve_source = real


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
