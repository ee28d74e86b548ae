"""Where the function goes: what each converted site costs on its own.

For every site whose target changes the function (groupnorm, layernorm), the original model
with only that site converted is compared with the original on the calibration data (top-1
agreement for class scores, cosine and mean absolute difference of the outputs); with
calibration, also after fitting that one site's affine. Sites are listed worst first.

The original is traced and walked once (a cursor per batch, as calibration does); at each site
the part of the graph downstream of it runs from the activations there, with the site's
replacement called instead of the BatchNorm: once swapped, once calibrated. That is about one
forward pass per site, in place of four full passes and a copy of the model. Sites that cannot be
costed that way (functional calls, modules reused at several steps, subclasses, hooked layers,
models torch.fx cannot trace) are converted alone in a copy of the model, as before.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import targets
from ..capture.calls import one_line
from ..plan import Plan, PlanEntry
from ..rewrite import apply_plan
from ..sites import SiteKind
from ..torchutil import is_torch_class, preserved
from .affine import AffineSite, CallIndex, computes_batch_norm_alone, observing
from .device import device_of
from .drift import Drift, DriftAccumulator, batch_samples, eval_outputs, float_outputs, measure_drift
from .fit import calibrate
from .stats import EpsSums, best_fit
from .walk import Cursor, traced

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
    original: nn.Module,
    plan: Plan,
    batches: Sequence[tuple],
    *,
    calibrated: bool = True,
    samples: int = DEFAULT_SAMPLES,
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
            batch = tuple(
                x[:budget] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == size else x for x in batch
            )
        used.append(batch)
        budget -= min(size, budget)
    costed = [e for e in plan if e.converts and not targets.get(e.target).keeps_function]
    downstream = _Downstream.of(original, costed, used)
    costs = []
    for entry in sorted(costed, key=downstream.order if downstream else lambda e: 0):  # the walk only moves forward
        calibrate_it = calibrated and targets.get(entry.target).calibrated and entry.params.get("affine", True)
        cost = downstream.cost(entry, calibrate_it) if downstream else None
        if cost is None:
            cost = _cost_in_a_copy(original, entry, used, calibrate_it)
        costs.append(cost)
        log.debug(
            "site %s alone: cosine %.4f, top-1 agreement %s", entry.name, cost.swap.cosine, cost.swap.top1_agreement
        )
    return sorted(costs, key=lambda c: c.worst, reverse=True)


def _cost_in_a_copy(original: nn.Module, entry: PlanEntry, used: list[tuple], calibrate_it: bool) -> SiteCost:
    """The site converted alone in a copy of the model, both models run from the input."""
    alone = Plan([dataclasses.replace(entry)])  # a copy: the eps fitted here is this measurement's, not the plan's
    one = apply_plan(original, alone)
    cost = SiteCost(entry.name, entry.target, measure_drift(original, one, used))
    if calibrate_it:
        calibrate(one, original, used, alone, device=device_of(original))
        cost.calibrated = measure_drift(original, one, used)
    return cost


class _Downstream:
    """The original's graph, one cursor per batch moving from site to site, and its outputs."""

    def __init__(self, original: nn.Module, graph: torch.fx.GraphModule, batches: list[tuple]) -> None:
        self.original, self.graph, self.batches = original, graph, batches
        self.positions = {node: i for i, node in enumerate(graph.graph.nodes)}
        self.calls = CallIndex(graph)
        self.references = [eval_outputs(original, inputs) for inputs in batches]
        self.cursors = [Cursor(graph, inputs) for inputs in batches]

    @classmethod
    def of(cls, original: nn.Module, entries: list[PlanEntry], batches: list[tuple]) -> _Downstream | None:
        if not entries:
            return None
        try:
            with preserved(original):
                original.eval()
                graph = traced(original, {e.name for e in entries if e.kind is not SiteKind.FUNCTIONAL})
        except Exception as exc:  # noqa: BLE001 - the user's forward traced symbolically: any failure means a copy per site
            log.debug("attribution costs each site in a copy: %s", one_line(exc))
            return None
        return cls(original, graph, batches)

    def order(self, entry: PlanEntry) -> int:
        calls = self.calls.original(entry)
        return self.positions[calls[0]] if calls else len(self.positions)

    def cost(self, entry: PlanEntry, calibrate_it: bool) -> SiteCost | None:
        """The site's cost from the activations at it, or None where only a copy can tell."""
        calls = self.calls.original(entry)
        batchnorm = self.original.get_submodule(entry.name) if entry.kind is not SiteKind.FUNCTIONAL else None
        if (
            len(calls) != 1
            or not isinstance(batchnorm, _BatchNorm)
            or not is_torch_class(batchnorm)
            or not computes_batch_norm_alone(batchnorm)
            or batchnorm._forward_pre_hooks
        ):
            return None
        position = self.positions[calls[0]]
        replacement = targets.get(entry.target).module(copy.deepcopy(batchnorm), entry.params)
        with preserved(self.original), torch.no_grad():
            self.original.eval()
            for cursor in self.cursors:
                cursor.run_to(position)
            weight, bias = getattr(replacement, "weight", None), getattr(replacement, "bias", None)
            site = (  # a copy of the entry: the eps fitted here is this measurement's, not the plan's
                AffineSite(dataclasses.replace(entry), weight, bias, batchnorm, replacement)
                if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
                else None
            )
            swap, sums = self._drift(entry.name, replacement, site if calibrate_it else None)
            cost = SiteCost(entry.name, entry.target, swap)
            if site is not None and sums is not None:
                site.set_affine(best_fit(sums))
                cost.calibrated, _ = self._drift(entry.name, replacement, None)
        return cost

    def _drift(self, name: str, replacement: nn.Module, fitting: AffineSite | None) -> tuple[Drift, EpsSums | None]:
        """Each batch from the site to the output with `replacement` in the BatchNorm's place;
        when `fitting` a site, also the sums that fit its affine alone."""
        drift, sums = DriftAccumulator(), None
        for cursor, reference, inputs in zip(self.cursors, self.references, self.batches, strict=True):
            ahead = cursor.branch()
            ahead.substitutes = {name: replacement}
            seen: list[torch.Tensor] = []
            with observing(replacement, seen, 2**62):
                output = ahead.finish()
            drift.add(reference, float_outputs(output), batch_samples(inputs))
            if fitting is not None and fitting.batchnorm is not None:
                args, kwargs = cursor.arguments()  # upstream is the original's: the BatchNorm's own input
                part = fitting.sums(seen[0], fitting.batchnorm(*args, **kwargs))
                sums = part if sums is None else sums + part
        return drift.result(), sums
