"""A quantized artifact's speed beside its fp32 source graph on the same target, measured in
the compile that built it.

Quantization is for speed (and size); whether it pays depends on the model and the machine.
On a trained diffusion UNet at 128×128 with 32-64 channels (``benchmarks/real_denoiser.py``),
w8a8 on ort-cpu ran *slower* than fp32 (its Q/DQ around small convolutions cost more than the
int8 kernels save), and nothing in the report said so. So a quantized compile on a runtime that
can be timed here also builds the graph the quantize pass received (unquantized, the passes
before it included) for the same target (same builder, same runtime options), and times the two
interleaved: rounds of one dropped run and a block of timed runs of each (``BLOCK`` or more, to
the time budget), the order swapped every round; the speedup is the median over rounds of the
per-round ratio of block medians (fp32 / quantized), so a load change during the measurement
moves both.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["fp32_speedup", "interleaved_speedup", "speed_line", "decode_step_feeds",
           "BLOCK", "SLOWER", "DECODE_PAST"]

BLOCK = 2  # the fewest timed runs per block (each after one dropped run)
MAX_BLOCK = 50  # a sub-millisecond graph's blocks: enough runs that a block median is stable
MIN_ROUNDS, MAX_ROUNDS = 3, 10
# below this the report says "slower" and compile warns (a tiny graph's ratio moves by a few %)
SLOWER = 0.95
BUDGET_S = 2.0  # of both graphs' runs together
# a graph slower than this per run is not timed here (3 rounds of 3 runs of both graphs would
# cost more than the compile's own latency measurement): the entry says so
SLOW_RUN_S = 0.25


# A KV-cache decoder is timed on one decode step reading this many cached tokens: the step a
# generation repeats. Its example feeds (a few new tokens on a few cached ones) are neither that
# nor a prefill, and weight-only schemes move the two apart: on ort-cpu w8a16 (SmolLM2-135M,
# AVX2) a decode step ran 2.0x fp32 and a 128-token prefill 0.59x.
DECODE_PAST = 128
_STEP_INPUTS = {"input_ids", "attention_mask", "position_ids"}


def decode_step_feeds(feeds: dict[str, np.ndarray], past: int = DECODE_PAST
                      ) -> dict[str, np.ndarray] | None:
    """One decode step's inputs made from a KV-cache decoder's example feeds: its last token, a
    cache of ``past`` tokens (values drawn at random: the time does not depend on them), a mask
    over ``past`` + 1 and the next position. None where the feeds are not a decoder's that this
    knows (``input_ids``, ``attention_mask``, optional ``position_ids`` and
    ``past_key_values.N.key/value`` of rank 4; a VLM's or another form's inputs)."""
    caches = {k: v for k, v in feeds.items() if k.startswith("past_key_values.")}
    if (not caches or "input_ids" not in feeds or "attention_mask" not in feeds
            or set(feeds) - _STEP_INPUTS - set(caches)
            or any(v.ndim != 4 for v in caches.values())):
        return None
    ids = feeds["input_ids"]
    batch = ids.shape[0]
    rng = np.random.default_rng(0)
    out = {"input_ids": ids[:, -1:],
           "attention_mask": np.ones((batch, past + 1), feeds["attention_mask"].dtype)}
    if "position_ids" in feeds:
        out["position_ids"] = np.full((batch, 1), past, feeds["position_ids"].dtype)
    for name, v in caches.items():
        out[name] = rng.standard_normal((batch, v.shape[1], past, v.shape[3])).astype(v.dtype)
    return out


def interleaved_speedup(base, cand, feeds, rounds: int, block: int = BLOCK) -> dict[str, Any]:
    """Paired timing of two sessions (``run(feeds)``): ``base`` / ``cand`` p50 and speedup."""
    blocks: dict[str, list[float]] = {"base": [], "cand": []}
    runs: dict[str, list[float]] = {"base": [], "cand": []}
    order = [("base", base), ("cand", cand)]
    for r in range(rounds):
        for key, session in (order if r % 2 == 0 else order[::-1]):
            session.run(feeds)  # dropped: the other graph's threads may still spin
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                session.run(feeds)
                ts.append(time.perf_counter() - t0)
            runs[key] += ts
            blocks[key].append(float(np.median(ts)))
    paired = np.array(blocks["base"]) / np.array(blocks["cand"])
    return {"fp32_p50_ms": round(float(np.median(runs["base"])) * 1e3, 3),
            "p50_ms": round(float(np.median(runs["cand"])) * 1e3, 3),
            "speedup": round(float(np.median(paired)), 3),
            "rounds": rounds, "block": block}


def fp32_speedup(fp32_model, tgt, session, feeds, first_run_s: float) -> dict[str, Any] | None:
    """The quantized ``session`` timed beside ``fp32_model`` built for ``tgt``; None where that
    graph cannot be built or run here (the quantized artifact itself is fine). ``fp32_model`` is
    the graph as the quantize pass received it (the passes before it, rotations or sparse
    attention, included; the quantizer works on a copy): one holding Q/DQ pairs already (a
    quantized .onnx given as the source) has no fp32 graph to compare with."""
    from edgec.fidelity import verification_session
    from edgec.onnx_io import save_model

    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
           for n in fp32_model.graph.all_nodes()):
        return None
    if first_run_s > SLOW_RUN_S:
        return {"skipped": f"a run takes {first_run_s:.2f} s; time the two with `edgec bench` "
                           "(compile once without --quantize)"}

    run_s = max(first_run_s, 1e-5)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, BUDGET_S // (2 * (BLOCK + 1) * run_s))))
    block = int(min(MAX_BLOCK, max(BLOCK, BUDGET_S / (2 * rounds * run_s) - 1)))
    with tempfile.TemporaryDirectory(prefix="edgec-fp32-") as tmp:
        stage = Path(tmp)
        try:
            save_model(fp32_model, stage / "model.onnx")
            built = tgt.build(tgt, stage / "model.onnx", stage / "target")
            fp32, stand_in = verification_session(stage, built)
            if stand_in or fp32.emulator:
                return None
            fp32.run(feeds)  # warm-up (first-run allocations, OpenVINO's lazy compile)
            out = interleaved_speedup(fp32, session, feeds, rounds, block)
        except Exception as e:  # noqa: BLE001 (a comparison that cannot run is not a failure)
            logger.warning("the fp32 source graph could not be timed on %s beside the quantized "
                           "artifact (%s: %s); the report leaves the speedup out", tgt.name,
                           type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
        finally:
            fp32 = None  # release the session before its directory goes
    return out


def speed_line(vs: dict[str, Any]) -> str:
    """The report's words for a ``vs_fp32`` entry."""
    if "skipped" in vs:
        return f"not timed beside the fp32 graph: {vs['skipped']}"
    slower = " (slower: quantization does not pay here)" if vs["speedup"] < SLOWER else ""
    step = (f"a decode step on {vs['decode_past']} cached tokens: " if "decode_past" in vs
            else "")
    return (f"{step}{vs['speedup']:.2f}× the fp32 graph's speed on this machine{slower} "
            f"(p50 {vs['p50_ms']:.3g} vs {vs['fp32_p50_ms']:.3g} ms, {vs['rounds']} interleaved "
            f"rounds of {vs['block']} runs each)")
