import numpy as np
import onnx_ir as ir
import pytest
import torch

import edgec
from edgec.errors import UserError


@pytest.mark.parametrize("which", [0, 1])
def test_session_contract(dit_tiny_artifacts, which):
    art = dit_tiny_artifacts[which]
    sess = edgec.load(art.path)
    assert [i.name for i in sess.inputs] == ["latent", "timestep", "text"]
    assert [o.name for o in sess.outputs] == ["output"]
    feeds = sess.default_feeds
    out = sess.run(feeds)["output"]
    assert out.shape == feeds["latent"].shape and out.dtype == np.float32
    stats = sess.benchmark(warmup=1, iterations=3)
    assert set(stats) >= {"p50_ms", "p90_ms", "mean_ms"} and stats["p50_ms"] > 0
    assert "emulator" not in stats
    # before any generate()/sample(): None (was an AttributeError)
    assert sess.last_generation is None and sess.last_sampling is None
    # iterations=0 was an IndexError from np.percentile; warmup=-1 was taken as 0
    for bad, message in ((dict(iterations=0), "iterations must be an integer ≥ 1"),
                         (dict(warmup=-1), "warmup must be an integer ≥ 0")):
        with pytest.raises(UserError, match=message):
            sess.benchmark(**bad)


def test_dynamic_batch_runs_on_both_runtimes(dit_tiny_artifacts):
    a, b = (edgec.load(x.path) for x in dit_tiny_artifacts)
    # OpenVINO's specs named dynamic dims per input ('latent_0'), ORT's and the manifest's 'batch'
    assert a.inputs == b.inputs and a.outputs == b.outputs
    assert [list(i.shape) for i in b.inputs] == [i["shape"] for i in b.manifest["inputs"]]
    assert b.inputs[0].shape[0] == "batch"
    feeds = {k: np.concatenate([v, v, v][: 3]) if k != "timestep" else np.concatenate([v] * 3)
             for k, v in a.default_feeds.items()}
    oa, ob = a.run(feeds)["output"], b.run(feeds)["output"]
    assert oa.shape[0] == 3 * a.default_feeds["latent"].shape[0]
    np.testing.assert_allclose(ob, oa, rtol=1e-4, atol=1e-4)


def test_bad_feeds_are_user_errors(dit_tiny_artifacts):
    sess = edgec.load(dit_tiny_artifacts[1].path)
    feeds = dict(sess.default_feeds)
    with pytest.raises(UserError, match="missing"):
        sess.run({k: v for k, v in feeds.items() if k != "text"})
    with pytest.raises(UserError, match="shape .* the model wants \\['batch', "):
        sess.run({**feeds, "latent": feeds["latent"][0]})
    # W=1 < patch size: PyTorch cannot run it either, so the export kept torch's width >= 2
    with pytest.raises(UserError, match=r"'latent' has width = 1 \(axis 4\), but the model "
                                        r"was exported for width >= 2 only"):
        sess.run({**feeds, "latent": feeds["latent"][..., :1]})
    del sess.manifest["inputs"][0]["dim_ranges"]  # past that check: the runtime's own failure
    with pytest.raises(UserError, match="could not run the model"):
        sess.run({**feeds, "latent": feeds["latent"][..., :1]})
    with pytest.raises(UserError, match="dtype"):
        sess.run({**feeds, "latent": feeds["latent"].astype(np.complex64)})


def test_runtime_failures_on_checked_feeds_are_user_errors(dit_tiny_artifacts, capfd):
    """ORT's own exceptions (Fail, InvalidArgument) are not RuntimeErrors: a latent narrower
    than the patch was an internal error on ort-cpu, with ORT's red log line on stderr."""
    sess = edgec.load(dit_tiny_artifacts[0].path)
    feeds = dict(sess.default_feeds)
    capfd.readouterr()
    del sess.manifest["inputs"][0]["dim_ranges"]  # refused before the run since width >= 2
    with pytest.raises(UserError, match="onnxruntime could not run the model on these inputs"):
        sess.run({**feeds, "latent": feeds["latent"][..., :1]})
    assert "onnxruntime" not in capfd.readouterr().err


def test_load_refuses_non_artifacts(tmp_path):
    with pytest.raises(UserError, match="no such artifact"):
        edgec.load(tmp_path / "missing")
    with pytest.raises(UserError, match="not an edgec artifact"):
        edgec.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        edgec.load(tmp_path)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    """OpenVINO answered ids past the embedding table with all-zero logits (exit 0) and ORT
    with a Gather error read as edgec's fault; the manifest now records the table size of each
    index input and runs and calibration samples (every one in the file) are checked against it."""
    art = edgec.compile("llama", target="openvino-cpu", config="tiny", output_dir=tmp_path / "o")
    (spec,) = art.manifest["inputs"]
    assert spec["name"] == "input_ids" and spec["index_bound"] == 256  # llama tiny's vocab
    sess = edgec.load(art.path)
    ids = sess.default_feeds["input_ids"]
    assert np.isfinite(sess.run({"input_ids": ids})["logits"]).all()
    for bad in (256, -1):
        with pytest.raises(UserError, match=f"holds {bad}, outside \\[0, 256\\).*tokenizer"):
            sess.run({"input_ids": np.full_like(ids, bad)})
    # the file's last sample is one the floor holds out: it was stored in held_out.npz unchecked
    data = np.zeros((20, *ids.shape), ids.dtype)
    data[19, 0, 0] = 300
    np.savez(tmp_path / "data.npz", input_ids=data)
    with pytest.raises(UserError, match="data.npz: input 'input_ids' sample 19 holds 300"):
        edgec.calibrate("llama", target="ort-cpu", config="tiny", data=tmp_path / "data.npz",
                        output_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


class Indexed(torch.nn.Module):
    """``table[i, j]`` exports as GatherND (negatives count from the end, as in PyTorch),
    ``index_select`` along axis 1 as Gather (PyTorch refuses negatives)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(30, dtype=torch.float32).reshape(3, 10))

    def forward(self, i, j):
        return self.table[i, j] + torch.index_select(self.table, 1, j)


def test_tensor_indexing_of_a_buffer_is_bounded(tmp_path):
    """OpenVINO answered ``table[i]`` with i past the buffer with 0 (exit 0): only Gather on
    axis 0 (nn.Embedding) was recognised as indexing a table, not GatherND or other axes."""
    ex = (torch.tensor([0, 1]), torch.tensor([2, 3]))
    art = edgec.compile(Indexed(), target="openvino-cpu", output_dir=tmp_path / "o",
                        example_inputs=ex, dynamic_shapes={"i": {0: "n"}, "j": {0: "n"}})
    assert [{k: v for k, v in s.items() if k.startswith("index")}
            for s in art.manifest["inputs"]] == [{"index_bound": 3, "index_negative": True},
                                                 {"index_bound": 10}]
    sess = art.load()
    i, j = np.array([-3, 2]), np.array([0, 9])
    np.testing.assert_array_equal(sess.run({"i": i, "j": j})["output"],
                                  Indexed()(torch.tensor(i), torch.tensor(j)).numpy())
    for bad, what in ((dict(i=np.array([3, 0])), "'i' holds 3, outside \\[-3, 3\\)"),
                      (dict(i=np.array([-4, 0])), "'i' holds -4, outside \\[-3, 3\\)"),
                      (dict(j=np.array([0, 10])), "'j' holds 10, outside \\[0, 10\\)"),
                      (dict(j=np.array([-1, 0])), "'j' holds -1, outside \\[0, 10\\)")):
        with pytest.raises(UserError, match=what):
            sess.run({"i": i, "j": j, **bad})
    # a buffer index is the user's, not a tokenizer's: the hint says so
    with pytest.raises(UserError, match=r"give indices in that range\)$"):
        sess.run({"i": i, "j": np.array([0, 10])})


def test_a_quantized_table_still_bounds_its_index_input():
    """qnn-htp's w8a8 puts the embedding behind a DequantizeLinear: the table was no constant
    any more, the manifest lost input_ids' bound and out-of-range ids reached the NPU."""
    import onnx
    from onnx import TensorProto, helper

    from edgec.exporters.index_inputs import index_bounds

    table = helper.make_tensor("table_q", TensorProto.UINT8, [7, 4], [1] * 28)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["table_q", "scale", "zero"], ["table"]),
         helper.make_node("Gather", ["table", "ids"], ["out"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        [table, helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
         helper.make_tensor("zero", TensorProto.UINT8, [], [0])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    onnx.checker.check_model(ir.to_proto(model))
    assert index_bounds(model) == {"ids": {"index_bound": 7}}


@pytest.mark.parametrize("which", [0, 1])
def test_threads_sharing_a_session_each_get_their_own_outputs(dit_tiny_artifacts, which):
    """OpenVINO's session ran every thread on one infer request: a thread got another's outputs
    (exit 0), or "Infer Request is busy" blamed on its inputs."""
    import threading

    sess = edgec.load(dit_tiny_artifacts[which].path)
    base, rng = sess.default_feeds, np.random.default_rng(0)
    feeds = [{**base, "latent": rng.standard_normal((b, *base["latent"].shape[1:]), np.float32),
              "timestep": np.repeat(base["timestep"][:1], b),
              "text": np.repeat(base["text"][:1], b, axis=0)} for b in (1, 2, 3, 1)]
    alone = [sess.run(f)["output"] for f in feeds]
    got, errors = [[] for _ in feeds], []

    def work(i):
        try:
            for _ in range(30):
                got[i].append(sess.run(feeds[i])["output"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for outs, ref in zip(got, alone):
        for out in outs:
            np.testing.assert_array_equal(out, ref)
