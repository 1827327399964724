"""Swappable-LoRA site transforms as factors (``edgec.lora.transforms``): each kind computes
the product it stands for, the file round-trips, and artifacts written before (one dense matrix
per name, sites naming it as a string) still bind."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgec.errors import UserError
from edgec.lora.binding import TRANSFORMS_FILE, AdapterBank, site_feeds
from edgec.lora.peft_adapter import LoraAdapter, LoraModule
from edgec.lora.transforms import (
    Factor,
    apply_left,
    apply_right,
    load_factors,
    save_factors,
)

N = 8


def _factors():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    blocks = [np.linalg.qr(rng.standard_normal((2, 2)))[0] for _ in range(2)]
    dense_blocks = np.eye(N)
    for s, b in zip((2, 6), blocks):
        dense_blocks[s:s + 2, s:s + 2] = b
    heads = [np.linalg.qr(rng.standard_normal((4, 4)))[0] for _ in range(2)]  # [0, N) tiled
    tiled = np.zeros((N, N))
    tiled[:4, :4], tiled[4:, 4:] = heads
    return {"dense.0": (Factor.dense(q), q),
            "blocks.4": (Factor.blocks([0, 4], heads), tiled),
            "diag.1": (Factor.diag(rng.uniform(0.5, 2, N)), None),
            "blocks.2": (Factor.blocks([2, 6], blocks), dense_blocks),
            "center.3": (Factor.center(N), np.eye(N) - np.full((N, N), 1 / N))}


def test_each_factor_is_the_matrix_it_stands_for(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((N, 3)), rng.standard_normal((3, N))
    found = _factors()
    found["diag.1"] = (found["diag.1"][0], np.diag(found["diag.1"][0].data))
    for name, (f, m) in found.items():
        assert np.allclose(f.matrix(N), m)
        assert np.allclose(f.left(a), m @ a) and np.allclose(f.right(b), b @ m), name
    fs = [f for f, _ in found.values()]
    ms = [m for _, m in found.values()]
    # M_a = f_k ··· f_1 (the first factor applied first); M_b = f_1 ··· f_k
    left, right = np.eye(N), np.eye(N)
    for m in ms:
        left, right = m @ left, right @ m
    assert np.allclose(apply_left(fs, a), left @ a)
    assert np.allclose(apply_right(b, fs), b @ right)
    save_factors({n: f for n, (f, _) in found.items()}, tmp_path / "t.safetensors")
    back = load_factors(tmp_path / "t.safetensors")
    assert set(back) == set(found)
    for name, f in back.items():
        assert f.kind == name.split(".")[0] and f.starts == found[name][0].starts
        assert np.allclose(f.matrix(N), found[name][1], atol=1e-6)


def test_a_file_from_before_binds_as_dense_matrices(tmp_path):
    """Artifacts compiled before held one dense [n, n] per name, named by a string."""
    rng = np.random.default_rng(2)
    m_a, m_b = rng.standard_normal((N, N)), rng.standard_normal((4, 4))
    (tmp_path / "adapters").mkdir()
    save_file({"q.in": m_a.astype(np.float32), "q.out": m_b.astype(np.float32)},
              str(tmp_path / TRANSFORMS_FILE))
    site = {"module": "q", "a_input": "qa", "b_input": "qb", "in_features": N,
            "out_features": 4, "rank": 2, "a_transform": "q.in", "b_transform": "q.out"}
    bank = AdapterBank({"sites": [site]}, tmp_path)
    lm = LoraModule(name="q", A=rng.standard_normal((2, N)), B=rng.standard_normal((4, 2)),
                    rank=2, alpha=1.0, scaling=0.5, fan_in_fan_out=False)
    adapter = LoraAdapter(name="x", path=tmp_path, config={}, modules={"q": lm})
    feeds = site_feeds([site], adapter, bank.transforms)
    assert np.allclose(feeds["qa"], m_a @ lm.A.T, atol=1e-5)
    assert np.allclose(feeds["qb"], 0.5 * lm.B.T @ m_b, atol=1e-5)


def test_an_unknown_factor_kind_is_refused(tmp_path):
    save_file({"spiral.0": np.eye(2, dtype=np.float32)}, str(tmp_path / "t.safetensors"),
              metadata={"edgec.transforms": "factors"})
    with pytest.raises(UserError, match="spiral.0.*no known kind"):
        load_factors(tmp_path / "t.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_damaged_transforms_file_is_refused_naming_it(tmp_path, damage):
    """A cut or replaced adapters/transforms.safetensors was "internal error: SafetensorError"
    (exit 1) when the artifact was loaded; a damaged adapter file already said which file."""
    path = tmp_path / TRANSFORMS_FILE
    path.parent.mkdir(parents=True)
    save_factors({k: f for k, (f, _) in _factors().items()}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated"
                     else b"\x80\x04\x95" + data[3:])  # a pickle's opening bytes
    with pytest.raises(UserError, match=f"{path}: unreadable safetensors .*the artifact is "
                                        "damaged"):
        AdapterBank({"sites": []}, tmp_path)
