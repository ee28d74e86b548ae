"""The one console normswap draws progress on: standard error, shared by the CLI's step spinner
and healing's progress bar. Two consoles on one terminal overwrite each other's line; on one
console rich nests the bar under the spinner, and --quiet silences both."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from rich.console import Console


@functools.cache
def stderr_console() -> Console:
    # file=None: rich reads sys.stderr at each write, so a redirected or captured stderr is followed
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def silenced(console: Console, quiet: bool = True) -> Iterator[None]:
    """Nothing drawn on `console` inside the block when `quiet`; its own setting restored after."""
    before = console.quiet
    console.quiet = before or quiet
    try:
        yield
    finally:
        console.quiet = before
