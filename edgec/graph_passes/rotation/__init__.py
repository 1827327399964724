"""Quantization rotations (QuaRot R1/R2/R4, DartQuant-calibrated R1/R2), exact in fp32."""

from edgec.graph_passes.rotation.rotate import METHODS, RotatePass
from edgec.graph_passes.rotation.topology import Topology, analyze

__all__ = ["RotatePass", "METHODS", "Topology", "analyze"]
