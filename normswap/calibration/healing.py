"""Heal: a label-free distillation of the converted model toward the original, streamed from the
user's data and judged by top-1 agreement with the original on held-out samples.

Loss: KL(softmax(original) || softmax(converted)) on (N, K) class scores, or the MSE between their
logits (HealOptions.loss); MSE on other outputs; optionally feature hints (hints.py: every
converted site's output matched to the original BatchNorm's); on
mixtures of two consecutive batches labelled by the original (mixup). Adam, a short warm-up, then
cosine decay over the planned steps or the time budget, whichever ends first. Every few steps the
held-out score is measured; healing keeps the best parameters and stops when it stops improving,
when the budget or the planned steps run out. Under torchrun (WORLD_SIZE > 1) the data is sharded
across ranks and healing runs data-parallel with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import targets
from ..errors import CalibrationError, ConfigError
from ..passes.rewrite_functional import TARGET_META
from ..terminal import stderr_console
from ..torchutil import flat_outputs, preserved, require_module, require_type
from .data import check_model_accepts
from .device import device_of, placed, resolve_device, to_device
from .heldout import HeldOut, HeldOutScore, distillation_loss, teacher_outputs
from .hints import Hints
from .options import HealOptions
from .stream import InputBatches, batch_length, input_batches, model_inputs

log = logging.getLogger(__name__)

WARMUP = 0.02  # of the planned steps, at least one step: Adam's first steps are its largest
# the trained weights move less than the new layers; a trained network's weights moved at 1e-3 lose
# more than healing gains (ResNet-20 from its eps-calibrated start: README)
WEIGHTS_LR_SCALE = 1 / 3


@dataclass(frozen=True)
class HealPoint:
    """The held-out score after `step` steps, `images` training samples and `seconds`."""

    step: int
    images: int
    seconds: float
    score: HeldOutScore


@dataclass
class HealResult:
    """What healing did. `model` is the healed model: the converted model it was given,
    modified in place and holding the parameters with the best held-out score."""

    model: nn.Module
    steps: int
    initial: HeldOutScore
    best: HeldOutScore
    stopped: str  # why it stopped: "plateau", "budget", "steps"
    images: int = 0  # training samples seen, mixtures counted once
    seconds: float = 0.0
    heldout_samples: int = 0
    curve: list[HealPoint] = field(default_factory=list)
    options: HealOptions | None = None  # the settings it ran with

    @property
    def best_heldout_loss(self) -> float:
        return self.best.loss

    @property
    def initial_heldout_loss(self) -> float:
        return self.initial.loss

    @property
    def stopped_early(self) -> bool:
        return self.stopped == "plateau"

    @property
    def improved(self) -> bool:
        return self.best.better_than(self.initial)


def new_norm_sites(converted: nn.Module, original: nn.Module) -> list[list[nn.Parameter]]:
    """The affine parameters of each calibrated normalization the conversion introduced: a module
    a target recognizes as its own where the original model has a BatchNorm, or a functional
    batch_norm call the rewrite replaced (tagged in the graph; its weight and bias are the
    original attributes the call reads)."""
    originals = dict(original.named_modules())
    sites = []
    for name, module in converted.named_modules():
        recognized = targets.recognize(module) if isinstance(originals.get(name), _BatchNorm) else None
        if recognized is not None and recognized[0].calibrated:
            sites.append(list(recognized[0].affine_parameters(module)))
        if isinstance(module, fx.GraphModule):
            sites += _functional_sites(module)
    return sites


def _functional_sites(graph_module: fx.GraphModule) -> list[list[nn.Parameter]]:
    """The parameters each calibrated replacement call in the graph reads through get_attr."""
    parameters = dict(graph_module.named_parameters())
    sites = []
    for node in graph_module.graph.nodes:
        name = node.meta.get(TARGET_META)  # a target unregistered since the rewrite: not one to heal
        if name in targets.names() and targets.get(name).calibrated:
            read = [str(v.target) for v in node.all_input_nodes if v.op == "get_attr"]
            sites.append([parameters[t] for t in read if t in parameters])
    return sites


def norm_parameters(converted: nn.Module, original: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of the calibrated normalizations the conversion introduced."""
    return list(dict.fromkeys(p for site in new_norm_sites(converted, original) for p in site))


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
    data: Any,
    options: HealOptions | None = None,
    *,
    device: str | torch.device | None = "auto",
    progress: bool | None = None,
    inputs: int | None = None,
    **settings: Any,
) -> HealResult:
    """Distill `converted` toward `original` on unlabeled data (modified in place).

    Args:
        data: batches of inputs: a list, a DataLoader, a Dataset or one tensor of samples
            (normswap.calibration.stream.input_batches); batches that also hold labels are fine,
            the labels are ignored. Streamed: only the held-out part is held in memory.
        options: the healing settings (default: `HealOptions()`); keyword `settings`
            (steps=, budget=, lr=, params=, seed=, ...) override single fields.
        device: where to run ("auto": this process's GPU when there is one, else the CPU); both
            models return to their own devices afterwards.
        progress: show a progress bar (default: on a terminal).
        inputs: how many inputs the model takes (default: what forward requires); items of a
            batch after them are labels.

    Returns:
        HealResult; `.model` is `converted`, holding the parameters with the best held-out score.
    """
    require_module(converted, "heal")
    require_module(original, "heal")
    require_type(options, HealOptions, "options", "heal", "pass normswap.HealOptions(steps=..., lr=...)")
    options = (options or HealOptions()).replace(**settings)
    stream = input_batches(data, inputs=inputs if inputs is not None else model_inputs(original))
    split = stream.split(options.heldout_samples(stream.samples))
    where = resolve_device(device)
    with placed(where, converted, original), preserved(original):
        if split.heldout:  # read already
            check_model_accepts(original, split.heldout, first_index=split.heldout_from)
        else:
            check_model_accepts(original, split.train.head(1), first_index=split.train_from)
        result = heal_on(converted, original, split.train, split.heldout, options, where, progress)
    for note in stream.notes:
        log.info(note)
    return result


def heal_on(
    converted: nn.Module,
    original: nn.Module,
    train: InputBatches,
    heldout: list[tuple],
    options: HealOptions,
    where: torch.device,
    progress: bool | None = None,
) -> HealResult:
    """`heal` on data already split: trained on `train`, judged on `heldout` (both models on
    `where` already). Without held-out batches it is judged on the first training batches."""
    heldout = heldout or train.head(options.heldout_samples(None))
    result = _Healing(converted, original, train, [to_device(b, where) for b in heldout], options, where).run(progress)
    log.info(
        "healed %d step(s) in %.0f s, %d images: held-out %s -> %s (%s)",
        result.steps,
        result.seconds,
        result.images,
        _describe(result.initial),
        _describe(result.best),
        result.stopped,
    )
    return result


def _describe(score: HeldOutScore) -> str:
    if score.agreement is not None:
        return f"agreement {score.agreement:.1%}"
    return f"loss {score.loss:.4g}"


class _Healing:
    """One healing run: the training stream, the held-out judge, the clock and the schedule."""

    def __init__(
        self,
        converted: nn.Module,
        original: nn.Module,
        train: InputBatches,
        heldout: list[tuple],
        options: HealOptions,
        where: torch.device,
    ) -> None:
        self.converted, self.original, self.where = converted, original, where
        # the rate resolved once, so the schedule, the messages and the result all name the one used
        self.lr = options.resolved_lr(len(new_norm_sites(converted, original)))
        self.options = options.replace(lr=self.lr)
        self.world = world_size()
        self.train = train.sharded(_rank(), self.world) if self.world > 1 else train
        self.heldout = heldout
        samples = self.train.samples
        batch = batch_length(heldout[0]) if heldout else 1
        per_pass = math.ceil(samples / self.world / batch) if samples is not None else None
        self.planned = options.planned_steps(per_pass, batch * self.world)
        self.budget = options.budget * 60 if options.budget is not None else None

    def run(self, progress: bool | None) -> HealResult:
        options = self.options
        chosen = trainable_parameters(self.converted, options.params, self.original)
        with _only_trainable(self.converted, chosen):
            model = _distributed(self.converted) if self.world > 1 else self.converted  # DDP: after choosing
            judge = HeldOut(self.converted, self.original, self.heldout, options.loss)
            self.converted.eval()  # statistics and dropout fixed: only the chosen parameters move
            self.original.eval()
            hints = Hints(self.converted, self.original) if options.hints else None
            optimizer = torch.optim.Adam(_parameter_groups(chosen, self.converted, self.original), lr=self.lr)
            generator = torch.Generator().manual_seed(options.seed)
            start = time.monotonic()
            stopping = _EarlyStopping(self.converted, judge(), options.patience)
            curve = [HealPoint(0, 0, 0.0, stopping.initial)]
            eval_every = options.resolved_eval_every(self.planned)
            console = stderr_console()
            show = progress if progress is not None else (console.is_terminal and not console.quiet and self.world == 1)
            step = images = 0
            stopped = "steps"
            with _progress_bar(show, console) as bar:
                task = bar.add_task("heal", total=self.planned, score=_describe(stopping.initial), budget=self.budget)
                for batch in self._batches(generator):
                    step += 1
                    self._set_lr(optimizer, step, time.monotonic() - start)
                    images += batch_length(batch)
                    _step(model, self.original, batch, optimizer, hints, step, options)
                    elapsed = time.monotonic() - start
                    out_of_time = self.budget is not None and elapsed >= self.budget
                    last = step >= self.planned
                    if step % eval_every == 0 or last or out_of_time:
                        score = judge()
                        curve.append(HealPoint(step, images, elapsed, score))
                        if stopping.stop(score):
                            stopped = "plateau"
                            break
                        bar.update(task, score=_describe(score))
                    bar.update(task, advance=1)
                    if out_of_time:
                        stopped = "budget"
                        break
                    if last:
                        break
            self.converted.load_state_dict(stopping.best_state)
        return HealResult(
            self.converted,
            step,
            stopping.initial,
            stopping.best,
            stopped,
            images,
            time.monotonic() - start,
            judge.samples,
            curve,
            options,
        )

    def _batches(self, generator: torch.Generator) -> Iterator[tuple]:
        """Training batches on the device, pass after pass, mixed with the one before (mixup)."""
        previous: tuple | None = None
        while True:
            seen = False
            for batch in self.train:
                seen = True
                batch = to_device(batch, self.where)
                if self.options.mixup and previous is not None:
                    mixed_batch = mixed(batch, previous, generator)
                    previous = batch
                    batch = mixed_batch
                else:
                    previous = batch
                yield batch
            if not seen:
                raise CalibrationError("Healing data is empty after the held-out part; give more batches.")

    def _progress(self, step: int, elapsed: float) -> float:
        """How far along the schedule is: the larger of the steps and the budget fractions."""
        done = step / self.planned
        if self.budget is not None:
            done = max(done, elapsed / self.budget)
        return min(done, 1.0)

    def _set_lr(self, optimizer: torch.optim.Optimizer, step: int, elapsed: float) -> None:
        lr = self.lr
        warmup = max(1, int(WARMUP * self.planned))
        if step <= warmup:
            lr *= step / warmup
        elif self.options.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * self._progress(step, elapsed)))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]


def _parameter_groups(chosen: list[nn.Parameter], converted: nn.Module, original: nn.Module) -> list[dict[str, Any]]:
    """The new normalization layers' affine at the full rate; every other parameter (the
    pretrained network's weights, which already fit the data) at WEIGHTS_LR_SCALE of it."""
    new = set(norm_parameters(converted, original))
    groups = [
        {"params": [p for p in chosen if p in new], "scale": 1.0},
        {"params": [p for p in chosen if p not in new], "scale": WEIGHTS_LR_SCALE},
    ]
    return [group for group in groups if group["params"]]


def _minutes(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _step(
    model: nn.Module,
    teacher: nn.Module,
    inputs: tuple,
    optimizer: torch.optim.Optimizer,
    hints: Hints | None,
    step: int,
    options: HealOptions,
) -> None:
    """One optimisation step of the student toward the teacher's outputs (and hints) on `inputs`."""
    optimizer.zero_grad(set_to_none=True)
    # hints observe these two forward passes only, never the held-out judge's
    with hints.observing() if hints is not None else contextlib.nullcontext():
        target = teacher_outputs(teacher, inputs)
        outputs = flat_outputs(model(*inputs))
    loss = distillation_loss(outputs, target, options.loss)
    if hints is not None:
        hinted = hints.loss()
        if hinted is not None:
            loss = loss + hinted
    if not torch.isfinite(loss):
        raise CalibrationError(
            f"Healing diverged at step {step} (loss {float(loss.detach())}); lower the learning rate (now {options.lr:g})."
        )
    loss.backward()
    optimizer.step()


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


class _EarlyStopping:
    """Keeps the parameters with the best held-out score; says stop after `patience` evaluations
    without improvement."""

    def __init__(self, model: nn.Module, initial: HeldOutScore, patience: int) -> None:
        self.model, self.patience = model, patience
        self.initial = self.best = initial
        self.best_state = self._state()
        self.bad = 0

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def stop(self, score: HeldOutScore) -> bool:
        if score.better_than(self.best):
            self.best, self.bad = score, 0
            self.best_state = self._state()
            return False
        self.bad += 1
        return self.bad >= self.patience


class _TimeLeft(ProgressColumn):
    """'0:20 left': rich's estimate from the steps per second, or the budget's end if sooner (a
    task field `budget`, seconds, None for no budget)."""

    def render(self, task: Task) -> Text:
        left = [task.time_remaining] if task.time_remaining is not None else []
        budget = task.fields.get("budget")
        if budget is not None and task.elapsed is not None:
            left.append(budget - task.elapsed)
        return Text(f"{_minutes(min(left))} left" if left else "")


class _StepsPerSecond(ProgressColumn):
    """'12.3 steps/s' once rich has measured the speed."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} steps/s" if task.speed is not None else "")


def _progress_bar(show: bool, console: Console) -> Progress:
    """Steps done of all planned, steps per second, the held-out agreement (or loss) so far and the
    time left (planned steps or budget, whichever ends first), drawn on `console` (normswap's
    standard-error console: where the terminal check looks, and where a spinner the bar nests
    under draws). Its task needs a `score` field and may have a `budget` one (seconds)."""
    columns = (
        TextColumn("heal"),
        BarColumn(),
        MofNCompleteColumn(),
        _StepsPerSecond(),
        TextColumn("{task.fields[score]}"),
        _TimeLeft(),
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


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


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
