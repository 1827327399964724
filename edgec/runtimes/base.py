"""Session: the one runtime interface (run, inputs, outputs, benchmark) every backend implements."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["IOSpec", "Session", "latency_stats"]


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """One graph input or output: name, shape (ints or dim names), numpy dtype name."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IOSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def as_array(value: Any) -> np.ndarray:
    """A feed as numpy; a torch tensor detached and on the CPU, bfloat16 (which numpy lacks) as
    float32: np.asarray raised torch's RuntimeError (requires_grad) or TypeError (bfloat16)."""
    torch = sys.modules.get("torch")  # a torch tensor means torch is imported already
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _check_not_empty(spec: Any, arr: np.ndarray) -> None:
    """Refuse size 0 on a dynamic dim: ids [0, 5] or [2, 0] ran on ORT and OpenVINO and
    returned outputs whose shapes the manifest does not describe (exit 0). A dim the model
    declares static 0 is checked as any static dim is; a KV cache (``past_*``) may be empty:
    past length 0 is a prefill."""
    if arr.size or spec.name.startswith("past"):
        return
    axis = next((i for i, (d, n) in enumerate(zip(spec.shape, arr.shape))
                 if n == 0 and not isinstance(d, int)), None)
    if axis is not None:
        raise UserError(f"input {spec.name!r} has shape {list(arr.shape)}: its dim "
                        f"{spec.shape[axis]!r} (axis {axis}) is 0; give at least one element "
                        "along every dynamic dim")


def _check_integers_fit(name: str, arr: np.ndarray, dtype: np.dtype) -> None:
    """Refuse integers the input's narrower dtype cannot hold: astype wrapped 2**32 + 3 to 3
    in an int32 input, past the index-bound check, and the model ran on id 3."""
    if not (arr.size and np.issubdtype(arr.dtype, np.integer)
            and np.issubdtype(dtype, np.integer)):
        return
    info, lo, hi = np.iinfo(dtype), arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise UserError(f"input {name!r} holds {lo if lo < info.min else hi}, which does not "
                        f"fit its dtype {dtype} ([{info.min}, {info.max}]); pass values in "
                        "that range")


def _check_floats_fit(name: str, arr: np.ndarray, dtype: np.dtype) -> None:
    """Refuse values a float input's narrower dtype cannot hold: a finite float beyond its range
    (1e30 into float16 became inf, the outputs all inf, with only numpy's RuntimeWarning), and
    an integer beyond the range where it holds every integer exactly (±2**24 in float32: an
    int64 id 2**24 + 1 ran as 2**24)."""
    if not (arr.size and np.issubdtype(dtype, np.floating)):
        return
    info = np.finfo(dtype)
    if np.issubdtype(arr.dtype, np.floating) and np.finfo(arr.dtype).max > info.max:
        finite = arr[np.isfinite(arr)]
        worst = finite[np.argmax(np.abs(finite))] if finite.size else 0
        if abs(worst) > info.max:
            raise UserError(f"input {name!r} holds {worst:g}, which does not fit its dtype "
                            f"{dtype} (finite up to ±{float(info.max):g}); pass values in that "
                            "range")
    elif np.issubdtype(arr.dtype, np.integer):
        exact = 2 ** (info.nmant + 1)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -exact or hi > exact:
            raise UserError(f"input {name!r} holds {lo if lo < -exact else hi}, which its dtype "
                            f"{dtype} cannot hold exactly (integers up to ±{exact}); pass "
                            f"{dtype} values, or integers in that range")


def check_shared_dims(specs, feeds: Mapping[str, np.ndarray], where: str = "") -> None:
    """Refuse feeds that give one named dim (``seq``) of ``specs`` different sizes (``where``:
    what to say first, as "FILE: sample 3: ")."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for dim, size in zip(spec.shape, np.shape(feeds[spec.name])):
            if not isinstance(dim, str) or dim in ("?", "None"):  # "None": unnamed (an
                # artifact compiled before dim_label)
                continue
            first, first_size = seen.setdefault(dim, (spec.name, size))
            if first_size != size:
                raise UserError(f"{where}inputs {first!r} and {spec.name!r} share dim {dim!r} "
                                f"but have sizes {first_size} and {size}; give both the same "
                                f"{dim}")


def latency_stats(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "iterations": len(ms),
    }


def check_runs(warmup: Any, iterations: Any) -> None:
    """A benchmark's run counts: ``iterations`` ≥ 1 timed runs after ``warmup`` ≥ 0."""
    for name, value, least in (("warmup", warmup, 0), ("iterations", iterations, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise UserError(f"{name} must be an integer ≥ {least}, not {value!r}")


def _one_generation_at_a_time(generate):
    """Threads take turns generating on one session (one cache, one OpenVINO state: it raised
    "Infer Request is busy"); a call from inside the generation (a streamer) is refused."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        busy = self._busy()
        if self._generating_here():
            raise UserError("generate() was called while this session generates (from a "
                            "streamer?); use a second session, edgec.load(DIR)")
        with busy[0], self._holding_runtime():
            busy[1] = threading.get_ident()
            try:
                return generate(self, *args, **kwargs)
            finally:
                busy[1] = busy[2] = None

    return wrapper


class Session(abc.ABC):
    """A loaded model on one runtime."""

    runtime: str = ""
    # What the runtime raises when it cannot run a graph on feeds that passed every check (a
    # size the model cannot take): most likely the input's, so a UserError with its last line.
    input_errors: tuple[type[Exception], ...] = (RuntimeError, ValueError)
    # Set where the runtime simulates the target device on this machine (the HTP emulator on
    # x86_64): what it computes is the device's, its run times are not.
    emulator: str | None = None
    # the latest generate()'s and sample()'s stats; None before the first (was AttributeError)
    last_generation: dict[str, Any] | None = None
    last_sampling: dict[str, Any] | None = None

    @classmethod
    @abc.abstractmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> Session:
        """Open the artifact under ``root`` whose manifest ``runtime`` entry names this runtime
        (``model``: the file to load, relative to ``root``; ``config``: session options)."""

    def __init__(self, inputs: list[IOSpec], outputs: list[IOSpec]):
        self._inputs = inputs
        # a graph listing one output twice: run() returns it once (a dict), so list it once
        self._outputs = list({o.name: o for o in outputs}.values())
        self.default_feeds: dict[str, np.ndarray] | None = None
        self._lora = None  # edgec.lora.binding.AdapterBank of a swappable-LoRA artifact

    def name_dims(self, manifest: Mapping[str, Any]) -> None:
        """Give dynamic dims the manifest's names (the ONNX graph's, as ORT reports them):
        OpenVINO has no dim names and made up one per input (``latent_0``), so its specs and
        error messages disagreed with ORT's and the manifest's (``batch``)."""
        declared = {d["name"]: d["shape"]
                    for d in (*manifest.get("inputs", ()), *manifest.get("outputs", ()))}

        def named(spec: IOSpec) -> IOSpec:
            dims = declared.get(spec.name)
            if dims is None or len(dims) != len(spec.shape):
                return spec
            return dataclasses.replace(spec, shape=tuple(
                d if isinstance(d, int) or not isinstance(m, str) or m in ("?", "None") else m
                for d, m in zip(spec.shape, dims)))

        self._inputs = [named(i) for i in self._inputs]
        self._outputs = [named(o) for o in self._outputs]

    @property
    def inputs(self) -> list[IOSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[IOSpec]:
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None,
            adapter: str | Mapping[str, float] | None = None,
            **named: np.ndarray) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array of the input's dtype (or is a
        list/tuple of arrays in ``inputs`` order, or one array for a one-input model; or give
        them as keywords, ``run(x=..., ids=...)``); none: the artifact's example inputs.

        ``adapter``: a swappable-LoRA artifact's adapter name (``"base"``: none), or a weighted
        blend of loaded ones (``{"style": 0.7, "subject": 0.5}``, ``"style:0.7,subject:0.5"``);
        default the active one (``adapters``, ``active_adapter``, ``load_adapter``).
        """
        if self._generating_here():
            raise UserError("run() was called while this session generates (from a streamer?): "
                            "its cache is the generation's; use a second session, "
                            "edgec.load(DIR)")
        feeds = self._adapter_feeds(self._check_feeds(self._as_feeds(feeds, named, adapter)),
                                    adapter)
        return self._run_checked(feeds)

    def _run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._run(feeds)
        except self.input_errors as e:  # the runtime rejected these inputs
            raise UserError(f"{self.runtime} could not run the model on these inputs: "
                            f"{_last_line(e)}") from e

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def benchmark(self, warmup: int = 3, iterations: int = 20,
                  feeds: Mapping[str, np.ndarray] | None = None,
                  adapter: str | Mapping[str, float] | None = None) -> dict[str, Any]:
        """Latency over ``iterations`` runs after ``warmup`` runs (p50/p90/mean/min ms), and
        ``emulator`` where the runtime simulates the device (its times are not the device's)."""
        check_runs(warmup, iterations)
        feeds = self._adapter_feeds(self._check_feeds(self._as_feeds(feeds, {}, adapter)),
                                    adapter)
        for _ in range(warmup):
            self._run_checked(feeds)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            self._run_checked(feeds)  # (a bad input was an internal error here, exit 1)
            times.append(time.perf_counter() - t0)
        stats: dict[str, Any] = latency_stats(times)
        if self.emulator:  # `edgec bench --json` had it, Python's benchmark() did not
            stats["emulator"] = self.emulator
        return stats

    # Sampling: a diffusion artifact (its manifest has a ``sampling`` entry).
    def sample(self, conditions=None, *, steps: int | None = None,
               guidance: float | None = None, seed: int = 0, dense_steps: int | None = None,
               callback=None, noise=None, guidance_mode: str = "auto",
               negative=None, prompt=None, negative_prompt=None,
               text_encoder=None, vae=None, dynamic_cfg: bool = False,
               solver: str | None = None) -> dict[str, np.ndarray]:
        """Run the model's sampler from noise (flow-matching Euler, DDIM x0 or v, or the sub-VP
        SDE) with classifier-free guidance (``negative``: the unconditional half's conditions,
        default zeros; ``prompt``/``negative_prompt`` with ``text_encoder``, a loaded
        text-encoder artifact: CogVideoX / Wan embeddings as their pipelines make them); the
        final samples by input name (and ``"video"``, frames decoded by ``vae``). See
        ``edgec.runtimes.sampling.sample``; timings land in ``last_sampling``."""
        from edgec.runtimes.sampling import sample

        return sample(self, conditions, steps=steps, guidance=guidance, seed=seed,
                      dense_steps=dense_steps, callback=callback, noise=noise,
                      guidance_mode=guidance_mode, negative=negative, prompt=prompt,
                      negative_prompt=negative_prompt, text_encoder=text_encoder, vae=vae,
                      dynamic_cfg=dynamic_cfg, solver=solver)

    # Generation: a KV-cache decoder artifact (compiled with --generate).
    @property
    def tokenizer(self):
        """The tokenizer the artifact ships from its checkpoint (``encode(text)``,
        ``encode_chat(messages)``, ``decode(ids)``, ``chat_template``); a UserError where it
        ships none."""
        from edgec.runtimes.tokenizer import Tokenizer

        if self.__dict__.get("_tokenizer") is None:
            if getattr(self, "root", None) is None:
                raise UserError("this session was not loaded from an artifact directory, so it "
                                "has no tokenizer; open it with edgec.load(DIR)")
            self._tokenizer = Tokenizer(Path(self.root), getattr(self, "manifest", None) or {})
        return self._tokenizer

    def generate_text(self, prompt, max_new_tokens: int = 32, *, on_text=None,
                      **options) -> str | list[str]:
        """The new text for ``prompt``: text, or a chat (``[{"role": "user", "content":
        "Hi"}]``, put through the checkpoint's chat template as transformers'
        ``apply_chat_template(..., add_generation_prompt=True)`` does), or a list of them (a
        left-padded batch: a list of texts back). Special tokens, the EOS and what follows it
        are left out. ``on_text(piece)`` receives one prompt's text as it is generated;
        ``options`` are ``generate``'s (``do_sample``, ``temperature``, ``seed``, ``image``, …)
        and ``last_generation`` holds the timings as after ``generate``."""
        from edgec.runtimes.text import generate_text

        return generate_text(self, prompt, max_new_tokens, on_text, options)

    def chat(self, system: str | None = None, max_new_tokens: int = 256, **options):
        """A multi-turn conversation (``edgec.runtimes.conversation.Conversation``):
        ``say(text, on_text=None) -> answer``, ``messages``, ``reset()``; each turn is
        ``generate_text`` on the turns so far, the oldest dropped where they and the answer
        would pass the model's context. ``options`` are ``generate``'s."""
        from edgec.runtimes.conversation import Conversation

        return Conversation(self, system, max_new_tokens, **options)

    @_one_generation_at_a_time
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, *,
                 do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, seed: int | None = None,
                 streamer=None, kv_retrieval: bool = True,
                 sparse_prefill: bool = True, image=None,
                 adapter: str | Mapping[str, float] | None = None,
                 _prompt_cache=None) -> np.ndarray:
        """Prompt followed by the new tokens, [batch, seq + new] int64, as Hugging Face's
        ``generate`` returns them. ``input_ids`` [batch, seq] (left-padded, with
        ``attention_mask``, for prompts of different lengths); ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty`` left out (None) are the checkpoint's
        generation_config.json's, else transformers' defaults (top_k 50), as HF's ``generate``
        takes them; an artifact without one (the reference model) decodes greedily with no
        top-k, penalty or temperature; ``last_generation["settings"]`` and ``["settings_from"]``
        say which values ran and where they came from;
        ``eos_token_id`` an id or a list (default the checkpoint's); ``streamer(tokens)`` is
        called with each step's new tokens [batch]. Timings land in ``last_generation``
        (prefill ms = time to first token, decode tokens/s). An artifact compiled with
        ``--kv-retrieval`` decodes with FreeKV (``kv_retrieval=False``: full attention); its
        retrieval stats land in ``last_generation["kv_retrieval"]``. An artifact compiled with
        ``--generate --sparse-attention`` runs prompts of at least ``min_seq`` tokens through its
        block-sparse prefill graph (``sparse_prefill=False``: the dense decoder);
        ``last_generation["prefill_graph"]`` says which ran. ``image`` (a VLM artifact): an
        image file, an .npy or an array of pixel values [3, H, W] or [batch, 3, H, W]; the
        prompt gets the image's placeholder tokens where it has none (or one, LLaVA's
        ``<image>``), and the returned rows hold them. ``adapter``: a swappable-LoRA artifact's
        adapter or blend for this call only, as in ``run`` (default the active one)."""
        from edgec.runtimes.generation import (
            GenerationConfig,
            check_context,
            decoding_settings,
            generate,
            resolve_settings,
        )

        info = self.decoder_info
        settings, sources = resolve_settings(
            info, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty)
        applied = decoding_settings(settings, sources)
        # refuses bad options before the caches below are sized by them
        GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, seed=seed,
                         **applied)
        if adapter is not None:
            self._lora_bank().feeds(adapter)  # refuses an unknown name or blend up front
        # every step's feeds read it (``_adapter_feeds``); other threads keep the active one
        self._busy()[2] = adapter
        if np.ndim(input_ids) not in (1, 2):
            raise UserError(f"input_ids must be token ids [batch, seq] (or [seq]), got shape "
                            f"{list(np.shape(input_ids))}")
        vision = None
        if image is not None:
            input_ids, attention_mask, vision = self._with_image(image, input_ids, attention_mask)
        else:
            self._refuse_image_placeholder(input_ids)
        shape = np.shape(input_ids)
        batch, length = (1, shape[0]) if len(shape) == 1 else shape[:2]
        # before the caches below are sized by it (a huge -n was a MemoryError allocating them)
        check_context(info, length, max_new_tokens)
        # a conversation's cache (``_prompt_cache``, Session.chat): the turns it holds already
        # are not prefilled again, where nothing ran on this session between the two turns and
        # the adapter is the same
        count = self.__dict__.get("_generations", 0)
        stamp = (count, repr(adapter), repr(self.active_adapter))
        capacity, limit = length + max_new_tokens, info.context or info.max_positions
        cache, cached = (None, 0) if _prompt_cache is None or vision is not None else \
            _prompt_cache.resume(np.asarray(input_ids).reshape(batch, length), stamp, capacity,
                                 limit)
        self._generations = count + 1
        retrieval = (self._retrieval_cache(info, batch, capacity)
                     if kv_retrieval and cache is None else None)
        if cache is None:
            cache = retrieval if retrieval is not None else self._kv_cache(
                info, batch, capacity if _prompt_cache is None else _prompt_cache.capacity(
                    capacity, limit))
            cache = (self._vision_prefill(cache, info, vision) if vision is not None else
                     self._prefill_first(cache, info, length, sparse_prefill))
        ids, stats = generate(
            self, info, input_ids, attention_mask, cache=cache, cached=cached,
            streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, seed=seed, **applied)
        if _prompt_cache is not None and retrieval is None and vision is None:
            _prompt_cache.keep(cache, ids, (count + 1, *stamp[1:]))
        stats["settings"], stats["settings_from"] = settings, sources
        ignored = (info.generation_config or {}).get("not_applied")
        if ignored:  # transformers' generate() would apply them: the tokens may differ
            stats["not_applied"] = dict(ignored)
        if retrieval is not None:
            stats["kv_retrieval"] = dict(retrieval.stats)
        from edgec.runtimes.generation import SparsePrefill

        # (an NPU's static cache has a ``prefill`` method too: it read as "sparse")
        stats["prefill_graph"] = ("vision" if vision is not None else "sparse"
                                  if isinstance(cache, SparsePrefill) else "dense")
        if vision is not None:
            stats.update(cache.stats)
        self.last_generation = stats
        return ids

    def _busy(self) -> list:
        """[lock, the generating thread's id or None, the generation's adapter or None], one per
        session (made on first use)."""
        return self.__dict__.setdefault("_generation_lock", [threading.Lock(), None, None])

    def _holding_runtime(self):
        """Held through a whole ``generate``, for state the generation keeps in the runtime
        between steps that a run from another thread would overwrite (OpenVINO's variables)."""
        return contextlib.nullcontext()

    def _generating_here(self) -> bool:
        return self._busy()[1] == threading.get_ident()

    def _with_image(self, image, input_ids, attention_mask):
        """(prompt ids and mask with the image's placeholders, pixel values)."""
        from edgec.runtimes.vision import expand_prompt, load_pixels

        entry = (getattr(self, "manifest", None) or {}).get("generation", {}).get("vision")
        if not entry:
            raise UserError("this artifact has no image encoder; compile a vision-language "
                            "model (`vlm` or a LLaVA checkpoint) with --generate")
        ids, mask = expand_prompt(input_ids, attention_mask, entry)
        return ids, mask, load_pixels(image, entry)

    def _refuse_image_placeholder(self, input_ids) -> None:
        """A VLM prompt with image placeholder tokens needs the image (the decoder would read
        the placeholders' embeddings as text: nonsense; Hugging Face refuses too)."""
        entry = (getattr(self, "manifest", None) or {}).get("generation", {}).get("vision")
        token = entry and entry.get("image_token_id")
        if token is not None and (np.asarray(input_ids) == token).any():
            raise UserError(f"the prompt has an image placeholder (<image>, token id {token}); "
                            "give the image with --image (Python: image=)")

    def _vision_prefill(self, cache, info, pixels):
        """``cache`` behind a VLM artifact's image encoder and prefill graph (``VisionPrefill``),
        with its text budget (text_keep < 1) and its static prompt length (an NPU)."""
        from edgec.runtimes.vision import TextBudget, VisionPrefill

        gen = self.manifest["generation"]
        pruning = gen["vision"].get("pruning") or {}
        budget = (TextBudget(pruning["text_keep"], pruning["recent"])
                  if gen.get("attention_scores") and pruning.get("text_keep", 1.0) < 1 else None)
        length = self.manifest["runtime"]["prefill"].get("prompt_tokens")
        static = (length, gen["vision"]["image_token_id"]) if length else None
        return VisionPrefill(cache, *self._vision_sessions(), info, pixels, budget, static)

    def _vision_sessions(self):
        """(the VLM prefill session, the image encoder session), opened once."""
        if getattr(self, "vision_sessions", None) is None:
            from edgec.runtimes import open_session

            runtime = self.manifest["runtime"]
            self.vision_sessions = (open_session(self.root, runtime["prefill"]),
                                    open_session(self.root, runtime["vision"]))
        return self.vision_sessions

    def _prefill_first(self, cache, info, prompt_tokens: int, sparse_prefill: bool):
        """``cache`` behind the artifact's sparse-attention prefill graph when it has one, the
        prompt is at least its ``min_tokens`` long and the cache can be loaded; else ``cache``."""
        entry = ((getattr(self, "manifest", None) or {}).get("runtime") or {}).get("prefill")
        if (not sparse_prefill or not entry or entry.get("kind") == "vlm"
                or prompt_tokens < entry.get("min_tokens", 0)
                or not hasattr(cache, "load_prompt")):
            return cache
        from edgec.runtimes.generation import SparsePrefill

        if getattr(self, "prefill_session", None) is None:
            from edgec.runtimes import open_session

            self.prefill_session = open_session(self.root, entry)
        return SparsePrefill(cache, self.prefill_session, info)

    def _retrieval_cache(self, info, batch: int, capacity: int):
        """The FreeKV cache of an artifact compiled with --kv-retrieval, else None."""
        if not (getattr(self, "manifest", None) or {}).get("kv_retrieval"):
            return None
        from edgec.runtimes.freekv import freekv_cache_for

        return freekv_cache_for(self, self.root, info, batch, capacity=capacity)

    @property
    def decoder_info(self):
        """The artifact's KV-cache decoder description (``DecoderInfo``)."""
        from edgec.exporters.decoder import DecoderInfo

        entry = (getattr(self, "manifest", None) or {}).get("generation")
        if not entry:
            raise UserError("this artifact has no KV cache, so it cannot generate; compile it "
                            "with --generate (Python: generate=True)")
        info = DecoderInfo.from_json(entry)
        if "generation_config" not in entry and getattr(self, "root", None) is not None:
            # compiled before the manifest held it: the checkpoint's file shipped beside it
            from edgec.exporters.decoder import file_generation_settings

            shipped = Path(self.root) / "generation_config.json"
            info = dataclasses.replace(info, generation_config=file_generation_settings(
                self.root) if shipped.is_file() else None)
        return info

    def _kv_cache(self, info, batch: int, capacity: int):
        """A fresh cache for one ``generate`` call of ``batch`` sequences of at most
        ``capacity`` tokens: arrays passed in and out by default."""
        from edgec.runtimes.generation import ArrayCache

        return ArrayCache(self, info, batch)

    # Swappable LoRA: the adapter inputs are bound here, not passed by the caller.
    def attach_adapters(self, spec: Mapping[str, Any], root) -> None:
        from edgec.lora.binding import AdapterBank

        self._lora = AdapterBank(spec, root)
        self._inputs = [i for i in self._inputs if i.name not in self._lora.input_names]

    def share_adapters(self, other: Session) -> None:
        """Bind ``other``'s swappable-LoRA adapters here too (a companion graph of the same
        artifact: the sampler's dense graph), following its active adapter."""
        if other._lora is not None:
            self._lora = other._lora
            self._inputs = [i for i in self._inputs if i.name not in self._lora.input_names]

    @property
    def adapters(self) -> list[str]:
        """Adapter names this session can run (``base`` = no adapter); empty if not swappable."""
        return self._lora.names if self._lora is not None else []

    @property
    def active_adapter(self) -> str | dict[str, float] | None:
        """The adapter runs use when none is named: a name, or a blend's weights by name."""
        return self._lora.active if self._lora is not None else None

    @active_adapter.setter
    def active_adapter(self, spec: str | Mapping[str, float]) -> None:
        """A loaded adapter's name, or a weighted blend of loaded ones (``{"style": 0.7,
        "subject": 0.5}`` or ``"style:0.7,subject:0.5"``: Σ wᵢ·ΔWᵢ, as PEFT's weighted merge)."""
        from edgec.lora.binding import blend_spec

        self._lora_bank().feeds(spec)  # validates the names and weights
        self._lora.active = blend_spec(spec)

    def load_adapter(self, path, name: str | None = None) -> str:
        """Read a PEFT adapter directory or a diffusers LoRA file and make it runnable by name
        (no recompilation)."""
        return self._lora_bank().load(path, name)

    def _lora_bank(self):
        if self._lora is None:
            raise UserError("this artifact has no swappable LoRA adapters; compile it with "
                            "--lora DIR --lora-mode swappable")
        return self._lora

    def _adapter_feeds(self, feeds: dict[str, np.ndarray],
                       adapter: str | Mapping[str, float] | None):
        if self._lora is None:
            if adapter is not None:
                self._lora_bank()
            return feeds
        if adapter is None and self._generating_here():
            adapter = self._busy()[2]  # generate(adapter=...): this call's, else the active one
        return {**feeds, **self._lora.feeds(adapter)}

    def _require_default_feeds(self) -> dict[str, np.ndarray]:
        if self.default_feeds is None:
            raise UserError("no inputs given and the artifact has no example inputs; pass a "
                            f"dict keyed by the input names {[i.name for i in self._inputs]}")
        return self.default_feeds

    def _as_feeds(self, feeds: Any, named: Mapping[str, Any], adapter: Any
                  ) -> Mapping[str, Any]:
        """``run``'s feeds as a dict by input name: a list/tuple (or one array) in input order,
        keywords, or the example inputs when none are given. ``run([x, ids])``, ``run(x, ids)``,
        ``run(x=...)`` and ``run(None)`` were raw TypeErrors (unhashable ndarray, ...)."""
        names = [i.name for i in self._inputs]
        if adapter is not None and not isinstance(adapter, (str, Mapping)):
            raise UserError(f"adapter must be an adapter name or a blend, not "
                            f"{type(adapter).__name__}; pass the inputs as one dict (or list in "
                            f"input order {names}): run([a, b]), not run(a, b)")
        if named:
            if feeds is not None:
                raise UserError("give the inputs either as one dict or as keywords, not both")
            return named
        if feeds is None:
            return self._require_default_feeds()
        if isinstance(feeds, Mapping):
            return feeds
        if isinstance(feeds, np.ndarray) and len(names) == 1:
            return {names[0]: feeds}
        if isinstance(feeds, (list, tuple)):
            if len(feeds) != len(names):
                raise UserError(f"got {len(feeds)} arrays, the model takes {len(names)} inputs "
                                f"{names}; give one per input in that order, or a dict by name")
            return dict(zip(names, feeds))
        raise UserError(f"feeds must be a dict keyed by the input names {names} (or a list of "
                        f"arrays in that order), not {type(feeds).__name__}")

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = {i.name for i in self._inputs}
        odd = next((k for k in feeds if not isinstance(k, str)), None)
        if odd is not None:  # a tensor as a key: the message printed all of it
            raise UserError(f"inputs are keyed by input name {sorted(names)}, not by "
                            f"{type(odd).__name__}")
        extra = sorted(set(feeds) - names)
        missing = sorted(names - set(feeds))
        if extra or missing:
            wrong = "; ".join(part for part in (
                f"missing {missing}" if missing else "", f"unknown {extra}" if extra else "")
                if part)
            raise UserError(f"inputs do not match the model: {wrong}; the model takes "
                            f"{sorted(names)}")
        out = {}
        for spec in self._inputs:
            arr = as_array(feeds[spec.name])
            if arr.dtype != np.dtype(spec.dtype):
                if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                    _check_integers_fit(spec.name, arr, np.dtype(spec.dtype))
                    _check_floats_fit(spec.name, arr, np.dtype(spec.dtype))
                    arr = arr.astype(spec.dtype)
                else:
                    raise UserError(f"input {spec.name!r} has dtype {arr.dtype}, the model "
                                    f"wants {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)
            ):
                raise UserError(f"input {spec.name!r} has shape {list(arr.shape)}, the model "
                                f"wants {list(spec.shape)}" + self._fixed_shape_note())
            _check_not_empty(spec, arr)
            out[spec.name] = np.require(arr, requirements="C")  # keeps 0-d (scalar) inputs
        self._check_dims(out)
        declared = (getattr(self, "manifest", None) or {}).get("inputs", ())
        if any("dim_ranges" in i for i in declared):  # sizes its graph gets wrong or fails on
            from edgec.exporters.dim_ranges import check_ranges

            check_ranges(out, declared)
        bounds = {i["name"]: i for i in declared if "index_bound" in i}
        if bounds:
            from edgec.exporters.index_inputs import check_indices

            check_indices(out, bounds)
        return out

    def _check_dims(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Refuse inputs that give one named dim (``batch``) different sizes, and a decoder's
        attention_mask that does not cover its past + new tokens: runtimes failed on these with
        their own errors, or (OpenVINO) computed wrong outputs. Dim names are the manifest's
        (``name_dims``, at load)."""
        manifest = getattr(self, "manifest", None) or {}
        check_shared_dims(self._inputs, feeds)
        gen = manifest.get("generation") or {}
        past = (gen.get("past") or [None])[0]
        ids, mask = feeds.get("input_ids"), feeds.get("attention_mask")
        if (gen.get("context") or past not in feeds or ids is None or mask is None
                or ids.ndim != 2 or mask.ndim != 2 or feeds[past].ndim != 4):
            return
        held, new = feeds[past].shape[2], ids.shape[1]
        if mask.shape[1] != held + new:
            raise UserError(f"input 'attention_mask' has length {mask.shape[1]}, but {past!r} "
                            f"holds {held} past tokens and 'input_ids' {new} new; the mask "
                            f"must cover past + new = {held + new} tokens")

    def _fixed_shape_note(self) -> str:
        """Why a sparse-attention artifact's inputs are static where its source was dynamic:
        the rewrite baked the token grid (and prefix) in (its stats' ``static_dims``)."""
        passes = (getattr(self, "manifest", None) or {}).get("passes") or []
        stats = next((p.get("stats") or {} for p in passes
                      if p.get("name") == "sparse-attention"), {})
        if not stats.get("static_dims") or not (stats.get("config") or {}).get("grid"):
            return ""
        cfg = stats["config"]
        what = [f"a {'x'.join(map(str, cfg['grid']))} token grid"]
        what += [f"{cfg[k]} {name} tokens" for k, name in (("prefix", "prefix"), ("tail", "tail"))
                 if cfg.get(k)]
        dims = ", ".join(f"{k}={v}" for k, v in stats["static_dims"].items())
        return (f": its sparse attention was compiled for {' and '.join(what)} ({dims}); "
                "recompile it for the shape you need, or use an artifact without "
                "--sparse-attention")
