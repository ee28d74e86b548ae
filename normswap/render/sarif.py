"""SARIF 2.1.0 for code scanning: rules from the catalogue, results with relative locations."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..rules import CATALOGUE

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://github.com/normswap/normswap"
_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _rule(rule) -> dict[str, Any]:
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


def _result(report, finding, rule_index: dict[str, int]) -> dict[str, Any]:
    site = finding.site
    location = site.location if site is not None else report.model_location
    logical_name = f"{report.model}::{site.name}" if site is not None else report.model
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "ruleIndex": rule_index[finding.code],
        "level": _LEVEL[finding.severity.value],
        "message": {"text": finding.message},
        "locations": [{"logicalLocations": [{"fullyQualifiedName": logical_name, "kind": "module"}]}],
        # stable across runs and line moves: rule, model and layer name
        "partialFingerprints": {"normswapSite/v1": _fingerprint(finding.code, report.model, finding.site_name)},
    }
    if location is not None:
        result["locations"][0]["physicalLocation"] = {
            "artifactLocation": {"uri": location.path, "uriBaseId": "%SRCROOT%"},
            "region": {"startLine": location.line},
        }
    if site is not None and site.called_at:
        result["relatedLocations"] = [
            {
                "id": i,
                "message": {"text": "called here"},
                "physicalLocation": {"artifactLocation": {"uri": loc.path, "uriBaseId": "%SRCROOT%"}, "region": {"startLine": loc.line}},
            }
            for i, loc in enumerate(site.called_at)
        ]
    if finding.fix is not None:
        result["properties"] = {"fix": finding.fix.to_dict()}
    return result


def render_sarif(reports: Sequence) -> str:
    rule_index = {rule.code: i for i, rule in enumerate(CATALOGUE)}
    results = [_result(report, f, rule_index) for report in reports for f in report.findings]
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
