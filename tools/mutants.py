"""Plant classic bugs in a copy of normswap, one at a time, run the tests about that behaviour,
and print which mutants the tests kill and which survive.

    python3 tools/mutants.py                 # every mutant (a few minutes on 2 cores)
    python3 tools/mutants.py eps-dropped     # one by name

A mutant is a textual edit of one source line (the edit must apply exactly once, or the script
says the mutant is stale). Each runs in its own copy of the repository, with `normswap` imported
from the copy, and reports how many tests fail and the first. Nothing in the working tree is changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    slow: bool = False  # the tests about it export or train (marked slow): run them anyway


MUTANTS = (
    Mutant(
        "layernorm-wrong-axes",  # normalize over (C, H, W) per sample instead of over C at each position
        "normswap/targets/layernorm.py",
        "return F.layer_norm(x.permute(to_last), shape, weight, bias, eps).permute(to_channels)",
        "return F.layer_norm(x.permute(to_last), tuple(x.permute(to_last).shape[1:]), None, None, eps).permute(to_channels)"
        " * (weight.reshape(1, -1, *[1] * (rank - 2)) if weight is not None else 1)"
        " + (bias.reshape(1, -1, *[1] * (rank - 2)) if bias is not None else 0)",
        ("tests/test_oracles.py", "tests/test_engine.py"),
    ),
    Mutant(
        "groups-forced-to-1",
        "normswap/targets/groupnorm.py",
        "new = nn.GroupNorm(params.num_groups, params.num_channels,",
        "new = nn.GroupNorm(1, params.num_channels,",
        ("tests/test_oracles.py", "tests/test_engine.py"),
    ),
    Mutant(
        "group-choice-one-group",
        "normswap/targets/groupnorm.py",
        "def choose_num_groups(\n",
        "def choose_num_groups(*args, **kwargs):\n    return 1, 'one group'\n\n\ndef _unused_choose_num_groups(\n",
        ("tests/test_engine.py", "tests/test_fix.py"),
    ),
    Mutant(
        "eps-dropped",
        "normswap/targets/base.py",
        'return {"eps": site.eps, "affine": site.affine}',
        'return {"eps": 1e-5, "affine": site.affine}',
        ("tests/test_oracles.py",),
    ),
    Mutant(
        "eps-not-written-in-source",
        "normswap/targets/base.py",
        'for name in ("eps", "affine", "device", "dtype")',
        'for name in ("affine", "device", "dtype")',
        ("tests/test_fix.py",),
    ),
    Mutant(
        "frozen-uses-batch-statistics",
        "normswap/targets/frozen.py",
        "return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)",
        "return F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.0, eps)",
        ("tests/test_oracles.py", "tests/test_engine.py"),
    ),
    Mutant(
        "fold-without-eps",
        "normswap/targets/fold.py",
        "scale = weight / torch.sqrt(var + eps)",
        "scale = weight / torch.sqrt(var)",
        ("tests/test_fold.py", "tests/test_oracles.py"),
    ),
    Mutant(
        "calibration-shift-without-mean",
        "normswap/calibration/stats.py",
        "shift = mean_y - scale * mean_z",
        "shift = mean_y",
        (
            "tests/test_oracles.py::test_calibration_is_the_least_squares_fit_at_every_site",
            "tests/test_calibrate.py::test_functional_sites_are_calibrated",
        ),
        slow=True,
    ),
    Mutant(
        "validation-always-passes",
        "normswap/export/validate.py",
        "return self.fidelity_passed and self.residual_passed and self.independence_passed",
        "return True",
        (
            "tests/test_onnx.py::test_tampered_initializer_fails_with_a_per_output_message",
            "tests/test_onnx.py::test_batch_dependent_model_is_reported",
        ),
        slow=True,
    ),
    Mutant(
        "checkpoint-weights-only-false",
        "normswap/checkpoint.py",
        'return torch.load(str(path), map_location="cpu", weights_only=not trust)',
        'return torch.load(str(path), map_location="cpu", weights_only=False)',
        ("tests/test_convert_cli.py",),
    ),
    Mutant(
        "small-batch-threshold-off-by-one",
        "normswap/rules/ns103_small_batch.py",
        "if context.batch_size >= context.small_batch_threshold:",
        "if context.batch_size > context.small_batch_threshold:",
        ("tests/test_rules.py",),
    ),
    Mutant(
        "batch-of-one-off-by-one",
        "normswap/rules/ns104_batch_of_one.py",
        "if not context.trains or context.batch_size != 1:",
        "if not context.trains or context.batch_size > 2:",
        ("tests/test_rules.py",),
    ),
)


def _copy(destination: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", "*.onnx", ".ci", "normswap-quickstart", "*.egg-info", ".mypy_cache", ".ruff_cache"
    )
    shutil.copytree(REPO, destination, ignore=ignore)
    shutil.copytree(REPO / "passes", destination / "normswap" / "passes", ignore=ignore)  # installed as normswap.passes


def run(mutant: Mutant) -> tuple[str, str, float]:
    """('killed' | 'SURVIVED' | 'stale', the first failing test or why, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as folder:
        copy = Path(folder) / "repo"
        _copy(copy)
        target = copy / mutant.path
        text = target.read_text(encoding="utf-8")
        if text.count(mutant.old) != 1:
            return "stale", f"the edit matches {text.count(mutant.old)} times in {mutant.path}", 0.0
        target.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
        if mutant.path.startswith("passes/"):
            (copy / "normswap" / mutant.path).write_text(target.read_text(encoding="utf-8"), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *([] if mutant.slow else ["-m", "not slow"]),
            *mutant.tests,
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - start
        failed = [
            line.split(" ", 1)[1].split(" - ")[0]
            for line in result.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ]
        if result.returncode == 0:
            return "SURVIVED", f"{len(mutant.tests)} test selection(s) passed", seconds
        if not failed:
            return (
                "ERROR",
                f"pytest exit {result.returncode} without a failing test: {result.stdout.strip().splitlines()[-1:]}",
                seconds,
            )
        return "killed", f"{len(failed)} failing, e.g. {failed[0]}", seconds


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if names and len(chosen) != len(names):
        known = ", ".join(m.name for m in MUTANTS)
        print(f"unknown mutant in {names}; known: {known}", file=sys.stderr)
        return 2
    survivors = 0
    print(f"{'mutant':<36} {'verdict':<9} {'time':>6}  first failing test")
    for mutant in chosen:
        verdict, detail, seconds = run(mutant)
        survivors += verdict != "killed"
        print(f"{mutant.name:<36} {verdict:<9} {seconds:>5.0f}s  {detail}", flush=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
