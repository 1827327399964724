"""FreeKV retrieval for decoding on CPU runtimes: the wrapper-side cache and its options.

Prefill runs through the artifact's standard KV-cache graph; its keys/values are then copied
once into fixed buffers [B, kv_heads, T, head_dim], each row left-aligned (a left-padded row's
padding dropped, so slot 0 is its first real token and its pages, sink and budget are those of
the prompt alone), and summarized per page (per-channel min/max
keys). Each decode step runs the FreeKV graph (``edgec.exporters.freekv_decoder``): it reads
only the budget's pages out of the buffers and returns the new token's key/value, which this
wrapper writes in place, updating that one page's digest. Nothing here is O(context) per step,
so the runtime never copies the cache (ONNX Runtime and OpenVINO both read numpy inputs in
place). The selection rule is in ``edgec.exporters.freekv_decoder``'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import contained_path
from edgec.errors import UserError
from edgec.options import parse_options, split_spec
from edgec.runtimes.generation import check_cache_memory

__all__ = ["FreeKVConfig", "parse_kv_retrieval", "budget_covers_context", "FreeKVCache",
           "FixedBufferCache", "freekv_cache_for", "graph_config", "GRAPH_FILE", "DENSE_FILE",
           "FORCE_TAU", "METADATA_KEY"]

GRAPH_FILE = "freekv.onnx"
DENSE_FILE = "dense_buffers.onnx"
FORCE_TAU = 2.0  # cosine < 2 always: every head re-selects (first step: no previous query)
METADATA_KEY = "edgec.freekv"  # the graph's page layout (FreeKVConfig JSON) in its metadata


@dataclasses.dataclass(frozen=True)
class FreeKVConfig:
    """``--kv-retrieval freekv:budget=2048,page=32,sink=64,recent=256,tau=0.8``.

    budget: tokens attended per step and KV head (sink + retrieved pages + recent window).
    page: tokens per page (the unit of retrieval and of the min/max key digests).
    sink: leading tokens always attended; recent: the trailing window always attended, in
        whole pages ending with the page being filled (so recent ≥ page): recent − page to
        recent − 1 cached tokens, as that page fills.
    tau: per KV head, when the group-mean cosine of this step's query and the previous one
        falls below tau, the head re-selects its pages with the current query (correction);
        otherwise it uses the pages the previous query chose (speculative); -1 never corrects,
        1 always does (plain Quest). A runtime input of the graph: it changes without a rebuild.
    """

    budget: int = 2048
    page: int = 32
    sink: int = 64
    recent: int = 256
    tau: float = 0.8

    def __post_init__(self):
        what = "--kv-retrieval freekv"
        if self.page < 1 or self.sink < 0 or self.recent < self.page:
            raise UserError(f"{what}: page must be ≥ 1, sink ≥ 0 and recent ≥ page (the page "
                            f"being filled is in the recent window); got page={self.page}, "
                            f"sink={self.sink}, recent={self.recent}")
        bad = [f"{k}={v}" for k, v in (("budget", self.budget), ("sink", self.sink),
                                       ("recent", self.recent)) if v % self.page]
        if bad:
            raise UserError(f"{what}: {', '.join(bad)} must be multiples of page={self.page}")
        if self.budget < self.sink + self.recent + self.page:
            raise UserError(f"{what}: budget={self.budget} must be ≥ sink + recent + page = "
                            f"{self.sink + self.recent + self.page} (room for one retrieved "
                            "page)")
        if not -1 <= self.tau <= 1:
            raise UserError(f"{what}: tau={self.tau} must be in [-1, 1] (a cosine threshold)")

    @property
    def sink_pages(self) -> int:
        return self.sink // self.page

    @property
    def recent_pages(self) -> int:
        return self.recent // self.page

    @property
    def top_pages(self) -> int:
        """Pages retrieved per KV head each step."""
        return (self.budget - self.sink - self.recent) // self.page

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | FreeKVConfig | None) -> FreeKVConfig:
        return parse_options(cls, spec, "--kv-retrieval freekv")

    def to_json(self) -> dict[str, Any]:
        return {"method": "freekv", **dataclasses.asdict(self)}


def parse_kv_retrieval(raw: Any) -> FreeKVConfig | None:
    """``--kv-retrieval`` / ``kv_retrieval=``: ``"freekv"``, ``"freekv:k=v,..."``, a dict of
    FreeKV options, a ``FreeKVConfig``, True (defaults) or None/False (off)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return FreeKVConfig()
    if isinstance(raw, Mapping):  # {"method": "freekv", ...} as quantize takes {"scheme": ...}
        items = dict(raw)
        method = items.pop("method", "freekv")
        if method != "freekv":
            raise UserError(f"kv_retrieval method {method!r} is not known; use freekv")
        return FreeKVConfig.parse(items)
    if isinstance(raw, FreeKVConfig):
        return FreeKVConfig.parse(raw)
    method, _ = split_spec(str(raw), "--kv-retrieval", head=":")
    if method != "freekv":
        raise UserError(f"--kv-retrieval method {method!r} is not known; use "
                        "freekv:budget=2048,page=32,sink=64,recent=256,tau=0.8")
    return FreeKVConfig.parse(str(raw).partition(":")[2])


def budget_covers_context(config: FreeKVConfig, longest: int | None) -> str | None:
    """A warning where ``config``'s budget holds the longest context the artifact decodes
    (``longest``: its static cache or the model's positions): retrieval never starts, so FreeKV
    is full attention at every length and freekv.onnx stores the weights a second time for
    nothing (the compile said nothing). None where the budget is smaller or no limit is known."""
    if not longest or config.budget < longest:
        return None
    return (f"--kv-retrieval budget={config.budget} covers the whole context ({longest} tokens):"
            " FreeKV never retrieves and decodes as full attention; give a budget below the "
            "context, or drop --kv-retrieval (its decode graph stores the weights a second time)")


def graph_config(path: str | os.PathLike) -> FreeKVConfig:
    """The options a FreeKV graph was built with (its page layout is fixed in the graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        raise UserError(f"{path} is not a FreeKV decode graph (no {METADATA_KEY} metadata); "
                        "build it with edgec.exporters.freekv_decoder.build_freekv_graph")
    entry = json.loads(meta[METADATA_KEY])
    entry.pop("method", None)
    return FreeKVConfig.parse(entry)


def _open_standard(session, runtime: str | None):
    """An edgec Session, or a standard decoder .onnx opened on ``runtime``."""
    if not isinstance(session, (str, os.PathLike)):
        return session
    if runtime == "openvino":
        from edgec.runtimes.openvino import OpenVINOSession

        return OpenVINOSession(session)
    from edgec.runtimes.ort import OrtSession

    return OrtSession(session)


# ------------------------------------------------------------------------------ runners --

class _OrtGraph:
    """A fixed-buffer graph in ONNX Runtime; numpy inputs are read in place (no copy)."""

    def __init__(self, path: Path, config: Mapping[str, Any] | None):
        import onnxruntime as ort

        from edgec.runtimes.ort import session_options

        self._sess = ort.InferenceSession(str(path), sess_options=session_options(True, config),
                                          providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._sess.get_outputs()]
        self.inputs = [i.name for i in self._sess.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self._sess.run(self._names, feeds)))


class _OpenVINOGraph:
    """A fixed-buffer graph in OpenVINO (reads the .onnx itself); inputs shared, not copied."""

    def __init__(self, path: Path, config: Mapping[str, Any] | None, device: str = "CPU"):
        import openvino as ov

        # fp32 unless told otherwise: the CPU plugin would pick bf16 on AVX512-BF16/AMX parts
        config = {"INFERENCE_PRECISION_HINT": "f32", **(config or {})}
        self._compiled = ov.Core().compile_model(str(path), device, config)
        self._request = self._compiled.create_infer_request()
        self.inputs = [p.get_any_name() for p in self._compiled.inputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._request.infer(feeds, share_inputs=True)
        return {p.get_any_name(): np.array(res[p], copy=True) for p in self._compiled.outputs}


def _runner(runtime: str, path: Path, config: Mapping[str, Any] | None):
    if runtime in ("ort", "onnxruntime"):
        return _OrtGraph(path, config)
    if runtime == "openvino":
        return _OpenVINOGraph(path, config)
    raise UserError(f"FreeKV retrieval runs on ONNX Runtime and OpenVINO (ort-cpu, "
                    f"openvino-cpu), not on {runtime!r}")


# ------------------------------------------------------------------------------ caches --

class FixedBufferCache:
    """Decode over fixed KV buffers written in place; attends to every valid token.

    The fair full-attention baseline for FreeKV (the same buffers, no per-step copy) and the
    base of ``FreeKVCache``. ``step`` has the generation loop's contract: prefill (the first
    call, or any call with several tokens) through the standard graph ``session`` (an edgec
    Session), decode (one token) through ``graph`` (a .onnx path) on ``runtime``.
    """

    def __init__(self, session, graph: str | os.PathLike, info, batch: int, *,
                 runtime: str | None = None, runtime_config: Mapping[str, Any] | None = None,
                 capacity: int | None = None, prefill_chunk: int | None = None):
        if capacity:  # the buffers' first size (they grow past it)
            check_cache_memory(info, batch, capacity)
        session = _open_standard(session, runtime)
        self.session, self.info, self.batch = session, info, batch
        runtime = runtime or getattr(session, "runtime", "ort")
        if runtime_config is None:  # the artifact's own session options (no ORT spinning)
            manifest = getattr(session, "manifest", None) or {}
            runtime_config = (manifest.get("runtime") or {}).get("config")
        self._graph = _runner(runtime, Path(graph), runtime_config)
        if "cache_start" in self._graph.inputs:
            raise UserError(f"{graph} was built by an earlier edgec that counted FreeKV's sink "
                            "and pages from the buffer's first slot (padding in a left-padded "
                            "row); compile the artifact again")
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.length = 0  # tokens in the generation loop's sequence, padding included
        self.start = np.zeros(batch, np.int64)  # padding per row (dropped in the buffers)
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.stats: dict[str, Any] = {"decode_steps": 0, "prefill_tokens": 0}

    # -- generation-loop contract
    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if not self.keys or ids.shape[1] > 1:
            return self._prefill(ids, mask, positions)
        if not np.all(mask[:, self.length:] != 0):
            raise UserError("FreeKV decoding takes left-padded prompts only (the mask of new "
                            "tokens must be 1)")
        self._reserve(int(self.filled.max()) + 1)
        out = self._graph(self._feeds(ids, positions))
        self._append(out)
        self.stats["decode_steps"] += 1
        return out["logits"]

    def _prefill(self, ids, mask, positions) -> np.ndarray:
        """Through the standard graph (in chunks if asked), then buffers + digests filled."""
        info, done = self.info, self.length
        if done:
            raise UserError("FreeKV prefill continues an existing cache only one token at a "
                            "time; start a new cache for a new prompt")
        empty = np.zeros((ids.shape[0], info.kv_heads, 0, info.head_dim), np.float32)
        past = dict.fromkeys(info.past_names, empty)
        chunk = self.prefill_chunk or ids.shape[1]
        for lo in range(0, ids.shape[1], chunk):
            hi = min(lo + chunk, ids.shape[1])
            feeds = {"input_ids": ids[:, lo:hi], "attention_mask": mask[:, :hi],
                     "position_ids": positions[:, lo:hi], **past}
            out = self.session._run(self.session._adapter_feeds(feeds, None))
            past = {p: out[q] for p, q in zip(info.past_names, info.present_names)}
        pairs = [(past[info.past_names[2 * i]], past[info.past_names[2 * i + 1]])
                 for i in range(info.layers)]
        first = np.argmax(mask != 0, axis=1)
        self.load(pairs, start=first)
        self.stats["prefill_tokens"] = int(ids.shape[1])
        return out["logits"]

    def load_prompt(self, presents: list[np.ndarray], mask: np.ndarray) -> None:
        """Start from a prompt's keys/values computed elsewhere (the sparse prefill graph):
        ``presents`` key, value per layer [B, kv_heads, S, head_dim]."""
        self.load(list(zip(presents[::2], presents[1::2])), start=np.argmax(mask != 0, axis=1))
        self.stats["prefill_tokens"] = int(presents[0].shape[2])

    def load(self, pairs, start=None) -> None:
        """Fill the buffers from (key, value) per layer [B, kv_heads, L, head_dim] (a prefill's
        presents, or a cache computed elsewhere); ``start``: first non-padding slot per row.
        Each row is stored from slot 0 (its padding dropped)."""
        length = pairs[0][0].shape[2]
        self.start = (np.zeros(self.batch, np.int64) if start is None
                      else np.asarray(start, np.int64).reshape(self.batch))
        self.keys, self.values, self.length = [], [], 0
        self._reserve(length - int(self.start.min()) + 1)
        for i, (k, v) in enumerate(pairs):
            for row, first in enumerate(self.start):
                self.keys[i][row, :, :length - first] = k[row, :, first:]
                self.values[i][row, :, :length - first] = v[row, :, first:]
        self.length = length
        self._summarize(0, length - int(self.start.min()))

    @property
    def filled(self) -> np.ndarray:
        """Tokens in the buffers per row [B] (row b in slots [0, filled[b]))."""
        return self.length - self.start

    # -- buffers
    def _round(self, n: int) -> int:
        return n

    def _reserve(self, needed: int) -> None:
        """Buffers of at least ``needed`` slots; grown ×2 (amortized O(1) per token)."""
        have = self.keys[0].shape[2] if self.keys else 0
        if needed <= have:
            return
        size = self._round(max(needed, self.capacity or 0, 2 * have))
        shape = (self.batch, self.info.kv_heads, size, self.info.head_dim)
        for buffers in (self.keys, self.values):
            old = list(buffers) or [None] * self.info.layers
            buffers[:] = [np.zeros(shape, np.float32) for _ in range(self.info.layers)]
            for new, prev in zip(buffers, old):
                if prev is not None:
                    new[:, :, :have] = prev
        self._grown(size)

    def _grown(self, size: int) -> None:
        pass

    def _summarize(self, lo: int, hi: int) -> None:
        pass

    def _feeds(self, ids, positions) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64),
                 "past_length": self.filled}
        for i in range(self.info.layers):
            feeds[f"cache.{i}.key"] = self.keys[i]
            feeds[f"cache.{i}.value"] = self.values[i]
        return feeds

    def _append(self, out: dict[str, np.ndarray]) -> None:
        rows, t = np.arange(self.batch), self.filled
        for i in range(self.info.layers):
            self.keys[i][rows, :, t] = out[f"new.{i}.key"][:, :, 0]
            self.values[i][rows, :, t] = out[f"new.{i}.value"][:, :, 0]
        self.length += 1


class FreeKVCache(FixedBufferCache):
    """FreeKV decoding: speculative page retrieval with per-head correction (see
    ``edgec.exporters.freekv_decoder``). Exact while the context fits the budget.

    ``stats``: decode steps, ``correction_rate`` (corrected KV heads / heads, over the steps
    after the first, whose heads all select afresh), ``query_cosine_mean`` (the similarity
    compared with tau, over the same heads), ``pages_per_head`` (retrieved pages per
    step), ``retrieved_pages_mean`` (of those, the ones holding candidates), ``attended_mean``
    (cache tokens a head attends per step, plus the new token).
    """

    def __init__(self, session, graph, info, config: FreeKVConfig | str | None, batch: int,
                 **kwargs):
        built = graph_config(graph)
        config = built if config is None else FreeKVConfig.parse(config)
        if dataclasses.replace(config, tau=built.tau) != built:
            raise UserError(f"{graph} was built for FreeKV {built.to_json()}; only tau can "
                            f"change at run time, not the pages ({config.to_json()})")
        self.config = config
        super().__init__(session, graph, info, batch, **kwargs)
        self.kmin: list[np.ndarray] = []
        self.kmax: list[np.ndarray] = []
        k, shape = self.config.top_pages, (batch, info.kv_heads)
        self.prev_query = [np.zeros((batch, info.heads, info.head_dim), np.float32)
                           for _ in range(info.layers)]
        self.prev_pages = [np.zeros((*shape, k), np.int64) for _ in range(info.layers)]
        self.last_pages = list(self.prev_pages)  # the pages each head attended, last step
        self.tau = self.config.tau
        self._corrected = self._heads = 0
        self._retrieved = self._attended = self._similarity = 0.0
        self.stats.update(correction_rate=None, query_cosine_mean=None, pages_per_head=k,
                          retrieved_pages_mean=None, attended_mean=None, tau=self.tau)

    def _round(self, n: int) -> int:
        page = self.config.page  # whole pages, never fewer than the budget (TopK needs them)
        return max(-(-n // page) * page, self.config.budget)

    def _grown(self, size: int) -> None:
        shape = (self.batch, self.info.kv_heads, size // self.config.page, self.info.head_dim)
        self.kmin = [np.zeros(shape, np.float32) for _ in range(self.info.layers)]
        self.kmax = [np.zeros(shape, np.float32) for _ in range(self.info.layers)]
        self._summarize(0, int(self.filled.max()))

    def _summarize(self, lo: int, hi: int) -> None:
        """Digests of the pages holding slots [lo, hi), from the buffers (each row's filled
        slots only); O(hi - lo): run once after prefill (and when the buffers grow)."""
        hi = min(hi, self.keys[0].shape[2]) if self.keys else hi
        if hi <= lo or not self.kmin:
            return
        p = self.config.page
        first, last = lo // p, -(-hi // p)
        slots = np.arange(first * p, last * p)
        ok = (slots[None] < hi) & (slots[None] < self.filled[:, None])  # [B, slots]
        ok = ok.reshape(self.batch, 1, last - first, p, 1)
        for i in range(self.info.layers):
            k = self.keys[i][:, :, first * p:last * p].reshape(
                self.batch, self.info.kv_heads, last - first, p, self.info.head_dim)
            lo_, hi_ = np.where(ok, k, np.inf).min(3), np.where(ok, k, -np.inf).max(3)
            empty = ~np.isfinite(lo_)  # a page past the row's end: any finite digest will do
            self.kmin[i][:, :, first:last] = np.where(empty, 0.0, lo_)
            self.kmax[i][:, :, first:last] = np.where(empty, 0.0, hi_)

    def _feeds(self, ids, positions):
        feeds = super()._feeds(ids, positions)
        first = self.stats["decode_steps"] == 0
        feeds["tau"] = np.array(FORCE_TAU if first else self.tau, np.float32)
        for i in range(self.info.layers):
            feeds[f"kmin.{i}"], feeds[f"kmax.{i}"] = self.kmin[i], self.kmax[i]
            feeds[f"prev_query.{i}"] = self.prev_query[i]
            feeds[f"prev_pages.{i}"] = self.prev_pages[i]
        return feeds

    def _append(self, out):
        t, p, cfg = self.filled, self.config.page, self.config  # per row
        rows, page = np.arange(self.batch), t // p
        # the page's digest so far counts only if it holds a token before t
        fresh = (page * p == t)[:, None, None]
        cur = page - cfg.recent_pages  # last candidate page this step
        window = np.maximum(0, t - np.maximum((cur + 1) * p, cfg.sink))
        for i in range(self.info.layers):
            k = out[f"new.{i}.key"][:, :, 0]
            row_min, row_max = self.kmin[i][rows, :, page], self.kmax[i][rows, :, page]
            self.kmin[i][rows, :, page] = np.where(fresh, k, np.minimum(row_min, k))
            self.kmax[i][rows, :, page] = np.where(fresh, k, np.maximum(row_max, k))
            used = np.where(out[f"corrected.{i}"][..., None], self._fresh_pages(i, out),
                            self.prev_pages[i])
            self.last_pages[i] = used
            retrieved = ((used >= cfg.sink_pages)
                         & (used <= cur[:, None, None])).sum(-1).mean(-1)  # [B]
            attended = np.minimum(t, cfg.sink) + retrieved * p + window + 1
            self._retrieved += float(retrieved.mean()) / self.info.layers
            self._attended += float(attended.mean()) / self.info.layers
            if self.stats["decode_steps"] > 0:
                flags = out[f"corrected.{i}"]
                self._corrected += int(flags.sum())
                self._heads += flags.size
                self._similarity += float(_group_cosine(out[f"query.{i}"], self.prev_query[i],
                                                        self.info.kv_heads).sum())
            self.prev_query[i] = out[f"query.{i}"]
            self.prev_pages[i] = out[f"pages.{i}"]
        super()._append(out)
        steps = self.stats["decode_steps"] + 1
        self.stats.update(
            correction_rate=self._corrected / self._heads if self._heads else None,
            query_cosine_mean=self._similarity / self._heads if self._heads else None,
            retrieved_pages_mean=self._retrieved / steps, attended_mean=self._attended / steps)

    def _fresh_pages(self, i, out):
        """The pages a corrected head used this step (its own query's pick over this step's
        candidates): the graph's ``now_pages`` output."""
        return out[f"now_pages.{i}"]

    def set_tau(self, tau: float) -> None:
        """Change the correction threshold (a graph input: no rebuild)."""
        self.tau = dataclasses.replace(self.config, tau=tau).tau
        self.stats["tau"] = self.tau


def _group_cosine(q: np.ndarray, prev: np.ndarray, kv_heads: int) -> np.ndarray:
    """What the graph compares with tau: per KV head, the group-mean cosine of the queries."""
    b, h, d = q.shape
    q, prev = q.reshape(b, kv_heads, -1, d), prev.reshape(b, kv_heads, -1, d)
    norms = np.maximum(np.linalg.norm(q, axis=-1) * np.linalg.norm(prev, axis=-1), 1e-20)
    return ((q * prev).sum(-1) / norms).mean(-1)


def freekv_cache_for(session, root: str | os.PathLike, info, batch: int,
                     capacity: int | None = None) -> FreeKVCache | None:
    """The FreeKV cache of an artifact compiled with ``--kv-retrieval`` (None without one):
    the manifest's ``kv_retrieval`` entry names the graph and the options."""
    root = Path(root)
    manifest = getattr(session, "manifest", None)
    if manifest is None:
        manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest.get("kv_retrieval")
    if not entry:
        return None
    runtime = manifest["runtime"]
    config = FreeKVConfig.parse({k: v for k, v in entry.items()
                                 if k in {f.name for f in dataclasses.fields(FreeKVConfig)}})
    model = contained_path(root, entry.get("model"), "kv_retrieval.model")
    return FreeKVCache(session, model, info, config, batch,
                       runtime=runtime["name"], runtime_config=entry.get("runtime_config",
                                                                         runtime.get("config")),
                       capacity=capacity)
