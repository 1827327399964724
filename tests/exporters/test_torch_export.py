import logging

import numpy as np
import onnx_ir as ir
import pytest
import torch

import edgec
from edgec.errors import UserError
from edgec.exporters import export_module
from edgec.exporters.export_file import stored_parameter_map
from edgec.runtimes.ort import run_model


def test_parameter_map_traces_every_weight_with_its_layout(tiny_mlp):
    module, inputs = tiny_mlp
    result = export_module(module, inputs, {"x": {0: "batch"}})
    pmap = result.parameter_map
    assert set(pmap) == set(module.state_dict())
    inits = result.model.graph.initializers
    for param, entry in pmap.items():
        value = inits[entry["initializer"]].const_value.numpy()
        ref = module.state_dict()[param].numpy()
        expected = ref.T if entry["layout"] == "transposed" else ref
        np.testing.assert_array_equal(value, expected)
    # 3D input: the exporter folds the Linear transpose into an anonymous initializer
    assert pmap["fc1.weight"]["layout"] == "transposed"
    assert pmap["fc1.weight"]["initializer"] != "fc1.weight"


def test_names_and_dynamic_dims(tiny_mlp):
    module, inputs = tiny_mlp
    result = export_module(module, inputs, {"x": {0: "batch"}})
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert [v.name for v in result.model.graph.outputs] == ["output"]
    assert str(result.model.graph.inputs[0].shape[0]) == "batch"
    x = torch.randn(7, 5, 16)
    got = run_model(result.model, {"x": x.numpy()})["output"]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_export_writes_file_with_parameter_map(tmp_path, tiny_mlp):
    module, inputs = tiny_mlp
    path = edgec.export(module, inputs, tmp_path / "m.onnx", dynamic_shapes={"x": {0: "batch"}})
    model = ir.load(path)
    assert stored_parameter_map(model)["fc2.weight"]["layout"] in ("same", "transposed")
    assert (tmp_path / "m.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_bad_dynamic_shapes_and_inputs_are_user_errors(tiny_mlp):
    module, inputs = tiny_mlp
    with pytest.raises(UserError, match="not a forward argument"):
        export_module(module, inputs, {"y": {0: "batch"}})
    with pytest.raises(UserError, match="positional"):
        export_module(module, inputs + inputs)
    with pytest.raises(UserError, match="nn.Module"):
        export_module(lambda x: x, inputs)


def test_batch_one_example_keeps_the_batch_dynamic():
    """torch.export specializes a dynamic dim whose example size is 1; edgec traces at 2."""
    class Flatten(torch.nn.Module):
        def forward(self, x):
            b, n, d = x.shape
            return x.reshape(b, n * d).sum(-1, keepdim=True) * x[:, :1].reshape(b, d)

    result = export_module(Flatten(), (torch.randn(1, 4, 8),), {"x": {0: "batch"}})
    x = torch.randn(3, 4, 8)
    out = next(iter(run_model(result.model, {"x": x.numpy()}).values()))
    np.testing.assert_allclose(out, Flatten()(x).numpy(), rtol=1e-5, atol=1e-6)


class _Branchy(torch.nn.Module):
    def forward(self, x):  # torch.export traces batch >= 2 only
        return x * 2 if x.shape[0] > 1 else -x * 2


class _Shortcut(torch.nn.Module):
    def forward(self, x):  # the same numbers either way (transformers' `if seq_len > 1` masks)
        return x.sum(0) if x.shape[0] > 1 else x[0]


def test_a_branch_on_a_dynamic_dim_keeps_its_range(tmp_path):
    """forward branching on the batch: batch 1 silently ran the traced branch (signs flipped),
    and a batch-1 example failed "cosine -1.000000" without saying edgec traced it at 2."""
    from edgec.exporters.dim_ranges import DIM_RANGES_KEY
    from edgec.exporters.sources import resolve_source

    batch = {"x": {0: "batch"}}
    path = edgec.export(_Branchy(), (torch.randn(3, 4),), tmp_path / "b.onnx", batch)
    assert ir.load(path).metadata_props[DIM_RANGES_KEY] == '{"batch": {"min": 2}}'
    assert resolve_source(str(path)).feeds["x"].shape == (3, 4)  # the example's size
    bare = ir.load(path)  # an .onnx without the example's sizes: the range's least, not 1
    del bare.metadata_props["edgec.example_dims"]
    ir.save(bare, tmp_path / "bare.onnx")
    assert resolve_source(str(tmp_path / "bare.onnx")).feeds["x"].shape == (2, 4)
    with pytest.raises(UserError, match=r"^_Branchy.forward branches on batch \(torch.export "
                                        r"traced batch >= 2\), and the example's batch of 1 was "
                                        r"traced at 2: .* or leave batch out of dynamic_shapes$"):
        edgec.export(_Branchy(), (torch.randn(1, 4),), tmp_path / "one.onnx", batch)
    # checked against PyTorch below the range: a shortcut with the same numbers keeps none
    path = edgec.export(_Shortcut(), (torch.randn(3, 4),), tmp_path / "s.onnx", batch)
    assert DIM_RANGES_KEY not in ir.load(path).metadata_props


class _AreaBranch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[0] * x.shape[1] > 10 else -x


class _EvenBranch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.shape[1] % 2 == 0 else -x


class _Tied(torch.nn.Module):
    def forward(self, x, y):
        return x.reshape(-1).softmax(0).reshape(x.shape) + y


@pytest.mark.parametrize(("module", "guard"), [(_AreaBranch(), r"b\*s > 10"),
                                               (_EvenBranch(), r"s % 2 == 0")])
def test_a_branch_on_a_relation_of_dims_is_refused(tmp_path, module, guard):
    """b*s > 10 or s % 2 == 0: no per-dim range holds it, and run took (1, 1) or an odd s,
    returning the traced branch (signs flipped against PyTorch) with no dim_ranges at all."""
    with pytest.raises(UserError, match=rf"^{type(module).__name__}.forward branches on {guard} "
                                        r"\(torch.export traced the example's branch only; at "
                                        r".*\(leave (b and )?s out of dynamic_shapes\), or make "
                                        r"forward not branch on input sizes$"):
        edgec.export(module, (torch.randn(3, 8),), tmp_path / "m.onnx",
                     {"x": {0: "b", 1: "s"}})
    # dims torch.export ties without a branch (a shared name, a reshape) still export
    both = {"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}}
    edgec.export(_Tied(), (torch.randn(3, 8), torch.randn(3, 8)), tmp_path / "t.onnx", both)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_modules_map_their_parameters(dtype, tmp_path):
    """A bf16 module crashed in the parameter map (torch has no numpy view of bf16); compiling
    one is refused in one line (edgec verifies in float32), not an internal error."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, 3)).to(dtype)
    inputs = (torch.randn(2, 4, dtype=dtype),)
    pmap = export_module(module, inputs).parameter_map
    assert set(pmap) == set(module.state_dict())
    with pytest.raises(UserError, match=r"weights are torch\.(bfloat16|float16); .*module\.float"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o", example_inputs=inputs)
    assert not (tmp_path / "o").exists()


class _AMinus2B(torch.nn.Module):
    def forward(self, a, b):
        return a - 2 * b


def test_dict_example_inputs_bind_by_name(tmp_path):
    """A dict was bound in its own order: {'b': ones, 'a': zeros} swapped a and b silently."""
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    art = edgec.compile(_AMinus2B(), target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs={"b": ones, "a": zeros})
    feeds = art.load().default_feeds
    np.testing.assert_array_equal(feeds["a"], zeros.numpy())
    np.testing.assert_array_equal(feeds["b"], ones.numpy())
    with pytest.raises(UserError, match=r"names 'c', which is not a forward argument .*a, b"):
        edgec.compile(_AMinus2B(), target="ort-cpu", output_dir=tmp_path / "c",
                      example_inputs={"a": ones, "c": ones})
    with pytest.raises(UserError, match="gives no 'a', which forward takes before 'b' and has "
                                        "no default for"):
        edgec.compile(_AMinus2B(), target="ort-cpu", output_dir=tmp_path / "g",
                      example_inputs={"b": ones})


class _KwOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x, *, scale):
        return self.fc(x) * scale


def test_keyword_only_arguments_are_inputs_by_name(tmp_path):
    """forward(self, x, *, scale) with {"x", "scale"} said 'scale' "is not a forward
    argument"; it is an input named scale now, the parameters named as the module's."""
    x, scale = torch.randn(2, 3), torch.tensor(2.0)
    module = _KwOnly()
    art = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs={"x": x, "scale": scale}, dynamic_shapes={"x": {0: "b"}})
    assert [i["name"] for i in art.manifest["inputs"]] == ["x", "scale"]
    x5 = torch.randn(5, 3)
    got = art.load().run({"x": x5.numpy(), "scale": np.float32(3.0)})["output"]
    np.testing.assert_allclose(got, (module(x5, scale=torch.tensor(3.0))).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    from edgec.exporters.sources import resolve_source

    src = resolve_source(module, example_inputs={"x": x, "scale": scale})
    assert set(src.parameter_map) == {"fc.weight", "fc.bias"}
    with pytest.raises(UserError, match="gives no 'scale', a keyword-only argument "
                                        "_KwOnly.forward requires"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "n",
                      example_inputs={"x": x})


def test_arguments_after_a_defaulted_one_left_out_bind_by_name(tmp_path):
    """GPT2LMHeadModel with {"input_ids", "attention_mask"} was refused: forward takes the
    cache, which has a default, before attention_mask."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 32, (1, 6))
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0  # right padding: a left-padded query row attends to nothing
    art = edgec.compile(model, target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs={"input_ids": ids, "attention_mask": mask})
    assert [i["name"] for i in art.manifest["inputs"]] == ["input_ids", "attention_mask"]
    got = art.load().run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    np.testing.assert_allclose(got["logits"], ref, atol=1e-5)


def test_options_a_source_does_not_take_are_refused(tmp_path, tiny_mlp):
    """config= with an nn.Module and example_inputs= with a model name were silently ignored;
    dynamic_shapes= with a model name gave a misleading error."""
    module, inputs = tiny_mlp
    with pytest.raises(UserError, match="config applies to .* not to an nn.Module"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o", config="small",
                      example_inputs=inputs)
    with pytest.raises(UserError, match="example_inputs applies to an nn.Module or an .onnx"):
        edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o", example_inputs=inputs)
    # they replaced the model's own dims, and the export blamed the model for the input left out
    for generate in (False, True):
        with pytest.raises(UserError, match="reference model 'llama' declares its own dynamic"):
            edgec.compile("llama", target="ort-cpu", output_dir=tmp_path / "o",
                          generate=generate, dynamic_shapes={"input_ids": {0: "b"}})
    assert not (tmp_path / "o").exists()


class _Ids(torch.nn.Module):
    def forward(self, ids):
        return ids * 2


class _Output(torch.nn.Module):
    def forward(self, output):
        return output + 1


def test_dynamic_shapes_are_checked_against_the_example_and_take_the_list_form():
    """An axis past the rank was an InternalError; torch's list form a raw ValueError."""
    x = (torch.randn(2, 3),)
    with pytest.raises(UserError, match=r"dynamic_shapes\['ids'\] names axis 5, but the example "
                                        r"input has 2 axes"):
        export_module(_Ids(), x, {"ids": {5: "batch"}})
    with pytest.raises(UserError, match="lists 3 axes but the example input has 2"):
        export_module(_Ids(), x, {"ids": ["batch", "seq", None]})
    model = export_module(_Ids(), x, {"ids": [None, "seq"]}).model
    assert [str(d) for d in model.graph.inputs[0].shape] == ["2", "seq"]
    model = export_module(_Ids(), x, {"ids": None}).model  # None: static, as torch.export
    assert [str(d) for d in model.graph.inputs[0].shape] == ["2", "3"]


def test_one_dim_name_for_dims_of_different_sizes_says_so():
    """{0: "d", 1: "d"} at sizes 2 and 3 said forward combines a dim "with a tensor of a
    constant size"; the name given to two sizes was the cause."""
    with pytest.raises(UserError, match=r"^dynamic_shapes names both ids.shape\[0\] \(size 2 "
                                        r"in the example\) and ids.shape\[1\] \(size 3\) 'd', "
                                        r"and one name is one size; give each dim a name"):
        export_module(_Ids(), (torch.randn(2, 3),), {"ids": {0: "d", 1: "d"}})


def test_none_inputs_and_an_argument_named_output(tmp_path):
    """(x, None, b) was a raw 'Could not infer dtype of NoneType'; forward(self, output) a raw
    ORT 'Duplicate definition of name (output)'."""
    x = torch.randn(2, 3)
    with pytest.raises(UserError, match=r"example_inputs\[1\] is None"):
        edgec.compile(_AMinus2B(), target="ort-cpu", output_dir=tmp_path / "n",
                      example_inputs=(x, None))
    art = edgec.compile(_Output(), target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=(x,))
    assert [o["name"] for o in art.manifest["outputs"]] == ["output_out"]
    with pytest.raises(UserError, match="'output' is also an input name"):
        export_module(_Output(), (x,), output_names=["output"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class _Nested(torch.nn.Module):
    def forward(self, x):
        return (x + 1, (x * 2, [x.sum()]), None)


def test_none_in_returned_tuples_is_skipped(tmp_path):
    """A None inside a returned tuple was refused ('forward returned NoneType'); then skipped
    with two lines of torch's log on stderr ("Output node output has None output ...")."""
    x = torch.randn(2, 3)
    said = _Records()  # torch's handler holds the stderr of its import: capfd misses it
    logging.getLogger("torch.onnx._internal.exporter._core").addHandler(said)
    try:
        art = edgec.compile(_Nested(), target="ort-cpu", output_dir=tmp_path / "o",
                            example_inputs=(x,))
    finally:
        logging.getLogger("torch.onnx._internal.exporter._core").removeHandler(said)
    assert not said.records, said.records[0].getMessage()
    assert [o["name"] for o in art.manifest["outputs"]] == ["output_0", "output_1", "output_2"]
    got = art.load().run({"x": x.numpy()})
    np.testing.assert_allclose(got["output_2"], x.sum().numpy(), rtol=1e-6)


class _NoneBetween(torch.nn.Module):
    def forward(self, x):
        return x * 2, None, x.sum()


def test_a_none_keeps_the_position_of_the_outputs_after_it():
    """(y, None, s) named s output_1: its name no longer told where forward returned it."""
    x = torch.randn(2, 3)
    result = export_module(_NoneBetween(), (x,))
    assert result.output_names == ["output_0", "output_2"]
    got = run_model(result.model, {"x": x.numpy()})
    np.testing.assert_allclose(got["output_2"], x.sum().numpy(), rtol=1e-6)


class _Dict(torch.nn.Module):
    def forward(self, x):
        return {"b": x * 2, "skipped": None, "a": x + 1}


def test_dict_outputs_are_named_by_their_keys(tmp_path):
    """A dict / ModelOutput's outputs were output_0, output_1, ...; their keys name them."""
    from transformers.modeling_outputs import BaseModelOutput

    class Hf(torch.nn.Module):
        def forward(self, x):
            return BaseModelOutput(last_hidden_state=x * 3, hidden_states=None)

    x = torch.randn(2, 3)
    art = edgec.compile(_Dict(), target="ort-cpu", output_dir=tmp_path / "o",
                        example_inputs=(x,))
    assert [o["name"] for o in art.manifest["outputs"]] == ["b", "a"]
    got = art.load().run({"x": x.numpy()})
    np.testing.assert_allclose(got["b"], (x * 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["a"], (x + 1).numpy(), rtol=1e-6)
    assert export_module(Hf(), (x,)).output_names == ["last_hidden_state"]


class _Clash(torch.nn.Module):
    def forward(self, x):
        return {"x": x * 2, "x_out": x + 1}


def test_an_output_renamed_off_an_input_name_takes_a_free_name():
    """{"x": ..., "x_out": ...} with an input x: InternalError "Output names cannot be
    duplicated: ['x_out']"; the renamed key takes the first free x_out_<n>."""
    x = torch.randn(2, 3)
    result = export_module(_Clash(), (x,))
    assert result.output_names == ["x_out_1", "x_out"]
    got = run_model(result.model, {"x": x.numpy()})
    np.testing.assert_allclose(got["x_out_1"], (x * 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["x_out"], (x + 1).numpy(), rtol=1e-6)


def test_producer_is_edgec_and_its_version(tiny_mlp):
    """producer_version was torch's version ('producer edgec 2.13.0+cpu')."""
    model = export_module(*tiny_mlp).model
    assert (model.producer_name, model.producer_version) == ("edgec", edgec.__version__)


def test_compile_leaves_the_modules_training_flags_as_given(tmp_path):
    """edgec.compile left the user's module in eval mode."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    module[1].eval()
    edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "o",
                  example_inputs=(torch.randn(2, 4),))
    assert [m.training for m in module.modules()] == [True, True, False]


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(1))

    def forward(self, x):
        self.n += 1
        return x + self.n


def test_a_forward_changing_its_buffers_is_refused_and_the_module_left_as_given(tmp_path):
    """self.n += 1 in forward: compile left n at 2 and the artifact computed x + 2 forever,
    its check against PyTorch passing; a BatchNorm given in train mode must keep its stats."""
    module = _Counter()
    with pytest.raises(UserError, match=r"^_Counter.forward changes its buffer 'n' in place, "
                                        r"so its results depend on how often it ran"):
        edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "c",
                      example_inputs=(torch.randn(2, 3),))
    assert module.n.item() == 0
    bn = torch.nn.BatchNorm1d(3).train()
    bn.running_mean.fill_(0.5)
    edgec.compile(bn, target="ort-cpu", output_dir=tmp_path / "b",
                  example_inputs=(torch.randn(4, 3),))
    assert bn.training and torch.equal(bn.running_mean, torch.full((3,), 0.5))
    assert bn.num_batches_tracked.item() == 0


def test_a_guard_that_excludes_one_size_at_the_range_edge_becomes_a_range():
    """torch.export writes "text after the image tokens" as b*(s - 12) != 0; with b >= 1 it is
    s != 12, which a least of 13 holds where s's least was 12 (the VLM's pruned prefill was
    refused as an unexpressible branch). Other relations stay for the probe."""
    import sympy

    from edgec.exporters.dim_ranges import _one_excluded_size

    b, s = sympy.symbols("batch_size sequence_length", integer=True, positive=True)
    assert _one_excluded_size(sympy.Ne(b * (s - 12), 0), {}) == ("sequence_length", 12)
    assert _one_excluded_size(sympy.Ne(s - 3, 0), {}) == ("sequence_length", 3)
    assert _one_excluded_size(b * s > 10, {}) is None
    assert _one_excluded_size(sympy.Eq(sympy.Mod(s, 2), 0), {}) is None
    assert _one_excluded_size(sympy.Ne(b * s - 12, 0), {}) is None  # two dims in one factor
    # a dim that may be 0 is a factor that can vanish: not dropped
    assert _one_excluded_size(sympy.Ne(b * (s - 12), 0), {"batch_size": {"min": 0}}) is None


def test_exports_share_one_translation_registry_per_opset(tiny_mlp, monkeypatch):
    """torch.onnx's ATen translation registry is built once per opset and read by every
    export after it; outside an export torch's own function is back in place."""
    from torch.onnx._internal.exporter import _registration

    from edgec.exporters import torch_export

    real = _registration.ONNXRegistry.__dict__["from_torchlib"]
    built = []

    def counting(cls, *args, **kwargs):
        built.append(args or tuple(kwargs.values()))
        return real.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(torch_export, "_REGISTRIES", {})
    module, inputs = tiny_mlp
    first = export_module(module, inputs)
    second = export_module(module, inputs)
    third = export_module(module, inputs, opset=18)
    assert len(built) == 2 and len(torch_export._REGISTRIES) == 2  # opsets 20 and 18
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting
    x = inputs[0].numpy()
    for result in (first, second, third):
        np.testing.assert_allclose(run_model(result.model, {"x": x})["output"],
                                   module(inputs[0]).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert third.model.opset_imports[""] == 18
