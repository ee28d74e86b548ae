"""`[tool.normswap]` in the nearest pyproject.toml: context defaults, lint settings, models to lint.

Its keys are those the options declare (`Context` and `LintOptions` fields with a config key),
plus the models to lint.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import Context
from .errors import ConfigError
from .linter import LintOptions
from .loader import InputSpec, parse_input_spec
from .options import config_keys, from_config, given_on_command_line

_MODEL_KEYS = {"models", "input_shape"}


@dataclass
class ModelEntry:
    """One model to lint: its spec, keyword arguments and input shapes."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[InputSpec] = field(default_factory=list)


@dataclass
class Config:
    """The `[tool.normswap]` table, checked: the values it sets for Context and LintOptions fields,
    and the models to lint."""

    path: Path | None = None
    context: Context = field(default_factory=Context)
    lint: dict[str, Any] = field(default_factory=dict)  # LintOptions fields the file sets
    models: list[ModelEntry] = field(default_factory=list)

    def make_context(self, values: Mapping[str, Any], given: Collection[str]) -> Context:
        """The file's context with the command-line options the user gave winning."""
        return self.context.replace(**given_on_command_line(Context, values, given))

    def make_lint_options(self, values: Mapping[str, Any], given: Collection[str]) -> LintOptions:
        """LintOptions: the command line, else the file, else the defaults."""
        return LintOptions(**{**self.lint, **given_on_command_line(LintOptions, values, given)})


def find_pyproject(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(start: Path | None = None) -> Config:
    """Read `[tool.normswap]` from the nearest pyproject.toml (an empty Config when there is none)."""
    path = find_pyproject(start)
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from exc
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(
            f"'tool' in {path} must be a table ([tool.normswap] and the like), not a {type(tool).__name__}."
        )
    section = tool.get("normswap")
    if section is None:
        return Config(path=path)
    if not isinstance(section, dict):
        raise ConfigError(f"[tool.normswap] in {path} must be a table.")
    where = f"[tool.normswap] of {path}"
    context_keys, lint_keys = config_keys(Context), config_keys(LintOptions)
    known = context_keys | lint_keys | _MODEL_KEYS
    unknown = [key for key in section if key.replace("-", "_") not in known]
    if unknown:
        raise ConfigError(f"Unknown key '{unknown[0]}' in {where}; known keys are: {', '.join(sorted(known))}.")
    context = Context.from_mapping({k: v for k, v in section.items() if k.replace("-", "_") in context_keys}, where)
    config = Config(path=path, context=context, lint=from_config(LintOptions, section, where))
    default_shape = section.get("input_shape")
    if default_shape is not None:
        _check_shape(default_shape, "'input_shape'", where)
    models = section.get("models", [])
    if not isinstance(models, list):
        raise ConfigError(
            f"'models' in {where} must be a list of model specs or tables, not a {type(models).__name__}."
        )
    config.models = [_model_entry(item, where, default_shape) for item in models]
    return config


def _check_shape(value: Any, what: str, where: str) -> None:
    """An input shape: "2,3,224,224" (optionally ":int64") or a list of positive integers."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(d, int) and not isinstance(d, bool) for d in value)
    ):
        return
    raise ConfigError(f'{what} in {where} must be a string such as "2,3,224,224" or a list of integers, not {value!r}.')


def _model_entry(item: Any, where: str, default_shape: Any) -> ModelEntry:
    if isinstance(item, str):
        if default_shape is None:
            raise ConfigError(
                f"Model '{item}' in {where} needs an input shape: set input_shape = \"2,3,224,224\" in [tool.normswap] "
                f'or write {{ model = "{item}", input_shape = "2,3,224,224" }}.'
            )
        item = {"model": item, "input_shape": default_shape}
    if not isinstance(item, dict) or not isinstance(item.get("model"), str):
        raise ConfigError(f"Each entry of 'models' in {where} must be a table with a 'model' string.")
    unknown = set(item) - {"model", "kwargs", "input_shape", "input_shapes"}
    if unknown:
        raise ConfigError(
            f"Unknown key '{sorted(unknown)[0]}' in model '{item['model']}' of {where}; use model, kwargs, input_shape."
        )
    if "input_shapes" in item and not isinstance(item["input_shapes"], list):
        raise ConfigError(
            f"'input_shapes' of model '{item['model']}' in {where} must be a list of shapes, one per input."
        )
    shapes = item.get("input_shapes") or (
        [item["input_shape"]] if "input_shape" in item else ([default_shape] if default_shape else [])
    )
    if not shapes:
        raise ConfigError(f"Model '{item['model']}' in {where} has no input_shape.")
    for shape in shapes:
        _check_shape(shape, f"An input shape of model '{item['model']}'", where)
    kwargs = item.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"'kwargs' of model '{item['model']}' in {where} must be a table.")
    return ModelEntry(item["model"], kwargs, [parse_input_spec(s) for s in shapes])
