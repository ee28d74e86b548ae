"""Calibration in lockstep: each batch's forward pass through the original and the converted
graph is a cursor; all cursors move from one site to the next together, so every node runs once
per batch whatever the depth. At each site the converted cursor reads what the new layer
normalizes (upstream sites already calibrated) without running the layer, the original cursor
runs through the BatchNorm's calls and records their inputs; once every batch has given its sums
the affine is fitted and set, and the cursors go on through the calibrated layer.

Memory: the live activations at one cut, for every batch and both models. When that would pass
`memory_limit`, the batches that do not fit are dropped at that cut and run again from the input
for each later site (`Walked.recomputed` says how many)."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import CalibrationError
from ..targets.takeover import TakenOver
from .affine import AffineSite, BatchNormInputs, Stop, computes_batch_norm_alone, concatenated, observing
from .drift import DriftAccumulator, batch_samples, float_outputs
from .stats import AffineFit, EpsSums
from .walk import Cursor

log = logging.getLogger(__name__)


@dataclass
class LocatedSite:
    """A site and the positions of its calls in both graphs (several for a reused module)."""

    site: AffineSite
    converted: list[int]
    original: list[int]
    module: nn.Module | None  # the converted layer (module sites)


@dataclass
class Walked:
    """How the lockstep walk went: batches it could not hold in memory were recomputed."""

    recomputed: int = 0  # batches run again from the input for each site after `dropped_at`
    dropped_at: str | None = None
    peak_bytes: int = 0  # the most live activations held at once


class _OriginalCursor(Cursor):
    """A cursor through the original graph that records, at each call of a site still to fit,
    what the site is fitted to (y)."""

    def __init__(
        self, module: fx.GraphModule, inputs: tuple, watched: dict[fx.Node, AffineSite], unfitted: set[str]
    ) -> None:
        super().__init__(module, inputs)
        self.watched, self.unfitted = watched, unfitted
        self.seen: dict[str, list[torch.Tensor]] = defaultdict(list)

    def step(self):
        site = self.watched.get(self.node)
        if site is None or site.name not in self.unfitted:
            return super().step()
        if site.functional or computes_batch_norm_alone(site.batchnorm):
            value = super().step()  # the call's output is y already
            self.seen[site.name].append(value.detach())
            return value
        inputs: list[torch.Tensor] = []  # a subclass: y is the batch_norm of what it normalizes
        with BatchNormInputs([True], inputs, calls=2**62):
            value = super().step()
        if not inputs:
            raise CalibrationError(f"Layer '{site.name}' of the original model makes no batch_norm call.")
        self.seen[site.name].append(site.target(inputs[0]))
        return value

    def recorded(self, located: LocatedSite) -> torch.Tensor:
        """Run through the site's last call and hand over y at its calls."""
        self.run_to(located.original[-1] + 1)
        return concatenated(self.seen.pop(located.site.name, []), located.site.name)


@dataclass
class _Batch:
    converted: Cursor
    original: _OriginalCursor

    def live_bytes(self) -> int:
        return self.converted.live_bytes() + self.original.live_bytes()


def _observed_inside(module: nn.Module) -> bool:
    """What the layer normalizes shows only when it runs: a taken-over subclass may transform its
    input first, and a forward pre-hook (the user's, carried over) rewrites it."""
    return isinstance(module, TakenOver) or bool(module._forward_pre_hooks)


def _normalized_input(cursor: Cursor, located: LocatedSite) -> torch.Tensor:
    """What the converted site normalizes on this batch, at every call, with the layers upstream
    as they are now. The cursor stops before the site's first call: its output waits for the fit."""
    cursor.run_to(located.converted[0])
    seen: list[torch.Tensor] = []
    if located.module is None or (len(located.converted) == 1 and not _observed_inside(located.module)):
        args, _ = cursor.arguments()  # what the layer normalizes is its input
        seen.append(args[0].detach())
    elif len(located.converted) == 1:
        args, kwargs = cursor.arguments()
        with observing(located.module, seen, 1), contextlib.suppress(Stop):
            located.module(*args, **kwargs)
    else:  # a reused module: later calls read earlier ones, so a copy runs ahead through them all
        ahead = cursor.branch()
        with observing(located.module, seen, len(located.converted) + 1):
            ahead.run_to(located.converted[-1] + 1)
    return concatenated(seen, located.site.name)


def fit_in_lockstep(
    sites: Sequence[LocatedSite],
    converted: fx.GraphModule,
    original: fx.GraphModule,
    batches: Sequence[tuple],
    memory_limit: int,
    fitted: Callable[[AffineSite, EpsSums], AffineFit],
    drift: DriftAccumulator | None = None,
) -> Walked:
    """Fit `sites` (in the order their first calls run) on every batch; `fitted` turns a site's
    sums into its fit and sets it. With `drift`, the cursors then run on to the outputs, which
    it accumulates: the calibrated model against the original, at the cost of the layers after
    the last site."""
    unfitted = {located.site.name for located in sites}
    watched: dict[fx.Node, AffineSite] = {}
    original_nodes = list(original.graph.nodes)
    for located in sites:
        for position in located.original:
            watched[original_nodes[position]] = located.site
    held: list[_Batch | None] = [None] * len(batches)
    held_bytes = [0] * len(batches)
    dropped: set[int] = set()
    walked = Walked()

    def cursors(i: int) -> _Batch:
        return held[i] or _Batch(
            Cursor(converted, batches[i]), _OriginalCursor(original, batches[i], watched, unfitted)
        )

    for located in sites:
        sums: EpsSums | None = None
        for i in range(len(batches)):
            batch = cursors(i)
            part = located.site.sums(_normalized_input(batch.converted, located), batch.original.recorded(located))
            sums = part if sums is None else sums + part
            held_bytes[i] = batch.live_bytes()
            walked.peak_bytes = max(walked.peak_bytes, sum(held_bytes))
            # one batch is always held: run again from the input it would take as much memory
            if sum(held_bytes) > memory_limit and any(other is not None for j, other in enumerate(held) if j != i):
                held[i], held_bytes[i] = None, 0  # run again from the input at the next site
                dropped.add(i)
                walked.dropped_at = walked.dropped_at or located.site.name
            else:
                held[i] = batch
        assert sums is not None
        fitted(located.site, sums)
        unfitted.discard(located.site.name)
    walked.recomputed = len(dropped)
    if drift is not None:
        for i, inputs in enumerate(batches):
            batch, held[i] = cursors(i), None
            drift.add(
                float_outputs(batch.original.finish()), float_outputs(batch.converted.finish()), batch_samples(inputs)
            )
    return walked
