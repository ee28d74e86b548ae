"""The Plan: per site, the target, its parameters and the reason; checked and JSON round-tripped."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import targets
from .errors import PlanError
from .sites import KINDS, Site, SiteKind
from .targets.base import NoParams

PLAN_VERSION = 1


@dataclass
class PlanEntry:
    """What to do with one site. `name` is a module's qualified name or a graph node's name."""

    name: str
    target: str
    # given as a plain mapping (a plan file's), checked and typed on construction: then the
    # target's parameter dataclass, which is a mapping too
    params: Mapping[str, Any] = field(default_factory=NoParams)
    reason: str = ""
    kind: SiteKind = SiteKind.MODULE
    # tensors of the layer the model's forward reads directly (`self.bn.running_var`): the
    # replacement keeps them, so the forward still runs and state_dict keys stay
    read_by_forward: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in targets.names():
            raise PlanError(
                f"Plan entry '{self.name}' has unknown target '{self.target}'; use one of {', '.join(targets.names())}."
            )
        if self.kind not in KINDS:
            raise PlanError(f"Plan entry '{self.name}' has unknown kind '{self.kind}'; use one of {', '.join(KINDS)}.")
        self.kind = SiteKind(self.kind)
        target = targets.get(self.target)
        if not isinstance(self.params, target.params_type):
            target.check(self.name, self.params)  # types, ranges, required and unknown parameters
            self.params = target.typed(self.params)

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether the site still normalizes with batch statistics under this entry."""
        return targets.get(self.target).uses_batch_statistics(self.params)

    @property
    def converts(self) -> bool:
        """True when the entry replaces BatchNorm semantics (frozen counts: the batch dependence goes)."""
        return targets.get(self.target).converts

    @property
    def keeps_batchnorm_op(self) -> bool:
        """Whether the exported graph may legitimately still hold a BatchNormalization op here."""
        return targets.get(self.target).keeps_batchnorm_op

    def check(self, site: Site | None = None) -> None:
        """Check the parameters (types, ranges; channels and divisibility against `site`).

        Raises:
            PlanError: naming the site and the field.
        """
        targets.get(self.target).check(self.name, self.params, site)

    def to_dict(self) -> dict[str, Any]:
        found = {
            "name": self.name,
            "kind": self.kind.value,
            "target": self.target,
            "params": dict(self.params),
            "reason": self.reason,
        }
        return found | ({"read_by_forward": list(self.read_by_forward)} if self.read_by_forward else {})


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
        """Number of sites per target, in registry order."""
        return {t: n for t in targets.names() if (n := sum(1 for e in self.entries if e.target == t))}

    def check(self, sites: Sequence[Site] = ()) -> None:
        """Check every entry, against its site when `sites` are given (then the plan must name
        exactly the model's sites), before any model is touched."""
        by_name = {site.name: site for site in sites}
        if sites:
            unknown = [entry.name for entry in self.entries if entry.name not in by_name]
            if unknown:
                raise PlanError(
                    f"The plan names {', '.join(repr(n) for n in unknown[:4])}, which is not a BatchNorm site of this model "
                    f"(its sites: {', '.join(list(by_name)[:8])}); it was made for another model or configuration."
                )
            missing = [name for name in by_name if self.get(name) is None]
            if missing:
                raise PlanError(
                    f"The plan says nothing about {', '.join(repr(n) for n in missing[:4])}; give every site an entry "
                    '({"name": ..., "target": "keep"} leaves one as it is).'
                )
        seen: set[str] = set()
        for entry in self.entries:
            if entry.name in seen:
                raise PlanError(f"The plan names site '{entry.name}' twice; keep one entry per site.")
            seen.add(entry.name)
            entry.check(by_name.get(entry.name))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sites": [entry.to_dict() for entry in self.entries]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        """Read and check a plan (structure, targets, parameter types and ranges).

        Raises:
            PlanError: naming the entry and the field that is wrong.
        """
        if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
            raise PlanError(f"{where} is not a normswap plan: expected an object with a 'sites' list.")
        version = data.get("version")
        if isinstance(version, bool) or version != PLAN_VERSION:
            raise PlanError(f"{where} has plan version {version!r}; this normswap reads version {PLAN_VERSION}.")
        entries = []
        for index, site in enumerate(data["sites"]):
            if (
                not isinstance(site, dict)
                or not isinstance(site.get("name"), str)
                or not isinstance(site.get("target"), str)
            ):
                raise PlanError(f"{where}: site #{index} needs at least a 'name' and a 'target' string.")
            params = site.get("params", {})
            if not isinstance(params, dict):
                raise PlanError(f"{where}: 'params' of site '{site['name']}' must be an object.")
            kind = site.get("kind", "module")
            if kind not in KINDS:
                raise PlanError(
                    f"Plan entry '{site['name']}' has unknown kind '{kind}'; use one of {', '.join(KINDS)}."
                )
            read = site.get("read_by_forward", [])
            if not isinstance(read, list) or not all(isinstance(a, str) and a.isidentifier() for a in read):
                raise PlanError(
                    f"{where}: 'read_by_forward' of site '{site['name']}' must be a list of attribute names."
                )
            entries.append(
                PlanEntry(
                    name=site["name"],
                    target=site["target"],
                    params=dict(params),
                    reason=str(site.get("reason", "")),
                    kind=SiteKind(kind),
                    read_by_forward=tuple(read),
                )
            )
        plan = cls(entries, version)
        plan.check()
        return plan

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg}).") from exc
        except RecursionError:
            raise PlanError(f"{where} is nested too deeply to be a normswap plan.") from None
        return cls.from_dict(data, where)

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        """Read and check the plan file at `path`.

        Raises:
            PlanError: the file cannot be read, is not UTF-8 JSON, or is not a valid plan.
        """
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as exc:
            raise PlanError(f"Cannot read plan '{path}': {exc.strerror or exc}.") from exc
        except UnicodeDecodeError:
            raise PlanError(f"Plan '{path}' is not UTF-8 text; give the plan.json that normswap wrote.") from None
        return cls.from_json(text, where=str(path))
