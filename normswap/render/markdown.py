"""Markdown report for pull-request comments: summary line, table, collapsible details per finding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .text import cost_text, summary_line

_ICON = {"error": ":x:", "warning": ":warning:", "info": ":information_source:"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(reports: Sequence) -> str:
    lines: list[str] = []
    for report in reports:
        lines.append(f"### normswap: `{report.model}`")
        lines.append("")
        lines.append(f"**{summary_line(report)}**")
        lines.append("")
        if report.findings:
            lines += ["| | Code | Layer | Location | Message |", "|---|---|---|---|---|"]
            for f in report.findings:
                location = f.site.location if f.site is not None else report.model_location
                lines.append(
                    f"| {_ICON[f.severity.value]} | `{f.code}` {f.name} | `{_cell(f.site_name)}` | "
                    f"{f'`{location}`' if location else '-'} | {_cell(f.message)} |"
                )
            lines.append("")
            for f in report.findings:
                lines.append(f"<details><summary><code>{f.code}</code> {f.name} at <code>{f.site_name}</code></summary>")
                lines.append("")
                lines.append(f.message)
                lines.append("")
                if f.site is not None and f.site.defined_at:
                    lines += [f"Constructed at `{f.site.defined_at}`:", "", "```python", f.site.defined_at.code, "```", ""]
                if f.site is not None and f.site.called_at:
                    lines += [f"Called at `{f.site.called_at[0]}`:", "", "```python", f.site.called_at[0].code, "```", ""]
                if f.fix is not None:
                    lines.append(f"**Fix** ({'safe: keeps the function' if f.fix.safe else 'unsafe: changes the function'}): {f.fix.description}")
                    lines.append("")
                lines += [f"Run `normswap explain {f.code}` for the rule's documentation.", "", "</details>", ""]
        if report.plan is not None and len(report.plan):
            lines += ["#### Plan", "", "| Layer | Target | Reason |", "|---|---|---|"]
            lines += [f"| `{_cell(e.name)}` | {e.target} | {_cell(e.reason)} |" for e in report.plan]
            lines.append("")
        if report.validation is not None:
            lines += ["#### Validation", "", report.validation.to_markdown(), ""]
        if report.attribution:
            lines += [
                "#### What each site costs alone",
                "",
                "Each site converted on its own, compared with the original on the calibration data, worst first.",
                "",
            ]
            if report.outputs.get("plot"):
                lines += [f"![What each site costs alone]({Path(report.outputs['plot']).name})", ""]
            lines += ["| Layer | Target | Cost |", "|---|---|---|"]
            lines += [f"| `{c['site']}` | {c['target']} | {cost_text(c)} |" for c in report.attribution]
            lines.append("")
        if report.notes:
            lines += ["#### Notes", ""] + [f"- {_cell(n)}" for n in report.notes] + [""]
        if report.calibration:
            lines += ["#### Calibration", "", "| Layer | Target | R² | Values fitted per channel |", "|---|---|---|---|"]
            lines += [f"| `{c['site']}` | {c['target']} | {c['r2']:.3f} | {c['samples']} |" for c in report.calibration]
            lines.append("")
        if report.drift:
            lines += ["#### Drift (original vs converted)", "", "| Stage | Max abs | Mean abs | Cosine | Top-1 agreement |", "|---|---|---|---|---|"]
            for stage, d in report.drift.items():
                lines.append(d.markdown_row(stage))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
