"""normswap: find BatchNorm in PyTorch models, judge it, and rewrite it into batch-independent norms."""
from __future__ import annotations

__version__ = "0.1.0"

from .context import Context
from .convert import Conversion, apply_plan, convert
from .errors import NormswapError
from .plan import Plan, PlanEntry
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
    "apply_plan",
    "convert",
    "recording_construction",
]
