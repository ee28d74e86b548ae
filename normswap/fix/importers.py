"""The project's files that import a file a fix edits (a training script importing the model's
module): the code that selects its layers by class often lives there."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import libcst as cst

from .locate import Files
from .source_file import FixError, SourceFile

_SKIPPED_DIRECTORIES = {"node_modules", "__pycache__", "site-packages", "build", "dist"}
_MAX_FILES = 5000  # Python files looked at per run: a project, never a whole disk


def importers(files: Files, edited: Iterable[Path]) -> list[SourceFile]:
    """Project files (outside hidden folders and virtual environments) whose imports name one of
    the `edited` modules, absolutely or relatively, parsed."""
    modules = {_module_name(files.root, path): path for path in edited}
    if not modules:
        return []
    words = {name.rsplit(".", 1)[-1] for name in modules}
    mention = re.compile(r"^\s*(?:from|import)\s.*\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.M)
    found = []
    for path in _python_files(files.root):
        if path in modules.values():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not mention.search(text):
            continue
        try:
            source = files.get(str(path))
        except FixError:
            continue
        imported = _imported(source, _module_name(files.root, path))
        # `from modeling.deeplab import X` names project/modeling/deeplab.py and project/src/modeling/deeplab.py
        if any(module == name or module.endswith(f".{name}") for module in modules for name in imported):
            found.append(source)
    return found


def _python_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, directories, names in os.walk(root):
        directories[:] = sorted(
            d
            for d in directories
            if not d.startswith(".") and d not in _SKIPPED_DIRECTORIES and not (Path(folder, d) / "pyvenv.cfg").exists()
        )
        found += [Path(folder, name).resolve() for name in sorted(names) if name.endswith(".py")]
        if len(found) >= _MAX_FILES:
            break
    return found[:_MAX_FILES]


def _module_name(root: Path, path: Path) -> str:
    parts = list(Path(path).resolve().relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(source: SourceFile, own: str) -> set[str]:
    """Every module the file's imports name, relative ones resolved against its package; a
    `from package import module` names both."""
    package = own.split(".")[:-1]
    names: set[str] = set()
    for node in source.positions:
        if isinstance(node, cst.Import):
            names |= {source.code(alias.name) for alias in node.names}
        elif isinstance(node, cst.ImportFrom):
            dots = len(node.relative)
            base = package[: len(package) - dots + 1] if dots else []
            module = ".".join([*base, source.code(node.module)] if node.module is not None else base)
            names.add(module)
            if not isinstance(node.names, cst.ImportStar):
                names |= {f"{module}.{source.code(alias.name)}" for alias in node.names}
    return names
