"""Feeds a runtime cannot be trusted with are refused in one line before it runs them."""

import numpy as np
import pytest
import torch

import edgec
from edgec.errors import UserError

TARGETS = ("ort-cpu", "openvino-cpu")


class Masked(torch.nn.Module):
    def forward(self, x, mask):  # its branch on seq is traced (and good) for seq >= 2 only
        out = x * mask.unsqueeze(-1)
        return out if x.shape[1] > 1 else -out


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    root = tmp_path_factory.mktemp("feeds")
    inputs = (torch.randn(2, 8, 4), torch.ones(2, 8))
    shapes = {"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}}
    return {t: edgec.compile(Masked(), target=t, output_dir=root / t, example_inputs=inputs,
                             dynamic_shapes=shapes) for t in TARGETS}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    return {t: edgec.compile("llama", target=t, config="tiny", output_dir=root / t,
                             generate=True) for t in TARGETS}


@pytest.mark.parametrize("target", TARGETS)
def test_inputs_sharing_a_dim_name_must_agree(masked, target):
    """x batch 1 with mask batch 2 ran (exit 0) on both runtimes."""
    sess = masked[target].load()
    x, mask = np.ones((1, 8, 4), np.float32), np.ones((2, 8), np.float32)
    with pytest.raises(UserError, match="inputs 'x' and 'mask' share dim 'batch' but have "
                                        "sizes 1 and 2"):
        sess.run({"x": x, "mask": mask})
    (out,) = sess.run({"x": x, "mask": mask[:1]}).values()
    assert out.shape == (1, 8, 4)


@pytest.mark.parametrize("target", TARGETS)
def test_sizes_outside_the_traced_range_are_refused(masked, target):
    """forward branching on a dynamic dim: seq 1 ran the traced branch, the sign of every
    output flipped against PyTorch (exit 0); torch.export's range is kept and checked."""
    art = masked[target]
    assert [i["dim_ranges"] for i in art.manifest["inputs"]] == [{"seq": {"min": 2}}] * 2
    sess = art.load()
    x, mask = np.ones((1, 1, 4), np.float32), np.ones((1, 1), np.float32)
    with pytest.raises(UserError, match=r"^input 'x' has seq = 1 \(axis 1\), but the model was "
                                        r"exported for seq >= 2 only .*; give seq >= 2$"):
        sess.run({"x": x, "mask": mask})
    x, mask = np.ones((1, 2, 4), np.float32), np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(sess.run({"x": x, "mask": mask})["output"], x)


@pytest.mark.parametrize("target", TARGETS)
def test_a_size_0_dynamic_dim_is_refused(masked, target):
    """x [0, 8, 4] or [2, 0, 4] ran on both runtimes and returned outputs whose shapes the
    manifest does not describe (exit 0)."""
    sess = masked[target].load()
    for batch, seq, dim in ((0, 8, r"'batch' \(axis 0\)"), (2, 0, r"'seq' \(axis 1\)")):
        x, mask = np.ones((batch, seq, 4), np.float32), np.ones((batch, seq), np.float32)
        with pytest.raises(UserError, match=rf"^input 'x' has shape \[{batch}, {seq}, 4\]: its "
                                            rf"dim {dim} is 0; give at least one element along "
                                            "every dynamic dim$"):
            sess.run({"x": x, "mask": mask})


@pytest.mark.parametrize("target", TARGETS)
def test_read_only_arrays_run(masked, target, tmp_path):
    """OpenVINO refused a memory-mapped .npy, a frozen array and np.frombuffer's: "could not
    run the model on these inputs: array is not writeable"."""
    sess = masked[target].load()
    rng = np.random.default_rng(0)
    x, mask = rng.standard_normal((2, 5, 4), np.float32), np.ones((2, 5), np.float32)
    want = sess.run({"x": x, "mask": mask})
    np.save(tmp_path / "x.npy", x)
    frozen = mask.copy()
    frozen.setflags(write=False)
    for feeds in ({"x": np.load(tmp_path / "x.npy", mmap_mode="r"), "mask": frozen},
                  {"x": np.frombuffer(x.tobytes(), np.float32).reshape(x.shape), "mask": mask}):
        got = sess.run(feeds)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("target", TARGETS)
def test_torch_tensors_that_need_grad_or_hold_bfloat16_run(masked, target):
    """np.asarray raised torch's own RuntimeError (a tensor that requires grad) and TypeError
    (bfloat16, which numpy has no dtype for)."""
    sess = masked[target].load()
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5)
    want = sess.run({"x": x.numpy(), "mask": mask.numpy()})
    got = sess.run({"x": x.clone().requires_grad_(), "mask": mask})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    half = x.bfloat16()
    want = sess.run({"x": half.float().numpy(), "mask": mask.numpy()})
    got = sess.run({"x": half, "mask": mask.bfloat16()})
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def _step(batch=1, mask=5, past=4, value_past=None, past_batch=None):
    feeds = {"input_ids": np.ones((batch, 1), np.int64),
             "attention_mask": np.ones((batch, mask), np.int64),
             "position_ids": np.full((batch, 1), past, np.int64)}
    for layer in range(2):
        for kind in ("key", "value"):
            length = value_past if value_past is not None and kind == "value" else past
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros(
                (past_batch or batch, 2, length, 16), np.float32)
    return feeds


@pytest.mark.parametrize("target", TARGETS)
def test_decoder_feeds_must_agree(decoders, target):
    """ORT failed these as an internal error; OpenVINO computed wrong logits (exit 0)."""
    sess = decoders[target].load()
    assert np.isfinite(sess.run(_step())["logits"]).all()
    # an empty cache is a prefill, not an empty input
    assert np.isfinite(sess.run(_step(mask=1, past=0))["logits"]).all()
    with pytest.raises(UserError, match="'attention_mask' has length 3, but "
                                        "'past_key_values.0.key' holds 4 past tokens and "
                                        "'input_ids' 1 new; the mask must cover past \\+ new = 5"):
        sess.run(_step(mask=3))
    with pytest.raises(UserError, match="share dim 'batch_size' but have sizes 1 and 2"):
        sess.run(_step(past_batch=2))
    with pytest.raises(UserError, match="'past_key_values.0.key' and 'past_key_values.0.value' "
                                        "share dim 'past_sequence_length'"):
        sess.run(_step(value_past=3))


def test_a_deleted_weights_file_is_refused_at_load(tmp_path, decoders):
    """A deleted model.onnx.data was ORT's Fail at the first run: an internal error (exit 1)."""
    import shutil

    art = shutil.copytree(decoders["ort-cpu"].path, tmp_path / "art")
    (art / "model.onnx.data").unlink()
    with pytest.raises(UserError, match="file model.onnx.data of the artifact is missing; "
                                        "`edgec inspect .* --verify` lists damaged files"):
        edgec.load(art)


class Scaled(torch.nn.Module):
    def forward(self, x, scale):
        return x * scale + 1


@pytest.mark.parametrize("target", TARGETS)
def test_scalar_inputs_run(tmp_path, target):
    """np.ascontiguousarray made a 0-d feed 1-d, which OpenVINO refused."""
    inputs = (torch.randn(2, 3), torch.tensor(0.5))
    sess = edgec.compile(Scaled(), target=target, output_dir=tmp_path / "a",
                         example_inputs=inputs).load()
    assert [i.shape for i in sess.inputs] == [(2, 3), ()]
    (out,) = sess.run({"x": inputs[0].numpy(), "scale": np.float32(0.25)}).values()
    np.testing.assert_allclose(out, Scaled()(inputs[0], torch.tensor(0.25)).numpy(), rtol=1e-6)


class Embedded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.emb(ids)


def test_integers_that_do_not_fit_the_input_dtype_are_refused(tmp_path):
    """int64 2**32 + 3 fed to an int32 input wrapped to 3 in the cast, ahead of the
    index-bound check, and ran as id 3 (exit 0)."""
    sess = edgec.compile(Embedded(), target="ort-cpu", output_dir=tmp_path / "a",
                         example_inputs=(torch.tensor([1, 2], dtype=torch.int32),)).load()
    assert sess.inputs[0].dtype == "int32"
    assert sess.run({"ids": np.array([3, 4])})["output"].shape == (2, 4)  # int64 that fits
    with pytest.raises(UserError, match="'ids' holds 4294967299, which does not fit its dtype "
                                        "int32"):
        sess.run({"ids": np.array([2**32 + 3, 4])})


class Int64Math(torch.nn.Module):
    def forward(self, x, f, t):
        return x * 3 + 1, (f * 1e6).long(), t.float() * 0.5


def test_openvino_int64_held_in_32_bits_is_refused_and_recorded(tmp_path, caplog):
    """OpenVINO's CPU plugin computes int64 in 32 bits: x = 2**40 + 7 gave x * 3 + 1 = 22 and
    (f * 1e6).long() of 5000.0 gave -2**31, exit 0 (ort-cpu: the int64 values). Feeds it would
    wrap are refused; arithmetic outputs are recorded and warned of; an input only cast to
    float (t) reads its whole value and keeps it. The compile warns once (its build and then its
    verification session on the same file each warned), loading the artifact once more."""
    example = (torch.tensor([[1, 2, 3]]), torch.tensor([[0.5, 1.5, 2.5]]),
               torch.tensor([[1, 2, 3]]))
    with caplog.at_level("WARNING"):
        art = edgec.compile(Int64Math(), target="openvino-cpu", output_dir=tmp_path / "o",
                            example_inputs=example)
    narrow = art.manifest["runtime"]["int64_in_32_bits"]
    assert narrow == {"inputs": ["x"], "outputs": ["output_0", "output_1"]}
    warned = [r.getMessage() for r in caplog.records if "32 bits" in r.getMessage()]
    assert len(warned) == 1 and "['output_0', 'output_1'] are computed by arithmetic" in warned[0]
    assert any("32 bits" in n for n in art.report["notes"])
    caplog.clear()
    with caplog.at_level("WARNING"):
        sess = art.load()
    assert sum("32 bits" in r.getMessage() for r in caplog.records) == 1
    big = np.array([[2**40 + 7, -5, 2**31]], np.int64)
    f = np.array([[0.5, 1.5, 2.5]], np.float32)
    with pytest.raises(UserError, match=r"^input 'x' holds 1099511627783, outside int32 .*"
                                        r"openvino-cpu holds int64 values in 32 bits"):
        sess.run({"x": big, "f": f, "t": big})
    out = sess.run({"x": np.array([[1, 2, 3]]), "f": f, "t": big})
    np.testing.assert_array_equal(out["output_0"], [[4, 7, 10]])
    np.testing.assert_allclose(out["output_2"], big.astype(np.float32) * 0.5)


class Positions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Embedding(8, 4)

    def forward(self, x):
        return x + self.pos(torch.arange(x.shape[1]))


def test_a_dim_that_indexes_a_position_table_is_bounded_by_its_rows(tmp_path):
    """pos(arange(seq)) with 8 rows: seq 9 ran on openvino-cpu (exit 0) where PyTorch raises;
    the table's rows bound seq, recorded in dim_ranges and checked on every run."""
    art = edgec.compile(Positions(), target="openvino-cpu", output_dir=tmp_path / "o",
                        example_inputs=(torch.randn(1, 5, 4),), dynamic_shapes={"x": {1: "seq"}})
    assert art.manifest["inputs"][0]["dim_ranges"] == {"seq": {"max": 8}}
    sess = art.load()
    with pytest.raises(UserError, match=r"^input 'x' has seq = 9 \(axis 1\), .*give seq <= 8$"):
        sess.run({"x": np.zeros((1, 9, 4), np.float32)})
    assert sess.run({"x": np.zeros((1, 8, 4), np.float32)})["output"].shape == (1, 8, 4)
