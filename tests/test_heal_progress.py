"""Healing's progress bar: what it shows (steps per second, the time left), where it draws
(normswap's standard-error console, the one the CLI's step spinner uses) and that --quiet holds."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import normswap
from models import build, input_for
from normswap.calibration import healing
from normswap.pipeline import Steps
from normswap.terminal import stderr_console


class _Clock:
    """A settable time source: rich's speed and time-left estimates read it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)


@pytest.mark.parametrize(
    "budget,left",
    [(None, "0:20 left"), (12.0, "0:07 left"), (60.0, "0:20 left")],
    ids=["no-budget", "budget-ends-first", "steps-end-first"],
)
def test_progress_bar_shows_steps_per_second_agreement_and_the_time_left(budget: float | None, left: str) -> None:
    console, clock = _terminal(), _Clock()
    bar = healing._progress_bar(True, console)
    bar.get_time = clock  # before add_task: the task takes its clock from the bar
    task = bar.add_task("heal", total=100, score="agreement 91.3%", budget=budget)
    for _ in range(20):  # a step every 0.25 s (exact in binary): 4 steps/s, 80 steps left -> 20 s
        clock.now += 0.25
        bar.update(task, advance=1)
    console.print(bar.get_renderable())
    line = console.file.getvalue()
    assert "20/100" in line
    assert "4.0 steps/s" in line
    assert left in line  # the sooner of the steps left at this speed and the budget left (5 s elapsed)
    assert "agreement 91.3%" in line


@pytest.fixture
def mlp() -> tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build("mlp")
    batches = [torch.randn(16, 10) for _ in range(5)]
    converted = normswap.convert(model, input_for("mlp"), to="layernorm").model
    return converted, model, batches


def test_heal_draws_on_the_stderr_console_and_quiet_silences_it(mlp, monkeypatch) -> None:
    converted, model, batches = mlp
    console = _terminal()
    monkeypatch.setattr(healing, "stderr_console", lambda: console)
    normswap.heal(converted, model, batches, steps=6)  # progress=None: shown, the console being a terminal
    drawn = console.file.getvalue()
    assert "heal" in drawn and "steps/s" in drawn and "6/6" in drawn
    console.file = io.StringIO()
    console.quiet = True  # what --quiet sets for the step healing runs in
    normswap.heal(converted, model, batches, steps=6)
    assert console.file.getvalue() == ""


def test_a_quiet_step_silences_the_shared_console_for_its_duration() -> None:
    console = stderr_console()
    assert Steps(quiet=False).console is console  # the spinner and healing's bar share one console: the bar nests
    with Steps(quiet=True).step("calibrate and heal"):
        assert console.quiet
    assert not console.quiet
