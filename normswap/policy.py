"""Policy: the target that suits each site in a context, and the Plan made from sites, findings and a
requested target, one reasoned entry per site."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import targets
from .context import Context
from .errors import PlanError
from .plan import Plan, PlanEntry
from .sites import Site, SiteKind
from .targets import PlanOptions, Refusal

if TYPE_CHECKING:  # the rules ask policy for each site's natural target
    from .rules import Finding


def over_sequence(site: Site, context: Context) -> bool:
    """The site normalizes (N, C, L) steps of a sequence: a rank-3 input whose last axis is known
    to be ordered (a recurrent layer or a 1-d kernel spanning several steps upstream: `site.order`),
    or any rank-3 input when the context says the inputs are sequences. A rank-3 input alone is
    no evidence of time: PointNet's (N, C, points) after kernel-1 convolutions is a set."""
    return site.input_rank == 3 and (context.sequence or bool(site.order))


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
        refusal = targets.fold.TARGET.refusal(site)
        if refusal is None:
            return (
                "fold",
                "inference only: with running statistics BatchNorm is a fixed affine; fold keeps it at no cost",
            )
        why = "inference only: with running statistics BatchNorm is a fixed affine; frozen keeps it exactly"
        if site.producer_module is not None:  # it follows a layer fold could have used: say why not
            why += f" (no fold: {refusal})"
        return "frozen", why
    if (
        context.finetune
        and statistics
        and (context.batch_size is None or context.batch_size < context.small_batch_threshold)
    ):
        return "frozen", "fine-tuning a pretrained model with small batches: frozen keeps the pretrained statistics"
    if site.call_count > 1 and not site.ghost_batch and (rank is None or rank <= 3):
        return (
            "layernorm",
            f"applied {site.call_count} times per forward (recurrence): LayerNorm normalizes each step on its own",
        )
    if over_sequence(site, context):
        return "layernorm", "normalizes a (N, C, L) sequence: channel LayerNorm per time step"
    if rank == 3:
        return "groupnorm", "(N, C, L) points, no evidence of order along L: GroupNorm, as for the pixels of a map"
    if rank == 2:
        return "layernorm", "(N, C) features: LayerNorm over the features of each sample"
    if rank is None and site.flavour.endswith("1d"):
        return (
            "layernorm",
            "a BatchNorm1d normalizes (N, C) features or (N, C, L) steps: LayerNorm over the channels serves both",
        )
    return "groupnorm", "convolutional feature map: GroupNorm (Wu & He 2018)"


def most_severe(findings: Iterable[Finding]) -> Finding | None:
    """The most severe finding that proposes a fix; ties go to catalogue order (stable)."""
    best = None
    for finding in findings:
        if finding.remedy is None:
            continue
        if best is None or finding.severity.rank > best.severity.rank:
            best = finding
    return best


def make_plan(
    sites: Sequence[Site],
    findings: Sequence[Finding],
    context: Context,
    to: str = "auto",
    options: PlanOptions | None = None,
    *,
    keep_sites: Collection[str] = (),
    strict: bool = True,
) -> Plan:
    """One PlanEntry per site.

    `to="auto"` decides per site from the context and the findings (so lint and convert agree);
    an explicit target applies to every batch-dependent site. `keep_sites` are kept as they are.

    Raises:
        PlanError: a batch-dependent site that no target can replace (a subclass computing its
            statistics by hand, a custom look-alike, a site the explicit target and its fallback
            refuse). With `strict=False` such a site is kept instead, with the reason.
    """
    if to not in targets.choices():
        raise PlanError(f"Unknown target '{to}'; use one of {', '.join(targets.choices())}.")
    unknown = sorted(set(keep_sites) - {site.name for site in sites})
    if unknown:
        raise PlanError(
            f"--keep names {', '.join(repr(n) for n in unknown)}, which is not a BatchNorm site of this model; sites are: {', '.join(s.name for s in sites)}."
        )
    options = options or PlanOptions()
    by_site: dict[str, list[Finding]] = {}
    for finding in findings:
        if finding.site is not None:
            by_site.setdefault(finding.site.name, []).append(finding)
    entries = []
    for site in sites:
        if not site.batch_dependent:
            entries.append(
                keep(
                    site, "batch-independent: each sample's output does not depend on the batch", batch_independent=True
                )
            )
        elif site.name in keep_sites:
            entries.append(keep(site, "kept on request (--keep): it still normalizes with batch statistics"))
        else:
            try:
                entries.append(_replacement(site, by_site.get(site.name, []), context, to, options))
            except Refusal as refusal:
                if strict:
                    raise PlanError(
                        f"{refusal} To convert the rest, keep this layer: --keep {site.name} (keep_sites=[...] in the API)."
                    ) from None
                entries.append(keep(site, f"cannot be replaced: {refusal}"))
    if to == "auto":
        entries = _unreached_take_their_twins_form(sites, entries, options)
    return Plan(entries)


def _unreached_take_their_twins_form(
    sites: Sequence[Site], entries: list[PlanEntry], options: PlanOptions
) -> list[PlanEntry]:
    """An unreached layer takes the form of its reached twins: the layers the example reached
    that were built at the same source line, else by an identical constructor call (TabNet builds
    `initial_bn = BatchNorm1d(input_dim, momentum=0.01)` in a wrapper that never calls it and in the
    encoder that does). It has no function of its own to keep; planned as if its input were
    theirs, it becomes the same module class (a `torch.nn.LayerNorm` on (N, C) features, not the
    rank-agnostic channel LayerNorm), and one line builds one kind of layer (what `lint --fix`
    writes there). Twins that disagree on the target or the input rank give no form to follow."""
    by_name = {entry.name: entry for entry in entries}
    by_line: dict[tuple[str, int], list[Site]] = {}
    by_call: dict[tuple[object, ...], list[Site]] = {}
    for site in sites:
        if site.reached and site.defined_at is not None and by_name[site.name].converts:
            by_line.setdefault((site.defined_at.path, site.defined_at.line), []).append(site)
            by_call.setdefault(_constructor_call(site), []).append(site)
    result = []
    for site, entry in zip(sites, entries, strict=True):
        if site.reached or site.defined_at is None or not entry.converts:
            result.append(entry)
            continue
        line = by_line.get((site.defined_at.path, site.defined_at.line))
        twins = line or by_call.get(_constructor_call(site), [])
        forms = {(by_name[t.name].target, t.input_rank) for t in twins}
        if len(forms) == 1:
            twin = twins[0]
            shape = twin.input_shape
            stand_in = dataclasses.replace(
                site, input_shape=(shape[0], site.num_features or shape[1], *shape[2:]) if shape else None
            )
            how = (
                f"built at {site.defined_at} like the reached layers there"
                if line
                else f"built by the same call as '{twin.name}', which the example reached"
            )
            with contextlib.suppress(Refusal):  # where the twins' target refuses it, its own plan stands
                entry = entry_for(stand_in, by_name[twin.name].target, f"{_unreached(site)}; {how}", options)
        result.append(entry)
    return result


def _constructor_call(site: Site) -> tuple[object, ...]:
    """What identifies a constructor call: its code (without a trailing comment), the class and
    its arguments."""
    code = re.sub(r"\s+#.*$", "", site.defined_at.code).strip() if site.defined_at is not None else ""
    return (code, site.flavour, site.num_features, site.eps, site.momentum, site.affine, site.track_running_stats)


def _unreached(site: Site) -> str:
    return f"not reached by the example inputs: replaced from its constructor arguments ({site.flavour}({site.num_features}))"


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the target ("auto" or a registry name), the grouping options, and the sites
    to leave as they are."""

    to: str = "auto"
    options: PlanOptions = field(default_factory=PlanOptions)
    keep: tuple[str, ...] = ()


def resolve_plan(
    sites: Sequence[Site],
    findings: Sequence[Finding],
    context: Context,
    plan: Plan | None = None,
    request: PlanRequest | None = None,
    *,
    strict: bool = True,
) -> Plan:
    """`plan` checked against the sites when one is given, else a new plan for `request` (see
    `make_plan`; with `strict=False` a site no target can replace is kept, with the reason).

    Raises:
        PlanError: the given plan does not fit the sites, or (strict) a site no target can replace.
    """
    if plan is not None:
        plan.check(sites)
        return plan
    request = request or PlanRequest()
    return make_plan(sites, findings, context, request.to, request.options, keep_sites=request.keep, strict=strict)


def _replacement(site: Site, findings: list[Finding], context: Context, to: str, options: PlanOptions) -> PlanEntry:
    """The entry that replaces a batch-dependent site, or Refusal saying why none can."""
    explicit = targets.get(to) if to != "auto" else None
    if explicit is not None and (reason := explicit.unchanged(site)) is not None:
        return keep(site, reason)
    if site.normalizes_by_hand and not (explicit is not None and explicit.replaces_forward):
        raise Refusal(
            f"Layer '{site.name}' ({site.flavour}) computes its batch statistics by hand instead of calling batch_norm, "
            "so normswap cannot take its normalization over; replace the class in your code (e.g. by the torch BatchNorm it extends)."
        )
    if site.kind is SiteKind.LOOKALIKE:
        raise Refusal(
            f"Layer '{site.name}' ({site.flavour}) is a custom BatchNorm implementation that depends on the batch; "
            "normswap rewrites torch BatchNorm classes and their subclasses, so replace it in your code with one of those."
        )
    if to == "auto":
        return _auto_entry(site, findings, context, options)
    return explicit_entry(site, to, f"--to {to}" if site.reached else f"--to {to}, {_unreached(site)}", options)


def keep(site: Site, reason: str, **flags: bool) -> PlanEntry:
    return PlanEntry(site.name, "keep", dict(flags), reason, site.kind)


def entry_for(site: Site, target: str, reason: str, options: PlanOptions | None = None) -> PlanEntry:
    """A PlanEntry replacing `site` with `target`.

    Raises:
        Refusal: the target cannot replace this site (the message says which to use instead).
    """
    params, why = targets.get(target).plan(site, options or PlanOptions())
    reason = f"{reason}; {why}" if why else reason
    if site.read_attributes:
        reason += f"; forward reads its {', '.join(site.read_attributes)}, which the replacement keeps"
    return PlanEntry(site.name, target, params, reason, site.kind, site.read_attributes)


def explicit_entry(site: Site, target: str, reason: str, options: PlanOptions) -> PlanEntry:
    """`target` for the site, else its declared fallback with both reasons; PlanError otherwise."""
    try:
        return entry_for(site, target, reason, options)
    except Refusal as refusal:
        fallback = targets.get(target).fallback
        if fallback is None:
            raise
        try:
            return entry_for(site, fallback, f"{reason}, fell back to {fallback}: {refusal}", options)
        except Refusal as second:
            raise Refusal(f"{refusal}; its fallback {fallback} cannot either: {second}") from None


def _auto_entry(site: Site, findings: list[Finding], context: Context, options: PlanOptions) -> PlanEntry:
    """The site's natural target in this context (what every finding's fix proposes, so lint and
    convert agree), the reason led by the most severe finding; where it refuses the site, the
    targets it falls back to (`auto_fallback`, else `fallback`) in turn."""
    target, why = natural_target(site, context)
    deciding = most_severe(findings)
    if deciding is not None:
        why = f"{deciding.code} {deciding.name}: {why}"
    if not site.reached:
        why = f"{_unreached(site)}; {why}"
    candidate: str | None = target
    reason, tried, problems = why, [], []
    while candidate is not None and candidate not in tried:
        tried.append(candidate)
        try:
            return entry_for(site, candidate, reason, options)
        except Refusal as refusal:
            problems.append(str(refusal))
        refused = targets.get(candidate)
        candidate = refused.auto_fallback or refused.fallback
        reason = f"{why}; fell back to {candidate}: {problems[-1]}"
    raise Refusal(f"No replacement fits layer '{site.name}': {problems[0]}")
