"""convert(): rewrite a model's BatchNorm sites and, given unlabeled data, calibrate and heal it."""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable
from typing import Any

from torch import nn

from .calibration import HealOptions, calibrate_and_heal
from .context import Context
from .plan import Plan
from .rewrite import Conversion, materialize_lazy, rewrite
from .targets import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, PlanOptions
from .torchutil import as_input_tuple, require_module


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
        heal: healing after calibration (`HealOptions(steps=...)`; default: none).

    Returns:
        Conversion with `.model` (the user's module tree with swapped submodules, or an
        fx.GraphModule when functional sites were rewritten), `.plan`, `.sites`, `.findings`.

    Raises:
        TypeError / ValueError: the arguments are not what this function takes.
        NormswapError: the model, inputs or plan do not allow the conversion (one sentence).
    """
    require_module(model, "convert")
    options = PlanOptions(max_groups=max_groups, channels_per_group=channels_per_group)
    materialize_lazy(model, as_input_tuple(example_inputs))  # lazy modules cannot be copied before
    original = copy.deepcopy(model) if inplace and calibration_data is not None else model
    conversion = rewrite(model, example_inputs, to, context, inplace, options=options, plan=plan, keep=keep)
    if calibration_data is not None:
        calibrate_and_heal(conversion, original, calibration_data, heal)
    return conversion
