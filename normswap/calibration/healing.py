"""Heal: a short label-free distillation of the converted model toward the original's outputs.

Loss: KL(softmax(original) || softmax(converted)) for (N, K) class scores, MSE otherwise, on
random mixtures of two calibration batches labelled by the original (mixup). Adam with a cosine
schedule; early stopping on a held-out part of the data, keeping the best parameters. Under torchrun (WORLD_SIZE > 1) it runs data-parallel
with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import targets
from ..errors import CalibrationError, ConfigError
from ..terminal import stderr_console
from ..torchutil import flat_outputs, preserved, require_module, require_type
from .data import check_batches, check_model_accepts
from .device import device_of, placed, resolve_device, to_device
from .options import HealOptions

log = logging.getLogger(__name__)


@dataclass
class HealResult:
    """What healing did. `model` is the healed model: the converted model it was given,
    modified in place and holding the parameters with the best held-out loss."""

    model: nn.Module
    steps: int
    best_heldout_loss: float
    initial_heldout_loss: float
    stopped_early: bool
    options: HealOptions | None = None  # the settings it ran with


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """KL on (N, K) class scores, MSE on other outputs; outputs whose shapes differ (a length the
    model's own predictions decide) cannot be matched element by element and are left out."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape or not s.is_floating_point():
            continue
        if s.dim() == 2 and s.shape[1] > 1:  # class scores
            total = total + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
        else:
            total = total + F.mse_loss(s, t)
    return total


def norm_parameters(converted: nn.Module, original: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of the calibrated normalizations the conversion introduced: modules
    a target recognizes as its own where the original model has a BatchNorm."""
    originals = dict(original.named_modules())
    chosen = []
    for name, module in converted.named_modules():
        found = targets.recognize(module) if isinstance(originals.get(name), _BatchNorm) else None
        if found is not None and found[0].calibrated:
            chosen += found[0].affine_parameters(module)
    return list(dict.fromkeys(chosen))


def trainable_parameters(model: nn.Module, params: str, original: nn.Module) -> list[nn.Parameter]:
    if params == "all":
        chosen = [p for p in model.parameters() if p.is_floating_point()]
    else:
        chosen = norm_parameters(model, original)
    if not chosen:
        raise CalibrationError("The converted model has no normalization parameters to heal; use params='all'.")
    return chosen


def heal(
    converted: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    options: HealOptions | None = None,
    *,
    device: str | torch.device | None = "auto",
    progress: bool | None = None,
    **settings: Any,
) -> HealResult:
    """Distill `converted` toward `original` on unlabeled `batches` (modified in place).

    Args:
        options: the healing settings (default: `HealOptions()`); keyword `settings`
            (steps=, lr=, params=, seed=, ...) override single fields.
        device: where to run ("auto": this process's GPU when there is one, else the CPU); both
            models return to their own devices afterwards.
        progress: show a progress bar (default: on a terminal).

    Returns:
        HealResult; `.model` is `converted`, holding the parameters with the best held-out loss.
    """
    require_module(converted, "heal")
    require_module(original, "heal")
    require_type(options, HealOptions, "options", "heal", "pass normswap.HealOptions(steps=..., lr=...)")
    options = (options or HealOptions()).replace(**settings)
    batches = check_batches(batches)
    held = max(1, int(len(batches) * options.heldout_fraction)) if len(batches) > 1 and options.heldout_fraction else 0
    train, heldout = batches[: len(batches) - held] or batches, batches[len(batches) - held :] or batches
    steps = options.resolved_steps(len(train))
    where = resolve_device(device)
    with placed(where, converted, original), preserved(original):
        check_model_accepts(original, batches)
        result = _heal(
            converted,
            original,
            [to_device(b, where) for b in train],
            [to_device(b, where) for b in heldout],
            options,
            steps,
            progress,
        )
    log.info(
        "healed %d step(s): held-out loss %.4g -> %.4g%s",
        result.steps,
        result.initial_heldout_loss,
        result.best_heldout_loss,
        " (stopped early)" if result.stopped_early else "",
    )
    return result


def _heal(
    converted: nn.Module,
    original: nn.Module,
    train: list[tuple],
    heldout: list[tuple],
    options: HealOptions,
    steps: int,
    progress: bool | None,
) -> HealResult:
    world = world_size()
    with _only_trainable(converted, trainable_parameters(converted, options.params, original)) as chosen:
        model = converted
        if world > 1:  # after choosing parameters: DDP registers the ones that require grad
            model = _distributed(converted)
            rank = torch.distributed.get_rank()
            train = train[rank::world] or train
        distiller = _Distiller(model, original, train, options, chosen, steps)
        judge = _HeldOut(converted, original, heldout)
        converted.eval()  # statistics and dropout fixed: only the chosen parameters move
        stopping = _EarlyStopping(converted, judge(), options.patience)
        eval_every = options.resolved_eval_every(steps)
        console = stderr_console()
        show = progress if progress is not None else (console.is_terminal and not console.quiet and world == 1)
        with _progress_bar(show, console) as bar:
            task = bar.add_task("heal", total=steps, drift=f"held-out loss {stopping.initial:.4g}")
            step = 0
            for step in range(1, steps + 1):
                distiller.step(step)
                if step % eval_every == 0 or step == steps:
                    current = judge()
                    bar.update(task, advance=0, drift=f"held-out loss {current:.4g}")
                    if stopping.stop(current):
                        break
                bar.update(task, advance=1)
        converted.load_state_dict(stopping.best_state)
    return HealResult(converted, step, stopping.best, stopping.initial, stopping.stopped, options)


@contextlib.contextmanager
def _only_trainable(model: nn.Module, chosen: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Only `chosen` require gradients inside the block; every flag is restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    try:
        yield chosen
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


class _Distiller:
    """One optimisation step of the student toward the teacher's outputs on a training batch (or
    on a mixture of two, labelled by the teacher)."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        train: list[tuple],
        options: HealOptions,
        chosen: list[nn.Parameter],
        steps: int,
    ) -> None:
        self.model, self.teacher, self.train, self.options = model, teacher, train, options
        self.generator = torch.Generator().manual_seed(options.seed)
        self.optimizer = torch.optim.Adam(chosen, lr=options.lr)
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
            if options.schedule == "cosine"
            else None
        )
        teacher.eval()
        self.targets = [] if options.mixup else [_teacher_outputs(teacher, b) for b in train]

    def step(self, step: int) -> None:
        pick = int(torch.randint(len(self.train), (1,), generator=self.generator))
        self.optimizer.zero_grad(set_to_none=True)
        if self.options.mixup:
            # distil on mixtures of two batches, labelled by the original: more distinct inputs
            # than the calibration data holds (what reaches the original's accuracy on tabular data)
            other = int(torch.randint(len(self.train), (1,), generator=self.generator))
            inputs = mixed(self.train[pick], self.train[other], self.generator)
            target = _teacher_outputs(self.teacher, inputs)
        else:
            inputs, target = self.train[pick], self.targets[pick]
        loss = distillation_loss(flat_outputs(self.model(*inputs)), target)
        if not torch.isfinite(loss):
            raise CalibrationError(
                f"Healing diverged at step {step} (loss {float(loss.detach())}); lower the learning rate (now {self.options.lr:g})."
            )
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def _teacher_outputs(teacher: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in flat_outputs(teacher(*inputs))]


class _HeldOut:
    """The distillation loss on the held-out batches (the teacher's outputs computed once)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, heldout: list[tuple]) -> None:
        self.student, self.heldout = student, heldout
        teacher.eval()
        self.targets = [_teacher_outputs(teacher, b) for b in heldout]

    def __call__(self) -> float:
        with torch.no_grad():
            losses = [
                float(distillation_loss(flat_outputs(self.student(*b)), t))
                for b, t in zip(self.heldout, self.targets, strict=True)
            ]
        return sum(losses) / len(losses)


class _EarlyStopping:
    """Keeps the parameters with the best held-out loss; says stop after `patience` evaluations
    without improvement."""

    def __init__(self, model: nn.Module, initial: float, patience: int) -> None:
        self.model, self.patience = model, patience
        self.initial = self.best = initial
        self.best_state = self._state()
        self.bad, self.stopped = 0, False

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def stop(self, loss: float) -> bool:
        if loss < self.best - 1e-12:
            self.best, self.bad = loss, 0
            self.best_state = self._state()
            return False
        self.bad += 1
        self.stopped = self.bad >= self.patience
        return self.stopped


class _StepsPerSecond(ProgressColumn):
    """'12.3 steps/s' once rich has measured the speed."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} steps/s" if task.speed is not None else "")


def _progress_bar(show: bool, console: Console) -> Progress:
    """Steps done of all, steps per second, the held-out loss and the time left, drawn on
    `console` (normswap's standard-error console: where the terminal check looks, and where a
    spinner the bar nests under draws). Its task needs a `drift` field."""
    columns = (
        TextColumn("heal"),
        BarColumn(),
        MofNCompleteColumn(),
        _StepsPerSecond(),
        TextColumn("{task.fields[drift]}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, disable=not show, transient=True)


def world_size() -> int:
    """The data-parallel world healing runs in: WORLD_SIZE as torchrun sets it (1 without).

    Raises:
        ConfigError: WORLD_SIZE is not a positive integer, or is above 1 in a process no launcher
            started (RANK, MASTER_ADDR or MASTER_PORT missing).
    """
    import torch.distributed as dist

    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(
            f"WORLD_SIZE={raw!r} in the environment is not a positive integer; unset it or run under torchrun."
        )
    world = int(raw)
    launched = all(os.environ.get(name) for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
    if world > 1 and not launched and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"WORLD_SIZE={world} is set but no launcher started this process (RANK, MASTER_ADDR or MASTER_PORT is missing); "
            "run under torchrun, or unset WORLD_SIZE to heal on one device."
        )
    return world


def _distributed(model: nn.Module) -> nn.Module:
    """Wrap in DistributedDataParallel, initializing the process group from torchrun's environment."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    where = device_of(model)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    device_ids = [where.index] if where.type == "cuda" else None  # each rank its own local GPU
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def mixed(a: tuple, b: tuple, generator: torch.Generator) -> tuple:
    """Per sample, a random convex combination of two batches' floating inputs (others: a's)."""
    out: list[Any] = []
    for x, y in zip(a, b, strict=True):
        if (
            isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and isinstance(y, torch.Tensor)
            and y.shape[1:] == x.shape[1:]
        ):
            n = min(len(x), len(y))
            weight = torch.rand((n,) + (1,) * (x.dim() - 1), generator=generator).to(x)
            out.append(weight * x[:n] + (1 - weight) * y[:n])
        else:
            out.append(x)
    if len({len(x) for x in out if isinstance(x, torch.Tensor) and x.dim()}) > 1:
        return a  # batches of unequal size and inputs mixed unevenly: keep the batch as it is
    return tuple(out)
