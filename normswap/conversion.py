"""convert(): rewrite a model's BatchNorm sites and, given unlabeled data, calibrate and heal it."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import targets
from .analysis import Analysis
from .calibration import (
    CalibrationOutcome,
    Drift,
    HealOptions,
    HealResult,
    SiteCost,
    SiteFit,
    calibrate_and_heal,
    check_model_accepts,
    input_batches,
    site_costs,
)
from .calibration.attribution import DEFAULT_SAMPLES
from .calibration.device import DEVICE_CHOICES
from .calibration.fit import CALIBRATION_SAMPLES
from .context import Context
from .errors import ConfigError
from .options import option
from .plan import Plan
from .policy import PlanRequest, entry_for
from .rewrite import Rewritten, materialize_lazy, rewrite_model
from .rules import Finding
from .sites import Site
from .targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, PlanOptions
from .torchutil import as_input_tuple, require_module, require_type


def _percent(value: float) -> float:
    return value / 100


@dataclass(frozen=True)
class ConvertOptions:
    """How `convert` rewrites, calibrates and heals a model (every field is also a `normswap
    convert` option; the API takes them as keyword arguments of `convert`)."""

    to: str = option(
        "auto",
        "--to",
        help="Replacement target: auto (per site, from the findings), "
        + "; ".join(f"{t.name}: {t.summary}" for t in targets.registered() if t.converts)
        + ".",
        choices=targets.choices,
        show_default=True,
    )
    max_groups: int = option(
        DEFAULT_MAX_GROUPS,
        "--groups",
        help="Largest GroupNorm group count.",
        value_type=int,
        minimum=1,
        show_default=True,
    )
    channels_per_group: int = option(
        DEFAULT_CHANNELS_PER_GROUP,
        "--channels-per-group",
        help="Fewest channels in a GroupNorm group (1 allows InstanceNorm, which loses each sample's channel intensities).",
        value_type=int,
        minimum=1,
        show_default=True,
    )
    keep: tuple[str, ...] = option(
        (),
        "--keep",
        help="Leave this BatchNorm site as it is (repeatable); it keeps its batch statistics.",
        multiple=True,
        metavar="LAYER",
    )
    heal: HealOptions | None = option(
        None,
        "--heal",
        help="After calibration, distil the converted model toward the original (the measured defaults).",
        value_type=bool,
    )
    freeze_costly: float | None = option(
        None,
        "--freeze-costly",
        help="With --to auto and --calibration-data: freeze each site whose conversion alone, calibrated, costs more than PCT points "
        "of top-1 agreement.",
        value_type=float,
        minimum=0,
        maximum=100,
        open_maximum=True,
        finite=True,
        metavar="PCT",
        parse=_percent,
    )
    keep_function: float | None = option(
        None,
        "--keep-function",
        help="With --calibration-data: keep held-out top-1 agreement with the original at or above FRACTION (e.g. 0.99); "
        "the sites whose conversion costs most are frozen until it holds, and the plan says which and why.",
        value_type=float,
        minimum=0,
        maximum=1,
        open_minimum=True,
        finite=True,
        metavar="FRACTION",
    )
    keep_eps: bool = option(
        False,
        "--keep-eps",
        help="With --calibration-data: keep each new layer's eps (the BatchNorm's) instead of letting calibration choose a "
        "larger one that keeps more of each sample's scale.",
        value_type=bool,
    )
    attribution_samples: int = option(
        DEFAULT_SAMPLES,
        "--attribution-samples",
        help="Calibration inputs used to measure what each site costs alone (0: not measured).",
        value_type=int,
        minimum=0,
        show_default=True,
    )
    calibration_memory: float | None = option(
        None,
        "--calibration-memory",
        help="GiB of activations calibration may hold at once, all batches together (default: half the memory available); "
        "batches past it are run again from the input at each site.",
        value_type=float,
        minimum=0,
        open_minimum=True,
        finite=True,
        metavar="GIB",
    )
    device: str | torch.device | None = option(
        "auto",
        "--device",
        help="Where calibration, healing and validation run (auto: this process's GPU when there is one, under torchrun its local GPU).",
        choices=DEVICE_CHOICES,
        show_default=True,
    )

    def __post_init__(self) -> None:
        require_type(self.heal, HealOptions, "heal", "convert", "pass normswap.HealOptions(steps=..., lr=...)")
        require_type(self.to, str, "to", "convert")
        if self.freeze_costly is not None and not 0 <= self.freeze_costly < 1:
            raise ValueError(f"freeze_costly is a fraction of agreement in [0, 1), got {self.freeze_costly!r}.")
        if self.keep_function is not None and (
            isinstance(self.keep_function, bool)
            or not isinstance(self.keep_function, (int, float))
            or not 0 < self.keep_function <= 1
        ):
            raise ValueError(f"keep_function is a fraction of top-1 agreement in (0, 1], got {self.keep_function!r}.")
        object.__setattr__(self, "keep", tuple(self.keep))

    @property
    def plan_options(self) -> PlanOptions:
        return PlanOptions(max_groups=self.max_groups, channels_per_group=self.channels_per_group)

    @property
    def plan_request(self) -> PlanRequest:
        return PlanRequest(self.to, self.plan_options, self.keep)

    def replace(self, **changes: Any) -> ConvertOptions:
        """A copy with some fields changed.

        Raises:
            TypeError: a name that is not a field (the message lists them).
        """
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(
                f"convert() got an unexpected keyword argument '{unknown[0]}'; its settings are: {', '.join(names)}."
            )
        return dataclasses.replace(self, **changes)


@dataclass
class Conversion:
    """The result of `convert`: the converted model, the plan it followed, what was found, and
    what calibration and healing did."""

    model: nn.Module
    plan: Plan
    sites: list[Site]
    findings: list[Finding]
    analysis: Analysis
    changes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was not done or checked, and why
    calibration: list[SiteFit] = field(default_factory=list)
    healing: HealResult | None = None
    attribution: list[SiteCost] = field(default_factory=list)  # worst first
    drift: dict[str, Drift] = field(default_factory=dict)  # "swap" / "calibrated" / "healed"

    @property
    def capture_method(self) -> str:
        return self.analysis.capture.method

    @classmethod
    def of(cls, rewritten: Rewritten) -> Conversion:
        return cls(**{f.name: getattr(rewritten, f.name) for f in dataclasses.fields(rewritten)})


def convert(
    model: nn.Module,
    example_inputs: Any,
    to: str | None = None,
    context: Context | None = None,
    inplace: bool = False,
    *,
    plan: Plan | None = None,
    calibration_data: Any = None,
    options: ConvertOptions | None = None,
    **settings: Any,
) -> Conversion:
    """Rewrite every BatchNorm site of `model` into a batch-independent normalization.

    Args:
        model: the model; not modified unless `inplace=True`.
        example_inputs: a tensor or tuple of tensors the model runs on (batch first); None: the
            model is not run, and every BatchNorm module is replaced from its constructor
            arguments (NS205 lists them; functional calls in forward are not seen).
        to: "auto" (per site, from the findings) or a target name (`normswap.targets.choices()`);
            default: `options.to`, "auto".
        context: how the model is trained / served (drives "auto").
        inplace: rewrite `model` itself instead of a copy.
        plan: apply this plan instead of planning (checked against the model first).
        calibration_data: unlabeled inputs: a list of batches, a DataLoader, a Dataset or a tensor
            of samples (batches that also hold labels are fine: items past the example inputs'
            count are ignored); streamed, not held in memory. When given, a held-out part is set
            aside (where every stage's drift is measured), each new GroupNorm / LayerNorm affine is
            fitted to the original BatchNorm output on the first 4,096 samples of the rest (see
            `normswap.calibrate`), and healing, when asked for, streams the rest.
        options: the settings (`ConvertOptions`); keyword `settings` override single fields:
            max_groups (largest GroupNorm group count), channels_per_group (fewest channels in a
            group), keep (names of sites to leave as they are, with their batch statistics),
            heal (`HealOptions()`: heal after calibration with the measured defaults; None:
            calibrate only), device (where calibration and healing run; "auto": this process's
            GPU when there is one), freeze_costly (with `to="auto"` and calibration data: freeze
            each site with running statistics whose conversion alone, calibrated, loses more
            than this fraction of top-1 agreement or cosine similarity), attribution_samples
            (calibration inputs used to measure what each site costs alone; 0: not measured),
            calibration_memory (GiB of activations calibration holds at once; default: half
            the memory available), keep_eps (calibration keeps each new layer's eps instead of
            choosing one; see `normswap.calibrate`).

    Returns:
        Conversion with `.model` (the user's module tree with swapped submodules, or an
        fx.GraphModule when functional sites were rewritten), `.plan`, `.sites`, `.findings`.

    Raises:
        TypeError / ValueError: the arguments are not what this function takes.
        NormswapError: the model, inputs or plan do not allow the conversion (one sentence).
    """
    require_module(model, "convert")
    require_type(context, Context, "context", "convert", "build one with normswap.Context(batch_size=..., ...)")
    require_type(plan, Plan, "plan", "convert", "read one with normswap.Plan.from_json(text)")
    require_type(options, ConvertOptions, "options", "convert", "build one with normswap.ConvertOptions(...)")
    options = (options or ConvertOptions()).replace(**settings, **({"to": to} if to is not None else {}))
    return convert_with(
        model, example_inputs, context, options, plan=plan, calibration_data=calibration_data, inplace=inplace
    )


def convert_with(
    model: nn.Module,
    example_inputs: Any,
    context: Context | None,
    options: ConvertOptions,
    *,
    plan: Plan | None = None,
    calibration_data: Any = None,
    inplace: bool = False,
) -> Conversion:
    """`convert` with its settings as one object (the engine behind the API and the CLI)."""
    if example_inputs is not None:
        materialize_lazy(model, as_input_tuple(example_inputs))  # lazy modules cannot be copied before
    original = copy.deepcopy(model) if inplace and calibration_data is not None else model
    searching = calibration_data is not None and (
        options.freeze_costly is not None or options.keep_function is not None
    )
    rewritten = rewrite_model(
        model, example_inputs, context, options.plan_request, plan=plan, inplace=inplace and not searching
    )
    if calibration_data is None:
        if options.keep_function is not None:
            raise ConfigError(
                "--keep-function needs --calibration-data: the function kept is measured as agreement with the original on held-out data."
            )
        return _recorded(Conversion.of(rewritten))
    stream = input_batches(calibration_data, inputs=len(as_input_tuple(example_inputs)))
    costs: list[SiteCost] | None = None
    if searching:  # (calibrate_and_heal reads and checks the data itself: read here only to search)
        batches = stream.head(CALIBRATION_SAMPLES)
        check_model_accepts(original, batches)  # one sentence naming the batch, before anything runs on it
        costs = site_costs(original, rewritten.plan, batches, samples=options.attribution_samples or DEFAULT_SAMPLES)
    chosen = rewritten.plan
    if costs is not None and options.freeze_costly is not None and options.to == "auto" and plan is None:
        chosen = _freeze_costly(chosen, rewritten.sites, costs, options.freeze_costly, options.plan_options)
    memory_limit = None if options.calibration_memory is None else int(options.calibration_memory * 2**30)

    def attempt(plan_now: Plan, in_place: bool) -> tuple[Rewritten, CalibrationOutcome]:
        # entries copied: calibration writes the eps it chooses into the plan it calibrates
        fresh = Plan([dataclasses.replace(e) for e in plan_now.entries], plan_now.version)
        done = rewrite_model(model, example_inputs, context, options.plan_request, plan=fresh, inplace=in_place)
        outcome = calibrate_and_heal(
            done.model,
            original,
            done.plan,
            stream,
            options.heal,
            options.device,
            0 if costs is not None else options.attribution_samples,  # measured above: each site alone costs the same
            memory_limit,
            fit_eps=not options.keep_eps,
        )
        return done, outcome

    notes: list[str] = []
    if options.keep_function is not None and costs is not None:
        in_place = functools.partial(rewrite_model, model, example_inputs, context, options.plan_request, inplace=True)
        rewritten, outcome, notes = _within_function(
            attempt, lambda p: in_place(plan=p), chosen, rewritten.sites, costs, options, inplace
        )
    elif searching:
        rewritten, outcome = attempt(chosen, inplace)
    else:
        outcome = calibrate_and_heal(
            rewritten.model,
            original,
            rewritten.plan,
            stream,
            options.heal,
            options.device,
            options.attribution_samples,
            memory_limit,
            fit_eps=not options.keep_eps,
        )
    if costs is not None and options.attribution_samples:
        outcome.attribution = [c for c in costs if _changes_function(rewritten.plan, c.site)]
    conversion = Conversion.of(rewritten)
    return _recorded(
        dataclasses.replace(
            conversion,
            calibration=outcome.fits,
            attribution=outcome.attribution,
            healing=outcome.healing,
            drift=outcome.drift,
            notes=[*conversion.notes, *notes, *outcome.notes],
            timings={**conversion.timings, "calibrate": outcome.seconds},
        )
    )


def _kept(outcome: CalibrationOutcome) -> float:
    """The function kept after the last stage: held-out top-1 agreement (cosine without class scores)."""
    return list(outcome.drift.values())[-1].function_kept


def _within_function(
    attempt: Callable[[Plan, bool], tuple[Rewritten, CalibrationOutcome]],
    rewrite: Callable[[Plan], Rewritten],
    plan: Plan,
    sites: list[Site],
    costs: list[SiteCost],
    options: ConvertOptions,
    inplace: bool,
) -> tuple[Rewritten, CalibrationOutcome, list[str]]:
    """Convert, calibrate (and heal); while held-out agreement stays below `keep_function`, freeze
    the sites whose conversion alone costs most (1, 2, 4, ... of them) and try again."""
    goal = options.keep_function
    assert goal is not None
    by_name = {site.name: site for site in sites}
    freezable = sorted(  # costliest first
        (c for c in costs if by_name[c.site].track_running_stats and not by_name[c.site].batch_dependent_eval),
        key=lambda c: c.worst,
        reverse=True,
    )
    tried: list[str] = []
    count = 0
    while True:
        frozen = {}
        for cost in freezable[:count]:
            measure = (
                "top-1 agreement" if (cost.calibrated or cost.swap).top1_agreement is not None else "cosine similarity"
            )
            reason = (
                f"--keep-function {goal:.1%}: converted alone and calibrated, {cost.target} loses {cost.worst:.1%} {measure} "
                f"with the original, the most of the sites still converted; frozen keeps its function"
            )
            frozen[cost.site] = entry_for(by_name[cost.site], "frozen", reason, options.plan_options)
        plan_now = Plan([frozen.get(e.name, e) for e in plan.entries], plan.version)
        last = count >= len(freezable)
        rewritten, outcome = attempt(plan_now, False)
        kept = _kept(outcome)
        tried.append(f"{count} frozen: {kept:.1%}")
        if kept >= goal or last:
            break
        count = min(len(freezable), max(1, 2 * count))
    if inplace:  # the attempts ran on copies: the kept plan (with the eps calibration chose) on the user's model
        fitted = rewritten.model.state_dict()
        rewritten = rewrite(rewritten.plan)
        rewritten.model.load_state_dict(fitted)
    verdict = "kept" if kept >= goal else "NOT reached even with every site frozen that can be"
    notes = [
        f"--keep-function {goal:.1%}: held-out agreement {kept:.1%} with {count} site(s) frozen "
        f"({', '.join(c.site for c in freezable[:count]) or 'none'}), {verdict}; tried {'; '.join(tried)}"
    ]
    return rewritten, outcome, notes


CONFIG_KEY = "normswap_plan"  # where a Hugging Face model's config holds its plan


def record_plan(model: nn.Module, plan: Plan) -> bool:
    """Write `plan` into the model's Hugging Face config, if it has one (True when it has)."""
    config = getattr(model, "config", None)
    if (
        config is None
        or not callable(getattr(config, "to_dict", None))
        or not callable(getattr(config, "save_pretrained", None))
    ):
        return False
    setattr(config, CONFIG_KEY, plan.to_dict())
    return True


def _recorded(conversion: Conversion) -> Conversion:
    """A Hugging Face model carries its plan in its config: `save_pretrained` then writes it, and
    `normswap.from_pretrained` rebuilds the converted architecture from it."""
    if record_plan(conversion.model, conversion.plan):
        conversion.notes.append(
            f"the plan is recorded in model.config.{CONFIG_KEY}: save_pretrained keeps it, normswap.from_pretrained reads it"
        )
    return conversion


def _changes_function(plan: Plan, site: str) -> bool:
    entry = plan.get(site)
    return entry is not None and entry.converts and not targets.get(entry.target).keeps_function


def _freeze_costly(
    plan: Plan, sites: list[Site], costs: list[SiteCost], threshold: float, options: PlanOptions
) -> Plan:
    """The plan with every site that costs more than `threshold` alone frozen, the reason saying so."""
    by_name = {site.name: site for site in sites}
    changed = {}
    for cost in costs:
        site = by_name[cost.site]
        if cost.worst <= threshold or not site.track_running_stats or site.batch_dependent_eval:
            continue
        measure = (
            "top-1 agreement" if (cost.calibrated or cost.swap).top1_agreement is not None else "cosine similarity"
        )
        reason = (
            f"converted alone and calibrated, {cost.target} loses {cost.worst:.1%} {measure} with the original on the calibration data "
            f"(more than --freeze-costly {threshold:.1%}): frozen keeps its function"
        )
        changed[cost.site] = entry_for(site, "frozen", reason, options)
    if not changed:
        return plan
    return Plan([changed.get(entry.name, entry) for entry in plan.entries], plan.version)
