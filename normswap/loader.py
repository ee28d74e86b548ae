"""Load a model from a spec (`package.module:callable` or `path/to/file.py:callable`) and build inputs."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .options import option
from .source import recording_construction
from .torchutil import available_memory


@dataclass(frozen=True)
class ModelOptions:
    """How to build and run the model: the callable's keyword arguments and the example inputs."""

    kwargs: tuple[str, ...] = option(
        (), "-k", help="Keyword argument for the model callable (Python literal).", multiple=True, metavar="KEY=VALUE"
    )
    input_shapes: tuple[str, ...] = option(
        (),
        "--input-shape",
        help="Shape of one example input, batch first, optionally with a dtype (8,128:int64); repeat for several inputs.",
        multiple=True,
        metavar="N,C,...",
    )


def parse_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings to a dict; values are Python literals where possible, else strings."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"-k expects KEY=VALUE with a Python identifier as KEY, got '{pair}'.")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """'2,3,224,224' (or a list of ints) to a shape tuple of positive ints."""
    parts = text if not isinstance(text, str) else text.replace("x", ",").split(",")
    try:
        shape = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        raise ConfigError(
            f"Input shape '{text}' is malformed; write comma-separated positive integers, batch first, "
            "e.g. 2,3,224,224 (or 8,128:int64 for token ids)."
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"Input shape '{text}' is malformed; write comma-separated positive integers, batch first, e.g. 2,3,224,224."
        )
    return shape


DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class InputSpec:
    """One example input: its shape (batch first) and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        """As --input-shape takes it: '2,3,224,224', or '8,128:int64' for another dtype."""
        shape = ",".join(str(d) for d in self.shape)
        if self.dtype == torch.float32:
            return shape
        return f"{shape}:{str(self.dtype).removeprefix('torch.')}"


def parse_input_spec(text: str | Sequence[int]) -> InputSpec:
    """'2,3,224,224' or '8,128:int64' (token ids) to an InputSpec."""
    if not isinstance(text, str):
        return InputSpec(parse_shape(text))
    shape_text, sep, dtype_text = text.partition(":")
    dtype = torch.float32
    if sep:
        if dtype_text.strip().lower() not in DTYPES:
            raise ConfigError(f"Unknown input dtype '{dtype_text}' in '{text}'; use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype_text.strip().lower()]
    return InputSpec(parse_shape(shape_text), dtype)


def check_input_memory(specs: Sequence[InputSpec | Sequence[int]]) -> None:
    """Refuse example inputs that alone take more than half the available memory (a forward
    pass needs several times its input): one sentence instead of an allocation failure.

    Raises:
        ConfigError: naming the shapes, their size and the memory available.
    """
    total = 0
    for spec in specs:
        spec = spec if isinstance(spec, InputSpec) else InputSpec(tuple(spec))
        total += math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()
    available = available_memory()
    if available is not None and total > available // 2:
        shapes = " and ".join(",".join(map(str, (s.shape if isinstance(s, InputSpec) else s))) for s in specs)
        raise ConfigError(
            f"The example inputs {shapes} need {total / 1e9:.1f} GB, more than half of the {available / 1e9:.1f} GB of memory available; "
            "use a smaller batch (2 to 8 samples are enough to convert and validate)."
        )


def example_inputs(specs: Sequence[InputSpec | Sequence[int]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs: standard normal for floating dtypes, zeros (a valid index) otherwise.

    Raises:
        ConfigError: the inputs alone would take more than half the available memory.
    """
    check_input_memory(specs)
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        spec = spec if isinstance(spec, InputSpec) else InputSpec(tuple(spec))
        if spec.dtype.is_floating_point:
            tensors.append(torch.randn(spec.shape, generator=generator).to(spec.dtype))
        else:
            tensors.append(torch.zeros(spec.shape, dtype=spec.dtype))
    return tuple(tensors)


def _import_target(spec: str) -> tuple[Any, str]:
    if ":" not in spec:
        raise ModelLoadError(f"Model '{spec}' must be 'package.module:callable' or 'path/to/file.py:callable'.")
    location, _, attribute = spec.rpartition(":")
    if location.endswith(".py") or os.sep in location or "/" in location:
        path = Path(location)
        if not path.is_file():
            raise ModelLoadError(f"Model file '{location}' does not exist; check the path in '{spec}'.")
        module_name = f"_normswap_user_{abs(hash(str(path.resolve())))}"
        import_spec = importlib.util.spec_from_file_location(module_name, path)
        if import_spec is None or import_spec.loader is None:
            raise ModelLoadError(f"Model file '{location}' cannot be imported as Python; check the path in '{spec}'.")
        module = importlib.util.module_from_spec(import_spec)
        sys.path.insert(0, str(path.resolve().parent))  # sibling imports of the user's file
        try:
            sys.modules[module_name] = module
            import_spec.loader.exec_module(module)
        except (
            Exception,
            SystemExit,
        ) as exc:  # the user's file failed to import (or exited): one sentence, with the cause
            sys.modules.pop(module_name, None)
            hint = _dotted_hint(path, attribute) if isinstance(exc, ImportError) else ""
            raise ModelLoadError(f"Importing '{location}' failed: {_failure(exc)}{hint}.") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: the current project is importable
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as exc:
            raise ModelLoadError(
                f"Module '{location}' not found ({exc}); check '{spec}' and that the package is importable from here."
            ) from exc
        except (
            Exception,
            SystemExit,
        ) as exc:  # the user's module failed to import (or exited): one sentence, with the cause
            raise ModelLoadError(f"Importing module '{location}' failed: {_failure(exc)}.") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"'{location}' has no attribute '{attribute}'; check the name after ':' in '{spec}'.")
        target = getattr(target, part)
    return target, attribute


@contextlib.contextmanager
def model_importable(spec: str) -> Iterator[None]:
    """For a `path/to/file.py:callable` spec: the file's folder on sys.path, so that its module
    imports by its plain name (a trusted pickle of the model refers to `nets.Net`)."""
    location = spec.rpartition(":")[0]
    folder = str(Path(location).resolve().parent) if location.endswith(".py") else None
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _dotted_hint(path: Path, attribute: str) -> str:
    """'; it is a module of the package `unet`: ...': for a file inside a package (its folder has
    an __init__.py), whose own imports (relative ones above all) work only when it is imported
    as part of its package."""
    resolved = path.resolve()
    package = resolved.parent
    if not (package / "__init__.py").is_file():
        return ""
    while (package.parent / "__init__.py").is_file():
        package = package.parent
    dotted = ".".join(resolved.relative_to(package.parent).with_suffix("").parts)
    folder = os.path.relpath(package.parent)
    where = "" if folder == "." else f" from the folder that holds it ({folder})"
    return f"; '{path}' is a module of the package '{package.name}': name it by its dotted form, '{dotted}:{attribute}'{where}"


def _failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}), which a model module must not do"
    return f"{type(exc).__name__}: {exc}"


def load_model(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """Build the model named by `spec`, recording where its BatchNorm layers are constructed.

    Returns:
        (model, the callable it came from).
    """
    target, attribute = _import_target(spec)
    if isinstance(target, nn.Module):
        return target, type(target)
    if not callable(target):
        raise ModelLoadError(
            f"'{attribute}' in '{spec}' is a {type(target).__name__}, not a callable that builds a model."
        )
    try:
        with recording_construction():
            model = target(**(kwargs or {}))
    except (Exception, SystemExit) as exc:  # the user's factory failed (or exited): one sentence, with the cause
        raise ModelLoadError(f"Calling '{spec}' with {kwargs or {}} failed: {_failure(exc)}.") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module.")
    return model, target
