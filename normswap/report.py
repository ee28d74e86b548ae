"""The Report: one object for everything a run found; renderers turn it into text/json/markdown/sarif."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .context import Context
from .errors import ConfigError
from .plan import Plan
from .render import render_json, render_markdown, render_sarif, render_text
from .rules import Finding, Severity
from .sites import Site
from .source import SourceLocation, relative_path

FAIL_ON = ("error", "warning", "info", "never")


@dataclass
class Report:
    """Findings, sites and (for convert) plan, validation and drift for one model."""

    model: str
    capture_method: str
    context: Context
    sites: list[Site]
    findings: list[Finding]
    fallback_reasons: list[str] = field(default_factory=list)
    model_location: SourceLocation | None = None
    plan: Plan | None = None
    validation: Any = None  # normswap.validate.Validation
    drift: dict[str, Any] = field(default_factory=dict)  # stage -> normswap.drift.Drift
    calibration: list[dict[str, Any]] = field(default_factory=list)
    attribution: list[dict[str, Any]] = field(default_factory=list)  # SiteCost.to_dict(), worst first
    healing: dict[str, Any] | None = None  # HealResult.to_dict(): the settings and what healing did
    notes: list[str] = field(default_factory=list)  # what was not done or checked, and why
    manifest: dict[str, str] = field(default_factory=dict)  # convert: output file -> sha256
    outputs: dict[str, str] = field(default_factory=dict)
    not_fired: dict[str, list[Any]] = field(default_factory=dict)  # site -> rules.Skip (why a rule stayed quiet)
    auto_plan: dict[str, int] = field(default_factory=dict)  # lint: sites per target `--to auto` (or lint's --plan) would convert
    planned_by: str = "auto"  # lint: what made auto_plan: "auto", or the --plan file the fixes follow
    commands: dict[str, str] = field(default_factory=dict)  # lint CLI: "convert" / "fix" commands that act on it
    fixes: Any = None  # lint: normswap.fix.SourceFixes, the source edits proposed or applied

    def counts(self) -> dict[str, int]:
        """Number of findings per severity."""
        return {s.value: sum(1 for f in self.findings if f.severity is s) for s in Severity}

    def exit_code(self, fail_on: str = "error") -> int:
        """0 clean, 1 findings at or above `fail_on` or a failed validation (the only place this is decided)."""
        if fail_on not in FAIL_ON:
            raise ConfigError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got '{fail_on}'.")
        if self.validation is not None and not self.validation.passed:
            return 1
        if fail_on == "never":
            return 0
        threshold = Severity(fail_on).rank
        return 1 if any(f.severity.rank >= threshold for f in self.remaining_findings()) else 0

    def remaining_findings(self) -> list[Finding]:
        """The findings `lint --fix` did not fix (all of them when nothing was applied)."""
        fixed = self.fixes.fixed_sites() if self.fixes is not None else set()
        return [f for f in self.findings if f.site is None or f.site.name not in fixed]

    def to_text(self, color: bool = False, width: int = 120) -> str:
        return render_text([self], color=color, width=width)

    def to_json(self) -> str:
        return render_json([self])

    def to_markdown(self) -> str:
        return render_markdown([self])

    def to_sarif(self) -> str:
        return render_sarif([self])


def worst_exit_code(reports: Sequence[Report], fail_on: str = "error") -> int:
    return max((r.exit_code(fail_on) for r in reports), default=0)


def model_definition(obj: Any) -> SourceLocation | None:
    """Where the model's class (or factory function) is defined, for model-level findings."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    try:
        filename = inspect.getsourcefile(target)
        _, line = inspect.getsourcelines(target)
    except (OSError, TypeError):
        return None
    if filename is None:
        return None
    return SourceLocation(relative_path(os.path.abspath(filename)), max(line, 1), "")
