"""The target registry: one module per replacement, one explicit tuple, and the natural choice
for a site. Everything else asks this registry; a target's name elsewhere is data only."""

from __future__ import annotations

from ..errors import PlanError
from ..sites import Site
from . import fold, frozen, groupnorm, keep, layernorm, syncbn
from .base import DEFAULT_CHANNELS_PER_GROUP, DEFAULT_MAX_GROUPS, Param, PlanOptions, Refusal, Target

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


def natural_target(site: Site) -> tuple[str, str]:
    """The batch-independent replacement that suits the site's data, with the reason."""
    rank = site.input_rank
    if site.feeds_from_input and site.track_running_stats:
        return "frozen", "normalizes the model's raw inputs (data standardization): frozen keeps the learned statistics"
    if site.call_count > 1 and (rank is None or rank <= 3):
        return "layernorm", f"applied {site.call_count} times per forward (recurrence): LayerNorm normalizes each step on its own"
    if rank == 3 and site.flavour.endswith("1d"):
        return "layernorm", "normalizes a (N, C, L) sequence: channel LayerNorm per time step"
    if rank == 2:
        return "layernorm", "(N, C) features: LayerNorm over the features of each sample"
    return "groupnorm", "convolutional feature map: GroupNorm (Wu & He 2018)"


__all__ = [
    "CHOICES",
    "DEFAULT_CHANNELS_PER_GROUP",
    "DEFAULT_MAX_GROUPS",
    "NAMES",
    "REGISTRY",
    "Param",
    "PlanOptions",
    "Refusal",
    "Target",
    "get",
    "natural_target",
]
