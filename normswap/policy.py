"""Policy: turn sites, findings and a requested target into a Plan, one reasoned entry per site."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from . import targets
from .advise import most_severe
from .context import Context
from .errors import PlanError
from .plan import Plan, PlanEntry
from .rules import Finding
from .sites import Site, SiteKind
from .targets import PlanOptions, Refusal


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
    if to not in targets.CHOICES:
        raise PlanError(f"Unknown target '{to}'; use one of {', '.join(targets.CHOICES)}.")
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
            entries.append(keep(site, "batch-independent: each sample's output does not depend on the batch", batch_independent=True))
        elif site.name in keep_sites:
            entries.append(keep(site, "kept on request (--keep): it still normalizes with batch statistics"))
        else:
            try:
                entries.append(_replacement(site, by_site.get(site.name, []), context, to, options))
            except Refusal as refusal:
                if strict:
                    raise PlanError(f"{refusal} To convert the rest, keep this layer: --keep {site.name} (keep_sites=[...] in the API).") from None
                entries.append(keep(site, f"cannot be replaced: {refusal}"))
    if to == "auto":
        entries = _unreached_follow_their_line(sites, entries, options)
    return Plan(entries)


def _unreached_follow_their_line(sites: Sequence[Site], entries: list[PlanEntry], options: PlanOptions) -> list[PlanEntry]:
    """An unreached layer built at the same source line as layers the example reached takes their
    target: it has no function of its own to keep, and one line then builds one kind of layer
    (what `lint --fix` writes there)."""
    by_name = {entry.name: entry for entry in entries}
    reached_targets: dict[tuple[str, int], str] = {}
    for site in sites:
        entry = by_name[site.name]
        if site.reached and site.defined_at is not None and entry.converts:
            reached_targets.setdefault((site.defined_at.path, site.defined_at.line), entry.target)
    result = []
    for site, entry in zip(sites, entries, strict=True):
        line = (site.defined_at.path, site.defined_at.line) if site.defined_at is not None else None
        target = reached_targets.get(line) if line is not None and not site.reached and entry.converts else None
        if target is not None and target != entry.target:
            with contextlib.suppress(Refusal):  # where the line's target refuses it, its own target stands
                entry = entry_for(site, target, f"{_unreached(site)}; built at {site.defined_at} like the reached layers there", options)
        result.append(entry)
    return result


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
    if site.normalizes_by_hand:
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
    convert agree), the reason led by the most severe finding; then LayerNorm and frozen."""
    target, why = targets.natural_target(site, context)
    deciding = most_severe(findings)
    if deciding is not None:
        why = f"{deciding.code} {deciding.name}: {why}"
    if not site.reached:
        why = f"{_unreached(site)}; {why}"
    candidates = [(target, why), ("layernorm", "fallback: LayerNorm over channels"), ("frozen", "fallback: frozen statistics")]
    problems = []
    for candidate, reason in candidates:
        try:
            return entry_for(site, candidate, reason, options)
        except Refusal as exc:
            problems.append(str(exc))
    raise Refusal(f"No replacement fits layer '{site.name}': {problems[0]}")
