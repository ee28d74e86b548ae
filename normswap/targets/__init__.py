"""The target registry: one module per replacement, registered here in order. Everything else asks
the registry; a target's name elsewhere is data only. A new target is one module defining a
`Target` subclass, plus a `register()` call (below for the built-in ones, or in the user's code)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PlanError
from . import batchnorm, fold, frozen, groupnorm, keep, layernorm, syncbn
from .base import (
    DEFAULT_CHANNELS_PER_GROUP,
    DEFAULT_MAX_GROUPS,
    Param,
    ParamKind,
    PlanOptions,
    Refusal,
    Target,
    TargetParams,
)

_REGISTERED: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Make `target` available to plans, `--to`, plan files, calibration, healing and export.

    Raises:
        PlanError: another target already has its name.
    """
    if target.name in _REGISTERED and _REGISTERED[target.name] is not target:
        raise PlanError(
            f"A target called '{target.name}' is already registered ({type(_REGISTERED[target.name]).__qualname__})."
        )
    _REGISTERED[target.name] = target
    return target


def registered() -> tuple[Target, ...]:
    """Every target, in registration order."""
    return tuple(_REGISTERED.values())


def names() -> tuple[str, ...]:
    """Every target's name (what plan entries may name)."""
    return tuple(_REGISTERED)


def choices() -> tuple[str, ...]:
    """What `--to` / convert(to=...) accept: auto, or a target that replaces the BatchNorm."""
    return ("auto", *(target.name for target in _REGISTERED.values() if target.converts))


def get(name: str) -> Target:
    """The target called `name`.

    Raises:
        PlanError: no such target.
    """
    try:
        return _REGISTERED[name]
    except KeyError:
        raise PlanError(f"Unknown target '{name}'; use one of {', '.join(names())}.") from None


def recognize(module: nn.Module) -> tuple[Target, dict[str, Any]] | None:
    """The target that built `module`, with its parameters read back (None: no target's module)."""
    for target in _REGISTERED.values():
        params = target.params_from_module(module)
        if params is not None:
            return target, params
    return None


for _builtin in (
    groupnorm.TARGET,
    layernorm.TARGET,
    frozen.TARGET,
    syncbn.TARGET,
    batchnorm.TARGET,
    fold.TARGET,
    keep.TARGET,
):
    register(_builtin)


__all__ = [
    "DEFAULT_CHANNELS_PER_GROUP",
    "DEFAULT_MAX_GROUPS",
    "Param",
    "ParamKind",
    "PlanOptions",
    "Refusal",
    "Target",
    "TargetParams",
    "choices",
    "get",
    "names",
    "recognize",
    "register",
    "registered",
]
