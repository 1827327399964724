"""LoRA composes with generation: a merged adapter is held to PEFT on the KV-cache decoder, and
swappable adapters switch what the stateful OpenVINO decoder generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgec
from edgec.errors import UserError

PROMPT = np.array([[1, 2, 3, 4, 5]])


def _greedy(module, n: int) -> np.ndarray:
    seq = torch.as_tensor(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, module(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq.numpy()


def test_merged_and_swappable_adapters_generate_as_peft(adapter_dirs, tmp_path):
    dirs, merged = adapter_dirs
    a, b = sorted(n for n in dirs if n != "zero")[:2]
    art = edgec.compile("llama", target="ort-cpu", config="tiny", generate=True,
                        lora=str(dirs[a]), output_dir=tmp_path / "merge",
                        sparse_attention="keep=1.0,block=16,min_seq=64")
    assert art.manifest["lora"]["reference"].startswith("peft merge_and_unload")
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["max_rel"] < 1e-4
    # the sparse prefill graph carries the merge too, held to the same PEFT reference
    prefill = art.report["fidelity"]["prefill_graph_vs_source"]
    assert prefill["reference"].startswith("peft merge_and_unload") and prefill["rtol"]
    assert prefill["outputs"]["logits"]["max_rel"] < 1e-4
    np.testing.assert_array_equal(art.load().generate(PROMPT, max_new_tokens=10),
                                  _greedy(merged[a], 10))
    # swappable adapters on the stateful OpenVINO decoder: each generates as PEFT merged it
    swap = edgec.compile("llama", target="openvino-cpu", config="tiny", generate=True,
                         lora=[str(dirs[a]), str(dirs[b])], lora_mode="swappable",
                         output_dir=tmp_path / "swap")
    sess = swap.load()
    for name in (a, b):
        sess.active_adapter = name
        np.testing.assert_array_equal(sess.generate(PROMPT, max_new_tokens=10),
                                      _greedy(merged[name], 10))
    from edgec.models import registry

    sess.active_adapter = "base"
    np.testing.assert_array_equal(sess.generate(PROMPT, max_new_tokens=10),
                                  _greedy(registry.get("llama").build("tiny"), 10))
    # generate(adapter=...) runs that adapter for the call only (there was no such argument)
    np.testing.assert_array_equal(sess.generate(PROMPT, max_new_tokens=10, adapter=a),
                                  _greedy(merged[a], 10))
    assert sess.active_adapter == "base"
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        sess.generate(PROMPT, max_new_tokens=2, adapter="nope")
    # bench of a generation artifact dropped --adapter (a misspelt one benchmarked the default)
    from typer.testing import CliRunner

    from edgec.cli import app

    r = CliRunner().invoke(app, ["bench", str(swap.path), "--adapter", "nope"])
    assert r.exit_code == 2 and "no adapter named 'nope'" in r.stderr
    r = CliRunner().invoke(app, ["bench", str(swap.path), "--adapter", b, "--iterations", "1",
                                 "--warmup", "0", "--prompt-tokens", "4", "--new-tokens", "2",
                                 "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["adapter"] == b, r.output
