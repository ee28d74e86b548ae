"""JSON report, schema version 1 (normswap/schemas/report.schema.json); keys and lists in stable order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..rules import Finding
from .common import statistics

JSON_SCHEMA_VERSION = 1


def finding_to_dict(finding: Finding) -> dict[str, Any]:
    site = finding.site
    return {
        "code": finding.code,
        "name": finding.name,
        "severity": finding.severity.value,
        "message": finding.message,
        "site": site.name if site else None,
        "location": site.location.to_dict() if site and site.location else None,
        "call_locations": [loc.to_dict() for loc in site.called_at] if site else [],
        "fix": finding.fix.to_dict() if finding.fix else None,
    }


def report_to_dict(report) -> dict[str, Any]:
    remaining = {id(f) for f in report.remaining_findings()}
    return {
        "model": report.model,
        "capture": {"method": report.capture_method, "fallback_reasons": list(report.fallback_reasons)},
        "context": report.context.to_dict(),
        "summary": {"sites": len(report.sites), "findings": report.counts()},
        "sites": [site.to_dict() for site in report.sites],
        "findings": [finding_to_dict(f) | {"fixed": id(f) not in remaining} for f in report.findings],
        # why each rule stayed quiet, per site ("why was this layer left alone?")
        "not_fired": {site: [{"code": skip.code, "reason": skip.reason} for skip in skips] for site, skips in report.not_fired.items()},
        "plan": report.plan.to_dict() if report.plan is not None else None,
        "validation": report.validation.to_dict() if report.validation is not None else None,
        "drift": {stage: d.to_dict() for stage, d in report.drift.items()},
        "calibration": list(report.calibration),
        "attribution": list(report.attribution),
        "healing": report.healing,
        "notes": list(report.notes),
        "outputs": dict(sorted(report.outputs.items())),
        "manifest": dict(sorted(report.manifest.items())),
        # lint: what `--to auto` would convert, the commands that do it, and the source edits
        "recommended": {"auto": dict(report.auto_plan), "planned_by": report.planned_by, "commands": dict(report.commands)}
        if report.plan is None
        else None,
        "fixes": report.fixes.to_dict() if report.fixes is not None else None,
    }


def render_json(reports: Sequence) -> str:
    document = {
        "schema_version": JSON_SCHEMA_VERSION,
        "tool": {"name": "normswap", "version": __version__},
        "reports": [report_to_dict(r) for r in reports],
    }
    return json.dumps(document, indent=2, sort_keys=False, default=_plain) + "\n"


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def render_statistics_json(reports: Sequence) -> str:
    """`--statistics --format json`: per model, findings per rule."""
    return json.dumps([{"model": r.model, "statistics": statistics(r)} for r in reports], indent=2) + "\n"
