"""A KV-cache decoder (``--generate`` on a CPU target) calibrates on a file of prompts alone:
``input_ids`` (and optionally ``attention_mask``), which edgec turns into the prefill feeds its
graph takes (position ids from the mask, an empty cache). The graph's inputs are those plus 2
past tensors per layer, and a file of real text's token ids was refused naming
``position_ids`` (SmolLM2's 30 layers: 60 empty arrays to spell out)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgec
from edgec.calibration.samples import source_samples_from_npz
from edgec.errors import UserError
from edgec.exporters.sources import resolve_source


@pytest.fixture(scope="module")
def decoder():
    return resolve_source("llama", config="tiny", generate=True)


def _prompts(n: int = 6, seq: int = 12) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 256, (n, seq))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded prompt
    return ids, mask


def test_prompts_become_prefill_feeds(tmp_path, decoder):
    ids, mask = _prompts()
    np.savez(tmp_path / "p.npz", input_ids=ids, attention_mask=mask)
    samples = source_samples_from_npz(tmp_path / "p.npz", decoder)
    gen = decoder.info["generation"]
    assert len(samples) == 6 and set(samples[0]) == set(decoder.feeds)
    np.testing.assert_array_equal(samples[1]["input_ids"], ids[1:2])
    # as transformers' generate counts them: the padding at 1, the prompt from 0
    np.testing.assert_array_equal(samples[1]["position_ids"],
                                  [[1, 1, 1, 1, 0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(samples[0]["position_ids"], [np.arange(12)])
    for name in gen["past"]:
        assert samples[0][name].shape == (1, gen["kv_heads"], 0, gen["head_dim"])
    np.savez(tmp_path / "ids.npz", input_ids=ids[:, None])  # [samples, batch, seq], no mask
    again = source_samples_from_npz(tmp_path / "ids.npz", decoder)
    assert again[1]["attention_mask"].all() and (again[1]["position_ids"] == np.arange(12)).all()


@pytest.mark.parametrize("arrays, match", [
    ({"input_ids": np.zeros((4, 8), np.float32)}, "give token ids"),
    ({"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.ones((4, 9), np.int64)},
     "one mask entry per token"),
    ({"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.zeros((4, 8), np.int64)},
     "at least one 1 per prompt"),
    ({"input_ids": np.zeros((4, 1, 8), np.int64), "position_ids": np.zeros((4, 1, 8), np.int64)},
     "no array for input 'attention_mask'.*give input_ids alone"),
])
def test_bad_prompt_files_are_refused_in_one_line(tmp_path, decoder, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=match) as e:
        source_samples_from_npz(tmp_path / "bad.npz", decoder)
    assert "\n" not in str(e.value)


def test_calibrating_on_prompts_equals_calibrating_on_the_feeds_they_make(tmp_path, decoder):
    """The same ranges from the prompts as from the full prefill feeds written out by hand;
    the compile takes the file too, and its artifact generates."""
    ids, mask = _prompts()
    np.savez(tmp_path / "prompts.npz", input_ids=ids, attention_mask=mask)
    full = source_samples_from_npz(tmp_path / "prompts.npz", decoder)
    np.savez(tmp_path / "full.npz", **{k: np.stack([s[k] for s in full]) for k in full[0]})
    caches = {}
    for name in ("prompts", "full"):
        edgec.calibrate("llama", "openvino-cpu", tmp_path / f"cache-{name}", config="tiny",
                        data=tmp_path / f"{name}.npz", generate=True)
        caches[name] = json.loads((tmp_path / f"cache-{name}" / "calibration.json").read_text())
    assert caches["prompts"]["tensors"] == caches["full"]["tensors"]
    assert caches["prompts"]["samples"] == 6
    art = edgec.compile("llama", config="tiny", target="openvino-cpu", generate=True,
                        quantize="w8a8", calibration=tmp_path / "prompts.npz",
                        output_dir=tmp_path / "art")
    assert art.manifest["quantization"]["calibration"]["data"] == "file prompts.npz"
    out = edgec.load(tmp_path / "art").generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
