"""Vision-language generation: a LLaVA checkpoint and the ``vlm`` reference model compiled with
``--generate`` (image encoder + VLM prefill graph + text decoder), ``generate(image=...)``, and
vision-token pruning in the prefill graph. Two compiles per module."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.errors import UserError
from edgec.exporters.vision_prune import ScoredDecoder, VisionPruning, VlmPrefill
from edgec.models import registry
from edgec.runtimes.vision import TextBudget, expand_prompt, load_pixels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IMAGE = 255  # the tiny LLaVA's image token id
NEW = 16
PRUNING = "keep=0.25,layer=2,score=attention,text_keep=0.5,recent=4"


def _tiny_llava(vision_config, text_layers: int, strategy: str):
    """A tiny LLaVA: a 2-layer vision tower of ``vision_config`` (32 px, 8 px patches), a LLaMA
    text model with GQA (random weights, wider than HF's init so greedy decoding does not
    repeat one token)."""
    torch.manual_seed(0)
    vision = vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy)).eval()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LLaVA (CLIP vision tower, LLaMA text model with GQA; random weights, wider than
    HF's init so greedy decoding does not repeat one token), saved as safetensors."""
    model = _tiny_llava(transformers.CLIPVisionConfig, 3, "default")
    path = tmp_path_factory.mktemp("llava") / "ckpt"
    model.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(
        path)
    return path, model


@pytest.fixture(scope="module")
def llava_ov(tmp_path_factory, llava):
    out = tmp_path_factory.mktemp("vlm-ov") / "art"
    return edgec.compile(str(llava[0]), target="openvino-cpu", output_dir=out, generate=True)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-pruned") / "art"
    return edgec.compile("vlm", target="ort-cpu", output_dir=out, config="tiny+sharp",
                         generate=True, prune_vision_tokens=PRUNING)


def _pixels(batch, seed=0, side=32):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_llava_greedy_matches_hf_generate_on_openvino(llava, llava_ov):
    _, model = llava
    session = llava_ov.load()
    pixels = _pixels(2)
    ids = torch.tensor([[1, 5, 7] + [IMAGE] * 16 + [9, 11, 13, 17],
                        [0, 0, 1] + [IMAGE] * 16 + [21, 23, 25, 27]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        ref = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    out = session.generate(ids.numpy(), mask.numpy(), image=pixels.numpy(), max_new_tokens=NEW,
                           eos_token_id=[])
    np.testing.assert_array_equal(out, ref.sequences.numpy())
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3  # not one repeated token
    stats = session.last_generation
    assert stats["prefill_graph"] == "vision" and stats["prompt_tokens_kept"] == ids.shape[1]
    # the first step's logits (the prefill graph's) against HF's
    prefill, vision = session._vision_sessions()
    features = vision._run({"pixel_values": pixels.numpy()})["image_features"]
    positions = np.where(mask == 0, 1, np.cumsum(mask.numpy(), axis=1) - 1)
    logits = prefill._run({"input_ids": ids.numpy(), "image_features": features,
                           "attention_mask": mask.numpy(), "position_ids": positions})["logits"]
    np.testing.assert_allclose(logits[:, -1], ref.logits[0].numpy(), rtol=1e-4, atol=1e-4)
    manifest = json.loads((llava_ov.path / "manifest.json").read_text())
    assert manifest["generation"]["vision"]["image_tokens"] == 16
    assert {"vision", "prefill"} <= set(manifest["runtime"])


def test_cli_generate_with_png_and_bad_image(llava, llava_ov, tmp_path):
    from PIL import Image

    png = tmp_path / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(llava_ov.path), "--image", str(png),
                                 "--prompt-ids", f"1,5,{IMAGE},9", "-n", "6", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert len(got["new_ids"]) == 6 and got["prefill_graph"] == "vision"
    # the CLI's preprocessing is the checkpoint's processor's (shortest edge resized, centre
    # crop, mean/std) on this non-square image; the one <image> expanded to 16
    entry = llava_ov.manifest["generation"]["vision"]
    pixels = load_pixels(png, entry)
    processor = transformers.AutoImageProcessor.from_pretrained(llava[0])
    with Image.open(png) as im:
        expected = processor(images=im, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixels, expected, atol=2e-5)
    session = llava_ov.load()
    ids, _ = expand_prompt(np.array([[1, 5, IMAGE, 9]]), None, entry)
    assert ids.shape == (1, 19)
    out = session.generate(ids, image=pixels, max_new_tokens=6, eos_token_id=[])
    assert out[0, -6:].tolist() == got["new_ids"]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = runner.invoke(app, ["generate", str(llava_ov.path), "--image", str(bad),
                                 "--prompt-ids", "1,2"])
    assert result.exit_code == 2 and "image" in result.output
    with pytest.raises(UserError, match="placeholder"):
        expand_prompt(np.array([[1, IMAGE, IMAGE, 3]]), None, entry)
    # an <image> placeholder without the image decoded its embedding as text: nonsense
    result = runner.invoke(app, ["generate", str(llava_ov.path), "--prompt-ids",
                                 f"1,5,{IMAGE},9", "-n", "2"])
    assert result.exit_code == 2 and "give the image with --image" in result.stderr, result.output
    with pytest.raises(UserError, match="image placeholder"):
        session.generate(ids, max_new_tokens=2)


def test_integer_pixels_and_a_directory_are_refused(tmp_path):
    """uint8 0..255 pixels were read as normalized values; a directory was 'no such file'."""
    entry = {"image_size": 32}
    npy = tmp_path / "pixels.npy"
    np.save(npy, np.full((3, 32, 32), 200, np.uint8))
    with pytest.raises(UserError, match="uint8; give the processor's normalized float"):
        load_pixels(npy, entry)
    with pytest.raises(UserError, match="int64; give"):
        load_pixels(np.zeros((3, 32, 32), np.int64), entry)
    with pytest.raises(UserError, match="is a directory"):
        load_pixels(tmp_path, entry)
    assert load_pixels(np.zeros((3, 32, 32), np.float64), entry).dtype == np.float32


def test_corrupt_npy_is_not_called_pickled(tmp_path):
    """A 1-byte .npy was 'not a plain .npy array (This file contains pickled (object) data…)'
    and an empty one an EOFError (exit 1): neither is readable, whatever np.load guessed."""
    entry = {"image_size": 32}
    np.save(tmp_path / "full.npy", np.zeros((3, 32, 32), np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    for name, content in (("one.npy", b"x"), ("empty.npy", b""), ("cut.npy", data[:200])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match="not a readable .npy file") as got:
            load_pixels(tmp_path / name, entry)
        assert "pickle" not in str(got.value)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="not a plain .npy array"):
        load_pixels(tmp_path / "obj.npy", entry)


def test_static_prefill_reports_kept_tokens_not_padding_slots():
    """An NPU's static prefill graph left-pads the prompt: its kept mask has padding slots,
    which `prompt_tokens_kept` counted; and a longer prompt's rest (the decoder's chunked
    prefill) was left out. Fake sessions: the prefill drops two prompt tokens."""
    from types import SimpleNamespace

    from edgec.runtimes.vision import VisionPrefill

    def prefill(feeds):
        kept = np.delete(feeds["attention_mask"], [4, 5], axis=1)
        return {"attention_mask_kept": kept, "logits": np.zeros((1, 6, 4), np.float32),
                "present": np.zeros((1, 1, 6, 2), np.float32)}

    cache = SimpleNamespace(load_prompt=lambda presents, mask: None,
                            step=lambda ids, mask, positions: np.zeros((1, 1, 4), np.float32))
    vision = SimpleNamespace(_run=lambda feeds: {"image_features": np.zeros((1, 2, 8))})
    info = SimpleNamespace(present_names=["present"])
    for length, kept in ((5, 3), (10, 8)):  # 8 static slots: padded, and 2 tokens past them
        step = VisionPrefill(cache, SimpleNamespace(_run=prefill), vision, info,
                             np.zeros((1, 3, 32, 32), np.float32), static_prompt=(8, IMAGE))
        ids = np.arange(3, 3 + length)[None]
        step.step(ids, np.ones_like(ids), np.arange(length)[None])
        assert step.stats["prompt_tokens_kept"] == kept


def test_keep_1_is_the_unpruned_model():
    vlm = registry.get("vlm").build("tiny+sharp")
    pixels, ids = registry.get("vlm").example_inputs("tiny+sharp")
    with torch.no_grad():
        features = vlm.vision(pixels)
        b, s = ids.shape
        feeds = (ids, features, torch.ones(b, s, dtype=torch.int64),
                 torch.arange(s)[None].expand(b, s))
        full = VlmPrefill(vlm, None)(*feeds)
        kept = VlmPrefill(vlm, VisionPruning(keep=1.0, layer=2))(*feeds)
        logits = vlm(pixels, ids)[:, -1:]
    for a, c in zip(full, kept):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full[0], logits, rtol=1e-4, atol=1e-5)


def test_norm_score_keeps_the_largest_image_tokens():
    vlm = registry.get("vlm").build("tiny")
    pixels, ids = registry.get("vlm").example_inputs("tiny")
    with torch.no_grad():
        features = vlm.vision(pixels)
        planted = [2, 5, 11, 13]  # image feature rows made large: the tokens to keep
        features[:, planted] *= 50
        b, s = ids.shape
        feeds = (ids, features, torch.ones(b, s, dtype=torch.int64),
                 torch.arange(s)[None].expand(b, s))
        full = VlmPrefill(vlm, None)(*feeds)
        pruned = VlmPrefill(vlm, VisionPruning(keep=0.25, layer=1, score="norm"))(*feeds)
    first = 1  # the prompt is [token, 16 image placeholders, text]
    keep = [0, *[first + p for p in planted], *range(first + 16, s)]
    assert pruned[1].shape == (b, len(keep))
    # layer 0 ran on every token: its kept keys are the unpruned keys at the kept positions
    torch.testing.assert_close(pruned[2], full[2][:, :, keep], rtol=1e-5, atol=1e-6)


def _pytorch_pruned_greedy(vlm, pruning, pixels, ids, mask, new_tokens: int) -> np.ndarray:
    """Greedy decoding in PyTorch of what the pruned artifact computes: the pruned prefill
    module, then the language model's cached decode over the kept tokens with positions
    continuing from the full prompt. The ``new_tokens`` generated ids, [batch, new_tokens]."""
    b = ids.shape[0]
    positions = torch.where(mask == 0, 1, mask.cumsum(1) - 1)
    with torch.no_grad():
        res = VlmPrefill(vlm, pruning)(ids, vlm.vision(pixels), mask, positions)
        token = res[0][:, -1].argmax(-1)
        mask, past = res[1], list(zip(res[2::2], res[3::2]))
        tokens, step = [token], positions[:, -1:] + 1
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], 1)
            logits, past = vlm.language.forward_cached(token[:, None], mask, step, past)
            token, step = logits[:, -1].argmax(-1), step + 1
            tokens.append(token)
    return torch.stack(tokens, 1).numpy()


def test_pruned_generation_matches_pytorch_pruned_decoding(pruned):
    """ONNX Runtime's pruned prefill + decode against the same computation in PyTorch: the
    pruned prefill module, then the language model's cached decode over the kept tokens with
    positions continuing from the full prompt (8 tokens: the text budget drops nothing yet); a
    left-padded row keeps its padding masked and decodes as it does alone."""
    session = pruned.load()
    spec = registry.get("vlm")
    vlm = spec.build("tiny+sharp")
    pixels, ids = spec.example_inputs("tiny+sharp", seed=3)
    ids[1] = torch.cat([torch.zeros(3, dtype=ids.dtype), ids[1, :-3]])  # left-padded by 3
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = session.generate(ids.numpy(), mask.numpy(), image=pixels.numpy(), max_new_tokens=8,
                           eos_token_id=[])
    stats = session.last_generation
    kept = ids.shape[1] - 16 + 4
    assert stats["prompt_tokens_kept"] == kept and stats["generated_tokens_evicted"] == 0
    report = pruned.report["vision_pruning"]
    assert report["kept_image_tokens"] == 4 and 0 < report["prefill_flops_cut"] < 1
    want = _pytorch_pruned_greedy(vlm, VisionPruning(keep=0.25, layer=2), pixels, ids, mask, 8)
    np.testing.assert_array_equal(out[:, ids.shape[1]:], want)
    # the padded row decodes as it does alone
    alone = session.generate(ids[1:, 3:].numpy(), image=pixels[1:].numpy(), max_new_tokens=8,
                             eos_token_id=[])
    np.testing.assert_array_equal(alone[0, -8:], out[1, -8:])


def test_text_budget_drops_generated_tokens_as_pytorch_does(pruned):
    """Decode-time sparsification: beyond the 4 newest, half the generated tokens stay (those
    that received the most attention); ONNX Runtime's decoder scores, cache eviction and mask
    against PyTorch's decoder with the same budget."""
    session = pruned.load()
    spec = registry.get("vlm")
    vlm = spec.build("tiny+sharp")
    pixels, ids = spec.example_inputs("tiny+sharp", seed=1)
    new = 24
    out = session.generate(ids.numpy(), image=pixels.numpy(), max_new_tokens=new,
                           eos_token_id=[])
    stats = session.last_generation
    assert stats["generated_tokens_evicted"] > 0
    assert stats["cache_tokens"] == stats["prompt_tokens_kept"] + new - 1 - (
        stats["generated_tokens_evicted"])
    b, s = ids.shape
    budget = TextBudget(0.5, 4)
    decoder = ScoredDecoder(vlm.language, 1)
    with torch.no_grad():
        res = VlmPrefill(vlm, VisionPruning(keep=0.25, layer=2))(
            ids, vlm.vision(pixels), torch.ones(b, s, dtype=torch.int64),
            torch.arange(s)[None].expand(b, s))
        token, mask, past = res[0][:, -1].argmax(-1), res[1], list(res[2:])
        budget.start(mask.numpy())
        tokens = [token]
        for step in range(new - 1):
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], 1)
            logits, scores, *past = decoder(token[:, None], mask, torch.full((b, 1), s + step),
                                            past)
            keep = budget.observe(scores.numpy())
            if keep is not None:
                index = torch.from_numpy(keep)
                past = [t[torch.arange(b)[:, None], :, index].transpose(1, 2) for t in past]
                mask = torch.gather(mask, 1, index)
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
    assert budget.evicted == stats["generated_tokens_evicted"]
    np.testing.assert_array_equal(out[:, s:], torch.stack(tokens, 1).numpy())


def test_report_shows_the_pruning_and_each_graphs_fidelity(pruned):
    """The README's pruning figures (prefill FLOPs before/after, logits cosine to the unpruned
    model) and the vision and prefill graphs' fidelity were in report.json only: neither the
    compile's summary table nor report.md showed them."""
    from edgec.report import render_markdown, summary_rows

    st = pruned.report["vision_pruning"]
    rows = dict(summary_rows(pruned.report))
    line = rows["vision pruning"]
    assert line.startswith("keep=0.25, layer=2 (attention score): 4/16 image tokens kept")
    assert f"{st['prefill_flops'] / 1e6:.3g}M → {st['prefill_flops_pruned'] / 1e6:.3g}M" in line
    assert f"logits cosine {st['example_logits_cosine_vs_unpruned']:.4f} to unpruned" in line
    assert {"vision graph: onnxruntime vs pytorch", "prefill graph: onnxruntime vs pytorch"} <= set(
        rows)
    md = (pruned.path / "report.md").read_text()
    assert md == render_markdown(pruned.report)
    assert f"| vision pruning | {line} |" in md
    assert "## Vision graph fidelity (onnxruntime vs pytorch)" in md and "| image_features |" in md
    assert "## Prefill graph fidelity" in md and "| attention_mask_kept |" in md


def test_no_pruning_row_without_pruning(llava_ov):
    """An unpruned VLM's vision_pruning entry holds only token counts: the row read
    "keep=None, layer=None (? score): None/10 image tokens kept"."""
    from edgec.report import render_markdown, summary_rows

    assert "vision pruning" not in dict(summary_rows(llava_ov.report))
    assert "vision pruning" not in render_markdown(llava_ov.report)


def test_bench_times_generation_after_an_image(pruned):
    result = CliRunner().invoke(app, ["bench", str(pruned.path), "--prompt-tokens", "8",
                                      "--new-tokens", "4", "--iterations", "1", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    # 8 text tokens + 16 image placeholders, 12 of the image's dropped in the prefill
    assert stats["image_tokens"] == 16 and stats["prompt_tokens_kept"] == 8 + 4
    assert stats["prefill_graph"] == "vision" and stats["decode_tokens_per_s"] > 0


def test_quantized_vlm_on_the_npu_with_static_pruned_prefill(tmp_path):
    """qnn-htp (w8a16, the HTP emulator): all three graphs quantized, each calibrated on its own
    inputs (text prompts; random images; prompts around their features) and judged against its
    fp32 source; the pruned prefill is one static graph of 1 + 16 image + 32 text tokens (the
    kept count fixed by keep), a shorter prompt left-padded, a longer one's rest prefilled in
    the decoder's static chunks."""
    import onnx

    art = edgec.compile("vlm", "qnn-htp", tmp_path / "q", generate=True, quantize="w8a16",
                        prune_vision_tokens="keep=0.25", context=128)
    fidelity = art.report["fidelity"]
    # the image encoder's LayerNorms share one tensor of ones as scale and bias: qnn-legalize
    # copies it (without, the HTP's 16-bit encoder drifts to cosine 0.979 from ONNX Runtime's)
    for graph, output, floor in (("target_vs_source", "logits", 0.98),  # measured 0.991
                                 ("vision_graph_vs_source", "image_features", 0.995),  # 0.9998
                                 ("prefill_graph_vs_source", "logits", 0.995)):  # 0.9998
        assert fidelity[graph]["outputs"][output]["cosine"] > floor, graph
    for name in ("vision", "prefill"):
        ops = [n.op_type for n in onnx.load(art.path / f"{name}.onnx").graph.node]
        assert ops.count("QuantizeLinear") >= 4, name
    assert art.manifest["runtime"]["prefill"]["prompt_tokens"] == 1 + 16 + 32
    session = art.load()
    pixels, ids = registry.get("vlm").example_inputs("tiny", seed=2)
    pixels, ids = pixels[:1].numpy(), ids[:1].numpy()
    out = session.generate(ids, image=pixels, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 4)
    # the prompt's tokens less the 12 image tokens dropped, not the graph's 49 slots
    assert session.last_generation["prompt_tokens_kept"] == ids.shape[1] - 12
    longer = np.concatenate([ids, np.arange(3, 60)[None]], axis=1)  # 25 + 57 > 49
    out = session.generate(longer, image=pixels, max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, longer.shape[1] + 4)
    assert session.last_generation["prompt_tokens_kept"] == longer.shape[1] - 12
    late = np.concatenate([np.arange(3, 60)[None], ids], axis=1)  # the image after token 49
    with pytest.raises(UserError, match="first 49 tokens"):
        session.generate(late, image=pixels, max_new_tokens=2)
    # the language graphs calibrated over KV buffers the model filled: calibrated over empty
    # ones, every cached key/value read as zero and the NPU's tokens left fp32's at the third
    assert "filled" in art.report["quantization"]["calibration"]["data"]
    # fp32's tokens: the same pruned computation in PyTorch, which the fp32 ort-cpu artifact
    # matches token for token (test_pruned_generation_matches_pytorch_pruned_decoding; a
    # compile of it here cost ~15 s of exports)
    pixels, ids = (t[:1] for t in registry.get("vlm").example_inputs("tiny", seed=1))
    ref = _pytorch_pruned_greedy(registry.get("vlm").build("tiny"), VisionPruning(keep=0.25),
                                 pixels, ids, torch.ones_like(ids), 8)[0]
    npu = session.generate(ids.numpy(), image=pixels.numpy(), max_new_tokens=8,
                           eos_token_id=[])[0, -8:]
    assert (npu == ref).sum() >= 6, (npu, ref)


def test_vlm_recipe_refusals(tmp_path):
    with pytest.raises(UserError, match="vision-language"):
        edgec.compile("llama", "ort-cpu", tmp_path / "a", generate=True,
                      prune_vision_tokens="keep=0.5")
    with pytest.raises(UserError, match="keep"):
        edgec.compile("vlm", "ort-cpu", tmp_path / "b", generate=True,
                      prune_vision_tokens="keep=0")
    with pytest.raises(UserError, match="drop --rotate"):
        edgec.compile("vlm", "ort-cpu", tmp_path / "c", generate=True, rotate="hadamard")
    with pytest.raises(UserError, match="during the compile"):
        edgec.calibrate("vlm", "ort-cpu", tmp_path / "e", generate=True, quantize="w8a8")
    assert not any(tmp_path.iterdir())
    with pytest.raises(UserError, match="has 4 layers"):
        VlmPrefill(registry.get("vlm").build("tiny"), VisionPruning(layer=4))


def test_calibration_images_span_the_checkpoints_normalization(llava):
    """The image encoder calibrated on uniform pixels in [-1, 1]: a CLIP checkpoint's
    normalized pixels span [-1.79, 2.15], so a tiny LLaVA's quantized features fell to cosine
    0.983 on a PNG (0.9998 on the in-range example the report measured) and its tokens left
    fp32's from the first. Calibration, the example and the floor's held-out samples now draw
    images in [0, 1] normalized by the checkpoint's own mean/std."""
    from types import SimpleNamespace

    from edgec.exporters.hf_llava import CLIP_MEAN, CLIP_STD
    from edgec.exporters.vlm_source import REFERENCE_MEAN, REFERENCE_STD, calibration_samples

    for info, mean, std in (({"path": str(llava[0])}, CLIP_MEAN, CLIP_STD),
                            ({"name": "vlm", "config": "tiny"}, REFERENCE_MEAN, REFERENCE_STD)):
        src = SimpleNamespace(info={**info, "input_names": ["pixel_values"], "vlm_graph": "vision"},
                              feeds={"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})
        pixels = np.stack([s["pixel_values"] for s in calibration_samples(src, 8)])
        low = (0 - np.array(mean)) / np.array(std)
        high = (1 - np.array(mean)) / np.array(std)
        for c in range(3):  # each channel reaches black and white, and no further
            np.testing.assert_allclose(pixels[:, :, c].min(), low[c], atol=1e-5)
            np.testing.assert_allclose(pixels[:, :, c].max(), high[c], atol=1e-5)


def test_static_prefill_calibration_matches_a_one_token_chunk():
    """--context 7 gives a prefill chunk of 1 text token; calibration forced 2, and quantizing
    failed after 80 s on position_ids of 19 against the graph's 18."""
    from types import SimpleNamespace

    from edgec.exporters.vlm_source import calibration_samples

    ids = np.zeros((1, 1 + 16 + 1), np.int64)
    src = SimpleNamespace(info={"name": "vlm", "config": "tiny", "vlm_graph": "prefill",
                                "input_names": ["input_ids", "image_features",
                                                "attention_mask", "position_ids"]},
                          feeds={"input_ids": ids})
    (sample,) = calibration_samples(src, 1)
    assert {k: v.shape[1] for k, v in sample.items()} == {
        "input_ids": 18, "image_features": 16, "attention_mask": 18, "position_ids": 18}


def test_npu_context_too_small_for_the_image_is_refused_up_front(llava, tmp_path):
    """vlm tiny at --context 20 on qnn-htp compiled (exit 0) a prefill graph caching 1 + 16
    image + 5 text tokens = 22 > 20: every image prompt was refused at generate time."""
    from edgec.pipeline import _check_vision_recipe
    from edgec.recipe import Recipe

    for source, context, cached in (("vlm", 20, 22), ("vlm", 7, 18), (str(llava[0]), 21, 22)):
        with pytest.raises(UserError, match=f"--context {context} is too small.* = {cached}, "
                                            ".*--context 23 or more"):
            edgec.compile(source, "qnn-htp", tmp_path / "a", generate=True, quantize="w8a16",
                          context=context)
    assert not any(tmp_path.iterdir())
    recipe = Recipe.parse("qnn-htp", generate=True, quantize="w8a16", context=23)
    _check_vision_recipe("vlm", recipe)  # fits: 22 cached, one slot to decode
    # pruned, the cache holds the 4 kept image tokens: 1 + 4 + 5 = 10 fits 20
    _check_vision_recipe("vlm", Recipe.parse("qnn-htp", generate=True, quantize="w8a16",
                                             context=20, prune_vision_tokens="keep=0.25"))
    with pytest.raises(UserError, match="1 \\+ 4 kept image tokens of 16 .* --context 7 or"):
        _check_vision_recipe("vlm", Recipe.parse("qnn-htp", generate=True, quantize="w8a16",
                                                 context=6, prune_vision_tokens="keep=0.25"))


@pytest.fixture(scope="module")
def siglip_llava(tmp_path_factory):
    """A tiny LLaVA with a SigLIP vision tower (no CLS row) and the ``full`` strategy: 16
    image features for 32 px / 8 px patches; SigLIP's processor (height/width resize)."""
    model = _tiny_llava(transformers.SiglipVisionConfig, 2, "full")
    path = tmp_path_factory.mktemp("siglip") / "ckpt"
    model.save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path, model


def test_siglip_llava_counts_its_features_and_greedy_matches_hf(siglip_llava, tmp_path):
    """A SigLIP tower has no CLS row: edgec counted 17 image tokens for 16 features, the last
    placeholder reused the 16th feature and the tokens left HF's after the first."""
    from edgec.exporters.vlm_source import image_token_count, load_vlm

    path, model = siglip_llava
    assert image_token_count(path, None) == 16
    vlm, info, _ = load_vlm(path, None)
    entry = info["vision"]
    assert entry["image_tokens"] == vlm.image_tokens == 16
    ids, _ = expand_prompt(np.array([[1, 5, 7, IMAGE, 9, 11]]), None, entry)
    pixels = _pixels(1, seed=1)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), pixel_values=pixels, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False)
        out = torch.tensor(ids)
        for _ in range(6):  # greedy, the whole sequence each step
            out = torch.cat([out, vlm(pixels, out)[:, -1:].argmax(-1)], dim=1)
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    # a config whose image_seq_length is not the tower's count is refused, up front and on load
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).symlink_to(f)
    cfg = json.loads((path / "config.json").read_text())
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**cfg, "image_seq_length": 17}))
    with pytest.raises(UserError, match="image_seq_length is 17, but its vision tower .* gives "
                                        "16 image features"):
        image_token_count(bad, None)


def test_siglip_preprocessing_resizes_to_height_and_width(siglip_llava, tmp_path):
    """SigLIP's processor resizes the whole image to height × width (no crop); edgec resized
    the shortest edge and cropped the centre (max |diff| 1.4 on a non-square image)."""
    from PIL import Image

    from edgec.exporters.hf_llava import _preprocessing

    png = tmp_path / "wide.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(png)
    entry = _preprocessing(siglip_llava[0], 32)
    processor = transformers.AutoImageProcessor.from_pretrained(siglip_llava[0])
    with Image.open(png) as im:
        expected = processor(images=im, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(load_pixels(png, entry), expected, atol=2e-5)


def test_transparent_images_are_composited_onto_white(llava, tmp_path):
    """An RGBA PNG went through convert("RGB"), which keeps the colour of transparent pixels;
    the processor (transformers' convert_to_rgb) composites them onto white first. So do LA
    and a palette image with a transparent index."""
    from PIL import Image

    from edgec.exporters.hf_llava import _preprocessing

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 255, (40, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[10:30, 12:36, 3] = 255  # an opaque logo on a transparent (random-coloured) border
    rgba[15:20, 15:40, 3] = 128
    images = {"rgba.png": Image.fromarray(rgba, "RGBA"),
              "la.png": Image.fromarray(rgba[..., 2:], "LA")}
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(16)
    palette.info["transparency"] = 0
    images["p.png"] = palette
    entry = _preprocessing(llava[0], 32)
    processor = transformers.AutoImageProcessor.from_pretrained(llava[0])
    for name, image in images.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            expected = processor(images=im, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(load_pixels(tmp_path / name, entry), expected, atol=2e-5,
                                   err_msg=name)


def test_mistral_sliding_window_is_refused():
    """A Mistral text model with sliding_window 4 compiled (exit 0) into a decoder attending over
    the whole context: its tokens left HF's once the prompt passed the window."""
    from edgec.exporters.hf_llava import _language

    def llava(window):
        text = transformers.MistralConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            sliding_window=window)
        vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               image_size=16, patch_size=8)
        return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE)).eval()

    model = llava(4)
    with pytest.raises(UserError, match="sliding window of 4 tokens; .*sliding_window to null"):
        _language(model, model.config, "ckpt")
    for window in (None, 64):  # none, or as wide as the context: the whole context it is
        model = llava(window)
        assert _language(model, model.config, "ckpt").cfg.layers == 1
