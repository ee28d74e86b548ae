"""Healing's cost per step against a bare distillation step (CPU, median of interleaved runs).

The bare step is what any distillation loop does: the teacher's forward without gradients, the
student's forward and backward, the optimizer step. Healing's step adds what healing is: mixup of
two batches, the distillation loss over every output, the divergence check and the learning-rate
schedule. Both run on the same converted model, batch size and optimizer (healing's own Adam),
alternately, so that a machine slowing down in the middle moves both.

Also printed: a whole `heal()` run divided by its steps (held-out evaluations for early stopping,
keeping the best parameters and the set-up included), against the same number of bare steps.

python benchmarks/bench_heal_step.py [--resnet50]
"""

from __future__ import annotations

import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import normswap
from models import TorchvisionResNet
from nets import ResNet50, trained_statistics
from normswap.calibration.healing import _Distiller, trainable_parameters

WARMUP = 3


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one batch
    pairs: int  # interleaved bare / healing steps timed
    heal_steps: int  # for the whole-run figure


CASES = {
    "small": Case("torchvision-style ResNet (2 basic blocks)", TorchvisionResNet, (16, 3, 32, 32), 40, 60),
    "resnet50": Case("ResNet-50 layout, 10 classes", lambda: ResNet50(10), (8, 3, 32, 32), 12, 30),
}


@dataclass(frozen=True)
class Figures:
    bare: float  # seconds, median
    heal: float
    ratio: float  # median of the pairwise heal / bare ratios

    @property
    def overhead(self) -> float:
        return self.ratio - 1


def bare_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        target = teacher(x)
    loss = F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(target, 1), log_target=True, reduction="batchmean")
    loss.backward()
    optimizer.step()


def bare_steps(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], steps: int) -> None:
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.is_floating_point()], lr=1e-3)
    for i in range(steps):
        bare_step(student, teacher, optimizer, batches[i % len(batches)])


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def per_step(case: Case, original: nn.Module, converted: nn.Module, batches: list[torch.Tensor]) -> Figures:
    """One healing step (`_Distiller.step`) against one bare step, interleaved."""
    student = copy.deepcopy(converted).eval()
    options = normswap.HealOptions(steps=case.pairs + WARMUP)
    chosen = trainable_parameters(student, options.params, original)
    distiller = _Distiller(student, original, [(b,) for b in batches], options, chosen, case.pairs + WARMUP)
    bare, heal = [], []
    for i in range(case.pairs + WARMUP):
        b = timed(functools.partial(bare_step, student, original, distiller.optimizer, batches[i % len(batches)]))
        h = timed(functools.partial(distiller.step, i + 1))
        if i >= WARMUP:
            bare.append(b)
            heal.append(h)
    return Figures(
        statistics.median(bare),
        statistics.median(heal),
        statistics.median(h / b for b, h in zip(bare, heal, strict=True)),
    )


def whole_run(
    case: Case, original: nn.Module, converted: nn.Module, batches: list[torch.Tensor], rounds: int = 3
) -> Figures:
    """`heal()` from start to end divided by its steps, against as many bare steps."""
    bare, heal = [], []
    for _ in range(rounds):
        bare.append(
            timed(functools.partial(bare_steps, copy.deepcopy(converted).eval(), original, batches, case.heal_steps))
            / case.heal_steps
        )
        # patience: every run takes all its steps, so the division is by the steps taken
        run = functools.partial(
            normswap.heal,
            copy.deepcopy(converted),
            original,
            batches,
            steps=case.heal_steps,
            patience=10**6,
            progress=False,
        )
        heal.append(timed(run) / case.heal_steps)
    return Figures(
        statistics.median(bare),
        statistics.median(heal),
        statistics.median(h / b for b, h in zip(bare, heal, strict=True)),
    )


def main(names: tuple[str, ...] = ("small",)) -> dict[str, tuple[Figures, Figures]]:
    results = {}
    for key in names:
        case = CASES[key]
        torch.manual_seed(0)
        original = trained_statistics(case.build(), case.shape)
        converted = normswap.convert(original, torch.randn(case.shape), to="groupnorm").model
        batches = [torch.randn(case.shape) for _ in range(10)]  # 8 to train on, 2 held out
        step, run = per_step(case, original, converted, batches), whole_run(case, original, converted, batches)
        results[key] = (step, run)
        print(f"{case.name}, batch {tuple(case.shape)}, GroupNorm, all parameters trained:")
        print(
            f"  per step (median of {case.pairs}): bare {step.bare * 1000:8.2f} ms   healing {step.heal * 1000:8.2f} ms   overhead {step.overhead:+.1%}"
        )
        print(
            f"  whole heal() / {case.heal_steps} steps:  bare {run.bare * 1000:8.2f} ms   healing {run.heal * 1000:8.2f} ms   overhead {run.overhead:+.1%}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    print(f"CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    main(("small", "resnet50") if "--resnet50" in sys.argv else ("small",))
