"""ONNX Runtime's calibration histograms, collected one sample and one group of tensors at a time.

ORT's ``HistogramCalibrater`` (entropy, percentile, fp8's distribution) keeps every calibration
sample's every calibrated tensor until the last sample has run, then bins them all at once: on
video-dit small (8192 tokens of dense attention, 2 GB score tensors) a TensorRT fp8 compile passed
17 GB at the second of 16 samples. Its histograms are fixed by the data's range over all samples
(``[-t, t]``, t the largest magnitude; or ``[min|x|, max|x|]`` on magnitudes), so they are built
here in two passes that hold neither:

1. a reduction graph (``ReduceMin``/``ReduceMax``/``Size`` per tensor, each run right after
   its tensor, as ``runtimes.ort.LEAN`` orders it) gives every tensor's range and size over all
   samples;
2. the tensors are exposed as outputs in groups of at most ``memory_budget()`` bytes, one
   session per group, and each sample's histogram, over the whole range, is added to the total.

``np.histogram`` bins each element on its own once the range is fixed, so the sums are ORT's
histograms exactly (counts, edges, minimum, maximum, threshold), and ORT computes the ranges from
them as before. A model whose tensors fit one group costs one extra reduction run per sample.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["BUDGET", "collect_histograms", "expose", "insert_beside", "memory_budget",
           "tensor_bytes", "within_budget"]

# Bytes of calibrated tensors one run may expose (one sample; a larger tensor runs alone): a
# quarter of the memory available when calibration starts, within these bounds (the grouping
# changes the number of runs, never the histograms).
BUDGET = (1 << 30, 8 << 30)


def memory_budget(meminfo: str = "/proc/meminfo") -> int:
    low, high = BUDGET
    try:
        with open(meminfo) as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 2 << 30  # not Linux: a middle value
    return min(high, max(low, kb * 1024 // 4))


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for node in model.graph for v in node.outputs})
    return values


def insert_beside(model: ir.Model, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` (which read ``value``) right after its producer, so they run as soon as
    it exists (``runtimes.ort.LEAN``'s priority order) and it is freed when the model is done
    with it."""
    producer = value.producer()
    first = next(iter(model.graph), None)
    if producer is not None:
        model.graph.insert_after(producer, nodes)
    elif first is not None:
        model.graph.insert_before(first, nodes)
    else:
        model.graph.extend(nodes)


# ops whose output has their first input's element type
_SAME_TYPE = frozenset({"Abs", "Add", "Concat", "Div", "Expand", "Flatten", "Gather", "Identity",
                        "MatMul", "Max", "Min", "Mul", "Neg", "Relu", "Reshape", "Sigmoid",
                        "Slice", "Squeeze", "Sub", "Tile", "Transpose", "Unsqueeze"})


def _dtype(value: ir.Value):
    """``value``'s element type, read through the type-preserving ops above it where a rewrite
    left it unset (qnn-legalize's lowered Transposes, SiLU's Max copy); None if still unknown."""
    while value.dtype is None:
        node = value.producer()
        if node is None or node.op_type not in _SAME_TYPE or not node.inputs \
                or node.inputs[0] is None:
            return None
        value = node.inputs[0]
    return value.dtype


def _output(node: ir.Node, name: str, dtype) -> None:
    """``node``'s output as a scalar graph output named ``name``; untyped where ``dtype`` is
    unknown (a tensor a rewrite made without one: ONNX Runtime infers it)."""
    out = node.outputs[0]
    out.name, out.shape = name, ir.Shape([])
    if dtype is not None:
        out.dtype = dtype


def _reductions(model: ir.Model, names: Sequence[str], magnitudes: bool) -> ir.Model:
    """``model`` with each named tensor's min, max, element count (and min |x| for
    ``magnitudes``) as outputs, computed right after the tensor."""
    aug = model.clone()
    values = _values(aug)
    for i, name in enumerate(names):
        value = values[name]
        nodes = [ir.node("ReduceMin", [value], attributes={"keepdims": 0}),
                 ir.node("ReduceMax", [value], attributes={"keepdims": 0}),
                 ir.node("Size", [value])]
        if magnitudes:
            nodes.append(ir.node("Abs", [value]))
            nodes.append(ir.node("ReduceMin", [nodes[-1].outputs[0]], attributes={"keepdims": 0}))
        for node, what in zip((*nodes[:3], *nodes[4:]), ("min", "max", "size", "absmin")):
            _output(node, f"edgec_hist_{i}_{what}",
                    ir.DataType.INT64 if what == "size" else _dtype(value))
            aug.graph.outputs.append(node.outputs[0])
        insert_beside(aug, value, nodes)
    return aug


def tensor_bytes(model: ir.Model, names: Sequence[str], feeds: dict[str, np.ndarray]
                 ) -> dict[str, int]:
    """Bytes of each named tensor of ``model`` on ``feeds``: one run with a ``Size`` beside
    each (their shapes in the graph may be symbolic)."""
    aug = model.clone()
    values = _values(aug)
    for i, name in enumerate(names):
        size = ir.node("Size", [values[name]])
        _output(size, f"edgec_size_{i}", ir.DataType.INT64)
        aug.graph.outputs.append(size.outputs[0])
        insert_beside(aug, values[name], [size])
    with tempfile.TemporaryDirectory(prefix="edgec-size-") as tmp:
        out = _session(aug, Path(tmp), "sizes").run(feeds)
    return {name: int(out[f"edgec_size_{i}"]) * (values[name].dtype or ir.DataType.FLOAT).itemsize
            for i, name in enumerate(names)}


def expose(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` with the named tensors as graph outputs too."""
    aug = model.clone()
    values = _values(aug)
    present = {v.name for v in aug.graph.outputs}
    aug.graph.outputs.extend(values[n] for n in names if n not in present)
    return aug


def within_budget(items: Sequence, sizes: Sequence[int], budget: int) -> list[list]:
    """``items`` in order, in consecutive groups whose ``sizes`` add up to at most ``budget``
    (an item larger than that alone)."""
    groups: list[list] = [[]]
    held = 0
    for item, size in zip(items, sizes):
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(item)
        held += size
    return [g for g in groups if g]


def _session(model: ir.Model, tmp: Path, name: str):
    from edgec.onnx_io import save_model
    from edgec.runtimes.ort import LEAN, OrtSession

    path = tmp / name / "model.onnx"
    path.parent.mkdir()
    save_model(model, path)
    # Unoptimized, as ORT's calibrator; LEAN has no CPU arena, which on the first run of each
    # group grew 7 GB past the later runs: video-dit small fp8, 16 samples, 17.5 GB peak in
    # 424 s with it (3 groups), 9.9 GB in 544 s without (2 groups).
    return OrtSession(path, optimize=False, config=LEAN)


def collect_histograms(model: ir.Model, names: Sequence[str],
                       samples: Sequence[dict[str, np.ndarray]], num_bins: int,
                       magnitudes: bool, budget: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, tuple]:
    """``HistogramCollector.histogram_dict`` for ``names`` over ``samples``, as ORT's collector
    builds it from all samples at once: ``(counts, edges, min, max, threshold)`` of the values
    over ``[-threshold, threshold]``, or with ``magnitudes`` (ORT's symmetric percentile)
    ``(counts, edges, min, max)`` of ``|x|`` over its own range. ``progress(runs done, runs)``:
    a run per sample for the ranges, then one per sample and group for the histograms (the
    total is known once the ranges give the tensors' sizes)."""
    names = list(names)
    with tempfile.TemporaryDirectory(prefix="edgec-hist-") as tmp:
        session = _session(_reductions(model, names, magnitudes), Path(tmp), "ranges")
        low, high, absmin, sizes = {}, {}, {}, dict.fromkeys(names, 0)
        n = len(samples)
        for k, feeds in enumerate(samples):
            out = session.run(feeds)
            if progress:  # at least one histogram run per sample follows
                progress(k + 1, 2 * n)
            for i, name in enumerate(names):
                lo, hi = out[f"edgec_hist_{i}_min"][()], out[f"edgec_hist_{i}_max"][()]
                low[name] = lo if k == 0 else min(low[name], lo)
                high[name] = hi if k == 0 else max(high[name], hi)
                if magnitudes:
                    am = out[f"edgec_hist_{i}_absmin"][()]
                    absmin[name] = am if k == 0 else min(absmin[name], am)
                size = int(out[f"edgec_hist_{i}_size"]) * lo.dtype.itemsize
                sizes[name] = max(sizes[name], size)
        del session
        ranges = {}
        for name in names:
            top = max(abs(low[name]), abs(high[name]))
            ranges[name] = ((absmin[name], top) if magnitudes else
                            (-np.array(top, dtype=low[name].dtype),
                             np.array(top, dtype=low[name].dtype)))
        groups = within_budget(list(sizes), list(sizes.values()), budget or memory_budget())
        counts: dict[str, np.ndarray] = {}
        edges: dict[str, np.ndarray] = {}
        done, runs = n, n * (1 + len(groups))
        for g, group in enumerate(groups):
            session = _session(expose(model, group), Path(tmp), f"group{g}")
            for feeds in samples:
                out = session.run(feeds)
                for name in group:
                    x = np.absolute(out[name]) if magnitudes else out[name]
                    hist, edge = np.histogram(x, num_bins, range=ranges[name])
                    counts[name] = hist if name not in counts else counts[name] + hist
                    edges.setdefault(name, edge.astype(x.dtype))
                del out
                done += 1
                if progress:
                    progress(done, runs)
            del session
    if magnitudes:
        return {t: (counts[t], edges[t], low[t], high[t]) for t in names}
    return {t: (counts[t], edges[t], low[t], high[t], ranges[t][1]) for t in names}
