"""``--rotate hadamard|dartquant[:k=v,...]`` (Python ``rotate=``) and the pass it makes.

``r4=true|false``: the online Hadamard before each FFN down projection. By default it is on
where R1 rotates the residual stream (pre-norm decoders: QuaRot's and DartQuant's recipe, whose
online R4 is part of the method) and off elsewhere (post-norm encoders, AdaLN DiTs), where it is
the only rotation left and costs speed on the CPU targets (it runs in float there): measured on
SmolLM2-135M (trained, 30 layers) w8a8 on openvino-cpu, perplexity 185 without it and 110 with it
(fp32 91.7), because a trained decoder's first token feeds some down projections 100-3000× a
typical token's activation (README, "A real LLaMA-family decoder"). On a fully quantized target
(qnn-htp) it is off unless asked for: there every tensor is quantized, the spiking inputs are
already at 16 bits (their measured crest factor), and R4 only adds its own rounding: the same
model w8a8 on the HTP, perplexity 102.4 with R1 + R2 and 112.4 with R4 as well. ``steps=N``
DartQuant's optimization steps (default 100); ``seed=N`` the random Hadamards' seed.

``accept=true|false`` (DartQuant, default true): where a learned rotation was kept, the compile
quantizes the graph with its Hadamard starts as well and keeps the learned rotations only where
they compute every one of the floor's held-out samples better as quantized, paired per sample
(``pipeline._accepted``); else the Hadamard starts. A rotation is chosen from calibration
activations at single MatMuls, and on llama small+outliers with GPTQ the learned R2s lowered the
o projections' error by 3–31% and the logits' not at all (0.2–0.5% worse than the Hadamard); on
SmolLM2-135M a better worst sample of 4 kept learned R2s that were worse on 24 other sentences.
It costs one more quantization; ``accept=false`` skips it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes.rotation.rotate import METHODS, RotatePass
from edgec.options import convert_items, split_spec

__all__ = ["RotateOptions", "DartQuantRotatePass"]


@dataclasses.dataclass(frozen=True)
class RotateOptions:
    method: str
    r4: bool | None = None  # None: on where R1 passes (module docstring)
    steps: int = 100
    seed: int = 0
    accept: bool = True  # DartQuant: check the learned rotations end to end (docstring)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown rotation {self.method!r}; use --rotate "
                            f"{' | '.join(METHODS)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise UserError("--rotate steps must be an integer ≥ 0")

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | RotateOptions) -> RotateOptions:
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, Mapping):
            items = dict(spec)
            method = items.pop("method", None)
        else:
            method, items = split_spec(str(spec), "--rotate", head=":")
        if not method:
            raise UserError(f"--rotate needs a method: {' | '.join(METHODS)}[:k=v,...]")
        return cls(method=method, **convert_items(cls, items, "--rotate", ("method",)))

    def make_pass(self, src, calibration=None, target=None, quantize=None,
                  rotations=None) -> EdgecPass:
        """``calibration``: the compile's ``--calib`` (a cache whose stored DartQuant rotations
        are reused instead of learned again; an .npz of samples DartQuant learns from, as the
        quantizer calibrates on them). ``target``: on a
        fully quantized one, R4 is off unless asked for (module docstring). ``quantize``: the
        compile's ``QuantizeOptions``; DartQuant keeps a learned rotation only where it lowers
        the quantized readers' error at that scheme's widths (8-bit without one), its weights
        rounded as the quantize stage will (GPTQ or nearest). ``rotations``: DartQuant's
        matrices as another graph of the same model calibrated and chose them (a generation
        artifact's decode, prefill and dense graphs take the main graph's, so every graph holds
        the same weights)."""
        opts = self
        if self.r4 is None and target is not None and target.fully_quantized:
            opts = dataclasses.replace(self, r4=False)
        if self.method == "dartquant":
            from edgec.calibration import CalibrationCache

            cache = calibration if isinstance(calibration, CalibrationCache) else None
            data = Path(calibration) if isinstance(calibration, (str, os.PathLike)) else None
            if quantize is None or target is None:
                return DartQuantRotatePass(opts, src, cache, given=rotations, data=data)
            return DartQuantRotatePass(opts, src, cache, quantize.bits_on(target),
                                       quantize.gptq_on(target, rotated=True),
                                       quantize.head_bits_on(target), given=rotations,
                                       data=data)
        return RotatePass("hadamard", src.parameter_map, online_r4=opts.r4, seed=opts.seed)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DartQuantRotatePass(EdgecPass):
    """DartQuant: calibrate R1/R2 on the graph this pass receives (its activations on the
    source's calibration samples; QR-Orth, whip loss), then rotate with them (exact)."""

    name = "rotate"
    exact = True
    rtol = 1e-4

    def __init__(self, options: RotateOptions, src, cache=None,
                 bits: tuple[int, int] = (8, 8), gptq: bool = False,
                 head_bits: tuple[int, int] | None = None, given=None,
                 data: Path | None = None):
        super().__init__()
        self.options, self.src, self.cache = options, src, cache
        self.data = data  # the user's .npz of samples (else the source's generated ones)
        self.given = given  # rotations another graph of the model calibrated (``make_pass``)
        self.rotations: dict | None = None  # what ``call`` rotated with
        self.bits, self.gptq = tuple(bits), bool(gptq)
        self.head_bits = tuple(head_bits or bits)
        # (graph hash, DartQuantResult) when this pass calibrated; for the Hadamard starts the
        # end-to-end check kept (``pipeline._accepted``), the learned pass's
        self.learned = None
        self.origin = None  # where the samples it learned from came from
        self.lora_transforms: dict = {}  # swappable-LoRA site transforms (see RotatePass)

    def _key(self) -> dict[str, Any]:
        return {"steps": self.options.steps, "seed": self.options.seed,
                "bits": list(self.bits), "head_bits": list(self.head_bits), "gptq": self.gptq}

    def _samples(self) -> tuple[list[dict], str]:
        """What DartQuant learns from: the user's calibration .npz (it learned from the
        source's random feeds even where the user gave real ones), else generated samples."""
        from edgec.calibration.samples import generated_samples, source_samples_from_npz

        if self.data is None:
            return generated_samples(self.src)
        return source_samples_from_npz(self.data, self.src), self.data.name

    def call(self, model) -> PassResult:
        from edgec.calibration import model_hash
        from edgec.calibration.dartquant import calibrate_rotations
        from edgec.calibration.samples import samples_for_model

        graph = model_hash(model)
        stored = self.cache.load_rotations(graph, self._key()) if self.cache else None
        if self.given is not None:
            rotations, stats = self.given, {"from_main_graph": True}
        elif stored is not None:
            rotations = stored
            stats = {**self.cache.rotations.get("summary", {}), "from_cache": True}
        else:
            samples, origin = self._samples()
            result = calibrate_rotations(model, samples_for_model(samples, model),
                                         steps=self.options.steps, seed=self.options.seed,
                                         bits=self.bits, gptq=self.gptq,
                                         head_bits=self.head_bits)
            if not result.rotations:  # RotatePass would say "run edgec calibrate first"
                raise _nothing_to_learn(model)
            rotations, self.learned = result.rotations, (graph, result)
            self.origin = origin
            stats = {**result.summary(), "samples": len(samples), "data": origin,
                     "from_cache": False}
        self.rotations = rotations
        rotate = RotatePass("dartquant", self.src.parameter_map, rotations,
                            online_r4=self.options.r4, seed=self.options.seed)
        out = rotate.call(model)
        self.lora_transforms = rotate.lora_transforms
        out.stats["dartquant"] = stats
        return out

    def store(self, cache, directory, record: dict | None = None) -> bool:
        """Put the rotations this pass rotated with into ``cache`` (files in ``directory``):
        the learned ones, or the Hadamard starts the end-to-end check kept; ``record``: the
        rotate stage's ``dartquant`` stats after that check, whose verdict (``kept``,
        ``reader_kept``, ``end_to_end``) a compile with the cache reports."""
        if self.learned is None:
            return False
        graph, result = self.learned
        checked = {k: record[k] for k in ("kept", "reader_kept", "end_to_end")
                   if k in (record or {})}
        summary = {**{k: v for k, v in result.summary().items() if k != "rotations"},
                   "data": self.origin, **checked}
        cache.save_rotations(directory, self.rotations, graph, self._key(), summary)
        return True


def _nothing_to_learn(model) -> UserError:
    """Why DartQuant learned nothing in ``model``, in one line: it learns R1 on the norms that
    feed a layer and R2 at attention's o projections, so a graph with neither (one norm before
    the head, an MLP) has none, and "run edgec calibrate first" sent a user in a circle."""
    from edgec.graph_passes.rotation.topology import analyze

    topo = analyze(model.graph)
    if not topo.norms:
        return UserError("--rotate: no RMSNorm or LayerNorm found in the graph, so there is no "
                         "transformer structure to rotate; compile without --rotate")
    found = ("no pre-norm residual stream" if topo.stream is None else
             "no norm before a layer on the residual stream (only the final one)")
    why = "".join(f"; skipped {s.rotation} at {s.node}: {s.reason}" for s in topo.skipped)
    return UserError(f"--rotate dartquant found no rotation to learn in this graph (R1 learns on "
                     f"the norms before each layer, R2 at attention's output projections; it "
                     f"has {found} and {len(topo.attention) or 'no'} attention blocks{why}); "
                     "use --rotate hadamard, which needs no calibration")
