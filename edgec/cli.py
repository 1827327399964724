"""The ``edgec`` command: models, export, compile, calibrate, run, bench, compare, inspect.

Exit status: 0 ok, 2 user error (one line on stderr saying what and what to do), 1 internal.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgec.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="edgec — export PyTorch models to ONNX, rewrite them with checked passes, "
                       "and build them for edge targets (ort-cpu, openvino-cpu, qnn-htp, "
                       "tensorrt).")
# No markup or emoji codes: messages carry what users typed (paths, option values), and
# "ad/a:abc:" printed an emoji, "[red]" vanished, "nope[/x]" raised a MarkupError.
out = Console(soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, log_path=False, markup=False, emoji=False)


def _errors(fn):
    """Turn UserError into one stderr line + exit 2, anything else into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(Text("error:", style="red"), str(e), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (``_Terminated``)
            raise typer.Exit(143 if isinstance(e, _Terminated) else 130) from None
        except Exception as e:  # noqa: BLE001 — the CLI boundary
            if os.environ.get("EDGEC_DEBUG"):
                raise
            err.print(Text("internal error:", style="red"), f"{type(e).__name__}: {e} "
                      "(set EDGEC_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_json(data: Any) -> None:
    """Strict JSON: a NaN or inf (a model's output statistic) is null, not Python's bare NaN,
    which JSON parsers other than Python's refuse."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _load_npz(path: Path | None) -> dict | None:
    if path is None:
        return None
    from edgec.npz_read import load_npz

    return load_npz(path, "no such inputs file; give an .npz whose keys are input names",
                    "save inputs with numpy.savez(path, name=array, ...)")


def _check_save(path: Path | None, suffix: str = ".npz", flag: str = "--save") -> None:
    """Refuse a --save path before the run: numpy wrote "y.txt" as y.txt.npz and a directory
    "out" as out.npz without a word, and a missing parent failed after a whole sampling run."""
    if path is None:
        return
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: give a file name ending in {suffix}")
    if path.is_dir():  # an IsADirectoryError after the whole run
        raise UserError(f"{flag} {path}: is a directory; give a file name, e.g. "
                        f"{path / ('out' + suffix)}")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: no directory {path.parent}; create it first")
    probe = path.with_name(f".{path.name}.partial")  # what the write goes through
    try:  # a folder nothing can be written to failed with exit 1 after the whole run
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose "
                        "another path") from None


def _feeds(session, inputs: Path | None) -> dict:
    feeds = _load_npz(inputs)
    if feeds is None:
        feeds = session.default_feeds
        if feeds is None:
            raise UserError("the artifact has no example inputs; pass --inputs FILE.npz")
    return feeds


_INPUTS_HELP = ".npz keyed by input name"
def _adapter_used(session, spec: str | None):
    """What --json records: --adapter as given, else the artifact's default (None: no
    swappable adapters)."""
    return spec if spec is not None else session.active_adapter


_ADAPTER_HELP = ("swappable-LoRA artifacts: adapter name to run ('base' = none), a weighted blend "
                 "of them (a:0.7,b:0.3), or an adapter directory not compiled in (loaded as "
                 "Session.load_adapter does)")


def _use_adapter(session, spec: str | None) -> None:
    """--adapter: make ``spec`` the session's active adapter; a path that is not one of the
    artifact's adapter names is loaded first (the error used to point at load_adapter, which the
    CLI had no way to call)."""
    if spec is None:
        return
    from edgec.lora.binding import LOAD_HINT

    if spec not in session.adapters and Path(spec).exists():
        spec = session.load_adapter(spec)
    try:
        session.active_adapter = spec  # refuses an artifact without swappable adapters
    except UserError as e:  # the Python advice (Session.load_adapter) is no use here
        if LOAD_HINT not in str(e):
            raise
        raise UserError(str(e).replace(LOAD_HINT, "or give an adapter directory: --adapter "
                                                  "./DIR")) from None


class _Status:
    """Transient rich status line on stderr, fed by the pipeline's progress callback.

    It vanishes when done (and prints nothing when stderr is not a terminal), so a failure
    shows exactly one line; the steps are logged at --verbose.
    """

    def __init__(self, title: str):
        self._status = err.status(title)

    def __enter__(self):
        self._status.__enter__()
        return self

    def __call__(self, msg: str) -> None:
        logging.getLogger("edgec").info(msg)
        self._status.update(msg + " …")

    def __exit__(self, *exc):
        return self._status.__exit__(*exc)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                                help="log pass details")] = False):
    # Libraries (onnxscript, onnx-ir) log every folding decision at INFO; show only ours.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgec").setLevel(logging.INFO if verbose else logging.WARNING)


@app.command("models")
@_errors
def models_cmd(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """List the reference models and their configs.

    Example: `edgec models`
    """
    from edgec.models import registry

    rows = [{"name": s.name, "configs": list(s.configs), "options": dict(s.options),
             "inputs": list(s.input_names), "description": s.description, "paper": s.paper,
             "sampler": (s.sampling or {}).get("kind")}
            for s in registry.specs()]
    if as_json:
        return _print_json(rows)
    # the name is what the user types next: never cut it. Below 120 columns the seven columns
    # left each a few characters (`motion-…`), so the narrow table folds inputs, paper and
    # sampler under the description.
    wide = out.width >= 120
    table = Table()
    table.add_column("model", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    headers = (("configs", "options", "inputs", "description", "follows", "sampler") if wide
               else ("configs", "description"))
    for header in headers:
        table.add_column(header, overflow="fold")
    for r in rows:
        configs, options = ", ".join(r["configs"]), ", ".join(f"+{o}" for o in r["options"])
        if wide:
            table.add_row(r["name"], configs, options, ", ".join(r["inputs"]), r["description"],
                          r["paper"], r["sampler"] or "")
            continue
        about = [r["description"], f"inputs: {', '.join(r['inputs'])}", f"follows: {r['paper']}"]
        about += [f"sampler: {r['sampler']}"] if r["sampler"] else []
        table.add_row(r["name"], configs + (f"; {options}" if options else ""), "\n".join(about))
    out.print(table)


@app.command("export")
@_errors
def export_cmd(
    source: Annotated[str, typer.Argument(
        help="reference model name (see `edgec models`), or a Hugging Face / diffusers "
             "checkpoint directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .onnx file to write")],
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="model config (tiny|small|base[+option]; default tiny); for a "
                               "Hugging Face checkpoint the example inputs: batch=N,seq=N")] = None,
):
    """Export a model to ONNX (weights in FILE.onnx.data), verified against PyTorch.

    Examples: `edgec export llama --config small -o llama.onnx`,
    `edgec export ./bert --config batch=1,seq=128 -o bert.onnx`
    """
    from edgec.exporters.export_file import export_to_file

    # a file output needs its directory, as --save does (it was created silently, typo or not);
    # directory outputs (compile/calibrate -o) are created with their parents
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: no directory {output.parent}; create it first")
    with _Status(f"exporting {source}") as status:
        status(f"exporting {source} ({config or 'tiny'})")
        fidelity = export_to_file(source, output, config)
    worst = max(fidelity["outputs"].values(), key=lambda e: e["max_rel"])
    out.print(f"wrote {output} (max rel error vs PyTorch {worst['max_rel']:.2e}, "
              f"cosine {worst['cosine']:.7f})", highlight=False)


def _recipe_options(command: str):
    """Give a command the Recipe's options as typer options (one per Recipe field that names
    ``command``); the function receives them, as given, in ``recipe_options``."""
    from edgec.recipe import recipe_options

    fields = recipe_options(command)

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "recipe_options"]
        annotations = {k: v for k, v in fn.__annotations__.items() if k != "recipe_options"}
        extra = []
        for name, default, opt in fields:
            tp: Any = {"flag": bool, "multiple": list[str] | None}.get(opt.kind, str | None)
            ann = Annotated[tp, typer.Option(*opt.flags, help=opt.help, metavar=opt.metavar)]
            extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                           default=bool(default) if opt.kind == "flag" else None))
            annotations[name] = ann

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            given = {name: kwargs.pop(name) for name, _, _ in fields if name in kwargs}
            return fn(*args, recipe_options=given, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        wrapper.__annotations__ = annotations
        return wrapper

    return decorate


@app.command("compile")
@_errors
@_recipe_options("compile")
def compile_cmd(
    source: Annotated[str, typer.Argument(
        help="model name, path to an .onnx file, or a Hugging Face checkpoint directory")],
    target: Annotated[str, typer.Option(
        "--target", "-t", help="ort-cpu | openvino-cpu | qnn-htp | tensorrt (`edgec targets`)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="artifact directory to write")],
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="an .onnx source's example inputs: .npz keyed by input name "
                         "(default: random, each dynamic dim 1)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    recipe_options: dict | None = None,
):
    """Compile a model for a target into an artifact directory and print its report.

    Examples:

    * `edgec compile video-dit --config small --target openvino-cpu -o out`

    * `edgec compile video-dit --config small --target openvino-cpu -o out-sparse
      --sparse-attention keep=0.2`

    * `edgec compile llama --config tiny --target ort-cpu -o out --check`

    * `edgec compile my_model.onnx --target ort-cpu -o out`

    * `edgec compile cnn.onnx --target openvino-cpu -o out --inputs images.npz`

    * `edgec compile llama --config small --target ort-cpu -o out-lora --lora ./adapter`

    * `edgec compile llama --target ort-cpu -o out-losa --prune 2:4 --lora ./adapter
      --lora-mode sparse-merge`

    * `edgec compile llama --target openvino-cpu -o out-swap --lora ./a1 --lora ./a2
      --lora-mode swappable`

    * `edgec compile llama --config small --target openvino-cpu -o out-int8 --quantize w8a8`

    * `edgec compile llama --target qnn-htp -o out-npu --quantize w8a16 --calib calib/`
    """
    from edgec.pipeline import compile_model
    from edgec.recipe import Recipe

    recipe = Recipe.parse(target, **(recipe_options or {}))  # validated before any export
    example = _onnx_inputs(source, inputs, recipe.generate)
    with _Status("compiling") as status:
        art = compile_model(source, recipe, output, example_inputs=example, progress=status)
    if as_json:
        return _print_json(art.report)
    from edgec.report import summary_rows

    table = Table(title=f"edgec: {output}", show_header=False)
    for k, v in summary_rows(art.report):
        table.add_row(k, v)
    out.print(table)
    out.print(f"report: {output / 'report.md'}", highlight=False)


def _onnx_inputs(source: str, inputs: Path | None, generate: bool) -> dict | None:
    """--inputs: an .onnx file's example (its dynamic dims sized, as example_inputs= does from
    Python). Without it edgec's example holds each dynamic dim at 1, which a dynamic-H/W CNN
    cannot pool and the CLI had no way to change. Other sources make their own example."""
    if inputs is None:
        return None
    if generate or not (source.endswith(".onnx") or Path(source).is_file()):
        raise UserError("--inputs gives an .onnx file its example inputs; a model name, a "
                        "checkpoint directory or a --generate decoder makes its own "
                        "(--config sets a reference model's or a checkpoint's sizes)")
    return _load_npz(inputs)


@app.command("calibrate")
@_errors
@_recipe_options("calibrate")
def calibrate_cmd(
    source: Annotated[str, typer.Argument(
        help="model name, path to an .onnx file, or a Hugging Face checkpoint directory")],
    target: Annotated[str, typer.Option(
        "--target", "-t", help="ort-cpu | openvino-cpu | qnn-htp | tensorrt (`edgec targets`)")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="directory for calibration.json: new, empty or an earlier cache "
                               "(replaced whole)")],
    data: Annotated[Path | None, typer.Option(
        "--data", help=".npz of samples: keys = input names, leading sample axis; with "
                       "--generate input_ids [and attention_mask] alone: prompts (default: "
                       "the model's own calibration generator)")] = None,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="an .onnx source's example inputs, as compile --inputs takes them "
                         "(the calibrated graph must be the one the compile quantizes)")] = None,
    as_json: Annotated[bool, typer.Option("--json",
                                          help="print the cache summary as JSON")] = False,
    recipe_options: dict | None = None,
):
    """Collect activation ranges on calibration samples and write a calibration cache.

    Takes the compile's recipe options (--quantize, default w8a8; --sparse-attention, --lora,
    --prune, ...): the cache (calibration.json: per-tensor ranges keyed by tensor name, plus the
    model hash, target, scheme, method and sample count) is reused by `edgec compile` with the
    same options and `--calib DIR`; a cache that does not match the compiled model is refused.

    Examples:

    * `edgec calibrate llama --config small --target openvino-cpu -o calib/`

    * `edgec calibrate llama --target qnn-htp --quantize w8a8:method=percentile -o calib/`

    * `edgec calibrate model.onnx --target ort-cpu --data samples.npz -o calib/`

    * `edgec calibrate llama --target openvino-cpu --lora ./a --lora-mode swappable -o calib/`
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgec.pipeline import calibrate_source
    from edgec.recipe import Recipe

    options = {"quantize": "w8a8", **{k: v for k, v in (recipe_options or {}).items()
                                      if v is not None}}
    recipe = Recipe.parse(target, **options)
    example = _onnx_inputs(source, inputs, recipe.generate)
    with _Status("calibrating") as status:
        bar = Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=err, transient=True)
        task = None

        def advance(i: int, n: int) -> None:
            nonlocal task
            if task is None:
                status._status.stop()  # the bar replaces the status line
                bar.start()
                task = bar.add_task("runs", total=n)
            bar.update(task, completed=i, total=n)  # histogram methods learn theirs later

        try:
            cache = calibrate_source(source, recipe, output, data=data, example_inputs=example,
                                     step=status, progress=advance)
        finally:
            bar.stop()
    summary = {"cache": str(output / "calibration.json"), "target": cache.target,
               "scheme": cache.scheme, "method": cache.method, "samples": cache.samples,
               "data": cache.data, "tensors": len(cache.tensors),
               "model_hash": cache.model_hash, "seconds": round(cache.seconds, 3),
               **({"data_sha256": cache.data_sha256} if cache.data_sha256 else {}),
               **({"held_out": cache.held_out} if cache.held_out else {}),
               **({"calibration_samples": cache.calibration_samples}
                  if cache.calibration_samples else {})}
    decode = None
    if (output / "decode" / "calibration.json").is_file():  # --generate on the NPU: the
        from edgec.calibration import CalibrationCache  # one-token decode graph's own

        decode = CalibrationCache.load(output / "decode")
        summary["decode"] = {"cache": str(output / "decode" / "calibration.json"),
                             "samples": decode.samples, "tensors": len(decode.tensors)}
    if as_json:
        return _print_json(summary)
    out.print(f"wrote {summary['cache']}: {summary['tensors']} tensor ranges from "
              f"{cache.samples} samples ({cache.method}, {cache.data}) in {cache.seconds:.1f} s"
              + (f"; the accuracy floor's {cache.held_out['samples']} held-out samples (the "
                 "file's last" + (", which calibration saw too" if cache.held_out["source"]
                                  == "calibration" else "") + f") in {cache.held_out['file']}"
                 if cache.held_out else "")
              + (f"; the decode graph's {len(decode.tensors)} from {decode.samples} one-token "
                 "samples in decode/" if decode is not None else ""), highlight=False)


@app.command("targets")
@_errors
def targets_cmd(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """List the targets: runtime, shape rules, quantization schemes and notes.

    Example: `edgec targets`
    """
    from edgec.targets import TARGETS

    rows = [{"name": t.name, "description": t.description, "runtime": t.runtime,
             "static_shapes": t.static_shapes, "fully_quantized": t.fully_quantized,
             "max_rank": t.max_rank, "swappable_adapters": t.swappable_adapters,
             "passes": {"before_quantize": [p.name for p in t.before_quantize],
                        "after_quantize": [p.name for p in t.after_quantize]},
             "schemes": {n: _scheme_line(s) for n, s in t.schemes.items()},
             "socs": {s.chip: f"{s.name}, HTP v{s.htp_arch}" for s in t.socs.values()},
             "kv_caches": list(t.kv_caches),
             "notes": list(t.notes)} for t in TARGETS.values()]
    if as_json:
        return _print_json(rows)
    for r in rows:
        table = Table(show_header=False, title=f"{r['name']}: {r['description']}",
                      title_justify="left")
        table.add_row("runtime", r["runtime"] + (", static shapes" if r["static_shapes"] else "")
                      + (", quantized only" if r["fully_quantized"] else "")
                      + (f", rank ≤ {r['max_rank']}" if r["max_rank"] else ""))
        passes = [*r["passes"]["before_quantize"], *r["passes"]["after_quantize"]]
        if passes:
            table.add_row("device passes", ", ".join(passes))
        for name, line in r["schemes"].items():
            table.add_row(f"--quantize {name}", line)
        if r["socs"]:
            table.add_row("--soc", "; ".join(f"{c} ({d})" for c, d in r["socs"].items()))
        if r["kv_caches"]:
            table.add_row("--kv-cache", " | ".join(r["kv_caches"]) + " (--generate; default "
                          f"{r['kv_caches'][0]})")
        for note in r["notes"]:
            table.add_row("note", note)
        out.print(table)


def _scheme_line(s) -> str:
    acts = f"{s.activations} activations" if s.activations else "weight-only"
    blocks = (f", blocks of {s.block_size}" if s.block_size else
              ", per channel" if s.per_channel and not s.calibrated else "")
    seven = "; reduce_range=true: 7-bit weights" if s.reduce_range_pays else ""
    return f"{s.weights} weights{blocks}, {acts}{seven}"


@app.command("run")
@_errors
def run_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    inputs: Annotated[Path | None, typer.Option("--inputs", help=_INPUTS_HELP)] = None,
    save: Annotated[Path | None, typer.Option("--save", help="write outputs to this .npz")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help=_ADAPTER_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Run an artifact once (on its example inputs unless --inputs) and summarize the outputs.

    Examples: `edgec run out --json`, `edgec run out --inputs x.npz --save y.npz`,
    `edgec run out-lora --adapter base`, `edgec run out-lora --adapter ./new-adapter`
    """
    import edgec
    from edgec.npz import save_npz

    _check_save(save)
    session = edgec.load(artifact)
    _use_adapter(session, adapter)
    results = session.run(_feeds(session, inputs))
    if save is not None:
        save_npz(save, results)
    summary = {name: {"shape": list(a.shape), "dtype": a.dtype.name, **_stats(a)}
               for name, a in results.items()}
    if as_json:
        return _print_json({"artifact": str(artifact), "runtime": session.runtime,
                            "adapter": _adapter_used(session, adapter), "outputs": summary})
    nonfinite = any("nan" in s for s in summary.values())
    table = Table("output", "shape", "dtype", "mean", "std", "min", "max",
                  *(("nan / +inf / -inf",) if nonfinite else ()),
                  title=f"{artifact} on {session.runtime}" + (
                      " (stats of the finite elements)" if nonfinite else ""))
    for name, s in summary.items():
        table.add_row(name, str(s["shape"]), s["dtype"],
                      *(f"{s[k]:.4g}" if k in s else "–" for k in ("mean", "std", "min", "max")),
                      *((f"{s['nan']} / {s['posinf']} / {s['neginf']}" if "nan" in s else "0",)
                        if nonfinite else ()))
    out.print(table)


def _stats(a) -> dict[str, float]:
    """An output's mean, std, min and max; none for an empty one (no elements: the table shows
    "–", where a [0, 3] output was an internal KeyError)."""
    if not a.size:
        return {}
    import numpy as np

    if not np.issubdtype(a.dtype, np.floating) or np.isfinite(a).all():
        return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
                "max": float(a.max())}
    # NaN/±inf: stats of the finite elements and a count of the rest (min/max were nan)
    finite = a[np.isfinite(a)]
    stats = ({"mean": float(finite.mean()), "std": float(finite.std()),
              "min": float(finite.min()), "max": float(finite.max())} if finite.size else {})
    return {**stats, "nan": int(np.isnan(a).sum()), "posinf": int(np.isposinf(a).sum()),
            "neginf": int(np.isneginf(a).sum())}


@app.command("bench")
@_errors
def bench_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    inputs: Annotated[Path | None, typer.Option("--inputs", help=_INPUTS_HELP)] = None,
    warmup: Annotated[int, typer.Option(min=0, help="untimed runs first")] = 3,
    iterations: Annotated[int, typer.Option(min=1, help="timed runs")] = 20,
    adapter: Annotated[str | None, typer.Option("--adapter", help=_ADAPTER_HELP)] = None,
    prompt_tokens: Annotated[int | None, typer.Option(
        "--prompt-tokens", min=1, help="generation artifacts: prompt length (default 128, "
                                       "less where the artifact's context is shorter)")] = None,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", min=2, help="generation artifacts: tokens generated per run")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Measure an artifact's latency (p50/p90/mean ms); for a generation artifact, prefill ms
    and decode tokens/s separately (medians; at most 5 runs unless --iterations is given).

    Examples: `edgec bench out --iterations 50 --json`,
    `edgec bench out-llm --prompt-tokens 1024 --new-tokens 64`
    """
    import edgec

    session = edgec.load(artifact)
    _use_adapter(session, adapter)  # a generation benchmark ignored --adapter
    if session.manifest.get("generation") and inputs is None:
        return _bench_generation(artifact, session, prompt_tokens, new_tokens, warmup,
                                 iterations, as_json, adapter)
    if prompt_tokens is not None or new_tokens != 32:
        raise UserError("--prompt-tokens and --new-tokens apply to generation artifacts "
                        "(compiled with --generate, benchmarked without --inputs)")
    stats = session.benchmark(warmup=warmup, iterations=iterations,
                              feeds=_feeds(session, inputs))
    result = {"artifact": str(artifact), "runtime": session.runtime,
              "adapter": _adapter_used(session, adapter), **stats}
    if as_json:
        return _print_json(result)
    out.print(f"{artifact} on {session.runtime}: p50 {stats['p50_ms']:.3f} ms, "
              f"p90 {stats['p90_ms']:.3f} ms, mean {stats['mean_ms']:.3f} ms "
              f"({iterations} runs)" + (f"; measured on {session.emulator}"
                                        if session.emulator else ""), highlight=False)


def _bench_generation(artifact, session, prompt_tokens, new_tokens, warmup, iterations,
                      as_json, adapter):
    from edgec.runtimes.generation import benchmark_generation

    limit = session.decoder_info.context  # a static buffer (NPU) or a --context
    if prompt_tokens is None:  # the default fits the artifact: 128, or what its context leaves
        prompt_tokens = 128 if not limit else max(1, min(128, limit - new_tokens))
    if limit and prompt_tokens + new_tokens - 1 > limit:  # the last new token is not fed back
        raise UserError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} - 1 exceed "
                        f"the artifact's context of {limit} tokens; give fewer")
    stats = benchmark_generation(session, prompt_tokens, new_tokens, warmup,
                                 min(iterations, 5) if iterations == 20 else iterations)
    result = {"artifact": str(artifact), "runtime": session.runtime,
              "adapter": _adapter_used(session, adapter), **stats}
    if as_json:
        return _print_json(result)
    sparse = " (sparse prefill graph)" if stats["prefill_graph"] == "sparse" else ""
    if stats["prefill_graph"] == "vision":
        sparse = (f" after an image of {stats['image_tokens']} tokens "
                  f"({stats['prompt_tokens_kept']} of all kept)")
    out.print(f"{artifact} on {session.runtime}: prefill {stats['prefill_ms']:.2f} ms for "
              f"{prompt_tokens} tokens{sparse}, decode {stats['decode_tokens_per_s']:.1f} tokens/s "
              f"({new_tokens} new tokens, median of {stats['iterations']} runs)"
              + (f"; measured on {session.emulator}" if session.emulator else ""),
              highlight=False)


def _checkpoint_settings_note(settings, sources, info) -> str | None:
    """One line when the checkpoint's generation config (or transformers' defaults it brings)
    changed what edgec's defaults would decode, naming those settings and their override."""
    from edgec.runtimes.generation import EDGEC_DEFAULTS

    sampling = settings["do_sample"]
    read = (("temperature", "top_k", "top_p") if sampling else ()) + ("repetition_penalty",)
    changed = [f"{k} {settings[k]:g}" + (" (transformers' default)"
                                         if sources[k] == "transformers default" else "")
               for k in read if sources[k] != "argument" and settings[k] != EDGEC_DEFAULTS[k]]
    flags = [f"--{k.replace('_', '-')}" for k in read if sources[k] != "argument"
             and settings[k] != EDGEC_DEFAULTS[k]]
    ignored = (info.generation_config or {}).get("not_applied") or {}
    skipped = (f"; not applied (edgec has no such processor, transformers' generate() would "
               f"apply it): {', '.join(f'{k} {v}' for k, v in ignored.items())}"
               if ignored else "")
    if sources["do_sample"] == "checkpoint" and sampling:
        return ("sampling as the checkpoint's generation_config.json says"
                + (f": {', '.join(changed)}" if changed else "") + "; --greedy to override"
                + skipped)
    if changed:
        return (f"{'sampling' if sampling else 'greedy decoding'} with "
                f"{', '.join(changed)} as the checkpoint's generation_config.json says; "
                f"{'/'.join(flags)} to override" + skipped)
    return f"the checkpoint's generation_config.json{skipped[1:]}" if skipped else None


@app.command("generate")
@_errors
def generate_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory (compiled with --generate)")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p",
                                               help="prompt text (needs the tokenizer)")] = None,
    prompt_ids: Annotated[str | None, typer.Option(
        "--prompt-ids", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 32,
    sample: Annotated[bool | None, typer.Option(
        "--sample/--greedy", help="sample, or decode greedily (default: as the checkpoint's "
        "generation_config.json says, else greedy)", show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(
        help="sampling temperature (default: the checkpoint's, else 1)")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", min=0, help="sample from the k best, 0: all (default: the checkpoint's, else "
        "transformers' 50; 0 without a generation_config.json)")] = None,
    top_p: Annotated[float | None, typer.Option(
        "--top-p", help="nucleus sampling mass (default: the checkpoint's, else 1)")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(
        "--repetition-penalty", help="1: none (default: the checkpoint's, else 1)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", help="an image for a VLM artifact (.png/.jpg, or .npy pixel values); the "
        "prompt gets its placeholder tokens unless it has them (LLaVA's `<image>`)")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help=_ADAPTER_HELP)] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="the prompt is a user's message: put it through the checkpoint's chat "
        "template (an instruction-tuned model answers it); without --prompt, a conversation "
        "on stdin, one message per line")] = False,
    system: Annotated[str | None, typer.Option(
        "--system", help="with --chat: a system message before the user's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Generate text (or token ids) from a KV-cache decoder artifact; text streams as it comes.

    Examples: `edgec generate out --prompt "Once upon a time" -n 64`,
    `edgec generate out --prompt-ids 1,2,3 --json`,
    `edgec generate out -p "Hi" --sample --top-p 0.9`,
    `edgec generate out --chat -p "What is the capital of France?"`,
    `edgec generate out --chat` (a conversation: one message per line),
    `edgec generate vlm-out --image cat.png --prompt $'USER: <image>\\nWhat is this? ASSISTANT:'`
    """
    import numpy as np

    import edgec
    from edgec.runtimes.generation import parse_ids, resolve_settings
    from edgec.runtimes.tokenizer import TextStream

    converse = chat and prompt is None and prompt_ids is None  # a conversation on stdin
    if chat and prompt_ids is not None:
        raise UserError("--chat puts --prompt TEXT through the chat template; it cannot take "
                        "--prompt-ids (give the template's ids yourself without --chat)")
    if not converse and (prompt is None) == (prompt_ids is None):
        raise UserError("give the prompt as --prompt TEXT or as --prompt-ids 1,2,3 (one of them), "
                        "or --chat alone to converse")
    if converse and (as_json or image is not None):
        raise UserError(f"{'--json' if as_json else '--image'} takes one prompt: give --prompt "
                        "TEXT with --chat")
    if system is not None and not chat:
        raise UserError("--system is a chat's system message; add --chat")
    if temperature == 0 and sample is not True:  # "temperature 0" asks for greedy decoding
        temperature, sample = None, False  # (a checkpoint that samples by default included)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0, not {temperature!r}; for "
                        "deterministic (greedy) output " + (
                            "drop --sample" if sample else
                            "give --greedy or leave --temperature out"))
    session = edgec.load(artifact)
    info = session.decoder_info  # refuses an artifact without a KV cache before anything else
    settings, sources = resolve_settings(info, do_sample=sample, temperature=temperature,
                                         top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty)
    unused = [f"--{k}" for k, v in (("temperature", temperature), ("top-k", top_k),
                                    ("top-p", top_p), ("seed", seed)) if v is not None]
    if unused and not settings["do_sample"]:  # greedy decoding reads none of them
        raise UserError(f"{unused[0]} applies to sampling; add --sample (greedy decoding "
                        "ignores it)")
    # printed with the first token (not before a refusal: an error stays one line)
    note = [_checkpoint_settings_note(settings, sources, info) if not as_json else None]
    _use_adapter(session, adapter)
    if converse:
        return _converse(session, artifact, system, note[0], max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    tok = session.tokenizer if prompt is not None else None
    if tok is not None and not chat and not as_json and tok.chat_template is not None:
        # an instruction-tuned model given bare text often answers nothing (SmolLM2-Instruct:
        # EOS at once) or rambles on
        hint = ("the checkpoint has a chat template: add --chat to put the prompt through it "
                "(an instruction-tuned model answers in that format)")
        note[0] = f"{note[0]}\n{hint}" if note[0] else hint
    if chat:
        ids = tok.encode_chat([*([{"role": "system", "content": system}] if system else []),
                               {"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt) if tok is not None else parse_ids(prompt_ids)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text")

    text = TextStream(tok, _write_out) if tok is not None and not as_json else None

    def stream(token: np.ndarray) -> None:
        if note[0]:
            err.print(note[0], highlight=False, soft_wrap=True)
            note[0] = None
        if text is not None:
            text(token)

    result = session.generate(np.array([ids]), max_new_tokens=max_new_tokens, do_sample=sample,
                              temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, streamer=stream,
                              image=image)
    stats = session.last_generation
    new = [int(t) for t in result[0, result.shape[1] - stats["new_tokens"]:]]
    if as_json:
        return _print_json({"artifact": str(artifact), "runtime": session.runtime,
                            "adapter": _adapter_used(session, adapter),
                            "prompt_ids": ids, "new_ids": new,
                            **({"chat": True} if chat else {}),
                            **({"image": str(image)} if image is not None else {}),
                            **({"text": tok.decode(new)} if tok is not None else {}), **stats})
    sys.stdout.write(",".join(map(str, new)) if text is None else text.rest(new))
    sys.stdout.write("\n")
    err.print(_generation_line(stats), highlight=False)


def _write_out(piece: str) -> None:
    """Streamed text, flushed as it comes."""
    sys.stdout.write(piece)
    sys.stdout.flush()


def _generation_line(stats: dict) -> str:
    rate = stats["decode_tokens_per_s"]
    kept = (f" ({stats['prompt_tokens_kept']} of {stats['prompt_tokens']} prompt tokens kept)"
            if stats.get("prompt_tokens_kept") not in (None, stats["prompt_tokens"]) else
            f" ({stats['prompt_tokens'] - stats['cached_tokens']} of {stats['prompt_tokens']} "
            "prompt tokens: the rest cached)" if stats.get("cached_tokens") else "")
    return (f"{stats['new_tokens']} tokens; prefill {stats['prefill_ms']:.1f} ms{kept}, decode "
            f"{rate:.1f} tokens/s" if rate else f"{stats['new_tokens']} token(s); prefill "
            f"{stats['prefill_ms']:.1f} ms{kept}")


def _converse(session, artifact: Path, system: str | None, note: str | None,
              max_new_tokens: int, **options) -> None:
    """``edgec generate DIR --chat``: a line on stdin is a message, the answer streams to
    stdout; /reset starts over, /exit or end of input ends. A turn edgec refuses (a message
    longer than the context) is said on stderr and the conversation goes on; Ctrl-C during an
    answer stops it (the turn left out), at the prompt it ends the command (exit 130)."""
    conversation = session.chat(system=system, max_new_tokens=max_new_tokens, **options)
    tty = sys.stdin.isatty()
    err.print(f"chatting with {artifact}: a line is a message; /reset starts over, /exit or "
              "Ctrl-D ends", highlight=False, soft_wrap=True)
    if note:
        err.print(note, highlight=False, soft_wrap=True)
    while True:
        if tty:
            err.print("> ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            conversation.reset()
            err.print("(a new conversation)", highlight=False)
            continue
        if not line.strip():
            continue
        dropped = conversation.dropped
        try:
            conversation.say(line.strip(), on_text=_write_out)
        except UserError as e:
            err.print(f"error: {e}", highlight=False, soft_wrap=True)
            continue
        except KeyboardInterrupt as e:  # Ctrl-C stops this answer; at the prompt it ends
            if isinstance(e, _Terminated):
                raise
            sys.stdout.write("\n")
            err.print("(stopped: the turn is left out of the conversation)", highlight=False)
            continue
        sys.stdout.write("\n")
        left = conversation.dropped - dropped
        err.print(_generation_line(session.last_generation) + (
            f"; the oldest {left} turn(s) left the context" if left else ""), highlight=False)


@app.command("sample")
@_errors
def sample_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory of a diffusion model")],
    steps: Annotated[int | None, typer.Option("--steps", min=1,
                                              help="sampling steps (default: the model's)")] = None,
    guidance: Annotated[float | None, typer.Option(
        "--guidance", help="classifier-free guidance scale; 1 or less disables it")] = None,
    seed: Annotated[int, typer.Option(help="noise seed")] = 0,
    guidance_mode: Annotated[str, typer.Option(
        "--guidance-mode", help="guidance pair as one batch (batch), two runs (split), or "
        "whichever measures faster (auto)")] = "auto",
    dense_steps: Annotated[int | None, typer.Option(
        "--dense-steps", min=0, help="first steps on the dense graph (default: the artifact's)"
    )] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help=_ADAPTER_HELP)] = None,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="conditions: .npz keyed by input name (default: the example inputs)"
    )] = None,
    noise: Annotated[Path | None, typer.Option(
        "--noise", help="starting noise: .npz keyed by sample input name (default: drawn "
                        "from --seed)")] = None,
    negative: Annotated[Path | None, typer.Option(
        "--negative", help="guidance's unconditional conditions, e.g. a negative prompt's "
                           "embeddings: .npz keyed by condition name (default: zeros)")] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="text prompt (CogVideoX / Wan artifacts; needs --text-encoder)")] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        "--negative-prompt", help="negative text prompt (default: the empty prompt)")] = None,
    text_encoder: Annotated[Path | None, typer.Option(
        "--text-encoder", help="compiled text encoder artifact that encodes the prompts "
                               "(`edgec compile ./pipeline/text_encoder ...`)")] = None,
    dynamic_cfg: Annotated[bool, typer.Option(
        "--dynamic-cfg", help="CogVideoX: scale guidance per step as its pipeline's "
                              "use_dynamic_cfg")] = False,
    solver: Annotated[str | None, typer.Option(
        "--solver", help="solver over the artifact's schedule (default: its pipeline's): flow "
                         "euler|flowmatch|unipc, CogVideoX ddim|dpm")] = None,
    vae: Annotated[Path | None, typer.Option(
        "--vae", help="compiled VAE decoder artifact (`edgec compile ./pipeline/vae ...`): "
                      "decode the samples to frames")] = None,
    video: Annotated[Path | None, typer.Option(
        "--video", help="write the first decoded video as an animated GIF (needs --vae)")
    ] = None,
    save: Annotated[Path | None, typer.Option("--save", help="write the samples to this .npz")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Sample a diffusion artifact from noise (flow Euler, DDIM or SDE, with guidance).

    Examples: `edgec sample out --steps 50`, `edgec sample out --inputs text.npz --save x.npz`,
    `edgec sample out --noise latent.npz --guidance 1`,
    `edgec sample out-cog --prompt "a cat on a skateboard" --text-encoder out-t5 --vae out-vae
    --video cat.gif`,
    `edgec sample out-sparse --steps 50 --dense-steps 10 --json`
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import edgec
    from edgec.npz import save_npz
    from edgec.runtimes.sampling import check_inputs, with_prompts

    _check_save(save)
    _check_save(video, ".gif", "--video")
    if video is not None and vae is None:
        raise UserError("--video writes the frames --vae decodes; give --vae DIR too")
    session = edgec.load(artifact)
    _use_adapter(session, adapter)
    conditions, negatives, noises = _load_npz(inputs), _load_npz(negative), _load_npz(noise)
    _no_samples_in(session, inputs, conditions)
    if text_encoder is not None and prompt is None:
        raise UserError("--text-encoder encodes --prompt; give a prompt too")
    encoder = edgec.load(text_encoder) if text_encoder is not None else None
    conditions, negatives = with_prompts(session, conditions, negatives, prompt,
                                         negative_prompt, encoder, guidance=guidance)
    decoder = edgec.load(vae) if vae is not None else None
    check_inputs(session, conditions, noises, negatives, steps=steps, guidance=guidance,
                 seed=seed, guidance_mode=guidance_mode, dense_steps=dense_steps,
                 solver=solver, dynamic_cfg=dynamic_cfg, vae=decoder)  # before the progress bar
    with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task("steps", total=steps)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        samples = session.sample(conditions, steps=steps, guidance=guidance, seed=seed,
                                 dense_steps=dense_steps, callback=advance, noise=noises,
                                 guidance_mode=guidance_mode, negative=negatives,
                                 vae=decoder,
                                 dynamic_cfg=dynamic_cfg, solver=solver)
    if save is not None:
        save_npz(save, samples)
    if video is not None:
        from edgec.runtimes.video import save_gif

        save_gif(samples["video"][0], video)
    stats = session.last_sampling
    summary = {name: {"shape": list(x.shape), "mean": float(x.mean()), "std": float(x.std())}
               for name, x in samples.items()}
    if as_json:
        return _print_json({"artifact": str(artifact), "runtime": session.runtime,
                            "adapter": _adapter_used(session, adapter),
                            "samples": summary, **stats,
                            **({"saved": str(save)} if save is not None else {}),
                            **({"saved_video": str(video)} if video is not None else {})})
    for name, s in summary.items():
        out.print(f"{name}: shape {s['shape']}, mean {s['mean']:.4f}, std {s['std']:.4f}")
    err.print(f"{stats['steps']} steps ({stats['dense_steps']} dense), {stats['model_runs']} "
              f"model runs, {stats['seconds']:.2f} s", highlight=False)


def _no_samples_in(session, path: Path | None, conditions: dict | None) -> None:
    """--inputs holds conditions only: a noisy sample in it (the artifact's own
    example_inputs.npz holds every input) is starting noise, which --noise takes."""
    from edgec.runtimes.sampling import SamplerSpec

    spec = SamplerSpec.from_manifest(session.manifest)
    name = next((k for k in conditions or {} if k in spec.samples), None)
    if name is not None:
        raise UserError(f"--inputs {path}: {name!r} is the noisy sample, not a condition; give "
                        "its starting noise with --noise FILE.npz and leave it out of --inputs "
                        "(the conditions default to the example inputs)")


@app.command("compare")
@_errors
def compare_cmd(
    artifact_a: Annotated[Path, typer.Argument(help="artifact directory (the reference)")],
    artifact_b: Annotated[Path, typer.Argument(help="artifact directory to compare")],
    inputs: Annotated[Path | None, typer.Option("--inputs", help=_INPUTS_HELP)] = None,
    adapter: Annotated[str | None, typer.Option(
        "--adapter", help=_ADAPTER_HELP + "; run by each artifact that has swappable adapters "
                          "(the other, e.g. one compiled with it merged, runs as it is)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Run two artifacts on the same inputs; print max abs/rel error and cosine per output.

    Examples: `edgec compare out-ort out-ov --json`,
    `edgec compare out-swappable out-merged --adapter style` (a swapped adapter vs its merge)
    """
    import edgec
    from edgec.exporters.verify import compare_outputs

    a, b = edgec.load(artifact_a), edgec.load(artifact_b)
    swappable = [s for s in (a, b) if s.adapters]
    if adapter is not None and not swappable:
        raise UserError(f"--adapter: neither {artifact_a} nor {artifact_b} has swappable LoRA "
                        "adapters; compile one with --lora DIR --lora-mode swappable")
    for s in swappable:
        _use_adapter(s, adapter)
    names_a, names_b = sorted(i.name for i in a.inputs), sorted(i.name for i in b.inputs)
    if names_a != names_b:  # B was run on A's feeds: "inputs do not match the model"
        raise UserError(f"{artifact_a} and {artifact_b} take different inputs ({names_a} vs "
                        f"{names_b}); compare two artifacts of the same model")
    feeds = _feeds(a, inputs)
    errors = compare_outputs(b.run(feeds), a.run(feeds))
    # graphs run() does not reach (prefill, vision, FreeKV, dense companions): their rewrites
    # act in generate/sample, and a pruned VLM compared "identical" to an unpruned one. The
    # graph run() does run is the runtime's model (qnn-htp: target/model_ctx.onnx, built from
    # model.onnx), which was listed as not compared.
    ran = list(dict.fromkeys(s.manifest.get("runtime", {}).get("model") or "model.onnx"
                             for s in (a, b)))
    skipped = sorted({g for s in (a, b) for g in s.manifest.get("hashes", {})
                      if g.endswith(".onnx") and g != "model.onnx" and g not in ran})
    note = (f"compared {' and '.join(ran)} only: {', '.join(skipped)} run in generate/sample, "
            "not here (compare `edgec generate --json` or `edgec sample --save` outputs for "
            "them)" if skipped else None)
    if as_json:
        return _print_json({"reference": str(artifact_a), "candidate": str(artifact_b),
                            "runtimes": [a.runtime, b.runtime],
                            "adapters": [_adapter_used(s, adapter) if s.adapters else None
                                         for s in (a, b)], "outputs": errors,
                            "not_compared": skipped})
    label = [f"{s.runtime}, adapter {_adapter_used(s, adapter)}" if s.adapters else s.runtime
             for s in (a, b)]
    table = Table("output", "max abs", "max rel", "cosine", "rel L2",
                  title=f"{artifact_a} ({label[0]}, reference) vs {artifact_b} ({label[1]})")
    for name, e in errors.items():
        table.add_row(name, f"{e['max_abs']:.3g}", f"{e['max_rel']:.3g}", f"{e['cosine']:.7f}",
                      f"{e['rel_l2']:.3g}")
    out.print(table)
    for name, e in errors.items():
        if e.get("nonfinite_mismatch"):
            err.print(f"{name}: {e['nonfinite_mismatch']} NaN/inf elements differ between the "
                      "two", highlight=False, soft_wrap=True)
        elif e.get("nonfinite"):
            err.print(f"{name}: {e['nonfinite']} NaN/inf elements, the same in both (left out of "
                      "the metrics)", highlight=False, soft_wrap=True)
    if note:
        err.print(note, highlight=False, soft_wrap=True)


@app.command("inspect")
@_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="an .onnx file or an artifact directory")],
    verify: Annotated[bool, typer.Option(
        "--verify", help="artifacts: check every file against the manifest's sha256 (exit 2 "
                         "naming the first that changed, is missing or was added)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Describe an ONNX file (inputs, outputs, opsets, ops, weights) or an artifact directory.

    Examples: `edgec inspect model.onnx`, `edgec inspect out --json`, `edgec inspect out --verify`
    """
    from edgec.inspect import describe

    info = describe(path)
    if verify:
        if not path.is_dir():
            raise UserError(f"{path}: --verify checks an artifact directory's files")
        from edgec.artifact import read_manifest, verify_files

        problems = verify_files(path, read_manifest(path))
        if problems:
            rel, what = next(iter(problems.items()))
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"{path}: {rel} {what} since the compile{more}; recompile or "
                            "restore the artifact")
        info["verified"] = f"{len(info['files'])} files match the manifest's sha256"
    if as_json:
        return _print_json(info)
    table = Table(show_header=False, title=str(path))
    for key, value in info.items():
        if key in ("quantization", "fidelity"):  # a line per entry, lists and dicts flattened
            value = "\n".join(f"{k}: {_flat(v)}" for k, v in value.items())
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "\n".join(json.dumps(v) if not isinstance(v, str) else v for v in value)
        table.add_row(key, str(value))
    out.print(table)


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a job scheduler) raised as an interrupt, so the staging directory
    and temporary files are removed as on Ctrl-C (the default action left hundreds of MB)."""


def _terminate(signum, frame):
    raise _Terminated()


def main() -> None:
    import signal

    try:  # typer >= 0.22 raises its own copy of click's exceptions
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False, prog_name="edgec")  # not "python -m ..." under -m
    except click.NoArgsIsHelpError as e:  # bare `edgec`: the help, as before
        err.print(e.ctx.get_help() if e.ctx else str(e), highlight=False, markup=False)
        sys.exit(2)
    except click.ClickException as e:  # a parse error: one line, not typer's boxed usage
        where = e.ctx.command_path if getattr(e, "ctx", None) else "edgec"
        message = " ".join(e.format_message().split()).rstrip(".")
        err.print(Text("error:", style="red"), f"{where}: {message}; see `{where} --help`",
                  highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C while click itself was reading the command line (typer's
        sys.exit(130)  # own class: its vendored click has no ``exceptions.Abort``)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
