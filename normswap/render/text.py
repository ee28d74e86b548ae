"""Text report for the terminal (colour on a terminal, plain when piped).

Findings are listed in one of four styles, as `--format` chooses: `table` (one row each),
`grouped` (one entry per rule: count, layers, the worst example), `full` (each finding with its
source line and fix) and `concise` (one line each, `path:line: CODE message`). `text`, the
default, is a table up to GROUP_ABOVE findings and grouped beyond.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .common import (
    cost_text,
    drift_summary,
    fix_counts,
    healing_summary,
    location_text,
    plural,
    recommended_action,
    statistics,
    unfixable_groups,
)

if TYPE_CHECKING:
    from ..report import Report
    from ..rules import Finding

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
GROUP_ABOVE = 10
STYLES = ("auto", "table", "grouped", "full", "concise")
_MAX_NAMES = 6


def summary_line(report: Report) -> str:
    remaining = report.remaining_findings()
    counts = {sev: sum(1 for f in remaining if f.severity.value == sev) for sev in ("error", "warning", "info")}
    parts = [f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items() if n]
    found = ", ".join(parts) if parts else "no findings"
    fixed = len(report.findings) - len(remaining)
    if fixed:
        found = f"{fixed} finding(s) fixed by --fix, {found if parts else 'none'} left"
    return f"{report.model}: {len(report.sites)} BatchNorm site(s), {found} (captured with {report.capture_method})"


def render_text(
    reports: Sequence[Report], color: bool = False, width: int = 120, style: str = "auto", statistics_only: bool = False
) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    buffer = io.StringIO()
    # markup and emoji codes off: user text ("[tool.normswap]", "[warning]", "nets.py:100:") is printed as it is
    console = Console(
        file=buffer,
        width=width,
        color_system="standard" if color else None,
        force_terminal=color,
        highlight=False,
        markup=False,
        emoji=False,
    )
    for report in reports:
        console.print(summary_line(report), style="bold" if color else None)
        if statistics_only:
            _statistics(console, report)
        elif report.remaining_findings():
            chosen = (
                style if style != "auto" else ("grouped" if len(report.remaining_findings()) > GROUP_ABOVE else "table")
            )
            {"table": _table, "grouped": _grouped, "full": _full, "concise": _concise}[chosen](console, report, color)
        _conversion(console, report)
        _fixes(console, report, detailed=style == "full")
        action = recommended_action(report)
        if action:
            console.print(action, soft_wrap=True)
    return buffer.getvalue()


def _table(console: Console, report: Report, color: bool) -> None:
    table = Table(show_header=True, header_style="bold" if color else None, expand=False, pad_edge=False)
    for column in ("code", "severity", "layer", "location", "message"):
        table.add_column(column, overflow="fold")
    for f in report.remaining_findings():
        table.add_row(
            f.code,
            f.severity.value,
            f.site_name,
            location_text(f, report),
            f.message,
            style=_STYLE[f.severity.value] if color else None,
        )
    console.print(table)


def _worst(findings: Sequence[Finding]) -> Finding:
    """The example a group shows: the site with the fewest values per channel in a sample (the
    noisiest batch statistics), ties in model order."""
    return min(
        findings,
        key=lambda f: f.site.spatial_size if f.site is not None and f.site.spatial_size is not None else math.inf,
    )


def _names(findings: Sequence[Finding]) -> str:
    names = [f.site_name for f in findings]
    shown = ", ".join(names[:_MAX_NAMES])
    return f"{shown}, ... ({len(names)})" if len(names) > _MAX_NAMES else shown


def _grouped(console: Console, report: Report, color: bool) -> None:
    groups: dict[str, list[Finding]] = {}
    for f in report.remaining_findings():
        groups.setdefault(f.code, []).append(f)
    for code, findings in groups.items():
        first = findings[0]
        style = _STYLE[first.severity.value] if color else None
        console.print(f"{code} {first.name}  {len(findings)} × {first.severity.value}", style=style)
        if any(f.site is not None for f in findings):
            console.print(f"  layers: {_names(findings)}", soft_wrap=True)
        worst = _worst(findings)
        prefix = "  worst: " if len(findings) > 1 else "  "
        console.print(f"{prefix}{worst.site_name} at {location_text(worst, report)}", soft_wrap=True)
        console.print(f"    {worst.message}", soft_wrap=True)


def _full(console: Console, report: Report, color: bool) -> None:
    for f in report.remaining_findings():
        location = location_text(f, report)
        console.print(
            f"{location}: {f.code} [{f.severity.value}] {f.site_name}",
            style=_STYLE[f.severity.value] if color else None,
            soft_wrap=True,
        )
        console.print(f"  {f.message}", soft_wrap=True)
        site = f.site
        where = site.location if site is not None else None
        if where is not None and where.code:
            console.print(f"  {where.line:>5} | {where.code}", soft_wrap=True)
        if f.remedy is not None:
            console.print(f"  fix ({'safe' if f.remedy.safe else 'unsafe'}): {f.remedy.description}", soft_wrap=True)
        console.print("")


def _concise(console: Console, report: Report, color: bool) -> None:
    for f in report.remaining_findings():
        console.print(
            f"{location_text(f, report)}: {f.code} [{f.severity.value}] {f.site_name}: {f.message}",
            style=_STYLE[f.severity.value] if color else None,
            soft_wrap=True,
        )


def _statistics(console: Console, report: Report) -> None:
    for row in statistics(report):
        console.print(f"{row.count:>5}  {row.code}  {row.name:<28} {row.severity:<8} {row.fix}")


def _conversion(console: Console, report: Report) -> None:
    """What `convert` did: plan, validation, calibration, attribution, notes, drift, outputs."""
    section = report.conversion
    if section is not None:
        plan = section.plan
        console.print(
            "plan: " + ", ".join(f"{n} {t}" for t, n in plan.counts().items())
            if len(plan)
            else "plan: nothing to convert"
        )
        if section.validation is not None:
            console.print(section.validation.summary(), soft_wrap=True)
        if section.calibration:
            fits = ", ".join(
                f"{fit.name} R² {fit.r2:.3f}" + (f" (eps {fit.eps:.3g})" if fit.eps is not None else "")
                for fit in section.calibration
            )
            console.print(f"calibration: {fits}", soft_wrap=True)
        if section.attribution:
            console.print("what each site costs alone (converted one at a time, worst first):")
            for cost in section.attribution[:10]:
                console.print(f"  {cost.site:<24} {cost.target:<10} {cost_text(cost)}", soft_wrap=True)
            if len(section.attribution) > 10:
                console.print(f"  ... {len(section.attribution) - 10} more in report.json")
        if section.healing is not None:
            console.print(f"healing: {healing_summary(section.healing)}", soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    if section is not None:
        for stage, drift in section.drift.items():
            console.print(f"drift ({stage}): {drift_summary(drift)}", soft_wrap=True)
        for name, path in sorted(section.outputs.items()):
            console.print(f"wrote {name}: {path}")


def _fixes(console: Console, report: Report, detailed: bool) -> None:
    """Source fixes (lint): applied or proposed, held back, and the sites no edit can fix."""
    fixes = report.fixes
    if fixes is None:
        return
    counts = fix_counts(fixes)
    if fixes.applied:
        if counts.applied:
            console.print(
                f"fixed: {plural(counts.applied_sites, 'site')} in {', '.join(counts.applied_files)}", soft_wrap=True
            )
        if counts.held_back:
            console.print(
                f"not applied: {plural(counts.held_back, 'unsafe edit')} for {plural(counts.held_back_sites, 'site')} (add --unsafe-fixes)",
                soft_wrap=True,
            )
    if detailed:
        for edit in fixes.edits:
            what = edit.selects if edit.target == "selection" else ", ".join(edit.sites)
            console.print(
                f"  {edit.path}:{edit.line}  {edit.old.splitlines()[0]} -> {edit.new}  [{'safe' if edit.safe else 'unsafe'}: {what}]",
                soft_wrap=True,
            )
    for names, reason in unfixable_groups(fixes):
        console.print(f"not fixable in source: {names}: {reason}", soft_wrap=True)
    if fixes.applied or detailed:
        for note in fixes.notes:
            console.print(f"fix note: {note}", soft_wrap=True)
