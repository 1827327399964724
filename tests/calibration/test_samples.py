"""npz_sample_count: a calibration file's sample count from its header, None where unreadable;
samples_from_npz: what a calibration .npz may not hold, refused in one line; the reference
denoisers' generated samples span their samplers' timesteps."""

import zipfile

import numpy as np
import pytest

from edgec.calibration.samples import npz_sample_count, samples_from_npz
from edgec.errors import UserError
from edgec.models import registry
from edgec.runtimes.base import IOSpec


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

X = [IOSpec("x", (1, 4), "float32")]


def _refused(path, specs, match):
    with pytest.raises(UserError, match=match) as e:
        samples_from_npz(path, specs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, dtype, match", [
    (np.nan, np.float32, "x' sample 2 holds nan at \\[0, 3\\]"),
    (np.inf, np.float32, "x' sample 2 holds inf"),
    (1e300, np.float64, "x' sample 2 holds 1e\\+300, which float32 cannot hold"),  # cast: inf
])
def test_non_finite_calibration_values_are_refused(tmp_path, value, dtype, match):
    """One inf made every range and scale inf: the w8a8 artifact's every output was NaN."""
    x = np.ones((4, 1, 4), dtype)
    x[2, 0, 3] = value
    np.savez(tmp_path / "x.npz", x=x)
    _refused(tmp_path / "x.npz", X, match)


def test_integers_the_input_dtype_cannot_hold_are_refused(tmp_path):
    """astype wrapped uint64 2**63 + 5 to a negative int64 id."""
    ids = np.zeros((3, 1, 4), np.uint64)
    ids[1, 0, 0] = 2**63 + 5
    np.savez(tmp_path / "ids.npz", ids=ids)
    _refused(tmp_path / "ids.npz", [IOSpec("ids", (1, 4), "int64")],
             "'ids' sample 1 holds 9223372036854775813, which does not fit its dtype int64")
    np.savez(tmp_path / "ok.npz", ids=np.ones((3, 1, 4), np.uint64))
    assert samples_from_npz(tmp_path / "ok.npz", [IOSpec("ids", (1, 4), "int64")]
                            )[0]["ids"].dtype == np.int64


def test_index_values_outside_their_table_are_refused(tmp_path):
    """Every sample is checked, the file's last (the floor's held-out ones) too: an id past
    the vocabulary there reached ONNX Runtime's Gather (an error read as edgec's), and
    ``calibrate --data`` stored it in held_out.npz without a word."""
    ids = np.zeros((20, 1, 4), np.int64)
    ids[19, 0, 2] = 256
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    spec = [IOSpec("input_ids", (1, 4), "int64")]
    bounds = {"input_ids": {"index_bound": 256}}
    with pytest.raises(UserError, match=r"ids\.npz: input 'input_ids' sample 19 holds 256, "
                       r"outside \[0, 256\) .*vocabulary.*tokenizer\?$") as e:
        samples_from_npz(tmp_path / "ids.npz", spec, bounds)
    assert "\n" not in str(e.value)
    ids[19, 0, 2], ids[4, 0, 0] = 255, -1
    np.savez(tmp_path / "neg.npz", input_ids=ids)
    with pytest.raises(UserError, match="'input_ids' sample 4 holds -1, outside"):
        samples_from_npz(tmp_path / "neg.npz", spec, bounds)
    # negatives that count from the end (``table[i]``) are fine
    assert len(samples_from_npz(tmp_path / "neg.npz", spec,
                                {"input_ids": {"index_bound": 256, "index_negative": True}})) == 20


def test_inputs_sharing_a_dim_must_agree(tmp_path):
    """ids [20, 2, 7] with mask [20, 2, 5] failed in ORT's Reshape as an internal error."""
    specs = [IOSpec("ids", ("batch", "seq"), "int64"), IOSpec("mask", ("batch", "seq"), "int64")]
    np.savez(tmp_path / "v.npz", ids=np.zeros((3, 2, 7), np.int64),
             mask=np.ones((3, 2, 5), np.int64))
    _refused(tmp_path / "v.npz", specs, "share dim 'seq' but have sizes 7 and 5")


def test_malformed_files_are_one_line_user_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 1, 4), np.float32))
    np.save(tmp_path / "plain.npy", np.zeros((3, 1, 4), np.float32))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")  # TypeError: not a context manager
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])  # BadZipFile
    (tmp_path / "empty.npz").write_bytes(b"")  # EOFError
    # a header declaring (2**38, 1, 4) float32: numpy allocated 4 TiB before reading (MemoryError)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((3, 1, 4), np.float32))
    header["shape"] = (2**38, 1, 4)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(12, np.float32).tobytes())
    for name, match in [("plain.npz", r"one array \(\.npy\)"), ("trunc.npz", "not a readable"),
                        ("empty.npz", "not an .npz"), ("huge.npz", "declares shape")]:
        _refused(tmp_path / name, X, match)
    assert npz_sample_count(tmp_path / "huge.npz") == 2**38  # header only: no allocation


@pytest.mark.parametrize("name", [s.name for s in registry.specs() if s.sampling])
def test_denoiser_samples_span_the_sampler_timesteps(name):
    """Every reference denoiser's calibration samples, and the floor's held-out sets after
    them, reach its sampler's first and last timestep, each end a set of its own: they were
    uniform draws that stopped short (motion-gen's timestep at 972 of 1000, pose-prior's t at
    0.05 of 1e-3), the quantized graph clamped every step beyond, and the floor, measured on
    the same draws, said it held."""
    from edgec.calibration.samples import DEFAULT_SAMPLES
    from edgec.graph_passes.quantization.options import HELD_OUT
    from edgec.runtimes.sampling import sample

    spec = registry.get(name)
    names = list(spec.input_names)
    t_at = names.index(spec.sampling["timestep"])
    example = dict(zip(names, (t.numpy() for t in spec.example_inputs("tiny"))))
    seen = []

    class Recorder:  # a denoiser that predicts zeros and records the timesteps it is fed
        manifest = {"sampling": dict(spec.sampling)}
        inputs = [IOSpec(k, ["batch", *v.shape[1:]], v.dtype.name) for k, v in example.items()]
        default_feeds = example

        def run(self, feeds):
            seen.extend(feeds[spec.sampling["timestep"]].tolist())
            return {o: np.zeros_like(feeds[i]) for i, o in spec.sampling["samples"].items()}

    sample(Recorder(), steps=20)
    first, last = seen[0], seen[-1]
    sets = spec.drawn_inputs("tiny", DEFAULT_SAMPLES + HELD_OUT)
    t = [s[t_at].numpy() for s in sets]
    calibration, held = np.concatenate(t[:DEFAULT_SAMPLES]), t[DEFAULT_SAMPLES:]
    assert calibration.max() == pytest.approx(first) and calibration.min() <= last
    assert any((s == np.float32(first)).all() for s in held)
    assert any((s <= last).all() and (s == s.min()).all() for s in held)


class _Conv(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.c1(x).relu())


def _cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("source", ["onnx", "module"])
def test_calibration_samples_take_any_size_in_dynamic_dims(tmp_path, source):
    """A calibration .npz is checked against the graph's static dims only: it was checked
    against the example's, so a dynamic-H/W .onnx (its example 1x1) refused 32x32 images as
    "the model wants (1, 3, 1, 1)", and a module exported with a dynamic batch of 2 refused
    samples of batch 1. The held-out floor runs on the same samples; a wrong channel count
    is still refused in one line."""
    import torch

    import edgec

    module = _Conv().eval()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((20, 1, 3, 20, 24)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=data)
    if source == "onnx":
        model = tmp_path / "m.onnx"
        torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), model, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
        kw = {"source": str(model)}
    else:
        kw = {"source": module, "example_inputs": (torch.randn(2, 3, 8, 8),),
              "dynamic_shapes": {"x": {0: "batch", 2: "h", 3: "w"}}}
    art = edgec.compile(**kw, target="ort-cpu", output_dir=tmp_path / "o", quantize="w8a8",
                        calibration=tmp_path / "d.npz")
    session = edgec.load(tmp_path / "o")
    out = next(iter(session.run({"x": data[-1]}).values()))
    with torch.no_grad():
        ref = module(torch.from_numpy(data[-1])).numpy()
    assert out.shape == ref.shape and _cosine(out, ref) > 0.99
    assert art.manifest["quantization"]["calibration"]["samples"] == 16  # 4 held out
    floor = next(p for p in art.report["passes"] if p["name"] == "quantize")["stats"][
        "mixed_precision"]
    assert floor["held_out_source"] == "data" and floor["reached"]
    np.savez(tmp_path / "bad.npz", x=data[:, :, :2])
    with pytest.raises(UserError, match=r"'x' samples have shape \(1, 2, 20, 24\)") as e:
        edgec.compile(**kw, target="ort-cpu", output_dir=tmp_path / "o2", quantize="w8a8",
                      calibration=tmp_path / "bad.npz")
    assert "\n" not in str(e.value)


def test_generated_samples_say_an_onnx_dynamic_dim_is_1(tmp_path):
    """An .onnx source's example sets its dynamic dims to 1, so without a user's .npz a
    dynamic-H/W model was calibrated on 1x1 images (w8a16 cosine 0.55 on 32x32) and the report
    said only "random feeds"."""
    import torch

    from edgec.calibration.samples import generated_samples
    from edgec.exporters.sources import resolve_source

    made = {}
    for name, axes in [("hw", {0: "b", 2: "h", 3: "w"}), ("batch", {0: "b"})]:
        torch.onnx.export(_Conv().eval(), (torch.randn(1, 3, 8, 8),), tmp_path / f"{name}.onnx",
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes})
        made[name] = generated_samples(resolve_source(str(tmp_path / f"{name}.onnx")), 1)[1]
    assert made == {"hw": "random feeds with dynamic dims of size 1: give an .npz of real samples",
                    "batch": "random feeds"}


@pytest.mark.parametrize("name", [s.name for s in registry.specs()
                                  if s.sampling and s.sampling.get("conditions")])
def test_guided_denoiser_samples_include_the_unconditional_half(name):
    """A guided denoiser's calibration samples, and the floor's held-out sets after them, hold
    sets with the conditions zeroed exactly as guidance's unconditional half feeds them: they
    drew real conditions only, so the half run on zeros every step went unmeasured
    (reactive-dance tiny qnn-htp w8a8: floor 0.9988 reported, cosine 0.98 on zeros). The
    example stays conditional (fidelity checks run it)."""
    from types import SimpleNamespace

    import onnx_ir as ir

    from edgec.calibration.samples import DEFAULT_SAMPLES, generated_samples
    from edgec.graph_passes.quantization.options import HELD_OUT, QuantOptions
    from edgec.runtimes.sampling import SamplerSpec, _Denoiser
    from edgec.targets import get as get_target

    spec = registry.get(name)
    conditions = spec.sampling["conditions"]
    src = SimpleNamespace(kind="registry", info={"name": name, "config": "tiny",
                                                 "input_names": list(spec.input_names)})
    ort = get_target("ort-cpu")
    made = QuantOptions.parse("w8a8", ort).make_pass(ort, None, src, lambda m: None)
    held = made.held_out(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))
    calibration = generated_samples(src, DEFAULT_SAMPLES)[0]
    assert len(held) == HELD_OUT

    def null(feeds):  # what the sampler feeds the unconditional half of these conditions
        sampler = SamplerSpec.from_manifest({"sampling": spec.sampling})
        fixed = {k: v for k, v in feeds.items() if k in conditions or k not in (
            *sampler.samples, sampler.timestep)}
        session = SimpleNamespace(manifest={"sampling": spec.sampling}, inputs=[])
        return {**feeds, **_Denoiser(session, sampler, fixed, 1, sampler.guidance, None, 0,
                                     mode="split").null}

    def unconditional(sets):
        return [s for s in sets if all(not s[c].any() for c in conditions)]

    for sets, count in ((calibration, DEFAULT_SAMPLES // 4), (held, 1)):
        zeroed = unconditional(sets)
        assert len(zeroed) == count
        for s in zeroed:
            assert all(np.array_equal(s[k], v) for k, v in null(s).items())
            assert all(s[k].any() for k in s if k not in conditions and k != "use_text")
    example = dict(zip(spec.input_names, (t.numpy() for t in spec.example_inputs("tiny"))))
    assert not unconditional([example])
