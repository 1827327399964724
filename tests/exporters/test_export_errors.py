"""Export failures are classified: the module's fault → UserError, the exporter's → not.

Also: a stored parameter map (or sampler) that is present but unreadable is an error, not "no
map".
"""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
import torch

from edgec.errors import EdgecError, InternalError, UserError
from edgec.exporters import export_module
from edgec.exporters.export_file import (
    PARAMETER_MAP_KEY,
    SAMPLING_KEY,
    stored_parameter_map,
    stored_sampling,
)


class DataDependent(torch.nn.Module):
    """Python branches on a tensor value: torch.export cannot trace one graph for it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class KthValue(torch.nn.Module):
    """aten.kthvalue has no ONNX translation in torch.onnx (torch 2.13)."""

    def forward(self, x):
        return torch.kthvalue(x, 2, dim=-1)[0]


class Plain(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


X = (torch.randn(3, 4),)


def test_data_dependent_control_flow_is_a_user_error():
    with pytest.raises(UserError, match=r"torch\.export cannot capture DataDependent\.f") as e:
        export_module(DataDependent(), X)
    msg = str(e.value)
    assert "torch.where" in msg and "\n" not in msg
    assert "data-dependent" in msg  # torch.export's own reason is kept


class ConstantSized(torch.nn.Module):
    """Adds a tensor of a fixed size: a batch declared dynamic is tied to 2."""

    def forward(self, x):
        return x + torch.ones(2, 3)


def test_a_dynamic_dim_forward_fixes_is_named_with_what_to_do():
    """The message was the first line of torch's ("Found the following conflicts ...:;") with
    advice about Python branches, which this is not."""
    with pytest.raises(UserError, match=r"fixes inputs\['x'\]\.shape\[0\] to 2, which "
                                        r"dynamic_shapes declares dynamic") as e:
        export_module(ConstantSized(), (torch.randn(2, 3),), {"x": {0: "batch"}})
    assert "\n" not in str(e.value) and "branch" not in str(e.value)


class AddsAnInput(torch.nn.Module):
    def forward(self, x, y):
        return x + y


def test_a_dynamic_dim_tied_to_another_inputs_fixed_dim_says_to_declare_that_one():
    """x's dim declared dynamic, y's of the same size not: the hint said to build the tensor
    with x.new_ones(...), where y is an input and its dim wants declaring under x's name."""
    with pytest.raises(UserError, match=r"fixes inputs\['x'\]\.shape\[1\] to 5") as e:
        export_module(AddsAnInput(), (torch.randn(2, 5), torch.randn(2, 5)), {"x": {1: "n"}})
    msg = str(e.value)
    assert "if that is input dim y.shape[1], which dynamic_shapes leaves fixed, declare that " \
           "dim dynamic too under the same name: dynamic_shapes {'y': {1: 'n'}}" in msg, msg
    assert "\n" not in msg


def test_a_failed_capture_prints_nothing_but_the_refusal(capfd):
    """torch printed a warning and the traced graph (~38 lines) before the one-line refusal."""
    with pytest.raises(UserError, match="cannot capture DataDependent"):
        export_module(DataDependent(), X, {"x": {0: "batch"}})
    err = capfd.readouterr().err
    assert "def forward" not in err and "symbolic_shapes" not in err, err


def test_operator_without_onnx_translation_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"KthValue uses the operator aten\.kthvalue, which has no "
                                        r"ONNX translation"):
        export_module(KthValue(), X)


class HistcNoRange(torch.nn.Module):
    """histc without min/max: its ONNX translation raises NotImplementedError for this use."""

    def forward(self, x):
        return torch.histc(x, bins=4)


def test_use_an_op_translation_rejects_is_a_user_error():
    with pytest.raises(UserError, match=r"cannot translate this use of aten\.histc: .*min == max"):
        export_module(HistcNoRange(), X)


def test_simulated_dispatch_error_names_the_operator(monkeypatch):
    from torch.onnx._internal.exporter._errors import ConversionError, DispatchError

    def export(*args, **kwargs):
        try:
            raise DispatchError("No ONNX function found for <OpOverload(op='aten.frob', "
                                "overload='Tensor')>. Failure message: none registered")
        except DispatchError as inner:
            raise ConversionError("Failed to convert ... step 3/3 ...") from inner

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(UserError, match=r"the operator aten\.frob\.Tensor"):
        export_module(Plain(), X)


@pytest.mark.parametrize("crash", [AssertionError("Bug: Expected 'x' to be a string"),
                                   KeyError("val_3"), RuntimeError("onnxscript optimizer broke")])
def test_exporter_crash_is_not_a_user_error(monkeypatch, crash):
    def export(*args, **kwargs):
        raise crash

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(EdgecError) as e:
        export_module(Plain(), X)
    assert isinstance(e.value, InternalError) and not isinstance(e.value, UserError)
    assert e.value.__cause__ is crash
    assert "torch.onnx.export failed inside torch.onnx.export for Plain" in str(e.value)
    assert type(crash).__name__ in str(e.value)


def test_conversion_crash_names_the_stage_and_node(monkeypatch):
    """A KeyError deep in step 3, wrapped as the exporter does: internal, with where it broke."""
    from torch.onnx._internal.exporter._errors import ConversionError

    def export(*args, **kwargs):
        try:
            try:
                raise KeyError("val_7")
            except KeyError as root:
                raise ConversionError("Error when translating node %add : call_function["
                                      "target=torch.ops.aten.add.Tensor]") from root
        except ConversionError as mid:
            raise ConversionError("Failed to convert the exported program to an ONNX model. "
                                  "\x1b[96mThis is step 3/3\x1b[0m of exporting") from mid

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(InternalError, match=r"while translating the graph to ONNX at "
                                            r"aten\.add\.Tensor for Plain: KeyError"):
        export_module(Plain(), X)


def _model_with(raw: str | None) -> ir.Model:
    graph = ir.Graph([], [], nodes=[], name="g")
    model = ir.Model(graph, ir_version=10)
    if raw is not None:
        model.metadata_props[PARAMETER_MAP_KEY] = raw
    return model


def test_stored_parameter_map_missing_key_means_not_written_by_edgec():
    assert stored_parameter_map(_model_with(None)) == {}
    good = {"fc.weight": {"initializer": "val_0", "layout": "transposed"}}
    assert stored_parameter_map(_model_with(json.dumps(good))) == good
    assert stored_parameter_map(_model_with("{}")) == {}


@pytest.mark.parametrize("raw", [
    "{not json",
    "",
    json.dumps([["fc.weight", "val_0"]]),
    json.dumps({"fc.weight": "val_0"}),
    json.dumps({"fc.weight": {"layout": "same"}}),
    json.dumps({"fc.weight": {"initializer": 3, "layout": "same"}}),
    json.dumps({"fc.weight": {"initializer": "val_0", "layout": "sideways"}}),
])
def test_stored_parameter_map_corrupt_value_is_a_user_error(raw):
    with pytest.raises(UserError, match=rf"{PARAMETER_MAP_KEY}.*re-export the model with "
                                        r"`edgec export`"):
        stored_parameter_map(_model_with(raw))


SAMPLER = {"kind": "flow", "samples": {"x": "y"}, "timestep": "t", "conditions": ["c"]}


def test_stored_sampling_round_trips_and_is_checked_against_the_graph():
    model = _model_with(None)
    assert stored_sampling(model, ["x", "t", "c"], ["y"]) is None
    model.metadata_props[SAMPLING_KEY] = json.dumps(SAMPLER)
    assert stored_sampling(model, ["x", "t", "c"], ["y"]) == SAMPLER


@pytest.mark.parametrize("raw, names, problem", [
    ("{not json", ["x", "t", "c"], "not valid JSON"),
    ("[]", ["x", "t", "c"], "expected a non-empty object"),
    (json.dumps({**SAMPLER, "kind": "ode"}), ["x", "t", "c"], "sampler kind 'ode' unknown"),
    (json.dumps({k: v for k, v in SAMPLER.items() if k != "samples"}), ["x", "t", "c"],
     "KeyError"),
    (json.dumps(SAMPLER), ["x", "t"], "'c' is not a graph input"),  # the graph was edited
])
def test_stored_sampling_corrupt_value_is_a_user_error(raw, names, problem):
    model = _model_with(None)
    model.metadata_props[SAMPLING_KEY] = raw
    with pytest.raises(UserError, match=rf"{SAMPLING_KEY} metadata .*{problem}.*re-export the "
                                        r"model with `edgec export`"):
        stored_sampling(model, names, ["y"])
