"""Recipe: one parse and validation before any export; the stage table it selects."""

import re

import pytest

import edgec
from edgec.errors import UserError
from edgec.pipeline import STAGES
from edgec.recipe import Recipe


@pytest.fixture
def no_export(monkeypatch):
    """Any export attempt fails the test: refusals must come before it."""
    from edgec.exporters import sources

    def exported(*a, **k):
        raise AssertionError("the source was exported before the recipe was refused")

    monkeypatch.setattr(sources, "resolve_source", exported)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target="qnn-htp"), "qnn-htp runs quantized models only.*add --quantize w8a8"),
    (dict(target="ort-cpu", quantize={"scheme": "w8a8", "metod": "entropy"}),
     "unknown --quantize option 'metod'"),
    (dict(target="ort-cpu", quantize={"method": "entropy"}), "--quantize needs a scheme"),
    (dict(target="ort-cpu", quantise="w8a8"), "unknown compile option 'quantise'"),
    (dict(target="ort-cpu", quantize="w4a16", calibration="x.npz"), "no such calibration data"),
    (dict(target="ort-cpu", sparse_attention={"keep": 0.2, "blok": 4}),
     "unknown sparse attention option 'blok'"),
    (dict(target="ort-cpu", lora_mode="fused"), "unknown LoRA mode 'fused'"),
    (dict(target="ort-cpu", rotate="givens"), "unknown rotation 'givens'"),
    (dict(target="ort-cpu", rotate="hadamard:r5=true"), "unknown --rotate option 'r5'"),
    # the head given again as a key: cls(method=..., method=...) was a TypeError (exit 1)
    (dict(target="ort-cpu", rotate="hadamard:method=dartquant"),
     "--rotate option 'method' is not a key=value option; give the method before ':' only"),
    (dict(target="tensorrt", quantize="w8a8:scheme=fp8"),
     "--quantize option 'scheme' is not a key=value option; give the scheme before ':' only"),
    (dict(target="tensorrt", quantize="w8a8:sheme=fp8"),
     r"unknown --quantize option 'sheme'; known: method, exclude"),  # scheme is not a key
    # mask_fill bounds a fully quantized target's masks: elsewhere accepted and unused
    (dict(target="tensorrt", quantize="w8a8:mask_fill=5"),
     "mask_fill=5 bounds the attention masks of a fully quantized target.*drop mask_fill"),
    (dict(target="ort-cpu", quantize={"scheme": "w8a8", "mask_fill": 100}), "drop mask_fill"),
    # nan and inf passed the range checks (nan compares False, inf is > 0)
    (dict(target="qnn-htp", quantize="w8a8:mask_fill=nan"),
     "--quantize mask_fill must be a finite number, not nan"),
    (dict(target="qnn-htp", quantize="w8a8:mask_fill=1e39"), r"mask_fill=1e\+39: give the "
                                                             r"fill's size, a number in \[1, "),
    (dict(target="qnn-htp", quantize="w8a8:mask_fill=-5"), "a number in \\[1, 10000\\)"),
    (dict(target="tensorrt", quantize="w8a8:max_kld=inf"),
     "--quantize max_kld must be a finite number, not inf"),
    (dict(target="ort-cpu", quantize="w8a8:split=inf"), "split must be a finite number"),
    (dict(target="ort-cpu", context=64), "add --generate"),
    (dict(target="ort-cpu", generate=True, kv_retrieval="freekv:page=0"), "page must be"),
    (dict(target="ort-cpu", kv_retrieval="freekv:page=0"), "add --generate"),  # missing first
    (dict(target="ort-cpu", quantize="w8a8:min_cos=1.5"), "min_cos must be a cosine"),
    (dict(target="ort-cpu", check="yes"), "check must be True or False"),
    (dict(target="ort-cpu", generate="no"), "generate must be True or False"),  # was "check"
    (dict(target="ort-cpu", lora_mode="swappable"), "needs the adapters it applies to"),
    (dict(target="ort-cpu", lora={"x": float("nan")}), "not a finite number"),
    (dict(target="ort-cpu", lora="x:1_0"), "weight '1_0' is not a number"),  # float(): 10
    # the rotation made every pruned weight dense; the report said 50% sparsity
    (dict(target="ort-cpu", prune="2:4", rotate="hadamard"), "--prune and --rotate do not"),
])
def test_refused_before_any_export(no_export, tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        edgec.compile("llama", output_dir=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec,message", [
    ("keep=1.5", "sparse attention keep=1.5 must be in (0, 1]"),
    ("keep=0", "sparse attention keep=0.0 must be in (0, 1]"),
    ("block=0", "sparse attention block=0 must be ≥ 1"),
    ("qblock=3", "sparse attention qblock=3 must be a multiple of block=64 (or 0: 8 × block)"),
    ("mode=foo", "sparse attention mode='foo': use rf2, rainfusion or mask"),
    ("sink=bar", "sparse attention sink='bar': use none or frame"),
    ("chunk_mb=0", "sparse attention chunk_mb=0 must be ≥ 1"),
    ("prefix=-1", "sparse attention prefix=-1 must be ≥ 0"),
    ("tail_mode=x", "sparse attention tail_mode='x': use dense or blocks"),
    ("keep=0.2,keep=0.3", "sparse attention option 'keep' is given twice; give it once"),
    ({"keep": "x"}, "sparse attention option keep='x' is not valid (expected float)"),
    ({"block": None}, "sparse attention block=None is not valid (expected int)"),
    ("", "sparse attention options are empty: give 'default' for the defaults or k=v options "
         "(e.g. keep=0.2,block=64)"),  # was the defaults, in silence
    (" ", "sparse attention options are empty: give 'default' for the defaults or k=v options "
          "(e.g. keep=0.2,block=64)"),
    (" , ", "sparse attention options are empty: give 'default' for the defaults or k=v "
            "options (e.g. keep=0.2,block=64)"),  # "$A,$B" with both unset
])
def test_sparse_attention_values_are_refused_before_any_export(no_export, tmp_path, spec,
                                                                message):
    """Checked when the recipe is parsed (they were checked after a 14 s export); sink=frame
    without grid= is not refused here: the model supplies the grid."""
    with pytest.raises(UserError) as e:
        edgec.compile("video-dit", target="ort-cpu", output_dir=tmp_path / "o", config="tiny",
                      sparse_attention=spec)
    assert str(e.value) == message
    Recipe.parse("ort-cpu", sparse_attention="sink=frame,mode=rainfusion")


@pytest.mark.parametrize("spec,message", [
    # the model's grid (2x4x4) with a tile as deep as it: every block a sink (was "sparsity 0%")
    ("block=16,min_seq=0,sink=frame,tile=2x2x4",
     "sparse attention sink=frame on grid 2x4x4 with tile=2x2x4 makes every block a "
     "first-frame sink, so nothing is sparse; give a tile one frame deep (tile=1xHxW, as the "
     "default one is) or drop sink=frame"),
    ("grid=2x2x2", "sparse attention grid=2x2x2 does not match video-dit tiny"),
])
def test_sparse_attention_against_the_models_grid_is_refused_before_the_export(
        no_export, tmp_path, spec, message):
    """The registry knows the grid without exporting (these were refused after a 20 s export)."""
    with pytest.raises(UserError, match="^" + re.escape(message)):
        edgec.compile("video-dit", target="ort-cpu", output_dir=tmp_path / "o", config="tiny",
                      sparse_attention=spec)


def test_weight_only_calibration_is_refused_up_front(no_export, tmp_path):
    """A cache (activation ranges) means nothing to a weight-only scheme; an .npz of samples
    does (GPTQ's Hessians and the floor are measured on it): that one is taken."""
    from edgec.calibration import CalibrationCache
    from edgec.recipe import Recipe

    cache = CalibrationCache("h", "ort-cpu", "w8a8", "minmax", 2, "generated", {})
    with pytest.raises(UserError, match="w4a16 is weight-only: it takes no calibration cache"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o", quantize="w4a16",
                      calibration=cache)
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "s.npz", input_ids=np.zeros((2, 1, 8), np.int64))
    recipe = Recipe.parse(target="ort-cpu", quantize="w4a16", calibration=tmp_path / "s.npz")
    assert recipe.calibration == tmp_path / "s.npz"
    with pytest.raises(UserError, match="w4a16 is weight-only: it needs no calibration"):
        edgec.calibrate("llama", "ort-cpu", tmp_path / "c", quantize="w4a16")
    assert not (tmp_path / "c").exists()


def _stages(target, **options):
    recipe = Recipe.parse(target, **options)
    return [s.name for s in STAGES if s.applies(recipe, recipe.target)]


def test_the_table_selects_stages_per_recipe_and_target():
    # the CPU targets' last stage shifts int8 weights to uint8 where the host saturates
    host = "device-legalize-quantized"
    assert _stages("ort-cpu") == ["cleanup", "lora-fold", host]
    assert _stages("ort-cpu", quantize="w8a8", sparse_attention=True, prune="2:4") == [
        "cleanup", "lora-fold", "prune", "sparse-attention", "quantize", host]
    assert _stages("ort-cpu", quantize="w8a8", rotate="hadamard") == [
        "cleanup", "lora-fold", "rotate", "quantize", host]
    assert _stages("ort-cpu", quantize="w8a8:split=50,smooth=0.5") == [
        "cleanup", "lora-fold", "smooth", "outlier-split", "quantize", host]
    assert _stages("qnn-htp", quantize="w8a16") == [
        "cleanup", "lora-fold", "mask-fill", "device-legalize", "quantize"]
    assert _stages("qnn-htp", quantize="w8a16", soc="sm8650") == [  # the SoC recorded last
        "cleanup", "lora-fold", "mask-fill", "device-legalize", "quantize", "device-soc"]
    assert _stages("tensorrt", quantize="fp8") == [
        "cleanup", "lora-fold", "quantize", "device-legalize-quantized"]


def test_recipe_records_what_was_asked():
    recipe = Recipe.parse("openvino-cpu", quantize="w8a8:samples=4,exclude=Softmax",
                          sparse_attention="keep=0.3", config="tiny")
    data = recipe.to_json()
    assert data["target"] == "openvino-cpu" and data["config"] == "tiny"
    assert data["quantize"] == {"scheme": "w8a8", "method": None, "exclude": ["Softmax"],
                                "samples": 4, "mask_fill": 100.0, "min_cos": None,
                                "max_kld": None, "smooth": None, "split": None, "gptq": None,
                                "stream": None, "sample_steps": None,
                                "held_out": None, "reduce_range": None, "block": None}
    assert data["sparse_attention"] == {"keep": 0.3}


def test_mask_fill_is_taken_where_the_masks_are_quantized():
    assert Recipe.parse("qnn-htp", quantize="w8a8:mask_fill=5").quantize.mask_fill == 5.0
    assert Recipe.parse("tensorrt", quantize="w8a8").quantize.mask_fill == 100.0  # the default
