"""Local diffusers model directories (tiny random transformers, saved here) as compile sources."""

import copy
import json
import os
import socket
import sys
from unittest import mock

import diffusers  # the diffusers extra; dev installs it, so a missing install fails here
import numpy as np
import pytest
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8,
           sample_frames=5, max_text_seq_length=8, use_rotary_positional_embeddings=True)
WAN = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Any connection attempt fails the test: a local directory never reaches a hub."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: {args[1:]}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory, offline):
    import torch

    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    diffusers.CogVideoXTransformer3DModel(**COG).save_pretrained(root / "cog")
    diffusers.WanTransformer3DModel(**WAN).save_pretrained(root / "wan")
    torch.manual_seed(1)  # a pipeline folder: the transformer beside the scheduler it samples with
    diffusers.CogVideoXTransformer3DModel(**COG).save_pretrained(root / "cogpipe" / "transformer")
    diffusers.CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", snr_shift_scale=3.0,
        rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ).save_pretrained(root / "cogpipe" / "scheduler")
    return root


@pytest.fixture(scope="module", autouse=True)
def export_once():
    """Each (directory, config) is exported and checked once (a dynamo export is seconds on
    busy cores); every compile gets a copy, as conftest does for registry models."""
    import dataclasses

    import onnx_ir as ir

    from edgec.exporters import sources

    real, cache = sources.resolve_source, {}

    def resolve(source, config=None, example_inputs=None, dynamic_shapes=None, generate=False,
                opset=None):
        if not (isinstance(source, str) and os.path.isdir(source) and example_inputs is None
                and dynamic_shapes is None and not generate and opset is None):
            return real(source, config, example_inputs, dynamic_shapes, generate, opset)
        if (source, config) not in cache:
            cache[source, config] = real(source, config)
        src = cache[source, config]
        model = src.model.clone()
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().copy(), name=value.name)
        return dataclasses.replace(
            src, model=model, info=copy.deepcopy(src.info),
            parameter_map=copy.deepcopy(src.parameter_map),
            export_fidelity=copy.deepcopy(src.export_fidelity),
            feeds={k: v.copy() for k, v in src.feeds.items()},
            reference={k: v.copy() for k, v in src.reference.items()},
            trajectories={})  # recorded on the copy's own graph

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "resolve_source", resolve)
        yield


def _fidelity_ok(art):
    for fid in art.report["fidelity"].values():
        assert fid["outputs"]["sample"]["max_rel"] <= 1e-5, fid


def test_cogvideox_compiles_for_openvino_with_checkpoint_names(models, tmp_path):
    art = edgec.compile(str(models / "cog"), target="openvino-cpu", output_dir=tmp_path / "o")
    ins = {i["name"]: i for i in art.manifest["inputs"]}
    assert list(ins) == ["hidden_states", "encoder_hidden_states", "timestep"]
    assert ins["hidden_states"]["shape"] == ["batch", 2, 4, 8, 8]  # default frames/height/width
    assert ins["encoder_hidden_states"]["shape"] == ["batch", 8, 16]  # max_text_seq_length
    assert ins["timestep"]["dtype"] == "int64"
    assert [o["name"] for o in art.manifest["outputs"]] == ["sample"]
    _fidelity_ok(art)
    src = art.report["source"]
    assert src["kind"] == "diffusers" and src["class"] == "CogVideoXTransformer3DModel"
    assert src["hyperparameters"]["grid"] == [2, 4, 4]
    pmap = art.manifest["parameter_map"]
    assert "transformer_blocks.0.attn1.to_q.weight" in pmap and "proj_out.weight" in pmap
    assert not any(k.startswith("transformer.") for k in pmap)
    # no scheduler beside it: the hub's CogVideoX DDIM, SNR shift 1 for a RoPE (5B-style) model
    spec = art.manifest["sampling"]
    assert (spec["kind"], spec["snr_shift"], spec["guidance"]) == ("ddim-v", 1.0, 6.0)
    out = art.load().sample(steps=2)["hidden_states"]  # int64 timesteps fed as the graph wants
    assert out.shape == (1, 2, 4, 8, 8) and np.isfinite(out).all()


def test_cogvideox_samples_as_the_diffusers_pipeline(models, tmp_path):
    """``Session.sample`` on a CogVideoX artifact equals diffusers' own CogVideoXPipeline (its
    CogVideoXDDIMScheduler, v prediction, guidance with negative prompt embeddings) from the same
    latents, at a step count that does not divide 1000; the pipeline folder's scheduler config
    (SNR shift 3 on a RoPE model, whose default would be 1) is what the artifact samples with."""
    import torch

    pipe_dir = models / "cogpipe"
    transformer = diffusers.CogVideoXTransformer3DModel.from_pretrained(pipe_dir / "transformer")
    scheduler = diffusers.CogVideoXDDIMScheduler.from_pretrained(pipe_dir / "scheduler")
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                                       transformer=transformer.eval(), scheduler=scheduler)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 2, 4, 8, 8, generator=g)
    prompt, negative = torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    with torch.no_grad():
        want = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents,
                    num_inference_steps=7, guidance_scale=6.0, height=8 * s, width=8 * s,
                    num_frames=t + 1, output_type="latent").frames.numpy()
    art = edgec.compile(str(pipe_dir / "transformer"), target="ort-cpu",
                        output_dir=tmp_path / "o")
    assert art.manifest["sampling"]["snr_shift"] == 3.0
    sess = art.load()
    feeds = {"encoder_hidden_states": prompt.numpy()}
    got = sess.sample(feeds, negative={"encoder_hidden_states": negative.numpy()},
                      noise={"hidden_states": latents.numpy()}, steps=7)["hidden_states"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # CogVideoX-5B's use_dynamic_cfg: the guidance scale changes with the timestep
    with torch.no_grad():
        dynamic = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents,
                       num_inference_steps=7, guidance_scale=6.0, height=8 * s, width=8 * s,
                       num_frames=t + 1, output_type="latent", use_dynamic_cfg=True
                       ).frames.numpy()
    got_dynamic = sess.sample(feeds, negative={"encoder_hidden_states": negative.numpy()},
                              noise={"hidden_states": latents.numpy()}, steps=7,
                              dynamic_cfg=True)["hidden_states"]
    assert np.abs(got_dynamic - dynamic).max() <= 1e-4 * np.abs(dynamic).max()
    assert np.abs(dynamic - want).max() > 1e-3 * np.abs(want).max()  # it did change something
    # CogVideoXDPMScheduler (the 5B recipe's swap): stochastic, so both draw the same noises
    dpm = diffusers.CogVideoXDPMScheduler.from_config(scheduler.config)
    dpm_pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                                           transformer=transformer, scheduler=dpm)
    draws = np.random.default_rng(5)
    module = sys.modules[type(dpm).__module__]
    with mock.patch.object(module, "randn_tensor", lambda shape, **_: torch.from_numpy(
            draws.standard_normal(tuple(shape)).astype(np.float32))), torch.no_grad():
        want_dpm = dpm_pipe(prompt_embeds=prompt, negative_prompt_embeds=negative,
                            latents=latents, num_inference_steps=7, guidance_scale=6.0,
                            height=8 * s, width=8 * s, num_frames=t + 1,
                            output_type="latent").frames.numpy()
    got_dpm = sess.sample(feeds, negative={"encoder_hidden_states": negative.numpy()},
                          noise={"hidden_states": latents.numpy()}, steps=7, seed=5,
                          solver="dpm")["hidden_states"]
    assert sess.last_sampling["solver"] == "dpm"
    assert np.abs(got_dpm - want_dpm).max() <= 1e-4 * np.abs(want_dpm).max()
    assert np.abs(want_dpm - want).max() > 1e-2 * np.abs(want).max()  # another sampler
    with pytest.raises(UserError, match="a ddim-v artifact samples with one of: ddim, dpm"):
        sess.sample(feeds, steps=1, solver="unipc")
    # zeros are not the negative prompt: the unconditional half is what the user gives
    zeros = sess.sample(feeds, noise={"hidden_states": latents.numpy()}, steps=7)["hidden_states"]
    assert np.abs(zeros - want).max() > 1e-2 * np.abs(want).max()
    with pytest.raises(UserError, match=r"'encoder_hidden_states' has shape \[1, 3, 16\]"):
        sess.sample(feeds, negative={"encoder_hidden_states": np.zeros((1, 3, 16))}, steps=1)
    with pytest.raises(UserError, match="negative input 'timestep' is not a condition"):
        sess.sample(feeds, negative={"timestep": np.zeros(1)}, steps=1)
    with pytest.raises(UserError, match="at most 1000"):
        sess.sample(feeds, steps=1001)
    # the CLI: --negative FILE.npz, a bad one refused in one line before any step
    np.savez(tmp_path / "p.npz", encoder_hidden_states=prompt.numpy())
    np.savez(tmp_path / "n.npz", encoder_hidden_states=negative.numpy())
    np.savez(tmp_path / "bad.npz", text=negative.numpy())
    base = ["sample", str(tmp_path / "o"), "--inputs", str(tmp_path / "p.npz"), "--steps", "7"]
    result = CliRunner().invoke(app, [*base, "--negative", str(tmp_path / "n.npz"), "--save",
                                      str(tmp_path / "x.npz"), "--json"])
    assert result.exit_code == 0, result.output
    seeded = sess.sample(feeds, negative={"encoder_hidden_states": negative.numpy()}, steps=7)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["hidden_states"],
                                  seeded["hidden_states"])
    result = CliRunner().invoke(app, [*base, "--negative", str(tmp_path / "bad.npz")])
    assert result.exit_code == 2 and "negative input 'text' is not a condition" in result.output
    result = CliRunner().invoke(app, [*base, "--solver", "euler"])
    assert result.exit_code == 2 and "samples with one of: ddim, dpm" in result.output
    result = CliRunner().invoke(app, [*base, "--solver", "dpm", "--steps", "2", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["solver"] == "dpm", result.output


def _wan_pipeline_latents(transformer_dir, scheduler, steps, text_len):
    """diffusers' own WanPipeline (no text encoder or VAE: prompt embeddings in, latents out)
    from seeded latents; returns (latents, prompt, negative, the pipeline's result)."""
    import torch

    transformer = diffusers.WanTransformer3DModel.from_pretrained(transformer_dir).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                 transformer=transformer, scheduler=scheduler)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 2, 8, 8, generator=g)
    prompt = torch.randn(1, text_len, 16, generator=g)
    negative = torch.randn(1, text_len, 16, generator=g)
    s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    with torch.no_grad():
        out = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents,
                   num_inference_steps=steps, guidance_scale=5.0, height=8 * s, width=8 * s,
                   num_frames=t + 1, output_type="latent").frames
    return latents.numpy(), prompt.numpy(), negative.numpy(), out.numpy()


def _sample_like_pipeline(sess, latents, prompt, negative, steps):
    return sess.sample({"encoder_hidden_states": prompt}, steps=steps, guidance=5.0,
                       negative={"encoder_hidden_states": negative},
                       noise={"hidden_states": latents})["hidden_states"]


def test_wan_compiles_for_ort_and_samples_as_the_hub_pipeline(models, tmp_path):
    """A bare Wan transformer folder samples with what the Wan 2.1 pipelines ship
    (UniPCMultistepScheduler, flow shift 3, guidance 5): diffusers' WanPipeline from the same
    latents and embeddings gives the same latents (edgec's sampler was plain Euler before)."""
    art = edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="text_len=6")
    _fidelity_ok(art)
    assert "blocks.0.attn2.to_k.weight" in art.manifest["parameter_map"]
    spec = art.manifest["sampling"]
    assert (spec["kind"], spec["solver"], spec["shift"], spec["guidance"]) == (
        "flow", "unipc", 3.0, 5.0)
    sess = art.load()
    assert sess.default_feeds["timestep"].dtype == np.float32
    assert sess.default_feeds["encoder_hidden_states"].shape == (1, 6, 16)
    hub = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    latents, prompt, negative, want = _wan_pipeline_latents(models / "wan", hub, 6, 6)
    got = _sample_like_pipeline(sess, latents, prompt, negative, 6)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(UserError, match="dynamic_cfg is CogVideoX's guidance schedule"):
        sess.sample(steps=1, dynamic_cfg=True)


@pytest.mark.parametrize("scheduler", [
    diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      flow_shift=5.0, solver_order=3, disable_corrector=[1, 3]),
    diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)], ids=["unipc-order3", "flowmatch"])
def test_wan_samples_with_its_pipeline_folders_scheduler(models, tmp_path, scheduler):
    """The scheduler saved beside the transformer is the one the artifact samples with: UniPC of
    order 3 with correctors turned off at some steps, or FlowMatchEuler's own sigma grid."""
    import shutil

    root = tmp_path / "pipe"
    shutil.copytree(models / "wan", root / "transformer")
    scheduler.save_pretrained(root / "scheduler")
    art = edgec.compile(str(root / "transformer"), target="ort-cpu", output_dir=tmp_path / "o")
    assert art.manifest["sampling"]["shift"] == 5.0
    latents, prompt, negative, want = _wan_pipeline_latents(root / "transformer", scheduler,
                                                            7, 8)
    got = _sample_like_pipeline(art.load(), latents, prompt, negative, 7)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_wan_lora_merges_and_is_held_to_peft(models, tmp_path):
    """A LoRA trained on a diffusers video DiT (PEFT on the model directory's own class) merges
    into its export and is held to PEFT's merge of the model loaded again (a diffusers source
    crashed here with a KeyError: the reference looked for a registry model), its Conv3d patch
    embedding's LoRA too."""
    import warnings

    import torch

    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = diffusers.WanTransformer3DModel.from_pretrained(models / "wan")
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=2, lora_alpha=4,
                                                    target_modules=["to_q", "to_v",
                                                                    "patch_embedding"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "lora"))
    art = edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="text_len=6", lora=str(tmp_path / "lora"))
    fid = art.report["fidelity"]
    assert fid["lora"]["reference"] == "peft merge_and_unload (lora)"
    assert fid["target_vs_source"]["outputs"]["sample"]["max_rel"] <= 1e-5
    (merge,) = [p["stats"] for p in art.report["passes"] if p["name"] == "lora-merge"]
    # attn1/attn2 q, v and the Conv3d patch embedding (LoRA on a Conv was refused before)
    assert merge["modules_merged"] == 5 and merge["max_abs_delta"] > 0.01
    assert merge["by_module_kind"]["patch_embedding"] == 1


def test_a_transformer_quantizes_on_its_own_sampling_trajectory(models, tmp_path):
    """A diffusers transformer has no input generator of its own: `--quantize` without data was
    refused ("no calibration generator"). It calibrates on the feeds its fp32 graph's sampler
    runs (CogVideoX: DDIM v-prediction, integer train-step timesteps from 999 down), random
    text embeddings as conditions, and the floor holds on a held-out trajectory."""
    from edgec.calibration.trajectory import GRAPH_ORIGIN

    art = edgec.compile(str(models / "cog"), target="ort-cpu", quantize="w8a8",
                        output_dir=tmp_path / "q")
    assert art.report["quantization"]["calibration"]["data"] == GRAPH_ORIGIN
    floor = next(p["stats"]["mixed_precision"] for p in art.report["passes"]
                 if "mixed_precision" in (p.get("stats") or {}))
    assert floor["reached"] and floor["achieved"] >= 0.98, floor
    from edgec.calibration.samples import generated_samples
    from edgec.exporters import sources

    samples, _ = generated_samples(sources.resolve_source(str(models / "cog")), 16)
    t = sorted({int(s["timestep"][0]) for s in samples})
    assert len(t) == 16 and t[-1] == 999 and t[0] < 100  # random feeds' timesteps held {0, 1}


def test_sparse_attention_finds_the_joint_attention(models, tmp_path):
    """grid and text prefix come from the model: the CLI needs no grid= or prefix=."""
    result = CliRunner().invoke(app, ["compile", str(models / "cog"), "--target", "ort-cpu",
                                      "-o", str(tmp_path / "o"), "--sparse-attention",
                                      "keep=0.5,block=8,min_seq=0", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fidelity"]["export_vs_pytorch"]["outputs"]["sample"]["max_rel"] <= 1e-5
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "sparse-attention")
    assert stats["sites_found"] == 1 and stats["sites_approximate"] == 1
    assert stats["config"]["grid"] == [2, 4, 4] and stats["config"]["prefix"] == 8


def _dir(tmp_path, name, config, weights):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for w in weights:
        (d / w).write_bytes(b"\x80\x04 not loaded")
    return d


def test_pickles_unknown_classes_and_pipelines_are_refused(tmp_path):
    cog = {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.42.1"}
    pickled = _dir(tmp_path, "bin", cog, ["diffusion_pytorch_model.bin"])
    result = CliRunner().invoke(app, ["compile", str(pickled), "--target", "ort-cpu", "-o",
                                      str(tmp_path / "o")])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "pickles are never loaded" in lines[0] and "diffusion_pytorch_model.bin" in lines[0]
    unknown = _dir(tmp_path, "unet", {"_class_name": "UNet2DConditionModel"},
                   ["diffusion_pytorch_model.safetensors"])
    with pytest.raises(UserError, match="'UNet2DConditionModel' is not supported; supported: "
                       "CogVideoXTransformer3DModel, WanTransformer3DModel, "
                       "AutoencoderKLCogVideoX, AutoencoderKLWan") as e:
        edgec.compile(str(unknown), target="ort-cpu", output_dir=tmp_path / "o2")
    assert "\n" not in str(e.value)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="diffusers pipeline .* give the model's own folder"):
        edgec.compile(str(pipe), target="ort-cpu", output_dir=tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o", "o2", "o3"))


def test_bad_options_and_missing_diffusers(models, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="batch=N,frames=N,height=N,width=N,text_len=N"):
        edgec.compile(str(models / "cog"), target="ort-cpu", output_dir=tmp_path / "o",
                      config="seq=16")
    with pytest.raises(UserError, match="height=7 must be a multiple of the patch size 2"):
        edgec.compile(str(models / "cog"), target="ort-cpu", output_dir=tmp_path / "o",
                      config="height=7")
    sincos = tmp_path / "sincos"
    diffusers.CogVideoXTransformer3DModel(**{**COG, "use_rotary_positional_embeddings": False}
                                          ).save_pretrained(sincos)
    with pytest.raises(UserError, match="sin-cos position embeddings needs text_len=8"):
        edgec.compile(str(sincos), target="ort-cpu", output_dir=tmp_path / "o",
                      config="text_len=4")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UserError, match=r"pip install 'edgec\[diffusers\]'"):
        edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "o")


@pytest.mark.parametrize("latent", [(2, 8, 16), (3, 8, 12), (2, 12, 8)])
def test_cogvideox_rope_is_the_pipelines(latent):
    """The RoPE tables the export bakes in are the CogVideoX pipeline's for the same latents
    (pixel size = latent × the VAE's 8), also where the grid is cropped to the base aspect."""
    import types

    import torch
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    from edgec.exporters.diffusers_source import _cogvideox_rope

    c = diffusers.CogVideoXTransformer3DModel(**{**COG, "sample_width": 16}).config  # base 4×8
    f, h, w = latent
    ours = _cogvideox_rope(c)(torch.zeros(1, f, 4, h, w))["image_rotary_emb"]
    fake = types.SimpleNamespace(vae_scale_factor_spatial=8,
                                 transformer=types.SimpleNamespace(config=c))
    theirs = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, h * 8, w * 8, f,
                                                                     torch.device("cpu"))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cogvideox_sincos_positions_at_another_size_are_the_models():
    """A 2B-style (sin-cos) CogVideoX compiled at a size other than its sample size was an
    internal error (its forward writes the new table in place); the table made for the
    compile's size gives what the untouched model computes there. A 1.5-style slice RoPE past
    its sample size is refused in one line (a raw size mismatch in diffusers)."""
    import torch

    from edgec.exporters.diffusers_source import _cogvideox, _sincos_at

    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        **{**COG, "use_rotary_positional_embeddings": False}).eval()
    moved = copy.deepcopy(model)
    _sincos_at(moved.patch_embed, 3, 8, 6)
    x, text = torch.randn(1, 3, 4, 8, 6), torch.randn(1, 8, 16)
    with torch.no_grad():
        want = model(x, text, torch.tensor([5])).sample
        got = moved(x, text, torch.tensor([5])).sample
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert moved.patch_embed.sample_frames == 9  # (3 - 1) * 4 + 1: no table made in forward
    slice_rope = diffusers.CogVideoXTransformer3DModel(**{**COG, "patch_size_t": 2,
                                                          "patch_bias": False})
    with pytest.raises(UserError, match=r"height=12, width=8 exceed this CogVideoX's sample "
                                        r"size 8x8"):
        _cogvideox(slice_rope, {"batch": 1, "frames": 2, "height": 12, "width": 8,
                                "text_len": None})


def test_sharded_weights_in_a_pipeline_folder_take_the_schedulers_shift(tmp_path):
    import torch

    from edgec.exporters.diffusers_source import load_diffusers

    torch.manual_seed(1)
    wan = diffusers.WanTransformer3DModel(**WAN)
    wan.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0,
         "num_train_timesteps": 1000, "prediction_type": "flow_prediction"}))
    module, inputs, dims, info = load_diffusers(tmp_path / "transformer", "frames=3")
    assert info["sampling"]["shift"] == 5.0 and info["sampling"]["timestep_scale"] == 1000.0
    assert info["sampling"]["solver"] == "unipc"
    assert inputs[0].shape == (1, 4, 3, 8, 8) and info["hyperparameters"]["grid"] == [3, 4, 4]
    for name, value in wan.state_dict().items():
        assert torch.equal(module.transformer.state_dict()[name], value), name


def _wan_lora(models, seed: int, **config):
    """A LoRA trained on the tiny Wan (diffusers' own ``add_adapter``, B ≠ 0): its PEFT state
    dict and config."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel.from_pretrained(models / "wan")
    cfg = LoraConfig(init_lora_weights=False, **config)
    model.add_adapter(cfg)
    return get_peft_model_state_dict(model), cfg


def _save_wan_lora(path, layers, cfg=None):
    """What ``WanPipeline.save_lora_weights`` writes: ``pytorch_lora_weights.safetensors`` with
    ``transformer.``-prefixed keys and, given a config, its metadata header."""
    diffusers.WanPipeline.save_lora_weights(
        path, transformer_lora_layers=layers,
        **({"transformer_lora_adapter_metadata": cfg.to_dict()} if cfg is not None else {}))
    return path / "pytorch_lora_weights.safetensors"


def test_a_diffusers_lora_file_is_held_to_diffusers_own_fuse(models, tmp_path):
    """A diffusers-format LoRA file (one safetensors, the form video-DiT LoRAs are shared in;
    edgec read PEFT directories only) merges and is held to diffusers' own load and fuse of it.
    Its metadata's alpha sets the scale (without metadata: 1, diffusers' convention); a text
    encoder's weights in the same file are left out and counted."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edgec.lora import read_adapter

    layers, cfg = _wan_lora(models, 5, r=4, lora_alpha=2,
                            target_modules=["to_q", "to_v", "patch_embedding"])
    file = _save_wan_lora(tmp_path / "lora", layers, cfg)
    with safe_open(str(file), "pt") as f:
        header = f.metadata()
    tensors = {**load_file(str(file)),
               "text_encoder.encoder.block.0.q.lora_A.weight": torch.ones(4, 8),
               "text_encoder.encoder.block.0.q.lora_B.weight": torch.ones(8, 4)}
    save_file(tensors, str(file), metadata=header)
    art = edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "o",
                        config="text_len=6", lora=str(file))
    fid = art.report["fidelity"]
    assert fid["lora"]["reference"] == "diffusers fuse_lora (lora)"
    assert fid["target_vs_source"]["outputs"]["sample"]["max_rel"] <= 1e-5
    (merge,) = [p["stats"] for p in art.report["passes"] if p["name"] == "lora-merge"]
    assert merge["modules_merged"] == 5 and merge["max_abs_delta"] > 0.01
    assert merge["adapters"][0]["format"] == "diffusers"
    assert merge["adapters"][0]["ignored"] == {"text_encoder": 2}
    plain = _save_wan_lora(tmp_path / "plain", layers)  # no metadata: alpha = r
    scales = {m.scaling for m in read_adapter(file).modules.values()}
    assert scales == {0.5} and {m.scaling for m in read_adapter(plain).modules.values()} == {1.0}


def test_an_original_wan_lora_converts_as_diffusers_converts_it(models, tmp_path):
    """A Wan LoRA in the original checkpoint's key names (``diffusion_model.blocks.N.self_attn.q
    .lora_down``, bf16, an ``alpha`` per module), as ComfyUI and the Wan trainers share them."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(9)
    tensors = {}
    for name, out in (("self_attn.q", 24), ("self_attn.v", 24), ("ffn.0", 32)):
        key = f"diffusion_model.blocks.0.{name}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 24).to(torch.bfloat16)
        tensors[f"{key}.lora_up.weight"] = (0.1 * torch.randn(out, 4)).to(torch.bfloat16)
        tensors[f"{key}.alpha"] = torch.tensor(8.0 if name == "ffn.0" else 2.0)
    save_file(tensors, str(tmp_path / "wan_style.safetensors"))
    result = CliRunner().invoke(app, ["compile", str(models / "wan"), "--target", "ort-cpu",
                                      "-o", str(tmp_path / "o"), "--config", "text_len=6",
                                      "--lora", str(tmp_path / "wan_style.safetensors"),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fidelity"]["lora"]["reference"] == "diffusers fuse_lora (wan_style)"
    assert report["fidelity"]["target_vs_source"]["outputs"]["sample"]["max_rel"] <= 1e-5
    (merge,) = [p["stats"] for p in report["passes"] if p["name"] == "lora-merge"]
    assert merge["by_module_kind"] == {"proj": 1, "to_q": 1, "to_v": 1}


def test_diffusers_lora_files_swap_at_run_time(models, tmp_path):
    """Two diffusers LoRA directories compiled swappable: the artifact ships them as PEFT
    directories, and running the second equals the second merged."""
    from edgec.lora import read_adapter

    for i, alpha in enumerate((2, 8)):
        layers, cfg = _wan_lora(models, 11 + i, r=4, lora_alpha=alpha,
                                target_modules=["to_q", "to_v"])
        _save_wan_lora(tmp_path / f"style{i}", layers, cfg)
    art = edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "sw",
                        config="text_len=6", lora=[str(tmp_path / "style0"),
                                                   str(tmp_path / "style1")],
                        lora_mode="swappable")
    assert art.report["fidelity"]["lora"]["reference"] == "diffusers fuse_lora (style0)"
    shipped = read_adapter(tmp_path / "sw" / "adapters" / "style1")
    assert shipped.format == "peft" and {m.scaling for m in shipped.modules.values()} == {2.0}
    merged = edgec.compile(str(models / "wan"), target="ort-cpu", output_dir=tmp_path / "m",
                           config="text_len=6", lora=str(tmp_path / "style1"))
    session = art.load()
    got = session.run(session.default_feeds, adapter="style1")["sample"]
    want = merged.load().run(session.default_feeds)["sample"]
    base = session.run(session.default_feeds, adapter="base")["sample"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(got - base).max() > 1e-2 * np.abs(base).max()


def test_files_that_are_no_lora_are_refused(models, tmp_path):
    weights = next((models / "wan").glob("*.safetensors"))  # the model's own weights
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"\x80\x04 not loaded")
    for bad, message in ((weights, "not a LoRA"), (pickle, "a pickle, which edgec never loads")):
        result = CliRunner().invoke(app, ["compile", str(models / "wan"), "--target", "ort-cpu",
                                          "-o", str(tmp_path / "o"), "--lora", str(bad)])
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config, message", [
    ({"prediction_type": "epsilon"}, "prediction_type 'epsilon'; edgec samples CogVideoX as "
                                     "v_prediction"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2'"),
    ({"timestep_spacing": "leading", "steps_offset": 1}, "steps_offset 1 is not supported"),
    ({"snr_shift_scale": "three"}, "snr_shift_scale 'three' is not a float"),
    ({"trained_betas": [0.1]}, "trained_betas are not supported"),
    ({"_class_name": "DDIMScheduler"}, "scheduler 'DDIMScheduler'; edgec samples CogVideoX with "
                                       "CogVideoXDDIMScheduler or CogVideoXDPMScheduler"),
])
def test_a_cogvideox_scheduler_config_edgec_cannot_sample_is_refused(tmp_path, config, message):
    """Read from the pipeline folder beside the transformer, before anything is exported."""
    from edgec.exporters.diffusers_source import _with_scheduler

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        _with_scheduler(tmp_path / "transformer", {"kind": "ddim-v", "schedule": "scaled_linear",
                                                   "spacing": "trailing"})


def test_a_cogvideox_dpm_scheduler_is_what_the_artifact_samples_with(tmp_path):
    from edgec.exporters.diffusers_source import _with_scheduler
    from edgec.runtimes.sampling import SamplerSpec

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "CogVideoXDPMScheduler", "snr_shift_scale": 1.0}))
    base = {"kind": "ddim-v", "samples": {"x": "y"}, "timestep": "t", "schedule": "scaled_linear",
            "spacing": "trailing", "solver": "ddim"}
    sampling = _with_scheduler(tmp_path / "transformer", base)
    assert sampling["solver"] == "dpm"
    # an artifact written before the DPM solver existed samples with DDIM, as it did
    old = {k: v for k, v in base.items() if k != "solver"}
    assert SamplerSpec.from_manifest({"sampling": old}).solver == "ddim"


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "EulerDiscreteScheduler"}, "scheduler 'EulerDiscreteScheduler'; edgec "
                                                "samples Wan with UniPCMultistepScheduler"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": False},
     "use_flow_sigmas=False is not supported"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_type": "midpoint"},
     "solver_type 'midpoint'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True},
     "use_dynamic_shifting=True is not supported"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1}, "shift -1"),
])
def test_a_wan_scheduler_config_edgec_cannot_sample_is_refused(tmp_path, config, message):
    from edgec.exporters.diffusers_source import _with_scheduler

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        _with_scheduler(tmp_path / "transformer", {"kind": "flow"})
