"""rewrite_model() and apply_plan(): plan a model's BatchNorm sites and rewrite them, then check
that no converted site still normalizes with batch statistics."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import targets
from .analysis import Analysis, analyze
from .capture.tracer import trace
from .context import Context
from .errors import CaptureError, PlanError
from .passes import (
    ContiguousGradients,
    OutOfPlaceForHooks,
    Pass,
    PassManager,
    RewriteFunctionalBatchNorm,
    SwapBatchNormModules,
)
from .plan import Plan
from .policy import PlanRequest, resolve_plan
from .postcondition import check_kept_function, check_no_batch_statistics, layers_keeping_function
from .rules import Finding
from .sites import Site, SiteKind
from .torchutil import Timings, as_input_tuple, gc_paused, require_module


@dataclass
class Rewritten:
    """A rewritten model, the plan it followed and what analysis found."""

    model: nn.Module
    plan: Plan
    sites: list[Site]
    findings: list[Finding]
    analysis: Analysis
    changes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the post-condition could not check


def rewrite_model(
    model: nn.Module,
    example_inputs: Any,
    context: Context | None,
    request: PlanRequest,
    *,
    plan: Plan | None = None,
    inplace: bool = False,
) -> Rewritten:
    """Analyse `model`, plan (or take `plan`), rewrite, and check the post-condition: `convert`
    without calibration (see there for the arguments)."""
    require_module(model, "convert")
    inputs = None if example_inputs is None else as_input_tuple(example_inputs)
    with gc_paused():
        return _rewrite(model, inputs, context or Context(), request, plan, inplace)


def _rewrite(
    model: nn.Module, inputs: tuple | None, context: Context, request: PlanRequest, plan: Plan | None, inplace: bool
) -> Rewritten:
    timings = Timings()
    with timings.measure("copy"):
        working = _working_copy(model, inputs, inplace)
    analysis = analyze(working, inputs, context)
    timings.update(analysis.timings)
    with timings.measure("plan"):
        plan = resolve_plan(analysis.sites, analysis.findings, context, plan, request)
        graph_module = analysis.capture.graph_module
        if graph_module is None:
            _require_graph_for_functional(plan, analysis)
    with timings.measure("rewrite"):
        target: nn.Module = working
        if graph_module is not None and any(e.kind is SiteKind.FUNCTIONAL and e.converts for e in plan):
            graph_module.train(working.training)
            for node in graph_module.graph.nodes:
                node.meta.pop("val", None)  # shapes from capture: already in the sites
            target = graph_module
        replaced = layers_keeping_function(working, plan)
        passes = default_passes(plan)
        out_of_place = OutOfPlaceForHooks(inputs) if context.differential_privacy else None
        if out_of_place is not None:
            passes += [out_of_place, ContiguousGradients()]
        result = PassManager(passes)(target)
    with timings.measure("postcondition"):
        notes = check_no_batch_statistics(result.model, plan, analysis.sites, inputs, model)
        notes += check_kept_function(result.model, plan, analysis.sites, replaced)
    if inputs is None:
        notes.insert(0, WITHOUT_INPUTS_NOTE)
    if out_of_place is not None:
        notes += _out_of_place_notes(result.changes, out_of_place.left)
    if inplace:
        notes += _absorbed_parameter_notes(plan)
    return Rewritten(
        result.model, plan, analysis.sites, analysis.findings, analysis, result.changes, timings.seconds, notes
    )


WITHOUT_INPUTS_NOTE = (
    "no example inputs: the model was not run, so every BatchNorm module was replaced from its constructor arguments "
    "(NS205), functional batch_norm calls in forward were not seen, and each converted layer was checked alone; "
    "pass example inputs to have them seen and checked"
)


def _out_of_place_notes(changes: list[str], left: list[str]) -> list[str]:
    """What the differential-privacy context changed for Opacus' hooks, and what it could not."""
    made = [change for change in changes if "inplace=False" in change or "out of place" in change]
    notes = [
        f"made out-of-place for Opacus' backward hooks (an in-place operation on a hooked layer's output fails its first DP-SGD step): {c}"
        for c in made
    ]
    notes += [
        f"left in place, so Opacus' hooks mode will fail on it (use grad_sample_mode='ew', or make it out-of-place in your code): {item}"
        for item in left
    ]
    return notes


def _absorbed_parameter_notes(plan: Plan) -> list[str]:
    """In place, the replacements own the BatchNorms' Parameter objects, except where a target
    moves the affine into another layer (fold): there an optimizer built before loses them."""
    return [
        f"{entry.name}: folded into '{entry.params['into']}': its weight and bias Parameters leave the model (their values "
        f"now scale '{entry.params['into']}'.weight and shift its bias, a new Parameter where it had none), so an optimizer "
        "or EMA built before convert(inplace=True) trains nothing in their place; build it after the conversion"
        for entry in plan
        if entry.converts and targets.get(entry.target).absorbs_affine
    ]


def default_passes(plan: Plan) -> list[Pass]:
    """The passes that apply a plan, in order: module swaps, then functional rewrites."""
    return [SwapBatchNormModules(plan), RewriteFunctionalBatchNorm(plan)]


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Any = None, inplace: bool = False) -> nn.Module:
    """Apply a saved plan to a fresh instance of the model class it was made for.

    The result has the converted architecture and state_dict keys; load the converted weights
    into it. `example_inputs` are needed only for lazy modules that were never run.

    Raises:
        TypeError: `model` is not a module or `plan` not a Plan.
        PlanError: an entry's parameters are wrong, or the plan does not fit the model.
    """
    require_module(model, "apply_plan")
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan() needs a normswap.Plan, got {type(plan).__name__}; use Plan.from_json().")
    plan.check()
    working = _working_copy(model, None if example_inputs is None else as_input_tuple(example_inputs), inplace)
    target: nn.Module = working
    if any(e.kind is SiteKind.FUNCTIONAL and e.converts for e in plan):
        was_training = working.training
        working.train()  # functional `training=self.training` is traced as in convert()
        try:
            target = trace(working).train(was_training)
        except Exception as exc:  # the user's forward cannot be traced: one sentence, with the cause
            raise PlanError(
                f"The plan rewrites functional batch_norm calls, but {type(model).__name__} cannot be traced: {exc}."
            ) from exc
        working.train(was_training)
    return PassManager(default_passes(plan))(target).model


def _working_copy(model: nn.Module, inputs: tuple | None, inplace: bool) -> nn.Module:
    """The model to rewrite: itself, or a deep copy. Lazy modules cannot be copied before they
    are initialized, so they are initialized first by one eval forward on `inputs`."""
    if inputs is not None:
        materialize_lazy(model, inputs)
    elif _has_uninitialized(model):
        raise PlanError(
            f"{type(model).__name__} has lazy modules that were never run; pass example_inputs to initialize them."
        )
    return model if inplace else copy.deepcopy(model)


def _has_uninitialized(model: nn.Module) -> bool:
    return any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules())


def materialize_lazy(model: nn.Module, inputs: tuple) -> None:
    """Run one eval forward so lazy modules get their real shapes (training flags restored)."""
    if not _has_uninitialized(model):
        return
    flags = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except Exception as exc:  # the user's model failed: one sentence, with the cause
        raise CaptureError(
            f"{type(model).__name__} cannot run on the example inputs to initialize its lazy modules: {exc}."
        ) from exc
    finally:
        for module, flag in flags.items():
            module.training = flag
    left = [
        name
        for name, m in model.named_modules()
        if isinstance(m, LazyModuleMixin) and _has_uninitialized(cast(nn.Module, m))
    ]
    if left:
        raise PlanError(
            f"Lazy layer '{left[0]}' ({type(model.get_submodule(left[0])).__name__}) was not reached by the example inputs, so it has "
            "no shape yet and the model cannot be copied; give example inputs that reach it."
        )


def _require_graph_for_functional(plan: Plan, analysis: Analysis) -> None:
    """Functional calls are rewritten in the FX graph; without one, a planned one is refused."""
    for entry in plan:
        if entry.kind is SiteKind.FUNCTIONAL and entry.converts:
            why = "; ".join(analysis.capture.fallback_reasons) or "torch.fx could not trace it"
            raise PlanError(
                f"Functional batch_norm call '{entry.name}' cannot be rewritten: it is rewritten in a torch.fx graph and "
                f"the model was captured with {analysis.capture.method} ({why}); make forward traceable, or keep it "
                'with a plan entry {"target": "keep"}.'
            )
