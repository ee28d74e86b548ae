"""Calibrate: fit each new layer's per-channel affine to the original BatchNorm output, site by site.

For site k, z is the new layer's normalized output (before its affine) computed from the converted
model's own activations (upstream sites already calibrated) and y the original BatchNorm's
eval-mode output on the original model's activations. Per channel, in closed form:
    scale = cov(z, y) / var(z),   shift = mean(y) - scale * mean(z)
Statistics are streamed batch by batch: per site only per-channel sums are kept.

Both models are traced and walked in lockstep (lockstep.py): each node runs once per batch. A
model torch.fx cannot trace is fitted layer by layer from the input instead (layerwise.py), and
the result says so.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import targets
from ..capture.calls import one_line
from ..errors import CalibrationError
from ..plan import Plan, PlanEntry
from ..sites import SiteKind
from ..targets.base import NormParams
from ..torchutil import available_memory, preserved, require_module, require_type
from .affine import AffineSite, CallIndex, functional_site, module_site, set_eps
from .data import check_model_accepts
from .device import placed, resolve_device, to_device
from .drift import Drift, DriftAccumulator
from .layerwise import call_counts, functional_pair, module_pair
from .lockstep import LocatedSite, fit_in_lockstep
from .stats import AffineFit, EpsSums, best_fit
from .stream import input_batches, model_inputs
from .walk import traced

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # of the memory available when calibration starts, by default
CALIBRATION_SAMPLES = 4096  # the per-channel affine fit needs few samples; more data only heals


@dataclass
class SiteFit:
    """Fit quality for one calibrated site."""

    name: str
    target: str
    r2: float
    samples: int
    eps: float | None = None  # the eps calibration chose for the new layer, where it changed it


@dataclass
class Calibration:
    """The fits, and how they were computed."""

    fits: list[SiteFit] = field(default_factory=list)
    walked: bool = True  # both graphs walked in lockstep (else layer by layer from the input)
    held_bytes: int = 0  # the most activations the walk held at once, all batches and both models
    drift: Drift | None = None  # the calibrated model against the original, when asked for and walked
    notes: list[str] = field(default_factory=list)  # a fallback or a memory limit, and what it costs
    sites: list[AffineSite] = field(default_factory=list, repr=False)  # the layers fitted


@dataclass
class Swapped:
    """The converted model as the swap left it, to return to: its tensors and each site's eps
    (calibration may choose a larger one)."""

    state: dict[str, torch.Tensor]
    eps: dict[str, float]

    @classmethod
    def of(cls, converted: nn.Module, plan: Plan) -> Swapped:
        state = {name: value.clone() for name, value in converted.state_dict().items()}
        return cls(state, {e.name: e.params.eps for e in plan if isinstance(e.params, NormParams)})

    def restore(self, converted: nn.Module, plan: Plan) -> None:
        converted.load_state_dict(self.state)
        for entry in plan:
            if isinstance(entry.params, NormParams) and entry.params.eps != self.eps[entry.name]:
                set_eps(entry, converted.get_submodule(entry.name), self.eps[entry.name])


def _entries_from_modules(converted: nn.Module, original: nn.Module) -> list[PlanEntry]:
    """Without a plan: every calibrated replacement sitting where the original has a BatchNorm."""
    originals = dict(original.named_modules())
    entries = []
    for name, module in converted.named_modules():
        found = targets.recognize(module) if isinstance(originals.get(name), _BatchNorm) else None
        if found is not None:
            target, params = found
            entries.append(PlanEntry(name, target.name, params))
    return entries


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    plan: Plan | None = None,
    *,
    device: str | torch.device | None = "auto",
    fit_eps: bool = True,
) -> list[SiteFit]:
    """Fit the affine of every converted site whose target is calibrated (groupnorm, layernorm)
    to the original BatchNorm output.

    Args:
        converted: the converted model (modified in place).
        original: the model before conversion.
        batches: input batches: a list, a DataLoader, a Dataset or a tensor of samples (items of a
            batch past the model's inputs are labels, ignored); the first 4,096 samples are used.
        plan: the conversion plan (default: every GroupNorm / LayerNorm at a BatchNorm's name).
        device: where to run ("auto": this process's GPU when there is one, else the CPU); both
            models return to their own devices afterwards.
        fit_eps: also choose each new layer's eps (its own, or 0.25-16 times the typical
            variance it divides by: the smallest within 0.001 R² of the best fit), written into
            the layer and the plan; False keeps the eps the conversion gave it.

    Returns:
        Per site, the fit quality (R^2 of the per-channel affine regression).
    """
    return calibrate_sites(converted, original, batches, plan, device=device, fit_eps=fit_eps).fits


def calibrate_sites(
    converted: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    plan: Plan | None = None,
    *,
    device: str | torch.device | None = "auto",
    memory_limit: int | None = None,
    layer_by_layer: bool = False,
    drift: bool = False,
    fit_eps: bool = True,
) -> Calibration:
    """`calibrate`, saying how: `memory_limit` (bytes; default half the memory available) bounds
    the activations the walk holds; `layer_by_layer` forces the method for models fx cannot trace;
    `drift` also measures the calibrated model against the original where the walk can (its
    cursors run on to the outputs)."""
    require_module(converted, "calibrate")
    require_module(original, "calibrate")
    require_type(plan, Plan, "plan", "calibrate")
    where = resolve_device(device)
    stream = input_batches(batches, inputs=model_inputs(original))
    batches = [to_device(b, where) for b in stream.head(CALIBRATION_SAMPLES)]
    entries = list(plan) if plan is not None else _entries_from_modules(converted, original)
    entries = [e for e in entries if e.converts and targets.get(e.target).calibrated]
    if not entries:
        raise CalibrationError(
            "The converted model has no GroupNorm / LayerNorm sites to calibrate (frozen sites keep the function already)."
        )
    with placed(where, converted, original), preserved(original), preserved(converted), torch.no_grad():
        check_model_accepts(original, batches, restore=False)  # restored with the rest below
        original.eval()
        converted.eval()
        result = Calibration()
        located: list[LocatedSite] | None = None
        if not layer_by_layer:
            try:
                located, converted_graph, original_graph = _located(entries, converted, original, fit_eps)
            except _NoWalk as reason:
                result.walked = False
                result.notes.append(
                    f"calibration fitted each site by running both models from the input ({reason}): its time grows with depth × sites"
                )
        if located is not None:
            limit = memory_limit if memory_limit is not None else _default_memory_limit(where)
            accumulator = DriftAccumulator() if drift else None
            walked = fit_in_lockstep(
                located,
                converted_graph,
                original_graph,
                batches,
                limit,
                lambda site, sums: _set_fit(site, sums, result),
                accumulator,
            )
            result.held_bytes = walked.peak_bytes
            result.drift = accumulator.result() if accumulator is not None else None
            if walked.recomputed:
                result.notes.append(
                    f"calibration held at most {walked.peak_bytes / 2**30:.2f} GiB of activations (limit {limit / 2**30:.2f} GiB): "
                    f"{walked.recomputed} of {len(batches)} batches were run again from the input for each site after '{walked.dropped_at}'"
                )
        else:
            result.walked = False
            _fit_layer_by_layer(entries, converted, original, batches, result, fit_eps)
    for site in result.sites:  # leaving `preserved` put the layers' old eps back
        if site.layer is not None and site.eps is not None:
            set_eps(site.entry, site.layer, site.eps)
    for note in result.notes:
        log.info(note)
    return result


class _NoWalk(Exception):
    """Why the models cannot be walked in lockstep (the message completes a sentence)."""


def _located(
    entries: list[PlanEntry], converted: nn.Module, original: nn.Module, fit_eps: bool
) -> tuple[list[LocatedSite], fx.GraphModule, fx.GraphModule]:
    """Trace both models with every module site kept whole and find each site's calls in both."""
    leaves = {e.name for e in entries if e.kind is not SiteKind.FUNCTIONAL}
    try:
        original_graph = traced(original, leaves)
        converted_graph = (
            converted
            if isinstance(converted, fx.GraphModule)
            else _same_graph(converted, original, original_graph, leaves)
        )
    except Exception as exc:  # the user's forward, traced symbolically: any failure means "not traceable"
        raise _NoWalk(f"torch.fx cannot trace {type(original).__name__}: {one_line(exc)}") from exc
    converted_positions = {node: i for i, node in enumerate(converted_graph.graph.nodes)}
    original_positions = {node: i for i, node in enumerate(original_graph.graph.nodes)}
    converted_index, original_index = CallIndex(converted_graph), CallIndex(original_graph)
    located = []
    for entry in entries:
        new, old = converted_index.converted(entry), original_index.original(entry)
        if not new or len(new) != len(old):
            raise _NoWalk(
                f"layer '{entry.name}' is called {len(old)} times in the traced original and {len(new)} in the converted model"
            )
        if entry.kind is SiteKind.FUNCTIONAL:
            site, module = functional_site(entry, converted_graph, new, old), None
        else:
            site, module = module_site(entry, converted, original, fit_eps), converted_graph.get_submodule(entry.name)
        located.append(
            LocatedSite(site, [converted_positions[n] for n in new], [original_positions[n] for n in old], module)
        )
    located.sort(key=lambda s: s.converted[0])  # the order forward reaches them: upstream sites fitted first
    return located, converted_graph, original_graph


def _same_graph(
    converted: nn.Module, original: nn.Module, original_graph: fx.GraphModule, leaves: set[str]
) -> fx.GraphModule:
    """The converted model's graph. Where convert only swapped modules (same class, same forward,
    every site a leaf under the same name) it is the original's graph calling the converted
    modules, which saves tracing the model a second time."""
    if type(converted) is type(original):
        try:
            return fx.GraphModule(converted, copy.deepcopy(original_graph.graph), type(converted).__name__)
        except AttributeError:  # a module the original's graph calls is not in the converted model
            pass
    return traced(converted, leaves)


def _default_memory_limit(where: torch.device) -> int:
    if where.type == "cuda":
        free, _ = torch.cuda.mem_get_info(where)
        return int(free * MEMORY_SHARE)
    available = available_memory()
    return int(available * MEMORY_SHARE) if available is not None else 2**62


def _fit_layer_by_layer(
    entries: list[PlanEntry],
    converted: nn.Module,
    original: nn.Module,
    batches: list[tuple],
    result: Calibration,
    fit_eps: bool,
) -> None:
    """Each site in plan order, each batch run through both models from the input to the site."""
    module_names = [e.name for e in entries if e.kind is not SiteKind.FUNCTIONAL]
    calls = call_counts(original, module_names, batches[0]) if module_names else {}
    functional = [e for e in entries if e.kind is SiteKind.FUNCTIONAL]
    if functional and not isinstance(converted, fx.GraphModule):
        raise CalibrationError(
            f"Functional site '{functional[0].name}' needs the fx.GraphModule that convert() returned."
        )
    original_graph = traced(original, set()) if functional else None  # eval mode: training=False
    new_calls = CallIndex(converted) if isinstance(converted, fx.GraphModule) else None
    old_calls = CallIndex(original_graph) if original_graph is not None else None
    for entry in entries:  # graph order: each fit sees the calibrated layers upstream
        pair: Callable[[tuple], EpsSums]
        if entry.kind is SiteKind.FUNCTIONAL:
            assert isinstance(converted, fx.GraphModule) and original_graph is not None
            assert new_calls is not None and old_calls is not None
            new, old = new_calls.converted(entry), old_calls.original(entry)
            site = functional_site(entry, converted, new, old)
            pair = functools.partial(functional_pair, site, converted, new[0], original_graph, old[0])
        else:
            site = module_site(entry, converted, original, fit_eps)
            pair = functools.partial(module_pair, site, converted, original, calls=calls.get(entry.name, 0))
        sums: EpsSums | None = None
        for batch in batches:
            part = pair(batch)
            sums = part if sums is None else sums + part
        if sums is None:
            raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
        _set_fit(site, sums, result)


def _set_fit(site: AffineSite, sums: EpsSums, result: Calibration) -> AffineFit:
    fit = best_fit(sums)
    if not fit.finite:
        raise CalibrationError(
            f"Calibrating layer '{site.name}' gives non-finite affine parameters: the calibration data's scale is far from "
            "what the model was trained on; check that it is the model's input, preprocessed the same way."
        )
    site.set_affine(fit)
    changes_eps = site.eps is not None and site.eps != site.eps_choices[0]  # [0]: the layer's own
    result.sites.append(site)
    result.fits.append(SiteFit(site.name, site.entry.target, fit.r2, fit.samples, fit.eps if changes_eps else None))
    log.debug(
        "calibrated %s (%s): R^2 %.3f over %d values per channel", site.name, site.entry.target, fit.r2, fit.samples
    )
    return fit
