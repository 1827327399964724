"""Reference PyTorch models (video-dit, llama) addressed by name through the registry."""

from __future__ import annotations

from edgec.models.registry import ModelSpec, get, names

__all__ = ["ModelSpec", "get", "names"]
