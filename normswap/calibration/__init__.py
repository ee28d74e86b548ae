"""Calibration and healing of a converted trained model, without labels: closed-form affine fits
(fit.py), distillation (heal.py), and the drift measured after each stage (drift.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import targets
from ..plan import Plan
from ..torchutil import Timings
from .attribution import DEFAULT_SAMPLES, SiteCost, site_costs
from .data import FORMATS, check_model_accepts, load_calibration_tensor
from .device import DEVICE_CHOICES, placed, resolve_device, to_device
from .drift import Drift, measure_drift
from .fit import CALIBRATION_SAMPLES, Calibration, SiteFit, Swapped, calibrate, calibrate_sites
from .healing import HealPoint, HealResult, heal, heal_on
from .heldout import HeldOutScore
from .options import HealOptions
from .stream import InputBatches, batch_length, input_batches, model_inputs


@dataclass
class CalibrationOutcome:
    """What calibration and healing did to a converted model, on the calibration data."""

    fits: list[SiteFit] = field(default_factory=list)  # per calibrated site
    attribution: list[SiteCost] = field(default_factory=list)  # what each site costs alone, worst first
    healing: HealResult | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # "swap" / "calibrated" / "healed"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    heldout_samples: int = 0  # where the drift of every stage was measured


# measured with benchmarks/bench_finetune.py (README: Limits)
UNHEALED_NOTE = (
    "calibrated, not healed: heal before training this model on (--heal, heal=HealOptions()), or warm the "
    "learning rate up; at its original's rate the calibrated ResNet-20 of the README's benchmark collapsed "
    "(79.1% -> 26.9% in 150 steps) where the healed one trained"
)


def calibrate_and_heal(
    converted: nn.Module,
    original: nn.Module,
    plan: Plan,
    data: Any,
    options: HealOptions | None = None,
    device: str | torch.device | None = "auto",
    attribution_samples: int = DEFAULT_SAMPLES,
    memory_limit: int | None = None,
    *,
    inputs: int | None = None,
    progress: bool | None = None,
    fit_eps: bool = True,
) -> CalibrationOutcome:
    """Calibrate `converted` toward `original`, then heal it when `options` is given (and its
    steps are not 0), on `device`; measure what each site costs alone on `attribution_samples`
    inputs (0: not measured) and the drift after each stage.

    The data (anything `input_batches` reads; items of a batch past `inputs` are labels) is split
    once: a held-out part no stage trains on, where the drift of every stage is measured and
    healing is judged, and the rest, whose first `CALIBRATION_SAMPLES` samples calibrate and which
    healing streams. `memory_limit` bounds the activations calibration holds (bytes; default: half
    of what is available); `fit_eps=False` keeps each new layer's eps (see `calibrate`)."""
    timings = Timings()
    with timings.measure("calibrate"):
        outcome = _calibrate_and_heal(
            converted,
            original,
            plan,
            input_batches(data, inputs=inputs),
            options,
            resolve_device(device),
            attribution_samples,
            memory_limit,
            progress,
            fit_eps,
        )
    outcome.seconds = timings.seconds["calibrate"]
    return outcome


def _calibrate_and_heal(
    converted: nn.Module,
    original: nn.Module,
    plan: Plan,
    stream: InputBatches,
    options: HealOptions | None,
    where: torch.device,
    attribution_samples: int,
    memory_limit: int | None,
    progress: bool | None,
    fit_eps: bool,
) -> CalibrationOutcome:
    outcome = CalibrationOutcome()
    split = stream.split((options or HealOptions()).heldout_samples(stream.samples))
    train, heldout = split.train, split.heldout
    fitting = [to_device(b, where) for b in train.head(CALIBRATION_SAMPLES)]
    judged = [to_device(b, where) for b in heldout] or fitting
    if not heldout:
        outcome.notes.append(
            "the data is one batch: drift is measured on the batches calibration fits, not on held-out ones"
        )
    outcome.heldout_samples = sum(batch_length(b) for b in judged)
    with placed(where, converted, original):
        # one sentence naming the batch, before any stage
        check_model_accepts(original, fitting, first_index=split.train_from)
        check_model_accepts(original, heldout, first_index=split.heldout_from)
        if attribution_samples:
            outcome.attribution = site_costs(original, plan, fitting, samples=attribution_samples)
        outcome.drift["swap"] = measure_drift(original, converted, judged)
        if any(e.converts and targets.get(e.target).calibrated for e in plan):  # frozen / fold keep the function
            swapped = Swapped.of(converted, plan)
            calibration = calibrate_sites(
                converted, original, fitting, plan, device=where, memory_limit=memory_limit, fit_eps=fit_eps
            )
            outcome.fits = calibration.fits
            outcome.notes.extend(calibration.notes)
            swap, calibrated = outcome.drift["swap"], measure_drift(original, converted, judged)
            outcome.drift["calibrated"] = calibrated
            # each fit is the best affine for its own site, not for the model's output: where the
            # fits together move the output away (seen on a recurrent model), the swap is kept
            if calibrated.function_kept < swap.function_kept:
                swapped.restore(converted, plan)
                outcome.fits = [dataclasses.replace(fit, eps=None) for fit in outcome.fits]  # no eps was kept
                outcome.drift["calibrated"] = swap  # the model returned
                outcome.notes.append(
                    f"calibration lowered held-out {swap.measure} from {swap.function_kept:.1%} to {calibrated.function_kept:.1%}: "
                    "the swapped layers' parameters were kept"
                )
        if options is not None and options.steps != 0:
            outcome.healing = heal_on(converted, original, train, heldout, options, where, progress)
            if not outcome.healing.improved:
                outcome.notes.append(
                    "healing did not improve on the held-out data: the calibrated parameters were kept (try a lower --heal-lr)"
                )
            outcome.drift["healed"] = measure_drift(original, converted, judged)
        elif "calibrated" in outcome.drift:
            outcome.notes.append(UNHEALED_NOTE)
    outcome.notes.extend(stream.notes)
    return outcome


__all__ = [
    "DEVICE_CHOICES",
    "FORMATS",
    "Calibration",
    "CalibrationOutcome",
    "Drift",
    "HealOptions",
    "HealPoint",
    "HealResult",
    "HeldOutScore",
    "InputBatches",
    "SiteCost",
    "SiteFit",
    "calibrate",
    "calibrate_and_heal",
    "calibrate_sites",
    "check_model_accepts",
    "heal",
    "heal_on",
    "input_batches",
    "load_calibration_tensor",
    "measure_drift",
    "model_inputs",
    "resolve_device",
    "site_costs",
]
