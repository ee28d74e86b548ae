"""What the text and markdown renderers both say: locations with their origin, per-rule
statistics, source-fix counts and the recommended next step."""

from __future__ import annotations

from typing import Any

from ..rules import CATALOGUE

_MAX_NAMES = 6


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def names_text(names: list[str]) -> str:
    """'a, b, c' or 'a, b, ... (20)'."""
    shown = ", ".join(names[:_MAX_NAMES])
    return f"{shown}, ... ({len(names)})" if len(names) > _MAX_NAMES else shown


def location_text(finding: Any, report: Any) -> str:
    """Where a finding points, marked when the file is not the project's, with the project's
    own line that built the layer ('timm/models/resnet.py:98 (installed package), built from
    train.py:12')."""
    site = finding.site
    location = site.location if site is not None else report.model_location
    if location is None:
        return "-"
    text = location.label
    if site is not None and site.built_from is not None:
        text += f", built from {site.built_from}"
    return text


def fix_availability(rule: Any) -> str:
    """'unsafe fix, in source sometimes': what the rule proposes and whether `lint --fix` can
    write it into the model's source (always / sometimes / never, as ruff says)."""
    kind = {True: "safe fix", False: "unsafe fix", None: "no fix"}[rule.fix_safe]
    return f"{kind}, in source {rule.source_fix}"


def statistics(report: Any) -> list[dict[str, Any]]:
    """Findings per rule, most frequent first (`--statistics`)."""
    rules = {rule.code: rule for rule in CATALOGUE}
    counts: dict[str, int] = {}
    for finding in report.remaining_findings():
        counts[finding.code] = counts.get(finding.code, 0) + 1
    rows = [
        {"code": code, "name": rules[code].name, "severity": rules[code].severity.value, "count": n, "fix": fix_availability(rules[code])}
        for code, n in counts.items()
    ]
    return sorted(rows, key=lambda row: (-row["count"], row["code"]))


def fix_counts(fixes: Any) -> dict[str, Any]:
    selected, held = fixes.selected, fixes.held_back

    def sites(edits: list) -> int:
        return len({site for edit in edits for site in edit.sites})

    def files(edits: list) -> list[str]:
        return list(dict.fromkeys(edit.path for edit in edits))

    return {
        "applied": len(selected) if fixes.applied else 0,
        "applied_sites": sites(selected) if fixes.applied else 0,
        "applied_files": files(selected) if fixes.applied else [],
        "selected": len(selected),
        "selected_sites": sites(selected),
        "selected_files": files(selected),
        "held_back": len(held),
        "held_back_sites": sites(held),
    }


def unfixable_groups(fixes: Any) -> list[tuple[str, str]]:
    """Sites no source edit fixes, grouped by reason: ('bn1, layer1.0.bn1, ... (20)', reason)."""
    by_reason: dict[str, list[str]] = {}
    for item in fixes.unfixable:
        by_reason.setdefault(item.reason, []).append(item.site)
    return [(names_text(names), reason) for reason, names in by_reason.items()]


def recommended_action(report: Any) -> str:
    """The last lines of a lint report: what `--to auto` (or lint's --plan) would do and the commands that do it."""
    if report.plan is not None or not report.auto_plan:
        return ""
    counts = ", ".join(f"{n} × {target}" for target, n in report.auto_plan.items())
    lines = [f"recommended: {report.planned_by} converts {counts}"]
    commands = report.commands
    if commands.get("convert"):
        lines.append(f"  the checkpoint: {commands['convert']}")
    fixes = report.fixes
    if fixes is not None and commands.get("fix") and not fixes.applied and fixes.edits:
        files = list(dict.fromkeys(edit.path for edit in fixes.edits))
        command = commands["fix"] if any(not edit.safe for edit in fixes.edits) else commands["fix"].removesuffix(" --unsafe-fixes")
        lines.append(f"  the source:     {command}   ({plural(len(fixes.edits), 'edit')} in {', '.join(files)})")
    return "\n".join(lines)
