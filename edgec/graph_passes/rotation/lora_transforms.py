"""Swappable-LoRA sites of rotated Linears: the transforms that keep swapping exact.

A rotation edits a base weight on its input side (W ← M·W: norm scale diag(γ), R1ᵀ, R2ᵀ per query
head) and on its output side (W ← W·M: LayerNorm centering C, R1, R2 per kv head). The base's
branch x·A_in·B_in (``graph_passes.lora.swappable``) reads the same x and adds into the same y, so
it must see the same: A_in = M_in·Aᵀ, B_in = w·s·Bᵀ·M_out (``edgec.lora.binding.site_feeds``).

``SiteTransforms`` records M_in / M_out per site as the factors the pass applied, in order
(``edgec.lora.transforms.Factor``: γ as a diagonal, R1 dense, R2 as head blocks, C as its size;
not one dense [n, n] per site, which made gigabytes on a 7B decoder), names them in the sites
metadata (``a_transform`` / ``b_transform``: lists of factor names; equal factors share one name,
``<kind>.<i>``) and keeps them (float32) in ``factors``. The pass hands them on as its
``lora_transforms`` attribute and the pipeline writes them to ``adapters/transforms.safetensors``
(``edgec.lora.binding.TRANSFORMS_FILE``). They are not graph initializers: the graph never reads
them, and later passes (quantization) neither see nor drop them; the sites metadata only names
them.

The online R4 before a down projection rewires the base MatMul alone
(``WeightEditor.insert_online``):
the branch keeps reading the un-rotated x, so R4 adds nothing to the site's M_in.
"""

from __future__ import annotations

import json

import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes.rotation.topology import Linear
from edgec.lora.binding import SITES_KEY, lora_sites
from edgec.lora.transforms import Factor

__all__ = ["SiteTransforms"]


class SiteTransforms:
    def __init__(self, model: ir.Model):
        self.sites = {s["module"]: s for s in lora_sites(model)}
        self._in: dict[str, list[Factor]] = {}
        self._out: dict[str, list[Factor]] = {}
        self.factors: dict[str, Factor] = {}

    def _module(self, lin: Linear) -> str | None:
        module = lin.lora_module
        if module is None:
            return None
        if module not in self.sites:
            raise UserError(f"the LoRA branch of {lin.node.name} names module {module!r}, which "
                            "the model's swappable-LoRA sites do not list; the graph and its "
                            "metadata disagree")
        return module

    def left(self, lin: Linear, m: Factor) -> None:
        """The pass set W ← m·W."""
        module = self._module(lin)
        if module is not None:
            self._in.setdefault(module, []).append(m)

    def right(self, lin: Linear, m: Factor) -> None:
        """The pass set W ← W·m."""
        module = self._module(lin)
        if module is not None:
            self._out.setdefault(module, []).append(m)

    def finish(self, model: ir.Model) -> int:
        """Name the factors in the sites metadata; returns how many sites have any."""
        if not self._in and not self._out:
            return 0
        by_digest: dict[str, str] = {}
        digests: dict[int, str] = {}  # one factor object (a stream's R1) serves many sites

        def name(f: Factor) -> str:
            digest = digests.get(id(f)) or digests.setdefault(id(f), f.digest())
            if digest not in by_digest:
                by_digest[digest] = f"{f.kind}.{len(by_digest)}"
                self.factors[by_digest[digest]] = f.as_float32()
            return by_digest[digest]

        sites = lora_sites(model)
        for site in sites:
            module = site["module"]
            for key, table in (("a_transform", self._in), ("b_transform", self._out)):
                factors = table.get(module)
                if not factors:
                    continue
                if site.get(key):
                    raise UserError(f"LoRA site {module} already has a {key} (rotated twice?); "
                                    "rotate once")
                site[key] = [name(f) for f in factors]
        model.metadata_props[SITES_KEY] = json.dumps(sites)
        return len({*self._in, *self._out})
