"""Text report: a rich table per model (colour on a terminal, plain when piped)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def summary_line(report) -> str:
    counts = report.counts()
    parts = [f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items() if n]
    found = ", ".join(parts) if parts else "no findings"
    return f"{report.model}: {len(report.sites)} BatchNorm site(s), {found} (captured with {report.capture_method})"


def cost_text(cost: dict) -> str:
    """'agreement 72.3% (92.6% calibrated), cosine 0.877 (0.961)': one site's cost, for text and markdown."""
    swap, calibrated = cost["swap"], cost.get("calibrated")
    parts = []
    for key, label, fmt in (("top1_agreement", "agreement", "{:.1%}"), ("cosine", "cosine", "{:.3f}")):
        if swap.get(key) is None:
            continue
        text = f"{label} {fmt.format(swap[key])}"
        if calibrated and calibrated.get(key) is not None:
            text += f" ({fmt.format(calibrated[key])} calibrated)"
        parts.append(text)
    return ", ".join(parts)


def render_text(reports: Sequence, color: bool = False, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system="standard" if color else None, force_terminal=color, highlight=False)
    for report in reports:
        console.print(summary_line(report), style="bold" if color else None)
        if report.findings:
            table = Table(show_header=True, header_style="bold" if color else None, expand=False, pad_edge=False)
            for column in ("code", "severity", "layer", "location", "message"):
                table.add_column(column, overflow="fold")
            for f in report.findings:
                location = f.site.location if f.site is not None else report.model_location
                table.add_row(
                    f.code,
                    f.severity.value,
                    f.site_name,
                    str(location) if location else "-",
                    f.message,
                    style=_STYLE[f.severity.value] if color else None,
                )
            console.print(table)
        if report.plan is not None:
            console.print(
                "plan: " + ", ".join(f"{n} {t}" for t, n in report.plan.counts().items()) if len(report.plan) else "plan: nothing to convert"
            )
        if report.validation is not None:
            console.print(report.validation.summary(), soft_wrap=True)
        if report.calibration:
            fits = ", ".join(f"{c['site']} R² {c['r2']:.3f}" for c in report.calibration)
            console.print(f"calibration: {fits}", soft_wrap=True)
        if report.attribution:
            console.print("what each site costs alone (converted one at a time, worst first):")
            for cost in report.attribution[:10]:
                console.print(f"  {cost['site']:<24} {cost['target']:<10} {cost_text(cost)}", soft_wrap=True)
            if len(report.attribution) > 10:
                console.print(f"  ... {len(report.attribution) - 10} more in report.json")
        for note in report.notes:
            console.print(f"note: {note}", soft_wrap=True)
        for stage, drift in report.drift.items():
            console.print(f"drift ({stage}): {drift.summary()}", soft_wrap=True)
        for name, path in sorted(report.outputs.items()):
            console.print(f"wrote {name}: {path}")
    return buffer.getvalue()
