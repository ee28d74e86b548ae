"""convert(): rewrite a model's BatchNorm sites and, given unlabeled data, calibrate and heal it."""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from .calibration import HealOptions, SiteCost, calibrate_and_heal, check_batches, check_model_accepts, site_costs
from .calibration.attribution import DEFAULT_SAMPLES
from .context import Context
from .plan import Plan
from .policy import entry_for
from .rewrite import Conversion, materialize_lazy, rewrite
from .sites import Site
from .targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, PlanOptions
from .torchutil import as_input_tuple, require_module, require_type


def convert(
    model: nn.Module,
    example_inputs: Any,
    to: str = "auto",
    context: Context | None = None,
    inplace: bool = False,
    *,
    max_groups: int = DEFAULT_MAX_GROUPS,
    channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP,
    plan: Plan | None = None,
    keep: Collection[str] = (),
    calibration_data: Iterable[Any] | None = None,
    heal: HealOptions | None = None,
    device: str | torch.device | None = "auto",
    freeze_costly: float | None = None,
    attribution_samples: int = DEFAULT_SAMPLES,
) -> Conversion:
    """Rewrite every BatchNorm site of `model` into a batch-independent normalization.

    Args:
        model: the model; not modified unless `inplace=True`.
        example_inputs: a tensor or tuple of tensors the model runs on (batch first).
        to: "auto" (per site, from the findings) or a target name (`normswap.targets.NAMES`).
        context: how the model is trained / served (drives "auto").
        inplace: rewrite `model` itself instead of a copy.
        max_groups: largest GroupNorm group count.
        channels_per_group: smallest number of channels in a GroupNorm group.
        plan: apply this plan instead of planning (checked against the model first).
        keep: names of BatchNorm sites to leave as they are (they keep their batch statistics).
        calibration_data: unlabeled input batches; when given, each new GroupNorm / LayerNorm
            affine is fitted to the original BatchNorm output (see `normswap.calibrate`).
        heal: heal after calibration with these settings (`HealOptions()`: the measured
            defaults); None: calibrate only.
        device: where calibration and healing run ("auto": this process's GPU when there is
            one, else the CPU); the models return to their own devices afterwards.
        freeze_costly: with `to="auto"` and calibration data: freeze (keep the function of) each
            site with running statistics whose conversion alone, calibrated, loses more than this
            fraction of top-1 agreement (or of cosine similarity) with the original.
        attribution_samples: calibration inputs used to measure what each site costs alone
            (`Conversion.attribution`); 0: not measured.

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
    require_type(heal, HealOptions, "heal", "convert", "pass normswap.HealOptions(steps=..., lr=...)")
    require_type(to, str, "to", "convert")
    options = PlanOptions(max_groups=max_groups, channels_per_group=channels_per_group)
    materialize_lazy(model, as_input_tuple(example_inputs))  # lazy modules cannot be copied before
    original = copy.deepcopy(model) if inplace and calibration_data is not None else model
    if freeze_costly is not None and not 0 <= freeze_costly < 1:
        raise ValueError(f"freeze_costly is a fraction of agreement in [0, 1), got {freeze_costly!r}.")
    conversion = rewrite(model, example_inputs, to, context, inplace and freeze_costly is None, options=options, plan=plan, keep=keep)
    if calibration_data is None:
        return conversion
    batches = check_batches(calibration_data)
    check_model_accepts(original, batches)
    if freeze_costly is not None and to == "auto" and plan is None:
        costs = site_costs(original, conversion.plan, batches, samples=attribution_samples or DEFAULT_SAMPLES)
        frozen = _freeze_costly(conversion.plan, conversion.sites, costs, freeze_costly, options)
        if frozen is not conversion.plan or inplace:  # the first rewrite was on a copy
            conversion = rewrite(model, example_inputs, to, context, inplace, options=options, plan=frozen)
    calibrate_and_heal(conversion, original, batches, heal, device, attribution_samples)
    return conversion


def _freeze_costly(plan: Plan, sites: list[Site], costs: list[SiteCost], threshold: float, options: PlanOptions) -> Plan:
    """The plan with every site that costs more than `threshold` alone frozen, the reason saying so."""
    by_name = {site.name: site for site in sites}
    changed = {}
    for cost in costs:
        site = by_name[cost.site]
        if cost.worst <= threshold or not site.track_running_stats or site.batch_dependent_eval:
            continue
        measure = "top-1 agreement" if (cost.calibrated or cost.swap).top1_agreement is not None else "cosine similarity"
        reason = (
            f"converted alone and calibrated, {cost.target} loses {cost.worst:.1%} {measure} with the original on the calibration data "
            f"(more than --freeze-costly {threshold:.1%}): frozen keeps its function"
        )
        changed[cost.site] = entry_for(site, "frozen", reason, options)
    if not changed:
        return plan
    return Plan([changed.get(entry.name, entry) for entry in plan.entries], plan.version)
