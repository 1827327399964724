"""Decode graphs over fixed KV buffers for the ``llama`` reference: FreeKV retrieval and dense.

One token per step. The cache lives in buffers the wrapper owns ([B, kv_heads, T, head_dim]),
each row's first ``past_length[b]`` slots filled: the wrapper left-aligns a left-padded batch, so
slot 0 is every row's first real token and sink, pages and budget count from it. It writes in
place; the graph returns only the new token's
key/value, so no step copies the cache. Per layer, FreeKV (arXiv 2505.13109) does:

    q_i, k_i, v_i                       (RoPE at position_ids)
    sim  = mean_group cos(q_i, q_{i-1})                        per KV head
    s(p) = mean_group Σ_d max(q_d·kmax_pd, q_d·kmin_pd)       Quest bound, page digests
         = mean_group (relu(q)·kmax_p + min(q, 0)·kmin_p)      (two MatMuls)
    pages = sim < tau ? topK_p s(p) over this step's candidates   (correction)
                      : prev_pages                                (speculative)
    attend over sink pages + pages + recent window + the new token     O(budget) Gather
    next  = topK_p s'(p) over the next step's candidates       (s' counts k_i in its page)

Candidates are the whole pages between the sink and the recent window (the window holds the
page being filled), so sink, retrieved and window never overlap; while the context fits the
budget every candidate is retrieved and the step equals full attention. The dense graph has the
same inputs minus the retrieval state and attends over every valid slot: the fair baseline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgec.errors import UserError
from edgec.models.llama import _rotate_half
from edgec.runtimes.freekv import DENSE_FILE, GRAPH_FILE, METADATA_KEY, FreeKVConfig

__all__ = ["FixedBufferDecoder", "FreeKVDecoder", "build_freekv_graph", "build_dense_graph",
           "export_fixed_buffer_decoder", "verify_freekv_graph"]

_STATE = ("key", "value", "kmin", "kmax", "prev_query", "prev_pages")


class FixedBufferDecoder(nn.Module):
    """Dense decode over the buffers: ``forward(input_ids [B,1], position_ids [B,1],
    past_length [B], cache)`` (row b's tokens in slots [0, past_length[b])) with ``cache`` =
    (key, value) per layer, flat. Returns logits [B,1,V] and per layer the new key, value
    [B,kv_heads,1,head_dim]."""

    per_layer = 2

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_cached") or not hasattr(model, "inv_freq"):
            raise UserError("FreeKV retrieval is built on the `llama` reference decoder's "
                            f"layout (or a checkpoint's HFDecoderView); {type(model).__name__} "
                            "is neither")
        self.model = model  # parameter names "model." + the reference's own
        cfg = model.cfg
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.group = cfg.heads // cfg.kv_heads

    def forward(self, input_ids, position_ids, past_length, cache):
        return self._decode(input_ids, position_ids, past_length, None, cache)

    def _decode(self, input_ids, position_ids, past_length, tau, cache):
        m = self.model
        angles = position_ids[..., None].to(torch.float32) * m.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, 1, head_dim]
        rope = angles.cos(), angles.sin()
        scale = getattr(m, "rope_scale", 1.0)  # a checkpoint's RoPE attention scaling
        if scale != 1.0:
            rope = rope[0] * scale, rope[1] * scale
        x = m.embed_tokens(input_ids)
        outs = []
        n = self.per_layer
        for i, layer in enumerate(m.layers):
            h, extra = self._attention(layer.self_attn, layer.input_layernorm(x), rope,
                                       past_length, tau, cache[n * i:n * (i + 1)])
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            outs += extra
        return (m.lm_head(m.norm(x)), *outs)

    def _project(self, attn, x, rope):
        b = x.shape[0]
        cos, sin = rope
        q = attn.q_proj(x).reshape(b, 1, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # grouped: [B, kv_heads, group, head_dim], so K/V are never repeated per query head
        return q.reshape(b, self.kv_heads, self.group, self.head_dim), k, v

    def _softmax_out(self, attn, qg, keys, values, ok, k, v):
        """softmax over (keys masked by ``ok`` [B,Hkv,N], the new token) · values → o_proj."""
        b = qg.shape[0]
        # the scale goes on the query: OpenVINO moves a scale after Q·Kᵀ onto K, through the
        # Gather, onto the whole cache (an O(context) multiply per layer and step)
        qs = qg * (1.0 / math.sqrt(self.head_dim))
        s = torch.matmul(qs, keys.transpose(-1, -2))  # [B, Hkv, G, N]
        s = torch.where(ok[:, :, None], s, float("-inf"))
        s_new = (qs * k).sum(-1, keepdim=True)  # k [B, Hkv, 1, D] broadcasts
        p = torch.softmax(torch.cat((s, s_new), dim=-1), dim=-1)
        out = torch.matmul(p[..., :-1], values) + p[..., -1:] * v
        return attn.o_proj(out.reshape(b, 1, self.heads * self.head_dim))

    def _attention(self, attn, x, rope, past_length, tau, state):
        kc, vc = state
        qg, k, v = self._project(attn, x, rope)
        ok = torch.arange(kc.shape[2])[None] < past_length[:, None]  # [B, T]
        ok = ok[:, None].expand(-1, self.kv_heads, -1)
        return self._softmax_out(attn, qg, kc, vc, ok, k, v), [k, v]


class FreeKVDecoder(FixedBufferDecoder):
    """FreeKV decode (module docstring): ``forward(input_ids, position_ids, past_length [B],
    tau [], state)``, ``state`` per layer = (key, value [B,Hkv,T,D], kmin, kmax
    [B,Hkv,Np,D], prev_query [B,H,D], prev_pages [B,Hkv,K] int64), flat. Returns logits and per
    layer new key, new value, query [B,H,D], pages [B,Hkv,K] (the next step's speculative
    pages), now_pages [B,Hkv,K] (this step's fresh pick) and corrected [B,Hkv] bool."""

    per_layer = 6

    def __init__(self, model: nn.Module, config: FreeKVConfig):
        super().__init__(model)
        self.config = config

    def forward(self, input_ids, position_ids, past_length, tau, state):
        return self._decode(input_ids, position_ids, past_length, tau, state)

    def _attention(self, attn, x, rope, past_length, tau, state):
        kc, vc, kmin, kmax, prev_q, prev_pages = state
        cfg = self.config
        p, n_sink, n_top, n_recent = cfg.page, cfg.sink_pages, cfg.top_pages, cfg.recent_pages
        b, hkv, _, d = kc.shape
        qg, k, v = self._project(attn, x, rope)

        # correction flags: group-mean cosine with the previous step's query
        pq = prev_q.reshape(b, hkv, self.group, d)
        cos = (qg * pq).sum(-1) / (qg.norm(dim=-1) * pq.norm(dim=-1)).clamp_min(1e-20)
        corrected = cos.mean(-1) < tau  # [B, Hkv]

        # Quest upper bound per page, mean-pooled over the group
        qpos, qneg = qg.clamp(min=0), qg.clamp(max=0)
        score = (torch.matmul(qpos, kmax.transpose(-1, -2))
                 + torch.matmul(qneg, kmin.transpose(-1, -2))).mean(2)  # [B, Hkv, Np]
        length = past_length[:, None, None]  # [B, 1, 1]: each row's filled slots
        page = length // p  # the page the new token lands in
        pages = torch.arange(kmin.shape[2])
        row = page[..., None].expand(b, hkv, 1, d)
        fresh = (page * p == length)[..., None]  # the page holds no token yet
        cur_min = torch.where(fresh, k, torch.minimum(kmin.gather(2, row), k))
        cur_max = torch.where(fresh, k, torch.maximum(kmax.gather(2, row), k))
        cur = (torch.matmul(qpos, cur_max.transpose(-1, -2))
               + torch.matmul(qneg, cur_min.transpose(-1, -2))).mean(2)  # [B, Hkv, 1]
        score_next = torch.where(pages == page, cur, score)

        def top(scores, last):  # best pages among candidates [sink, last]
            cand = (pages >= n_sink) & (pages <= last)
            return torch.topk(torch.where(cand, scores, float("-inf")), n_top, dim=-1,
                              sorted=False).indices

        last = page - n_recent  # last candidate page this step
        now_pages = top(score, last)
        next_pages = top(score_next, (length + 1) // p - n_recent)
        chosen = torch.where(corrected[..., None], now_pages, prev_pages)

        # sink + chosen + recent window pages → slots, gathered: O(budget), not O(context)
        sink = torch.arange(n_sink).expand(b, hkv, n_sink)
        recent = (last + 1 + torch.arange(n_recent)).expand(b, hkv, n_recent)
        idx = torch.cat((sink, chosen, recent), dim=-1)  # [B, Hkv, M]
        valid = torch.cat((sink >= 0, (chosen >= n_sink) & (chosen <= last),
                           recent >= n_sink), dim=-1)
        slot = (idx[..., None] * p + torch.arange(p)).flatten(2)  # [B, Hkv, M*P]
        ok = valid[..., None].expand(-1, -1, -1, p).flatten(2) & (slot < length)
        # whole pages (P·D contiguous floats each) out of the buffers seen as [B·Hkv·Np, P, D]
        n_pages = kmin.shape[2]
        base = (torch.arange(b)[:, None] * hkv + torch.arange(hkv))[..., None] * n_pages
        flat = (base + idx.clamp(0, n_pages - 1)).reshape(-1)
        keys = kc.reshape(-1, p, d).index_select(0, flat).reshape(b, hkv, -1, d)
        values = vc.reshape(-1, p, d).index_select(0, flat).reshape(b, hkv, -1, d)
        out = self._softmax_out(attn, qg, keys, values, ok, k, v)
        return out, [k, v, qg.reshape(b, self.heads, d), next_pages, now_pages, corrected]


def _names(decoder: FixedBufferDecoder, layers: int) -> tuple[list[str], list[str]]:
    retrieval = isinstance(decoder, FreeKVDecoder)
    state = _STATE if retrieval else _STATE[:2]
    inputs = ["input_ids", "position_ids", "past_length", *(["tau"] if retrieval else [])]
    inputs += [f"cache.{i}.{s}" if s in ("key", "value") else f"{s}.{i}"
               for i in range(layers) for s in state]
    per = ["new.{i}.key", "new.{i}.value"] + (
        ["query.{i}", "pages.{i}", "now_pages.{i}", "corrected.{i}"] if retrieval else [])
    outputs = ["logits"] + [n.format(i=i) for i in range(layers) for n in per]
    return inputs, outputs


def _example(decoder: FixedBufferDecoder, batch: int = 2):
    """Buffers a few pages past the budget, rows filled to different mid-page lengths (shapes
    only matter)."""
    m = decoder.model.cfg
    cfg = getattr(decoder, "config", None) or FreeKVConfig(budget=64, page=8, sink=8, recent=8)
    t = cfg.budget + 3 * cfg.page
    g = torch.Generator().manual_seed(0)
    state = []
    for _ in range(m.layers):
        kc = torch.randn(batch, m.kv_heads, t, m.head_dim, generator=g)
        state += [kc, torch.randn(kc.shape, generator=g)]
        if isinstance(decoder, FreeKVDecoder):
            pages = kc.reshape(batch, m.kv_heads, t // cfg.page, cfg.page, m.head_dim)
            state += [pages.amin(3), pages.amax(3),
                      torch.randn(batch, m.heads, m.head_dim, generator=g),
                      torch.zeros(batch, m.kv_heads, cfg.top_pages, dtype=torch.int64)]
    length = torch.tensor([t - cfg.page - 3, t - cfg.page - 5][:batch])
    args = [torch.randint(0, m.vocab, (batch, 1), generator=g), length[:, None] + 2, length]
    if isinstance(decoder, FreeKVDecoder):
        args.append(torch.tensor(cfg.tau))
    return (*args, tuple(state))


def export_fixed_buffer_decoder(decoder: FixedBufferDecoder, path: str | Path) -> Path:
    """Export ``decoder`` (batch, buffer length and page count dynamic) to ``path``."""
    from edgec.exporters.torch_export import export_module
    from edgec.onnx_io import save_model

    cfg = decoder.model.cfg
    retrieval = isinstance(decoder, FreeKVDecoder)
    inputs, outputs = _names(decoder, cfg.layers)
    dims = {0: "batch_size", 2: "cache_length"}
    per = [dims, dims] + ([{0: "batch_size", 2: "pages"}] * 2 + [{0: "batch_size"}] * 2
                          if retrieval else [])
    shapes = {"input_ids": {0: "batch_size"}, "position_ids": {0: "batch_size"},
              "past_length": {0: "batch_size"},
              ("state" if retrieval else "cache"): [dict(d) for _ in range(cfg.layers)
                                                    for d in per]}
    result = export_module(decoder, _example(decoder), shapes, outputs, inputs)
    if retrieval:  # the wrapper reads the page layout the graph was built for from here
        result.model.metadata_props[METADATA_KEY] = json.dumps(decoder.config.to_json())
    path = Path(path)
    save_model(result.model, path)
    return path


def _module(module_or_source, config_name: str | None) -> nn.Module:
    if isinstance(module_or_source, nn.Module):
        return module_or_source.eval()
    from edgec.exporters.sources import names_reference_model
    from edgec.models import registry

    if Path(str(module_or_source)).is_dir() and not names_reference_model(module_or_source):
        from edgec.exporters.hf_decoder_view import view_hf_decoder

        return view_hf_decoder(module_or_source)  # a Hugging Face checkpoint directory
    if str(module_or_source) != "llama":
        raise UserError(f"FreeKV retrieval is built for the `llama` reference model and "
                        f"LLaMA-family checkpoints, not {module_or_source!r}")
    return registry.get("llama").build(config_name or "tiny")


def build_freekv_graph(module_or_source, info, config: FreeKVConfig | str, out_dir,
                       model_config: str | None = None, verify_on: str | None = None,
                       runtime_config=None) -> str | tuple[str, dict]:
    """Write the FreeKV decode graph into the artifact directory ``out_dir``; returns its path
    relative to it (the manifest's ``kv_retrieval.model``). ``info``: the artifact's
    ``DecoderInfo`` (checked against the module). With ``verify_on`` (a runtime name): (the
    path, ``verify_freekv_graph``'s fidelity on that runtime)."""
    model = _module(module_or_source, model_config)
    decoder = FreeKVDecoder(model, FreeKVConfig.parse(config))
    _check_info(model, info)
    path = export_fixed_buffer_decoder(decoder, Path(out_dir) / GRAPH_FILE)
    if verify_on is None:
        return GRAPH_FILE
    return GRAPH_FILE, verify_freekv_graph(model, info, path, verify_on, runtime_config)


def verify_freekv_graph(model: nn.Module, info, graph, runtime: str, runtime_config=None,
                        steps: int = 3) -> dict:
    """The FreeKV graph on ``runtime`` against the PyTorch model, where FreeKV is full attention
    (the context within the budget): two prompts, the second left-padded by a length that is no
    multiple of the page, long enough that the sink, retrieved pages and the recent window all
    hold tokens; ``steps`` tokens decoded teacher-forced, each step's logits against
    ``forward_cached`` over the whole sequence. Raises VerificationError past ``TARGET_RTOL``;
    returns a fidelity entry as the compile's other graphs have."""
    from edgec.exporters.verify import assert_close, compare_outputs
    from edgec.fidelity import TARGET_RTOL
    from edgec.runtimes.freekv import FreeKVCache, graph_config

    cfg, m = graph_config(graph), model.cfg
    prompt = min(cfg.sink + cfg.recent + cfg.page + cfg.page // 2 + 1, cfg.budget - steps)
    pad, total = cfg.page // 2 + 1, prompt + steps
    ids = torch.randint(0, m.vocab, (2, total), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, total, dtype=torch.int64)
    mask[1, :pad] = 0
    positions = torch.where(mask == 0, 1, mask.cumsum(1) - 1)  # as the generation loop's
    empty = torch.zeros(2, m.kv_heads, 0, m.head_dim)
    past = [(empty, empty)] * m.layers
    with torch.no_grad():
        want, _ = model.forward_cached(ids, mask, positions, past)
        _, presents = model.forward_cached(ids[:, :prompt], mask[:, :prompt],
                                           positions[:, :prompt], past)
    cache = FreeKVCache(None, graph, info, cfg, 2, runtime=runtime,
                        runtime_config=runtime_config)
    cache.load([(k.numpy(), v.numpy()) for k, v in presents], start=[0, pad])
    ids, mask, positions = ids.numpy(), mask.numpy(), positions.numpy()
    got = [cache.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1])[:, -1]
           for t in range(prompt, total)]
    errors = compare_outputs({"logits": np.stack(got, 1)},
                             {"logits": want[:, prompt:].numpy()})
    name = "onnxruntime" if runtime in ("ort", "onnxruntime") else runtime
    assert_close(errors, TARGET_RTOL, f"{GRAPH_FILE} on {name} vs PyTorch")
    return {"reference": "pytorch", "runtime": name, "rtol": TARGET_RTOL,
            "approximate": False, "outputs": errors,
            "check": (f"{steps} decode steps after a {prompt}-token prompt (a second row "
                      f"left-padded by {pad}), within the budget: full attention")}


def build_dense_graph(module_or_source, info, out_dir, model_config: str | None = None) -> str:
    """The dense fixed-buffer decode graph (the baseline FreeKV is measured against)."""
    model = _module(module_or_source, model_config)
    decoder = FixedBufferDecoder(model)
    _check_info(model, info)
    export_fixed_buffer_decoder(decoder, Path(out_dir) / DENSE_FILE)
    return DENSE_FILE


def _check_info(model, info) -> None:
    cfg = model.cfg
    if info is not None and (info.layers, info.heads, info.kv_heads, info.head_dim) != (
            cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim):
        raise UserError("the FreeKV graph's model does not match the artifact's decoder "
                        f"(layers/heads/kv_heads/head_dim {info.layers}/{info.heads}/"
                        f"{info.kv_heads}/{info.head_dim} vs {cfg.layers}/{cfg.heads}/"
                        f"{cfg.kv_heads}/{cfg.head_dim})")
