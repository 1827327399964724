"""Generation from KV-cache decoder artifacts: greedy parity with Hugging Face ``generate()``
on the reference model and HF LLaMA / Qwen2 checkpoints, on ort-cpu and openvino-cpu (stateful).

Artifacts are compiled once per module (each compile is an export + verification, ~5 s).
"""

from __future__ import annotations

import dataclasses
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
from edgec.runtimes.generation import GenerationConfig, process_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ("ort-cpu", "openvino-cpu")
NEW = 32
HF = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
          bos_token_id=1, eos_token_id=2, pad_token_id=0)
WORDS = "the a cat dog sat on mat ran far and then it was good day".split()


def _tokenizer(path):
    """A word-level fast tokenizer (tokenizer.json) with <pad>/<s>/</s>/<unk> = 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    # a chat template in words of the vocabulary (`then` opens the answer), as transformers >= 4.47
    # writes it beside the tokenizer_config.json that names the special tokens
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ bos_token }} {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}then{% endif %}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfgen")
    torch.manual_seed(0)
    models = {}
    for name, (cfg_cls, cls) in {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}.items():
        model = cls(cfg_cls(**HF)).eval()
        model.save_pretrained(root / name)
        models[name] = model
    _tokenizer(root / "llama")
    return root, models


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, checkpoints):
    root, _ = checkpoints
    out = tmp_path_factory.mktemp("gen")
    arts = {("llama", "ort-cpu"): edgec.compile("llama", target="ort-cpu", config="tiny",
                                                output_dir=out / "ref-ort", generate=True)}
    for name in ("llama", "qwen2"):
        arts[f"hf-{name}", "ort-cpu"] = edgec.compile(
            str(root / name), target="ort-cpu", output_dir=out / f"{name}-ort", generate=True,
            config="batch=1,seq=8")
    # openvino-cpu from the ort-cpu artifact's decoder .onnx: exported once, token ids and
    # tokenizer carried over from that artifact
    for key in list(arts):
        arts[key[0], "openvino-cpu"] = edgec.compile(
            str(arts[key].path / "model.onnx"), target="openvino-cpu",
            output_dir=out / f"{key[0]}-ov", generate=True)
    return arts


def _reference_as_hf(module) -> transformers.LlamaForCausalLM:
    """The `llama` reference model as a transformers LLaMA (its parameter names are HF's)."""
    c = module.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        rope_theta=c.rope_theta, rms_norm_eps=c.eps, max_position_embeddings=512)).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in module.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf


def _hf_greedy(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=None if mask is None else
                             torch.as_tensor(mask), max_new_tokens=NEW, do_sample=False,
                             min_new_tokens=NEW, pad_token_id=0)
    return out.numpy()


@pytest.mark.parametrize("target", TARGETS)
def test_reference_model_greedy_matches_hf_generate(artifacts, target):
    from edgec.models import registry

    hf = _reference_as_hf(registry.get("llama").build("tiny"))
    ids = np.random.default_rng(0).integers(0, 256, (2, 7))
    sess = artifacts["llama", target].load()
    ours = sess.generate(ids, max_new_tokens=NEW, eos_token_id=[])
    np.testing.assert_array_equal(ours, _hf_greedy(hf, ids))
    stats = sess.last_generation
    assert stats["new_tokens"] == NEW and stats["prefill_ms"] > 0
    assert stats["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hf_checkpoint_greedy_matches_hf_generate(artifacts, checkpoints, name, target):
    _, models = checkpoints
    ids = np.array([[1, 9, 23, 44, 17, 5]])
    sess = artifacts[f"hf-{name}", target].load()
    ours = sess.generate(ids, max_new_tokens=NEW, eos_token_id=[])
    np.testing.assert_array_equal(ours, _hf_greedy(models[name], ids))


@pytest.mark.parametrize("target", TARGETS)
def test_left_padded_batch_decodes_as_each_prompt_alone(artifacts, target):
    sess = artifacts["hf-qwen2", target].load()
    a, b = np.array([1, 5, 9, 13, 17, 21, 25]), np.array([1, 30, 31])
    batch = np.array([a, np.r_[[0] * 4, b]])
    mask = np.array([[1] * 7, [0] * 4 + [1] * 3])
    both = sess.generate(batch, mask, max_new_tokens=12, eos_token_id=[])
    np.testing.assert_array_equal(both[0], sess.generate(a, max_new_tokens=12,
                                                         eos_token_id=[])[0])
    np.testing.assert_array_equal(both[1, 4:], sess.generate(b, max_new_tokens=12,
                                                             eos_token_id=[])[0])


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """A Mistral whose sliding window (4) is shorter than the prompts, compiled for ort-cpu."""
    root = tmp_path_factory.mktemp("sliding")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **HF, sliding_window=4)).eval()
    model.save_pretrained(root / "mistral")
    art = edgec.compile(str(root / "mistral"), target="ort-cpu", output_dir=root / "out",
                        generate=True, config="batch=1,seq=8")
    ov = edgec.compile(str(art.path / "model.onnx"), target="openvino-cpu",
                       output_dir=root / "ov", generate=True)
    return model, {"ort-cpu": art, "openvino-cpu": ov}


@pytest.mark.parametrize("target", TARGETS)
def test_sliding_window_left_padded_batch_matches_hf_and_each_prompt_alone(sliding, target):
    # the decoder built transformers' sliding cache layers: each present.* kept only the last
    # window - 1 tokens and the window mask read the wrong columns of a left-padded row; and
    # OpenVINO's paged form attends over the whole cache (no window): generate stays stateful
    model, arts = sliding
    sess = arts[target].load()
    if target == "openvino-cpu":
        assert "paged" not in arts[target].manifest["runtime"]["stateful"]
    a, b = np.array([1, 5, 9, 13, 17, 21, 25, 29]), np.array([1, 30, 31, 40, 7])
    batch = np.array([a, np.r_[[0] * 3, b]])
    mask = np.array([[1] * 8, [0] * 3 + [1] * 5])
    both = sess.generate(batch, mask, max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        hf = model.generate(torch.as_tensor(batch), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=0).numpy()
    np.testing.assert_array_equal(both, hf)
    np.testing.assert_array_equal(both[1, 3:], sess.generate(b, max_new_tokens=12,
                                                             eos_token_id=[])[0])
    # a decode step as documented: attention_mask [B, P + S] over the whole cache
    info = sess.decoder_info
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    out = sess.run({"input_ids": batch, "attention_mask": mask, "position_ids": positions,
                    **{n: np.zeros((2, info.kv_heads, 0, info.head_dim), np.float32)
                       for n in info.past_names}})
    step = sess.run({"input_ids": both[:, 8:9], "attention_mask": np.c_[mask, [1, 1]],
                     "position_ids": positions[:, -1:] + 1,
                     **{p: out[q] for p, q in zip(info.past_names, info.present_names)}})
    with torch.no_grad():
        ref = model(torch.as_tensor(both[:, :9]), attention_mask=torch.as_tensor(
            np.c_[mask, [1, 1]]), position_ids=torch.as_tensor(np.c_[positions, positions[:, -1:]
                                                                   + 1])).logits[:, -1].numpy()
    np.testing.assert_allclose(step["logits"][:, -1], ref, atol=1e-4)


def test_checkpoint_generation_config_is_followed_as_hf_generate(artifacts, checkpoints,
                                                                 monkeypatch):
    # the checkpoint's repetition_penalty went unread (silently other tokens than HF's), and
    # the penalty hit each row's left padding (a padded row decoded otherwise than alone)
    _, models = checkpoints
    model, sess = models["qwen2"], artifacts["hf-qwen2", "ort-cpu"].load()
    assert sess.decoder_info.generation_config == {}  # saved by transformers: its defaults
    monkeypatch.setitem(sess.manifest["generation"], "generation_config",
                        {"repetition_penalty": 1.5})
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.5)
    batch = np.array([[1, 5, 9, 13, 17, 21, 25], [0, 0, 0, 0, 1, 30, 31]])
    mask = (np.arange(7) >= np.array([[0], [4]])).astype(np.int64)
    with torch.no_grad():
        hf = model.generate(torch.as_tensor(batch), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=12).numpy()
    np.testing.assert_array_equal(sess.generate(batch, mask, max_new_tokens=12), hf)
    assert sess.last_generation["settings"]["repetition_penalty"] == 1.5
    assert sess.last_generation["settings_from"]["repetition_penalty"] == "checkpoint"
    plain = sess.generate(batch, mask, max_new_tokens=12, repetition_penalty=1.0)  # overrides
    assert sess.last_generation["settings_from"]["repetition_penalty"] == "argument"
    assert not np.array_equal(plain, hf)


def test_cli_follows_and_overrides_the_checkpoints_sampling(artifacts, tmp_path):
    import shutil

    art = shutil.copytree(artifacts["hf-qwen2", "ort-cpu"].path, tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["generation"]["generation_config"] = {"do_sample": True, "temperature": 0.7,
                                                   "top_p": 0.8}
    (art / "manifest.json").write_text(json.dumps(manifest))
    runner = CliRunner()
    args = ["generate", str(art), "--prompt-ids", "1,5,9", "-n", "4", "--seed", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert ("sampling as the checkpoint's generation_config.json says: temperature 0.7, top_k 50 "
            "(transformers' default), top_p 0.8; --greedy to override") in r.stderr
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["settings"] == {"do_sample": True, "temperature": 0.7, "top_k": 50,
                                "top_p": 0.8, "repetition_penalty": 1.0}
    assert data["settings_from"]["top_p"] == "checkpoint"
    assert data["settings_from"]["top_k"] == "transformers default"
    greedy = runner.invoke(app, ["generate", str(art), "--prompt-ids", "1,5,9", "-n", "4",
                                 "--greedy", "--json"])
    plain = runner.invoke(app, ["generate", str(artifacts["hf-qwen2", "ort-cpu"].path),
                                "--prompt-ids", "1,5,9", "-n", "4", "--json"])
    assert json.loads(greedy.stdout)["new_ids"] == json.loads(plain.stdout)["new_ids"]
    assert json.loads(greedy.stdout)["settings"]["do_sample"] is False
    assert "checkpoint" not in plain.stderr  # transformers' defaults change no greedy token
    # --temperature 0 asks for greedy decoding, on a checkpoint that samples by default too
    zero = runner.invoke(app, ["generate", str(art), "--prompt-ids", "1,5,9", "-n", "4",
                               "--temperature", "0", "--json"])
    assert zero.exit_code == 0, zero.output
    assert json.loads(zero.stdout)["new_ids"] == json.loads(plain.stdout)["new_ids"]


def test_eos_stops_a_row_and_pads_it(artifacts):
    sess = artifacts["llama", "ort-cpu"].load()
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    free = sess.generate(ids, max_new_tokens=10)
    eos = int(free[0, 3 + 2])  # row 0's third new token
    out = sess.generate(ids, max_new_tokens=10, eos_token_id=[eos], pad_token_id=255)
    first = 3 + int(np.flatnonzero(free[0, 3:] == eos)[0])
    assert (out[0, first + 1:] == 255).all() and out[0, first] == eos
    if eos not in free[1, 3:]:  # the other row runs on, unchanged, up to max_new_tokens
        np.testing.assert_array_equal(out[1, :out.shape[1]], free[1, :out.shape[1]])


def test_sampling_is_seeded_and_top_k_1_is_greedy(artifacts):
    sess = artifacts["llama", "ort-cpu"].load()
    ids = np.array([[10, 20, 30]])
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9)
    a, b = sess.generate(ids, seed=3, **kw), sess.generate(ids, seed=3, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sess.generate(ids, seed=4, **kw))
    np.testing.assert_array_equal(sess.generate(ids, max_new_tokens=12, do_sample=True, top_k=1),
                                  sess.generate(ids, max_new_tokens=12))


def test_logits_processing_matches_transformers():
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 50)).astype(np.float32) * 3
    seqs = rng.integers(0, 50, (3, 6))
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                           repetition_penalty=1.3)
    t_seqs, t = torch.as_tensor(seqs), torch.as_tensor(scores)
    for proc in (lp.RepetitionPenaltyLogitsProcessor(1.3), lp.TemperatureLogitsWarper(0.7),
                 lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.8)):
        t = proc(t_seqs, t)
    ours = process_logits(scores, seqs, cfg)
    np.testing.assert_array_equal(np.isinf(ours), torch.isinf(t).numpy())
    finite = ~np.isinf(ours)
    np.testing.assert_allclose(ours[finite], t.numpy()[finite], rtol=1e-6)


def test_repetition_penalty_skips_the_left_padding_as_transformers():
    # edgec penalised the pad id in each row's left padding: a padded row generated otherwise
    # than alone and than transformers, whose generate() passes the prompt mask's first 1 as
    # prompt_ignore_length (padding inside a row and the pad fill after EOS stay penalised)
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(1)
    scores = rng.standard_normal((3, 40)).astype(np.float32) * 3
    seqs = rng.integers(1, 40, (3, 9))
    mask = np.ones((3, 7), np.int64)
    mask[1, :4] = 0
    mask[2, 2:4] = 0  # padding inside a row: penalised, as in transformers
    seqs[:, :7][mask == 0] = 0  # pad id 0, and 0 appears nowhere else
    lead = mask.argmax(axis=1)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.as_tensor(lead))(
        torch.as_tensor(seqs), torch.as_tensor(scores)).numpy()
    ours = process_logits(scores, seqs, GenerationConfig(repetition_penalty=1.5), lead)
    np.testing.assert_array_equal(ours, ref)
    assert ours[1, 0] == scores[1, 0] and ours[2, 0] != scores[2, 0]


def test_a_temperature_that_overflows_the_scores_is_refused_without_a_numpy_warning():
    import warnings

    scores = np.array([[3.2, -1.0, 0.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in divide" came first
        for t in (1e-40, 1e-50):  # a float32 subnormal, and one that rounds to 0
            with pytest.raises(UserError, match=f"temperature {t} is too small"):
                process_logits(scores, np.zeros((1, 1), np.int64),
                               GenerationConfig(do_sample=True, temperature=t))
        assert np.isfinite(process_logits(scores, np.zeros((1, 1), np.int64), GenerationConfig(
            do_sample=True, temperature=1e-30))).all()


@pytest.mark.parametrize("checkpoint", [
    None, {}, {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05},
    {"do_sample": True, "top_k": 20}, {"repetition_penalty": 1.5, "top_k": 0}])
def test_options_left_out_are_the_checkpoints_then_transformers_defaults(checkpoint):
    # edgec read only the token ids of generation_config.json: a Qwen2.5-Instruct's
    # do_sample/temperature/top_p/repetition_penalty, and transformers' top_k 50, went unused
    import dataclasses

    from transformers import GenerationConfig as HFConfig

    from edgec.exporters.decoder import DecoderInfo
    from edgec.runtimes.generation import EDGEC_DEFAULTS, resolve_settings

    info = DecoderInfo(1, 1, 1, 8, 10, generation_config=checkpoint)
    values, sources = resolve_settings(info)
    if checkpoint is None:  # the reference model: edgec's defaults, as before
        assert values == EDGEC_DEFAULTS and set(sources.values()) == {"edgec default"}
    else:  # transformers' generate(): the model's config, then its global defaults
        hf = HFConfig(**checkpoint)
        hf.update(**HFConfig._get_default_generation_params(), defaults_only=True)
        assert values == {k: getattr(hf, k) for k in values}
        assert {k for k, v in sources.items() if v == "checkpoint"} == set(checkpoint)
    given = dict(do_sample=False, top_k=3, temperature=0.5)  # arguments win
    values, sources = resolve_settings(dataclasses.replace(info), **given, top_p=None)
    assert {k: values[k] for k in given} == given and sources["top_k"] == "argument"


def test_generation_settings_are_read_from_the_checkpoints_file(tmp_path):
    from edgec.exporters.decoder import file_generation_settings

    assert file_generation_settings(tmp_path) is None  # no generation config: edgec's defaults
    (tmp_path / "config.json").write_text(json.dumps({"temperature": 0.5, "eos_token_id": 2}))
    assert file_generation_settings(tmp_path) == {"temperature": 0.5}  # transformers' fallback
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "top_p": 0.9, "min_p": 0.05, "typical_p": 1.0, "eos_token_id": 2}))
    assert file_generation_settings(tmp_path) == {"do_sample": True, "top_p": 0.9,
                                                  "not_applied": {"min_p": 0.05}}


@pytest.mark.parametrize("options, message", [
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite"),
    (dict(temperature=float("inf")), "temperature must be a finite"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite"),
    (dict(top_p=float("nan")), "top_p must be"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(seed=-5), "seed must be an integer ≥ 0"),
    (dict(seed="x"), "seed must be an integer ≥ 0"),
    (dict(max_new_tokens="3"), "max_new_tokens must be an integer"),
    (dict(temperature="1"), "temperature must be a finite"),
])
def test_generation_config_refuses_nan_and_wrong_types(options, message):
    # NaN passed `<= 0` checks and sampled token 0 every step; the rest were internal errors
    with pytest.raises(UserError, match=message):
        GenerationConfig(**options)


def test_artifact_names_and_stateful_openvino(artifacts):
    art = artifacts["hf-llama", "ort-cpu"]
    names = [i["name"] for i in art.manifest["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    outs = [o["name"] for o in art.manifest["outputs"]]
    assert outs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert art.manifest["generation"]["tokenizer"] == "tokenizer"
    # the checkpoint's config beside model.onnx: the directory loads in ORTModelForCausalLM
    assert (art.path / "config.json").is_file() and "config.json" in art.manifest["hashes"]
    assert art.manifest["generation"]["eos_token_ids"] == [2]
    ov = artifacts["hf-llama", "openvino-cpu"].manifest["runtime"]
    assert ov["stateful"]["pairs"]["past_key_values.1.value"] == "present.1.value"
    xml = (artifacts["hf-llama", "openvino-cpu"].path / ov["model"]).read_text()
    assert "ReadValue" in xml and "Assign" in xml and 'name="beam_idx"' in xml


def test_openvino_generates_paged_as_stateful(artifacts):
    """generate on openvino-cpu runs the paged form of the IR (the build checked it applies):
    the same tokens as the stateful model for a left-padded batch, and a session reused across
    calls (the blocks of a smaller call are replaced, a larger batch reuses nothing stale)."""
    art = artifacts["hf-qwen2", "openvino-cpu"]
    assert art.manifest["runtime"]["stateful"]["paged"] == {"block_size": 32}
    sess = art.load()
    assert sess.paged
    batch = np.array([[1, 5, 9, 13, 17, 21, 25], [0, 0, 0, 0, 1, 30, 31]])
    mask = (np.arange(7) >= np.array([[0], [4]])).astype(np.int64)
    short = sess.generate(batch[1:, 4:], max_new_tokens=3, eos_token_id=[])
    paged = sess.generate(batch, mask, max_new_tokens=40, eos_token_id=[])  # > 1 block a row
    sess.paged = False
    stateful = sess.generate(batch, mask, max_new_tokens=40, eos_token_id=[])
    np.testing.assert_array_equal(paged, stateful)
    np.testing.assert_array_equal(short[0], stateful[1, 4:4 + 6])


@pytest.mark.parametrize("name", ["hf-llama", "hf-qwen2"])
def test_hf_decoder_attends_grouped_without_repeating_the_cache(artifacts, name):
    """transformers' repeat_kv (an Expand copying the whole cache per query head, every step)
    is not exported: one grouped Attention per layer reads the kv_heads-wide cache directly."""
    import onnx_ir as ir

    model = ir.load(artifacts[name, "ort-cpu"].path / "model.onnx")
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attention) == HF["num_hidden_layers"]
    for node in attention:
        assert node.inputs[1].shape[1] == HF["num_key_value_heads"]
        assert node.inputs[0].shape[1] == HF["num_attention_heads"]
    assert not [n for n in model.graph if n.op_type == "Expand"
                and n.inputs[0].name.startswith("present.")]
    ov = artifacts[name, "openvino-cpu"].report
    legalize = next(p for p in ov["passes"] if p["name"] == "openvino-legalize")
    assert legalize["stats"]["gqa_kv_repeated"] == HF["num_hidden_layers"]


def test_quantized_decoder_generates_close_to_fp32(tmp_path, artifacts):
    art = edgec.compile(str(artifacts["llama", "ort-cpu"].path / "model.onnx"), target="ort-cpu",
                        output_dir=tmp_path / "q", generate=True, quantize="w8a8")
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    fp32 = artifacts["llama", "ort-cpu"].load()
    seq = fp32.generate(ids, max_new_tokens=16, eos_token_id=[])
    q = art.load()
    assert (q.generate(ids, max_new_tokens=2)[:, 5:] == seq[:, 5:7]).all()
    # teacher-forced: next-token choices along the fp32 continuation (one prefill each)
    empty = np.zeros((2, 2, 0, 16), np.float32)
    feeds = {"input_ids": seq, "attention_mask": np.ones_like(seq),
             "position_ids": np.broadcast_to(np.arange(seq.shape[1]), seq.shape),
             **{n: empty for n in fp32.decoder_info.past_names}}
    top1 = [s.run(feeds)["logits"][:, 4:-1].argmax(-1) for s in (q, fp32)]
    assert (top1[0] == top1[1]).mean() >= 0.9
    cos = art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["cosine"]
    assert cos > 0.999
    assert art.manifest["quantization"]["calibration"]["data"].startswith("prefill")


def test_generate_cli_text_ids_json_and_bench(artifacts):
    runner = CliRunner()
    hf = str(artifacts["hf-llama", "ort-cpu"].path)
    r = runner.invoke(app, ["generate", hf, "--prompt", "the cat sat", "-n", "6", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["prompt_ids"] == [1, 4, 6, 8] and len(data["new_ids"]) <= 6
    assert isinstance(data["text"], str)
    r = runner.invoke(app, ["generate", hf, "--prompt", "the cat sat", "-n", "6"])
    assert r.exit_code == 0 and r.stdout.strip() == data["text"].strip()
    ref = str(artifacts["llama", "openvino-cpu"].path)
    r = runner.invoke(app, ["generate", ref, "--prompt-ids", "1,2,3", "-n", "5"])
    assert r.exit_code == 0 and len(r.stdout.strip().split(",")) == 5
    r = runner.invoke(app, ["bench", ref, "--prompt-tokens", "16", "--new-tokens", "4",
                            "--iterations", "2", "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert stats["prefill_ms"] > 0 and stats["decode_tokens_per_s"] > 0


def test_generate_text_batches_streams_and_chats(artifacts, checkpoints):
    """Text in, text out: one prompt is ``generate`` on its ids, decoded up to the EOS; a list
    is a left-padded batch giving what each prompt gives alone; ``on_text`` streams the same
    text; a chat has transformers' ``apply_chat_template`` ids."""
    root, _ = checkpoints
    session = edgec.load(artifacts["hf-llama", "ort-cpu"].path)
    tok = session.tokenizer
    ids = session.generate(np.array([tok.encode("the cat sat")]), max_new_tokens=8)
    new = ids[0, 4:].tolist()
    new = new[:new.index(2)] if 2 in new else new  # up to the EOS (</s>, not a special token)
    assert session.generate_text("the cat sat", max_new_tokens=8) == tok.decode(new)
    prompts = ["the cat sat", "a dog ran far and then it"]
    assert session.generate_text(prompts, max_new_tokens=8) == [
        session.generate_text(p, max_new_tokens=8) for p in prompts]
    assert session.last_generation["batch"] == 1
    pieces: list[str] = []
    text = session.generate_text("the dog", max_new_tokens=8, on_text=pieces.append, seed=3,
                                 do_sample=True)
    assert len(pieces) > 1 and "".join(pieces).strip() == text.strip()

    chat = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "good"},
            {"role": "user", "content": "a dog"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "llama")
    expected = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.encode_chat(chat) == hf_tok(expected, add_special_tokens=False)["input_ids"]
    assert tok.encode_chat(chat)[-1] == WORDS.index("then") + 4
    chat_ids = session.generate(np.array([tok.encode_chat(chat)]), max_new_tokens=6)[0]
    new = chat_ids[len(tok.encode_chat(chat)):].tolist()
    assert session.generate_text(chat, max_new_tokens=6) == tok.decode(
        new[:new.index(2)] if 2 in new else new)
    assert session.generate_text([chat, "the cat"], max_new_tokens=6)[0] == \
        session.generate_text(chat, max_new_tokens=6)
    # the openvino-cpu artifact compiled from the ort-cpu one's .onnx carries the template over
    stateful = edgec.load(artifacts["hf-llama", "openvino-cpu"].path)
    assert stateful.generate_text(chat, max_new_tokens=6) == \
        session.generate_text(chat, max_new_tokens=6)

    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(artifacts["hf-llama", "ort-cpu"].path), "--chat",
                            "--system", "it was", "-p", "a dog", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["chat"] and data["prompt_ids"] == tok.encode_chat(
        [{"role": "system", "content": "it was"}, {"role": "user", "content": "a dog"}])
    hf = str(artifacts["hf-llama", "ort-cpu"].path)
    plain = runner.invoke(app, ["generate", hf, "-p", "a dog", "-n", "2"])
    chatted = runner.invoke(app, ["generate", hf, "--chat", "-p", "a dog", "-n", "2"])
    assert "add --chat" in plain.stderr and "add --chat" not in chatted.stderr
    for bad, says in ((3, "the prompt must be text or a chat"),
                      ([], "the prompt must be text or a chat"),
                      (["the cat", 3], "prompt 1 must be text or a chat"),
                      ([{"content": "the cat"}], "each a dict with 'role'")):
        with pytest.raises(UserError, match=says):
            session.generate_text(bad)
    with pytest.raises(UserError, match="streams one prompt"):
        session.generate_text(prompts, on_text=print)
    with pytest.raises(UserError, match="no tokenizer"):
        edgec.load(artifacts["llama", "ort-cpu"].path).generate_text("the cat")


def test_a_conversation_keeps_its_turns_within_the_context(artifacts, monkeypatch):
    """``Session.chat()``: each turn answers after the turns so far; the oldest turns (never the
    system message) go when the conversation and the answer would pass the context (128 here);
    a turn that fails leaves it as it was. The CLI converses on stdin."""
    session = edgec.load(artifacts["hf-llama", "ort-cpu"].path)
    tok = session.tokenizer
    conversation = session.chat(system="it was good", max_new_tokens=16)
    first = conversation.say("the cat sat")
    assert first == session.generate_text(
        [{"role": "system", "content": "it was good"}, {"role": "user", "content": "the cat sat"}],
        max_new_tokens=16)
    for _ in range(12):
        conversation.say("the cat sat on the mat and then it ran far")
    assert conversation.dropped > 0
    kept = conversation.messages
    assert kept[0] == {"role": "system", "content": "it was good"} and kept[1]["role"] == "user"
    assert len(tok.encode_chat(kept[:-1])) + 16 - 1 <= 128
    with pytest.raises(UserError, match="exceeds the model's context"):
        conversation.say(" ".join(["dog"] * 200))
    assert conversation.messages == kept
    conversation.reset()
    assert conversation.messages == kept[:1] and conversation.dropped == 0

    runner = CliRunner()
    art = str(artifacts["hf-llama", "ort-cpu"].path)
    r = runner.invoke(app, ["generate", art, "--chat", "-n", "4"],
                      input="the cat sat\n\n" + "dog " * 200 + "\n/reset\na dog\n/exit\nthe mat\n")
    assert r.exit_code == 0, r.output
    answers = r.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == session.generate_text(
        [{"role": "user", "content": "the cat sat"}], max_new_tokens=4)
    assert "(a new conversation)" in r.stderr and "exceeds the model's context" in r.stderr

    from edgec.runtimes.conversation import Conversation

    say = Conversation.say
    calls = []

    def interrupted_once(self, text, on_text=None):  # Ctrl-C during the first answer
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return say(self, text, on_text)

    monkeypatch.setattr(Conversation, "say", interrupted_once)
    r = runner.invoke(app, ["generate", art, "--chat", "-n", "4"], input="the cat\na dog\n")
    assert r.exit_code == 0 and "(stopped" in r.stderr and calls == ["the cat", "a dog"]
    assert r.stdout.splitlines()[-1] == session.generate_text(
        [{"role": "user", "content": "a dog"}], max_new_tokens=4)
    for args, says in ((["--json"], "--json takes one prompt"),
                       (["--image", "x.png"], "--image takes one prompt")):
        r = runner.invoke(app, ["generate", art, "--chat", *args])
        assert r.exit_code == 2 and says in r.output, r.output


@pytest.mark.parametrize("target", [*TARGETS, "openvino-cpu-variables"])
def test_a_conversation_resumes_its_cache_and_answers_as_a_full_prefill(artifacts, target):
    """Each turn prefills only what follows the prefix its prompt shares with the cache the
    last turn left (arrays on ort-cpu; on openvino-cpu the paged blocks, or the stateful
    model's variables), and answers what a full prefill of the conversation answers; another
    generate() on the session in between (which reuses the blocks or resets the variables)
    makes the next turn start over."""
    session = edgec.load(artifacts["hf-llama", target.removesuffix("-variables")].path)
    if target.endswith("-variables"):
        session.paged = False
    turns = ["the cat sat", "a dog ran far", "then it was good", "the mat"]
    answers = {}
    for reuse in (True, False):
        conversation = session.chat(max_new_tokens=6)
        conversation.reuse = reuse
        answers[reuse] = []
        for i, turn in enumerate(turns):
            answers[reuse].append(conversation.say(turn))
            stats = session.last_generation
            if reuse and i:
                assert 0 < stats["cached_tokens"] < stats["prompt_tokens"], stats
            else:
                assert "cached_tokens" not in stats
            if reuse and i == 1:  # the session runs something else: the state is not the chat's
                session.generate(np.array([[1, 4, 5]]), max_new_tokens=3)
                conversation.say("the cat")
                assert "cached_tokens" not in session.last_generation
                conversation.messages = conversation.messages[:-2]
    assert answers[True] == answers[False]


def test_streamed_text_keeps_characters_split_across_tokens(artifacts, monkeypatch):
    """A byte-level tokenizer's token can end inside a multi-byte character: the stream held
    the U+FFFD its partial bytes decode to, then sliced the finished character away."""
    payload = "aé😀 ✓".encode()  # token k decodes to byte k: é and 😀 span 2 and 4 tokens

    class ByteTokenizer:
        chat_template = None

        def __init__(self, root, manifest):
            pass

        def encode(self, text):
            return [1, 2, 3]

        def decode(self, ids):
            return payload[:len(list(ids))].decode("utf-8", errors="replace")

    monkeypatch.setattr("edgec.runtimes.tokenizer.Tokenizer", ByteTokenizer)
    runner = CliRunner()
    ref = str(artifacts["llama", "ort-cpu"].path)
    args = ["generate", ref, "--prompt", "hi", "-n", str(len(payload))]
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert len(data["new_ids"]) > 3 and "é" in data["text"], data
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout == data["text"] + "\n"


def test_bad_generation_input_is_one_line_exit_2(artifacts, tiny_mlp, tmp_path):
    runner = CliRunner()
    ref = str(artifacts["llama", "ort-cpu"].path)
    module, inputs = tiny_mlp  # no KV cache (a video-dit compile here cost the file ~20 s)
    plain = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "mlp",
                          example_inputs=inputs).path
    cases = [
        (["generate", ref, "--prompt", "hello"], "no tokenizer"),
        (["generate", ref, "--chat", "--prompt-ids", "1"], "cannot take --prompt-ids"),
        (["generate", ref, "--system", "be brief", "--prompt", "hi"], "add --chat"),
        (["generate", ref, "--chat", "--prompt", "hi"], "no tokenizer"),
        (["generate", str(plain), "--prompt-ids", "1"], "no KV cache"),
        (["generate", ref, "--prompt-ids", "1,999"], "token ids must be in"),
        (["generate", ref, "--prompt-ids", "1,x"], "comma-separated"),
        (["generate", ref, "--prompt-ids", "11,,12"], "has an empty item in '11,,12'"),
        (["generate", ref, "--prompt-ids", "11,12,"], "has an empty item in '11,12,'"),
        (["generate", ref, "--prompt-ids", " , "], "--prompt-ids is empty"),
        (["generate", ref, "--prompt-ids", "1", "--sample", "--temperature", "0"],
         "deterministic (greedy) output drop --sample"),
        (["generate", ref, "--prompt-ids", "1", "--temperature", "-1"],
         "give --greedy or leave --temperature out"),  # 0 without --sample: greedy
        # greedy (the reference model has no generation config) reads no temperature
        (["generate", ref, "--prompt-ids", "1,2", "--temperature", "0.5"],
         "--temperature applies to sampling"),
        # overflowed float32 in the division: a numpy warning, then NaN/inf blamed on the model
        (["generate", ref, "--prompt-ids", "1", "--sample", "--temperature", "1e-40"],
         "temperature 1e-40 is too small"),
        (["generate", ref], "one of them"),
        (["compile", "llama", "--target", "ort-cpu", "-o", "x", "--context", "64"],
         "add --generate"),
        (["compile", "video-dit", "--target", "ort-cpu", "-o", "x", "--generate"],
         "not a decoder language model"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    for args, message in [(["--sample", "--temperature", "nan"], "temperature must be"),
                          (["--repetition-penalty", "nan"], "repetition_penalty must be"),
                          (["--sample", "--seed", "-5"], "seed must be")]:
        r = runner.invoke(app, ["generate", ref, "--prompt-ids", "1,2", "-n", "4", *args])
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
    sess = artifacts["llama", "ort-cpu"].load()
    for ids, options, message in [
            (5, {}, "input_ids must be token ids"),
            ([1, 2], dict(max_new_tokens="3"), "max_new_tokens must be an integer"),
            ([1, 2], dict(eos_token_id="abc"), "eos_token_id must be a token id"),
            ([1, 2], dict(eos_token_id=-1), "eos_token_id must be a token id"),
            ([1, 2], dict(eos_token_id=[2, 999]), r"eos_token_id 999 is outside this model's "
                                                  r"vocabulary of \d+ tokens"),
            # a finished row is filled with it: ORT's raw InvalidArgument, OpenVINO's id
            ([1, 2], dict(pad_token_id=999), r"pad_token_id 999 is outside this model's "
                                             r"vocabulary of \d+ tokens; give pad_token_id="),
            ([1, 2], dict(do_sample=True, temperature=float("nan")), "temperature must be")]:
        with pytest.raises(UserError, match=message):
            sess.generate(ids, **options)
    assert sess.generate([1, 2], max_new_tokens=2, eos_token_id=np.array([2])).shape == (1, 4)
    # the checkpoint's own pad id outside the vocabulary (-1 in old LLaMA conversions; one past
    # it failed in ORT's Gather, or came back in the rows): finished rows take the EOS id
    from edgec.runtimes.generation import generate

    ids = np.array([[1, 2], [3, 4]])
    first = int(sess.generate(ids, max_new_tokens=1)[0, -1])  # row 0 stops at once
    for bad in (10**6, -1):
        info = dataclasses.replace(sess.decoder_info, pad_token_id=bad)
        out, _ = generate(sess, info, ids, max_new_tokens=4, eos_token_id=first)
        assert set(out[0, 2:].tolist()) == {first} and out.max() < info.vocab
    with pytest.raises(UserError, match="right-padded"):
        sess.generate(np.array([[1, 2, 0]]), np.array([[1, 1, 0]]))
    with pytest.raises(UserError, match="row 1 of the batch is all padding"):
        sess.generate(np.array([[1, 2], [0, 0]]), np.array([[1, 1], [0, 0]]))


def test_generate_names_the_supported_architectures(tmp_path):
    """GPT2LMHeadModel is a causal LM, which the refusal said it was not."""
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "gpt2"), "--target", "ort-cpu",
                                 "-o", str(tmp_path / "out"), "--generate"])
    assert r.exit_code == 2, r.output
    assert "supports Hugging Face *ForCausalLM architectures" in r.stderr
    assert "not GPT2LMHeadModel" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_generate_refuses_a_state_space_model_in_one_line(tmp_path):
    """MambaForCausalLM was an internal error (no num_attention_heads in its config)."""
    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    r = CliRunner().invoke(app, ["compile", str(tmp_path / "mamba"), "--target", "ort-cpu",
                                 "-o", str(tmp_path / "out"), "--generate"])
    assert r.exit_code == 2, r.output
    assert "MambaForCausalLM has no attention KV cache (a state-space model)" in r.stderr


def test_tensorrt_decoder_gets_prefill_and_decode_profiles(artifacts, tmp_path):
    """No GPU here: the engine is not built, but its profiles are, and the runtime's choice."""
    from edgec.runtimes.tensorrt import decode_profile

    art = edgec.compile(str(artifacts["llama", "ort-cpu"].path / "model.onnx"),
                        target="tensorrt", output_dir=tmp_path / "trt", generate=True,
                        context=128)
    prefill, decode = art.manifest["runtime"]["profiles"]
    assert prefill["past_key_values.0.key"]["max"] == [1, 2, 0, 16]
    assert prefill["input_ids"]["max"] == [1, 128]
    assert decode["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 1]}
    assert decode["past_key_values.1.value"]["max"] == [1, 2, 127, 16]
    assert decode["attention_mask"]["max"] == [1, 128]
    empty, full = np.zeros((1, 2, 0, 16)), np.zeros((1, 2, 9, 16))
    assert decode_profile({"input_ids": np.zeros((1, 5)), "past_key_values.0.key": empty}) == 0
    assert decode_profile({"input_ids": np.zeros((1, 1)), "past_key_values.0.key": full}) == 1
    assert art.manifest["generation"]["context"] == 128
    # its note rebuilds this engine: `edgec compile model.onnx -t tensorrt` alone made one
    # profile from the example (no empty-cache prefill) and said nothing
    assert ("--target tensorrt --generate --context 128 -o DIR"
            in art.manifest["runtime"]["unavailable"])


def test_a_session_generates_one_thing_at_a_time(artifacts):
    """A streamer that runs or generates on the same session (stateful OpenVINO: one cache in
    the model's variables) is refused; threads take turns, so each gets what it would alone
    (OpenVINO raised "Infer Request is busy", a run from the streamer corrupted the tokens)."""
    import threading

    sess = artifacts["llama", "openvino-cpu"].load()
    ids = np.random.default_rng(3).integers(0, 256, (1, 6))
    alone = sess.generate(ids, max_new_tokens=6)
    feeds = sess.default_feeds

    def runs(_):
        sess.run(feeds)

    def generates(_):
        sess.generate(ids, max_new_tokens=2)

    for streamer, what in ((runs, r"run\(\) was called"), (generates, r"generate\(\) was")):
        with pytest.raises(UserError, match=what):
            sess.generate(ids, max_new_tokens=3, streamer=streamer)
    np.testing.assert_array_equal(sess.generate(ids, max_new_tokens=6), alone)  # still usable
    results = [None] * 3

    def work(i):
        results[i] = sess.generate(ids, max_new_tokens=6)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, alone)


def test_runs_wait_for_another_threads_generation(artifacts):
    """A run from another thread set the stateful OpenVINO model's variables mid-generation:
    wrong tokens, wrong logits, "Infer Request is busy" or a raw ValueError."""
    import threading

    sess = artifacts["llama", "openvino-cpu"].load()
    sess.paged = False  # the cache in the model's variables, between steps
    assert sess._pairs
    ids = np.random.default_rng(3).integers(0, 256, (1, 6))
    alone, logits = sess.generate(ids, max_new_tokens=12), sess.run()["logits"]
    done, tokens, runs, errors = threading.Event(), [], [], []

    def generates():
        try:
            tokens.extend(sess.generate(ids, max_new_tokens=12) for _ in range(6))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        done.set()

    def runs_meanwhile():
        try:
            while not done.is_set():
                runs.append(sess.run()["logits"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=generates), threading.Thread(target=runs_meanwhile)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(tokens) == 6 and runs
    for out in tokens:
        np.testing.assert_array_equal(out, alone)
    for out in runs:
        np.testing.assert_array_equal(out, logits)


def test_a_session_loaded_by_a_relative_path_survives_a_chdir(artifacts, tmp_path,
                                                               monkeypatch):
    """The files generate() opens at its first call (OpenVINO's paged decoder here; companion
    graphs, the tokenizer) were looked up relative to the working directory of that call."""
    art = artifacts["llama", "openvino-cpu"]
    ids = np.random.default_rng(4).integers(0, 256, (1, 5))
    alone = art.load().generate(ids, max_new_tokens=4)
    monkeypatch.chdir(art.path.parent)
    sess = edgec.load(art.path.name)
    monkeypatch.chdir(tmp_path)
    assert sess.paged and sess.root == art.path.resolve()
    np.testing.assert_array_equal(sess.generate(ids, max_new_tokens=4), alone)


def test_the_last_new_token_needs_no_context_slot(artifacts):
    """The last generated token is never fed back, so prompt + max_new_tokens - 1 positions
    suffice: a prompt filling the context generated one token (it was refused as exceeding the
    context), and `edgec bench` drew the same line one token short."""
    sess = artifacts["hf-llama", "ort-cpu"].load()
    limit = sess.decoder_info.max_positions
    assert limit == HF["max_position_embeddings"]
    ids = np.arange(limit)[None] % 90 + 4
    assert sess.generate(ids, max_new_tokens=1, eos_token_id=[]).shape == (1, limit + 1)
    assert sess.generate(ids[:, 1:], max_new_tokens=2, eos_token_id=[]).shape == (1, limit + 1)
    with pytest.raises(UserError, match=rf"\({limit - 1} tokens\) \+ max_new_tokens \(3\) - 1 "
                                        rf"exceeds the model's context of {limit} tokens; set "
                                        r"max_new_tokens \(-n\) to at most 2"):
        sess.generate(ids[:, 1:], max_new_tokens=3)
    longer = np.concatenate([ids, ids[:, :1]], axis=1)
    with pytest.raises(UserError, match=f"shorten the prompt to at most {limit} tokens$"):
        sess.generate(longer, max_new_tokens=1)
    # the limit named is the one for this max_new_tokens (it said {limit} whatever -n was)
    with pytest.raises(UserError, match=rf"shorten the prompt to at most {limit - 2} tokens "
                                        rf"\({limit} with max_new_tokens 1\)$"):
        sess.generate(longer, max_new_tokens=3)
    with pytest.raises(UserError, match=rf"shorten the prompt and lower max_new_tokens \(-n\): "
                                        rf"together they may be at most {limit + 1} tokens$"):
        sess.generate(longer, max_new_tokens=limit + 5)


def test_scores_with_no_next_token_are_refused():
    """NaN/+inf logits (a swappable adapter blended at weight 1e30) were read by argmax as
    token 0, generating 0, 0, 0 with exit 0; -inf is a filtered token and stays allowed."""
    from edgec.runtimes.generation import GenerationConfig, _choose

    rng = np.random.default_rng(0)
    fine = np.array([[0.0, -np.inf, 1.0]], np.float32)
    assert _choose(fine, GenerationConfig(), rng).tolist() == [2]
    for bad in (np.nan, np.inf):
        scores = np.array([[0.0, 1.0, 2.0], [0.0, bad, 1.0]], np.float32)
        with pytest.raises(UserError, match="NaN or \\+inf \\(batch row 1\\)"):
            _choose(scores, GenerationConfig(), rng)


def test_a_tokenizer_path_edited_to_leave_the_artifact_is_refused(tmp_path):
    """The manifest's ``tokenizer`` edited to ``../elsewhere`` (or an absolute path) read a
    tokenizer outside the artifact; the edit is refused, naming the key."""
    from edgec.runtimes.tokenizer import Tokenizer

    (tmp_path / "elsewhere").mkdir()
    _tokenizer(tmp_path / "elsewhere")
    (tmp_path / "art").mkdir()
    for entry in ("../elsewhere", str(tmp_path / "elsewhere"), "tokenizer/../../elsewhere"):
        with pytest.raises(UserError, match="damaged or edited artifact: tokenizer points "
                                            "outside it"):
            Tokenizer(tmp_path / "art", {"tokenizer": entry})


@pytest.mark.parametrize("name", ["hf-llama", "llama"])
def test_a_huge_max_new_tokens_is_refused_before_the_cache_is_allocated(artifacts, name):
    """OpenVINO's paged cache is allocated for prompt + max_new_tokens before the loop: -n 1e9
    was an internal MemoryError (exit 1), not the context refusal (a checkpoint's
    max_positions), or, the reference model having no limit, one line giving the cache's size."""
    sess = artifacts[name, "openvino-cpu"].load()
    assert sess.paged
    message = ("exceeds the model's context of 128 tokens" if name == "hf-llama" else
               r"a KV cache for 1 x \d+ tokens \(prompt \+ max_new_tokens\) takes [\d.]+ GiB, "
               r"more than this machine's [\d.]+ GiB of memory; lower max_new_tokens \(-n\)$")
    with pytest.raises(UserError, match=message):
        sess.generate([5, 6], max_new_tokens=10**9)
    assert sess.generate([5, 6], max_new_tokens=3).shape == (1, 5)  # the session still works


@pytest.fixture(scope="module")
def greedy_temperature_0(tmp_path_factory, checkpoints):
    """The HF LLaMA checkpoint whose generation_config.json says do_sample false with
    temperature 0.0 (and top_p 0.0), compiled for ort-cpu."""
    import shutil

    root = tmp_path_factory.mktemp("temp0")
    ckpt = shutil.copytree(checkpoints[0] / "llama", root / "llama")
    (ckpt / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False,
        "temperature": 0.0, "top_p": 0.0}))
    return edgec.compile(str(ckpt), target="ort-cpu", output_dir=root / "out", generate=True,
                         config="batch=1,seq=8")


def test_greedy_checkpoint_with_temperature_0_generates(artifacts, greedy_temperature_0):
    """Its temperature 0.0 refused every generation (CLI --greedy too), though greedy decoding
    reads no temperature and transformers' generate() decodes it greedily; a temperature the
    caller gives for greedy decoding stays refused."""
    sess = greedy_temperature_0.load()
    assert sess.decoder_info.generation_config["temperature"] == 0.0
    ids = np.array([[1, 9, 23, 44, 17, 5]])
    plain = artifacts["hf-llama", "ort-cpu"].load().generate(ids, max_new_tokens=6)
    np.testing.assert_array_equal(sess.generate(ids, max_new_tokens=6), plain)
    assert sess.last_generation["settings"]["do_sample"] is False
    # temperature 0 is greedy to many callers, as to transformers (it was refused, with the
    # advice to do what the call did: do_sample=False); below 0 is refused
    np.testing.assert_array_equal(sess.generate(ids, max_new_tokens=6, temperature=0.0), plain)
    with pytest.raises(UserError, match="temperature must be a finite number > 0"):
        sess.generate(ids, max_new_tokens=6, temperature=-1.0)
    with pytest.raises(UserError, match="the checkpoint's generation config sets temperature "
                                        "0.0, which cannot sample"):
        sess.generate(ids, max_new_tokens=6, do_sample=True)
    runner = CliRunner()
    args = ["generate", str(greedy_temperature_0.path), "--prompt-ids", "1,9,23", "-n", "3"]
    for extra in ([], ["--greedy"], ["--greedy", "--temperature", "0"]):
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--greedy", "--temperature", "0.5"])
    assert r.exit_code == 2 and "--temperature applies to sampling" in r.stderr
