"""Policy: turn sites, findings and a requested target into a Plan, one reasoned entry per site."""
from __future__ import annotations

from typing import Sequence

from .advise import most_severe
from .context import Context
from .errors import PlanError
from .plan import Plan, PlanEntry
from .rules import Finding
from .sites import Site
from .targets import DEFAULT_MAX_GROUPS, TARGETS, entry_for, natural_target


def make_plan(
    sites: Sequence[Site],
    findings: Sequence[Finding],
    context: Context,
    to: str = "auto",
    max_groups: int = DEFAULT_MAX_GROUPS,
) -> Plan:
    """One PlanEntry per site.

    `to="auto"` follows the most severe finding's fix (so lint and convert agree about every
    site), else the site's natural target. An explicit target applies to every batch-dependent
    site and raises PlanError for a site it cannot replace.
    """
    if to not in TARGETS:
        raise PlanError(f"Unknown target '{to}'; use one of {', '.join(TARGETS)}.")
    by_site: dict[str, list[Finding]] = {}
    for finding in findings:
        if finding.site is not None:
            by_site.setdefault(finding.site.name, []).append(finding)
    entries = []
    for site in sites:
        if site.call_count == 0:
            unused = entry_for(site, "keep", "never called by forward on the example inputs: it does not affect the output")
            unused.params["unused"] = True
            entries.append(unused)
        elif not site.batch_dependent:
            kept = entry_for(site, "keep", "batch-independent: each sample's output does not depend on the batch")
            kept.params["batch_independent"] = True
            entries.append(kept)
        elif site.kind == "lookalike":
            entries.append(entry_for(site, "keep", f"custom {site.flavour} implementation: normswap rewrites torch BatchNorm only"))
        elif to == "auto":
            entries.append(_auto_entry(site, by_site.get(site.name, []), context, max_groups))
        else:
            entries.append(entry_for(site, to, f"--to {to}", max_groups))
    return Plan(entries)


def _auto_entry(site: Site, findings: list[Finding], context: Context, max_groups: int) -> PlanEntry:
    deciding = most_severe(findings)
    if deciding is not None:
        candidates = [(deciding.fix.target, f"{deciding.code} {deciding.name}: {deciding.fix.description}")]
    elif context.inference_only and site.track_running_stats and not site.batch_dependent_eval:
        candidates = [("frozen", "inference only: with running statistics BatchNorm is a fixed affine; frozen keeps it exactly")]
    else:
        candidates = [natural_target(site)]
    natural = natural_target(site)
    candidates += [natural, ("layernorm", "fallback: LayerNorm over channels"), ("frozen", "fallback: frozen statistics")]
    problems = []
    for target, reason in candidates:
        try:
            return entry_for(site, target, reason, max_groups)
        except PlanError as exc:
            problems.append(str(exc))
    return entry_for(site, "keep", f"no replacement fits: {problems[0]}")
