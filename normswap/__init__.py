"""normswap: find BatchNorm in PyTorch models, judge it, and rewrite it into batch-independent norms.

The pipeline, one package or module per stage:
capture/ + sites -> rules/ + advise + policy -> targets/ + passes/ + rewrite -> calibration/
-> export/ -> report + render/ -> cli/. This module re-exports the public API; each name is
imported on first use, so that `import normswap` (and the CLI's start, which holds signals
while torch imports) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_API = {
    "Context": ".context",
    "Conversion": ".conversion",
    "ConvertOptions": ".conversion",
    "HealOptions": ".calibration",
    "HealResult": ".calibration",
    "NormswapError": ".errors",
    "Plan": ".plan",
    "PlanEntry": ".plan",
    "Report": ".report",
    "Site": ".sites",
    "SourceLocation": ".source",
    "Validation": ".export",
    "apply_plan": ".rewrite",
    "calibrate": ".calibration",
    "convert": ".conversion",
    "export_onnx": ".export",
    "fix_source": ".fix",
    "from_pretrained": ".pretrained",
    "heal": ".calibration",
    "lint": ".linter",
    "load_converted": ".pipeline",
    "recording_construction": ".source",
    "validate_onnx": ".export",
}

__all__ = [
    "Context",
    "Conversion",
    "ConvertOptions",
    "HealOptions",
    "HealResult",
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
    "fix_source",
    "from_pretrained",
    "heal",
    "lint",
    "load_converted",
    "recording_construction",
    "validate_onnx",
]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'normswap' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .calibration import HealOptions, HealResult, calibrate, heal
    from .context import Context
    from .conversion import Conversion, ConvertOptions, convert
    from .errors import NormswapError
    from .export import Validation, export_onnx, validate_onnx
    from .fix import fix_source
    from .linter import lint
    from .pipeline import load_converted
    from .plan import Plan, PlanEntry
    from .pretrained import from_pretrained
    from .report import Report
    from .rewrite import apply_plan
    from .sites import Site
    from .source import SourceLocation, recording_construction
