"""llama reference model: names, determinism, outlier channels, ONNX fidelity at two shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.errors import UserError
from edgec.exporters.verify import compare_outputs
from edgec.models import registry

SPEC = registry.get("llama")


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-wise max relative error, as edgec's own verification computes it."""
    return compare_outputs({"y": actual}, {"y": expected})["y"]["max_rel"]


@pytest.fixture(scope="module")
def tiny():
    return SPEC.build("tiny"), SPEC.example_inputs("tiny")


@pytest.fixture(scope="module")
def session(torch_exported_session):
    return torch_exported_session("llama", "tiny")


@pytest.mark.parametrize("config", ["tiny", "tiny+outliers", "tiny+tied"])
def test_build_is_deterministic(config):
    a, b = SPEC.build(config).state_dict(), SPEC.build(config).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_names_follow_hf_llama(tiny):
    names = set(tiny[0].state_dict())
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")}
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    assert tiny[0].layers[0].self_attn.k_proj.weight.shape == (32, 64)  # 2 kv heads × 16


def test_tied_shares_embedding():
    module = SPEC.build("tiny+tied")
    assert module.lm_head.weight is module.embed_tokens.weight


def test_tiny_forward_shape_and_logits(tiny):
    module, (ids,) = tiny
    assert ids.dtype == torch.int64 and ids.shape == (2, 16)
    with torch.no_grad():
        logits = module(ids)
    assert logits.shape == (2, 16, 256)
    assert 0.3 < logits.std().item() < 10.0


def test_causal(tiny):
    module, (ids,) = tiny
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    with torch.no_grad():
        a, b = module(ids), module(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("config", ["tiny+outliers", "small+outliers"])
def test_outlier_channels_reach_projection_inputs(config):
    module, (ids,) = SPEC.build(config), SPEC.example_inputs(config)
    seen: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(module.layers):
        for key, proj in ((f"q{i}", layer.self_attn.q_proj), (f"gate{i}", layer.mlp.gate_proj)):
            proj.register_forward_hook(lambda m, args, out, key=key: seen.update({key: args[0]}))
    with torch.no_grad():
        logits = module(ids)
    assert torch.isfinite(logits).all() and logits.std() < 10.0
    channels = SPEC.hyperparameters(config)["outlier_channels"]
    for name, act in seen.items():
        per_channel = act.abs().flatten(0, 1).amax(0)
        assert per_channel.max() >= 20 * per_channel.median(), name
        assert set(per_channel.topk(len(channels)).indices.tolist()) == set(channels), name


def test_plain_model_has_no_outliers(tiny):
    module, (ids,) = tiny
    seen = []
    module.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        module(ids)
    per_channel = seen[0].abs().flatten(0, 1).amax(0)
    assert per_channel.max() < 5 * per_channel.median()


def test_unknown_config_and_option_raise_user_error():
    with pytest.raises(UserError):
        SPEC.build("huge")
    with pytest.raises(UserError):
        SPEC.build("tiny+sparse")


def test_onnx_matches_torch_at_example_shape(tiny, session):
    module, inputs = tiny
    with torch.no_grad():
        expected = module(*inputs).numpy()
    (actual,) = session.run(None, {"input_ids": inputs[0].numpy()})
    assert actual.shape == expected.shape
    assert _rel_err(actual, expected) <= 1e-5


def test_onnx_matches_torch_at_other_dynamic_shape(tiny, session):
    module, _ = tiny
    ids = torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = module(ids).numpy()
    (actual,) = session.run(None, {"input_ids": ids.numpy()})
    assert actual.shape == (3, 23, 256)
    assert _rel_err(actual, expected) <= 1e-5
