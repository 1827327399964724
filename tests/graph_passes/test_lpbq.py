"""LPBQ (block-wise int4 with 4-bit block scales × a float per output channel): the grid the
HTP takes, and that it fits Gaussian weights better than one scale per output channel."""

import numpy as np

from edgec.graph_passes.quantization.lpbq import lpbq_grid


def test_lpbq_grid_covers_each_block_and_beats_per_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 48)) * rng.uniform(0.2, 3.0, (128, 1))  # uneven input rows
    k, c, q = lpbq_grid(w, 32, 4)
    assert k.shape == (4, 48) and c.shape == (48,) and q.shape == w.shape
    assert k.dtype == np.uint8 and k.min() >= 1 and k.max() == 15  # 4 bits, the largest used
    assert q.min() >= -8 and q.max() <= 7
    scale = np.repeat(k * c.astype(np.float64), 32, axis=0)
    blocks = np.abs(w.reshape(4, 32, 48)).max(axis=1) / 7
    assert np.all(k * c >= blocks * (1 - 1e-6))  # rounded up: no weight is clipped
    per_channel = np.abs(w).max(axis=0) / 7
    err_block = np.linalg.norm(w - q * scale)
    err_channel = np.linalg.norm(w - np.clip(np.rint(w / per_channel), -8, 7) * per_channel)
    assert err_block < 0.9 * err_channel, (err_block, err_channel)
