"""The Plan: per site, the target normalization, its parameters and the reason; JSON round-trip."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import PlanError

PLAN_VERSION = 1
PLAN_TARGETS = ("groupnorm", "layernorm", "frozen", "syncbn", "keep")


@dataclass
class PlanEntry:
    """What to do with one site. `name` is a module's qualified name or a graph node's name."""

    name: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    kind: str = "module"

    def __post_init__(self) -> None:
        if self.target not in PLAN_TARGETS:
            raise PlanError(
                f"Plan entry '{self.name}' has unknown target '{self.target}'; use one of {', '.join(PLAN_TARGETS)}."
            )

    @property
    def converts(self) -> bool:
        """True when the entry replaces BatchNorm semantics (frozen counts: the batch dependence goes)."""
        return self.target != "keep"

    @property
    def keeps_batchnorm_op(self) -> bool:
        """Targets whose exported graph legitimately still holds a BatchNormalization op."""
        return self.target in ("keep", "frozen", "syncbn")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "target": self.target, "params": dict(self.params), "reason": self.reason}


@dataclass
class Plan:
    """An ordered list of PlanEntry, one per site, that re-applies to a fresh instance of the model."""

    entries: list[PlanEntry]
    version: int = PLAN_VERSION

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> PlanEntry | None:
        return next((entry for entry in self.entries if entry.name == name), None)

    @property
    def converted(self) -> list[PlanEntry]:
        return [entry for entry in self.entries if entry.converts]

    def counts(self) -> dict[str, int]:
        """Number of sites per target, in PLAN_TARGETS order."""
        return {t: n for t in PLAN_TARGETS if (n := sum(1 for e in self.entries if e.target == t))}

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sites": [entry.to_dict() for entry in self.entries]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
            raise PlanError(f"{where} is not a normswap plan: expected an object with a 'sites' list.")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"{where} has plan version {version!r}; this normswap reads version {PLAN_VERSION}.")
        entries = []
        for index, site in enumerate(data["sites"]):
            if not isinstance(site, dict) or "name" not in site or "target" not in site:
                raise PlanError(f"{where}: site #{index} needs at least 'name' and 'target'.")
            entries.append(
                PlanEntry(
                    name=str(site["name"]),
                    target=str(site["target"]),
                    params=dict(site.get("params") or {}),
                    reason=str(site.get("reason", "")),
                    kind=str(site.get("kind", "module")),
                )
            )
        return cls(entries, version)

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        return cls.from_dict(data, where)
