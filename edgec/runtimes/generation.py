"""Autoregressive generation on any Session whose artifact is a KV-cache decoder.

The loop is the one Hugging Face ``generate()`` runs, so greedy decoding agrees token for
token: prefill over the prompt (empty past), then one token per step with the cache; left-padded
batches take their positions from the mask's cumulative sum; logits are processed in HF's order
(repetition penalty, skipping each row's left padding, then temperature, top-k, top-p); a row
that produced an EOS id is padded from then on (``pad_token_id``, else the first EOS id) and the
loop stops when every row has.
The cache is the session's: arrays passed in and out (ONNX Runtime), or state kept inside the
runtime (OpenVINO's stateful model).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgec.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["GenerationConfig", "ArrayCache", "check_cache_memory", "check_context",
           "decoding_settings", "eos_ids", "generate", "process_logits", "resolve_settings"]

# an option the caller leaves out (None): edgec's default for an artifact without a checkpoint
# generation config (the reference model), else the checkpoint's value, else transformers'
# GenerationConfig default (top_k 50), as transformers' generate() resolves them
EDGEC_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                  "repetition_penalty": 1.0}
HF_DEFAULTS = {**EDGEC_DEFAULTS, "top_k": 50}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be an integer ≥ 1, not {self.max_new_tokens!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise UserError(f"do_sample must be True or False, not {self.do_sample!r}")
        # temperature 0 means greedy to many callers, and greedy decoding reads none (as
        # transformers, which only warns); sampling at 0 is refused
        greedy_zero = not self.do_sample and self.temperature == 0
        if not greedy_zero and (not _finite(self.temperature) or self.temperature <= 0):
            raise UserError(f"temperature must be a finite number > 0, not {self.temperature!r}; "
                            "for deterministic output use do_sample=False" + (
                                "" if self.do_sample else " and leave temperature out"))
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer ≥ 0 (0: no top-k), not {self.top_k!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be a finite number > 0 (1: none), not "
                            f"{self.repetition_penalty!r}")
        for name in ("pad_token_id", "seed"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise UserError(f"{name} must be an integer ≥ 0 (or None), not {value!r}")


def resolve_settings(info, **given: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(the values of ``EDGEC_DEFAULTS``' options, where each came from: "argument",
    "checkpoint" (its generation_config.json), "transformers default" or "edgec default").
    ``given``: the caller's options, None where not given."""
    checkpoint = getattr(info, "generation_config", None)
    values, sources = {}, {}
    for name, default in EDGEC_DEFAULTS.items():
        if given.get(name) is not None:
            values[name], sources[name] = given[name], "argument"
        elif checkpoint is None:
            values[name], sources[name] = default, "edgec default"
        elif checkpoint.get(name) is not None:
            values[name], sources[name] = checkpoint[name], "checkpoint"
        else:
            values[name], sources[name] = HF_DEFAULTS[name], "transformers default"
    return values, sources


def decoding_settings(settings: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``resolve_settings``' values as ``GenerationConfig`` takes them: greedy decoding reads no
    sampling value, so the checkpoint's are not checked (``do_sample: false, temperature: 0.0``
    refused every generation, --greedy too; transformers' generate() ignores them); an
    argument's still are."""
    if settings["do_sample"]:
        t = settings["temperature"]
        if sources["temperature"] != "argument" and not (_finite(t) and t > 0):
            raise UserError(f"the checkpoint's generation config sets temperature {t!r}, which "
                            "cannot sample: give a temperature > 0 (--temperature) or decode "
                            "greedily (--greedy, do_sample=False)")
        return settings
    return {**settings, **{k: EDGEC_DEFAULTS[k] for k in ("temperature", "top_k", "top_p")
                           if sources[k] != "argument"}}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    """A real number that is neither NaN nor infinite (``x <= 0`` is False for NaN)."""
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def eos_ids(eos: Any, default) -> tuple[int, ...]:
    """``eos_token_id`` (an id, a list of them, or None: ``default``) as a tuple of ints."""
    if eos is None:
        return tuple(int(e) for e in default)
    ids = [eos] if _is_int(eos) else list(eos) if isinstance(eos, (list, tuple, np.ndarray)) \
        else None
    if ids is None or not all(_is_int(e) and e >= 0 for e in ids):
        raise UserError(f"eos_token_id must be a token id or a list of them, not {eos!r}")
    return tuple(int(e) for e in ids)


class ArrayCache:
    """The KV cache as arrays: fed as ``past_key_values.*``, replaced by ``present.*``."""

    def __init__(self, session, info, batch: int):
        self.session, self.info = session, info
        empty = np.zeros((batch, info.kv_heads, 0, info.head_dim), np.float32)
        self.past = dict.fromkeys(info.past_names, empty)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 **self.past}
        out = self.session._run(self.session._adapter_feeds(feeds, None))
        self.past = {p: out[q] for p, q in zip(self.info.past_names, self.info.present_names)}
        self.scores = out.get("attention_scores")  # a decoder that outputs them (VLM)
        return out["logits"]

    def load_prompt(self, presents: list[np.ndarray], mask: np.ndarray) -> None:
        """Start from a prompt's keys/values computed elsewhere (the sparse prefill graph)."""
        self.past = dict(zip(self.info.past_names, presents))

    def evict(self, keep: np.ndarray) -> None:
        """Keep only the cache slots ``keep`` [B, n] (ascending slot indices per row)."""
        self.past = {n: take_slots(a, keep) for n, a in self.past.items()}

    def truncate(self, tokens: int) -> None:
        """Keep the first ``tokens`` positions (a conversation's next turn resumes there)."""
        self.past = {n: a[:, :, :tokens] for n, a in self.past.items()}


def take_slots(cache: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[B, heads, n, head_dim]: ``cache`` [B, heads, T, head_dim] at slots ``keep`` [B, n]."""
    return np.take_along_axis(cache, keep[:, None, :, None], axis=2)


class SparsePrefill:
    """Runs the prompt through the artifact's sparse-attention prefill graph, loads the cache
    it wraps with the prompt's keys/values, then leaves every decode step to that cache."""

    def __init__(self, cache, prefill_session, info):
        self.cache, self.prefill, self.info = cache, prefill_session, info
        self.done = False

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.done:
            return self.cache.step(ids, mask, positions)
        self.done = True
        out = self.prefill._run({"input_ids": ids, "attention_mask": mask,
                                 "position_ids": positions})
        self.cache.load_prompt([out[n] for n in self.info.present_names], mask)
        return out["logits"]


def process_logits(scores: np.ndarray, sequences: np.ndarray, cfg: GenerationConfig,
                   ignore: np.ndarray | None = None) -> np.ndarray:
    """Hugging Face's logits processing: repetition penalty over every token so far, then (when
    sampling) temperature, top-k and top-p. ``scores`` [B, vocab] float32. ``ignore`` [B]: each
    row's leading positions of ``sequences`` the penalty skips, its left padding (as
    transformers' ``generate`` does: the index of the prompt mask's first 1, so padding inside
    a row and the pad fill after a row's EOS are penalised, as there)."""
    scores = scores.astype(np.float32, copy=True)
    if cfg.repetition_penalty != 1.0:
        vocab = scores.shape[-1]
        if ignore is not None:  # skipped positions point at an extra column, dropped below
            skip = np.arange(sequences.shape[1])[None, :] < np.asarray(ignore)[:, None]
            sequences = np.where(skip, vocab, sequences)
        scores = np.concatenate([scores, np.zeros((scores.shape[0], 1), np.float32)], axis=1)
        rows = np.arange(scores.shape[0])[:, None]
        seen = scores[rows, sequences]
        seen = np.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores[rows, sequences] = seen
        scores = scores[:, :vocab]
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scaled = scores / np.float32(cfg.temperature)
        overflow = np.isfinite(scores) & ~np.isfinite(scaled)  # (the model's own: _choose)
        if overflow.any():
            top = float(np.abs(scores[overflow]).max())
            raise UserError(f"temperature {cfg.temperature!r} is too small: the scores divided "
                            f"by it overflow float32 (a score of {top:.3g} / {cfg.temperature!r})"
                            "; give a larger temperature, or do_sample=False (--greedy) for the "
                            "most likely tokens")
        scores = scaled
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = np.partition(scores, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, as HF's TopPLogitsWarper
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = _softmax(ranked)
        drop = np.cumsum(probs, axis=-1) <= 1 - cfg.top_p
        drop[:, -1] = False  # keep at least the most likely token
        removed = np.zeros_like(drop)
        np.put_along_axis(removed, order, drop, axis=-1)
        scores = np.where(removed, -np.inf, scores)
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _choose(scores: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    # NaN or +inf scores have no next token (-inf is a filtered one): argmax read them as token
    # 0, and a swappable adapter blended at weight 1e30 generated 0, 0, 0, ... with exit 0
    bad = np.isnan(scores).any(axis=-1) | np.isposinf(scores).any(axis=-1)
    if bad.any():
        raise UserError(f"the model's next-token scores are NaN or +inf (batch row "
                        f"{int(np.flatnonzero(bad)[0])}): its float32 computation overflowed on "
                        "these inputs; check for extreme input values or adapter blend weights "
                        "far from 1")
    if not cfg.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    probs = _softmax(scores.astype(np.float64))
    u = rng.random((scores.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1),
                      scores.shape[-1] - 1).astype(np.int64)


def _prompt(info, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"input_ids must be integer token ids [batch, seq] (or [seq]), got "
                        f"{ids.dtype} {list(ids.shape)}")
    ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= info.vocab:
        raise UserError(f"token ids must be in [0, {info.vocab}) for this model's vocabulary; "
                        f"got {int(ids.min())}..{int(ids.max())}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise UserError(f"attention_mask has shape {list(mask.shape)}, input_ids "
                        f"{list(ids.shape)}; give one mask value per token")
    mask = (mask != 0).astype(np.int64)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise UserError(f"row {int(empty[0])} of the batch is all padding (its attention_mask "
                        "is all 0); give every row at least one token")
    if not mask[:, -1].all():
        raise UserError("the batch is right-padded (a row's last token is padding); pad on the "
                        "left for generation (tokenizer padding_side='left')")
    return ids, mask


def check_context(info, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt + max_new_tokens the model's context (a static cache's length, else its
    max_positions) cannot hold; before any cache is sized by them (``Session.generate``)."""
    limit = info.context or info.max_positions
    # the last new token is never fed back: the cache holds prompt + max_new_tokens - 1
    if limit and prompt_tokens + max_new_tokens - 1 > limit:
        most, fit = limit - prompt_tokens + 1, limit - max_new_tokens + 1
        advice = (f"set max_new_tokens (-n) to at most {most} or shorten the prompt"
                  if most >= 1 else f"shorten the prompt to at most {fit} tokens" + (
                      f" ({limit} with max_new_tokens 1)" if max_new_tokens > 1 else "")
                  if fit >= 1 else f"shorten the prompt and lower max_new_tokens (-n): "
                  f"together they may be at most {limit + 1} tokens")
        raise UserError(f"the prompt ({prompt_tokens} tokens) + max_new_tokens "
                        f"({max_new_tokens}) - 1 exceeds the model's context of {limit} "
                        f"tokens; {advice}")


def check_cache_memory(info, batch: int, capacity: int, size: int | None = None) -> None:
    """Refuse a cache allocated up front for ``capacity`` tokens per row (OpenVINO's paged
    blocks, ``size`` bytes where they are not float32; FreeKV's buffers) that exceeds this
    machine's memory: a model without a context limit
    (the reference) took any max_new_tokens, and numpy's MemoryError was an internal error."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): numpy's error stands
        return
    if size is None:  # float32
        size = 2 * info.layers * batch * info.kv_heads * capacity * info.head_dim * 4
    if size > memory:
        raise UserError(f"a KV cache for {batch} x {capacity} tokens (prompt + max_new_tokens) "
                        f"takes {size / 2**30:.1f} GiB, more than this machine's "
                        f"{memory / 2**30:.1f} GiB of memory; lower max_new_tokens (-n)")


def generate(session, info, input_ids, attention_mask=None, cache=None,
             streamer: Callable[[np.ndarray], Any] | None = None, cached: int = 0,
             **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """(prompt followed by the new tokens [B, S+new] int64, timing stats). ``cached``: the
    prompt's first tokens whose keys and values ``cache`` holds already (a conversation's
    earlier turns): the prefill runs the rest."""
    given = options.pop("eos_token_id", None)
    eos = eos_ids(given, info.eos_token_ids)
    outside = [e for e in eos if e >= info.vocab] if given is not None else []
    if outside:  # a typo'd id would never be generated: the stop silently never happens
        raise UserError(f"eos_token_id {outside[0]} is outside this model's vocabulary of "
                        f"{info.vocab} tokens; give ids in [0, {info.vocab})")
    pad = options.pop("pad_token_id", None)
    own = info.pad_token_id
    if pad is None and own is not None and not (_is_int(own) and 0 <= own < info.vocab):
        # a checkpoint's pad id outside the vocabulary (old LLaMA conversions carry -1): the
        # CLI has no option to replace it, and transformers pads with it only to fail feeding
        # it back; finished rows take the first EOS id instead
        logger.warning("the checkpoint's pad_token_id %s is outside the vocabulary of %d "
                       "tokens; finished rows are filled with the EOS id instead", own,
                       info.vocab)
        own = None
    cfg = GenerationConfig(eos_token_id=eos, pad_token_id=own if pad is None else pad,
                           **options)
    if cfg.pad_token_id is not None and cfg.pad_token_id >= info.vocab:  # it fills a finished
        # row: ORT failed on it at the next step, OpenVINO returned rows padded with it
        raise UserError(f"pad_token_id {cfg.pad_token_id} is outside this model's vocabulary "
                        f"of {info.vocab} tokens; give pad_token_id= an id in [0, {info.vocab})")
    ids, mask = _prompt(info, input_ids, attention_mask)
    check_context(info, ids.shape[1], cfg.max_new_tokens)
    fill = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    rng = np.random.default_rng(cfg.seed)
    cache = cache if cache is not None else ArrayCache(session, info, ids.shape[0])
    t0 = time.perf_counter()
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    logits = cache.step(ids[:, cached:], mask, positions[:, cached:])[:, -1]
    sequences, finished = ids, np.zeros(ids.shape[0], bool)
    next_pos = positions[:, -1:] + 1
    ttft = None
    # the repetition penalty skips each row's left padding (transformers' prompt_ignore_length)
    lead = mask.argmax(axis=1)
    for i in range(cfg.max_new_tokens):
        token = _choose(process_logits(logits, sequences, cfg, lead), cfg, rng)
        token = np.where(finished, fill, token)
        sequences = np.concatenate([sequences, token[:, None]], axis=1)
        if ttft is None:
            ttft = time.perf_counter() - t0
        if streamer is not None:
            streamer(token)
        if cfg.eos_token_id:
            finished |= np.isin(token, cfg.eos_token_id)
        if finished.all() or i == cfg.max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        logits = cache.step(token[:, None], mask, next_pos)[:, -1]
        next_pos = next_pos + 1
    total = time.perf_counter() - t0
    new = sequences.shape[1] - ids.shape[1]
    decode_s = total - ttft
    stats = {"prompt_tokens": int(ids.shape[1]), "batch": int(ids.shape[0]), "new_tokens": new,
             "prefill_ms": ttft * 1e3, "total_ms": total * 1e3,
             "decode_tokens_per_s": (new - 1) / decode_s if new > 1 and decode_s > 0 else None,
             "stopped": "eos" if finished.all() else "max_new_tokens",
             **({"cached_tokens": cached} if cached else {})}
    return sequences, stats


def benchmark_generation(session, prompt_tokens: int = 128, new_tokens: int = 32,
                         warmup: int = 1, iterations: int = 5, seed: int = 0) -> dict[str, Any]:
    """Prefill ms (time to first token) and decode tokens/s, medians over ``iterations`` greedy
    generations of exactly ``new_tokens`` from a random ``prompt_tokens``-token prompt (a VLM
    artifact's: after a random image)."""
    from edgec.runtimes.base import check_runs

    check_runs(warmup, iterations)
    info = session.decoder_info
    rng = np.random.default_rng(seed)
    vision = (getattr(session, "manifest", None) or {}).get("generation", {}).get("vision")
    image = None
    if vision:  # a VLM: a random image ahead of the text prompt (its placeholders added)
        side = int(vision["image_size"])
        image = rng.uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
    high = min(info.vocab, int(vision["image_token_id"])) if vision else info.vocab
    ids = rng.integers(0, high, (1, prompt_tokens))
    runs = []
    for i in range(warmup + iterations):
        session.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], image=image,
                         do_sample=False)
        if i >= warmup:
            runs.append(session.last_generation)
    extra = {"image_tokens": int(vision["image_tokens"]),
             "prompt_tokens_kept": runs[-1].get("prompt_tokens_kept")} if vision else {}
    return {"prompt_tokens": prompt_tokens, **extra, "new_tokens": new_tokens,
            "iterations": iterations,
            "prefill_ms": float(np.median([r["prefill_ms"] for r in runs])),
            "decode_tokens_per_s": float(np.median([r["decode_tokens_per_s"] for r in runs])),
            "decode_ms_per_token": float(np.median([1e3 / r["decode_tokens_per_s"]
                                                    for r in runs])),
            "prefill_graph": runs[-1].get("prefill_graph", "dense"),
            **({"emulator": session.emulator} if session.emulator else {})}


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` → [1, 2, 3] (``--prompt-ids``)."""
    items = text.replace(" ", "").split(",")
    if not any(items):
        raise UserError("--prompt-ids is empty; give at least one token id")
    if "" in items:  # "11,,12" or "11,12,": a token id lost in editing, not silently dropped
        raise UserError(f"--prompt-ids has an empty item in {text!r}; give comma-separated "
                        "token ids with none empty, e.g. 1,2,3")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UserError(f"--prompt-ids takes comma-separated token ids, e.g. 1,2,3; got "
                        f"{text!r}") from None
