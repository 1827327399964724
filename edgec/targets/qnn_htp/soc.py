"""The Snapdragon a qnn-htp artifact is built for (``--soc``), and the pass that records it.

A QNN context binary is compiled for one HTP: built naming no SoC, the x86 emulator compiles
for QNN's default, and the binaries differ per SoC (llama tiny w8a8: 290,816 bytes for the
default and for HTP v68 and v69, 303,104 for v73, v75 and v79, no two of those measured
alike). So a user names the device (``--soc sm8650``, the chip or its marketing name); the
compile stamps it into the graph's metadata (``SOC_KEY``), from which every QNN session of
that graph (the build, the divergence search, a shared decoder context, the artifact's
manifest) takes its ``soc_model`` and ``htp_arch`` provider options
(``runtimes.qnn.graph_provider_options``).

The numbers are the QNN SDK's (``soc_model``: its SoC id; ``htp_arch``: the Hexagon
architecture version), as Qualcomm's own tables list them (LiteRT's and ExecuTorch's QNN
backends carry the same ones). The x86 emulator builds and runs every one of them.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["Soc", "SOCS", "SOC_KEY", "SocPass", "soc_named", "soc_options"]

SOC_KEY = "edgec.qnn.soc"  # graph metadata: the SOCS key the graph is built for


@dataclasses.dataclass(frozen=True)
class Soc:
    chip: str  # the part number, as the SDK names it
    name: str  # what devices say they have
    soc_model: int
    htp_arch: int
    aliases: tuple[str, ...] = ()

    @property
    def fp16(self) -> bool:
        """Whether its HTP computes fp16 (``stream=fp16``): v69 on. On v68 the emulator cannot
        finalize llama tiny's fp16 RMSNormalization (QNN_COMMON_ERROR_MEM_ALLOC)."""
        return self.htp_arch >= 69


SOCS: dict[str, Soc] = {s.chip.lower(): s for s in (
    Soc("SM8350", "Snapdragon 888", 30, 68, ("888",)),
    Soc("SM8450", "Snapdragon 8 Gen 1", 36, 69, ("8-gen-1",)),
    Soc("SM8550", "Snapdragon 8 Gen 2", 43, 73, ("8-gen-2",)),
    Soc("SM8650", "Snapdragon 8 Gen 3", 57, 75, ("8-gen-3",)),
    Soc("SM8750", "Snapdragon 8 Elite", 69, 79, ("8-elite",)),
    Soc("SC8380XP", "Snapdragon X Elite", 60, 73, ("x-elite",)),
    Soc("SA8295P", "SA8295P (automotive)", 39, 68, ("sa8295",)),
    Soc("SA8255P", "SA8255P (automotive)", 52, 73, ("sa8255",)),
)}


def soc_named(raw: str) -> str:
    """The ``SOCS`` key of a chip or marketing name (any case); one line listing them if none."""
    text = str(raw).strip().lower().replace("_", "-").replace(" ", "-")
    for key, soc in SOCS.items():
        if text in (key, *soc.aliases, soc.name.lower().replace(" ", "-")):
            return key
    names = ", ".join(f"{s.chip} ({s.aliases[0]})" for s in SOCS.values())
    raise UserError(f"--soc {raw!r} is not a Snapdragon edgec knows; name one of: {names}")


def soc_options(key: str) -> dict[str, str]:
    """The QNN provider options that build and run a graph for ``SOCS[key]``."""
    soc = SOCS[key]
    return {"soc_model": str(soc.soc_model), "htp_arch": str(soc.htp_arch)}


class SocPass(EdgecPass):
    """Records the SoC a qnn-htp graph is built for in its metadata (``SOC_KEY``); the graph's
    computation is untouched."""

    name = "qnn-soc"
    exact = True
    rtol = 1e-6

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def call(self, model: ir.Model) -> PassResult:
        soc = SOCS[self.key]
        model.metadata_props[SOC_KEY] = self.key
        return PassResult(model, True, {"soc": soc.chip, "device": soc.name,
                                        "soc_model": soc.soc_model, "htp_arch": soc.htp_arch})
