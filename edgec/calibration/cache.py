"""Calibration cache: per-tensor ranges plus what produced them, as one JSON file.

A cache is bound to the exact graph it was collected on (``model_hash``), the target, the scheme
and the method; reusing it for anything else is refused with a message saying how to re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["CalibrationCache", "model_hash", "adapters_bound", "is_cache", "CACHE_FILE",
           "FORMAT", "ROTATIONS_FILE", "HELD_OUT_FILE", "CALIBRATION_SAMPLES_FILE"]

FORMAT = "edgec-calibration/1"
_ORT_STATS = ("lowest", "highest", "avg", "std")  # what ORT's TensorData takes (not "crest")
CACHE_FILE = "calibration.json"
ROTATIONS_FILE = "rotations.safetensors"
HELD_OUT_FILE = "held_out.npz"
HELD_OUT_MAX_BYTES = 64 << 20  # larger held-out samples are not stored: the floor's are generated
_HELD_OUT_SOURCES = ("data", "calibration")  # as the quantize stage's held_out_source
# ``calibrate --data``: the samples GPTQ's Hessians take from the file (all but the held-out
# ones), so `compile --calib CACHE` rounds on them as `--calib FILE.npz` does; larger are not
# stored (GPTQ under such a cache rounds on generated samples and says so)
CALIBRATION_SAMPLES_FILE = "calibration_samples.npz"
CALIBRATION_SAMPLES_MAX_BYTES = 256 << 20


def is_cache(path: Path) -> bool:
    """Is directory ``path`` a calibration cache (what ``edgec calibrate`` may replace)?"""
    try:
        return json.loads((path / CACHE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def model_hash(model) -> str:
    """sha256 over the graph's structure and every initializer's bytes (an onnx_ir.Model).

    Streams tensor by tensor, so models over 2 GB hash without building one protobuf.
    """
    import onnx_ir as ir

    h = hashlib.sha256()
    g = model.graph
    for v in (*g.inputs, *g.outputs):
        h.update(f"{v.name}:{v.dtype}:{v.shape}|".encode())
    for node in g:
        h.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for name in sorted(g.initializers):
        value = g.initializers[name].const_value
        h.update(name.encode())
        if value is not None:
            h.update(value.tobytes())
    return h.hexdigest()


def adapters_bound(bindings) -> dict[str, Any]:
    """What a swappable-LoRA graph's calibration bound (``edgec.lora.binding.adapter_bindings``:
    (name, feeds) in turn): the names in order and a sha256 over every bound A/B input, so the
    adapters' weights, their ``--lora`` weights and blends all count; {} where none are bound.
    The adapter inputs are no part of the graph, so ``model_hash`` cannot tell them apart."""
    if not bindings:
        return {}
    h = hashlib.sha256()
    for name, feeds in bindings:
        h.update(f"{name}|".encode())
        for key in sorted(feeds):
            value = feeds[key]
            h.update(f"{key}:{value.dtype}:{value.shape}|".encode())
            h.update(value.tobytes())
    return {"names": [name for name, _ in bindings], "sha256": h.hexdigest()}


@dataclasses.dataclass
class CalibrationCache:
    """Ranges keyed by tensor name and their provenance."""

    model_hash: str
    target: str
    scheme: str
    method: str
    samples: int
    data: str  # where the samples came from
    tensors: dict[str, dict[str, Any]]
    seconds: float = 0.0
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    # DartQuant's rotations, when the calibrated recipe has --rotate dartquant: the graph they
    # were learned on (hash before the rotation), the options, and the safetensors file beside
    # calibration.json that holds them (ROTATIONS_FILE)
    rotations: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the swappable-LoRA adapters bound while calibrating (``adapters_bound``; {} none); None:
    # a cache from before this was recorded
    adapters: dict[str, Any] | None = None
    # ``calibrate --data``: the data file's sha256 beside its name in ``data``; and the floor's
    # held-out samples, its last ``QuantOptions.held_out_of`` (as a compile with that file holds
    # out) in HELD_OUT_FILE beside calibration.json ({} none: a compile's floor takes generated
    # ones): {"file", "samples", "source": "data" (calibration left them out) | "calibration"}
    data_sha256: str | None = None
    held_out: dict[str, Any] = dataclasses.field(default_factory=dict)
    # ... and the file's samples GPTQ takes, in CALIBRATION_SAMPLES_FILE ({} none: a generated
    # cache, one over CALIBRATION_SAMPLES_MAX_BYTES, an older one): {"file", "samples"}
    calibration_samples: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``calibration.json`` into directory ``path`` (created); returns the file."""
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise UserError(f"{directory}: is a file; a calibration cache is saved into a "
                            "directory (it holds calibration.json and maybe rotations): give "
                            "a directory path")
        text = self._json_text()
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CACHE_FILE
        tmp = directory / (CACHE_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)  # never a half-written cache
        return target

    def _json_text(self) -> str:
        """The cache as strict JSON: a NaN or inf range (all-NaN samples made one) was written
        as bare NaN/Infinity, which is no JSON, and every later reuse failed. The samples are
        checked finite before they run (``samples_from_npz``), so one here is edgec's fault."""
        from edgec.artifact import _jsonable
        from edgec.errors import InternalError

        try:
            return json.dumps(self.to_json(), indent=2, default=_jsonable, allow_nan=False) + "\n"
        except ValueError:
            bad = next((n for n, e in self.tensors.items()
                        if "NaN" in json.dumps(e, default=_jsonable)
                        or "Infinity" in json.dumps(e, default=_jsonable)), None)
            raise InternalError(f"calibration produced a non-finite range for tensor {bad!r}; "
                                "not writing an invalid calibration.json") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationCache:
        """Read a cache from its file or from the directory holding ``calibration.json``."""
        p = Path(path)
        f = p / CACHE_FILE if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"{p}: no calibration cache here; create one with "
                            "`edgec calibrate SOURCE --target T -o DIR`")
        try:
            raw = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: not a calibration cache (invalid JSON: {e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{f}: not an edgec calibration cache (format "
                            f"{raw.get('format') if isinstance(raw, dict) else None!r}, "
                            f"expected {FORMAT!r}); re-run `edgec calibrate`")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            cache = cls(**{k: v for k, v in raw.items() if k in fields})
        except TypeError as e:
            raise UserError(f"{f}: incomplete calibration cache ({e}); re-run `edgec calibrate`"
                            ) from None
        _check_entries(f, cache)
        cache._directory = f.parent
        return cache

    def companion(self, name: str) -> CalibrationCache | None:
        """The cache of a companion graph calibrated beside this one (``calibrate --generate``
        on a static-shape target: the one-token decode graph in ``decode/``), None if absent."""
        directory = getattr(self, "_directory", None)
        if directory is None or not (Path(directory) / name / CACHE_FILE).is_file():
            return None
        return CalibrationCache.load(Path(directory) / name)

    def save_rotations(self, directory: str | os.PathLike, rotations: dict[str, Any],
                       graph: str, options: dict[str, Any], summary: dict[str, Any]) -> None:
        """Write ``rotations`` ({key: float64 array}) as ROTATIONS_FILE into ``directory`` and
        record what they were learned on (call before ``save``)."""
        import numpy as np
        from safetensors.numpy import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (ROTATIONS_FILE + ".tmp")
        # bytes written by Python, so the file gets the umask's mode like calibration.json:
        # safetensors' save_file made it 0600, a shared cache only partly readable
        tmp.write_bytes(save({k: np.ascontiguousarray(v, dtype=np.float64)
                              for k, v in rotations.items()}))
        os.replace(tmp, directory / ROTATIONS_FILE)
        self.rotations = {"file": ROTATIONS_FILE, "graph": graph, "options": dict(options),
                          "keys": sorted(rotations), "summary": summary}

    def load_rotations(self, graph: str, options: dict[str, Any]) -> dict[str, Any] | None:
        """The stored rotations for the graph hash ``graph`` learned with ``options``; None if
        this cache holds none. A cache whose rotations belong to another graph or options is
        refused (one line: what differs, how to re-run)."""
        if not self.rotations:
            return None
        from safetensors.numpy import load_file

        redo = ("re-run `edgec calibrate` with the same source, --config, --rotate and recipe "
                "options as this compile")
        if self.rotations.get("graph") != graph:
            raise UserError(f"the calibration cache's rotations were learned on another graph "
                            f"({str(self.rotations.get('graph'))[:12]}, this graph is "
                            f"{graph[:12]}); " + redo)
        if self.rotations.get("options") != options:
            raise UserError(f"the calibration cache's rotations were learned with --rotate "
                            f"{self.rotations.get('options')}, this compile asks "
                            f"{options}; " + redo)
        path = Path(getattr(self, "_directory", ".")) / self.rotations.get("file", ROTATIONS_FILE)
        if not path.is_file():
            raise UserError(f"{path}: the calibration cache's rotations file is missing; " + redo)
        try:
            loaded = dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's input
            raise UserError(f"{path}: unreadable rotations ({type(e).__name__}); " + redo
                            ) from None
        # a rotation taken out of the file left the graph half rotated, refused as "does not
        # match the model (graph ...)", which did not say why
        missing = sorted(set(self.rotations.get("keys", ())) - set(loaded))
        if missing:
            raise UserError(f"{path}: the calibration cache's rotations file lacks "
                            f"{', '.join(missing)} (calibration.json records "
                            f"{', '.join(self.rotations['keys'])}); " + redo)
        return loaded

    def save_held_out(self, directory: str | os.PathLike, feeds: list[dict[str, Any]],
                      source: str) -> bool:
        """Write the floor's held-out ``feeds`` (per-sample dicts, the data file's last ones) as
        HELD_OUT_FILE into ``directory`` (keys = input names, leading sample axis, as the data
        file) and record them (call before ``save``); False, nothing written, where they hold
        over HELD_OUT_MAX_BYTES."""
        if not _save_feeds(Path(directory) / HELD_OUT_FILE, feeds, HELD_OUT_MAX_BYTES):
            return False
        self.held_out = {"file": HELD_OUT_FILE, "samples": len(feeds), "source": source}
        return True

    def held_out_file(self) -> Path | None:
        """The stored held-out samples (``save_held_out``); None where this cache has none (made
        from generated samples, with the floor off, or by an older edgec)."""
        if not self.held_out:
            return None
        return self._stored(HELD_OUT_FILE, "held-out samples", self.held_out["samples"])

    def save_calibration_samples(self, directory: str | os.PathLike,
                                 feeds: list[dict[str, Any]]) -> bool:
        """Write the data file's samples GPTQ takes (``feeds``, as ``save_held_out``) as
        CALIBRATION_SAMPLES_FILE into ``directory`` and record them (call before ``save``);
        False, nothing written, where they hold over CALIBRATION_SAMPLES_MAX_BYTES."""
        if not _save_feeds(Path(directory) / CALIBRATION_SAMPLES_FILE, feeds,
                           CALIBRATION_SAMPLES_MAX_BYTES):
            return False
        self.calibration_samples = {"file": CALIBRATION_SAMPLES_FILE, "samples": len(feeds)}
        return True

    def calibration_samples_file(self) -> Path | None:
        """The stored samples GPTQ takes (``save_calibration_samples``); None where this cache
        has none (generated samples, too large, or an older edgec)."""
        if not self.calibration_samples:
            return None
        return self._stored(CALIBRATION_SAMPLES_FILE, "calibration samples",
                            self.calibration_samples["samples"])

    def made_from_data(self) -> bool:
        """Calibrated on a user's .npz (``calibrate --data``), not the model's generator."""
        return self.data_sha256 is not None or str(self.data).startswith("file ")

    def _stored(self, name: str, what: str, samples: int) -> Path:
        """The file ``name`` beside calibration.json, which records ``samples`` in it (one held
        1 of 4 held-out samples and the floor measured on it without a word)."""
        from edgec.calibration.samples import npz_sample_count

        path = Path(getattr(self, "_directory", ".")) / name
        redo = "re-run `edgec calibrate` with the same --data"
        if not path.is_file():
            raise UserError(f"{path}: the calibration cache's {what} are missing; {redo}")
        found = npz_sample_count(path)  # None: unreadable, as the samples' reader says
        if found is not None and found != samples:
            raise UserError(f"{path}: holds {found} {what}, calibration.json records {samples} "
                            f"(an edited or damaged cache); {redo}")
        return path

    def check(self, model_hash: str, target: str, scheme: str, method: str | None,
              adapters: dict[str, Any] | None = None) -> None:
        """Refuse a cache made for another graph, target, scheme or method, or with other
        swappable-LoRA adapters bound than ``adapters`` (``adapters_bound``; None: not
        checked)."""
        redo = ("re-run `edgec calibrate` with the same source, --config, --target, --quantize "
                "and recipe options as this compile")
        if self.model_hash != model_hash:
            raise UserError(f"the calibration cache does not match the model (cache made for "
                            f"graph {self.model_hash[:12]}, this graph is {model_hash[:12]}); "
                            + redo)
        for what, have, want in (("target", self.target, target), ("scheme", self.scheme, scheme),
                                 ("method", self.method, method)):
            if want is not None and have != want:
                raise UserError(f"the calibration cache was made for {what} {have!r}, this "
                                f"compile uses {want!r}; " + redo)
        if adapters is not None:
            self._check_adapters(adapters)

    def _check_adapters(self, want: dict[str, Any]) -> None:
        """Swappable adapters are graph inputs, bound only while the samples run: a cache
        calibrated with other ones passed the graph check, and its ranges (llama tiny: 5.5
        against 116.8 with a larger adapter) ran that adapter at logits cosine 0.10 vs PEFT."""
        redo = ("re-run `edgec calibrate` with the same --lora and --lora-mode swappable as "
                "this compile")
        have = self.adapters
        if have is None:  # an older cache: nothing recorded, which is only safe without any
            if want:
                raise UserError(f"the calibration cache does not record which LoRA adapters it "
                                f"was calibrated with (an older edgec), and this compile binds "
                                f"{_names(want)}; " + redo)
            return
        if have.get("sha256") == want.get("sha256"):
            return
        if have.get("names") == want.get("names"):
            raise UserError(f"the calibration cache was calibrated with LoRA adapters "
                            f"{_names(have)}, whose weights differ from this compile's "
                            "(another adapter of the same name, or another --lora weight); "
                            + redo)
        raise UserError(f"the calibration cache was calibrated with LoRA adapters: "
                        f"{_names(have)}; this compile binds: {_names(want)}; " + redo)

    def to_tensors_data(self):
        """The ranges as onnxruntime.quantization's ``TensorsData``."""
        import numpy as np
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        from edgec.calibration.ranges import _method

        data = {name: TensorData(**{k: np.asarray(v, dtype=np.float32) for k, v in s.items()
                                    if k in _ORT_STATS})
                for name, s in self.tensors.items()}
        return TensorsData(_method(self.method), data)


def _save_feeds(path: Path, feeds: list[dict[str, Any]], limit: int) -> bool:
    """Per-sample ``feeds`` stacked into the .npz ``path`` (keys = input names, leading sample
    axis, as a data file); False, nothing written, for none or over ``limit`` bytes."""
    import numpy as np

    arrays = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]} if feeds else {}
    if not arrays or sum(a.nbytes for a in arrays.values()) > limit:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return True


def _names(adapters: dict[str, Any]) -> str:
    """The adapters of an ``adapters_bound`` record as the user named them (not the base each
    binding list ends with)."""
    from edgec.lora.spec import NO_ADAPTER

    names = [n for n in adapters.get("names") or () if n != NO_ADAPTER]
    return ", ".join(names) if names else "none"


def _check_entries(f: Path, cache: CalibrationCache) -> None:
    """One line for a cache whose fields are not what ``edgec calibrate`` writes (edited or
    damaged): ranges that are no finite numbers or run backwards, a sample count that is no
    integer. Each failed later as an internal error (an AssertionError in ORT's quantizer, an
    AttributeError) or quantized with nonsense."""
    redo = "re-run `edgec calibrate`"
    if not isinstance(cache.tensors, dict) or not cache.tensors:
        raise UserError(f"{f}: 'tensors' is not a table of tensor ranges; {redo}")
    if not isinstance(cache.samples, int) or isinstance(cache.samples, bool) or \
            cache.samples < 1:
        raise UserError(f"{f}: 'samples' is {cache.samples!r}, not a sample count; {redo}")
    adapters = cache.adapters
    if adapters is not None and not (isinstance(adapters, dict) and all(
            isinstance(adapters.get(k, t()), t) for k, t in (("names", list), ("sha256", str)))):
        raise UserError(f"{f}: 'adapters' is {cache.adapters!r}, not a record of LoRA adapters; "
                        f"{redo}")
    held = cache.held_out
    if not isinstance(held, dict) or held and (held.get("source") not in _HELD_OUT_SOURCES or
                                               not isinstance(held.get("samples"), int)):
        raise UserError(f"{f}: 'held_out' is {held!r}, not a record of held-out samples; {redo}")
    kept = cache.calibration_samples
    if not isinstance(kept, dict) or kept and not isinstance(kept.get("samples"), int):
        raise UserError(f"{f}: 'calibration_samples' is {kept!r}, not a record of calibration "
                        f"samples; {redo}")
    _check_rotations(f, cache.rotations, redo)
    from edgec.calibration.samples import MAX_SAMPLES

    # generated again on reuse (the floor's held-out samples follow them): 10**9 ate 13 GB
    if cache.samples > MAX_SAMPLES and not str(cache.data).startswith("file "):
        raise UserError(f"{f}: 'samples' is {cache.samples}, more than the {MAX_SAMPLES} "
                        f"generated samples edgec calibrates on; {redo}")
    for name, entry in cache.tensors.items():
        stats = entry if isinstance(entry, dict) else {}
        values = [stats.get("lowest"), stats.get("highest"),
                  *(stats[k] for k in _ORT_STATS[2:] if k in stats)]
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v) for v in values)
        if not finite or values[0] > values[1]:
            raise UserError(f"{f}: tensor {name!r} has no valid range ({entry!r}: lowest and "
                            f"highest must be finite numbers, lowest ≤ highest); {redo}")


def _check_rotations(f: Path, record: Any, redo: str) -> None:
    """One line for an edited ``rotations`` record (``save_rotations``): a string failed as an
    AttributeError, a ``file`` that is no string as a TypeError, and a ``file`` with a
    directory in it read rotations from outside the cache."""
    what = "not a record of DartQuant rotations"
    if not isinstance(record, dict):
        raise UserError(f"{f}: 'rotations' is {record!r}, {what}; {redo}")
    if not record:
        return
    for key, kind in (("file", str), ("graph", str), ("options", dict), ("keys", list),
                      ("summary", dict)):
        if not isinstance(record.get(key, kind() if key in ("keys", "summary") else None), kind):
            raise UserError(f"{f}: 'rotations' has {key!r} {record.get(key)!r}, {what}; {redo}")
    name = record["file"]
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise UserError(f"{f}: 'rotations' names the file {name!r}, not a file name in the "
                        f"cache's directory; {redo}")
