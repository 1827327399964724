"""Rotation with swappable LoRA: the bases are rotated (R1, R2, online R4) and each site carries
the transforms its adapter needs (``adapters/transforms.safetensors``), so any adapter swapped in
at run time gives what the unrotated artifact gives (≤ 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import edgec
from edgec.graph_passes import PassManager
from edgec.graph_passes.lora.swappable import SITES_KEY, _add_branch, lora_sites
from edgec.graph_passes.rotation import RotatePass
from edgec.graph_passes.rotation.topology import as_linear
from edgec.lora.binding import TRANSFORMS_FILE
from edgec.lora.transforms import load_factors
from edgec.runtimes.ort import run_model

RTOL = 1e-4


@pytest.fixture(scope="module")
def artifacts(adapter_dirs, tmp_path_factory):
    """rotate spec → `llama tiny` compiled swappable with the all-module adapter on ort-cpu."""
    dirs, _ = adapter_dirs
    root = tmp_path_factory.mktemp("lora_rot")
    return {rot: edgec.compile("llama", target="ort-cpu", output_dir=root / str(rot),
                               config="tiny", lora=[dirs["attn_mlp"]], lora_mode="swappable",
                               rotate=rot)
            for rot in (None, "hadamard:r4=false", "hadamard")}


# R4 is on by default where R1 passes (this decoder): "hadamard" is R1 + R2 + R4
@pytest.mark.parametrize("rot", ["hadamard:r4=false", "hadamard"])
def test_rotated_swappable_equals_unrotated(artifacts, adapter_dirs, lora_helpers, rot):
    dirs, _ = adapter_dirs
    art = artifacts[rot]
    (stats,) = [p["stats"] for p in art.report["passes"] if p["name"] == "rotate"]
    assert stats["skipped"] == [] and stats["r1"] > 0 and stats["r2"] == 2
    assert stats["r4"] == (0 if "r4=false" in rot else 2)
    assert stats["lora_sites_transformed"] == 14
    sites = {s["module"]: s for s in art.manifest["lora"]["sites"]}
    assert all(s["a_transform"] or s["b_transform"] for s in sites.values())
    # q/k/v/gate/up read the stream (γ, R1ᵀ); o/down write it (R1); V also R2, O also R2ᵀ;
    # down's branch reads the un-rotated activation (R4 rewires only the base MatMul)
    assert sites["layers.0.mlp.down_proj"]["a_transform"] is None
    assert sites["layers.1.self_attn.v_proj"]["b_transform"] is not None
    assert art.manifest["lora"]["transforms"] == TRANSFORMS_FILE
    # stored as the factors the pass applied: R1ᵀ and R1 once for the whole stream (not a dense
    # [in, in] per site and layer), each norm's γ as a vector (the reference model's four are
    # equal: one entry), V's and O's R2 per layer as head blocks
    factors = load_factors(art.path / TRANSFORMS_FILE)
    kinds = sorted(f.kind for f in factors.values())
    assert kinds == ["blocks"] * 4 + ["dense"] * 2 + ["diag"], kinds
    q = sites["layers.1.self_attn.q_proj"]["a_transform"]
    assert [factors[n].kind for n in q] == ["diag", "dense"]
    assert q[1] == sites["layers.0.mlp.up_proj"]["a_transform"][1]  # one R1ᵀ for all readers
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["max_rel"] <= RTOL

    plain, rotated = edgec.load(artifacts[None].path), edgec.load(art.path)
    feeds = plain.default_feeds
    for name in ("attn_mlp", "base"):
        want = plain.run(feeds, adapter=name)["logits"]
        assert lora_helpers.max_rel(rotated.run(feeds, adapter=name)["logits"], want) <= RTOL
    # an adapter loaded at run time on some of the modules, at another rank, also gets them
    for sess in (plain, rotated):
        sess.load_adapter(dirs["patterns"])
    want = plain.run(feeds, adapter="patterns")["logits"]
    assert lora_helpers.max_rel(rotated.run(feeds, adapter="patterns")["logits"], want) <= RTOL
    # a blend of the two goes through the same factors (they are linear in A and B)
    blend = {"attn_mlp": 0.6, "patterns": 0.4}
    want = plain.run(feeds, adapter=blend)["logits"]
    assert lora_helpers.max_rel(rotated.run(feeds, adapter=blend)["logits"], want) <= RTOL


def _with_branches(model: ir.Model) -> ir.Model:
    """A swappable branch (rank 3) on every Linear but the LM head, named by its weight."""
    linears = [lin for lin in map(as_linear, list(model.graph)) if lin is not None
               and lin.node.op_type == "MatMul" and not lin.output.is_graph_output()]
    sites = [_add_branch(model, lin.node, lin.node.inputs[1].name, *lin.shape, 3, k)
             for k, lin in enumerate(linears)]
    model.metadata_props[SITES_KEY] = json.dumps(sites)
    return model


def _random_adapter(sites, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in sites:
        feeds[s["a_input"]] = rng.standard_normal((s["in_features"], 3)).astype(np.float32) * 0.2
        feeds[s["b_input"]] = rng.standard_normal((3, s["out_features"])).astype(np.float32) * 0.2
    return feeds


def _transformed(sites, feeds, transforms) -> dict[str, np.ndarray]:
    """The adapter's inputs through each site's factors, written out as dense matrices here (the
    product the factors stand for, not ``apply_left``/``apply_right`` checking themselves)."""
    out = dict(feeds)
    for s in sites:
        for key, name in (("a_transform", s["a_input"]), ("b_transform", s["b_input"])):
            n = feeds[name].shape[0 if key == "a_transform" else 1]
            m = np.eye(n)
            for f in (transforms[k] for k in s[key] or []):
                m = f.matrix(n) @ m if key == "a_transform" else m @ f.matrix(n)
            out[name] = (m @ feeds[name] if key == "a_transform" else feeds[name] @ m
                         ).astype(np.float32)
    return out


def test_layernorm_stream_is_centered_and_rotated_with_its_branches(pre_layernorm_decoder):
    model, feeds = pre_layernorm_decoder(fused_qkv=False, positions=False, beta=False)
    model = _with_branches(model)
    sites = lora_sites(model)
    adapter = _random_adapter(sites)
    want = run_model(model, {**feeds, **adapter})["logits"]
    rotate = RotatePass(online_r4=True)
    pm = PassManager([rotate], check=True, feeds=feeds)  # the base (zero adapters) stays exact
    rotated = pm(model.clone())
    stats = pm.records[0].stats
    assert stats["skipped"] == [] and stats["r4"] == 2
    assert stats["lora_sites_transformed"] == len(sites) == 12
    new_sites = lora_sites(rotated)
    got = run_model(rotated, {**feeds, **_transformed(new_sites, adapter,
                                                      rotate.lora_transforms)})["logits"]
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= RTOL
    # without the transforms the adapter would not be what it was
    wrong = run_model(rotated, {**feeds, **adapter})["logits"]
    assert float(np.abs(wrong - want).max() / np.abs(want).max()) > 1e-2


def test_layernorm_shift_under_a_branch_skips_r1_with_the_reason(pre_layernorm_decoder):
    model, feeds = pre_layernorm_decoder(fused_qkv=False, positions=False)
    model = _with_branches(model)
    adapter = _random_adapter(lora_sites(model))
    want = run_model(model, {**feeds, **adapter})["logits"]
    rotate = RotatePass()
    pm = PassManager([rotate], check=True, feeds=feeds)
    rotated = pm(model.clone())
    stats = pm.records[0].stats
    assert stats["r1"] == 0 and stats["r2"] == 2
    (skip,) = stats["skipped"]
    assert skip["rotation"] == "r1" and "β" in skip["reason"] and "swappable LoRA" in skip[
        "reason"]
    new_sites = lora_sites(rotated)  # R2 only: V's output columns, O's input rows
    assert sum(bool(s["b_transform"]) for s in new_sites) == 2
    assert sum(bool(s["a_transform"]) for s in new_sites) == 2
    got = run_model(rotated, {**feeds, **_transformed(new_sites, adapter,
                                                      rotate.lora_transforms)})["logits"]
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= RTOL
