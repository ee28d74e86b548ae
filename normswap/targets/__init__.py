"""The target registry: one module per replacement, one explicit tuple, and the natural choice
for a site. Everything else asks this registry; a target's name elsewhere is data only."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..context import Context
from ..errors import PlanError
from ..sites import Site
from . import fold, frozen, groupnorm, keep, layernorm, syncbn
from .base import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, Param, ParamKind, PlanOptions, Refusal, Target

REGISTRY: tuple[Target, ...] = (groupnorm.TARGET, layernorm.TARGET, frozen.TARGET, syncbn.TARGET, fold.TARGET, keep.TARGET)
NAMES: tuple[str, ...] = tuple(target.name for target in REGISTRY)
# what `--to` / convert(to=...) accept: a target for every batch-dependent site, or auto
CHOICES: tuple[str, ...] = ("auto", *(name for name in NAMES if name != "keep"))
_BY_NAME = {target.name: target for target in REGISTRY}


def get(name: str) -> Target:
    """The target called `name`.

    Raises:
        PlanError: no such target.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise PlanError(f"Unknown target '{name}'; use one of {', '.join(NAMES)}.") from None


def recognize(module: nn.Module) -> tuple[Target, dict[str, Any]] | None:
    """The target that built `module`, with its parameters read back (None: no target's module)."""
    for target in REGISTRY:
        params = target.params_from_module(module)
        if params is not None:
            return target, params
    return None


def over_sequence(site: Site, context: Context) -> bool:
    """The site normalizes (N, C, L) steps of a sequence: a BatchNorm1d on a rank-3 input, or any
    rank-3 input when the context says the inputs are sequences."""
    return site.input_rank == 3 and (context.sequence or site.flavour.endswith("1d"))


def natural_target(site: Site, context: Context | None = None) -> tuple[str, str]:
    """The replacement that suits the site in this context, with the reason: the best choice for
    the site, which a finding's fix never replaces with a worse one.

    Keeping the function wins wherever it is batch-independent: BatchNorm on the model's raw
    inputs (data standardization) stays frozen in every context; inference only folds or
    freezes; small-batch fine-tuning freezes. Otherwise the data decides: recurrence, sequences
    and (N, C) features get LayerNorm, feature maps GroupNorm.
    """
    context = context or Context()
    rank = site.input_rank
    statistics = site.track_running_stats and not site.batch_dependent_eval
    if site.feeds_from_input and statistics:
        return "frozen", "normalizes the model's raw inputs (data standardization): frozen keeps the learned statistics"
    if context.inference_only and statistics:
        if fold.TARGET.can_fold(site):
            return ("fold", "inference only: with running statistics BatchNorm is a fixed affine; fold keeps it at no cost")
        why = "inference only: with running statistics BatchNorm is a fixed affine; frozen keeps it exactly"
        if site.producer_weights_problem:  # it follows a layer fold would have used: say why not
            why += f" (no fold into {site.producer_module}, {site.producer_weights_problem})"
        return "frozen", why
    if context.finetune and statistics and (context.batch_size is None or context.batch_size < context.small_batch_threshold):
        return "frozen", "fine-tuning a pretrained model with small batches: frozen keeps the pretrained statistics"
    if site.call_count > 1 and (rank is None or rank <= 3):
        return ("layernorm", f"applied {site.call_count} times per forward (recurrence): LayerNorm normalizes each step on its own")
    if over_sequence(site, context):
        return "layernorm", "normalizes a (N, C, L) sequence: channel LayerNorm per time step"
    if rank == 2:
        return "layernorm", "(N, C) features: LayerNorm over the features of each sample"
    if rank is None and site.flavour.endswith("1d"):
        return "layernorm", "a BatchNorm1d normalizes (N, C) features or (N, C, L) steps: LayerNorm over the channels serves both"
    return "groupnorm", "convolutional feature map: GroupNorm (Wu & He 2018)"


__all__ = [
    "CHOICES",
    "DEFAULT_CHANNELS_PER_GROUP",
    "DEFAULT_MAX_GROUPS",
    "NAMES",
    "REGISTRY",
    "Param",
    "ParamKind",
    "PlanOptions",
    "Refusal",
    "Target",
    "get",
    "natural_target",
    "over_sequence",
    "recognize",
]
