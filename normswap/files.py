"""Atomic file writes: a temporary file in the same directory, then rename; never a partial file."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on failure
    removed. A symbolic link at `path` is followed: the file it points to is replaced."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"Output '{target}' is a directory; give a file path.")
    if not folder.is_dir():
        raise OutputError(f"Cannot write '{target}': directory '{folder}' does not exist.")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"Cannot write to '{folder}': {exc.strerror}; choose a writable location.") from exc
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        if temporary_path.exists():  # mkstemp's file is private (0600): give it the mode a new file would have
            os.chmod(temporary_path, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask())
        os.replace(temporary_path, target)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overwriting(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "--output"
) -> None:
    """OutputError when `output` is (or links to) one of the files the run reads."""
    target = Path(output)
    if not target.exists():
        return
    for given in inputs:
        if given is not None and Path(given).exists() and os.path.samefile(target, given):
            raise OutputError(
                f"{option} '{output}' is '{given}', which this run reads; write the report to another file."
            )


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Atomically write `path` with `writer(temporary_path)`."""
    with atomic_path(path) as temporary:
        writer(temporary)
    return Path(path)
