"""torch.nn.Module → onnx_ir.Model with the dynamo exporter, plus the parameter map.

Input names are the module's ``forward`` argument names; outputs are ``output`` (one) or
``output_0..n`` unless names are given. Dynamic dims are given as ``{input: {axis: dim_name}}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import warnings
from collections.abc import Mapping, Sequence

import onnx_ir as ir
import torch

from edgec.errors import UserError
from edgec.exporters.param_map import build_parameter_map

__all__ = ["ExportResult", "export_module", "forward_input_names"]

logger = logging.getLogger(__name__)
OPSET = 20


@dataclasses.dataclass
class ExportResult:
    model: ir.Model
    parameter_map: dict[str, dict[str, str]]
    input_names: list[str]
    output_names: list[str]


def forward_input_names(module: torch.nn.Module, n: int) -> list[str]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < n:
        raise UserError(f"{type(module).__name__}.forward takes {len(params)} positional "
                        f"inputs but {n} example inputs were given")
    return [p.name for p in params[:n]]


def export_module(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``module`` (eval mode) with ``torch.onnx.export(dynamo=True)``."""
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(module).__name__}")
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise UserError("example_inputs must be a non-empty tuple of tensors, one per forward argument")
    module = module.eval()
    names = forward_input_names(module, len(example_inputs))
    shapes = None
    if dynamic_shapes:
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise UserError(f"dynamic_shapes names {unknown[0]!r}, which is not a forward "
                            f"argument (arguments: {', '.join(names)})")
        shapes = {n: dict(dynamic_shapes.get(n, {})) for n in names}
    with torch.no_grad():
        n_out = _count_outputs(module(*example_inputs))
    out_names = list(output_names) if output_names else (
        ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    # torchvision is optional; its missing-op registrations are not our users' concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        # The exporter prints its own progress to stdout and warns liberally; we report instead.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example_inputs, dynamo=True, dynamic_shapes=shapes,
                input_names=names, output_names=out_names, opset_version=OPSET,
                verbose=False, optimize=True,
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"torch.onnx.export failed for {type(module).__name__}: {first}") from e
    model = program.model
    model.producer_name = "edgec"
    pmap = build_parameter_map(model, module)
    logger.info("exported %s: %d nodes, %d initializers, %d parameters mapped",
                type(module).__name__, len(model.graph), len(model.graph.initializers), len(pmap))
    return ExportResult(model, pmap, names, out_names)


def _count_outputs(out) -> int:
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)):
        return sum(_count_outputs(o) for o in out)
    if isinstance(out, dict):
        return sum(_count_outputs(o) for o in out.values())
    raise UserError(f"forward returned {type(out).__name__}; edgec exports tensors, "
                    "tuples/lists/dicts of tensors")
