"""What the text, markdown and json renderers all say: locations with their origin, per-rule
statistics, source-fix counts, the recommended next step, and the one-line summaries of a
validation, a drift and a site's cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..rules import CATALOGUE, FixSafety, Rule

if TYPE_CHECKING:
    from ..calibration import Drift, HealResult, HeldOutScore, SiteCost
    from ..fix import Edit, SourceFixes
    from ..report import Report
    from ..rules import Finding

_MAX_NAMES = 6


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def names_text(names: list[str]) -> str:
    """'a, b, c' or 'a, b, ... (20)'."""
    shown = ", ".join(names[:_MAX_NAMES])
    return f"{shown}, ... ({len(names)})" if len(names) > _MAX_NAMES else shown


def location_text(finding: Finding, report: Report) -> str:
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


def fix_availability(rule: Rule) -> str:
    """'unsafe fix, in source sometimes': what the rule proposes and whether `lint --fix` can
    write it into the model's source (always / sometimes / never, as ruff says)."""
    kind = {FixSafety.SAFE: "safe fix", FixSafety.UNSAFE: "unsafe fix", FixSafety.NONE: "no fix"}[rule.fix_safety]
    return f"{kind}, in source {rule.source_fix.value}"


@dataclass(frozen=True)
class RuleCount:
    """One row of `--statistics`: a rule and how many findings it has."""

    code: str
    name: str
    severity: str
    count: int
    fix: str


def statistics(report: Report) -> list[RuleCount]:
    """Findings per rule, most frequent first (`--statistics`)."""
    rules = {rule.code: rule for rule in CATALOGUE}
    counts: dict[str, int] = {}
    for finding in report.remaining_findings():
        counts[finding.code] = counts.get(finding.code, 0) + 1
    rows = [
        RuleCount(code, rules[code].name, rules[code].severity.value, n, fix_availability(rules[code]))
        for code, n in counts.items()
    ]
    return sorted(rows, key=lambda row: (-row.count, row.code))


@dataclass(frozen=True)
class FixCounts:
    """What the source fixes of a run did: edits, sites and files applied (0 and none when
    nothing was written), and the unsafe edits held back with the sites they would fix."""

    applied: int
    applied_sites: int
    applied_files: tuple[str, ...]
    held_back: int
    held_back_sites: int


def fix_counts(fixes: SourceFixes) -> FixCounts:
    selected, held = fixes.selected, fixes.held_back

    def sites(edits: list[Edit]) -> int:
        return len({site for edit in edits for site in edit.sites})

    return FixCounts(
        applied=len(selected) if fixes.applied else 0,
        applied_sites=sites(selected) if fixes.applied else 0,
        applied_files=tuple(dict.fromkeys(edit.path for edit in selected)) if fixes.applied else (),
        held_back=len(held),
        held_back_sites=sites(held),
    )


def unfixable_groups(fixes: SourceFixes) -> list[tuple[str, str]]:
    """Sites no source edit fixes, grouped by reason: ('bn1, layer1.0.bn1, ... (20)', reason)."""
    by_reason: dict[str, list[str]] = {}
    for item in fixes.unfixable:
        by_reason.setdefault(item.reason, []).append(item.site)
    return [(names_text(names), reason) for reason, names in by_reason.items()]


def recommended_action(report: Report) -> str:
    """The last lines of a lint report: what `--to auto` (or lint's --plan) would do and the commands that do it."""
    section = report.lint
    if report.conversion is not None or section is None or not section.auto_plan:
        return ""
    counts = ", ".join(f"{n} × {target}" for target, n in section.auto_plan.items())
    lines = [f"recommended: {section.planned_by} converts {counts}"]
    commands = section.commands
    if commands is not None:
        lines.append(f"  the checkpoint: {commands.convert}")
    fixes = section.fixes
    if fixes is not None and commands is not None and not fixes.applied and fixes.edits:
        files = list(dict.fromkeys(edit.path for edit in fixes.edits))
        command = (
            commands.fix if any(not edit.safe for edit in fixes.edits) else commands.fix.removesuffix(" --unsafe-fixes")
        )
        lines.append(f"  the source:     {command}   ({plural(len(fixes.edits), 'edit')} in {', '.join(files)})")
    return "\n".join(lines)


def drift_summary(drift: Drift) -> str:
    top1 = f", top-1 agreement {drift.top1_agreement:.1%}" if drift.top1_agreement is not None else ""
    left_out = ""
    if drift.not_compared:
        outputs = ", ".join(map(str, drift.not_compared))
        left_out = f" (output {outputs} not compared: its shape differs between the models)"
    return f"max abs {drift.max_abs:.3g}, mean abs {drift.mean_abs:.3g}, cosine {drift.cosine:.4f}{top1} over {drift.samples} samples{left_out}"


STOPPED = {
    "plateau": "held-out agreement stopped improving",
    "budget": "the time budget ran out",
    "steps": "the planned steps ran out",
}


def score_text(score: HeldOutScore) -> str:
    return f"agreement {score.agreement:.1%}" if score.agreement is not None else f"loss {score.loss:.4g}"


def healing_summary(healing: HealResult) -> str:
    """'524 steps over 67,072 images in 9.6 min, held-out agreement 82.1% -> 94.3% on 2,048 samples
    (stopped: ...)': what healing did, for text and markdown."""
    before, best = score_text(healing.initial), score_text(healing.best)
    return (
        f"{healing.steps} steps over {healing.images:,} images in {healing.seconds / 60:.1f} min, "
        f"held-out {before} -> {best.removeprefix('agreement ').removeprefix('loss ')} on {healing.heldout_samples:,} samples "
        f"({STOPPED.get(healing.stopped, healing.stopped)})"
    )


def cost_text(cost: SiteCost) -> str:
    """'agreement 72.3% (92.6% calibrated), cosine 0.877 (0.961)': one site's cost, for text and markdown."""
    parts = []
    for label, fmt, swapped, calibrated in (
        ("agreement", "{:.1%}", cost.swap.top1_agreement, cost.calibrated.top1_agreement if cost.calibrated else None),
        ("cosine", "{:.3f}", cost.swap.cosine, cost.calibrated.cosine if cost.calibrated else None),
    ):
        if swapped is None:
            continue
        text = f"{label} {fmt.format(swapped)}"
        if calibrated is not None:
            text += f" ({fmt.format(calibrated)} calibrated)"
        parts.append(text)
    return ", ".join(parts)
