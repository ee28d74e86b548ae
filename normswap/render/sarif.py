"""SARIF 2.1.0 for code scanning: rules from the catalogue, results with relative locations."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..rules import CATALOGUE, Rule

if TYPE_CHECKING:
    from ..report import Report
    from ..rules import Finding
    from ..sites import Site
    from ..source import SourceLocation

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://github.com/normswap/normswap"
_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _rule(rule: Rule) -> dict[str, Any]:
    doc = rule.documentation()
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": doc.split("## Why is this bad?")[0].replace("## What it does", "").strip()},
        "help": {"text": doc, "markdown": doc},
        "helpUri": f"{INFORMATION_URI}#{rule.code.lower()}",
        "defaultConfiguration": {"level": _LEVEL[rule.severity.value]},
    }


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _physical(location: SourceLocation) -> dict[str, Any]:
    return {
        "artifactLocation": {"uri": location.path, "uriBaseId": "%SRCROOT%"},
        "region": {"startLine": location.line},
    }


def _result(report: Report, finding: Finding, rule_index: dict[str, int]) -> dict[str, Any]:
    site = finding.site
    location = site.location if site is not None else report.model_location
    logical_name = f"{report.model}::{site.name}" if site is not None else report.model
    logical = [{"fullyQualifiedName": logical_name, "kind": "module"}]
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "ruleIndex": rule_index[finding.code],
        "level": _LEVEL[finding.severity.value],
        "message": {"text": finding.message},
        "locations": [{"logicalLocations": logical}],
        # stable across runs and line moves: rule, model and layer name
        "partialFingerprints": {"normswapSite/v1": _fingerprint(finding.code, report.model, finding.site_name)},
    }
    if location is not None and location.external:
        # never a physical location outside the repository: the module path, and the project's
        # own line that built the layer when it is known
        logical.append({"fullyQualifiedName": location.python_module, "kind": "module"})
        if site is not None and site.built_from is not None and not site.built_from.external:
            result["locations"][0]["physicalLocation"] = _physical(site.built_from)
    elif location is not None:
        result["locations"][0]["physicalLocation"] = _physical(location)
    called = [loc for loc in site.called_at if not loc.external] if site is not None else []
    if called:
        result["relatedLocations"] = [
            {"id": i, "message": {"text": "called here"}, "physicalLocation": _physical(loc)}
            for i, loc in enumerate(called)
        ]
    if finding.remedy is not None:
        remedy = finding.remedy
        result["properties"] = {
            "fix": {"target": remedy.target, "safe": remedy.safe, "description": remedy.description}
        }
    fix = _source_fix(report, site)
    if fix is not None:
        result["fixes"] = [fix]
    return result


def _source_fix(report: Report, site: Site | None) -> dict[str, Any] | None:
    """The `lint --fix` edit for this site as a SARIF fix: the exact replacement, plus the
    import changes of its file (as whole-line replacements by character offset)."""
    if site is None or report.fixes is None:
        return None
    edit = next((e for e in report.fixes.edits if site.name in e.sites), None)
    if edit is None:
        return None
    replacements: list[dict[str, Any]] = []
    for suggestion in report.fixes.suggestions():
        if (
            suggestion.path == edit.path
            and not suggestion.edits
            and not (suggestion.hunk.start <= edit.end_line and edit.line <= suggestion.hunk.end)
        ):
            offset, length = suggestion.char_range()
            replacements.append(
                {
                    "deletedRegion": {"charOffset": offset, "charLength": length},
                    "insertedContent": {"text": suggestion.hunk.text},
                }
            )
    replacements.append(
        {
            "deletedRegion": {
                "startLine": edit.line,
                "startColumn": edit.column,
                "endLine": edit.end_line,
                "endColumn": edit.end_column,
            },
            "insertedContent": {"text": edit.new},
        }
    )
    safety = "keeps the function" if edit.safe else "changes the function"
    return {
        "description": {"text": f"{edit.target} ({'safe' if edit.safe else 'unsafe'}: {safety}): {edit.new}"},
        "artifactChanges": [
            {"artifactLocation": {"uri": edit.path, "uriBaseId": "%SRCROOT%"}, "replacements": replacements}
        ],
    }


def render_sarif(reports: Sequence[Report]) -> str:
    rule_index = {rule.code: i for i, rule in enumerate(CATALOGUE)}
    results = [_result(report, f, rule_index) for report in reports for f in report.remaining_findings()]
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "normswap",
                        "version": __version__,
                        "informationUri": INFORMATION_URI,
                        "rules": [_rule(rule) for rule in CATALOGUE],
                    }
                },
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"
