"""Calibration samples: from a user's .npz (leading sample axis) or the source's own generator."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgec.errors import UserError

if TYPE_CHECKING:
    from edgec.calibration.text import TextWindows

__all__ = ["samples_from_npz", "source_samples_from_npz", "npz_sample_count",
           "check_sample_count", "generated_samples", "samples_for_model", "DEFAULT_SAMPLES",
           "MAX_SAMPLES", "DECODE_SAMPLES", "default_sample_count"]

DEFAULT_SAMPLES = 16
# generated samples are built at once: 10**8 filled memory without a word (ranges settle within
# a few hundred; a user's .npz may hold more)
MAX_SAMPLES = 4096
# a static-cache decoder's one-token decode graph sees one token per sample, where its prefill
# graph sees a chunk (16 samples x 64 tokens): at 16 its ranges came from 16 activations per
# tensor and were too narrow (llama tiny w8a16 on the HTP, context 256: teacher-forced decode
# logits cosine vs PyTorch, min over 27 steps, 0.99878 at 16, 0.99929 at 64, 0.99984 at 128)
DECODE_SAMPLES = 128
# distinct random prompts a static decoder's samples fill their buffers from: sample i takes
# the first ``start_i`` slots of prompt i mod 16's keys/values (one prefill of the whole buffer
# each; a prefill per sample took the 128 decode samples of llama small from 270 s to ~400 s)
PREFIX_PROMPTS = 16


def default_sample_count(src) -> int:
    """How many generated samples calibrate ``src`` where the user asked for no count
    (``samples=``): DEFAULT_SAMPLES, but DECODE_SAMPLES for a static-cache one-token graph
    (the NPU's decode graph): one token a sample, where a prefill graph's 16 are 16 chunks.
    Not a VLM's decode graph: there 128 text-only samples made it worse (``vlm tiny`` w8a16 on
    the HTP, 8 greedy tokens after an image: 2 equal to fp32's, ≥ 6 at 16; not understood yet)."""
    gen = src.info.get("generation") or {}
    ids = src.feeds.get("input_ids") if gen.get("cache") == "static" else None
    one_token = ids is not None and ids.shape[-1] == 1 and not gen.get("vision")
    return DECODE_SAMPLES if one_token else DEFAULT_SAMPLES


def samples_from_npz(path: str | os.PathLike, inputs: Sequence[Any],
                     bounds: Mapping[str, Mapping[str, Any]] | None = None, src=None
                     ) -> list[dict[str, np.ndarray]]:
    """Split ``path`` (keys = input names, ``arr[i]`` = sample i) into per-sample feeds.

    ``inputs`` are the model's input specs (name, shape, dtype); every input must be present with
    a matching dtype kind and, for static dims, a matching shape. ``bounds`` are the graph's
    index inputs (``index_inputs.index_bounds``): every sample's values must lie in their table.
    ``src``: the source, where a KV-cache decoder's file may hold its prompts alone
    (``_prompts``).
    """
    p = Path(path)
    arrays = _load(p)
    past = _cache_inputs(src) if src is not None else []
    hint = ""
    if past:  # a KV-cache decoder: its prompts alone, prefilled as generation does
        arrays = _prompts(p, arrays, src, past) if _prompts_only(arrays) else arrays
        hint = ("; or give input_ids alone (prompts, one per sample, [seq] or [batch, seq]) "
                "and optionally their attention_mask: edgec prefills them")
    return _samples_from_arrays(p, arrays, inputs, bounds, hint)


def _load(p: Path) -> dict[str, np.ndarray]:
    from edgec.npz_read import load_npz

    return load_npz(p, "no such calibration data file; give an .npz whose keys are the "
                    "model's input names, each with a leading sample axis",
                    "save it with numpy.savez")


def _samples_from_arrays(p: Path, arrays: Mapping[str, np.ndarray], inputs: Sequence[Any],
                         bounds: Mapping[str, Mapping[str, Any]] | None, hint: str = ""
                         ) -> list[dict[str, np.ndarray]]:
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{p}: no array for input {missing[0]!r}; the model's inputs are "
                        f"{', '.join(names)} (each with a leading sample axis){hint}")
    unknown = sorted(set(arrays) - set(names))
    if unknown:  # as `run --inputs` refuses them: a mistyped optional input went uncalibrated
        raise UserError(f"{p}: unknown inputs {unknown}; the model's inputs are "
                        f"{', '.join(names)} (each with a leading sample axis)")
    counts = {arrays[n].shape[0] if arrays[n].ndim else 0 for n in names}
    if counts == {0}:
        raise UserError(f"{p}: holds no samples (a leading sample axis of 0); give at least one")
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"{p}: inputs have different sample counts {sorted(counts)}; every array "
                        "needs the same leading sample axis")
    for spec in inputs:
        arr = arrays[spec.name]
        want = np.dtype(spec.dtype)
        if np.issubdtype(want, np.floating) != np.issubdtype(arr.dtype, np.floating):
            raise UserError(f"{p}: input {spec.name!r} is {arr.dtype}, the model wants {want}")
        shape = arr.shape[1:]
        static = [d for d in spec.shape]
        if len(shape) != len(static) or any(isinstance(d, int) and d >= 0 and d != s
                                             for d, s in zip(static, shape)):
            raise UserError(f"{p}: input {spec.name!r} samples have shape {tuple(shape)}, the "
                            f"model wants {tuple(static)} (after the leading sample axis)")
    n = counts.pop()
    from edgec.runtimes.base import check_shared_dims

    # one shape for every sample: the first sample's dims are every sample's
    check_shared_dims(inputs, {k: a[0] for k, a in arrays.items()}, f"{p}: ")
    cast = {s.name: _checked_cast(p, s.name, arrays[s.name], np.dtype(s.dtype)) for s in inputs}
    _check_index_samples(p, cast, bounds or {})
    return [{s.name: cast[s.name][i] for s in inputs} for i in range(n)]


def _checked_cast(p: Path, name: str, arr: np.ndarray, want: np.dtype) -> np.ndarray:
    """``arr`` as ``want``, refusing what calibration cannot use: integers the dtype cannot
    hold (astype wrapped uint64 2**63 + 5 to a negative int64, as ``run`` refuses for its feeds)
    and NaN or ±inf, in the file or made by the cast (float64 1e300 became float32 inf): one inf
    in one sample made every range (and scale) inf, and the artifact's every output NaN."""
    from edgec.runtimes.base import _check_integers_fit

    try:
        _check_integers_fit(name, arr, want)
    except UserError:  # the first sample that does not fit, in run's words
        for i, sample in enumerate(arr):
            try:
                _check_integers_fit(name, sample, want)
            except UserError as e:
                said = str(e).replace(f"input {name!r}", f"input {name!r} sample {i}", 1)
                raise UserError(f"{p}: {said}") from None
    if not np.issubdtype(want, np.floating):
        return arr.astype(want, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(want, copy=False)
    finite = np.isfinite(out)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        value = arr[where]
        how = (f"holds {float(value)}" if not np.isfinite(value) else
               f"holds {float(value):g}, which {want} cannot hold (the cast makes it "
               f"{float(out[where])!r})")
        raise UserError(f"{p}: input {name!r} sample {where[0]} {how} at {list(where[1:])}; "
                        "calibration data must be finite: fix or drop that sample")
    return out


def _check_index_samples(p: Path, arrays: Mapping[str, np.ndarray],
                         bounds: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse token ids (any index input) outside the table they index, in ``run``'s words
    (``check_indices``) with the file and the first sample holding one. Every sample, the
    held-out ones too: an id past the vocabulary in the file's last samples reached the
    floor's ONNX Runtime run as a Gather error (exit 2, read as edgec's), and ``calibrate
    --data`` stored it in held_out.npz without a word."""
    from edgec.exporters.index_inputs import check_indices

    for name, fields in bounds.items():
        arr = arrays.get(name)
        if arr is None:
            continue
        try:  # the whole file at once: per sample only to name the first one that fails
            check_indices({name: arr}, {name: fields})
        except UserError:
            for i, sample in enumerate(arr):
                try:
                    check_indices({name: sample}, {name: fields})
                except UserError as e:
                    said = str(e).replace(f"input {name!r}", f"input {name!r} sample {i}", 1)
                    raise UserError(f"{p}: {said}") from None


def check_sample_count(asked: int, available: int | None, name: str) -> None:
    """Refuse ``samples=`` asking for more than a user's .npz holds (it calibrated on all of
    them and the report said so, where the user asked for more)."""
    if available is not None and asked > available:
        raise UserError(f"--quantize samples={asked}, but {name} holds {available} samples; "
                        f"ask for at most {available}, or drop samples= to use them all")


def npz_sample_count(path: str | os.PathLike) -> int | None:
    """The leading axis of the first array in ``path``, read from its header alone; None where
    the file is not a readable .npz (``samples_from_npz`` says what is wrong with it)."""
    from edgec.npz_read import npy_headers

    try:
        headers = npy_headers(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None
    if not headers:
        return None
    shape = next(iter(headers.values()))[0]
    return shape[0] if shape else None


def generated_samples(src, n: int | None = None, skip: int = 0
                      ) -> tuple[list[dict[str, np.ndarray]], str]:
    """``n`` samples (None: ``default_sample_count``) from the source's own generator, less the
    first ``skip`` (the same samples as a full run's, but a static-cache decoder's buffers are
    only filled for those returned), and a word on where they came from.

    Registry models use their ``calibration_inputs`` (seeds disjoint from the example inputs;
    a diffusion denoiser's: feeds from its own fp32 sampler, ``calibration.trajectory``);
    Hugging Face checkpoints (and decoder .onnx files) with a tokenizer.json get windows of
    edgec's English passages in its tokens (``calibration.text``; random ids where they have
    none), with a random amount of right padding (so the attention-mask path sees both masked
    and unmasked keys; a KV-cache decoder's prompts are unpadded); a denoiser graph with a sampling
    entry (a diffusers transformer, an exported .onnx) the feeds its own fp32 graph's sampler
    ran from random conditions (``graph_trajectory_inputs``); other ONNX files and nn.Modules
    get random feeds shaped like their example inputs, which calibrate the graph but are not
    representative data: pass ``--data`` (``calibration=``) for real ranges.
    """
    n = default_sample_count(src) if n is None else n
    gen = src.info.get("generation")
    if gen and gen.get("cache") == "static" and not src.info.get("vlm_graph"):
        return _static_decoder_samples(src, gen, n, skip)
    from edgec.calibration import trajectory

    spec = _registry_spec(src)
    if spec is not None and spec.calibrates_on_trajectory:  # only the trajectories asked for
        sets = trajectory.trajectory_inputs(spec, src.info["config"], n, skip)
        return ([dict(zip(src.info["input_names"], (t.numpy() for t in s))) for s in sets],
                trajectory.ORIGIN)
    if trajectory.records_graph_trajectories(src):
        return trajectory.graph_trajectory_inputs(src, n, skip), trajectory.GRAPH_ORIGIN
    samples, origin = _generated(src, n)
    return samples[skip:], origin


def _registry_spec(src):
    """A reference model's ModelSpec; None for other sources."""
    if src.kind != "registry":
        return None
    from edgec.models import registry

    return registry.get(src.info["name"])


def _generated(src, n: int) -> tuple[list[dict[str, np.ndarray]], str]:
    names = src.info["input_names"]
    if src.info.get("vlm_graph"):  # a VLM's image encoder or prefill graph
        from edgec.exporters.vlm_source import calibration_samples

        return calibration_samples(src, n), "random images and prompts around them"
    gen = src.info.get("generation")
    if gen:  # a dynamic-cache decoder (a static one's: ``_static_decoder_samples``)
        return _decoder_samples(src, n)
    if src.kind == "registry":
        from edgec.models import registry

        spec = registry.get(src.info["name"])
        sets = spec.calibration_inputs(src.info["config"], n)
        return [{k: t.numpy() for k, t in zip(names, s)} for s in sets], "model generator"
    if src.kind == "hf":
        return _hf_samples(src, n)
    if src.kind in ("onnx", "module"):
        from edgec.exporters.sources import random_feeds

        return [random_feeds(_specs(src), seed=1000 + i) for i in range(n)], (
            "random feeds with dynamic dims of size 1: give an .npz of real samples"
            if _unit_dynamic_dims(src) else "random feeds")
    raise UserError(f"a {src.kind} source has no calibration generator; pass calibration "
                    "data (an .npz with a leading sample axis)")


def _specs(src) -> list:
    """The source's inputs as specs, shaped and typed as its example feeds."""
    from edgec.runtimes.base import IOSpec

    return [IOSpec(k, v.shape, v.dtype.name) for k, v in src.feeds.items()]


def _unit_dynamic_dims(src) -> bool:
    """Whether an .onnx source's example (so its random samples) sets a dynamic dim past the
    first (an image's H/W) to 1: a dynamic-H/W model calibrated on 1x1 images (w8a16 cosine
    0.55 on 32x32 ones), where only the user's data gives real sizes."""
    if src.kind != "onnx":
        return False
    return any(not isinstance(d, int) and size == 1
               for spec, feed in zip(_graph_specs(src), src.feeds.values())
               for d, size in list(zip(spec.shape, feed.shape))[1:])


def _graph_specs(src) -> list:
    """The source's inputs as specs with its graph's dims: a dynamic dim by its label (any size
    fits), not the example's size (a dynamic-H/W .onnx's example is 1x1: 32x32 images were
    refused as "the model wants (1, 3, 1, 1)"); typed as its example feeds."""
    from edgec.onnx_io import dim_label
    from edgec.runtimes.base import IOSpec

    model = getattr(src, "model", None)  # (a stand-in source without its graph: the example)
    graph = {v.name: v for v in model.graph.inputs} if model is not None else {}
    specs = []
    for k, v in src.feeds.items():
        value = graph.get(k)
        dims = v.shape if value is None or value.shape is None or len(value.shape) != v.ndim \
            else tuple(dim_label(d) for d in value.shape.dims)
        specs.append(IOSpec(k, dims, v.dtype.name))
    return specs


def source_samples_from_npz(path: str | os.PathLike, src) -> list[dict[str, np.ndarray]]:
    """A user's .npz of samples for ``src`` (``samples_from_npz`` against its inputs: the
    graph's static dims must match, its dynamic ones take any size; its index inputs' values
    must lie in their tables)."""
    from edgec.exporters.index_inputs import index_bounds

    model = getattr(src, "model", None)
    return samples_from_npz(path, _graph_specs(src),
                            index_bounds(model) if model is not None else None, src)


def _cache_inputs(src) -> list[str]:
    """A dynamic KV-cache decoder's past inputs (``--generate`` on a CPU target); none for
    other graphs, a static-cache (NPU) one, whose buffers calibration fills from the model, or
    a VLM's language graph."""
    gen = src.info.get("generation") or {}
    if gen.get("cache") == "static" or gen.get("vision"):
        return []
    return [n for n in gen.get("past", ()) if n in src.feeds]


def _prompts_only(arrays: Mapping[str, np.ndarray]) -> bool:
    return "input_ids" in arrays and set(arrays) <= {"input_ids", "attention_mask"}


def _prompts(p: Path, arrays: Mapping[str, np.ndarray], src, past: list[str]
             ) -> dict[str, np.ndarray]:
    """A decoder's calibration prompts as its prefill feeds: position ids from the mask (as
    transformers' generate counts them: left padding starts at 0) and an empty cache. The graph
    takes past keys/values, position ids and a mask; a file of prompts had to spell out 60
    empty arrays for a 30-layer model, or was refused naming the first."""
    gen = src.info["generation"]
    ids = arrays["input_ids"]
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (2, 3):
        raise UserError(f"{p}: input_ids is {ids.dtype} {tuple(ids.shape)}; give token ids, "
                        "integers shaped [samples, seq] or [samples, batch, seq]")
    ids = ids[:, None] if ids.ndim == 2 else ids
    mask = arrays.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else (mask[:, None] if mask.ndim == 2 else mask)
    if mask.shape != ids.shape:
        raise UserError(f"{p}: attention_mask has shape {tuple(mask.shape)}, input_ids "
                        f"{tuple(ids.shape)}; give one mask entry per token")
    if not ((mask == 0) | (mask == 1)).all() or not mask.any(-1).all():
        raise UserError(f"{p}: attention_mask must be 0/1 with at least one 1 per prompt")
    n, batch, _ = ids.shape
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
    empty = np.zeros((n, batch, gen["kv_heads"], 0, gen["head_dim"]), np.float32)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
             "position_ids": positions.astype(np.int64), **dict.fromkeys(past, empty)}
    return {k: v for k, v in feeds.items() if k in src.feeds}


def _decoder_samples(src, n: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """Prefill feeds for a KV-cache decoder: prompts as long as the example's whole sequence
    (past + new), empty past. The cache path (Concat → attention) sees real keys and values,
    not the example's random past. Registry models' own token generator; a checkpoint's text
    (``calibration.text``); else random ids."""
    gen = src.info["generation"]
    batch, total = src.feeds["attention_mask"].shape
    text = _text_prompts(src, gen, batch)
    origin = "prefill prompts (empty KV cache)"
    if src.kind == "registry" and not gen.get("vision"):
        from edgec.models import registry

        spec = registry.get(src.info["name"])
        prompts = [s[0].numpy()[:, :total] for s in spec.calibration_inputs(src.info["config"], n)]
    elif text is not None:
        from edgec.calibration.text import ORIGIN

        prompts = [text.take(i * batch, batch, total) for i in range(n)]
        origin = f"prefill prompts of {ORIGIN} (empty KV cache)"
    else:  # a VLM's decoder runs text tokens only: never its image placeholder
        high = min(gen["vocab"], (gen.get("vision") or {}).get("image_token_id", gen["vocab"]))
        rng = np.random.default_rng(1000)
        prompts = [rng.integers(0, high, (batch, total)) for _ in range(n)]
    past = [p for p in gen["past"] if p in src.feeds]  # a prefill-only graph takes none
    out = []
    for ids in prompts:
        b, s = ids.shape
        empty = np.zeros((b, gen["kv_heads"], 0, gen["head_dim"]), np.float32)
        out.append({"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, s), np.int64),
                    "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
                    **dict.fromkeys(past, empty)})
    return out, origin


def _static_decoder_samples(src, gen, n: int, skip: int = 0
                            ) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds for a static-cache graph as generation runs it: sample i has its first ``start``
    buffer slots filled with the model's own keys/values of a random prefix (``start`` spread
    over the whole context: every tensor is quantized on the NPU, the RoPE angles (position ×
    frequency) included), then ``tokens`` new tokens at positions ``start`` on. The buffer was
    all zeros and masked: the past inputs were calibrated to [0, 1e-4], and the quantized graph
    read every cached key and value as zero (an HF LLaMA's NPU tokens diverged from the second
    one on; the held-out floor, measured on the same empty buffers, said 0.9996).

    A VLM's language graph is filled the same way, from text prompts (its tokens had
    diverged from the second on, as the LLaMA's). Without the PyTorch decoder (the pruned
    VLM's scored decoder) the buffer stays empty, as before. The first ``skip`` samples are
    left out unmade (a PyTorch prefill each: the floor's held-out samples follow 128 of an NPU
    decode graph's calibration samples).

    A checkpoint with a tokenizer: prompt j is the j-th of its text windows (``calibration.text``)
    of a whole context; its first ``start`` tokens fill the buffer, the next ``tokens`` are the
    sample's (at ``start`` 0 the prompt's beginning, BOS and all). Else random ids."""
    batch, tokens = src.feeds["input_ids"].shape
    context = src.feeds["attention_mask"].shape[1]
    past_len = context - tokens
    module = getattr(src, "decoder_module", None)
    text = _text_prompts(src, gen, batch)
    rng = np.random.default_rng(1000)
    empty = np.zeros_like(src.feeds[gen["past"][0]])
    starts = np.linspace(0, past_len, n).astype(np.int64)
    prefixes: dict[int, list[np.ndarray]] = {}  # one PyTorch prefill per prompt
    out = []
    for i, start in enumerate(starts):
        ids = rng.integers(0, gen["vocab"], (batch, tokens)).astype(np.int64)
        if i < skip:  # drawn all the same: sample i's tokens do not depend on skip
            continue
        j = i % PREFIX_PROMPTS
        if text is not None:  # prompt j's text: its first ``start`` tokens cached, then these
            ids = text.take(j * batch, batch, context)[:, start:start + tokens]
        mask = np.zeros((batch, context), np.int64)
        mask[:, past_len:] = 1
        past = dict.fromkeys(gen["past"], empty)
        if module is not None and start:
            if j not in prefixes:
                prefixes[j] = _filled_buffer(module, gen, batch, past_len, seed=j, text=text,
                                              context=context)
            past = dict(zip(gen["past"], _first_slots(prefixes[j], int(start))))
            mask[:, :start] = 1
        out.append({"input_ids": ids, "attention_mask": mask,
                    "position_ids": np.broadcast_to(start + np.arange(tokens, dtype=np.int64),
                                                    (batch, tokens)).copy(), **past})
    origin = ("prompts after a KV buffer the model filled" if module is not None
              else "prefill prompts (empty KV cache)")
    if text is not None:
        from edgec.calibration.text import ORIGIN

        origin = f"{origin}, {ORIGIN}"
    return out, origin


def _first_slots(buffers: list[np.ndarray], filled: int) -> list[np.ndarray]:
    """A full buffer's first ``filled`` slots, the rest zeroed: a causal decoder's keys and
    values of a prompt's first tokens do not depend on the tokens after them."""
    out = []
    for b in buffers:
        b = b.copy()
        b[:, :, filled:] = 0
        out.append(b)
    return out


def _filled_buffer(module, gen, batch: int, past_len: int, seed: int,
                   text: TextWindows | None = None, context: int = 0) -> list[np.ndarray]:
    """The decoder's keys/values for a prompt filling a buffer of ``past_len`` slots
    (``_first_slots`` cuts it to a shorter prompt's): the ``seed``-th of the checkpoint's text
    windows of ``context`` tokens, else random ids."""
    import torch

    from edgec.exporters.decoder import DecoderInfo, _prefilled

    info = DecoderInfo.from_json(gen)
    if text is None:
        prefix = np.random.default_rng((2000, seed)).integers(0, gen["vocab"], (batch, past_len))
    else:
        prefix = text.take(seed * batch, batch, context)[:, :past_len]
    return [t.numpy() for t in _prefilled(module, info, torch.as_tensor(prefix), past_len)]


def _hf_samples(src, n: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """A checkpoint's samples: windows of real text (``calibration.text``) where it ships a
    tokenizer, else random ids; each row with a random amount of right padding (so the
    attention-mask path sees both masked and unmasked keys)."""
    from edgec.calibration.text import ORIGIN, checkpoint_text

    ids, mask = src.feeds["input_ids"], src.feeds["attention_mask"]
    vocab = int(src.info.get("vocab_size") or ids.max() + 1)
    text = checkpoint_text(src, vocab)
    batch, seq = ids.shape
    rng = np.random.default_rng(1000)
    out = []
    for i in range(n):
        tokens = rng.integers(0, vocab, size=ids.shape)
        keep = [seq - int(rng.integers(0, seq // 2 + 1)) for _ in range(batch)]
        keep = [max(k, 1) for k in keep]  # at least one real token per row
        if text is not None:
            tokens = np.stack([text.padded(row, k) for row, k in
                               zip(text.take(i * batch, batch, seq), keep)])
        m = np.zeros_like(mask)
        for row, k in enumerate(keep):
            m[row, :k] = 1
        out.append({"input_ids": tokens.astype(ids.dtype), "attention_mask": m})
    return out, (f"{ORIGIN}, with random padding" if text is not None
                 else "random tokens with random padding")


def _text_prompts(src, gen, batch: int) -> TextWindows | None:
    """The checkpoint's text (``calibration.text``) for a decoder's prompts; None for a
    registry model or a VLM (their own generators), or a checkpoint without a tokenizer."""
    if src.kind == "registry" or gen.get("vision"):
        return None
    from edgec.calibration.text import checkpoint_text

    return checkpoint_text(src, gen["vocab"])


def samples_for_model(samples: list[dict[str, np.ndarray]], model,
                      bindings: Sequence[tuple[str, dict[str, np.ndarray]]] | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """Samples with a swappable-LoRA graph's adapter inputs bound: ``bindings``
    (``edgec.lora.binding.adapter_bindings``) in turn, sample i the (i mod n)-th, so the ranges
    cover every adapter the artifact ships as well as the base; none: zeros (the base). The
    adapter branches stay float either way, so any adapter can be swapped in later."""
    from edgec.lora.binding import lora_sites, site_feeds

    sites = lora_sites(model)
    if not sites:
        return samples
    bound = [feeds for _, feeds in bindings] if bindings else [site_feeds(sites, None)]
    return [{**bound[i % len(bound)], **x} for i, x in enumerate(samples)]

