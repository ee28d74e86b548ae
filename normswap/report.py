"""The Report: one typed object for everything a run found; renderers turn it into text/json/markdown/sarif.

Lint and convert each add their own section: `LintSection` (what auto would convert, the commands
that act on it, the source fixes) and `ConversionSection` (plan, validation, calibration, healing,
attribution, drift, outputs).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .calibration import Drift, HealResult, SiteCost, SiteFit
from .context import Context
from .errors import ConfigError
from .export import Validation
from .plan import Plan
from .rules import Finding, Severity, Skip
from .sites import Site
from .source import SourceLocation, relative_path

if TYPE_CHECKING:  # the fix package sits above the report (it lints models itself)
    from .conversion import Conversion
    from .fix import SourceFixes

FAIL_ON = ("error", "warning", "info", "never")


@dataclass(frozen=True)
class Commands:
    """The commands that act on what lint found: convert the checkpoint, fix the source."""

    convert: str
    fix: str


@dataclass
class LintSection:
    """What lint adds: the plan the recommendation follows (auto's, or the --plan file's), what
    made it, the commands that act on it, and the source edits."""

    plan: Plan
    planned_by: str = "auto"
    commands: Commands | None = None
    fixes: SourceFixes | None = None

    @property
    def auto_plan(self) -> dict[str, int]:
        """Sites per target the plan converts."""
        return {target: n for target, n in self.plan.counts().items() if target != "keep"}


@dataclass
class ConversionSection:
    """What convert adds: the plan it followed, the export's validation, calibration, healing,
    what each site costs alone, drift per stage, and the files written."""

    plan: Plan
    validation: Validation | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # stage -> drift from the original
    calibration: list[SiteFit] = field(default_factory=list)
    attribution: list[SiteCost] = field(default_factory=list)  # worst first
    healing: HealResult | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # what -> path
    manifest: dict[str, str] = field(default_factory=dict)  # output file -> sha256

    @classmethod
    def of(cls, conversion: Conversion) -> ConversionSection:
        """What `convert` did (no validation or outputs yet)."""
        return cls(
            conversion.plan,
            drift=dict(conversion.drift),
            calibration=conversion.calibration,
            attribution=conversion.attribution,
            healing=conversion.healing,
        )


@dataclass
class Report:
    """Findings and sites for one model, with the lint or the conversion section."""

    model: str
    capture_method: str
    context: Context
    sites: list[Site]
    findings: list[Finding]
    fallback_reasons: list[str] = field(default_factory=list)
    model_location: SourceLocation | None = None
    not_fired: dict[str, list[Skip]] = field(default_factory=dict)  # site -> why each rule stayed quiet
    notes: list[str] = field(default_factory=list)  # what was not done or checked, and why
    lint: LintSection | None = None
    conversion: ConversionSection | None = None

    @property
    def plan(self) -> Plan | None:
        return self.conversion.plan if self.conversion is not None else None

    @property
    def validation(self) -> Validation | None:
        return self.conversion.validation if self.conversion is not None else None

    @property
    def fixes(self) -> SourceFixes | None:
        return self.lint.fixes if self.lint is not None else None

    @property
    def auto_plan(self) -> dict[str, int]:
        """Lint: sites per target `convert --to auto` (or lint's --plan) would convert."""
        return self.lint.auto_plan if self.lint is not None else {}

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
        from .render import render_text

        return render_text([self], color=color, width=width)

    def to_json(self) -> str:
        from .render import render_json

        return render_json([self])

    def to_markdown(self) -> str:
        from .render import render_markdown

        return render_markdown([self])

    def to_sarif(self) -> str:
        from .render import render_sarif

        return render_sarif([self])


def worst_exit_code(reports: Sequence[Report], fail_on: str = "error") -> int:
    return max((r.exit_code(fail_on) for r in reports), default=0)


def model_definition(obj: object) -> SourceLocation | None:
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


def conversion_report(
    model: str,
    conversion: Conversion,
    context: Context,
    section: ConversionSection,
    model_location: SourceLocation | None = None,
) -> Report:
    """The Report of one `convert` (`section`: `ConversionSection.of(conversion)`, which whoever
    validates the export or writes files adds to)."""
    return Report(
        model=model,
        capture_method=conversion.capture_method,
        context=context,
        sites=conversion.sites,
        findings=conversion.findings,
        fallback_reasons=conversion.analysis.capture.fallback_reasons,
        model_location=model_location,
        not_fired=conversion.analysis.skipped,
        notes=list(conversion.notes),
        conversion=section,
    )
