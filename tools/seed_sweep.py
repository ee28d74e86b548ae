"""Run the tests that train a model (marked `trained`) under several seeds and print, per test,
what it measured on each seed and whether it passed: evidence that what a test asserts holds on
any machine's trajectory, not one CPU's rounding.

    python3 tools/seed_sweep.py                      # seeds 0-4, every `trained` test
    python3 tools/seed_sweep.py --seeds 0-9 -k recurrent
    python3 tools/seed_sweep.py --markdown sweep.md  # also write the table as Markdown

A seed changes the generated data, the initial weights and the batch order (tests/seeds.py).
Tests report what they measured with pytest's `record_property`; this script reads them from
each run's JUnit XML. It exits non-zero when any test failed on any seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    passed: bool
    measured: dict[str, float] = field(default_factory=dict)
    message: str = ""


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7' (or a mix) as a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += range(int(low), int(high or low) + 1)
    return seeds


def run_seed(seed: int, selection: list[str], workdir: Path) -> dict[str, Outcome]:
    report = workdir / f"seed-{seed}.xml"
    env = {**os.environ, "NORMSWAP_TEST_SEED": str(seed)}
    command = [sys.executable, "-m", "pytest", "-m", "trained", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    subprocess.run([*command, *selection], cwd=REPO, env=env, check=False)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            continue
        measured = {p.get("name", ""): float(p.get("value", "nan")) for p in case.iter("property")}
        message = (failure.get("message") or "")[:200] if failure is not None else ""
        outcomes[name] = Outcome(failure is None, measured, message)
    return outcomes


def table(results: dict[int, dict[str, Outcome]]) -> str:
    """Markdown: one row per test and seed, then one summary row per test with each figure's range."""
    rows = ["| test | seed | result | measured |", "| --- | --- | --- | --- |"]
    by_test: dict[str, dict[int, Outcome]] = defaultdict(dict)
    for seed, outcomes in results.items():
        for name, outcome in outcomes.items():
            by_test[name][seed] = outcome
    for name in sorted(by_test):
        figures: dict[str, list[float]] = defaultdict(list)
        for seed, outcome in sorted(by_test[name].items()):
            shown = ", ".join(f"{key} {value:.4g}" for key, value in outcome.measured.items())
            result = "pass" if outcome.passed else f"FAIL: {outcome.message}"
            rows.append(f"| {name} | {seed} | {result} | {shown} |")
            for key, value in outcome.measured.items():
                figures[key].append(value)
        passed = sum(o.passed for o in by_test[name].values())
        ranges = ", ".join(f"{key} {min(v):.4g} to {max(v):.4g}" for key, v in figures.items())
        rows.append(f"| **{name}** | all | **{passed}/{len(by_test[name])} passed** | {ranges} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4", help="seeds to run: '0-4', '0,3,7' (default 0-4)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("selection", nargs="*", help="extra pytest arguments (-k EXPR, test files)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="normswap-seeds-") as tmp:
        results = {seed: run_seed(seed, args.selection, Path(tmp)) for seed in parse_seeds(args.seeds)}
    text = table(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    failed = any(not o.passed for outcomes in results.values() for o in outcomes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
