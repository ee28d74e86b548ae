"""`[tool.normswap]` in the nearest pyproject.toml: context defaults, rule selection, models to lint."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import Context
from .errors import ConfigError
from .loader import InputSpec, parse_input_spec

_CONTEXT_KEYS = {
    "batch_size",
    "world_size",
    "differential_privacy",
    "dp",
    "inference_only",
    "inference",
    "finetune",
    "sequence",
    "small_batch_threshold",
}
_OTHER_KEYS = {"models", "input_shape", "select", "ignore", "fail_on", "format"}


@dataclass
class ModelEntry:
    """One model to lint: its spec, keyword arguments and input shapes."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[InputSpec] = field(default_factory=list)


@dataclass
class Config:
    path: Path | None = None
    context: dict[str, Any] = field(default_factory=dict)
    models: list[ModelEntry] = field(default_factory=list)
    select: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    fail_on: str | None = None
    format: str | None = None

    def make_context(self, **flags: Any) -> Context:
        """Context from the file, with command-line flags (non-None) winning."""
        base = Context.from_mapping(self.context, where=f"[tool.normswap] of {self.path}" if self.path else "context")
        return base.replace(**flags)


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
        raise ConfigError(f"'tool' in {path} must be a table ([tool.normswap] and the like), not a {type(tool).__name__}.")
    section = tool.get("normswap")
    if section is None:
        return Config(path=path)
    if not isinstance(section, dict):
        raise ConfigError(f"[tool.normswap] in {path} must be a table.")
    where = f"[tool.normswap] of {path}"
    unknown = set(section) - _CONTEXT_KEYS - _OTHER_KEYS
    if unknown:
        known = ", ".join(sorted(_CONTEXT_KEYS | _OTHER_KEYS))
        raise ConfigError(f"Unknown key '{sorted(unknown)[0]}' in {where}; known keys are: {known}.")
    config = Config(path=path, context={k: v for k, v in section.items() if k in _CONTEXT_KEYS})
    config.make_context()  # validate now, with the file named
    for key in ("select", "ignore"):
        value = section.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"'{key}' in {where} must be a list of rule codes.")
        setattr(config, key, value)
    for key in ("fail_on", "format"):
        if key in section and not isinstance(section[key], str):
            raise ConfigError(f"'{key}' in {where} must be a string.")
        setattr(config, key, section.get(key))
    default_shape = section.get("input_shape")
    if default_shape is not None:
        _check_shape(default_shape, "'input_shape'", where)
    models = section.get("models", [])
    if not isinstance(models, list):
        raise ConfigError(f"'models' in {where} must be a list of model specs or tables, not a {type(models).__name__}.")
    config.models = [_model_entry(item, where, default_shape) for item in models]
    return config


def _check_shape(value: Any, what: str, where: str) -> None:
    """An input shape: "2,3,224,224" (optionally ":int64") or a list of positive integers."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(d, int) and not isinstance(d, bool) for d in value)):
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
        raise ConfigError(f"Unknown key '{sorted(unknown)[0]}' in model '{item['model']}' of {where}; use model, kwargs, input_shape.")
    if "input_shapes" in item and not isinstance(item["input_shapes"], list):
        raise ConfigError(f"'input_shapes' of model '{item['model']}' in {where} must be a list of shapes, one per input.")
    shapes = item.get("input_shapes") or ([item["input_shape"]] if "input_shape" in item else ([default_shape] if default_shape else []))
    if not shapes:
        raise ConfigError(f"Model '{item['model']}' in {where} has no input_shape.")
    for shape in shapes:
        _check_shape(shape, f"An input shape of model '{item['model']}'", where)
    kwargs = item.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"'kwargs' of model '{item['model']}' in {where} must be a table.")
    return ModelEntry(item["model"], kwargs, [parse_input_spec(s) for s in shapes])
