"""normswap: find BatchNorm in PyTorch models, judge it, and rewrite it into batch-independent norms.

The pipeline, one package or module per stage:
capture/ + sites -> rules/ + advise + policy -> targets/ + passes/ + rewrite -> calibration/
-> export/ -> report + render/ -> cli/. This module re-exports the public API.
"""

from __future__ import annotations

from ._version import __version__
from .calibration import HealOptions, calibrate, heal
from .context import Context
from .conversion import convert
from .errors import NormswapError
from .export import Validation, export_onnx, validate_onnx
from .linter import lint
from .pipeline import load_converted
from .plan import Plan, PlanEntry
from .report import Report
from .rewrite import Conversion, apply_plan
from .sites import Site
from .source import SourceLocation, recording_construction

__all__ = [
    "Context",
    "Conversion",
    "HealOptions",
    "NormswapError",
    "Plan",
    "PlanEntry",
    "Report",
    "Site",
    "SourceLocation",
    "Validation",
    "__version__",
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
