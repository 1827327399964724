"""Text prompts on CogVideoX / Wan artifacts: a compiled T5 / UMT5 encoder and its shipped
tokenizer make the embeddings the diffusers pipelines make, and sampling from a prompt equals
the pipeline run from the same prompt and latents."""

import json
import os

import diffusers  # the diffusers extra; dev installs it, so a missing install fails here
import numpy as np
import pytest
import transformers
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.errors import UserError
from edgec.runtimes.sampling import check_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = "a cat dog on the skateboard red blue runs jumps &amp; big small".split()
TEXT = dict(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
PROMPT = "a  red cat runs on the &amp;amp; skateboard zebra"  # cleaned by Wan; truncated at 8


def _tokenizer(folder):
    """A word-level tokenizer.json with T5's special tokens (ids, pad 0, '</s>' appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))


def _sentencepiece(folder):
    """Only a sentencepiece model (spiece.model), as CogVideoX's hub pipelines ship T5's."""
    import sentencepiece

    folder.mkdir(parents=True)
    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=30,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", num_threads=1, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 226}))


def _pipeline(root, kind):
    """A diffusers pipeline folder (tokenizer, text_encoder, transformer, scheduler) and the
    pipeline object over the same modules."""
    import torch

    torch.manual_seed(0)
    (_sentencepiece if kind == "cog" else _tokenizer)(root / "tokenizer")
    if kind == "cog":
        enc = transformers.T5EncoderModel(transformers.T5Config(**TEXT))
        tr = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=8,
            sample_height=8, sample_frames=5, max_text_seq_length=8,
            use_rotary_positional_embeddings=True)
        sched = diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", snr_shift_scale=1.0,
            rescale_betas_zero_snr=True, timestep_spacing="trailing")
        pipe_cls = diffusers.CogVideoXPipeline
    else:
        enc = transformers.UMT5EncoderModel(transformers.UMT5Config(**TEXT))
        tr = diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
        sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                  use_flow_sigmas=True, flow_shift=3.0)
        pipe_cls = diffusers.WanPipeline
    enc.save_pretrained(root / "text_encoder")
    tr.save_pretrained(root / "transformer")
    sched.save_pretrained(root / "scheduler")
    tokenizer = (transformers.T5Tokenizer if kind == "cog" else
                 transformers.PreTrainedTokenizerFast).from_pretrained(root / "tokenizer")
    return pipe_cls(tokenizer=tokenizer, text_encoder=enc.eval(), vae=None,
                    transformer=tr.eval(), scheduler=sched)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """kind -> (pipeline, compiled denoiser, compiled text encoder), each compiled once."""
    out = {}
    for kind in ("cog", "wan"):
        root = tmp_path_factory.mktemp(kind)
        pipe = _pipeline(root / "pipe", kind)
        config = "text_len=8" if kind == "wan" else None  # the pipelines' max length 8
        denoiser = edgec.compile(str(root / "pipe" / "transformer"), target="ort-cpu",
                                 output_dir=root / "denoiser", config=config)
        encoder = edgec.compile(str(root / "pipe" / "text_encoder"), target="ort-cpu",
                                output_dir=root / "encoder", config="seq=8")
        out[kind] = pipe, denoiser, encoder
    return out


@pytest.mark.parametrize("kind", ["cog", "wan"])
def test_sampling_from_a_prompt_is_the_pipelines(pipelines, kind):
    """CogVideoX: padded ids, the encoder unmasked; Wan: the prompt cleaned, the encoder masked
    and its embeddings cut at the prompt's tokens; both with the pipeline's negative prompt."""
    import torch

    pipe, denoiser, encoder = pipelines[kind]
    assert encoder.manifest["tokenizer"] == "tokenizer"  # from ../tokenizer in the pipeline
    # CogVideoX's: converted from spiece.model (the pipeline folder has no tokenizer.json)
    assert (encoder.path / "tokenizer" / "tokenizer.json").is_file()
    shape = (1, 2, 4, 8, 8) if kind == "cog" else (1, 4, 2, 8, 8)
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    with torch.no_grad():
        want = pipe(prompt=PROMPT, negative_prompt="small dog", latents=latents,
                    num_inference_steps=5, guidance_scale=6.0, height=8 * s, width=8 * s,
                    num_frames=t + 1, output_type="latent", max_sequence_length=8
                    ).frames.numpy()
    sess = denoiser.load()
    got = sess.sample(prompt=PROMPT, negative_prompt="small dog", text_encoder=encoder.load(),
                      noise={"hidden_states": latents.numpy()}, steps=5,
                      guidance=6.0)["hidden_states"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # guidance 0.5: the pipelines guide only above 1 (edgec interpolated towards "")
    with torch.no_grad():
        want = pipe(prompt=PROMPT, latents=latents, num_inference_steps=5, guidance_scale=0.5,
                    height=8 * s, width=8 * s, num_frames=t + 1, output_type="latent",
                    max_sequence_length=8).frames.numpy()
    got = sess.sample(prompt=PROMPT, text_encoder=encoder.load(), guidance=0.5, steps=5,
                      noise={"hidden_states": latents.numpy()})["hidden_states"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_cli_samples_from_a_prompt_and_refuses_what_it_cannot_encode(pipelines, tmp_path):
    _, denoiser, encoder = pipelines["cog"]
    base = ["sample", str(denoiser.path), "--steps", "2", "--prompt", "a big dog"]
    result = CliRunner().invoke(app, [*base, "--text-encoder", str(encoder.path), "--save",
                                      str(tmp_path / "x.npz"), "--json"])
    assert result.exit_code == 0, result.output
    sess = denoiser.load()
    want = sess.sample(prompt="a big dog", text_encoder=encoder.load(), steps=2)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["hidden_states"],
                                  want["hidden_states"])
    for args, message in [
            (base, "a prompt needs a compiled text encoder"),
            ([*base, "--text-encoder", str(denoiser.path)], "--text-encoder must be a compiled "
                                                            "text encoder"),
            (["sample", str(denoiser.path), "--text-encoder", str(encoder.path)],
             "--text-encoder encodes --prompt")]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
    # guidance 1: no negative prompt to encode (the default "" was encoded, then refused)
    result = CliRunner().invoke(app, [*base, "--text-encoder", str(encoder.path), "--guidance",
                                      "1", "--save", str(tmp_path / "g1.npz")])
    assert result.exit_code == 0, result.output
    want = sess.sample(prompt="a big dog", text_encoder=encoder.load(), steps=2, guidance=1.0)
    np.testing.assert_array_equal(np.load(tmp_path / "g1.npz")["hidden_states"],
                                  want["hidden_states"])
    with pytest.raises(UserError, match="negative conditions are used by guidance"):
        check_inputs(sess, negative={"encoder_hidden_states": np.zeros((1, 8, 16), np.float32)},
                     guidance=1.0)  # the CLI's, before its progress bar
    with pytest.raises(UserError, match="give negative_prompt or negative embeddings"):
        sess.sample(prompt="a", negative_prompt="b", text_encoder=encoder.load(),
                    negative={"encoder_hidden_states": np.zeros((1, 8, 16), np.float32)})
    for bad in (5, [5], [None]):  # 5 was a raw TypeError
        with pytest.raises(UserError, match="^negative_prompt must be a string or a list of "):
            sess.sample(prompt="a", negative_prompt=bad, text_encoder=encoder.load())
        with pytest.raises(UserError, match="^prompt must be a string or a list of strings"):
            sess.sample(prompt=bad, text_encoder=encoder.load())
    with pytest.raises(UserError, match="2 negative prompts for 1 prompts"):
        sess.sample(prompt="a", negative_prompt=["b", "c"], text_encoder=encoder.load())


def _vae(kind):
    import torch

    torch.manual_seed(2)
    if kind == "cog":
        return diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
            up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(16, 32),
            latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4)
    return diffusers.AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                      attn_scales=[], temperal_downsample=[True],
                                      latents_mean=[0.1, -0.2, 0.3, 0.0],
                                      latents_std=[2.0, 1.5, 0.5, 1.0])


@pytest.mark.parametrize("kind", ["cog", "wan"])
def test_a_compiled_vae_decodes_the_video_the_pipeline_returns(pipelines, kind, tmp_path):
    """prompt → frames with three compiled artifacts (text encoder, denoiser, VAE decoder)
    equals the pipeline's ``output_type="np"`` frames: CogVideoX's latents permuted and divided
    by its scaling factor, Wan's un-normalized per channel; the CLI writes them as a GIF."""
    import torch
    from PIL import Image, ImageSequence

    pipe, denoiser, encoder = pipelines[kind]
    vae = _vae(kind).eval()
    vae.save_pretrained(tmp_path / "vae")
    pipe = type(pipe)(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=vae,
                      transformer=pipe.transformer, scheduler=pipe.scheduler)
    shape = (1, 2, 4, 8, 8) if kind == "cog" else (1, 4, 2, 8, 8)
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    with torch.no_grad():
        want = pipe(prompt="a red cat", latents=latents, num_inference_steps=3,
                    guidance_scale=6.0, height=8 * s, width=8 * s, num_frames=t + 1,
                    output_type="np", max_sequence_length=8).frames
    art = edgec.compile(str(tmp_path / "vae"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="frames=2,height=8,width=8")
    got = denoiser.load().sample(prompt="a red cat", text_encoder=encoder.load(), steps=3,
                                 guidance=6.0, vae=art.load(),
                                 noise={"hidden_states": latents.numpy()})["video"]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    if kind == "cog":
        gif = tmp_path / "cat.gif"
        result = CliRunner().invoke(app, ["sample", str(denoiser.path), "--steps", "2",
                                          "--vae", str(art.path), "--video", str(gif)])
        assert result.exit_code == 0, result.output
        with Image.open(gif) as im:  # Pillow merges equal neighbours, summing their time
            durations = [frame.info["duration"] for frame in ImageSequence.Iterator(im)]
            assert im.size == (want.shape[3], want.shape[2])
            assert sum(durations) == want.shape[1] * 120  # 8 frames/s, in GIF centiseconds
        result = CliRunner().invoke(app, ["sample", str(denoiser.path), "--video", str(gif)])
        assert result.exit_code == 2 and "give --vae DIR too" in result.output
        # the suffix in any case; --json names the GIF; written whole or not at all
        upper = tmp_path / "CAT.GIF"
        result = CliRunner().invoke(app, ["sample", str(denoiser.path), "--steps", "1", "--vae",
                                          str(art.path), "--video", str(upper), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["saved_video"] == str(upper)
        with Image.open(upper) as im:
            assert im.format == "GIF" and im.n_frames >= 1
        assert not list(tmp_path.glob(".*.partial"))
        steps = []  # refused before the first step (it was after the last)
        with pytest.raises(UserError, match="--vae must be a compiled diffusers video VAE"):
            denoiser.load().sample(steps=1, vae=encoder.load(),
                                   callback=lambda i, n: steps.append(i))
        assert not steps
        with pytest.raises(UserError, match="--vae must be a compiled diffusers video VAE"):
            check_inputs(denoiser.load(), vae=encoder.load())  # the CLI's, before its bar


def test_a_sentencepiece_only_tokenizer_ships_converted_or_not_at_all(tmp_path, monkeypatch,
                                                                      caplog):
    """spiece.model → tokenizer.json as transformers converts it (ids equal to its T5Tokenizer);
    without sentencepiece the artifact ships no tokenizer and says why, instead of a half one."""
    from edgec.runtimes.tokenizer import Tokenizer, ship_tokenizer

    _sentencepiece(tmp_path / "tok")
    (tmp_path / "a").mkdir()
    assert ship_tokenizer(tmp_path / "tok", tmp_path / "a") == "tokenizer"
    ours = Tokenizer(tmp_path / "a", {"tokenizer": "tokenizer"})
    theirs = transformers.T5Tokenizer.from_pretrained(tmp_path / "tok")
    for text in (PROMPT, "small blue dog jumps", "zebra"):
        assert ours.encode(text) == theirs(text).input_ids
    monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)
    (tmp_path / "b").mkdir()
    assert ship_tokenizer(tmp_path / "tok", tmp_path / "b") is None
    assert not (tmp_path / "b" / "tokenizer").exists()
    assert "only a sentencepiece model (spiece.model)" in caplog.text
