"""Fixtures shared by the reference-model tests: tiny-config compiles, made once per session."""

from __future__ import annotations

import pytest

import edgec


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory):
    """``get(name, target, static=False)``: the model's tiny config compiled for ``target``
    (qnn-htp quantized w8a16, as the NPU needs), once per session.

    ``static=True`` compiles from the static-shape export, the one qnn-htp uses
    (tests/conftest.py exports each registry model and shape set once)."""
    made = {}

    def get(name: str, target: str, static: bool = False):
        key = (name, target, static)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{name}-{target}")
            extra = {"quantize": "w8a16"} if target == "qnn-htp" else {}
            if static:
                extra["dynamic_shapes"] = {}
            made[key] = edgec.compile(name, target=target, output_dir=root / "out",
                                      config="tiny", **extra)
        return made[key]

    return get
