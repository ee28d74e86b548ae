"""Refresh the lock files the two test tiers install through (requirements/fast.txt, ecosystem.txt).

    python3 tools/lock.py            # every locked package to the newest release the index serves
    python3 tools/lock.py --keep     # only what pyproject.toml's ranges no longer admit

Each tier's lock is pip-compile's resolution of pyproject.toml's extras plus the tier's torch pins
(requirements/<tier>.in). pip resolves it, so it sees what these machines' pip sees: the torch
builds on local disk (the CPU build 2.13.0 for the fast tier) and the package index. The users'
runtime ranges stay in pyproject.toml; the locks only make the tests reproducible. After a refresh,
run the README's test command: what newer versions break is fixed in the same commit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# tier -> the pyproject.toml extras it installs
TIERS = {"fast": ("test",), "ecosystem": ("test", "ecosystem")}


def compile_lock(tier: str, extras: tuple[str, ...], upgrade: bool) -> None:
    command = [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        "--strip-extras",  # a constraints file cannot name extras
        "--no-emit-index-url",
        "--no-emit-find-links",
        *(f"--extra={extra}" for extra in extras),
        f"--output-file=requirements/{tier}.txt",
        "pyproject.toml",
        f"requirements/{tier}.in",
    ]
    if upgrade:
        command.insert(4, "--upgrade")
    # the lock's header names the command that refreshes it, not pip-compile's own line
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "python3 tools/lock.py"}
    print(f"locking the {tier} tier: requirements/{tier}.txt", flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep locked versions that still fit the ranges")
    args = parser.parse_args()
    try:
        import piptools  # noqa: F401 - installed by the test extra
    except ImportError:
        print("tools/lock.py needs pip-tools: python3 -m pip install -e '.[test]'", file=sys.stderr)
        return 2
    for tier, extras in TIERS.items():
        compile_lock(tier, extras, upgrade=not args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
