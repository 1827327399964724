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
ranges. Where a residual stream carries massive, nearly constant channels, the learned rotation
gathers that constant component into a few channels: each token looks flatter, but the
tensor's range, set by those channels on every token, grows (llama small+outliers R1: per-token
max/RMS 2.25 → 1.58, per-tensor absmax/RMS 2.58 → 4.05, 8-bit error 0.0058 → 0.0088). So each
learned rotation is kept only where it lowers the per-tensor 8-bit quantization error of the
calibration activations below its Hadamard start's; elsewhere the Hadamard stays (reported).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.rotation.hadamard import random_hadamard
from edgec.graph_passes.rotation.topology import Topology, analyze

__all__ = ["calibrate_rotation", "whip_loss", "collect_rotation_activations",
           "calibrate_rotations", "DartQuantResult", "per_tensor_error"]


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
    from edgec.runtimes.ort import model_feeds, open_model

    topo = topology or analyze(model.graph)
    wanted: dict[str, tuple[str, object]] = {}  # tensor name → (key, how to turn it into rows)
    if topo.stream is not None:
        for norm, _ in topo.stream.blocks[:-1]:
            wanted[norm.input.name] = ("r1", norm)
    for att in topo.attention:
        wanted[att.o.input.name] = (f"r2.{att.layer}", att)
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
            for name, (key, what) in wanted.items():
                x = out[name]
                if key == "r1":
                    x = _normalize(x.reshape(-1, x.shape[-1]), what.kind, what.eps)
                elif per_kv_head:  # [..., heads·hd] → [kv, tokens·group, hd]
                    x = x.reshape(-1, what.heads, what.head_dim)
                    group = np.asarray(what.group)
                    x = np.stack([x[:, group == g].reshape(-1, what.head_dim)
                                  for g in range(what.kv_heads)])
                else:
                    x = x.reshape(-1, what.head_dim)  # [..., heads·hd] → one row per head
                rows.setdefault(key, []).append(x.astype(np.float32))
    rng = np.random.default_rng(seed)
    result = {}
    for key, parts in rows.items():
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
    # key → (per-tensor 8-bit error with the Hadamard start, with the learned rotation)
    quant_error: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

    @property
    def kept(self) -> dict[str, str]:
        """key → "learned", or "hadamard" where the learned rotation quantizes worse."""
        return {k: "learned" if b < a else "hadamard" for k, (a, b) in self.quant_error.items()}

    def summary(self) -> dict:
        return {"rotations": sorted(self.rotations), "seconds": self.seconds,
                "tokens": self.tokens,
                "loss": {k: {"start": a, "final": b} for k, (a, b) in self.loss.items()},
                "per_tensor_error": {k: {"hadamard": a, "learned": b}
                                     for k, (a, b) in self.quant_error.items()},
                "kept": self.kept}


def per_tensor_error(x: np.ndarray, r: np.ndarray, bits: int = 8) -> float:
    """Relative L2 error of ``x·r`` under one asymmetric ``bits``-bit range over the whole
    tensor (what a static activation quantizer does). ``x`` [tokens, d] with ``r`` [d, d], or
    per group: [g, tokens, d] with [g, d, d] (one range over all groups)."""
    from edgec.graph_passes.quantization.mixed_precision import fake_quant_activation

    y = np.asarray(x, np.float64) @ np.asarray(r, np.float64)
    err = y - fake_quant_activation(y, y.min(), y.max(), bits, symmetric=False)
    return float(np.linalg.norm(err) / (np.linalg.norm(y) or 1.0))


def calibrate_rotations(model: ir.Model, samples: Sequence[dict[str, np.ndarray]],
                        steps: int = 100, lr: float = 1e-2, seed: int = 0,
                        max_tokens: int = 8192, per_kv_head: bool = False) -> DartQuantResult:
    """Collect the activations (``collect_rotation_activations``) and calibrate R1 and every R2
    (one [hd, hd] per layer, or with ``per_kv_head`` one per GQA group: [kv_heads, hd, hd]).

    Seeds match ``RotatePass``'s Hadamard defaults, so ``steps=0`` reproduces ``--rotate
    hadamard`` (up to column signs, which the whip loss and exactness do not see).
    """
    t0 = time.perf_counter()
    topo = analyze(model.graph)
    acts = collect_rotation_activations(model, samples, max_tokens, seed, topo, per_kv_head)
    rotations, loss, quant_error = {}, {}, {}
    for key, x in acts.items():
        layer_seed = seed if key == "r1" else seed + 1 + int(key.split(".")[1])
        hadamard = random_hadamard(x.shape[-1], layer_seed)
        start = _full_loss(x, hadamard)
        fits = [calibrate_rotation(part, steps, lr, layer_seed) for part in x.reshape(
            -1, *x.shape[-2:])]
        r = np.stack([f[0] for f in fits]) if x.ndim == 3 else fits[0][0]
        loss[key] = (start, float(np.mean([f[1][-1] for f in fits])))
        if steps:  # the learned rotation only where per-tensor quantization gains by it
            h = np.broadcast_to(hadamard, r.shape)
            quant_error[key] = (per_tensor_error(x, h), per_tensor_error(x, r))
            if quant_error[key][1] >= quant_error[key][0]:
                r = np.array(h)
        rotations[key] = r
    return DartQuantResult(rotations, loss, {k: v.shape[-2] for k, v in acts.items()},
                           time.perf_counter() - t0, quant_error)


def _full_loss(x: np.ndarray, r: np.ndarray) -> float:
    return float(np.exp(-np.abs(x.astype(np.float64) @ r)).sum(axis=-1).mean())
