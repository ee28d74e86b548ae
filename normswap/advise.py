"""Advise: run the rule catalogue over the sites and the capture; select / ignore rule codes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .capture import Capture
from .context import Context
from .errors import ConfigError
from .rules import CATALOGUE, Finding, Rule, Skip
from .sites import Site


def select_rules(select: Iterable[str] | None = None, ignore: Iterable[str] | None = None) -> tuple[Rule, ...]:
    """Rules whose code starts with a `select` prefix (all when empty) and with no `ignore` prefix.

    Raises:
        ConfigError: a prefix that matches no rule code.
    """
    select = [s.strip().upper() for s in (select or []) if s.strip()]
    ignore = [s.strip().upper() for s in (ignore or []) if s.strip()]
    for prefix in (*select, *ignore):
        if not any(rule.code.startswith(prefix) for rule in CATALOGUE):
            codes = ", ".join(rule.code for rule in CATALOGUE)
            raise ConfigError(f"Unknown rule code '{prefix}'; known codes are {codes} (prefixes such as NS1 work too).")
    return tuple(
        rule
        for rule in CATALOGUE
        if (not select or any(rule.code.startswith(p) for p in select))
        and not any(rule.code.startswith(p) for p in ignore)
    )


def advise(
    sites: Sequence[Site], capture: Capture, context: Context, rules: Sequence[Rule] = CATALOGUE
) -> tuple[list[Finding], dict[str, list[Skip]]]:
    """Findings in site order (model-level findings first), and per site the rules that did not fire.

    Batch-independent look-alikes are left alone: no rule looks at them.
    """
    findings: list[Finding] = []
    skipped: dict[str, list[Skip]] = {}
    for rule in rules:
        findings.extend(rule.check_model(capture, context))
    for site in sites:
        if not site.batch_dependent:
            continue
        for rule in rules:
            result = rule.check(site, context)
            if isinstance(result, Finding):
                findings.append(result)
            else:
                skipped.setdefault(site.name, []).append(result)
    return findings, skipped
