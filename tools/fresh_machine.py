"""Run the README's two commands exactly as written, each in a brand-new virtual environment, on a
clean clone of HEAD: what a new user (and .ci/run) does on a fresh machine.

    python3 tools/fresh_machine.py                # both commands (about 15 minutes on 2 cores)
    python3 tools/fresh_machine.py --only 1       # the install-and-quickstart command alone
    python3 tools/fresh_machine.py --ecosystem    # then the ecosystem tier's command (README: Testing)
    python3 tools/fresh_machine.py --keep         # leave the clone and environments for a look

Only committed files take part (the clone is of HEAD): commit first. `python3` in each command is
the new environment's, so the command text runs unchanged. Exits non-zero when a command fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands(readme: str, section: str) -> list[str]:
    """The ```bash blocks of one `## section` of the README, in order."""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", readme, flags=re.DOTALL | re.MULTILINE)
    if match is None:
        raise SystemExit(f"the README has no '## {section}' section")
    return re.findall(r"```bash\n(.*?)\n```", match.group(1), flags=re.DOTALL)


def run_in_fresh_venv(command: str, clone: Path, venv: Path) -> tuple[int, float]:
    """Run `command` with bash in `clone`, where `python3` is a brand-new venv's interpreter."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    start = time.monotonic()
    result = subprocess.run(["bash", "-c", command], cwd=clone, env=env)
    return result.returncode, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, choices=(1, 2), help="run only the first or the second command")
    parser.add_argument("--ecosystem", action="store_true", help="also run the ecosystem tier's command")
    parser.add_argument("--keep", action="store_true", help="keep the clone and the environments")
    args = parser.parse_args()

    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    if dirty.strip():
        print("note: uncommitted changes are not part of this check (it clones HEAD)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="normswap-fresh-"))
    clone = workdir / "normswap"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)

    readme = (clone / "README.md").read_text(encoding="utf-8")
    two = readme_commands(readme, "Two commands")
    if len(two) != 2:
        raise SystemExit(f"the README's 'Two commands' section has {len(two)} bash blocks, not 2")
    jobs = [(f"command {index}", command) for index, command in enumerate(two, start=1)]
    if args.only:
        jobs = [jobs[args.only - 1]]
    if args.ecosystem:
        # it makes its own venv (.venv-ecosystem) with the system python3, as .ci/run does
        jobs.append(("ecosystem command", *readme_commands(readme, "Testing")))

    failed = []
    for label, command in jobs:
        print(f"\n=== {label}, in a new virtual environment:\n$ {command}\n", flush=True)
        code, seconds = run_in_fresh_venv(command, clone, workdir / f"venv-{label.replace(' ', '-')}")
        print(f"\n=== {label}: exit {code} after {seconds / 60:.1f} min", flush=True)
        if code != 0:
            failed.append(label)

    if args.keep:
        print(f"kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("fresh-machine check: " + (f"FAILED ({', '.join(failed)})" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
