"""click options made from the options classes' declarations (normswap/options.py), and the values
the user gave on the command line."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import click
from click.core import ParameterSource

from ..options import DeclaredOption, declared


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (a nan passes every comparison)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class _ChoiceOf(click.Choice):
    """A choice read from its source each time it is used: `--to` accepts a target registered
    after the CLI was built (normswap.targets.register in a plugin or a test)."""

    def __init__(self, read: Callable[[], Sequence[str]]) -> None:
        self._read = read
        super().__init__(list(read()))

    # A tuple is what click >= 8.2 declares `choices` to be and a Sequence, what click 8.1 declares:
    # the property overrides the attribute under both.
    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._read())

    @choices.setter
    def choices(self, value: Sequence[Any]) -> None:  # click's __init__ assigns it
        pass


def _click_type(item: DeclaredOption) -> Any:
    spec = item.spec
    if callable(spec.choices):
        return _ChoiceOf(spec.choices)
    choices = spec.choice_values()
    if choices is not None:
        return click.Choice(list(choices))
    if spec.path is not None:
        return click.Path(exists=spec.path == "existing-file", dir_okay=spec.path == "any")
    if spec.value_type is int and (spec.minimum is not None or spec.maximum is not None):
        return click.IntRange(
            min=None if spec.minimum is None else int(spec.minimum),
            max=None if spec.maximum is None else int(spec.maximum),
        )
    if spec.value_type is float:
        kind = FiniteFloat if spec.finite else click.FloatRange
        return kind(min=spec.minimum, max=spec.maximum, min_open=spec.open_minimum, max_open=spec.open_maximum)
    return spec.value_type


def _click_option(item: DeclaredOption) -> Callable[[Callable], Callable]:
    spec = item.spec
    settings: dict[str, Any] = {"help": spec.help, "show_default": spec.show_default}
    if spec.is_flag:
        settings.update(is_flag=True, default=False)
    else:
        settings.update(type=_click_type(item), multiple=spec.multiple, metavar=spec.metavar)
        settings["default"] = () if spec.multiple else item.default
    return click.option(*spec.flags, item.name, **settings)


def options_of(*classes: type) -> Callable[[Callable], Callable]:
    """A decorator adding a click option for every declared option (with flags) of `classes`, in
    declaration order."""

    def decorate(command: Callable) -> Callable:
        items = [item for cls in classes for item in declared(cls) if item.spec.flags]
        for item in reversed(items):
            command = _click_option(item)(command)
        return command

    return decorate


def given_options() -> set[str]:
    """The names of the current command's options that the user gave (not their defaults)."""
    context = click.get_current_context()
    return {
        name
        for name in context.params
        if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
