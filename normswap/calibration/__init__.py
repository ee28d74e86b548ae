"""Calibration and healing of a converted trained model, without labels: closed-form affine fits
(fit.py), distillation (heal.py), and the drift measured after each stage (drift.py)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import targets
from ..plan import Plan
from ..torchutil import Timings
from .attribution import DEFAULT_SAMPLES, SiteCost, site_costs
from .data import FORMATS, batches_from_tensor, check_batches, check_model_accepts, load_calibration_tensor
from .device import DEVICE_CHOICES, placed, resolve_device, to_device
from .drift import Drift, measure_drift
from .fit import Calibration, SiteFit, calibrate, calibrate_sites
from .healing import HealResult, heal
from .options import HealOptions


@dataclass
class CalibrationOutcome:
    """What calibration and healing did to a converted model, on the calibration data."""

    fits: list[SiteFit] = field(default_factory=list)  # per calibrated site
    attribution: list[SiteCost] = field(default_factory=list)  # what each site costs alone, worst first
    healing: HealResult | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # "swap" / "calibrated" / "healed"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def calibrate_and_heal(
    converted: nn.Module,
    original: nn.Module,
    plan: Plan,
    data: Iterable[Any],
    options: HealOptions | None = None,
    device: str | torch.device | None = "auto",
    attribution_samples: int = DEFAULT_SAMPLES,
    memory_limit: int | None = None,
) -> CalibrationOutcome:
    """Calibrate `converted` toward `original`, then heal it when `options` is given (and its
    steps are not 0), on `device`; measure what each site costs alone on `attribution_samples`
    inputs (0: not measured) and the drift after each stage; all on the calibration data.
    `memory_limit` bounds the activations calibration holds (bytes; default: half of what is
    available)."""
    timings = Timings()
    with timings.measure("calibrate"):
        outcome = _calibrate_and_heal(
            converted, original, plan, data, options, resolve_device(device), attribution_samples, memory_limit
        )
    outcome.seconds = timings.seconds["calibrate"]
    return outcome


def _calibrate_and_heal(
    converted: nn.Module,
    original: nn.Module,
    plan: Plan,
    data: Iterable[Any],
    options: HealOptions | None,
    where: torch.device,
    attribution_samples: int,
    memory_limit: int | None,
) -> CalibrationOutcome:
    outcome = CalibrationOutcome()
    batches = [to_device(b, where) for b in check_batches(data)]
    with placed(where, converted, original):
        if attribution_samples:
            outcome.attribution = site_costs(original, plan, batches, samples=attribution_samples)
        outcome.drift["swap"] = measure_drift(original, converted, batches)
        if any(e.converts and targets.get(e.target).calibrated for e in plan):  # frozen / fold keep the function
            calibration = calibrate_sites(
                converted, original, batches, plan, device=where, memory_limit=memory_limit, drift=True
            )
            outcome.fits = calibration.fits
            outcome.notes.extend(calibration.notes)
            outcome.drift["calibrated"] = calibration.drift or measure_drift(original, converted, batches)
        if options is not None and options.steps != 0:
            outcome.healing = heal(converted, original, batches, options, device=where)
            if outcome.healing.best_heldout_loss >= outcome.healing.initial_heldout_loss:
                outcome.notes.append(
                    "healing did not lower the held-out loss: the calibrated parameters were kept (try a lower --heal-lr)"
                )
            outcome.drift["healed"] = measure_drift(original, converted, batches)
    return outcome


__all__ = [
    "DEVICE_CHOICES",
    "FORMATS",
    "Calibration",
    "CalibrationOutcome",
    "Drift",
    "HealOptions",
    "HealResult",
    "SiteCost",
    "SiteFit",
    "batches_from_tensor",
    "calibrate",
    "calibrate_and_heal",
    "calibrate_sites",
    "check_batches",
    "check_model_accepts",
    "heal",
    "load_calibration_tensor",
    "measure_drift",
    "resolve_device",
    "site_costs",
]
