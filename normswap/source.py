"""Source locations: where a BatchNorm is constructed and where forward calls it, repo-relative."""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import os
import re
import sys
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_NORMSWAP_DIR = str(Path(__file__).resolve().parent) + os.sep
_PASSES_DIR = str(Path(__file__).resolve().parent.parent / "passes") + os.sep
_INTERNAL_PREFIXES = (_TORCH_DIR, _NORMSWAP_DIR, _PASSES_DIR)
_FRAME_RE = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')


@dataclass(frozen=True)
class SourceLocation:
    """A line in the user's source. `path` is relative to the repository root (POSIX separators)."""

    path: str
    line: int
    code: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"

    def to_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "code": self.code}

    @classmethod
    def from_dict(cls, data: dict) -> SourceLocation:
        return cls(path=data["path"], line=int(data["line"]), code=data.get("code", ""))


def repo_root(start: str | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding pyproject.toml or .git."""
    return _repo_root(start or os.getcwd())


@functools.lru_cache(maxsize=64)
def _repo_root(start: str) -> Path:
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder
    return here


def relative_path(path: str) -> str:
    """`path` relative to the repository root; outside it, relative to the sys.path entry holding it."""
    resolved = Path(path).resolve()
    root = repo_root()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        pass
    best: Path | None = None
    for entry in sys.path:
        if not entry:
            continue
        base = Path(entry).resolve()
        if resolved.is_relative_to(base) and (best is None or len(base.parts) > len(best.parts)):
            best = base
    return resolved.relative_to(best).as_posix() if best is not None else resolved.name


def _is_internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_PREFIXES) or filename.startswith("<")


def _location(filename: str, line: int) -> SourceLocation:
    return SourceLocation(relative_path(filename), line, linecache.getline(filename, line).strip())


def user_frame_location(skip: int = 1) -> SourceLocation | None:
    """The innermost frame on the current stack that belongs to user code (not torch, not normswap)."""
    frame: types.FrameType | None = sys._getframe(skip)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not _is_internal(filename):
            return _location(filename, frame.f_lineno)
        frame = frame.f_back
    return None


def location_from_stack_trace(stack_trace: str | None) -> SourceLocation | None:
    """The innermost user frame of an FX / torch.export `stack_trace` string."""
    if not stack_trace:
        return None
    found = None
    for match in _FRAME_RE.finditer(stack_trace):
        filename = os.path.abspath(match["path"])
        if not _is_internal(filename):
            found = (filename, int(match["line"]))
    return _location(*found) if found else None


# Construction sites recorded while a model is built (exact, covers helpers and loops).
_CONSTRUCTED: weakref.WeakKeyDictionary[nn.Module, SourceLocation] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def recording_construction() -> Iterator[None]:
    """Record where each BatchNorm-like module is registered while building a model.

    Example:
        with normswap.recording_construction():
            model = build_model()
    """

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is not None and _looks_like_norm(child) and child not in _CONSTRUCTED:
            location = user_frame_location(skip=2)
            if location is not None:
                _CONSTRUCTED[child] = location

    handle = nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _looks_like_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def construction_site(model: nn.Module, qualified_name: str) -> SourceLocation | None:
    """Where the submodule `qualified_name` was constructed: recorded if available, else found by
    reading the source of the class that owns the attribute (`self.<attr> = ...`)."""
    try:
        module = model.get_submodule(qualified_name)
    except AttributeError:
        return None
    if module in _CONSTRUCTED:
        return _CONSTRUCTED[module]
    parts = qualified_name.split(".")
    # Climb out of torch containers: `self.features = nn.Sequential(..., nn.BatchNorm2d(c))`.
    while parts:
        parent = model.get_submodule(".".join(parts[:-1]))
        if isinstance(parent, _CONTAINERS) and type(parent).__module__.startswith("torch.") and len(parts) > 1:
            parts = parts[:-1]
            continue
        return _attribute_assignment(type(parent), parts[-1])
    return None


@functools.cache
def _assignments(cls: type) -> dict[str, tuple[str, int]]:
    """attribute name -> (file, line) of the first `self.<name> = ...` in the class's source (MRO)."""
    found: dict[str, tuple[str, int]] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            lines, start = inspect.getsourcelines(klass)
            filename = os.path.abspath(inspect.getsourcefile(klass) or "")
        except (OSError, TypeError):
            continue
        own: dict[str, tuple[str, int]] = {}
        for offset, text in enumerate(lines):
            match = re.match(r"\s*self\.(\w+)\s*(?::[^=]*)?=(?!=)", text) or re.match(r"\s*self\.add_module\(\s*['\"](\w+)['\"]", text)
            if match:
                own.setdefault(match.group(1), (filename, start + offset))
        found.update(own)  # a subclass's assignment wins over its base's
    return found


def _attribute_assignment(cls: type, attribute: str) -> SourceLocation | None:
    hit = _assignments(cls).get(attribute)
    return _location(*hit) if hit else None
