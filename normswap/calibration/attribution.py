"""Where the function goes: what each converted site costs on its own.

For every site whose target changes the function (groupnorm, layernorm), the original model
with only that site converted is compared with the original on the calibration data (top-1
agreement for class scores, cosine and mean absolute difference of the outputs); with
calibration, also after fitting that one site's affine. Sites are listed worst first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import targets
from ..plan import Plan
from ..rewrite import apply_plan
from .device import device_of
from .drift import Drift, measure_drift
from .fit import calibrate

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 256  # per site: one forward pass over this many calibration inputs


@dataclass
class SiteCost:
    """The drift from the original when only this site is converted."""

    site: str
    target: str
    swap: Drift
    calibrated: Drift | None = None

    @property
    def worst(self) -> float:
        """The sort key: what is lost (1 - top-1 agreement, else 1 - cosine), after calibration when measured."""
        drift = self.calibrated or self.swap
        return 1 - (drift.top1_agreement if drift.top1_agreement is not None else drift.cosine)


def site_costs(
    original: nn.Module, plan: Plan, batches: Sequence[tuple], *, calibrated: bool = True, samples: int = DEFAULT_SAMPLES
) -> list[SiteCost]:
    """The cost of each function-changing site of `plan` on its own, worst first.

    Args:
        original: the model before conversion (not modified).
        plan: the conversion plan.
        batches: calibration batches, on the model's device; the first `samples` inputs are used.
        calibrated: also measure each site after fitting its affine alone.
    """
    budget, used = samples, []
    for batch in batches:
        if budget <= 0:
            break
        size = int(batch[0].shape[0]) if batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
        if size > budget:  # the last batch cut to the samples asked for
            batch = tuple(x[:budget] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == size else x for x in batch)
        used.append(batch)
        budget -= min(size, budget)
    costs = []
    for entry in plan:
        if not entry.converts or targets.get(entry.target).keeps_function:
            continue
        alone = Plan([entry])
        one = apply_plan(original, alone)
        cost = SiteCost(entry.name, entry.target, measure_drift(original, one, used))
        if calibrated and targets.get(entry.target).calibrated and entry.params.get("affine", True):
            calibrate(one, original, used, alone, device=device_of(original))
            cost.calibrated = measure_drift(original, one, used)
        costs.append(cost)
        log.debug("site %s alone: cosine %.4f, top-1 agreement %s", entry.name, cost.swap.cosine, cost.swap.top1_agreement)
    return sorted(costs, key=lambda c: c.worst, reverse=True)
