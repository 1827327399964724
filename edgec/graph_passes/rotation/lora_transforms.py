"""Swappable-LoRA sites of rotated Linears: the transforms that keep swapping exact.

A rotation edits a base weight on its input side (W ← M·W: norm scale diag(γ), R1ᵀ, R2ᵀ per query
head) and on its output side (W ← W·M: LayerNorm centering C, R1, R2 per kv head). The base's
branch x·A_in·B_in (``graph_passes.lora.swappable``) reads the same x and adds into the same y, so
it must see the same: A_in = M_in·Aᵀ, B_in = w·s·Bᵀ·M_out (``edgec.lora.binding.site_feeds``).

``SiteTransforms`` composes M_in / M_out per site while the pass edits (float64), names them in the
sites metadata (``a_transform`` / ``b_transform``; equal matrices share one name, the first
site's ``<module>.in`` / ``<module>.out``) and keeps the matrices (float32) in ``matrices``. The
pass hands them on as its ``lora_transforms`` attribute and the pipeline writes them to
``adapters/transforms.safetensors`` (``edgec.lora.binding.TRANSFORMS_FILE``). They are not graph
initializers: the graph never reads them, and later passes (quantization) neither see nor drop
them; the sites metadata only names them.

The online R4 before a down projection rewires the base MatMul alone
(``WeightEditor.insert_online``):
the branch keeps reading the un-rotated x, so R4 adds nothing to the site's M_in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes.rotation.topology import Linear
from edgec.lora.binding import SITES_KEY, lora_sites

__all__ = ["SiteTransforms"]

Matrix = np.ndarray | Callable[[], np.ndarray]


class SiteTransforms:
    def __init__(self, model: ir.Model):
        self.sites = {s["module"]: s for s in lora_sites(model)}
        self._in: dict[str, np.ndarray] = {}
        self._out: dict[str, np.ndarray] = {}
        self.matrices: dict[str, np.ndarray] = {}

    def _module(self, lin: Linear) -> str | None:
        module = lin.lora_module
        if module is None:
            return None
        if module not in self.sites:
            raise UserError(f"the LoRA branch of {lin.node.name} names module {module!r}, which "
                            "the model's swappable-LoRA sites do not list; the graph and its "
                            "metadata disagree")
        return module

    def left(self, lin: Linear, m: Matrix) -> None:
        """The pass set W ← m·W (``m``: the matrix, or a function making it, called only when
        ``lin`` is a LoRA site: most Linears are not, and these matrices are [in, in])."""
        module = self._module(lin)
        if module is not None:
            m, prev = m() if callable(m) else m, self._in.get(module)
            self._in[module] = m if prev is None else m @ prev

    def right(self, lin: Linear, m: Matrix) -> None:
        """The pass set W ← W·m (``m`` as in ``left``)."""
        module = self._module(lin)
        if module is not None:
            m, prev = m() if callable(m) else m, self._out.get(module)
            self._out[module] = m if prev is None else prev @ m

    def finish(self, model: ir.Model) -> int:
        """Name the composed transforms in the sites metadata; returns how many sites have one."""
        if not self._in and not self._out:
            return 0
        by_digest: dict[tuple[str, str], str] = {}
        sites = lora_sites(model)
        for site in sites:
            module = site["module"]
            for key, table, suffix in (("a_transform", self._in, "in"),
                                       ("b_transform", self._out, "out")):
                m = table.get(module)
                if m is None:
                    continue
                if site.get(key):
                    raise UserError(f"LoRA site {module} already has a {key} (rotated twice?); "
                                    "rotate once")
                m32 = np.ascontiguousarray(m, dtype=np.float32)
                digest = (suffix, hashlib.sha1(repr(m32.shape).encode() + m32.tobytes())
                          .hexdigest())
                if digest not in by_digest:
                    by_digest[digest] = f"{module}.{suffix}"
                    self.matrices[by_digest[digest]] = m32
                site[key] = by_digest[digest]
        model.metadata_props[SITES_KEY] = json.dumps(sites)
        return len({*self._in, *self._out})
