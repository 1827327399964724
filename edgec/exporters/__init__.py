"""torch / ONNX file / HF checkpoint → onnx_ir.Model, with verification against PyTorch."""

from edgec.exporters.verify import assert_close, compare_outputs

__all__ = ["ExportResult", "export_module", "compare_outputs", "assert_close"]


def __getattr__(name: str):
    """``export_module`` and ``ExportResult`` on first use: ``torch_export`` imports torch
    (~2 s), which a process that only opens or compares sessions (``edgec run``, a benchmark's
    child) never needs."""
    if name in ("ExportResult", "export_module"):
        from edgec.exporters import torch_export

        return getattr(torch_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
