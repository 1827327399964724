"""Samplers in the runtime wrapper: each sampler is exact on a model whose prediction is exact,
guidance batched equals guidance in two runs, the dense-then-sparse schedule, the CLI."""

import json
import re
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.errors import UserError
from edgec.exporters.export_file import export_to_file
from edgec.exporters.sources import resolve_source
from edgec.runtimes import IOSpec
from edgec.runtimes.sampling import (
    check_inputs,
    denoise,
    fit_with_prior,
    flow_sigmas,
    sample,
    subvp,
)

X0 = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(2, 6)
SPREAD = 0.0  # the score oracle's data spread (a point mass makes Euler–Maruyama stiff)


class Oracle:
    """A 'denoiser' that knows the data is the single point X0 (conditioned by ``c``): its
    prediction is exact, so a correct sampler lands on X0 (+ c) from any noise."""

    def __init__(self, kind, batch_dim="batch", spec=None):
        self.kind, self.calls, self.batches = kind, 0, []
        self.manifest = {"sampling": {"kind": kind, "samples": {"x": "y"}, "timestep": "t",
                                      "timestep_scale": 1000.0 if kind == "flow" else 1.0,
                                      "conditions": ["c"], "guidance": 3.0, "steps": 8,
                                      "train_steps": 1000, "shift": 3.0, **(spec or {})}}
        self.inputs = [IOSpec("x", [batch_dim, 6], "float32"), IOSpec("t", [batch_dim], "float32"),
                       IOSpec("c", [batch_dim, 6], "float32")]
        self.default_feeds = {"x": np.zeros((2, 6), np.float32), "c": np.ones((2, 6), np.float32),
                              "t": np.zeros(2, np.float32)}

    def run(self, feeds):
        self.calls += 1
        self.batches.append(len(feeds["x"]))
        x, t, target = feeds["x"], feeds["t"][:, None], np.tile(X0, (len(feeds["x"]) // 2, 1))
        target = target + feeds["c"]
        if self.kind == "flow":  # x = (1-σ)·x0 + σ·ε, v = ε − x0
            sigma = t / 1000.0
            eps = (x - (1 - sigma) * target) / np.maximum(sigma, 1e-12)
            return {"y": eps - target}
        if self.kind == "ddim-x0":
            return {"y": target}
        spec = edgec.runtimes.sampling.SamplerSpec.from_manifest(self.manifest)
        _, alpha, std = zip(*(subvp(float(ti), spec) for ti in t[:, 0]))
        alpha, std = np.array(alpha)[:, None], np.array(std)[:, None]
        var = alpha ** 2 * SPREAD ** 2 + std ** 2  # data N(target, SPREAD²): p_t is Gaussian
        score = -(x - alpha * target) / var
        return {"y": -std * score if spec.prediction == "noise" else score}


@pytest.mark.parametrize("kind, solver", [("flow", None), ("flow", "flowmatch"),
                                          ("flow", "unipc"), ("ddim-x0", None)])
def test_an_exact_model_samples_its_data_point(kind, solver):
    sess = Oracle(kind)
    out = sample(sess, guidance=1.0, seed=3, solver=solver)
    # UniPC feeds σ·1000 truncated to an integer (as diffusers' Wan pipeline): the oracle then
    # predicts at a slightly different σ than the solver steps from
    np.testing.assert_allclose(out["x"], X0 + 1.0, atol=5e-3 if solver == "unipc" else 1e-4)
    assert sess.last_sampling["model_runs"] == sess.calls == 8
    assert sess.last_sampling["solver"] == (solver or "euler" if kind == "flow" else None)


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_sde_sampler_draws_the_data_distribution(monkeypatch, prediction):
    monkeypatch.setitem(globals(), "SPREAD", 0.3)
    sess = Oracle("score", spec={"steps": 200, "prediction": prediction})
    c = np.ones((1000, 6), np.float32)  # 1000 draws of N(X0 + 1, 0.3²)
    x = sample(sess, {"c": c}, guidance=1.0, seed=0)["x"].reshape(500, 2, 6)
    np.testing.assert_allclose(x.mean(0), X0 + 1.0, atol=0.05)
    np.testing.assert_allclose(x.std(0), 0.3, rtol=0.15)


def test_guidance_pair_batched_equals_two_runs():
    a, b = Oracle("flow"), Oracle("flow", batch_dim=2)  # static batch 2: no room for the pair
    xa, xb = sample(a, seed=1, guidance_mode="batch"), sample(b, seed=1)
    assert a.batches == [4] * 8 and a.last_sampling["guidance_batched"]
    assert b.batches == [2] * 16 and not b.last_sampling["guidance_batched"]
    with pytest.raises(UserError, match="static"):
        sample(b, guidance_mode="batch")
    np.testing.assert_allclose(xa["x"], xb["x"], rtol=1e-5, atol=1e-5)
    # guidance extrapolates away from the unconditional (c = 0) point: X0 + g·c
    np.testing.assert_allclose(xa["x"], X0 + 3.0, atol=1e-4)


@pytest.mark.parametrize("guidance", [0.0, 0.5, -2.0])
def test_guidance_of_1_or_less_samples_the_conditional_alone(guidance):
    """As diffusers' pipelines (``guidance_scale > 1``): no unconditional half below 1 (0 sampled
    the unconditional point, the conditions ignored; 0.5 interpolated)."""
    sess = Oracle("flow")
    out = sample(sess, guidance=guidance, seed=3)
    np.testing.assert_allclose(out["x"], X0 + 1.0, atol=1e-4)
    assert sess.calls == 8 and sess.last_sampling["guidance_mode"] is None
    neg = {"c": np.zeros((2, 6), np.float32)}
    with pytest.raises(UserError, match=f"guidance is {guidance:g}: give a guidance scale "
                                        "above 1"):
        sample(sess, negative=neg, guidance=guidance)
    with pytest.raises(UserError, match="used by guidance, which runs above 1"):
        check_inputs(sess, negative=neg, guidance=guidance)


class TwoConditions(Oracle):
    """The oracle with a second condition ``d`` (reactive-dance's leader and music)."""

    def __init__(self, batch_dim="batch"):
        super().__init__("ddim-x0", batch_dim, spec={"conditions": ["c", "d"]})
        self.inputs.append(IOSpec("d", [batch_dim, 3], "float32"))
        self.default_feeds["d"] = np.ones((2, 3), np.float32)


def test_conditions_of_the_wrong_batch_are_named():
    """A condition given at batch 1 beside the example's batch-2 one was refused naming the
    noisy sample the sampler makes ("inputs 'latent' and 'music' share dim 'batch'"), and on a
    static-batch graph "input 'latent' has shape [1, ...], the model wants [2, ...]"."""
    one = {"c": np.ones((1, 6), np.float32)}
    for check in (sample, check_inputs):
        with pytest.raises(UserError, match=r"^condition 'c' \(given\) has batch 1, but "
                                            r"condition 'd' \(the artifact's example\) has "
                                            "batch 2; give both for the same number"):
            check(TwoConditions(), one, steps=2)
        with pytest.raises(UserError, match=r"^condition 'c' \(given\) has batch 1, but this "
                                            "artifact's graph takes a static batch of 2; give "
                                            "conditions of batch 2$"):
            check(TwoConditions(batch_dim=2), {**one, "d": np.ones((1, 3), np.float32)}, steps=2)
    both = {"c": np.ones((4, 6), np.float32), "d": np.ones((4, 3), np.float32)}
    assert sample(TwoConditions(), both, steps=2)["x"].shape == (4, 6)


class Slow(Oracle):
    """An oracle whose runs cost ``ms[rows]`` milliseconds."""

    def __init__(self, ms):
        super().__init__("flow")
        self.ms = ms

    def run(self, feeds):
        time.sleep(self.ms[len(feeds["x"])] / 1e3)
        return super().run(feeds)


@pytest.mark.parametrize("ms,chosen", [({4: 40, 2: 2}, "split"), ({4: 4, 2: 30}, "batch")])
def test_auto_guidance_times_both_forms_on_real_steps_and_keeps_the_faster(ms, chosen):
    sess = Slow(ms)
    x = sample(sess, seed=1)
    # steps 0-5 probe (batch, split, ×3); steps 6-7 run the faster form
    per_step = [4, 2, 2] * 3 + ([4] * 2 if chosen == "batch" else [2] * 4)
    assert sess.batches == per_step and sess.last_sampling["guidance_mode"] == chosen
    probe = sess.last_sampling["guidance_probe_ms"]["main"]
    assert probe["chosen"] == chosen and probe["batch_ms"] > 0 and probe["split_ms"] > 0
    np.testing.assert_allclose(x["x"], X0 + 3.0, atol=1e-4)  # the same samples either way
    sess.batches = []
    sample(sess, seed=1, steps=2)  # the session remembers its choice: no second probe
    assert sess.batches == ([4] * 2 if chosen == "batch" else [2] * 4)
    with pytest.raises(UserError, match="guidance_mode='both'"):
        sample(sess, guidance_mode="both")
    with pytest.raises(UserError, match="guidance=nan: give a finite number"):
        sample(sess, guidance=float("nan"))  # sampled NaN with exit 0 before


class Shared(Slow):
    """A batch-faster oracle whose graph (as share=batch sparse attention does) lets batch row 0
    steer every row: a batched guidance pair differs from two runs."""

    def __init__(self, ms):
        super().__init__(ms)
        self.manifest["passes"] = [{"name": "sparse-attention", "stats": {
            "sites_approximate": 2, "config": {"share": "batch"}}}]

    def run(self, feeds):
        out = super().run(feeds)
        return {"y": out["y"] + 0.1 * feeds["c"][:1]}


def test_auto_guidance_on_a_batch_shared_sparse_graph_runs_split_untimed(caplog):
    """share=batch: 'auto' timed batch vs split and kept the faster, so the samples changed
    from run to run with the CPU's timing."""
    sess = Shared({4: 1, 2: 30})  # batch is much faster: timing would keep it
    first = sample(sess, seed=3, steps=4)
    assert sess.batches == [2] * 8 and sess.last_sampling["guidance_mode"] == "split"
    assert "share=batch" in sess.last_sampling["guidance_mode_reason"]
    assert sess.last_sampling["guidance_probe_ms"] == {}
    again = sample(sess, seed=3, steps=4)
    np.testing.assert_array_equal(first["x"], again["x"])
    split = sample(Shared({4: 1, 2: 1}), seed=3, steps=4, guidance_mode="split")
    np.testing.assert_array_equal(first["x"], split["x"])
    with caplog.at_level("WARNING"):
        batched = sample(sess, seed=3, steps=4, guidance_mode="batch")  # asked for: warned
    assert sess.batches[-4:] == [4] * 4 and "samples differ from 'split'" in caplog.text
    assert not np.allclose(batched["x"], first["x"], atol=1e-3)


def test_flow_sigmas_are_shifted_and_end_at_zero():
    s = flow_sigmas(4, shift=3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    assert s[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_one_step_prior_denoise_and_fit(prediction):
    """A score-kind model outputs the score, or ε̂ = −σ(t)·score (pose-prior) that the sampler
    divides by σ(t)."""
    sess = Oracle("score", spec={"prediction": prediction})
    x0_hat, weight = denoise(sess, np.zeros((2, 6), np.float32) + X0 + 1.0, 0.1,
                             np.random.default_rng(0))
    np.testing.assert_allclose(x0_hat, X0 + 1.0, atol=1e-4)  # Tweedie with the exact score
    assert weight > 1.0
    known = np.zeros((2, 6), bool)
    known[:, :3] = True  # half observed: the prior completes the rest
    observed = np.where(known, X0 + 1.0, 5.0).astype(np.float32)
    fit = fit_with_prior(sess, observed, known, iterations=60, lr=0.1)
    np.testing.assert_allclose(fit, X0 + 1.0, atol=1e-2)
    # NaN marking the unknown entries (all-NaN output before: 0·NaN in the data term)
    missing = np.where(known, observed, np.nan).astype(np.float32)
    np.testing.assert_array_equal(fit_with_prior(sess, missing, known, iterations=60, lr=0.1),
                                  fit)
    for kwargs, message in ((dict(t_range=(0.1, 0.0)), r"t=0.0: the sub-VP SDE's time"),
                            (dict(lr=float("nan")), "lr=nan: give a finite number"),
                            (dict(iterations=0), "iterations=0: give an integer ≥ 1")):
        with pytest.raises(UserError, match=message):
            fit_with_prior(sess, observed, known, **kwargs)
    with pytest.raises(UserError, match="observed holds NaN or inf where known is True"):
        fit_with_prior(sess, missing, None)


def test_bad_sampling_requests():
    sess = Oracle("flow")
    with pytest.raises(UserError, match="unknown input 'text'"):
        sample(sess, {"text": np.zeros(1)})
    with pytest.raises(UserError, match="at least one"):
        sample(sess, steps=0)
    # 10**11 steps was a MemoryError (exit 1) allocating the σ grid; DDIM repeated timesteps
    with pytest.raises(UserError, match="flow sampler takes at most 10000 steps"):
        sample(sess, steps=10**11)
    with pytest.raises(UserError, match="ddim-x0 sampler takes at most 1000 steps"):
        sample(Oracle("ddim-x0"), steps=1001)
    with pytest.raises(UserError, match="dense_steps needs"):
        sample(sess, dense_steps=2)
    # a VAE artifact was told to "compile it again", which cannot give it a sampler
    from edgec.runtimes.sampling import SamplerSpec

    with pytest.raises(UserError, match="score prediction 'x0' unknown; upgrade edgec"):
        sample(Oracle("score", spec={"prediction": "x0"}))

    with pytest.raises(UserError, match="AutoencoderKLWan artifact is not a denoiser; .*--vae"):
        SamplerSpec.from_manifest({"source": {"kind": "diffusers",
                                              "class": "AutoencoderKLWan"}})
    # named the timestep input the sampler makes ("'x' and 't' share dim 'batch'")
    with pytest.raises(UserError, match=r"noise 'x' has batch 1, but condition 'c' \(the "
                                        r"artifact's example\) has batch 2"):
        sample(sess, noise={"x": np.zeros((1, 6), np.float32)})
    # each of these was dropped or ignored (exit 0), sampled NaN, or an internal error
    with pytest.raises(UserError, match="'x' is the noisy sample, not a condition; .*noise="):
        sample(sess, {"x": np.zeros((2, 6), np.float32)})
    with pytest.raises(UserError, match="'t' is the model's timestep input"):
        sample(sess, {"t": np.zeros(2, np.float32)})
    with pytest.raises(UserError, match="condition 'c' holds NaN or inf"):
        sample(sess, {"c": np.full((2, 6), np.nan, np.float32)})
    with pytest.raises(UserError, match="seed=-1: give a non-negative integer"):
        sample(sess, seed=-1)
    with pytest.raises(UserError, match="a flow artifact samples with one of: euler, flowmatch"):
        sample(sess, solver="dpm")
    with pytest.raises(UserError, match=r"sampler \(ddim-x0\) has one solver"):
        sample(Oracle("ddim-x0"), solver="ddim")
    with pytest.raises(UserError, match="no conditions to guide; give 1 or less"):
        sample(Oracle("flow", spec={"conditions": []}), guidance=2.0)
    assert sample(Oracle("flow", spec={"conditions": []}), guidance=1.0)["x"].shape == (2, 6)
    # 1 or less is no guidance on every artifact (it was refused here, "must be 1")
    assert sample(Oracle("flow", spec={"conditions": []}), guidance=0.5)["x"].shape == (2, 6)
    # noise a typo dropped (random noise ran), NaN noise, steps int() truncated, a raw
    # ValueError from float('abc') or from numpy's broadcast of a prediction of another shape
    with pytest.raises(UserError, match="noise 'z' is not a sample input .*inputs are: x$"):
        sample(sess, noise={"z": np.zeros((2, 6), np.float32)})
    with pytest.raises(UserError, match="noise 'x' holds NaN or inf"):
        sample(sess, noise={"x": np.full((2, 6), np.inf, np.float32)})
    for bad in (2.7, True):
        with pytest.raises(UserError, match=f"steps={bad}: give a whole number"):
            sample(sess, steps=bad)
    with pytest.raises(UserError, match="dense_steps=1.5: give a whole number"):
        sample(sess, dense_steps=1.5)
    with pytest.raises(UserError, match="guidance='abc': give a number"):
        sample(sess, guidance="abc")
    patchy = Oracle("flow")  # a model that maps its sample to a smaller one (odd H/W, patch 2)
    patchy.run = lambda feeds: {"y": np.zeros((len(feeds["x"]), 4), np.float32)}
    with pytest.raises(UserError, match=re.escape(
            "sample 'x' has shape [2, 6] but the model's prediction 'y' has [2, 4]")):
        sample(patchy, noise={"x": np.zeros((2, 6), np.float32)}, steps=1)
    # negatives where guidance does not run were ignored
    neg = {"c": np.zeros((2, 6), np.float32)}
    with pytest.raises(UserError, match="negative conditions are used by guidance, which runs "
                                        "above 1; guidance is 1: give a guidance scale above 1"):
        sample(sess, negative=neg, guidance=1.0)
    with pytest.raises(UserError, match=r"guidance is 1 \(the artifact's default\)"):
        sample(Oracle("flow", spec={"guidance": 1.0}), negative=neg)
    assert sample(sess, negative=neg, steps=1)["x"].shape == (2, 6)  # the default, 3, guides
    # check_inputs (the CLI's, before its progress bar) checks what sample refuses on its own
    with pytest.raises(UserError, match="guidance_mode='batch' needs .* static"):
        check_inputs(Oracle("flow", batch_dim=2), guidance_mode="batch")
    check_inputs(Oracle("flow", batch_dim=2), guidance=1.0, guidance_mode="batch")  # no pair
    with pytest.raises(UserError, match="dynamic_cfg is CogVideoX's"):
        check_inputs(sess, dynamic_cfg=True)
    with pytest.raises(UserError, match="ddim-x0 sampler takes at most 1000 steps"):
        check_inputs(Oracle("ddim-x0"), steps=1001)  # the CLI showed its progress bar first
    sess.manifest = {"source": {"name": "llama"}}
    with pytest.raises(UserError, match="llama is not a diffusion model"):
        sample(sess)


@pytest.fixture(scope="module")
def sparse_dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    dense = edgec.compile("video-dit", target="ort-cpu", output_dir=root / "dense", config="tiny")
    sparse = edgec.compile("video-dit", target="ort-cpu", output_dir=root / "sparse",
                           config="tiny",
                           sparse_attention="keep=0.5,block=8,min_seq=0,dense_steps=2")
    return dense, sparse


def test_dense_steps_switch_graphs(sparse_dit):
    dense, sparse = sparse_dit
    entry = sparse.manifest["runtime"]["dense"]
    assert entry["steps"] == 2 and (sparse.path / entry["model"]).is_file()
    assert sparse.report["fidelity"]["dense_graph_vs_source"]["outputs"]["output"]["cosine"] > (
        0.99999)
    ref = edgec.load(dense.path).sample(steps=4, seed=0)["latent"]
    sess = edgec.load(sparse.path)
    all_dense = sess.sample(steps=4, seed=0, dense_steps=4)["latent"]
    np.testing.assert_allclose(all_dense, ref, rtol=1e-5, atol=1e-5)
    scheduled = sess.sample(steps=4, seed=0)["latent"]
    assert sess.last_sampling["dense_steps"] == 2
    assert not np.allclose(scheduled, ref, atol=1e-4)  # the last two steps ran sparse
    cos = float((scheduled * ref).sum() / np.linalg.norm(scheduled) / np.linalg.norm(ref))
    assert cos > 0.95


def test_cli_sample(sparse_dit, tmp_path):
    dense, _ = sparse_dit
    runner = CliRunner()
    result = runner.invoke(app, ["sample", str(dense.path), "--steps", "3", "--json",
                                 "--guidance-mode", "batch",
                                 "--save", str(tmp_path / "x.npz")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 3 and data["model_runs"] == 3 and data["guidance_batched"]
    assert np.load(tmp_path / "x.npz")["latent"].shape == tuple(data["samples"]["latent"]["shape"])
    result = runner.invoke(app, ["sample", str(dense.path), "--dense-steps", "2"])
    assert result.exit_code == 2 and "dense_steps needs" in result.stderr
    assert result.stderr.count("\n") == 1  # refused before the progress bar showed 0/N
    result = runner.invoke(app, ["sample", str(dense.path), "--guidance-mode", "foo"])
    assert result.exit_code == 2 and result.stderr.startswith("error: guidance_mode='foo'")
    feeds = np.load(dense.path / "example_inputs.npz")
    np.savez(tmp_path / "neg.npz", text=feeds["text"])
    np.savez(tmp_path / "noise.npz", latent=feeds["latent"])
    for args, said in [(["--dynamic-cfg"], "dynamic_cfg is CogVideoX's"),  # after the bar
                       (["--guidance", "1", "--negative", str(tmp_path / "neg.npz")],
                        "negative conditions are used by guidance, which runs above 1; "
                        "guidance is 1"),
                       (["--inputs", str(dense.path / "example_inputs.npz")],  # the default,
                        "'latent' is the noisy sample, not a condition; give its starting "
                        "noise with --noise FILE.npz")]:  # given: refused pointing nowhere
        result = runner.invoke(app, ["sample", str(dense.path), "--steps", "2", *args])
        assert result.exit_code == 2 and said in result.stderr, result.output
        assert result.stderr.count("\n") == 1  # before the progress bar
    result = runner.invoke(app, ["sample", str(dense.path), "--steps", "10001"])
    assert result.exit_code == 2 and "takes at most 10000 steps" in result.stderr
    assert result.stderr.count("\n") == 1  # the bar showed 0/10001 before the refusal
    result = runner.invoke(app, ["sample", str(dense.path), "--steps", "1", "--guidance", "1",
                                 "--noise", str(tmp_path / "noise.npz"),
                                 "--save", str(tmp_path / "n.npz")])
    assert result.exit_code == 0, result.output
    ref = edgec.load(dense.path).sample(steps=1, guidance=1.0, noise={"latent": feeds["latent"]})
    np.testing.assert_array_equal(np.load(tmp_path / "n.npz")["latent"], ref["latent"])


def test_sparse_artifact_declares_and_checks_the_shapes_it_runs(sparse_dit, tmp_path):
    """The rewrite baked video-dit tiny's 2x4x4 grid and 8 text tokens in: those dims are static
    in the manifest, and other shapes are refused in one line (they failed inside ORT, exit 1,
    with the dims still declared dynamic); the dense artifact still takes them."""
    dense, sparse = sparse_dit
    shapes = {i["name"]: i["shape"] for i in sparse.manifest["inputs"]}
    assert shapes == {"latent": ["batch", 4, 2, 8, 8], "timestep": ["batch"],
                      "text": ["batch", 8, 32]}
    sess = edgec.load(sparse.path)
    feeds = sess.default_feeds
    short = {**feeds, "text": feeds["text"][:, :3]}
    longer = {**feeds, "latent": np.concatenate([feeds["latent"]] * 2, axis=2)}
    assert edgec.load(dense.path).run(longer)["output"].shape == longer["latent"].shape
    with pytest.raises(UserError, match=re.escape(
            "input 'text' has shape [2, 3, 32], the model wants ['batch', 8, 32]: its sparse "
            "attention was compiled for a 2x4x4 token grid and 8 prefix tokens (frames=2, "
            "height=8, width=8, text_len=8); recompile it for the shape you need")):
        sess.run(short)
    with pytest.raises(UserError, match="input 'text' has shape"):  # before any step runs
        sess.sample(conditions={"text": short["text"]}, steps=4)
    assert getattr(sess, "dense_session", None) is None  # the dense graph's steps did not run
    np.savez(tmp_path / "f.npz", **longer)
    result = CliRunner().invoke(app, ["run", str(sparse.path), "--inputs", str(tmp_path / "f.npz")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "input 'latent' has shape [2, 4, 4, 8, 8]" in (
        result.stderr)
    np.savez(tmp_path / "cond.npz", text=short["text"])
    result = CliRunner().invoke(app, ["sample", str(sparse.path), "--steps", "2",
                                      "--inputs", str(tmp_path / "cond.npz")])
    assert result.exit_code == 2, result.output  # one line: no progress bar before it
    assert result.stderr.count("\n") == 1 and "input 'text' has shape" in result.stderr


def test_more_dense_steps_than_steps_run_every_step_dense(sparse_dit):
    dense, sparse = sparse_dit
    sess = edgec.load(sparse.path)
    out = sess.sample(steps=2, seed=0, dense_steps=10)["latent"]
    assert sess.last_sampling["dense_steps"] == 2  # clamped: it reported 10
    ref = edgec.load(dense.path).sample(steps=2, seed=0)["latent"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="dense_steps=-1: give 0 or more dense steps"):
        sess.sample(steps=2, dense_steps=-1)


def test_no_dense_companion_when_no_site_was_rewritten(monkeypatch):
    """video-dit tiny's 40-token sequence < min_seq 256: 0/2 sites rewritten, yet dense.onnx was
    built and run for the first dense_steps (a second copy of the same dense graph)."""
    from edgec import pipeline
    from edgec.graph_passes._infra import PassRecord
    from edgec.recipe import Recipe
    from edgec.report import _sites_line

    recipe = Recipe.parse("ort-cpu", sparse_attention="keep=0.5,dense_steps=2,block=16")
    stats = {"sites_found": 2, "sites_rewritten": 0, "skipped_reasons": {
        "sequence 40 at the example inputs < min_seq 256": 2}, "config": {"dense_steps": 2}}
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: pytest.fail("built a dense graph"))
    records = [PassRecord("sparse-attention", False, 0.0, stats)]
    assert pipeline._dense_graph("video-dit", recipe, None, None, None, print, None,
                                 records) is None
    assert _sites_line(stats).endswith("min_seq 256 ×2; dense_steps=2 has no effect: every step "
                                       "runs this dense graph (no dense companion built)")


@pytest.mark.parametrize("model,kind", [("reactive-dance", "ddim-x0"), ("pose-prior", "score")])
def test_reference_diffusion_models_sample(tmp_path, model, kind):
    art = edgec.compile(model, target="ort-cpu", output_dir=tmp_path / "o", config="tiny")
    sess = edgec.load(art.path)
    assert sess.manifest["sampling"]["kind"] == kind
    steps = []
    out = sess.sample(steps=3, seed=0, callback=lambda i, n: steps.append((i, n)))
    (name, x), = out.items()
    assert steps == [(1, 3), (2, 3), (3, 3)] and np.isfinite(x).all()
    assert x.shape == sess.default_feeds[name].shape
    assert sess.last_sampling["model_runs"] == (4 if kind == "ddim-x0" else 3)  # auto guidance:
    assert sess.last_sampling["guidance_mode"] == ("batch" if kind == "ddim-x0" else None)  # b,s,b
    if kind == "score":  # a batch other than the example's, from the noise alone (no
        # condition to take it from: "inputs 'pose' and 't' share dim 'batch' but have sizes
        # 7 and 4")
        noise = np.random.default_rng(1).standard_normal((7, *x.shape[1:])).astype(np.float32)
        check_inputs(sess, noise={name: noise})
        assert sess.sample(steps=1, noise={name: noise})[name].shape == noise.shape
    if kind == "score":  # the sampler survives `edgec export` and the artifact's model.onnx
        # (TensorRT's note: compile it on a GPU machine); compiled from either .onnx, the
        # artifact was "not a diffusion model"
        export_to_file(model, tmp_path / "m.onnx", config="tiny")
        for onnx in (tmp_path / "m.onnx", art.path / "model.onnx"):
            again = resolve_source(onnx)
            assert again.info["sampling"] == sess.manifest["sampling"]
            # ... at the example's sizes (every dynamic dim was 1: a batch of one pose)
            assert {k: v.shape for k, v in again.feeds.items()} == {
                k: v.shape for k, v in sess.default_feeds.items()}
    if kind == "score":  # the prior completes a half-observed pose and keeps the observed half
        pose = sess.default_feeds["pose"]
        known = np.zeros_like(pose, bool)
        known[:, :63] = True  # the body observed, hands and face from the prior
        fit = fit_with_prior(sess, pose, known, iterations=20)
        assert np.isfinite(fit).all()
        # random weights: the prior pulls against the data term, so only loosely held
        assert np.abs(fit[:, :63] - pose[:, :63]).mean() < 0.5 * np.abs(pose[:, :63]).mean()
        assert np.abs(fit[:, 63:]).mean() > 0.01  # the unobserved parts were filled in


def test_joint_video_motion_sampling_with_sparse_tail(tmp_path):
    """motion-dit: two noisy inputs sampled together; its 255 motion tokens are the sparse
    pass's dense tail after the video grid (filled from the model)."""
    art = edgec.compile("motion-dit", target="ort-cpu", output_dir=tmp_path / "o", config="tiny",
                        sparse_attention="keep=0.5,block=4,min_seq=0")
    options = art.manifest["recipe"]["options"]["sparse-attention"]
    assert options["tail"] == 255 and options["tail_mode"] == "dense"
    assert options["grid"] == [2, 2, 2]
    sess = edgec.load(art.path)
    out = sess.sample(steps=2, seed=0)
    assert set(out) == {"video", "motion"}
    assert out["motion"].shape == sess.default_feeds["motion"].shape
    assert all(np.isfinite(x).all() for x in out.values())


def test_a_vae_is_checked_against_the_latents_before_sampling():
    """A CogVideoX VAE compiled at other sizes was refused after every step had run, advising
    `--config batch=,frames=,height=,width=` with the values left out."""
    from edgec.runtimes.base import IOSpec
    from edgec.runtimes.video import check_vae

    class Vae:
        manifest = {"source": {"vae": {"style": "cogvideox", "scaling_factor": 0.7}}}
        inputs = [IOSpec("latents", [1, 4, 2, 8, 8], "float32")]

    den = type("Den", (), {"manifest": {"source": {"class": "CogVideoXTransformer3DModel"}}})
    check_vae(Vae(), (1, 2, 4, 8, 8), den())  # [B, F, C, H, W] as the denoiser samples
    with pytest.raises(UserError, match=r"compile the VAE with --config "
                                        r"batch=1,frames=3,height=8,width=8$"):
        check_vae(Vae(), (1, 3, 4, 8, 8), den())
    wan = type("Den", (), {"manifest": {"source": {"class": "WanTransformer3DModel"}}})
    with pytest.raises(UserError, match="a cogvideox VAE cannot decode WanTransformer3DModel"):
        check_vae(Vae(), (1, 2, 4, 8, 8), wan())
