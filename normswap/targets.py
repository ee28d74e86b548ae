"""Targets: which replacement fits a site, and with which parameters (GroupNorm group count etc.)."""
from __future__ import annotations

from .errors import PlanError
from .plan import PlanEntry
from .sites import Site

TARGETS = ("auto", "groupnorm", "layernorm", "frozen", "syncbn")
DEFAULT_MAX_GROUPS = 32


def choose_num_groups(num_channels: int, values_per_channel: int, max_groups: int = DEFAULT_MAX_GROUPS) -> tuple[int, str]:
    """Largest divisor G of C with G <= max_groups whose groups hold more than one value.

    A group of one value (C/G channels x spatial positions == 1) always normalizes to zero.
    Returns (G, reason).
    """
    rejected_degenerate = False
    for groups in range(min(max_groups, num_channels), 0, -1):
        if num_channels % groups:
            continue
        if (num_channels // groups) * values_per_channel < 2:
            rejected_degenerate = True
            continue
        why = f"GroupNorm({groups}, {num_channels}): {num_channels // groups} channel(s) per group"
        if rejected_degenerate:
            why += f", fewer groups than {min(max_groups, num_channels)} so that no group holds a single value"
        elif groups != max_groups:
            why += f", largest divisor of {num_channels} up to {max_groups}"
        if groups == num_channels and groups > 1:
            why += " (one channel per group is InstanceNorm; a lower --groups keeps per-sample channel intensities)"
        return groups, why
    raise PlanError(f"A GroupNorm over {num_channels} channel(s) of {values_per_channel} value(s) has no non-degenerate grouping.")


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


def entry_for(site: Site, target: str, reason: str, max_groups: int = DEFAULT_MAX_GROUPS) -> PlanEntry:
    """A PlanEntry replacing `site` with `target`.

    Raises:
        PlanError: the target cannot replace this site (the message says which to use instead).
    """
    kind = site.kind
    if target == "keep":
        return PlanEntry(site.name, "keep", {}, reason, kind)
    if site.kind == "lookalike":
        raise PlanError(
            f"Layer '{site.name}' ({site.flavour}) is not a torch BatchNorm and normswap cannot rewrite its custom "
            "forward; keep it or replace the class in your code."
        )
    channels = site.num_features
    where = f"Layer '{site.name}' ({site.flavour}, input {_shape(site)})"
    if channels is None or site.input_shape is None:
        raise PlanError(f"{where} was never called with a known input shape; pass example inputs that reach it.")
    common = {"eps": site.eps, "affine": site.affine}
    if target == "groupnorm":
        try:
            groups, why = choose_num_groups(channels, site.spatial_size or 1, max_groups)
        except PlanError:
            raise PlanError(f"{where} normalizes a single value per sample, which GroupNorm would turn into zeros; use --to frozen or keep it.") from None
        return PlanEntry(site.name, "groupnorm", {"num_groups": groups, "num_channels": channels, **common}, f"{reason}; {why}", kind)
    if target == "layernorm":
        if channels < 2:
            raise PlanError(f"{where} has one channel, which LayerNorm over channels would turn into zeros; use --to frozen or keep it.")
        layout = "features" if site.input_rank == 2 else "channels_first"
        return PlanEntry(site.name, "layernorm", {"num_channels": channels, "layout": layout, **common}, reason, kind)
    if target == "frozen":
        if not site.track_running_stats:
            raise PlanError(f"{where} keeps no running statistics (track_running_stats=False), so there is nothing to freeze; use groupnorm or layernorm.")
        return PlanEntry(site.name, "frozen", {"num_features": channels, **common}, reason, kind)
    if target == "syncbn":
        if site.kind != "module":
            raise PlanError(f"{where} is a {site.kind} site; SyncBatchNorm replaces only torch BatchNorm modules, use groupnorm or layernorm.")
        params = {"num_features": channels, "momentum": site.momentum, "track_running_stats": site.track_running_stats, **common}
        return PlanEntry(site.name, "syncbn", params, reason, kind)
    raise PlanError(f"Unknown target '{target}'; use one of {', '.join(TARGETS)}.")


def _shape(site: Site) -> str:
    return "x".join(str(d) for d in site.input_shape) if site.input_shape else "unknown"
