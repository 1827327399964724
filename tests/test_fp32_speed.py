"""The quantized artifact's speed beside its fp32 graph (``edgec.fp32_speed``): the paired
measurement's arithmetic on sessions with known run times, and when there is nothing to compare."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgec import fp32_speed

# the suite's compiles skip this timing (tests/conftest.py); here it is the real code under test
pytestmark = pytest.mark.usefixtures("timed_compiles")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Session:
    """Runs take ``ms`` on the fake clock; ``spike`` adds time to every run from round ``at``
    on (a load change mid-measurement)."""

    def __init__(self, clock, ms, spike=0.0, at=None):
        self.clock, self.ms, self.spike, self.at, self.runs = clock, ms, spike, at, 0

    def run(self, feeds):
        self.runs += 1
        late = self.at is not None and self.runs > self.at
        self.clock.now += (self.ms + (self.spike if late else 0.0)) / 1e3


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(fp32_speed.time, "perf_counter", c)
    return c


def test_speedup_is_the_paired_ratio_of_the_two_graphs(clock):
    out = fp32_speed.interleaved_speedup(_Session(clock, 6.0), _Session(clock, 2.0), {}, 4, 3)
    assert out["speedup"] == pytest.approx(3.0)
    assert out["fp32_p50_ms"] == pytest.approx(6.0) and out["p50_ms"] == pytest.approx(2.0)
    assert (out["rounds"], out["block"]) == (4, 3)


def test_a_load_change_moves_both_graphs_and_not_the_ratio(clock):
    # from the third round on every run is slower by a factor shared by both graphs
    base, cand = _Session(clock, 4.0), _Session(clock, 2.0)
    out = fp32_speed.interleaved_speedup(base, cand, {}, 6, 2)
    assert out["speedup"] == pytest.approx(2.0)
    base.spike, base.at = 8.0, base.runs + 6  # base doubles partway through the next run
    cand.spike, cand.at = 4.0, cand.runs + 6
    out = fp32_speed.interleaved_speedup(base, cand, {}, 6, 2)
    assert out["speedup"] == pytest.approx(2.0)
    assert out["fp32_p50_ms"] > 4.0  # the plain p50s moved


def test_a_graph_already_quantized_has_nothing_to_compare_with():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    scale = ir.Value(name="s", const_value=ir.tensor(1.0))
    q = ir.node("QuantizeLinear", [x, scale])
    graph = ir.Graph([x], q.outputs, nodes=[q], name="g", opset_imports={"": 21})
    assert fp32_speed.fp32_speedup(ir.Model(graph, ir_version=10), None, None, {}, 0.01) is None


@pytest.mark.parametrize("speedup, slower", [(0.8, True), (0.97, False), (1.6, False)])
def test_the_report_says_slower_only_when_clearly_slower(speedup, slower):
    line = fp32_speed.speed_line({"speedup": speedup, "p50_ms": 1.0, "fp32_p50_ms": 1.0,
                                  "rounds": 3, "block": 2})
    assert line.startswith(f"{speedup:.2f}× the fp32 graph's speed")
    assert ("slower" in line) == slower


def test_a_slow_graph_is_not_timed_and_the_report_says_how_to():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    relu = ir.node("Relu", [x])
    graph = ir.Graph([x], relu.outputs, nodes=[relu], name="g", opset_imports={"": 21})
    out = fp32_speed.fp32_speedup(ir.Model(graph, ir_version=10), None, None, {}, 3.0)
    assert out["skipped"].startswith("a run takes 3.00 s")
    assert fp32_speed.speed_line(out).startswith("not timed beside the fp32 graph: a run takes")


def _decoder_feeds(new=8, past=8, kv=2, head_dim=16, layers=2):
    feeds = {"input_ids": np.arange(new)[None].astype(np.int64),
             "attention_mask": np.ones((1, past + new), np.int64),
             "position_ids": np.arange(past, past + new)[None].astype(np.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv, past, head_dim), np.float32)
    return feeds


def test_a_decoders_step_is_its_last_token_on_a_cache_of_128():
    feeds = _decoder_feeds()
    step = fp32_speed.decode_step_feeds(feeds)
    assert step["input_ids"].tolist() == [[7]]
    assert step["attention_mask"].shape == (1, 129) and step["position_ids"].tolist() == [[128]]
    assert step["past_key_values.1.value"].shape == (1, 2, 128, 16)
    assert set(step) == set(feeds)
    assert fp32_speed.decode_step_feeds({k: v for k, v in feeds.items()
                                         if k != "position_ids"})["input_ids"].shape == (1, 1)
    # not a decoder this knows: no cache, or another input (a VLM's embeddings)
    assert fp32_speed.decode_step_feeds({"input_ids": feeds["input_ids"],
                                         "attention_mask": feeds["attention_mask"]}) is None
    assert fp32_speed.decode_step_feeds({**feeds, "inputs_embeds": np.zeros((1, 8, 4))}) is None
    line = fp32_speed.speed_line({"speedup": 2.0, "p50_ms": 1.0, "fp32_p50_ms": 2.0,
                                  "rounds": 3, "block": 2, "decode_past": 128})
    assert line.startswith("a decode step on 128 cached tokens: 2.00× the fp32 graph's speed")


def test_a_quantized_generation_artifact_is_timed_on_a_decode_step(tmp_path):
    """``--generate --quantize``: the fp32 decoder is built beside it and the two are timed on
    one decode step (128 cached tokens), the run a generation repeats; before, a generation
    artifact was not compared with fp32 at all."""
    import edgec

    art = edgec.compile("llama", target="ort-cpu", config="tiny", generate=True,
                        quantize="w8a16", output_dir=tmp_path / "o")
    vs = art.report["latency"]["vs_fp32"]
    assert vs["decode_past"] == 128 and vs["speedup"] > 0 and vs["fp32_p50_ms"] > 0
    assert "a decode step on 128 cached tokens:" in " ".join(
        (art.path / "report.md").read_text().split())


def test_a_decode_step_that_does_not_run_leaves_the_comparison_out(caplog):
    from edgec.pipeline import _decode_step_s

    class _Refuses:
        def run(self, feeds):
            raise RuntimeError("past length 128 exceeds the window\nmore")

    feeds = fp32_speed.decode_step_feeds(_decoder_feeds())
    assert _decode_step_s(_Refuses(), feeds) is None
    assert "a decode step on 128 cached tokens did not run (RuntimeError: past length 128" in (
        caplog.text)
