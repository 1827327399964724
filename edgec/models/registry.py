"""Reference-model registry: name → ModelSpec (builder, inputs, dynamic dims, configs).

A config string is a base config name optionally followed by ``+option`` flags, e.g.
``small+outliers``; each spec declares which configs and options it accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from edgec.errors import UserError

__all__ = ["ModelSpec", "register", "get", "names", "parse_config", "timesteps"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and export one reference model.

    Attributes:
        name: registry name (``video-dit``).
        description: one line for ``edgec models``.
        configs: base config names; ``tiny`` (tests, well under a second), ``small``
            (benchmarks), ``base`` (realistic).
        options: ``+option`` flags accepted after a config name, with a one-line meaning.
        input_names: ONNX input names, in ``forward`` argument order.
        output_names: ONNX output names.
        builder: ``(config, options) -> nn.Module`` in eval mode, weights deterministic.
        inputs: ``(config, options, seed) -> tuple[Tensor, ...]`` one example input set.
        dynamic: ``(config, options) -> {input name: {axis: dim name}}``; the dims that may
            vary at run time.
        describe: ``(config, options) -> dict`` of the config's hyper-parameters (for reports).
        paper: the method or paper the model follows (``edgec models`` shows it).
        sampling: how ``Session.sample`` runs a diffusion model from noise (None: not one).
            Keys: ``kind`` (``flow``: the output is the velocity ε − x0 and Euler steps σ from
            1 to 0; ``ddim-x0``: the output is x0 and DDIM steps over ``train_steps``;
            ``score``: the output is the score of a sub-VP SDE, t in (0, 1]); ``samples``
            ({noisy input name: output name predicting it}); ``timestep`` (input name) and
            ``timestep_scale`` (the model's timestep = σ or t times this); ``conditions``
            (inputs zeroed in the unconditional half of classifier-free guidance);
            ``guidance`` and ``steps`` (defaults); ``shift`` (flow σ shift); ``schedule``
            (``cosine`` | ``linear``, ddim) and ``beta_min``/``beta_max`` (score).
    """

    name: str
    description: str
    configs: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    builder: Callable[[str, frozenset[str]], torch.nn.Module]
    inputs: Callable[[str, frozenset[str], int], tuple[torch.Tensor, ...]]
    dynamic: Callable[[str, frozenset[str]], Mapping[str, Mapping[int, str]]]
    describe: Callable[[str, frozenset[str]], dict[str, Any]]
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    paper: str = ""
    sampling: Mapping[str, Any] | None = None
    # calibrate on the sampler's own fp32 trajectory (``edgec.calibration.trajectory``) rather
    # than on independent draws; off for a model used mostly outside its sampler (a prior)
    trajectory_calibration: bool = True

    def resolve(self, config: str | None) -> tuple[str, frozenset[str]]:
        """Split and validate a config string; raises UserError naming what is allowed."""
        base, opts = parse_config(config or "tiny")
        if base not in self.configs:
            raise UserError(
                f"unknown config {base!r} for model {self.name!r}; "
                f"choose one of: {', '.join(self.configs)}"
            )
        unknown = sorted(opts - set(self.options))
        if unknown:
            allowed = ", ".join(f"+{o}" for o in self.options) or "none"
            raise UserError(
                f"unknown option {'+' + unknown[0]!r} for model {self.name!r}; allowed: {allowed}"
            )
        return base, opts

    def build(self, config: str | None = None) -> torch.nn.Module:
        base, opts = self.resolve(config)
        return self.builder(base, opts).eval()

    def example_inputs(self, config: str | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        base, opts = self.resolve(config)
        return self.inputs(base, opts, seed)

    def dynamic_shapes(self, config: str | None = None) -> dict[str, dict[int, str]]:
        base, opts = self.resolve(config)
        return {k: dict(v) for k, v in self.dynamic(base, opts).items()}

    def calibration_inputs(self, config: str | None = None, n: int = 8
                           ) -> list[tuple[torch.Tensor, ...]]:
        """``n`` input sets to calibrate on: a diffusion denoiser's are the feeds its own
        sampler ran on the fp32 model (``edgec.calibration.trajectory``: its noisy inputs as
        sampling meets them, which independent draws did not hold), other models'
        ``drawn_inputs``."""
        if self.calibrates_on_trajectory:
            from edgec.calibration.trajectory import trajectory_inputs

            return trajectory_inputs(self, config or "tiny", n)
        return self.drawn_inputs(config, n)

    @property
    def calibrates_on_trajectory(self) -> bool:
        """A diffusion denoiser that calibrates on its sampler's trajectory
        (``trajectory_calibration``), not on ``drawn_inputs``."""
        return bool(self.sampling and self.trajectory_calibration)

    def drawn_inputs(self, config: str | None = None, n: int = 8
                     ) -> list[tuple[torch.Tensor, ...]]:
        """``n`` input sets drawn with seeds 1000..1000+n (disjoint from the example seed 0),
        a guided denoiser's unconditional ones among them (``unconditional``)."""
        base, opts = self.resolve(config)
        return [self.unconditional(self.inputs(base, opts, seed), seed)
                for seed in range(1000, 1000 + n)]

    def unconditional(self, inputs: tuple[torch.Tensor, ...], seed: int
                      ) -> tuple[torch.Tensor, ...]:
        """``inputs`` (drawn with ``seed``) with the sampler's conditions zeroed, as the
        unconditional half of classifier-free guidance feeds them (``_Denoiser.null``), in every
        set whose seed is 1 mod 4 (its timesteps uniform: ``timesteps`` puts the ends at 2 and
        3; the example, seed 0, stays conditional); other sets, and a model without
        conditions, unchanged. Guidance runs the model on zeroed conditions once a step, but
        calibration and the accuracy floor's held-out sets (any 4 seeds in a row) saw real ones
        only: reactive-dance tiny qnn-htp w8a8 held cosine 0.9988 on them and 0.98 on zeros."""
        conditions = set((self.sampling or {}).get("conditions") or ())
        if not conditions or seed % 4 != 1:
            return inputs
        return tuple(torch.zeros_like(t) if name in conditions else t
                     for name, t in zip(self.input_names, inputs))

    def hyperparameters(self, config: str | None = None) -> dict[str, Any]:
        base, opts = self.resolve(config)
        return self.describe(base, opts)


def timesteps(batch: int, seed: int, first: float, last: float, g: torch.Generator
              ) -> torch.Tensor:
    """A denoiser's example timesteps over its sampler's whole range, first to last step:
    uniform per row, but every set whose ``seed`` is 2 mod 4 all at ``first`` and 3 mod 4 all
    at ``last`` (one uniform draw either way, so the other inputs' draws do not move; seed 0,
    the example, stays uniform; 1 mod 4 is ``ModelSpec.unconditional``'s). Calibration (seeds
    1000 on) sees both end points, and so does the accuracy floor's held-out sets (any 4 seeds
    in a row), each end a set of its own (the floor's worst cosine is per set): uniform draws
    alone stopped short of them (motion-gen's timestep range ended at 972 of the sampler's
    1000; pose-prior's t at 0.05 of its 1e-3), and the quantized graph clamped every step
    beyond."""
    t = last + (first - last) * torch.rand(batch, generator=g)
    if seed % 4 >= 2:
        t = torch.full((batch,), float(first if seed % 4 == 2 else last))
    return t


_REGISTRY: dict[str, ModelSpec] = {}
# modules under edgec.models that register a reference model when imported
BUILTIN = ("llama", "vlm", "video_dit", "motion_dit", "motion_gen", "reactive_dance",
           "motion_recovery", "pose_prior")


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    # Imported lazily so `import edgec` stays light; each module calls register().
    import importlib

    for module in BUILTIN:
        importlib.import_module(f"edgec.models.{module}")


def get(name: str) -> ModelSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; `edgec models` lists: "
                        f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def parse_config(config: str) -> tuple[str, frozenset[str]]:
    base, *opts = config.split("+")
    return base, frozenset(o for o in opts if o)


def specs() -> Sequence[ModelSpec]:
    _load_builtin()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]
