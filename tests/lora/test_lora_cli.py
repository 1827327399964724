"""CLI: --lora (repeatable, DIR:WEIGHT), --lora-mode, --prune; bad adapters exit 2 in one line."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

import edgec
from edgec.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_losa_end_to_end_keeps_sparsity(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    out = tmp_path / "losa"
    r = _run("compile", "llama", "--config", "tiny", "--target", "openvino-cpu", "-o", out,
             "--prune", "2:4", "--lora", dirs["attn_mlp"], "--lora-mode", "sparse-merge",
             "--json")
    assert r.exit_code == 0, r.output
    passes = {p["name"]: p["stats"] for p in json.loads(r.stdout)["passes"]}
    assert passes["prune"]["sparsity_after"] == 0.5
    merge = passes["lora-sparse-merge"]
    assert merge["sparsity_before"] == merge["sparsity_after"] == 0.5
    assert merge["zeros_destroyed"] == 0 and merge["modules_merged"] == 14
    # compared with PEFT's merge of the unpruned base (before: with the base alone, so the
    # adapter's own effect was reported as error), approximate: pruning and the mask
    fid = json.loads(r.stdout)["fidelity"]
    assert fid["lora"]["reference"] == "peft merge_and_unload (attn_mlp)"
    assert fid["target_vs_source"]["rtol"] is None and merge["delta_masked"] > 0


def test_weighted_merge_and_bad_inputs(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    r = _run("compile", "llama", "--target", "ort-cpu", "-o", tmp_path / "w",
             "--lora", f"{dirs['attn_mlp']}:0.5", "--lora", dirs["rslora"], "--json")
    assert r.exit_code == 0, r.output
    fid = json.loads(r.stdout)["fidelity"]
    assert fid["lora"]["reference"] == "peft merge_and_unload (attn_mlp, rslora)"
    assert fid["target_vs_source"]["outputs"]["logits"]["max_rel"] <= 1e-5
    for args, message in [
        (["--lora", tmp_path / "missing"], "LoRA adapter not found"),
        (["--lora", dirs["zero"], "--lora-mode", "fused"], "unknown LoRA mode"),
        (["--lora", f"{dirs['zero']}:0.5", "--lora-mode", "swappable"], "weights"),
        (["--prune", "9:4"], "N:M"),
        # the rotation made the kept zeros dense; the report said 50% sparsity
        (["--lora", dirs["zero"], "--lora-mode", "sparse-merge", "--rotate", "hadamard"],
         "--lora-mode sparse-merge and --rotate do not combine"),
    ]:
        out = tmp_path / "bad"
        r = _run("compile", "llama", "--target", "ort-cpu", "-o", out, *args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_unaddressable_swappable_names_are_refused_before_the_export(adapter_dirs, tmp_path,
                                                                    monkeypatch):
    """'b:2' (which --adapter reads as adapter b at weight 2), 'x,y' or one name twice failed
    only after the export, at the artifact's own check ("no adapter named 'b' to blend")."""
    import shutil

    from edgec.exporters import sources

    def exported(*a, **k):
        raise AssertionError("exported before the adapter names were checked")

    monkeypatch.setattr(sources, "resolve_source", exported)
    dirs, _ = adapter_dirs
    for odd in ("b:2", "x,y"):
        shutil.copytree(dirs["zero"], tmp_path / odd)
    for loras, message in [([f"{tmp_path / 'b:2'}:1"], "'b:2' holds ':' or ','"),
                           ([tmp_path / "x,y"], "rename the adapter directory (e.g. x_y)"),
                           ([dirs["zero"], dirs["zero"]], "zero is given twice")]:
        out = tmp_path / "o"
        r = _run("compile", "llama", "--target", "ort-cpu", "-o", out, "--lora-mode",
                 "swappable", *(a for p in loras for a in ("--lora", p)))
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_run_and_bench_choose_the_adapter(adapter_dirs, tmp_path):
    dirs, _ = adapter_dirs
    out = tmp_path / "swap"
    r = _run("compile", "llama", "--target", "ort-cpu", "-o", out, "--lora", dirs["attn_mlp"],
             "--lora", dirs["rslora"], "--lora-mode", "swappable")
    assert r.exit_code == 0, r.output
    means = {}
    for name in ("base", "attn_mlp", "rslora"):
        run = json.loads(_run("run", out, "--adapter", name, "--json").stdout)
        assert run["adapter"] == name
        means[name] = run["outputs"]["logits"]["mean"]
    assert len(set(means.values())) == 3  # three different models from one artifact
    bench = json.loads(_run("bench", out, "--adapter", "rslora", "--iterations", "2",
                            "--warmup", "0", "--json").stdout)
    assert bench["iterations"] == 2 and bench["adapter"] == "rslora"  # it recorded none
    # an adapter directory not compiled in is loaded (the error pointed at load_adapter); the
    # all-zero one is the base model
    run = json.loads(_run("run", out, "--adapter", dirs["zero"], "--json").stdout)
    assert run["adapter"] == str(dirs["zero"])
    assert run["outputs"]["logits"]["mean"] == means["base"]
    # compare had no --adapter: both artifacts ran their default
    cmp = json.loads(_run("compare", out, out, "--adapter", "rslora", "--json").stdout)
    assert cmp["adapters"] == ["rslora", "rslora"] and cmp["outputs"]["logits"]["max_abs"] == 0
    r = _run("run", out, "--adapter", "attn_mlp:nan")  # exit 0 with all-NaN logits
    assert r.exit_code == 2 and "'nan' of 'attn_mlp' is not a finite number" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run("run", out, "--adapter", "nope")
    assert r.exit_code == 2 and "no adapter named 'nope'" in r.stderr
    # the CLI's advice is its own option, not the Python API the command line cannot call
    assert "--adapter ./DIR" in r.stderr and "load_adapter" not in r.stderr
    r = _run("run", out, "--adapter", "nope:0.5,rslora:0.5")
    assert r.exit_code == 2 and "'nope' to blend" in r.stderr and "--adapter ./DIR" in r.stderr
    # inspect read every fidelity entry as measured outputs: KeyError on LoRA artifacts
    info = json.loads(_run("inspect", out, "--json").stdout)
    assert info["lora"]["mode"] == "swappable"
    assert info["fidelity"]["target_vs_source"]["max_rel"] < 1e-4
    assert _run("inspect", out).exit_code == 0
    blend = json.loads(_run("run", out, "--adapter", "attn_mlp:1,rslora:0", "--json").stdout)
    assert abs(blend["outputs"]["logits"]["mean"] - means["attn_mlp"]) <= 1e-5 * max(
        1.0, abs(means["attn_mlp"]))
    r = _run("run", out, "--adapter", "attn_mlp:0.5,rslora:x")
    assert r.exit_code == 2 and "weight 'x' of 'rslora' is not a number" in r.stderr


def test_an_onnx_source_merge_says_what_it_is_held_to(adapter_dirs, tmp_path):
    """An .onnx has no PyTorch module for PEFT to merge into: the row compared the merged graph
    with the source without the adapter and read "onnxruntime vs onnxruntime", as if the merge
    were that inexact; it says what the reference is now."""
    dirs, merged = adapter_dirs
    assert _run("export", "llama", "-o", tmp_path / "l.onnx").exit_code == 0
    art = edgec.compile(str(tmp_path / "l.onnx"), target="ort-cpu", output_dir=tmp_path / "o",
                        lora=[str(dirs["attn_mlp"])])
    tvs = art.report["fidelity"]["target_vs_source"]
    assert tvs["reference"].startswith("onnxruntime without the adapters")
    assert art.manifest["lora"]["reference"].startswith("none: the source is ONNX")
    ids = art.load().default_feeds["input_ids"]  # and the merge itself equals PEFT's
    import torch

    with torch.no_grad():
        want = merged["attn_mlp"](torch.from_numpy(ids)).numpy()
    got = art.load().run({"input_ids": ids})["logits"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
