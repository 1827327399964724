"""Local Hugging Face checkpoints (random weights, saved here) as compile sources."""

import os

import pytest
import transformers  # the hf extra; dev installs it, so a missing install fails here

import edgec
from edgec.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL)
                                  ).save_pretrained(root / "llama")
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(root / "bert")
    return root


@pytest.mark.parametrize("name,output,target", [("llama", "logits", "openvino-cpu"),
                                                ("bert", "last_hidden_state", "ort-cpu")])
def test_checkpoint_compiles_with_hf_parameter_names(checkpoints, tmp_path, name, output,
                                                      target):
    art = edgec.compile(str(checkpoints / name), target=target, output_dir=tmp_path / "o",
                        config="batch=2,seq=12")
    assert [i["name"] for i in art.manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert art.manifest["outputs"][0]["name"] == output
    for fid in art.report["fidelity"].values():
        assert fid["outputs"][output]["max_rel"] <= 1e-5
    pmap = art.manifest["parameter_map"]
    key = ("model.layers.0.self_attn.q_proj.weight" if name == "llama"
           else "encoder.layer.0.attention.self.query.weight")
    assert key in pmap
    feeds = art.load().default_feeds
    assert feeds["input_ids"].shape == (2, 12) and feeds["attention_mask"][:, -3:].sum() == 0
    # the checkpoint's positions bound seq (llama: rotary, from max_position_embeddings)
    limit = transformers.AutoConfig.from_pretrained(checkpoints / name).max_position_embeddings
    assert art.manifest["inputs"][0]["dim_ranges"] == {"seq": {"max": limit}}


def test_gpt2_past_its_positions_is_refused(tmp_path):
    """A GPT-2 of 32 positions ran 33 tokens on openvino-cpu (logits [1, 33, 50], exit 0) where
    PyTorch raises IndexError; seq's most is recorded (its wpe table, its n_positions) and
    every run checks it."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_positions=32, n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2")
    art = edgec.compile(str(tmp_path / "gpt2"), target="openvino-cpu", output_dir=tmp_path / "o")
    assert [i["dim_ranges"] for i in art.manifest["inputs"]] == [{"seq": {"max": 32}}] * 2
    sess = art.load()
    ids = np.ones((1, 33), np.int64)
    with pytest.raises(UserError, match=r"^input 'input_ids' has seq = 33 \(axis 1\), .*"
                                        r"give seq <= 32$"):
        sess.run({"input_ids": ids, "attention_mask": ids})
    assert sess.run({"input_ids": ids[:, :32], "attention_mask": ids[:, :32]})[
        "logits"].shape == (1, 32, 50)


def test_a_t5_text_encoder_compiles_with_eager_attention(tmp_path):
    """T5 / UMT5 encoders (the text encoders of CogVideoX, Wan, Flux, SD3) failed with an
    internal error: torch's decomposition of sdpa with T5's additive position bias breaks at a
    view of its output. sdpa is swapped for eager attention when (only when) that export fails,
    from a checkpoint directory and from a module given in Python alike, and said so."""
    import torch

    torch.manual_seed(0)
    small = dict(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    transformers.UMT5EncoderModel(transformers.UMT5Config(**small)).save_pretrained(
        tmp_path / "umt5")
    art = edgec.compile(str(tmp_path / "umt5"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="seq=8")
    assert art.report["source"]["attention"] == "eager (sdpa did not export)"
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["last_hidden_state"][
        "max_rel"] <= 1e-5
    model = transformers.T5EncoderModel(transformers.T5Config(**small)).eval()
    ids = torch.randint(0, 128, (1, 8))
    art = edgec.compile(model, target="ort-cpu", output_dir=tmp_path / "m",
                        example_inputs=(ids,))
    assert art.report["source"]["attention"] == "eager (sdpa did not export)"
    for fid in art.report["fidelity"].values():
        assert max(o["max_rel"] for o in fid["outputs"].values()) <= 1e-5


def test_pickle_only_and_plain_directories_are_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "bert"}')
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(UserError, match="pickles are never loaded"):
        edgec.compile(str(ckpt), target="ort-cpu", output_dir=tmp_path / "o")
    with pytest.raises(UserError, match="without config.json"):
        edgec.compile(str(tmp_path), target="ort-cpu", output_dir=tmp_path / "o2")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


class _Chosen(Exception):
    pass


def test_a_local_directory_does_not_hide_a_model_name(tmp_path, monkeypatch):
    """`edgec compile video-dit` beside the artifact of `-o video-dit` said "video-dit: is a
    directory without config.json"; a name that is also a model directory is ambiguous."""
    from edgec.exporters import sources
    from edgec.exporters.vlm_source import is_vlm_source

    def chosen(module, inputs, shapes, outputs, info, kind, **_):
        raise _Chosen(kind)  # which source was exported, without exporting it

    monkeypatch.setattr(sources, "_from_torch", chosen)
    monkeypatch.chdir(tmp_path)
    resolve = sources.resolve_source.uncached
    for name in ("pose-prior", "llama", "vlm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    with pytest.raises(_Chosen, match="registry"):
        resolve("pose-prior")
    with pytest.raises(_Chosen, match="registry"):
        resolve("llama", generate=True)
    assert is_vlm_source("vlm")
    (tmp_path / "pose-prior" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"pose-prior: names both a reference model and the "
                                        r"model directory ./pose-prior here; give ./pose-prior"):
        resolve("pose-prior")
    assert not sources.names_reference_model("./pose-prior")


def test_freekv_graph_loads_the_checkpoint_named_like_a_reference_model(tmp_path, monkeypatch):
    """`edgec compile ./llama --generate --kv-retrieval ...` beside a checkpoint folder named
    `llama`: the source info keeps "llama" (the ./ lost), and the FreeKV graph's loader took it
    for the reference model's name again, refusing it as ambiguous after the whole export. The
    VLM calibration samples re-loaded their checkpoint the same way."""
    import types

    from edgec import pipeline
    from edgec.exporters import hf_decoder_view, hf_llava, vlm_source
    from edgec.runtimes.freekv import parse_kv_retrieval

    monkeypatch.chdir(tmp_path)
    for name in ("llama", "vlm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")

    def chosen(path, *_):
        raise _Chosen(str(path))

    monkeypatch.setattr(hf_decoder_view, "view_hf_decoder", chosen)
    recipe = types.SimpleNamespace(
        kv_retrieval=parse_kv_retrieval("freekv:budget=64,page=8,sink=8,recent=16"),
        context=None, target=types.SimpleNamespace(runtime="ort", runtime_config=None))
    info = dict(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    src = types.SimpleNamespace(kind="hf", info={"path": "llama", "generation": info})
    with pytest.raises(_Chosen) as got:
        pipeline._freekv_graph("./llama", recipe, src, tmp_path, lambda _: None)
    assert got.value.args[0] == str(tmp_path / "llama")

    monkeypatch.setattr(hf_llava, "load_llava", chosen)
    src = types.SimpleNamespace(info={"path": "vlm", "name": "vlm"})
    with pytest.raises(_Chosen) as got:
        vlm_source.calibration_samples(src, 1)
    assert got.value.args[0] == str(tmp_path / "vlm")


def test_bad_example_options(checkpoints, tmp_path):
    with pytest.raises(UserError, match="batch=N,seq=N"):
        edgec.compile(str(checkpoints / "bert"), target="ort-cpu", output_dir=tmp_path / "o",
                      config="seq=zero")


@pytest.fixture(scope="module")
def broken(checkpoints, tmp_path_factory):
    """The bert checkpoint under a config naming a head it has no weights for, and under a
    config whose hidden_size is not the weights'."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("broken")
    for name, change in (("head", {"architectures": ["BertForSequenceClassification"]}),
                         ("sizes", {"hidden_size": 32})):
        shutil.copytree(checkpoints / "bert", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**cfg, **change}))
    return root


@pytest.mark.parametrize("name,match", [
    ("head", r"2 weights of BertForSequenceClassification are missing from the safetensors: "
             r"classifier.bias, classifier.weight;"),
    ("sizes", r"weights of BertModel have a different shape in config.json than in the weights")])
def test_weights_that_do_not_load_are_refused(broken, tmp_path, capfd, name, match):
    """transformers initialized missing / wrongly shaped weights at random: the compile
    succeeded with a model that was not the checkpoint (a mismatch was a 29-line RuntimeError)."""
    with pytest.raises(UserError, match=match) as e:
        edgec.compile(str(broken / name), target="ort-cpu", output_dir=tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_a_config_its_own_model_rejects_is_refused(tmp_path):
    """config.json's pad_token_id past the vocabulary: torch's Embedding asserts on it while
    transformers builds the model, an internal error (exit 1) for a bad checkpoint."""
    import json

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(
        tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg["pad_token_id"] = cfg["vocab_size"]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="transformers cannot load this checkpoint: "
                                        "Padding_idx must be within num_embeddings"):
        edgec.compile(str(tmp_path / "llama"), target="ort-cpu", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_bf16_checkpoint_loads_in_float32(tmp_path):
    """bf16 checkpoints (most real LLMs) crashed: the parameter map could not view bf16."""
    import torch

    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **SMALL)).to(
        torch.bfloat16).save_pretrained(tmp_path / "qwen")
    art = edgec.compile(str(tmp_path / "qwen"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="seq=8")
    assert "model.layers.0.self_attn.q_proj.weight" in art.manifest["parameter_map"]
    assert art.report["fidelity"]["target_vs_source"]["outputs"]["logits"]["max_rel"] <= 1e-5


def test_example_inputs_with_a_checkpoint_is_refused(checkpoints, tmp_path):
    import torch

    with pytest.raises(UserError, match="example_inputs applies to an nn.Module or an .onnx"):
        edgec.compile(str(checkpoints / "bert"), target="ort-cpu", output_dir=tmp_path / "o",
                      example_inputs=(torch.zeros(1, 4, dtype=torch.long),))
    assert not (tmp_path / "o").exists()


def test_models_edgec_cannot_wrap_are_refused(tmp_path, checkpoints):
    """ViT ('ViTConfig' object has no attribute 'vocab_size'), encoder-decoders (T5, Whisper:
    'You must specify exactly one of input_ids...') and a seq longer than the position table
    were internal errors."""
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        tmp_path / "t5")
    for name, what in (("vit", "ViTModel is a model taking pixel_values, bool_masked_pos"),
                       ("t5", "T5ForConditionalGeneration is an encoder-decoder")):
        with pytest.raises(UserError, match=f"{what}; .*input_ids/attention_mask.*example_inputs"):
            edgec.compile(str(tmp_path / name), target="ort-cpu", output_dir=tmp_path / "o")
    # it takes attention_mask too: the refusal said "taking input_ids, pixel_values"
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=16, patch_size=8))).save_pretrained(
        tmp_path / "clip")
    with pytest.raises(UserError, match=r"CLIPModel is a model of several towers \(text_config, "
                                        r"vision_config\), not one text model; "):
        edgec.compile(str(tmp_path / "clip"), target="ort-cpu", output_dir=tmp_path / "o")
    # [batch, choices, seq] inputs: a RuntimeError of a view
    transformers.BertForMultipleChoice(transformers.BertConfig(**SMALL)).save_pretrained(
        tmp_path / "mc")
    with pytest.raises(UserError, match=r"BertForMultipleChoice takes input_ids \[batch, "
                                        r"choices, seq\].*example_inputs"):
        edgec.compile(str(tmp_path / "mc"), target="ort-cpu", output_dir=tmp_path / "o")
    with pytest.raises(UserError, match=r"seq=600 is longer than the model's 512 positions"):
        edgec.compile(str(checkpoints / "bert"), target="ort-cpu", output_dir=tmp_path / "o",
                      config="seq=600")
    assert not (tmp_path / "o").exists()


def test_heads_without_logits_export_their_own_outputs(tmp_path):
    """Any "For" architecture was exported as .logits: BertForQuestionAnswering and
    BertForPreTraining were internal AttributeErrors."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**SMALL)).eval()
    model.save_pretrained(tmp_path / "qa")
    art = edgec.compile(str(tmp_path / "qa"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="seq=8")
    assert [o["name"] for o in art.manifest["outputs"]] == ["start_logits", "end_logits"]
    ids = np.arange(1, 9)[None]
    out = art.load().run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), attention_mask=torch.ones(1, 8, dtype=torch.long))
    np.testing.assert_allclose(out["end_logits"], ref.end_logits.numpy(), atol=1e-5)


def test_a_dim_a_checkpoint_fixes_is_refused_without_naming_dynamic_shapes(tmp_path):
    """Mamba's forward fixes seq; the message told a CLI user to drop a dim from the
    dynamic_shapes they never gave."""
    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    with pytest.raises(UserError, match="MambaForCausalLM does not export with a dynamic batch "
                                        "and sequence length") as e:
        edgec.compile(str(tmp_path / "mamba"), target="ort-cpu", output_dir=tmp_path / "o",
                      config="seq=8")
    assert "declares dynamic" not in str(e.value)


def test_positions_after_a_padding_row_bound_seq_by_that_many_fewer():
    """RoBERTa's positions start at padding_idx + 1: 66 rows take 64 tokens (65 and 66 were
    recorded as allowed and failed in the runtime's Gather with its raw error)."""
    from edgec.exporters.hf import max_positions

    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=66, pad_token_id=1)
    assert max_positions(cfg, transformers.RobertaModel(cfg)) == 64
    bert = transformers.BertConfig(max_position_embeddings=66, **SMALL)
    assert max_positions(bert, transformers.BertModel(bert)) == 66
