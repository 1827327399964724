"""torch / ONNX file / HF checkpoint → onnx_ir.Model, with verification against PyTorch."""

from edgec.exporters.torch_export import ExportResult, export_module
from edgec.exporters.verify import assert_close, compare_outputs

__all__ = ["ExportResult", "export_module", "compare_outputs", "assert_close"]
