"""The schedules and solvers of diffusers' video pipelines, re-derived in numpy so a compiled
denoiser samples what the pipeline samples from the same latents (tests hold each to diffusers):

- CogVideoX: ``CogVideoXDDIMScheduler`` (v prediction, scaled-linear betas, SNR shift, zero
  terminal SNR, trailing timesteps), deterministic DDIM (η = 0); ``CogVideoXDPMScheduler``
  (the same schedule; the stochastic DPM-Solver++(2M) step the CogVideoX-5B recipe uses);
- Wan: ``UniPCMultistepScheduler`` on flow sigmas (the hub pipelines' scheduler: predictor and
  corrector of order ≤ ``solver_order``, B(h) = e^h − 1 (bh2) or h (bh1), lower order at the
  last step), and ``FlowMatchEulerDiscreteScheduler``'s sigma grid for plain Euler.

Each pipeline's quirks are kept where they change the result: the UniPC flow timesteps are the
sigmas × 1000 truncated to integers, and FlowMatchEuler shifts its smallest sigma twice.
"""

from __future__ import annotations

import math

import numpy as np

from edgec.errors import UserError

__all__ = ["ddim_v_alphas", "ddim_v_timesteps", "dpm_sde_step", "flowmatch_sigmas",
           "unipc_sigmas", "UniPC"]


def ddim_v_alphas(spec) -> np.ndarray:
    """ᾱ_t as CogVideoXDDIMScheduler builds it: betas linear in √β (scaled_linear) or in β,
    the SNR shifted by ``snr_shift`` (ᾱ / (s + (1 − s)ᾱ)), then rescaled to zero terminal SNR
    when ``zero_snr``."""
    n = spec.train_steps
    if spec.schedule == "scaled_linear":
        betas = np.linspace(spec.beta_start ** 0.5, spec.beta_end ** 0.5, n) ** 2
    elif spec.schedule == "linear":
        betas = np.linspace(spec.beta_start, spec.beta_end, n, dtype=np.float32)
    else:
        raise UserError(f"beta schedule {spec.schedule!r} unknown for ddim-v; upgrade edgec")
    alphas = np.cumprod(1.0 - betas.astype(np.float64))
    alphas = alphas / (spec.snr_shift + (1.0 - spec.snr_shift) * alphas)
    if spec.zero_snr:
        root = np.sqrt(alphas)
        first, last = root[0], root[-1]
        alphas = ((root - last) * first / (first - last)) ** 2
    return alphas


def ddim_v_timesteps(spec, steps: int) -> np.ndarray:
    """The integer timesteps of diffusers' DDIM ``set_timesteps`` for this spacing."""
    n = spec.train_steps
    if steps > n:
        raise UserError(f"steps={steps}: this model's scheduler has {n} train steps; give at "
                        f"most {n}")
    if spec.spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    if spec.spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    return (np.arange(steps) * (n // steps))[::-1].astype(np.int64)  # leading, offset 0


def _half_log_snr(a: float) -> float:
    """λ = log √(ᾱ / (1 − ᾱ)), ±inf at ᾱ = 0 (zero terminal SNR) and ᾱ = 1 (past the end)."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return 0.5 * math.log(a / (1.0 - a))


def dpm_sde_step(x: np.ndarray, x0: np.ndarray, old_x0: np.ndarray | None, a: float,
                 a_prev: float, a_back: float | None, last: bool, rng: np.random.Generator
                 ) -> np.ndarray:
    """One step of CogVideoXDPMScheduler.step: SDE DPM-Solver++(2M) from ᾱ ``a`` to
    ``a_prev`` given the data prediction ``x0``, second order on the previous step's ``old_x0``
    (ᾱ ``a_back``) except on the first and the ``last`` step. It draws a noise for the
    first-order update and, when it goes on to second order, a second one (as diffusers does:
    the first is then unused), so a seed gives the pipeline's stream of draws."""
    h = _half_log_snr(a_prev) - _half_log_snr(a)
    m_x = math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.exp(-h)
    m_x0 = math.expm1(-2.0 * h) * math.sqrt(a_prev)
    m_noise = math.sqrt(1.0 - a_prev) * math.sqrt(-math.expm1(-2.0 * h))
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if old_x0 is None or last:
        return (m_x * x - m_x0 * x0 + m_noise * noise).astype(np.float32)
    h_last = _half_log_snr(a) - _half_log_snr(a_back)
    half_inv_r = h / (2.0 * h_last) if math.isfinite(h_last) else 0.0  # 1 / 2r, r = h_last / h
    d = (1.0 + half_inv_r) * x0 - half_inv_r * old_x0
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return (m_x * x - m_x0 * d + m_noise * noise).astype(np.float32)


def _shifted(sigmas, shift: float):
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flowmatch_sigmas(steps: int, shift: float, train_steps: int = 1000
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas + a final 0, timesteps) of FlowMatchEulerDiscreteScheduler: σ from 1 to its
    smallest training σ (already shifted), shifted again, timesteps σ·T."""
    train = np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1] / train_steps
    sigma_min = float(_shifted(train.astype(np.float32), np.float32(shift))[-1])
    t = np.linspace(train_steps * 1.0, sigma_min * train_steps, steps)
    sigmas = _shifted(t / train_steps, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0.0)), sigmas * np.float32(train_steps)


def unipc_sigmas(steps: int, shift: float, train_steps: int = 1000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas + a final 0, timesteps) of UniPCMultistepScheduler with ``use_flow_sigmas``:
    σ = shift(linspace(1, 1/T, steps + 1)[:-1]), the first nudged below 1, the timesteps σ·T
    cast to int64 (truncated) as diffusers casts them."""
    sigmas = _shifted(np.linspace(1.0, 1.0 / train_steps, steps + 1)[:-1], shift)
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * train_steps).astype(np.int64)
    return np.append(sigmas, 0.0).astype(np.float32), timesteps


class UniPC:
    """UniPC (Zhao et al. 2023) in data prediction on flow sigmas (α = 1 − σ), as diffusers'
    UniPCMultistepScheduler steps: each call takes the model's flow prediction v at step i,
    corrects the sample the last predictor made (UniC), then predicts step i + 1 (UniP)."""

    def __init__(self, sigmas: np.ndarray, order: int = 2, bh2: bool = True,
                 lower_order_final: bool = True, skip_corrector: tuple[int, ...] = ()):
        self.sigmas = sigmas.astype(np.float64)
        self.steps = len(sigmas) - 1
        self.order, self.bh2, self.lower_final = order, bh2, lower_order_final
        self.skip = set(skip_corrector)
        self.outputs: list[tuple[int, np.ndarray]] = []  # (sigma index, x0 prediction), newest last
        self.last: np.ndarray | None = None
        self.this_order, self.warm = 1, 0

    def lam(self, k: int) -> float:
        s = self.sigmas[k]
        return math.inf if s == 0 else math.log(1.0 - s) - math.log(s)

    def __call__(self, i: int, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        m = x - np.float32(self.sigmas[i]) * v
        if i > 0 and self.last is not None and i - 1 not in self.skip:
            x = self._update(self.last, i, self.this_order, model_t=m)
        self.outputs = [*self.outputs, (i, m)][-self.order:]
        order = min(self.order, self.steps - i) if self.lower_final else self.order
        self.this_order = min(order, self.warm + 1)
        self.last = x
        x_next = self._update(x, i + 1, self.this_order)
        self.warm = min(self.warm + 1, self.order)
        return x_next.astype(np.float32)

    def _update(self, x, t: int, order: int, model_t=None):
        """UniP (``model_t`` None) from the newest output to sigma ``t``, or UniC: ``x`` is the
        sample the predictor started from and ``model_t`` the prediction at ``t``."""
        s0, m0 = self.outputs[-1]
        history = self.outputs[-order:-1][::-1]  # older outputs, newest first
        h = self.lam(t) - self.lam(s0)
        rks = [(self.lam(si) - self.lam(s0)) / h for si, _ in history] + [1.0]
        d1s = [(mi - m0) / rk for (_, mi), rk in zip(history, rks)]
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh) if self.bh2 else hh
        h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        r = np.array([np.power(rks, k) for k in range(order)])
        alpha_t, sigma_t = 1.0 - self.sigmas[t], self.sigmas[t]
        base = (sigma_t / self.sigmas[s0]) * x - (alpha_t * h_phi_1) * m0
        if model_t is None:
            if not d1s:
                return base
            rhos = [0.5] if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
            return base - (alpha_t * b_h) * sum(p * d for p, d in zip(rhos, d1s))
        rhos = [0.5] if order == 1 else np.linalg.solve(r, b)
        corr = sum((p * d for p, d in zip(rhos[:-1], d1s)), np.zeros_like(x))
        return base - (alpha_t * b_h) * (corr + rhos[-1] * (model_t - m0))
