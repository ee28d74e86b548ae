"""JSON report, schema version 1 (normswap/schemas/report.schema.json); keys and lists in stable order.

The only place a Report is serialised: one function per type it holds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._version import __version__
from .common import statistics

if TYPE_CHECKING:
    from ..calibration import Drift, HealResult, HeldOutScore, SiteCost, SiteFit
    from ..context import Context
    from ..export import Validation
    from ..export.tolerance import OutputCheck
    from ..fix import Edit, SourceFixes, Unfixable
    from ..report import ConversionSection, LintSection, Report
    from ..rules import Finding, Remedy
    from ..sites import Site
    from ..source import SourceLocation

JSON_SCHEMA_VERSION = 1


def _location(location: SourceLocation | None) -> dict[str, Any] | None:
    return location.to_dict() if location is not None else None


def _context(context: Context) -> dict[str, Any]:
    return dataclasses.asdict(context)


def _site(site: Site) -> dict[str, Any]:
    return {
        "name": site.name,
        "kind": str(site.kind),
        "flavour": site.flavour,
        "num_features": site.num_features,
        "input_shape": list(site.input_shape) if site.input_shape is not None else None,
        "affine": site.affine,
        "track_running_stats": site.track_running_stats,
        "eps": site.eps,
        "momentum": site.momentum,
        "call_count": site.call_count,
        "owner": site.owner,
        "producers": list(site.producers),
        "consumers": list(site.consumers),
        "defined_at": _location(site.defined_at),
        "built_from": _location(site.built_from),
        "called_at": [loc.to_dict() for loc in site.called_at],
        "batch_dependent_train": site.batch_dependent_train,
        "batch_dependent_eval": site.batch_dependent_eval,
    }


def _remedy(remedy: Remedy | None) -> dict[str, Any] | None:
    if remedy is None:
        return None
    return {"target": remedy.target, "safe": remedy.safe, "description": remedy.description}


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
        "fix": _remedy(finding.remedy),
    }


def _drift(drift: Drift | None) -> dict[str, Any] | None:
    if drift is None:
        return None
    return {
        "max_abs": drift.max_abs,
        "mean_abs": drift.mean_abs,
        "cosine": drift.cosine,
        "top1_agreement": drift.top1_agreement,
        "samples": drift.samples,
        "not_compared": list(drift.not_compared),
    }


def _output_check(check: OutputCheck) -> dict[str, Any]:
    found = {field.name: getattr(check, field.name) for field in dataclasses.fields(check)}
    return found | {"shape": list(check.shape), "onnx_shape": list(check.onnx_shape)}


def _validation(validation: Validation | None) -> dict[str, Any] | None:
    if validation is None:
        return None
    return {
        "passed": validation.passed,
        "onnx": validation.onnx_path,
        "exporter": validation.exporter,
        "opset": validation.opset,
        "opset_problem": validation.opset_problem,
        "traced": validation.traced,
        "batch_inputs": list(validation.batch_inputs),
        "fidelity": {"passed": validation.fidelity_passed, "outputs": [_output_check(c) for c in validation.outputs]},
        "batch_independence": {
            "eval": validation.batch_independent_eval,
            "train": validation.batch_independent_train,
            "required": validation.batch_independence_required,
        },
        "residual_batchnorm": {
            "passed": validation.residual_passed,
            "onnx_ops": validation.residual_onnx_ops,
            "onnx_ops_allowed": validation.residual_onnx_allowed,
            "modules": list(validation.residual_modules),
        },
        "drift": _drift(validation.drift),
        "messages": list(validation.messages),
        "skipped": list(validation.skipped),
    }


def _fit(fit: SiteFit) -> dict[str, Any]:
    return {"site": fit.name, "target": fit.target, "r2": fit.r2, "samples": fit.samples, "eps": fit.eps}


def _cost(cost: SiteCost) -> dict[str, Any]:
    return {"site": cost.site, "target": cost.target, "swap": _drift(cost.swap), "calibrated": _drift(cost.calibrated)}


def _score(score: HeldOutScore) -> dict[str, Any]:
    return {"agreement": score.agreement, "loss": score.loss}


def _healing(healing: HealResult | None) -> dict[str, Any] | None:
    if healing is None:
        return None
    return {
        "steps": healing.steps,
        "images": healing.images,
        "seconds": round(healing.seconds, 3),
        "stopped": healing.stopped,
        "heldout_samples": healing.heldout_samples,
        "initial": _score(healing.initial),
        "best": _score(healing.best),
        "curve": [
            {"step": p.step, "images": p.images, "seconds": round(p.seconds, 3), **_score(p.score)}
            for p in healing.curve
        ],
        "options": dataclasses.asdict(healing.options) if healing.options is not None else None,
    }


def _conversion(section: ConversionSection | None) -> dict[str, Any]:
    if section is None:
        return {"plan": None, "validation": None, "drift": {}, "calibration": [], "attribution": [], "healing": None}
    return {
        "plan": section.plan.to_dict(),
        "validation": _validation(section.validation),
        "drift": {stage: _drift(d) for stage, d in section.drift.items()},
        "calibration": [_fit(fit) for fit in section.calibration],
        "attribution": [_cost(cost) for cost in section.attribution],
        "healing": _healing(section.healing),
    }


def _recommended(section: LintSection | None) -> dict[str, Any] | None:
    if section is None:
        return None
    commands = (
        {"convert": section.commands.convert, "fix": section.commands.fix} if section.commands is not None else {}
    )
    return {"auto": dict(section.auto_plan), "planned_by": section.planned_by, "commands": commands}


def _edit(edit: Edit, applied: bool) -> dict[str, Any]:
    return {
        "path": edit.path,
        "start": {"line": edit.line, "column": edit.column},
        "end": {"line": edit.end_line, "column": edit.end_column},
        "old": edit.old,
        "new": edit.new,
        "sites": list(edit.sites),
        "target": edit.target,
        "safety": "safe" if edit.safe else "unsafe",
        "imports": list(edit.imports),
        "selects": edit.selects,
        "applied": applied,
    }


def _unfixable(unfixable: Unfixable) -> dict[str, Any]:
    return {"site": unfixable.site, "reason": unfixable.reason, "location": _location(unfixable.location)}


def source_fixes_to_dict(fixes: SourceFixes) -> dict[str, Any]:
    """`lint --fix`'s edits (each marked applied or not), the sites no edit fixes, and the notes."""
    return {
        "applied": fixes.applied,
        "unsafe_fixes": fixes.unsafe,
        "edits": [_edit(edit, fixes.applied and (edit.safe or fixes.unsafe)) for edit in fixes.edits],
        "unfixable": [_unfixable(u) for u in fixes.unfixable],
        "notes": list(fixes.notes),
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    remaining = {id(f) for f in report.remaining_findings()}
    conversion = report.conversion
    return {
        "model": report.model,
        "capture": {"method": report.capture_method, "fallback_reasons": list(report.fallback_reasons)},
        "context": _context(report.context),
        "summary": {"sites": len(report.sites), "findings": report.counts()},
        "sites": [_site(site) for site in report.sites],
        "findings": [finding_to_dict(f) | {"fixed": id(f) not in remaining} for f in report.findings],
        # why each rule stayed quiet, per site ("why was this layer left alone?")
        "not_fired": {
            site: [{"code": skip.code, "reason": skip.reason} for skip in skips]
            for site, skips in report.not_fired.items()
        },
        **_conversion(conversion),
        "notes": list(report.notes),
        "outputs": dict(sorted(conversion.outputs.items())) if conversion is not None else {},
        "manifest": dict(sorted(conversion.manifest.items())) if conversion is not None else {},
        # lint: what `--to auto` would convert, the commands that do it, and the source edits
        "recommended": _recommended(report.lint) if conversion is None else None,
        "fixes": source_fixes_to_dict(report.fixes) if report.fixes is not None else None,
    }


def render_json(reports: Sequence[Report]) -> str:
    document = {
        "schema_version": JSON_SCHEMA_VERSION,
        "tool": {"name": "normswap", "version": __version__},
        "reports": [report_to_dict(r) for r in reports],
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def render_statistics_json(reports: Sequence[Report]) -> str:
    """`--statistics --format json`: per model, findings per rule."""
    rows = [{"model": r.model, "statistics": [dataclasses.asdict(row) for row in statistics(r)]} for r in reports]
    return json.dumps(rows, indent=2) + "\n"
