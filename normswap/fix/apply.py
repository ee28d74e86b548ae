"""A file before and after its fixes: the unified diff, whole-line hunks (what a review
suggestion replaces), and the atomic write that keeps the file's mode and refuses a file that
changed since it was read."""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_path
from ..source import relative_path
from .source_file import FixError, physical_lines


@dataclass(frozen=True)
class Hunk:
    """Whole lines `start`..`end` (1-based, inclusive; end = start - 1 for an insertion before
    `start`) replaced by `text` (complete lines)."""

    start: int
    end: int
    old: str
    text: str

    def covering(self, before: str) -> Hunk:
        """The same change as a replacement of at least one whole line (a review suggestion
        cannot insert between lines): an insertion takes the line above it (or below, at the
        top of the file) along."""
        if self.end >= self.start:
            return self
        lines = physical_lines(before)
        if self.start > 1:
            above = lines[self.start - 2]
            return Hunk(self.start - 1, self.start - 1, above, above + self.text)
        below = lines[0] if lines else ""
        return Hunk(1, 1, below, self.text + below)


@dataclass
class FileFix:
    """One file before and after its fixes."""

    path: Path
    before: str
    after: str
    relative: str = ""  # the path shown, relative to the project root

    def __post_init__(self) -> None:
        self.relative = self.relative or relative_path(str(self.path))

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        """A unified diff; a last line without a newline is marked as `diff` marks it, so that no
        two lines run together and the diff ends in a newline."""
        name = self.relative
        lines = difflib.unified_diff(physical_lines(self.before), physical_lines(self.after), f"a/{name}", f"b/{name}")
        return "".join(
            line if line.endswith(("\n", "\r")) else f"{line}\n\\ No newline at end of file\n" for line in lines
        )

    def hunks(self) -> list[Hunk]:
        old, new = physical_lines(self.before), physical_lines(self.after)
        found = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
            if tag != "equal":
                found.append(Hunk(i1 + 1, i2, "".join(old[i1:i2]), "".join(new[j1:j2])))
        return found


def check_writable(paths: Sequence[Path]) -> None:
    """Refuse, before anything is written, files without write permission (even for root)."""
    for path in paths:
        mode = path.stat().st_mode
        if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(path, os.W_OK):
            raise FixError(
                f"'{relative_path(str(path))}' is read-only, so nothing was fixed; make it writable and run again."
            )


def write(fix: FileFix) -> None:
    """Write `fix.after` atomically, keeping the file's permissions; refuse a file that changed
    since it was read."""
    current = fix.path.read_bytes().decode("utf-8", errors="replace")
    if current != fix.before:
        raise FixError(f"'{fix.relative}' changed while it was being fixed; nothing more was written, run again.")
    mode = stat.S_IMODE(fix.path.stat().st_mode)
    with atomic_path(fix.path) as temporary:
        temporary.write_bytes(fix.after.encode("utf-8"))
        os.chmod(temporary, mode)
