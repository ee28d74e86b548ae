"""normswap: find BatchNorm in PyTorch models, judge it, and rewrite it into batch-independent norms."""
from __future__ import annotations

__version__ = "0.1.0"

from .calibrate import calibrate
from .context import Context
from .convert import Conversion, apply_plan, convert
from .errors import NormswapError
from .heal import heal
from .lint import lint
from .onnx_export import export_onnx
from .validate import Validation, validate_onnx
from .pipeline import load_converted
from .plan import Plan, PlanEntry
from .report import Report
from .sites import Site
from .source import SourceLocation, recording_construction

__all__ = [
    "Context",
    "Conversion",
    "NormswapError",
    "Plan",
    "PlanEntry",
    "Site",
    "SourceLocation",
    "__version__",
    "Report",
    "Validation",
    "apply_plan",
    "calibrate",
    "convert",
    "export_onnx",
    "heal",
    "lint",
    "load_converted",
    "recording_construction",
    "validate_onnx",
]
