"""Options declared once: each is a field of a typed, frozen options object (Context, ConvertOptions,
LintOptions, ...) whose metadata holds its command-line flag, help and `[tool.normswap]` key.

The CLI's click options, the configuration keys and the commands normswap prints are all read from
these declarations, so an option is added in one place (after pip-tools' shared options and ruff's
settings structs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

METADATA_KEY = "normswap.option"


@dataclass(frozen=True)
class OptionSpec:
    """How one option field appears outside Python.

    flags: command-line flags (the first is its name in messages); none: configuration only.
    help: the help text.
    config_key: its key in `[tool.normswap]` (None: command line only); `config_aliases` other
        accepted spellings.
    value_type: the click value type: int, float, str or bool (a flag).
    choices: the accepted values (a callable is read each time they are checked, so a registry
        can supply them).
    minimum, maximum: an accepted range (numbers); `open_minimum` / `open_maximum` exclude the bound.
    finite: refuse nan and inf.
    multiple: repeatable on the command line (a tuple field).
    metavar: the value's name in help.
    show_default: show the default in help.
    negate: a flag that sets the field to False (`--no-onnx` for `onnx`).
    parse: turns the command-line value into the field's value (e.g. percent -> fraction).
    path: the value is a path: "file" (not a directory), "existing-file", or "any".
    """

    flags: tuple[str, ...] = ()
    help: str = ""
    config_key: str | None = None
    config_aliases: tuple[str, ...] = ()
    value_type: type = str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    finite: bool = False
    multiple: bool = False
    metavar: str | None = None
    show_default: bool = False
    negate: bool = False
    parse: Callable[[Any], Any] | None = None
    path: str | None = None

    @property
    def is_flag(self) -> bool:
        return self.value_type is bool

    @property
    def name(self) -> str:
        """The option as a user writes it: its first flag, else its configuration key."""
        return self.flags[0] if self.flags else str(self.config_key)

    def choice_values(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def option(default: Any = None, *flags: str, default_factory: Callable[[], Any] | None = None, **spec: Any) -> Any:
    """A dataclass field declaring one option: its default and its OptionSpec (see there)."""
    metadata = {METADATA_KEY: OptionSpec(flags=flags, **spec)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DeclaredOption:
    """One option field of an options class, with its declaration."""

    field: dataclasses.Field
    spec: OptionSpec

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None if self.field.default is dataclasses.MISSING else self.field.default


def declared(cls: type) -> Iterator[DeclaredOption]:
    """The option fields of a dataclass, in declaration order."""
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(METADATA_KEY)
        if spec is not None:
            yield DeclaredOption(field, spec)


def given_on_command_line(cls: type, values: Mapping[str, Any], given: Collection[str]) -> dict[str, Any]:
    """The fields of `cls` the user set on the command line (`given`: the names of the options
    that did not take their default), parsed into field values; a negating flag sets False."""
    found: dict[str, Any] = {}
    for item in declared(cls):
        if item.name not in given or not item.spec.flags:
            continue
        value = values[item.name]
        if item.spec.negate:
            value = not value
        found[item.name] = item.spec.parse(value) if item.spec.parse is not None and value is not None else value
    return found


def from_config(cls: type, section: Mapping[str, Any], where: str, *, check: bool = True) -> dict[str, Any]:
    """The fields of `cls` set in a configuration table (keys by `config_key` or an alias, `-` or
    `_`), checked against their declared type and choices (unless `check` is false: a class that
    validates its own fields says it better).

    Raises:
        ConfigError: a value of the wrong type or outside its choices, naming the key and `where`.
    """
    found: dict[str, Any] = {}
    for key, value in section.items():
        item = _by_config_key(cls).get(key.replace("-", "_"))
        if item is None:
            continue
        problem = _type_problem(item.spec, value) if check else None
        if problem:
            raise ConfigError(f"'{key}' in {where} {problem}, got {value!r}.")
        found[item.name] = tuple(value) if item.spec.multiple else value
    return found


def config_keys(*classes: type) -> set[str]:
    """Every `[tool.normswap]` key the options classes accept."""
    return {key for cls in classes for key in _by_config_key(cls)}


def _by_config_key(cls: type) -> dict[str, DeclaredOption]:
    keys: dict[str, DeclaredOption] = {}
    for item in declared(cls):
        if item.spec.config_key is not None:
            for key in (item.spec.config_key, *item.spec.config_aliases):
                keys[key] = item
    return keys


def _type_problem(spec: OptionSpec, value: Any) -> str | None:
    """Why a configuration value's type does not fit the option (strict: `true` is not 1, "false"
    is not False)."""
    if spec.multiple:
        if not isinstance(value, list) or not all(isinstance(v, spec.value_type) for v in value):
            return f"must be a list of {spec.value_type.__name__} values"
        return None
    if spec.is_flag:
        return None if isinstance(value, bool) else "must be true or false"
    if spec.value_type is int and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if spec.value_type is str and not isinstance(value, str):
        return "must be a string"
    return None  # choices and ranges: the options class checks them with its own message


def command_line(options: Any, fields: Collection[str]) -> list[str]:
    """The flags that give `options`' values of `fields` on the command line, in declaration
    order: `--batch-size 2`, `--dp` (flags only when true)."""
    words: list[str] = []
    for item in declared(type(options)):
        if item.name not in fields or not item.spec.flags:
            continue
        value = getattr(options, item.name)
        if item.spec.is_flag:
            if value and not item.spec.negate:
                words.append(item.spec.flags[0])
        elif item.spec.multiple:
            words += [f"{item.spec.flags[0]} {v}" for v in value]
        elif value is not None:
            words.append(f"{item.spec.flags[0]} {value}")
    return words
