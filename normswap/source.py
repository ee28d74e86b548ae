"""Source locations: where a BatchNorm is constructed and where forward calls it, repo-relative."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import linecache
import os
import re
import sys
import sysconfig
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_NORMSWAP_DIR = str(Path(__file__).resolve().parent) + os.sep
_PASSES_DIR = str(Path(__file__).resolve().parent.parent / "passes") + os.sep
_INTERNAL_PREFIXES = (_TORCH_DIR, _NORMSWAP_DIR, _PASSES_DIR)
_FRAME_RE = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')


@dataclass(frozen=True)
class SourceLocation:
    """A line of source. `path` is relative to the repository root (POSIX separators); for a file
    outside it, relative to the sys.path entry that holds it (`timm/models/resnet.py`).
    `origin`: "project" (the user's repository), "installed" (a package in site-packages) or
    "outside" (any other file)."""

    path: str
    line: int
    code: str = ""
    origin: str = "project"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def external(self) -> bool:
        return self.origin != "project"

    @property
    def label(self) -> str:
        """`path:line`, marked when it is not a file of the user's project."""
        return {"installed": f"{self} (installed package)", "outside": f"{self} (outside the project)"}.get(
            self.origin, str(self)
        )

    @property
    def python_module(self) -> str:
        """`timm.models.resnet` for `timm/models/resnet.py`."""
        return self.path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")

    def absolute(self) -> Path | None:
        """The file this location names: under the repository root, else under a sys.path entry."""
        for base in (repo_root(), *(Path(entry) for entry in sys.path if entry)):
            candidate = base / self.path
            if candidate.is_file():
                return candidate.resolve()
        return None

    def to_dict(self) -> dict:
        return {"path": self.path, "line": self.line, "code": self.code, "origin": self.origin}

    @classmethod
    def from_dict(cls, data: dict) -> SourceLocation:
        return cls(
            path=data["path"],
            line=int(data["line"]),
            code=data.get("code", ""),
            origin=str(data.get("origin", "project")),
        )


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


_INSTALLED = tuple(
    str(Path(p).resolve()) + os.sep for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]} if p
)


def origin_of(path: str, root: Path | None = None) -> str:
    """ "installed" for a file inside an installed package (also a virtualenv kept in the
    repository), "project" under `root` (default: the repository root), else "outside"."""
    resolved = Path(path).resolve()
    text = str(resolved)
    if (
        text.startswith(_INSTALLED)
        or f"{os.sep}site-packages{os.sep}" in text
        or f"{os.sep}dist-packages{os.sep}" in text
    ):
        return "installed"
    return "project" if resolved.is_relative_to((root or repo_root()).resolve()) else "outside"


def is_project_file(path: str, root: Path | None = None) -> bool:
    """Whether `path` is a file of the user's project, which normswap may point to and edit."""
    return origin_of(path, root) == "project"


def relative_path(path: str) -> str:
    """`path` relative to the repository root; for an installed package (even in a virtualenv
    inside the repository) or outside the root, relative to the sys.path entry holding it."""
    resolved = Path(path).resolve()
    root = repo_root()
    if resolved.is_relative_to(root) and origin_of(str(resolved), root) != "installed":
        return resolved.relative_to(root).as_posix()
    best: Path | None = None
    for entry in sys.path:
        if not entry:
            continue
        base = Path(entry).resolve()
        if resolved.is_relative_to(base) and (best is None or len(base.parts) > len(best.parts)):
            best = base
    return resolved.relative_to(best).as_posix() if best is not None else resolved.name


def _is_internal(filename: str) -> bool:
    """torch, normswap, or code with no file (`<stdin>`, `<string>`, a notebook cell)."""
    return filename.startswith("<") or os.path.abspath(filename).startswith(_INTERNAL_PREFIXES)


def _location(filename: str, line: int) -> SourceLocation:
    return SourceLocation(
        relative_path(filename), line, linecache.getline(filename, line).strip(), origin=origin_of(filename)
    )


def user_frame_location(skip: int = 1) -> SourceLocation | None:
    """The innermost frame on the current stack that belongs to user code (not torch, not normswap)."""
    frame: types.FrameType | None = sys._getframe(skip)
    while frame is not None:
        if not _is_internal(frame.f_code.co_filename):
            return _location(os.path.abspath(frame.f_code.co_filename), frame.f_lineno)
        frame = frame.f_back
    return None


def location_from_stack_trace(stack_trace: str | None) -> SourceLocation | None:
    """The innermost user frame of an FX / torch.export `stack_trace` string."""
    if not stack_trace:
        return None
    found = None
    for match in _FRAME_RE.finditer(stack_trace):
        if not _is_internal(match["path"]):
            found = (os.path.abspath(match["path"]), int(match["line"]))
    return _location(*found) if found else None


@dataclass(frozen=True)
class CodeSpan:
    """An expression a frame was executing: absolute path, 1-based lines, 0-based UTF-8 byte
    columns (as CPython reports them), and the code object it belongs to (its qualified name,
    first line and fingerprint, to tell later whether the file still compiles to that code)."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    function: str = ""
    first_line: int = 0
    fingerprint: str = ""
    kwargs_keys: tuple[str, ...] = ()  # the keys the function's **kwargs held when it ran


@dataclass(frozen=True)
class Construction:
    """How a BatchNorm module was built: the calls on the user's stack, innermost first (the
    constructor call itself, then the calls that led to it)."""

    calls: tuple[CodeSpan, ...]


def code_fingerprint(code: types.CodeType) -> str:
    """What a code object does and where its instructions sit: bytecode, positions, names and
    constants (nested code objects by their own fingerprint). Equal fingerprints mean the
    source still compiles to the code that ran, line and column for line and column."""
    digest = hashlib.sha256()
    digest.update(code.co_code)
    digest.update(repr(list(code.co_positions())).encode())
    digest.update(repr((code.co_names, code.co_varnames, code.co_firstlineno)).encode())
    for constant in code.co_consts:
        digest.update(
            code_fingerprint(constant).encode() if isinstance(constant, types.CodeType) else repr(constant).encode()
        )
    return digest.hexdigest()


# Recorded while a model is built (exact, covers helpers and loops).
_CONSTRUCTED: weakref.WeakKeyDictionary[nn.Module, SourceLocation] = weakref.WeakKeyDictionary()
_CONSTRUCTIONS: weakref.WeakKeyDictionary[nn.Module, Construction] = weakref.WeakKeyDictionary()
_MAX_FRAMES = 16
_recording_depth = 0


def construction_of(module: nn.Module) -> Construction | None:
    """How `module` was built, when it was built under `recording_construction()`."""
    return _CONSTRUCTIONS.get(module)


def built_from(module: nn.Module) -> SourceLocation | None:
    """The project's own line that led to `module` when it was constructed outside the project
    (a model zoo's file): e.g. the user's `timm.create_model(...)` call."""
    construction = _CONSTRUCTIONS.get(module)
    if construction is None or is_project_file(construction.calls[0].path):
        return None
    own = next((call for call in construction.calls if is_project_file(call.path)), None)
    return _location(own.path, own.line) if own is not None else None


class _CodeCache:
    """Per recording: each code object's positions and fingerprint, computed once (a model
    builds thousands of layers from the same few functions)."""

    def __init__(self) -> None:
        self._positions: dict[types.CodeType, list] = {}
        self._fingerprints: dict[types.CodeType, str] = {}

    def span(self, frame: types.FrameType) -> CodeSpan | None:
        """The expression `frame` is executing (Python 3.11+ instruction positions)."""
        code = frame.f_code
        if code not in self._positions:
            self._positions[code] = list(code.co_positions())
            self._fingerprints[code] = code_fingerprint(code)
        try:
            line, end_line, col, end_col = self._positions[code][frame.f_lasti // 2]
        except (IndexError, ValueError):
            return None
        if line is None or col is None or end_line is None or end_col is None:
            return None
        path = os.path.abspath(code.co_filename)
        fingerprint = self._fingerprints[code]
        return CodeSpan(
            path, line, col, end_line, end_col, code.co_qualname, code.co_firstlineno, fingerprint, _kwargs_keys(frame)
        )


def _kwargs_keys(frame: types.FrameType) -> tuple[str, ...]:
    code = frame.f_code
    if not code.co_flags & inspect.CO_VARKEYWORDS:
        return ()
    index = code.co_argcount + code.co_kwonlyargcount + (1 if code.co_flags & inspect.CO_VARARGS else 0)
    mapping = frame.f_locals.get(code.co_varnames[index])
    return tuple(str(key) for key in mapping) if isinstance(mapping, dict) else ()


def _record(module: nn.Module, codes: _CodeCache) -> None:
    """The user frames that built `module`: skipping torch and normswap, and the __init__ frames
    of the module itself (a subclass's super().__init__ chain)."""
    frame: types.FrameType | None = sys._getframe(2)
    calls: list[CodeSpan] = []
    while frame is not None and len(calls) < _MAX_FRAMES:
        if not _is_internal(frame.f_code.co_filename) and frame.f_locals.get("self") is not module:
            span = codes.span(frame)
            if span is not None:
                calls.append(span)
        frame = frame.f_back
    if calls:
        _CONSTRUCTIONS[module] = Construction(tuple(calls))
        _CONSTRUCTED[module] = _location(calls[0].path, calls[0].line)


@contextlib.contextmanager
def recording_construction() -> Iterator[None]:
    """Record where and how each BatchNorm-like module is built while building a model: the
    constructor call and the calls that led to it (for reports and `normswap lint --fix`).

    Example:
        with normswap.recording_construction():
            model = build_model()
    """
    global _recording_depth
    codes = _CodeCache()
    base = nn.modules.batchnorm._NormBase
    original_init = base.__init__

    @functools.wraps(original_init)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if isinstance(self, nn.modules.batchnorm._BatchNorm) and self not in _CONSTRUCTIONS:
            _record(self, codes)

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        # look-alikes (a class named *BatchNorm* that is not one) are placed where they are registered
        if child is not None and _looks_like_norm(child) and child not in _CONSTRUCTED:
            location = user_frame_location(skip=2)
            if location is not None:
                _CONSTRUCTED[child] = location

    handle = nn.modules.module.register_module_module_registration_hook(hook)
    if _recording_depth == 0:
        base.__init__ = recording_init  # type: ignore[method-assign]
    _recording_depth += 1
    try:
        yield
    finally:
        _recording_depth -= 1
        if _recording_depth == 0:
            base.__init__ = original_init  # type: ignore[method-assign]
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
            match = re.match(r"\s*self\.(\w+)\s*(?::[^=]*)?=(?!=)", text) or re.match(
                r"\s*self\.add_module\(\s*['\"](\w+)['\"]", text
            )
            if match:
                own.setdefault(match.group(1), (filename, start + offset))
        found.update(own)  # a subclass's assignment wins over its base's
    return found


def _attribute_assignment(cls: type, attribute: str) -> SourceLocation | None:
    hit = _assignments(cls).get(attribute)
    return _location(*hit) if hit else None
