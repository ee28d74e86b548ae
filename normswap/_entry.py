"""The `normswap` command's entry point: holds termination signals while torch and the engine
import, so that a Ctrl-C at start-up is handled by the CLI (exit 130, nothing written) instead of
landing inside torch's import machinery. Imports nothing heavy itself."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Block HELD in this thread (threads started meanwhile, such as torch's pools, inherit the
    block); a signal that arrives is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def main() -> None:
    with signals_held():
        from .cli import commands  # noqa: F401 - torch, onnx and the engine
        from .cli import main as cli
    cli(prog_name="normswap")
