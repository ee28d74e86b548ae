"""Analysis: capture -> discover -> advise, the part that lint and convert share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .advise import advise
from .capture import Capture, capture
from .context import Context
from .rules import CATALOGUE, Finding, Rule, Skip
from .sites import Site, discover
from .torchutil import Timings, gc_paused


@dataclass
class Analysis:
    capture: Capture
    sites: list[Site]
    findings: list[Finding]
    skipped: dict[str, list[Skip]]
    context: Context
    timings: dict[str, float] = field(default_factory=dict)


def analyze(
    model: nn.Module, example_inputs: Any, context: Context | None = None, rules: Sequence[Rule] = CATALOGUE
) -> Analysis:
    """Capture the model, discover its BatchNorm sites and judge them against the context."""
    context = context or Context()
    with gc_paused():
        return _analyze(model, example_inputs, context, rules)


def _analyze(model: nn.Module, example_inputs: Any, context: Context, rules: Sequence[Rule]) -> Analysis:
    timings = Timings()
    with timings.measure("capture"):
        captured = capture(model, example_inputs)
    with timings.measure("discover"):
        sites = discover(model, captured)
    with timings.measure("rules"):
        findings, skipped = advise(sites, captured, context, rules)
    return Analysis(captured, sites, findings, skipped, context, timings.seconds)
