"""npz_sample_count: a calibration file's sample count from its header, None where unreadable."""

import numpy as np

from edgec.calibration.samples import npz_sample_count


def test_npz_sample_count_reads_the_leading_axis_or_says_none(tmp_path):
    np.savez(tmp_path / "a.npz", input_ids=np.zeros((7, 1, 8), np.int64),
             attention_mask=np.ones((7, 1, 8), np.int64))
    assert npz_sample_count(tmp_path / "a.npz") == 7
    np.savez_compressed(tmp_path / "c.npz", x=np.zeros((3, 2), np.float32))
    assert npz_sample_count(tmp_path / "c.npz") == 3
    (tmp_path / "junk.npz").write_text("not a zip")
    np.savez(tmp_path / "scalar.npz", x=np.float32(1))
    for bad in ("junk.npz", "scalar.npz", "missing.npz"):
        assert npz_sample_count(tmp_path / bad) is None
