"""DartQuant rotation calibration: R1 and per-layer R2 learned on cached activations, no backprop
through the model.

    R = QR(Z).Q,  Z ∈ ℝ^{d×d} unconstrained, Z₀ = random Hadamard      (QR-Orth: plain Adam/SGD)
    loss(R) = mean over tokens of Σ_channels exp(−|x·R|)                  (the "whip" loss)

A rotation keeps each token's norm, so pushing mass away from zero pushes the distribution towards
uniform and shrinks its max: what 8- and 4-bit activation grids need. R1 trains on the normalized
residual stream that the q/k/v and gate/up projections read (pooled over layers), R2 per layer on
the o projection's input split into heads. The result plugs into ``RotatePass(rotations=...)``.

The whip loss flattens each *token* (DartQuant, like QuaRot, assumes per-token activation
scales), but every edgec target quantizes activations per *tensor* with calibrated static
ranges, and the loss does not see the weights at all. Where a residual stream carries massive,
nearly constant channels, the learned rotation gathers that constant component into a few
channels: each token looks flatter, but the tensor's range, set by those channels on every token,
grows (llama small+outliers R1: per-token max/RMS 2.25 → 1.58, per-tensor absmax/RMS 2.58 →
4.05, 8-bit error 0.0058 → 0.0088); and with 4-bit weights a rotation that flattens activations
can make the rotated weights' per-channel grids coarser. So each learned rotation is kept only
where it lowers the error of what the quantized model computes with it: the output of the
MatMuls that read the rotated space (for R1 the q/k/v/gate/up projections and the LM head, each
norm's scale folded in; for R2 the o projection), their weights rounded per output channel at
the scheme's weight width (to nearest, or by GPTQ where the compile runs it) and the rotated
activation on one per-tensor grid at its activation width, on the calibration activations
(``reader_error``). Elsewhere the Hadamard start stays (reported).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.rotation.hadamard import random_hadamard
from edgec.graph_passes.rotation.topology import Norm, Topology, analyze, const_array

__all__ = ["calibrate_rotation", "whip_loss", "collect_rotation_activations",
           "calibrate_rotations", "DartQuantResult", "reader_error", "hadamard_starts"]

CHOICE_ROWS = 2048  # calibration rows per tensor on which the learned and Hadamard R are compared


def whip_loss(y):
    """mean over tokens of Σ_channels exp(−|y|) (torch)."""
    return y.abs().neg().exp().sum(dim=-1).mean()


def calibrate_rotation(activations: np.ndarray, steps: int = 100, lr: float = 1e-2, seed: int = 0,
                       batch_size: int | None = 2048, optimizer: str = "adam",
                       on_step: Callable[[int, object], None] | None = None
                       ) -> tuple[np.ndarray, list[float]]:
    """An orthogonal R ([d, d], float64) minimizing the whip loss of ``activations @ R``.

    ``activations`` is [tokens, d]. Returns R and the loss curve: the loss of each step's batch
    before its update, then the loss of the final R on all tokens. ``on_step(step, z)`` is
    called after each update with the unconstrained parameter (R = QR(z).Q), for benchmarks.
    """
    import torch

    acts = np.asarray(activations, dtype=np.float32)
    x = torch.as_tensor(acts.reshape(-1, acts.shape[-1]))
    n, d = x.shape
    z = torch.nn.Parameter(torch.as_tensor(random_hadamard(d, seed), dtype=torch.float32))
    if optimizer == "adam":
        opt = torch.optim.Adam([z], lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD([z], lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    g = torch.Generator().manual_seed(seed)
    losses = []
    threads = torch.get_num_threads()
    if min(n, batch_size or n) * d * d <= 2**26:  # small: thread hand-offs cost more than they save
        torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch = x if batch_size is None or batch_size >= n else x[
                torch.randint(n, (batch_size,), generator=g)]
            loss = whip_loss(batch @ torch.linalg.qr(z).Q)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), z.detach())
        with torch.no_grad():
            r = torch.linalg.qr(z.detach().double()).Q
            losses.append(float(whip_loss(x.double() @ r)))
    finally:
        torch.set_num_threads(threads)
    return r.numpy(), losses


def _normalize(x: np.ndarray, kind: str, eps: float) -> np.ndarray:
    """What the norm's readers see once its scale is folded (and a LayerNorm made an RMSNorm)."""
    x = x.astype(np.float64)
    if kind == "layer":
        x = x - x.mean(axis=-1, keepdims=True)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def collect_rotation_activations(model: ir.Model, samples: Sequence[dict[str, np.ndarray]],
                                 max_tokens: int = 8192, seed: int = 0,
                                 topology: Topology | None = None, per_kv_head: bool = False
                                 ) -> dict[str, np.ndarray]:
    """``{"r1": [tokens, d], "r2.<layer>": [tokens·heads, head_dim]}`` from running ``model``.

    R1's tokens are the normalized inputs of every stream norm that feeds a layer (not the final
    norm), pooled; R2's are the o projection's input rows split per head (``per_kv_head``:
    ``[kv_heads, tokens·group, head_dim]``, the query heads of each GQA group pooled). Each set is
    subsampled to ``max_tokens`` rows (seeded). Keys are absent where the pass would skip them.
    """
    topo = topology or analyze(model.graph)
    return _pool(_tensor_rows(model, samples, topo), topo, max_tokens, seed, per_kv_head)


def _tensor_rows(model: ir.Model, samples: Sequence[dict[str, np.ndarray]], topo: Topology
                 ) -> dict[str, list[np.ndarray]]:
    """Each rotated space's tensor as the model computes it on ``samples``: tensor name → its
    rows ``[tokens, width]`` per sample (a stream norm's input, normalized as its readers see it
    once its scale is folded; an o projection's input)."""
    from edgec.runtimes.ort import model_feeds, open_model

    wanted: dict[str, Norm | None] = {}
    if topo.stream is not None:
        for norm, _ in topo.stream.blocks:
            wanted[norm.input.name] = norm
    for att in topo.attention:
        wanted[att.o.input.name] = None
    if not wanted:
        return {}
    aug = model.clone()
    values = {v.name: v for n in aug.graph for v in n.outputs}
    outputs = {v.name for v in aug.graph.outputs}
    for name in wanted:
        if name not in outputs:
            aug.graph.outputs.append(values[name])
    rows: dict[str, list[np.ndarray]] = {}
    with open_model(aug) as session:
        for feeds in samples:
            out = session.run(model_feeds(aug, feeds))
            for name, norm in wanted.items():
                x = out[name].reshape(-1, out[name].shape[-1])
                if norm is not None:
                    x = _normalize(x, norm.kind, norm.eps)
                rows.setdefault(name, []).append(x.astype(np.float32))
    return rows


def _pool(rows: dict[str, list[np.ndarray]], topo: Topology, max_tokens: int, seed: int,
          per_kv_head: bool) -> dict[str, np.ndarray]:
    """The rotations' training sets from ``_tensor_rows`` (see collect_rotation_activations)."""
    sets: dict[str, list[np.ndarray]] = {}
    names = [] if topo.stream is None else list(dict.fromkeys(
        n.input.name for n, _ in topo.stream.blocks[:-1]))
    if names:  # sample-major: each sample's norms in layer order
        sets["r1"] = [part for parts in zip(*(rows[n] for n in names)) for part in parts]
    for att in topo.attention:
        x = np.concatenate(rows[att.o.input.name])
        if per_kv_head:  # [tokens, heads·hd] → [kv, tokens·group, hd]
            x = x.reshape(-1, att.heads, att.head_dim)
            group = np.asarray(att.group)
            x = np.stack([x[:, group == g].reshape(-1, att.head_dim)
                          for g in range(att.kv_heads)])
        else:
            x = x.reshape(-1, att.head_dim)  # one row per head
        sets[f"r2.{att.layer}"] = [x]
    rng = np.random.default_rng(seed)
    result = {}
    for key, parts in sets.items():
        x = np.concatenate(parts, axis=-2)
        if x.shape[-2] > max_tokens:
            x = x[..., np.sort(rng.choice(x.shape[-2], max_tokens, replace=False)), :]
        result[key] = x
    return result


@dataclasses.dataclass
class DartQuantResult:
    rotations: dict[str, np.ndarray]  # RotatePass(rotations=...)
    loss: dict[str, tuple[float, float]]  # key → (whip loss of the Hadamard start, learned)
    tokens: dict[str, int]
    seconds: float
    # key → (reader_error with the Hadamard start, with the learned rotation)
    quant_error: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    bits: tuple[int, int] = (8, 8)  # (weights, activations) the choice was measured at
    gptq: bool = False  # ... with the weights rounded by GPTQ
    head_bits: tuple[int, int] | None = None  # ... and the LM head's widths (None: ``bits``)

    @property
    def kept(self) -> dict[str, str]:
        """key → "learned", or "hadamard" where the learned rotation quantizes worse."""
        return {k: "learned" if b < a else "hadamard" for k, (a, b) in self.quant_error.items()}

    def summary(self) -> dict:
        return {"rotations": sorted(self.rotations), "seconds": self.seconds,
                "tokens": self.tokens,
                "loss": {k: {"start": a, "final": b} for k, (a, b) in self.loss.items()},
                "reader_error": {k: {"hadamard": a, "learned": b}
                                 for k, (a, b) in self.quant_error.items()},
                "reader_bits": {"weights": self.bits[0], "activations": self.bits[1],
                                "head": list(self.head_bits or self.bits), "gptq": self.gptq},
                "kept": self.kept}


def reader_error(groups: Sequence[tuple[np.ndarray, np.ndarray, Sequence[np.ndarray],
                                         tuple[int, int]]], gptq: bool = False) -> float:
    """Relative L2 error of the readers' outputs when the model computes them rotated and
    quantized: ``x·W`` against ``Q_a(x·r)·Q_w(rᵀ·W)``, over every ``(x, r, [W, ...], bits)`` in
    ``groups`` (``x`` [tokens, d], ``r`` [d, d], each ``W`` [d, out]; ``bits``: the widths of
    weights and activations). Activations on one asymmetric grid over the rotated tensor, weights
    symmetric per output channel, as every edgec scheme quantizes them: rounded to nearest, or
    with ``gptq`` as ``--quantize ...:gptq=true`` rounds them (its clipped scales and error
    feedback, H from these ``x·r``), which repairs much of what a rotation does to the weights'
    grids."""
    from edgec.graph_passes.quantization.mixed_precision import (
        fake_quant_activation,
        fake_quant_weight,
    )

    err = ref = 0.0
    for x, r, weights, bits in groups:
        x = np.asarray(x, np.float64)
        r = np.asarray(r, np.float64)
        xr = x @ r
        xq = fake_quant_activation(xr, xr.min(), xr.max(), bits[1], symmetric=False)
        h = xr.T @ xr if gptq else None
        for w in weights:
            w = np.asarray(w, np.float64)
            y = x @ w
            wr = r.T @ w
            wq = _gptq_weight(wr, h, bits[0]) if gptq else fake_quant_weight(wr, bits[0], -1)
            err += float(np.sum((y - xq @ wq) ** 2))
            ref += float(np.sum(y * y))
    return float(np.sqrt(err / (ref or 1.0)))


def _gptq_weight(w: np.ndarray, h: np.ndarray, bits: int) -> np.ndarray:
    """``w`` [K, N] on a symmetric per-output-channel ``bits``-bit grid, rounded by GPTQ."""
    from edgec.graph_passes.quantization.gptq import clipped_scale, gptq_round

    top = 2 ** (bits - 1) - 1
    bound = np.abs(w).max(axis=0)
    scale = clipped_scale(w, h, np.where(bound > 0, bound / top, 1.0), -top - 1, top)
    return gptq_round(w, h, scale, np.zeros_like(scale), -top - 1, top) * scale


def _reader_groups(key: str, r: np.ndarray, rows: dict[str, list[np.ndarray]], topo: Topology,
                   bits: tuple[int, int], head_bits: tuple[int, int], rng: np.random.Generator):
    """``reader_error``'s groups for rotation ``key`` = ``r``: R1, every stream norm's readers
    (its scale folded into their weights), the final norm's (the LM head) at ``head_bits``; R2,
    the o projection with ``r`` on each query head's rows (a GQA group's, with one per kv
    head)."""
    def sample(name: str) -> np.ndarray:
        x = np.concatenate(rows[name])
        return x[np.sort(rng.choice(len(x), CHOICE_ROWS, replace=False))] \
            if len(x) > CHOICE_ROWS else x

    if key == "r1":
        for i, (norm, readers) in enumerate(topo.stream.blocks):
            gamma = const_array(norm.scale) if norm.scale is not None else None
            g = np.ones(r.shape[0]) if gamma is None else np.broadcast_to(
                np.asarray(gamma, np.float64).reshape(-1), (r.shape[0],))
            yield (sample(norm.input.name), r, [g[:, None] * lin.weight() for lin in readers],
                   head_bits if i == len(topo.stream.blocks) - 1 else bits)
        return
    att = next(a for a in topo.attention if f"r2.{a.layer}" == key)
    block = np.zeros((att.heads * att.head_dim,) * 2)
    for h, row in enumerate(att.o_rows):
        block[row:row + att.head_dim, row:row + att.head_dim] = \
            r[att.group[h]] if r.ndim == 3 else r
    yield sample(att.o.input.name), block, [att.o.weight()], bits


def calibrate_rotations(model: ir.Model, samples: Sequence[dict[str, np.ndarray]],
                        steps: int = 100, lr: float = 1e-2, seed: int = 0,
                        max_tokens: int = 8192, per_kv_head: bool = False,
                        bits: tuple[int, int] = (8, 8), gptq: bool = False,
                        head_bits: tuple[int, int] | None = None) -> DartQuantResult:
    """Collect the activations (``collect_rotation_activations``) and calibrate R1 and every R2
    (one [hd, hd] per layer, or with ``per_kv_head`` one per GQA group: [kv_heads, hd, hd]).
    Each learned rotation is kept where its ``reader_error`` at ``bits`` (weights, activations:
    the scheme the rotation serves; ``head_bits``: the LM head's, where the scheme keeps it
    wider; ``gptq``: weights rounded as GPTQ will) is below its Hadamard start's (module
    docstring).

    Seeds match ``RotatePass``'s Hadamard defaults, so ``steps=0`` reproduces ``--rotate
    hadamard`` (up to column signs, which the whip loss and exactness do not see).
    """
    t0 = time.perf_counter()
    topo = analyze(model.graph)
    rows = _tensor_rows(model, samples, topo)
    acts = _pool(rows, topo, max_tokens, seed, per_kv_head)
    rotations, loss, quant_error = {}, {}, {}
    for key, x in acts.items():
        layer_seed = _seed(key, seed)
        hadamard = random_hadamard(x.shape[-1], layer_seed)
        start = _full_loss(x, hadamard)
        fits = [calibrate_rotation(part, steps, lr, layer_seed) for part in x.reshape(
            -1, *x.shape[-2:])]
        r = np.stack([f[0] for f in fits]) if x.ndim == 3 else fits[0][0]
        loss[key] = (start, float(np.mean([f[1][-1] for f in fits])))
        if steps:  # the learned rotation only where the quantized readers gain by it
            h = np.broadcast_to(hadamard, r.shape)
            quant_error[key] = tuple(
                reader_error(list(_reader_groups(key, m, rows, topo, bits, head_bits or bits,
                                                 np.random.default_rng(seed))), gptq)
                for m in (h, r))
            if quant_error[key][1] >= quant_error[key][0]:
                r = np.array(h)
        rotations[key] = r
    return DartQuantResult(rotations, loss, {k: v.shape[-2] for k, v in acts.items()},
                           time.perf_counter() - t0, quant_error, tuple(bits), gptq,
                           tuple(head_bits or bits))


def _full_loss(x: np.ndarray, r: np.ndarray) -> float:
    return float(np.exp(-np.abs(x.astype(np.float64) @ r)).sum(axis=-1).mean())


def _seed(key: str, seed: int) -> int:
    """The seed of rotation ``key``'s random Hadamard, as ``RotatePass`` draws it."""
    return seed if key == "r1" else seed + 1 + int(key.split(".")[1])


def hadamard_starts(rotations: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """The random Hadamards DartQuant started from, one per key of ``rotations`` and shaped
    like it: what ``--rotate hadamard`` with the same seed rotates by."""
    return {key: np.array(np.broadcast_to(random_hadamard(r.shape[-1], _seed(key, seed)),
                                          r.shape)) for key, r in rotations.items()}
