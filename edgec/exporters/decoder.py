"""Decoders with a KV cache: the one graph for prefill and decode that generation runs.

The graph uses the names the ecosystem uses (optimum's ``ORTModelForCausalLM``, ONNX Runtime
GenAI), so the artifact's ``model.onnx`` loads there too:

- inputs ``input_ids`` [B, S] int64, ``attention_mask`` [B, P+S] int64 (0 = padding),
  ``position_ids`` [B, S] int64, ``past_key_values.{i}.key|value`` [B, kv_heads, P, head_dim];
- outputs ``logits`` [B, S, vocab], ``present.{i}.key|value`` [B, kv_heads, P+S, head_dim].

Prefill feeds empty pasts (P = 0); decode feeds one token (S = 1) and the previous presents.
Sources: the ``llama`` reference model (``Llama.forward_cached``) and Hugging Face
``*ForCausalLM`` checkpoints (LLaMA, Qwen2, ... through transformers' own ``DynamicCache``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any

import numpy as np
import torch

from edgec.errors import UserError

__all__ = ["DecoderInfo", "past_name", "present_name", "reference_decoder", "hf_decoder",
           "example_inputs", "decoder_dynamic_shapes", "GENERATION_INPUTS",
           "onnx_decoder_info", "StaticCache", "PrefillGraph", "prefill_only", "prefill_example"]

GENERATION_INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """What a generation loop must know about a KV-cache decoder (the manifest's
    ``generation`` entry)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    max_positions: int | None = None
    context: int | None = None  # a static cache's length (None: the cache grows)
    # the checkpoint's generation settings (``generation_settings``): what its
    # generation_config.json sets of GENERATION_SETTINGS, {} when it is silent on them
    # (transformers' defaults apply), None without one (the reference model: edgec's defaults)
    generation_config: dict[str, Any] | None = None

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, k) for i in range(self.layers) for k in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, k) for i in range(self.layers) for k in ("key", "value")]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return {**d, "inputs": list(GENERATION_INPUTS), "past": self.past_names,
                "present": self.present_names, "logits": "logits",
                "kv_layout": "[batch, kv_heads, seq, head_dim]"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecoderInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["eos_token_ids"] = tuple(values.get("eos_token_ids") or ())
        return cls(**values)


class _Decoder(torch.nn.Module):
    """``forward(input_ids, attention_mask, position_ids, past_key_values)`` → ``(logits,
    present.0.key, present.0.value, ...)``; ``past_key_values`` is a flat tuple (key, value per
    layer), so the exported inputs flatten to the names above."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model  # parameter names: "model." + the source's own
        self.layers = layers

    def _pairs(self, past):
        return [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]


class _ReferenceDecoder(_Decoder):
    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, presents = self.model.forward_cached(input_ids, attention_mask, position_ids,
                                                     self._pairs(past_key_values))
        return (logits, *[t for kv in presents for t in kv])


@contextlib.contextmanager
def _grouped_sdpa():
    """transformers' SDPA attention repeats K/V per query head (``repeat_kv``: an Expand that
    copies the whole cache once per query head in the group, every step) unless it decides to
    pass ``enable_gqa``; while exporting, it always does, so each layer becomes one grouped
    Attention as in the ``llama`` reference. (Older transformers without the switch keep
    ``repeat_kv``: slower, still exact.)"""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        sdpa_attention = None
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None:
        yield
        return
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


class _HFDecoder(_Decoder):
    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        # full-length layers for every model, sliding-window ones included: given the config,
        # transformers makes sliding layers that keep only the last window - 1 tokens and count
        # only those, so each present.* lost the older tokens the graph's attention_mask
        # [B, P+S] still has columns for, and the window mask read the wrong columns of a
        # left-padded row; the mask applies the window over the whole cache instead
        cache = DynamicCache()
        for i, (k, v) in enumerate(self._pairs(past_key_values)):
            cache.update(k, v, i)
        # transformers 5.x names the argument ``cache`` (``past_key_values`` before)
        kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else (
            "past_key_values")
        with _grouped_sdpa():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, return_dict=True,
                             **{kwarg: cache})
        returned = getattr(out, "cache", None) or out.past_key_values
        if hasattr(returned, "layers"):
            pairs = [(layer.keys, layer.values) for layer in returned.layers]
        else:  # transformers < 4.56: parallel key/value lists
            pairs = list(zip(returned.key_cache, returned.value_cache))
        return (out.logits, *[t for kv in pairs for t in kv])


def reference_decoder(module: torch.nn.Module, name: str) -> tuple[_Decoder, DecoderInfo]:
    """The KV-cache decoder of a reference model that has one (``forward_cached``)."""
    if not hasattr(module, "forward_cached"):
        raise UserError(f"{name} is not a decoder language model; --generate applies to `llama` "
                        "and Hugging Face *ForCausalLM checkpoints")
    cfg = module.cfg
    info = DecoderInfo(layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                       head_dim=cfg.head_dim, vocab=cfg.vocab)
    return _ReferenceDecoder(module, cfg.layers), info


# what ``generate`` follows of a checkpoint's generation config, and what it cannot (recorded
# under "not_applied" when set: transformers' generate() would apply them) with their no-op value
GENERATION_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
_NOT_APPLIED = {"min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                "no_repeat_ngram_size": 0, "num_beams": 1, "penalty_alpha": 0.0, "min_length": 0,
                "min_new_tokens": 0, "bad_words_ids": None, "suppress_tokens": None,
                "begin_suppress_tokens": None, "sequence_bias": None, "forced_eos_token_id": None,
                "exponential_decay_length_penalty": None, "renormalize_logits": False}


def generation_settings(config) -> dict[str, Any]:
    """The generation settings a checkpoint's generation config (a transformers
    ``GenerationConfig`` or the dict of its JSON) sets: the one place they are read, for
    ``DecoderInfo.generation_config``."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    out = {k: get(k) for k in GENERATION_SETTINGS if get(k) is not None}
    other = {k: get(k) for k, inert in _NOT_APPLIED.items()
             if get(k) not in (None, inert, [], {})}
    return {**out, **({"not_applied": other} if other else {})}


def file_generation_settings(directory) -> dict[str, Any] | None:
    """``generation_settings`` of the ``generation_config.json`` in ``directory`` (else its
    ``config.json``'s, as transformers falls back to), None when it has neither."""
    import json
    from pathlib import Path

    for name in ("generation_config.json", "config.json"):
        f = Path(directory) / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
                d = {**(d.get("text_config") or {}), **d} if name == "config.json" else d
                return generation_settings(d)
            except (ValueError, AttributeError):
                return None
    return None


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def hf_decoder(model: torch.nn.Module, path) -> tuple[_Decoder, DecoderInfo]:
    """The KV-cache decoder of a transformers causal LM (its own attention and cache code)."""
    cfg = model.config
    if not type(model).__name__.endswith("ForCausalLM"):
        raise UserError(f"{path}: --generate supports Hugging Face *ForCausalLM architectures "
                        f"(LlamaForCausalLM, Qwen2ForCausalLM, ...), not {type(model).__name__}")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UserError(f"{path}: encoder-decoder models are not supported by --generate")
    if getattr(cfg, "num_attention_heads", None) is None:
        raise UserError(f"{path}: {type(model).__name__} has no attention KV cache (a "
                        "state-space model); --generate exports attention decoders "
                        "(LlamaForCausalLM, Qwen2ForCausalLM, ...) only")
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    gen = getattr(model, "generation_config", None)
    eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(getattr(cfg, "eos_token_id", None))
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else getattr(cfg, "pad_token_id", None)
    bos = getattr(gen, "bos_token_id", None)
    bos = bos if bos is not None else getattr(cfg, "bos_token_id", None)
    info = DecoderInfo(layers=int(cfg.num_hidden_layers), heads=heads,
                       kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                       head_dim=head_dim, vocab=int(cfg.vocab_size), eos_token_ids=eos,
                       bos_token_id=None if bos is None else int(_ids(bos)[0]),
                       pad_token_id=None if pad is None else int(_ids(pad)[0]),
                       max_positions=getattr(cfg, "max_position_embeddings", None),
                       generation_config=generation_settings(gen) if gen is not None else {})
    return _HFDecoder(model, info.layers), info


def new_slots_only(model, info: DecoderInfo) -> None:
    """Make each ``present.*`` output the new tokens' keys/values instead of past + new: the
    graph output moves from the cache Concat to the Concat's last input (the Concat stays, the
    attention reads it). For static-cache graphs, whose runtime owns the buffer."""
    outputs = list(model.graph.outputs)
    for i, value in enumerate(outputs):
        if value.name not in info.present_names:
            continue
        node = value.producer()
        if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
            raise UserError(f"the exported decoder's {value.name} is not a Concat of past and "
                            f"new keys/values ({node.op_type if node else 'a graph input'}); "
                            "this decoder cannot run with a static cache")
        new = node.inputs[1]
        name = value.name
        value.name = f"{name}.all"
        new.name = name
        model.graph.outputs[i] = new


def prefill_only(model, info: DecoderInfo) -> None:
    """Make the decoder a prefill graph: no ``past_key_values.*`` inputs (the cache starts
    empty: [B, kv_heads, 0, head_dim] expanded from ``input_ids``' batch), each
    ``present.*`` the new keys/values themselves, and ``logits`` of the last position only
    (prompts are left-padded, so it is every row's last token; the LM head then runs on one
    row instead of the whole prompt)."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = [v.name for v in graph.outputs]
    # the empty cache [B, kv_heads, 0, head_dim], made from input_ids' batch at the graph's
    # start (a past's Shape can feed the mask, which every layer reads)
    tape = ir.tape.Tape()
    zeros = tape.initializer(ir.tensor(np.zeros((1, info.kv_heads, 0, info.head_dim),
                                                np.float32)), name="prefill.empty_cache")
    rest = tape.initializer(ir.tensor(np.array([info.kv_heads, 0, info.head_dim], np.int64)),
                            name="prefill.empty_cache_dims")
    batch = tape.op("Shape", [inputs["input_ids"]], {"start": 0, "end": 1})
    empty = tape.op("Expand", [zeros, tape.op("Concat", [batch, rest], {"axis": 0})])
    empty.dtype = ir.DataType.FLOAT
    empty.shape = ir.Shape([inputs["input_ids"].shape[0], info.kv_heads, 0, info.head_dim])
    graph.insert_before(graph.node(0), tape.nodes)
    for init in tape.initializers:
        graph.register_initializer(init)
    for layer in range(info.layers):
        for kind in ("key", "value"):
            past, present = inputs[past_name(layer, kind)], present_name(layer, kind)
            node = graph.outputs[outputs.index(present)].producer()
            if node is None or node.op_type != "Concat" or list(node.inputs[:1]) != [past]:
                raise UserError(f"the exported decoder's {present} is not a Concat of the past "
                                "and the new keys/values; it has no separate prefill graph")
            new = node.inputs[1]
            ir.convenience.replace_all_uses_with(past, empty)
            whole = node.outputs[0]
            whole.name, new.name = f"{present}.all", present
            graph.outputs[outputs.index(present)] = new
            ir.convenience.replace_all_uses_with(whole, new)
            graph.inputs.remove(past)
    logits = graph.outputs[outputs.index("logits")]
    head = logits.producer()
    tape = ir.tape.Tape()
    start, end, axis = (tape.initializer(ir.tensor(np.array([x], np.int64)),
                                         name=f"logits.last.{i}")
                        for i, x in enumerate((-1, np.iinfo(np.int64).max, 1)))
    if head is not None and head.op_type == "MatMul":
        x = head.inputs[0]
        last = tape.op("Slice", [x, start, end, axis])
        last.dtype = x.dtype
        graph.insert_before(head, tape.nodes)
        head.replace_input_with(0, last)
    else:  # not a MatMul head: slice its output (the same values, no compute saved)
        logits.name = "logits.all"
        last = tape.op("Slice", [logits, start, end, axis])
        last.dtype, last.name = logits.dtype, "logits"
        graph.append(tape.nodes[0])
        graph.outputs[outputs.index("logits")] = last
    for init in tape.initializers:
        graph.register_initializer(init)
    if logits.shape is not None and len(logits.shape) == 3:
        graph.outputs[outputs.index("logits")].shape = ir.Shape(
            [logits.shape[0], 1, logits.shape[2]])


@dataclasses.dataclass(frozen=True)
class PrefillGraph:
    """The prefill-only graph (``prefill_only``) exported beside a decoder: verified on a prompt
    of ``tokens`` tokens."""

    tokens: int


def prefill_example(module, info: DecoderInfo, batch: int, tokens: int, seed: int = 0
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds, PyTorch reference outputs) of the prefill graph on a prompt of ``tokens``
    tokens, no padding (a padding query's output is not defined the same way everywhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, info.vocab, (batch, tokens), generator=g, dtype=torch.int64)
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    positions = torch.arange(tokens, dtype=torch.int64)[None].expand(batch, tokens).contiguous()
    empty = torch.zeros(batch, info.kv_heads, 0, info.head_dim)
    with torch.no_grad():
        out = module(ids, mask, positions, tuple(empty for _ in range(2 * info.layers)))
    from edgec.exporters.outputs import flatten_outputs

    flat = [t.detach().cpu().numpy() for t in flatten_outputs(out)]
    reference = dict(zip(output_names(info), flat))
    reference["logits"] = reference["logits"][:, -1:]
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": positions.numpy()}
    return feeds, reference


def onnx_decoder_info(model, path) -> DecoderInfo:
    """A decoder graph's ``DecoderInfo`` from its names and shapes (as optimum and edgec write
    them), with token ids from the ``config.json`` / ``generation_config.json`` beside it."""
    import json
    from pathlib import Path

    from edgec.targets.openvino_stateful import kv_pairs

    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    pairs = kv_pairs(inputs, outputs)
    missing = [n for n in GENERATION_INPUTS if n not in inputs]
    if not pairs or "logits" not in outputs or missing:
        raise UserError(f"{path}: not a KV-cache decoder (it needs inputs input_ids, "
                        "attention_mask, position_ids, past_key_values.N.key|value and outputs "
                        "logits, present.N.key|value); export it with `edgec compile --generate` "
                        "or optimum's text-generation-with-past task")
    layers = len(pairs) // 2
    shape = inputs[past_name(0, "key")].shape
    dims = list(shape.dims) if shape is not None else []
    vocab = (list(outputs["logits"].shape.dims) or [None])[-1] if outputs["logits"].shape else None
    if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3], vocab)):
        raise UserError(f"{path}: the past key input has shape {dims} and logits vocab "
                        f"{vocab}; a decoder needs [batch, kv_heads, past, head_dim] with fixed "
                        "heads, head_dim and vocabulary")
    meta = checkpoint_meta(Path(path).parent)
    settings = file_generation_settings(Path(path).parent)
    manifest = Path(path).parent / "manifest.json"  # an edgec artifact's model.onnx
    if manifest.is_file():
        try:
            gen = json.loads(manifest.read_text()).get("generation") or {}
        except (ValueError, AttributeError):
            gen = {}
        meta.update(eos_token_id=gen.get("eos_token_ids"), bos_token_id=gen.get("bos_token_id"),
                    pad_token_id=gen.get("pad_token_id"), num_attention_heads=gen.get("heads"),
                    max_position_embeddings=gen.get("max_positions"))
        settings = gen.get("generation_config", settings)  # (an older manifest: the file)
    heads = int(meta.get("num_attention_heads") or dims[1])
    return DecoderInfo(layers=layers, heads=heads, kv_heads=int(dims[1]), head_dim=int(dims[3]),
                       vocab=int(vocab), eos_token_ids=_ids(meta.get("eos_token_id")),
                       bos_token_id=_first(meta.get("bos_token_id")),
                       pad_token_id=_first(meta.get("pad_token_id")),
                       max_positions=meta.get("max_position_embeddings"),
                       generation_config=settings)


def checkpoint_meta(directory) -> dict[str, Any]:
    """The non-null entries of a checkpoint directory's ``config.json`` then
    ``generation_config.json`` (which wins); a composite model's ``text_config`` entries come
    first, under the top level's."""
    import json
    from pathlib import Path

    meta: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        f = Path(directory) / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
            d = {**(d.get("text_config") or {}), **d}
        except (ValueError, AttributeError):
            continue
        meta.update({k: v for k, v in d.items() if v is not None})
    return meta


def has_sliding_window(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's config (``checkpoint_meta``) gives some layers sliding-window
    attention (Mistral, Gemma 2/3, ...; a Qwen2 with ``use_sliding_window`` false has none)."""
    types = meta.get("layer_types")
    if types:
        return "sliding_attention" in types
    return bool(meta.get("sliding_window")) and meta.get("use_sliding_window") is not False


def _first(value) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def example_inputs(info: DecoderInfo, batch: int, seq: int, seed: int = 0,
                   static: StaticCache | None = None, module=None) -> tuple:
    """A decode-like example: ``seq // 2`` new tokens after ``seq - seq // 2`` cached ones,
    no padding (a padding query's output is not defined the same way by every implementation,
    and generation never reads it).

    ``static``: the fixed shapes of a static-cache graph instead: ``static.tokens`` new tokens
    after a buffer of ``context - tokens`` slots, the first half of them filled, the rest empty
    (masked).

    ``module`` (the decoder wrapper): the cached keys and values are its own, from a prefill of
    random tokens, as generation has them. Without it (a decoder .onnx), random N(0, 1) ones:
    a quantized decoder reads those far outside its calibrated ranges, and the compile's
    headline fidelity said 0.70 for an NPU decoder holding its held-out floor at 0.9998."""
    g = torch.Generator().manual_seed(seed)
    new = static.tokens if static else max(1, seq // 2)
    past_len = static.context - static.tokens if static else max(1, seq - new)
    filled = past_len // 2 if static else past_len
    prefix = torch.randint(0, info.vocab, (batch, filled), generator=g, dtype=torch.int64)
    ids = torch.randint(0, info.vocab, (batch, new), generator=g, dtype=torch.int64)
    mask = torch.ones(batch, past_len + new, dtype=torch.int64)
    mask[:, filled:past_len] = 0
    positions = torch.arange(filled, filled + new, dtype=torch.int64)[None].expand(batch, new)
    if module is not None and filled:
        past = _prefilled(module, info, prefix, past_len)
    else:
        past = tuple(torch.randn(batch, info.kv_heads, past_len, info.head_dim, generator=g)
                     for _ in range(2 * info.layers))
    return ids, mask, positions.contiguous(), past


def _prefilled(module, info: DecoderInfo, prefix: torch.Tensor, past_len: int) -> tuple:
    """The decoder's own keys and values for ``prefix`` (an empty cache before it), zero-padded
    to ``past_len`` slots."""
    batch, filled = prefix.shape
    empty = torch.zeros(batch, info.kv_heads, 0, info.head_dim)
    with torch.no_grad():
        out = module(prefix, torch.ones_like(prefix),
                     torch.arange(filled, dtype=torch.int64)[None].expand(batch, filled),
                     (empty,) * (2 * info.layers))
    presents = list(out)[1:1 + 2 * info.layers]
    pad = torch.zeros(batch, info.kv_heads, past_len - filled, info.head_dim)
    return tuple(torch.cat([p.detach().float(), pad], dim=2) for p in presents)


@dataclasses.dataclass(frozen=True)
class StaticCache:
    """A static-shape decoder graph (NPUs): ``tokens`` new tokens per run over a KV buffer of
    ``context - tokens`` slots; its ``present.*`` outputs carry only the new tokens' keys and
    values, which the runtime writes into its buffer (no scatter in the graph)."""

    context: int
    tokens: int


def decoder_dynamic_shapes(info: DecoderInfo) -> dict[str, Any]:
    kv = {0: "batch_size", 2: "past_sequence_length"}
    return {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "past_key_values": [dict(kv) for _ in range(2 * info.layers)]}


def input_names(info: DecoderInfo) -> list[str]:
    return [*GENERATION_INPUTS, *info.past_names]


def output_names(info: DecoderInfo) -> list[str]:
    return ["logits", *info.present_names]
