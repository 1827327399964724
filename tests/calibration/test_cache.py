"""Calibration caches: provenance, binding to the graph, refusal of a mismatch, sample files."""

import json

import numpy as np
import pytest

from edgec.calibration import CalibrationCache, calibration_input, model_hash
from edgec.calibration.samples import samples_from_npz
from edgec.errors import UserError
from edgec.runtimes.base import IOSpec


@pytest.fixture(scope="module")
def llama_src():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny")


def _cache(**kw):
    base = dict(model_hash="ab" * 32, target="ort-cpu", scheme="w8a8", method="minmax",
                samples=4, data="model generator",
                tensors={"x": {"lowest": -1.5, "highest": 2.0}})
    return CalibrationCache(**{**base, **kw})


def test_roundtrip_and_tensors_data(tmp_path):
    c = _cache()
    path = c.save(tmp_path / "calib")
    assert path.name == "calibration.json" and not list(path.parent.glob("*.tmp"))
    raw = json.loads(path.read_text())
    assert raw["format"] == "edgec-calibration/1" and raw["tensors"]["x"]["highest"] == 2.0
    back = CalibrationCache.load(tmp_path / "calib")
    assert back == c
    td = back.to_tensors_data()
    lo, hi = td["x"].range_value
    assert float(lo) == -1.5 and float(hi) == 2.0


def test_save_onto_a_file_is_refused(tmp_path):
    f = tmp_path / "calib.json"
    f.write_text("mine")
    with pytest.raises(UserError, match="is a file.*give a directory"):
        _cache().save(f)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("field,value,match", [
    ("model_hash", "cd" * 32, "does not match the model"),
    ("target", "openvino-cpu", "target 'openvino-cpu'"),
    ("scheme", "w8a16", "scheme 'w8a16'"),
    ("method", "entropy", "method 'entropy'"),
])
def test_mismatch_is_refused(field, value, match):
    with pytest.raises(UserError, match=match):
        _cache(**{field: value}).check("ab" * 32, "ort-cpu", "w8a8", "minmax")


def _bound(**adapters):
    """``adapters_bound`` of adapters name → one value for every A/B input, then the base."""
    from edgec.calibration.cache import adapters_bound

    feeds = lambda v: {"lora.q.A": np.full((2, 1), v, np.float32),  # noqa: E731
                       "lora.q.B": np.full((1, 2), v, np.float32)}
    return adapters_bound([(n, feeds(v)) for n, v in adapters.items()] + [("base", feeds(0.0))])


def test_cache_of_other_swappable_adapters_is_refused():
    """Swappable adapters are graph inputs, bound only while calibrating: a cache calibrated
    with adapter A (ranges to 5.5) passed the graph check for a compile with B (116.8) and ran
    B at logits cosine 0.10 vs PEFT (0.96 with its own cache)."""
    a, b, both = _bound(a=1.0), _bound(b=30.0), _bound(a=1.0, b=30.0)
    _cache(adapters=a).check("ab" * 32, "ort-cpu", "w8a8", "minmax", _bound(a=1.0))
    with pytest.raises(UserError, match="calibrated with LoRA adapters: a; this compile binds: "
                                        "b; re-run `edgec calibrate` with the same --lora"):
        _cache(adapters=a).check("ab" * 32, "ort-cpu", "w8a8", "minmax", b)
    with pytest.raises(UserError, match="adapters: a, b; this compile binds: b;"):
        _cache(adapters=both).check("ab" * 32, "ort-cpu", "w8a8", "minmax", b)
    with pytest.raises(UserError, match="adapters: b, a; this compile binds: a, b;"):
        _cache(adapters=_bound(b=30.0, a=1.0)).check("ab" * 32, "ort-cpu", "w8a8", "minmax",
                                                      both)
    with pytest.raises(UserError, match="adapters a, whose weights differ from this compile's"):
        _cache(adapters=a).check("ab" * 32, "ort-cpu", "w8a8", "minmax", _bound(a=0.5))
    with pytest.raises(UserError, match="adapters: none; this compile binds: a;"):
        _cache(adapters={}).check("ab" * 32, "ort-cpu", "w8a8", "minmax", a)
    # a cache from before adapters were recorded: refused where the compile binds some
    with pytest.raises(UserError, match="does not record which LoRA adapters.*binds a; re-run"):
        _cache().check("ab" * 32, "ort-cpu", "w8a8", "minmax", a)
    _cache().check("ab" * 32, "ort-cpu", "w8a8", "minmax", {})  # ... accepted where none


def test_adapters_record_survives_a_roundtrip(tmp_path):
    c = _cache(adapters=_bound(a=1.0))
    c.save(tmp_path / "c")
    assert CalibrationCache.load(tmp_path / "c") == c
    old = {"format": "edgec-calibration/1", **_cache().to_json()}
    del old["adapters"]  # an older cache: loads, records nothing
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    assert CalibrationCache.load(tmp_path).adapters is None


def test_held_out_samples_are_stored_beside_the_cache(tmp_path, monkeypatch):
    """`calibrate --data` keeps the floor's held-out samples for `compile --calib CACHE`, which
    measured its floor on random tokens instead; a cache without them (older, or generated
    samples) has none, and one whose file went missing is refused."""
    from edgec.calibration import cache as cache_module

    feeds = [{"input_ids": np.full((1, 8), i, np.int64)} for i in range(4)]
    c = _cache(data="file d.npz", data_sha256="0" * 64)
    assert c.save_held_out(tmp_path / "c", feeds, "data")
    c.save(tmp_path / "c")
    back = CalibrationCache.load(tmp_path / "c")
    assert back == c and back.held_out == {"file": "held_out.npz", "samples": 4,
                                           "source": "data"}
    stored = np.load(back.held_out_file())["input_ids"]
    assert stored.shape == (4, 1, 8) and stored[3, 0, 0] == 3
    # fewer samples than recorded were measured on without a word
    np.savez(tmp_path / "c" / "held_out.npz", input_ids=stored[:1])
    with pytest.raises(UserError, match="holds 1 held-out samples, calibration.json records 4"):
        back.held_out_file()
    (tmp_path / "c" / "held_out.npz").unlink()
    with pytest.raises(UserError, match="held-out samples are missing; re-run `edgec calibrate`"):
        back.held_out_file()
    old = {"format": "edgec-calibration/1", **_cache().to_json()}
    for key in ("held_out", "data_sha256"):
        del old[key]
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    assert CalibrationCache.load(tmp_path).held_out_file() is None
    monkeypatch.setattr(cache_module, "HELD_OUT_MAX_BYTES", 100)  # 4 × 64 bytes: too large
    big = _cache()
    assert not big.save_held_out(tmp_path / "big", feeds, "data") and big.held_out == {}
    assert not (tmp_path / "big" / "held_out.npz").exists()


def test_calibration_samples_are_stored_beside_the_cache(tmp_path, monkeypatch):
    """`calibrate --data` keeps the file's samples GPTQ takes, so `compile --calib CACHE`
    rounds on them (it rounded on random tokens); an older cache has none and says it was made
    from a file, a generated one does not; one whose file went missing is refused."""
    from edgec.calibration import cache as cache_module

    feeds = [{"input_ids": np.full((1, 8), i, np.int64)} for i in range(6)]
    c = _cache(data="file d.npz", data_sha256="0" * 64)
    assert c.calibration_samples_file() is None
    assert c.save_calibration_samples(tmp_path / "c", feeds)
    c.save(tmp_path / "c")
    back = CalibrationCache.load(tmp_path / "c")
    assert back == c and back.calibration_samples == {"file": "calibration_samples.npz",
                                                      "samples": 6}
    stored = np.load(back.calibration_samples_file())["input_ids"]
    assert stored.shape == (6, 1, 8) and stored[5, 0, 0] == 5
    np.savez(tmp_path / "c" / "calibration_samples.npz", input_ids=stored[:5])
    with pytest.raises(UserError, match="holds 5 calibration samples, calibration.json records 6"):
        back.calibration_samples_file()
    (tmp_path / "c" / "calibration_samples.npz").unlink()
    with pytest.raises(UserError, match="calibration samples are missing; re-run `edgec calib"):
        back.calibration_samples_file()
    old = {"format": "edgec-calibration/1", **c.to_json()}
    del old["calibration_samples"]
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    older = CalibrationCache.load(tmp_path)
    assert older.calibration_samples_file() is None and older.made_from_data()
    assert not _cache().made_from_data()
    monkeypatch.setattr(cache_module, "CALIBRATION_SAMPLES_MAX_BYTES", 100)
    big = _cache()
    assert not big.save_calibration_samples(tmp_path / "big", feeds)
    assert big.calibration_samples == {}
    assert not (tmp_path / "big" / "calibration_samples.npz").exists()


def test_bad_cache_files(tmp_path):
    with pytest.raises(UserError, match="no calibration cache"):
        CalibrationCache.load(tmp_path)
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        CalibrationCache.load(tmp_path)
    (tmp_path / "calibration.json").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not an edgec calibration cache"):
        CalibrationCache.load(tmp_path)
    # --calib / calibration=: an .npy was read as a cache ("invalid JSON: 'utf-8' codec ...")
    np.save(tmp_path / "d.npy", np.zeros(3))
    with pytest.raises(UserError, match="or an .npz of samples whose keys are the model's input"):
        calibration_input(tmp_path / "d.npy")


_ROTATIONS = {"file": "rotations.safetensors", "graph": "0" * 64, "options": {"steps": 1},
              "keys": ["r1"], "summary": {}}


@pytest.mark.parametrize("edit,match", [
    ({"tensors": [1, 2]}, "not a table of tensor ranges"),
    ({"tensors": {"x": {"lowest": float("nan"), "highest": 1.0}}}, "tensor 'x' has no valid"),
    ({"tensors": {"x": {"min": -1.0, "max": 1.0}}}, "tensor 'x' has no valid"),
    ({"tensors": {"x": {"lowest": 2.0, "highest": -1.0}}}, "lowest ≤ highest"),
    ({"tensors": {"x": "wide"}}, "tensor 'x' has no valid"),
    ({"samples": "many"}, "'samples' is 'many'"),
    ({"adapters": ["a"]}, "'adapters' is \\['a'\\], not a record of LoRA adapters"),
    ({"adapters": {"names": "a", "sha256": "0"}}, "not a record of LoRA adapters"),
    ({"held_out": {"file": "held_out.npz", "samples": 4, "source": "x"}},
     "'held_out' is .*not a record of held-out samples"),
    ({"held_out": [1]}, "not a record of held-out samples"),
    ({"calibration_samples": {"file": "calibration_samples.npz", "samples": "all"}},
     "'calibration_samples' is .*not a record of calibration samples"),
    # an AttributeError and a TypeError; a path outside the cache was read
    ({"rotations": "x"}, "'rotations' is 'x', not a record of DartQuant rotations"),
    ({"rotations": {**_ROTATIONS, "file": 5}}, "'rotations' has 'file' 5, not a record"),
    ({"rotations": {**_ROTATIONS, "options": None}}, "'rotations' has 'options' None"),
    ({"rotations": {**_ROTATIONS, "file": "../other/rotations.safetensors"}},
     "names the file '../other/rotations.safetensors', not a file name in the cache's"),
    ({"rotations": {**_ROTATIONS, "file": ".."}}, "names the file '..'"),
    # generated again on reuse: 10**9 grew to 13.6 GB without a word
    ({"samples": 10**9}, "'samples' is 1000000000, more than the 4096 generated"),
])
def test_edited_cache_entries_are_refused_in_one_line(tmp_path, edit, match):
    """Each failed later as an internal error (an AssertionError or AttributeError in ORT's
    quantizer) or quantized with ranges running backwards."""
    raw = {"format": "edgec-calibration/1", **_cache().to_json(), **edit}
    (tmp_path / "calibration.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=match):
        CalibrationCache.load(tmp_path)
    if "rotations" in edit:  # the record as calibrate writes it loads
        raw["rotations"] = _ROTATIONS
        (tmp_path / "calibration.json").write_text(json.dumps(raw))
        assert CalibrationCache.load(tmp_path).rotations == _ROTATIONS


def test_a_rotation_missing_from_the_rotations_file_is_named(tmp_path):
    """A key taken out of rotations.safetensors was refused as "does not match the model
    (graph ...)": the graph came out half rotated."""
    from safetensors.numpy import save_file

    c = _cache()
    eye = np.eye(4)
    c.save_rotations(tmp_path, {"r1": eye, "r2.0": eye, "r2.1": eye}, "0" * 64, {"steps": 1}, {})
    c.save(tmp_path)
    back = CalibrationCache.load(tmp_path)
    assert set(back.load_rotations("0" * 64, {"steps": 1})) == {"r1", "r2.0", "r2.1"}
    save_file({"r1": eye, "r2.0": eye}, str(tmp_path / "rotations.safetensors"))
    with pytest.raises(UserError, match="rotations file lacks r2.1 \\(calibration.json records "
                                        "r1, r2.0, r2.1\\)"):
        back.load_rotations("0" * 64, {"steps": 1})


def test_model_hash_tracks_weights(llama_src):
    import onnx_ir as ir

    h = model_hash(llama_src.model)
    assert h == model_hash(llama_src.model)
    name, value = next((n, v) for n, v in llama_src.model.graph.initializers.items()
                       if v.const_value is not None and v.const_value.size > 8)
    original = value.const_value
    arr = original.numpy().copy()
    arr.flat[0] += 1.0
    value.const_value = ir.tensor(arr, name=name)
    try:
        assert model_hash(llama_src.model) != h
    finally:
        value.const_value = original


def test_npz_samples_are_validated(tmp_path):
    specs = [IOSpec("input_ids", (1, 8), "int64")]
    good = tmp_path / "good.npz"
    np.savez(good, input_ids=np.zeros((3, 1, 8), np.int64))
    samples = samples_from_npz(good, specs)
    assert len(samples) == 3 and samples[0]["input_ids"].shape == (1, 8)
    for name, arrays, match in [
        ("missing.npz", {"ids": np.zeros((3, 1, 8), np.int64)}, "no array for input"),
        ("shape.npz", {"input_ids": np.zeros((3, 1, 9), np.int64)}, "have shape"),
        ("dtype.npz", {"input_ids": np.zeros((3, 1, 8), np.float32)}, "the model wants"),
        ("empty.npz", {"input_ids": np.zeros((0, 1, 8), np.int64)}, "holds no samples"),
        ("stray.npz", {"input_ids": np.zeros((3, 1, 8), np.int64),  # was dropped silently
                       "foo": np.zeros((3, 1, 8), np.int64)}, r"unknown inputs \['foo'\]"),
    ]:
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError, match=match):
            samples_from_npz(tmp_path / name, specs)


def test_non_finite_ranges_are_never_written(tmp_path):
    """All-NaN samples wrote NaN/Infinity into calibration.json: no JSON, every reuse failed."""
    from edgec.errors import InternalError

    with pytest.raises(InternalError, match="non-finite range for tensor 'x'"):
        _cache(tensors={"x": {"lowest": float("nan"), "highest": 2.0}}).save(tmp_path / "c")
    assert not (tmp_path / "c" / "calibration.json").exists()
