"""Calibration and healing of a converted trained model, without labels: closed-form affine fits
(fit.py), distillation (heal.py), and the drift measured after each stage (drift.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import targets
from ..rewrite import Conversion
from .attribution import DEFAULT_SAMPLES, SiteCost, site_costs
from .data import FORMATS, batches_from_tensor, check_batches, check_model_accepts, load_calibration_tensor
from .device import DEVICE_CHOICES, placed, resolve_device, to_device
from .drift import Drift, measure_drift
from .fit import SiteFit, calibrate
from .healing import HealResult, heal
from .options import HealOptions


def calibrate_and_heal(
    conversion: Conversion,
    original: nn.Module,
    data: Iterable[Any],
    options: HealOptions | None = None,
    device: str | torch.device | None = "auto",
    attribution_samples: int = DEFAULT_SAMPLES,
) -> None:
    """Calibrate `conversion.model` toward `original`, then heal it when `options` is given (and
    its steps are not 0), on `device`; per-site fits go to `conversion.calibration`, drift after
    each stage to `conversion.drift`, what each site costs alone (on `attribution_samples`
    inputs; 0: not measured) to `conversion.attribution`; all on the calibration data."""
    start = time.perf_counter()
    where = resolve_device(device)
    batches = [to_device(b, where) for b in check_batches(data)]
    with placed(where, conversion.model, original):
        if attribution_samples:
            conversion.attribution = site_costs(original, conversion.plan, batches, samples=attribution_samples)
        conversion.drift["swap"] = measure_drift(original, conversion.model, batches)
        if any(e.converts and targets.get(e.target).calibrated for e in conversion.plan):  # frozen / fold keep the function
            conversion.calibration = calibrate(conversion.model, original, batches, conversion.plan, device=where)
            conversion.drift["calibrated"] = measure_drift(original, conversion.model, batches)
        if options is not None and options.steps != 0:
            conversion.healing = heal(conversion.model, original, batches, options, device=where)
            if conversion.healing.best_heldout_loss >= conversion.healing.initial_heldout_loss:
                conversion.notes.append("healing did not lower the held-out loss: the calibrated parameters were kept (try a lower --heal-lr)")
            conversion.drift["healed"] = measure_drift(original, conversion.model, batches)
    conversion.timings["calibrate"] = time.perf_counter() - start


__all__ = [
    "DEVICE_CHOICES",
    "FORMATS",
    "Drift",
    "HealOptions",
    "HealResult",
    "SiteCost",
    "SiteFit",
    "batches_from_tensor",
    "calibrate",
    "calibrate_and_heal",
    "check_batches",
    "check_model_accepts",
    "heal",
    "load_calibration_tensor",
    "measure_drift",
    "resolve_device",
    "site_costs",
]
