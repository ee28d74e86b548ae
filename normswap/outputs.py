"""The output set of one `normswap convert` run, and reading it back.

Outputs are written to a staging directory beside DIR, which is locked against a concurrent run.
At the end they replace normswap's files in DIR as a set: the old manifest (report.json) goes
first, then stale files of an earlier run, then the new files, and the new manifest last. At any
moment DIR holds either no manifest or a manifest that matches every file, and
`load_converted` reads nothing else. Inputs are never written: an output slot that is the same
file as an input (a symbolic or hard link) is refused. SIGINT and SIGTERM remove the staging
directory before the process ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import OutputError

MANIFEST = "report.json"  # its report's "manifest" entry lists every other output with its sha256
OUTPUT_NAMES = (
    "model.safetensors",
    "model.pt",
    "plan.json",
    "model.onnx",
    "model.onnx.data",
    "report.md",
    "attribution.png",
    MANIFEST,
)


class Interrupted(BaseException):
    """A termination signal arrived during a run (a BaseException, like KeyboardInterrupt, so that
    no `except Exception` swallows it; clean-up code runs on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def check_output_dir(out_dir: Path, inputs: Sequence[Path | None], force: bool) -> None:
    """Refuse outputs that would lose anything: a file in the way, a dangling symbolic link,
    existing files without --force, or an output slot that is one of the inputs."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputError(
            f"Output '{out_dir}' is a symbolic link to '{os.readlink(out_dir)}', which does not exist; create it or choose another --out."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path '{out_dir}' is a file; give a directory for --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputError(
            f"Output directory '{out_dir}' already has files; pass --force to replace normswap's outputs in it."
        )
    for name in OUTPUT_NAMES:
        slot = out_dir / name
        if slot.exists() and not slot.is_file():
            raise OutputError(
                f"Output directory '{out_dir}' has a directory (or other non-file) named '{name}' where normswap writes its file; move it away or choose another --out."
            )
    for given in inputs:
        if given is None or not given.exists():
            continue
        for name in OUTPUT_NAMES:
            slot = out_dir / name
            if slot.exists() and os.path.samefile(given, slot):
                raise OutputError(
                    f"Output directory '{out_dir}' would replace '{name}', which is the input '{given}'; choose another --out."
                )
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"Cannot create '{out_dir}': directory '{parent}' does not exist.")
    if not os.access(parent if not out_dir.exists() else out_dir, os.W_OK):
        raise OutputError(f"Output directory '{out_dir}' is not writable; choose another --out.")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path, exclude: str = MANIFEST) -> dict[str, str]:
    """name -> sha256 of every file in `folder` but the manifest itself, by name."""
    return {item.name: sha256(item) for item in sorted(folder.iterdir()) if item.is_file() and item.name != exclude}


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on DIR for the whole run (a lock file beside it: DIR may not exist yet)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not serialized
        yield
        return
    resolved = out_dir.resolve()  # two symbolic links to one directory share one lock
    path = resolved.parent / f".{resolved.name}.normswap.lock"
    try:
        handle = path.open("a+")
    except OSError as exc:
        raise OutputError(f"Cannot write next to '{out_dir}': {exc.strerror}; choose a writable --out.") from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(
                f"Output directory '{out_dir}' is being written by another normswap run ({holder}); wait for it or choose another --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding it: a waiting run sees no stale lock
    finally:
        handle.close()


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted (SIGINT already raises KeyboardInterrupt), so
    clean-up runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> Any:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in _TERMINATING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def output_set(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Lock DIR and yield a staging directory beside it; on success its files replace normswap's
    files in DIR as a set (see the module docstring), on failure or a signal nothing changes."""
    with _interruptible(), _lock(out_dir):
        parent = out_dir.resolve().parent
        for stale in parent.glob(f".{out_dir.resolve().name}.normswap-*"):  # a killed run's staging (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if not force and out_dir.is_dir() and any(out_dir.iterdir()):  # filled since the first check
            raise OutputError(
                f"Output directory '{out_dir}' already has files; pass --force to replace normswap's outputs in it."
            )
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.normswap-", dir=parent))
        except OSError as exc:
            raise OutputError(f"Cannot write next to '{out_dir}': {exc.strerror}; choose a writable --out.") from exc
        try:
            yield staging
            _commit(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _listed(out_dir: Path) -> set[str]:
    """The outputs an earlier run's manifest lists (none when there is no readable manifest)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))["reports"][0]["manifest"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return set()
    return {name for name in manifest if name in OUTPUT_NAMES} if isinstance(manifest, dict) else set()


def _commit(staging: Path, out_dir: Path) -> None:
    out_dir.mkdir(exist_ok=True)
    new = {item.name for item in staging.iterdir()}
    stale = [name for name in OUTPUT_NAMES if name not in new and name != MANIFEST and (out_dir / name).is_file()]
    unknown = [name for name in stale if name not in _listed(out_dir)]
    if unknown:  # not ours to delete, and left beside the new set it would look like part of it
        raise OutputError(
            f"'{out_dir / unknown[0]}' is not from an earlier normswap run (no manifest lists it) and this run does not write it; "
            "move it away or choose another --out."
        )
    umask = os.umask(0)
    os.umask(umask)
    for item in staging.iterdir():  # temporary files are private (0600): give them the usual mode
        item.chmod(0o666 & ~umask)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here until the end DIR has no manifest: nothing reads it
    for name in stale:
        (out_dir / name).unlink()  # an earlier run's file this run does not replace
    for name in sorted(new - {MANIFEST}):
        os.replace(staging / name, out_dir / name)  # same filesystem: atomic per file
    os.replace(staging / MANIFEST, out_dir / MANIFEST)  # the manifest last: the set is complete


def verified_outputs(out_dir: Path) -> dict[str, Path]:
    """The files of a `normswap convert` output directory, checked against its manifest.

    Raises:
        OutputError: no manifest, a listed file missing or changed, or a normswap output the
            manifest does not list (left from another run).
    """
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise OutputError(
            f"'{out_dir}' has no {MANIFEST}; point to a directory written by `normswap convert` (or convert again)."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))["reports"][0]["manifest"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        manifest = None
    if not isinstance(manifest, dict):
        raise OutputError(f"'{manifest_path}' has no manifest of the outputs; convert again with a current normswap.")
    foreign = [name for name in manifest if name not in OUTPUT_NAMES]
    if foreign:
        raise OutputError(f"'{manifest_path}' lists '{foreign[0]}', which is not a normswap output; convert again.")
    for name, digest in manifest.items():
        path = out_dir / name
        if not path.is_file():
            raise OutputError(f"'{out_dir}' lacks '{name}', which its manifest lists; convert again.")
        if sha256(path) != digest:
            raise OutputError(
                f"'{path}' is not the file its manifest ({MANIFEST}) lists: it changed after the run; convert again."
            )
    strays = [name for name in OUTPUT_NAMES if name != MANIFEST and name not in manifest and (out_dir / name).exists()]
    if strays:
        raise OutputError(
            f"'{out_dir}' holds {', '.join(strays)}, which its manifest does not list (left from another run); convert again with --force."
        )
    return {name: out_dir / name for name in manifest}
