"""Export to ONNX (onnx.py) and check the file with onnxruntime against PyTorch (validate.py),
including what BatchNorm is left (residual.py)."""

from __future__ import annotations

from .onnx import ExportInfo, check_opset, export_info, export_onnx, export_onnx_with_info
from .validate import Validation, validate_onnx

__all__ = [
    "ExportInfo",
    "Validation",
    "check_opset",
    "export_info",
    "export_onnx",
    "export_onnx_with_info",
    "validate_onnx",
]
