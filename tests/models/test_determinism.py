"""Every registered reference model builds the same weights from its seed, every time."""

from __future__ import annotations

import pytest
import torch

from edgec.models import registry


@pytest.mark.parametrize("name", [n for n in registry.names() if n not in ("llama", "video-dit")])
def test_build_is_deterministic(name):
    spec = registry.get(name)
    a, b = spec.build("tiny").state_dict(), spec.build("tiny").state_dict()
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
