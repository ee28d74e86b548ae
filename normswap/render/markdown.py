"""Markdown report for pull-request comments: summary line, table, collapsible details per finding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    cost_text,
    fix_counts,
    healing_summary,
    location_text,
    plural,
    recommended_action,
    score_text,
    unfixable_groups,
)
from .text import summary_line

if TYPE_CHECKING:
    from ..calibration import Drift
    from ..export import Validation
    from ..report import ConversionSection, Report

_ICON = {"error": ":x:", "warning": ":warning:", "info": ":information_source:"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(reports: Sequence[Report]) -> str:
    lines: list[str] = []
    for report in reports:
        lines.append(f"### normswap: `{report.model}`")
        lines.append("")
        lines.append(f"**{summary_line(report)}**")
        lines.append("")
        if report.remaining_findings():
            lines += ["| | Code | Layer | Location | Message |", "|---|---|---|---|---|"]
            for f in report.remaining_findings():
                location = location_text(f, report)
                lines.append(
                    f"| {_ICON[f.severity.value]} | `{f.code}` {f.name} | `{_cell(f.site_name)}` | "
                    f"{f'`{_cell(location)}`' if location != '-' else '-'} | {_cell(f.message)} |"
                )
            lines.append("")
            for f in report.remaining_findings():
                lines.append(
                    f"<details><summary><code>{f.code}</code> {f.name} at <code>{f.site_name}</code></summary>"
                )
                lines.append("")
                lines.append(f.message)
                lines.append("")
                if f.site is not None and f.site.defined_at:
                    lines += [
                        f"Constructed at `{f.site.defined_at.label}`:",
                        "",
                        "```python",
                        f.site.defined_at.code,
                        "```",
                        "",
                    ]
                if f.site is not None and f.site.built_from:
                    lines += [
                        f"Built from your code at `{f.site.built_from}`:",
                        "",
                        "```python",
                        f.site.built_from.code,
                        "```",
                        "",
                    ]
                if f.site is not None and f.site.called_at:
                    lines += [
                        f"Called at `{f.site.called_at[0]}`:",
                        "",
                        "```python",
                        f.site.called_at[0].code,
                        "```",
                        "",
                    ]
                if f.remedy is not None:
                    lines.append(
                        f"**Fix** ({'safe: keeps the function' if f.remedy.safe else 'unsafe: changes the function'}): {f.remedy.description}"
                    )
                    lines.append("")
                lines += [f"Run `normswap explain {f.code}` for the rule's documentation.", "", "</details>", ""]
        lines += _fixes(report)
        action = recommended_action(report)
        if action:
            lines += ["#### Recommended", "", "```", action.removeprefix("recommended: "), "```", ""]
        lines += _conversion(report.conversion, notes=report.notes)
    return "\n".join(lines).rstrip() + "\n"


def _conversion(section: ConversionSection | None, notes: list[str]) -> list[str]:
    """What convert did: plan, validation, what each site costs alone, notes, calibration, drift."""
    lines: list[str] = []
    if section is not None and len(section.plan):
        lines += ["#### Plan", "", "| Layer | Target | Reason |", "|---|---|---|"]
        lines += [f"| `{_cell(e.name)}` | {e.target} | {_cell(e.reason)} |" for e in section.plan]
        lines.append("")
    if section is not None and section.validation is not None:
        lines += ["#### Validation", "", _validation(section.validation), ""]
    if section is not None and section.attribution:
        lines += [
            "#### What each site costs alone",
            "",
            "Each site converted on its own, compared with the original on the calibration data, worst first.",
            "",
        ]
        if section.outputs.get("plot"):
            lines += [f"![What each site costs alone]({Path(section.outputs['plot']).name})", ""]
        lines += ["| Layer | Target | Cost |", "|---|---|---|"]
        lines += [f"| `{c.site}` | {c.target} | {cost_text(c)} |" for c in section.attribution]
        lines.append("")
    if notes:
        lines += ["#### Notes", ""] + [f"- {_cell(n)}" for n in notes] + [""]
    if section is not None and section.calibration:
        lines += [
            "#### Calibration",
            "",
            "| Layer | Target | R² | Values fitted per channel | eps chosen |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{fit.name}` | {fit.target} | {fit.r2:.3f} | {fit.samples} | {'' if fit.eps is None else f'{fit.eps:.3g}'} |"
            for fit in section.calibration
        ]
        lines.append("")
    if section is not None and section.healing is not None:
        lines += ["#### Healing", "", healing_summary(section.healing) + ".", ""]
        lines += ["| Step | Images | Minutes | Held-out |", "|---|---|---|---|"]
        lines += [
            f"| {p.step} | {p.images:,} | {p.seconds / 60:.1f} | {score_text(p.score)} |" for p in section.healing.curve
        ]
        lines.append("")
    if section is not None and section.drift:
        lines += [
            "#### Drift (original vs converted)",
            "",
            "| Stage | Max abs | Mean abs | Cosine | Top-1 agreement |",
            "|---|---|---|---|---|",
        ]
        lines += [_drift_row(stage, d) for stage, d in section.drift.items()]
        lines.append("")
    return lines


def _validation(validation: Validation) -> str:
    lines = [
        f"**{validation.summary()}**",
        "",
        "| Batch | Output | Scale | Max abs | Max rel | Model's own rounding | atol | Result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in validation.outputs:
        rounding = f"{c.rounding:.3g}" if c.rounding is not None else "-"
        lines.append(
            f"| {c.batch_size} | {c.output} | {c.scale:.3g} | {c.max_abs:.3g} | {c.max_rel:.3g} | {rounding} | {c.atol:.3g} | {'ok' if c.passed else 'FAILED'} |"
        )
    lines += [""] + [f"- {m}" for m in validation.messages] + [f"- not checked: {s}" for s in validation.skipped]
    return "\n".join(lines).rstrip()


def _drift_row(stage: str, drift: Drift) -> str:
    top1 = f"{drift.top1_agreement:.1%}" if drift.top1_agreement is not None else "-"
    return f"| {stage} | {drift.max_abs:.3g} | {drift.mean_abs:.3g} | {drift.cosine:.4f} | {top1} |"


def _fixes(report: Report) -> list[str]:
    """Each source change as a GitHub suggestion block on the lines it replaces."""
    fixes = report.fixes
    if fixes is None or not (fixes.edits or fixes.unfixable):
        return []
    counts = fix_counts(fixes)
    lines = ["#### Fixes", ""]
    if fixes.applied:
        lines += [
            f"Applied to {plural(counts.applied_sites, 'site')} in {', '.join(f'`{p}`' for p in counts.applied_files)}.",
            "",
        ]
    for suggestion in fixes.suggestions():
        hunk = suggestion.hunk
        span = f"line {hunk.start}" if hunk.start == hunk.end else f"lines {hunk.start}-{hunk.end}"
        if suggestion.edits:
            safety = (
                "safe: keeps the function" if all(e.safe for e in suggestion.edits) else "unsafe: changes the function"
            )
            what = "; ".join(
                e.selects if e.target == "selection" else f"{e.target} for {', '.join(f'`{s}`' for s in e.sites)}"
                for e in suggestion.edits
            )
            lines.append(f"`{suggestion.path}` {span} ({safety}): {what}")
        else:
            lines.append(f"`{suggestion.path}` {span}: imports")
        body = [hunk.text.rstrip("\n")] if hunk.text else []  # an empty block deletes the lines
        lines += ["", "```suggestion", *body, "```", ""]
    for names, reason in unfixable_groups(fixes):
        lines.append(f"- Not fixable in source: {_cell(names)}: {_cell(reason)}")
    for note in fixes.notes:
        lines.append(f"- {_cell(note)}")
    return lines if lines[-1] == "" else [*lines, ""]
