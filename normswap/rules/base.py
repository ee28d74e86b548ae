"""Rule, Finding, Remedy and Severity: the vocabulary every rule module shares."""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import policy, targets
from ..context import Context
from ..sites import Site


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """Higher is more severe."""
        return {"info": 1, "warning": 2, "error": 3}[self.value]


class FixSafety(enum.StrEnum):
    """What a rule's remedy does to the model's function (ruff's fix applicability)."""

    SAFE = "safe"  # keeps it (frozen, fold)
    UNSAFE = "unsafe"  # changes it (groupnorm, layernorm)
    NONE = "none"  # the rule proposes no remedy


class SourceFix(enum.StrEnum):
    """Whether `normswap lint --fix` can write a rule's remedy into the model's source."""

    SOMETIMES = "sometimes"  # when the layer is built in the project by a torch BatchNorm class
    NEVER = "never"


@dataclass(frozen=True)
class Remedy:
    """What a finding proposes: a target, and whether it keeps the function (safe) or changes it."""

    target: str
    safe: bool
    description: str


@dataclass(frozen=True)
class Finding:
    code: str
    name: str
    severity: Severity
    message: str
    site: Site | None = None
    remedy: Remedy | None = None

    @property
    def site_name(self) -> str:
        return self.site.name if self.site is not None else "<model>"


@dataclass(frozen=True)
class Skip:
    """A rule that did not fire, and why (answers "why was this layer left alone?")."""

    code: str
    reason: str


class Rule:
    """Base class. Subclasses set the class attributes and implement `check` (per site) or
    `check_model` (once per model). The subclass docstring is the rule's documentation."""

    code: ClassVar[str]
    name: ClassVar[str]
    severity: ClassVar[Severity]
    summary: ClassVar[str]
    fix_safety: ClassVar[FixSafety] = FixSafety.NONE
    source_fix: ClassVar[SourceFix] = SourceFix.SOMETIMES

    def check(self, site: Site, context: Context) -> Finding | Skip:
        return Skip(self.code, "applies to the whole model, not to a site")

    def check_model(self, capture: Any, context: Context) -> list[Finding]:
        return []

    @classmethod
    def documentation(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "")

    def finding(self, site: Site | None, message: str, remedy: Remedy | None = None) -> Finding:
        return Finding(self.code, self.name, self.severity, message, site, remedy)

    def skip(self, reason: str) -> Skip:
        return Skip(self.code, reason)

    def natural_remedy(self, site: Site, context: Context) -> Remedy:
        target, why = policy.natural_target(site, context)
        return Remedy(target, targets.get(target).keeps_function, f"replace with {target}: {why}")


def accumulated_batch(context: Context) -> str:
    """What gradient accumulation changes and what it does not ("" without accumulation): BatchNorm
    normalizes each micro-batch of `batch_size`, not the optimizer's batch (pytorch/pytorch#46516)."""
    if context.accumulation == 1 or context.batch_size is None:
        return ""
    return (
        f"gradient accumulation over {context.accumulation} steps makes the optimizer's batch "
        f"{context.batch_size * context.accumulation} per device, but not BatchNorm's"
    )


def shape_text(site: Site) -> str:
    return "(" + ", ".join(str(d) for d in site.input_shape) + ")" if site.input_shape else "(unknown shape)"
