"""convert() and apply_plan(): rewrite a model's BatchNorm sites according to a Plan."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .analysis import Analysis, analyze
from .capture import as_input_tuple, trace
from .context import Context
from .errors import CaptureError, PlanError
from .plan import Plan, PlanEntry
from .policy import make_plan
from .rules import Finding
from .sites import Site, probe_batch_dependence
from .targets import DEFAULT_MAX_GROUPS

from normswap.passes import PassManager, RewriteFunctionalBatchNorm, SwapBatchNormModules


@dataclass
class Conversion:
    """The result of `convert`: the converted model, the plan it followed and what was found."""

    model: nn.Module
    plan: Plan
    sites: list[Site]
    findings: list[Finding]
    analysis: Analysis
    changes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration: list[Any] = field(default_factory=list)  # normswap.calibrate.SiteFit per site
    drift: dict[str, Any] = field(default_factory=dict)  # "swap" / "calibrated" / "healed" -> Drift

    @property
    def capture_method(self) -> str:
        return self.analysis.capture.method


def convert(
    model: nn.Module,
    example_inputs: Any,
    to: str = "auto",
    context: Context | None = None,
    inplace: bool = False,
    *,
    max_groups: int = DEFAULT_MAX_GROUPS,
    plan: Plan | None = None,
    calibration_data: Iterable[Any] | None = None,
    heal_steps: int = 0,
    heal_lr: float = 1e-3,
    heal_params: str = "norm",
    seed: int = 0,
) -> Conversion:
    """Rewrite every BatchNorm site of `model` into a batch-independent normalization.

    Args:
        model: the model; not modified unless `inplace=True`.
        example_inputs: a tensor or tuple of tensors the model runs on (batch first).
        to: "auto" (per site, from the findings), "groupnorm", "layernorm", "frozen" or "syncbn".
        context: how the model is trained / served (drives "auto").
        inplace: rewrite `model` itself instead of a copy.
        max_groups: largest GroupNorm group count.
        plan: apply this plan instead of planning.
        calibration_data: unlabeled input batches; when given, each new GroupNorm / LayerNorm
            affine is fitted to the original BatchNorm output (see `normswap.calibrate`).
        heal_steps: distillation steps toward the original after calibration (0: none).
        heal_lr, heal_params, seed: healing learning rate, "norm" or "all" parameters, seed.

    Returns:
        Conversion with `.model` (the user's module tree with swapped submodules, or an
        fx.GraphModule when functional sites were rewritten), `.plan`, `.sites`, `.findings`.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"convert() needs a torch.nn.Module, got {type(model).__name__}.")
    timings: dict[str, float] = {}
    inputs = as_input_tuple(example_inputs)
    start = time.perf_counter()
    working = _working_copy(model, inputs, inplace)
    original = copy.deepcopy(model) if inplace and calibration_data is not None else model
    timings["copy"] = time.perf_counter() - start
    context = context or Context()
    analysis = analyze(working, inputs, context)
    timings.update(analysis.timings)
    start = time.perf_counter()
    if plan is None:
        plan = make_plan(analysis.sites, analysis.findings, context, to, max_groups)
    graph_module = analysis.capture.graph_module
    if graph_module is None:
        plan = _keep_unrewritable_functional(plan, analysis.capture.method)
    timings["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    target = working
    if any(e.kind == "functional" and e.converts for e in plan):
        graph_module.train(working.training)
        for node in graph_module.graph.nodes:
            node.meta.pop("val", None)  # fake tensors: shapes are already in the sites
        target = graph_module
    result = PassManager([SwapBatchNormModules(plan), RewriteFunctionalBatchNorm(plan)])(target)
    _verify_subclasses(result.model, plan, analysis.sites)
    timings["rewrite"] = time.perf_counter() - start
    conversion = Conversion(result.model, plan, analysis.sites, analysis.findings, analysis, result.changes, timings)
    if calibration_data is not None:
        calibrate_and_heal(conversion, original, calibration_data, heal_steps, heal_lr, heal_params, seed)
    return conversion


def calibrate_and_heal(
    conversion: Conversion, original: nn.Module, data: Iterable[Any], heal_steps: int = 0, heal_lr: float = 1e-3, heal_params: str = "norm", seed: int = 0
) -> None:
    """Calibrate `conversion.model` toward `original` (then heal when heal_steps > 0), recording
    per-site fits in `conversion.calibration` and drift after each stage in `conversion.drift`."""
    from .calibrate import calibrate, check_batches
    from .drift import measure_drift
    from .heal import heal

    start = time.perf_counter()
    batches = check_batches(data)
    conversion.drift["swap"] = measure_drift(original, conversion.model, batches)
    conversion.calibration = calibrate(conversion.model, original, batches, conversion.plan)
    conversion.drift["calibrated"] = measure_drift(original, conversion.model, batches)
    if heal_steps:
        heal(conversion.model, original, batches, steps=heal_steps, lr=heal_lr, params=heal_params, seed=seed)
        conversion.drift["healed"] = measure_drift(original, conversion.model, batches)
    conversion.timings["calibrate"] = time.perf_counter() - start


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Any = None, inplace: bool = False) -> nn.Module:
    """Apply a saved plan to a fresh instance of the model class it was made for.

    The result has the converted architecture and state_dict keys; load the converted weights
    into it. `example_inputs` are needed only for lazy modules that were never run.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"apply_plan() needs a normswap.Plan, got {type(plan).__name__}; use Plan.from_json().")
    working = _working_copy(model, None if example_inputs is None else as_input_tuple(example_inputs), inplace)
    target = working
    if any(e.kind == "functional" and e.converts for e in plan):
        was_training = working.training
        working.train()  # functional `training=self.training` is traced as in convert()
        try:
            target = trace(working).train(was_training)
        except Exception as exc:  # noqa: BLE001
            raise PlanError(f"The plan rewrites functional batch_norm calls, but {type(model).__name__} cannot be traced: {exc}.") from exc
        working.train(was_training)
    return PassManager([SwapBatchNormModules(plan), RewriteFunctionalBatchNorm(plan)])(target).model


def _working_copy(model: nn.Module, inputs: tuple | None, inplace: bool) -> nn.Module:
    """The model to rewrite: itself, or a deep copy. Lazy modules cannot be copied before they
    are initialized, so they are initialized first by one eval forward on `inputs`."""
    if inputs is not None:
        materialize_lazy(model, inputs)
    elif _has_uninitialized(model):
        raise PlanError(f"{type(model).__name__} has lazy modules that were never run; pass example_inputs to initialize them.")
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
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{type(model).__name__} cannot run on the example inputs to initialize its lazy modules: {exc}.") from exc
    finally:
        for module, flag in flags.items():
            module.training = flag


def _keep_unrewritable_functional(plan: Plan, method: str) -> Plan:
    entries = []
    for entry in plan:
        if entry.kind == "functional" and entry.converts:
            entry = PlanEntry(entry.name, "keep", {}, f"functional call cannot be rewritten without an FX graph (captured with {method})", entry.kind)
        entries.append(entry)
    return Plan(entries, plan.version)


def _verify_subclasses(model: nn.Module, plan: Plan, sites: list[Site]) -> None:
    """A rebased subclass whose forward bypasses super().forward() would still use batch statistics."""
    shapes = {site.name: site.input_shape for site in sites if site.overrides_forward}
    for entry in plan:
        if entry.name in shapes and entry.target in ("groupnorm", "layernorm"):
            dependent, _ = probe_batch_dependence(model.get_submodule(entry.name), shapes[entry.name])
            if dependent:
                raise PlanError(
                    f"BatchNorm subclass '{entry.name}' computes batch_norm itself instead of calling super().forward(), "
                    "so normswap cannot replace its normalization; keep it or change the class."
                )
