"""Calibration and healing of a converted trained model, without labels: closed-form affine fits
(fit.py), distillation (heal.py), and the drift measured after each stage (drift.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..rewrite import Conversion
from .data import FORMATS, batches_from_tensor, check_batches, load_calibration_tensor
from .drift import Drift, measure_drift
from .fit import SiteFit, calibrate
from .heal import HealResult, heal
from .options import HealOptions


def calibrate_and_heal(conversion: Conversion, original: nn.Module, data: Iterable[Any], options: HealOptions | None = None) -> None:
    """Calibrate `conversion.model` toward `original`, then heal it when `options.steps` > 0;
    per-site fits go to `conversion.calibration`, drift after each stage to `conversion.drift`."""
    options = options or HealOptions()
    start = time.perf_counter()
    batches = check_batches(data)
    conversion.drift["swap"] = measure_drift(original, conversion.model, batches)
    conversion.calibration = calibrate(conversion.model, original, batches, conversion.plan)
    conversion.drift["calibrated"] = measure_drift(original, conversion.model, batches)
    if options.steps:
        heal(conversion.model, original, batches, options)
        conversion.drift["healed"] = measure_drift(original, conversion.model, batches)
    conversion.timings["calibrate"] = time.perf_counter() - start


__all__ = [
    "FORMATS",
    "Drift",
    "HealOptions",
    "HealResult",
    "SiteFit",
    "batches_from_tensor",
    "calibrate",
    "calibrate_and_heal",
    "check_batches",
    "heal",
    "load_calibration_tensor",
    "measure_drift",
]
