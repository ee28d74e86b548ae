"""Heal: a short label-free distillation of the converted model toward the original's outputs.

Loss: KL(softmax(original) || softmax(converted)) for (N, K) class scores, MSE otherwise, on
random mixtures of two calibration batches labelled by the original (mixup). Adam with a cosine
schedule; early stopping on a held-out part of the data, keeping the best parameters. Under torchrun (WORLD_SIZE > 1) it runs data-parallel
with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from .. import targets
from ..errors import CalibrationError, ConfigError
from ..passes.rebase import TakenOver
from ..targets.layernorm import ChannelLayerNorm
from ..torchutil import preserved, require_module, require_type
from .data import check_batches, check_model_accepts
from .device import device_of, placed, resolve_device, to_device
from .drift import flat_outputs
from .options import HealOptions

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)


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

    def to_dict(self) -> dict[str, Any]:
        found = {k: v for k, v in self.__dict__.items() if k not in ("model", "options")}
        return {**found, "options": dataclasses.asdict(self.options) if self.options is not None else None}


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        if s.dim() == 2 and s.shape[1] > 1:  # class scores
            total = total + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
        else:
            total = total + F.mse_loss(s, t)
    return total


def _is_new_norm(module: nn.Module) -> bool:
    """A normalization the conversion introduced, with parameters healing may train."""
    if isinstance(module, TakenOver):
        return targets.get(module.normswap_target).calibrated
    return isinstance(module, _NORM_TYPES)


def trainable_parameters(model: nn.Module, params: str) -> list[nn.Parameter]:
    if params == "all":
        chosen = [p for p in model.parameters() if p.is_floating_point()]
    else:
        chosen = [p for m in model.modules() if _is_new_norm(m) for p in m.parameters(recurse=False)]
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
        result = _heal(converted, original, [to_device(b, where) for b in train], [to_device(b, where) for b in heldout], options, steps, progress)
    log.info(
        "healed %d step(s): held-out loss %.4g -> %.4g%s",
        result.steps,
        result.initial_heldout_loss,
        result.best_heldout_loss,
        " (stopped early)" if result.stopped_early else "",
    )
    return result


def _heal(
    converted: nn.Module, original: nn.Module, train: list[tuple], heldout: list[tuple], options: HealOptions, steps: int, progress: bool | None
) -> HealResult:
    world = world_size()
    generator = torch.Generator().manual_seed(options.seed)
    chosen = trainable_parameters(converted, options.params)
    flags = {p: p.requires_grad for p in converted.parameters()}
    for p in converted.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    model = converted
    if world > 1:  # after choosing parameters: DDP registers the ones that require grad
        model = _distributed(converted)
        rank = torch.distributed.get_rank()
        train = train[rank::world] or train
    optimizer = torch.optim.Adam(chosen, lr=options.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if options.schedule == "cosine" else None
    original.eval()
    with torch.no_grad():
        train_targets = [] if options.mixup else [[t.detach() for t in flat_outputs(original(*b))] for b in train]
        heldout_targets = [[t.detach() for t in flat_outputs(original(*b))] for b in heldout]

    def heldout_loss() -> float:
        with torch.no_grad():
            return sum(float(distillation_loss(flat_outputs(converted(*b)), t)) for b, t in zip(heldout, heldout_targets, strict=True)) / len(heldout)

    converted.eval()  # statistics and dropout fixed: only the chosen parameters move
    best = initial = heldout_loss()
    best_state = {k: v.detach().clone() for k, v in converted.state_dict().items()}
    bad, stopped, step = 0, False, 0
    eval_every = options.resolved_eval_every(steps)
    show = progress if progress is not None else (os.isatty(2) and world == 1)
    columns = (
        TextColumn("heal"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[drift]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show, transient=True) as bar:
        task = bar.add_task("heal", total=steps, drift=f"held-out loss {initial:.4g}")
        for step in range(1, steps + 1):
            pick = int(torch.randint(len(train), (1,), generator=generator))
            optimizer.zero_grad(set_to_none=True)
            if options.mixup:
                # distil on mixtures of two batches, labelled by the original: more distinct inputs
                # than the calibration data holds (what reaches the original's accuracy on tabular data)
                other = int(torch.randint(len(train), (1,), generator=generator))
                inputs = mixed(train[pick], train[other], generator)
                with torch.no_grad():
                    target = [t.detach() for t in flat_outputs(original(*inputs))]
            else:
                inputs, target = train[pick], train_targets[pick]
            loss = distillation_loss(flat_outputs(model(*inputs)), target)
            if not torch.isfinite(loss):
                raise CalibrationError(
                    f"Healing diverged at step {step} (loss {float(loss.detach())}); lower the learning rate (now {options.lr:g})."
                )
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step % eval_every == 0 or step == steps:
                current = heldout_loss()
                bar.update(task, advance=0, drift=f"held-out loss {current:.4g}")
                if current < best - 1e-12:
                    best, bad = current, 0
                    best_state = {k: v.detach().clone() for k, v in converted.state_dict().items()}
                else:
                    bad += 1
                    if bad >= options.patience:
                        stopped = True
                        break
            bar.update(task, advance=1)
    converted.load_state_dict(best_state)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return HealResult(converted, step, best, initial, stopped, options)


def world_size() -> int:
    """The data-parallel world healing runs in: WORLD_SIZE as torchrun sets it (1 without).

    Raises:
        ConfigError: WORLD_SIZE is not a positive integer, or is above 1 in a process no launcher
            started (RANK, MASTER_ADDR or MASTER_PORT missing).
    """
    import torch.distributed as dist

    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment is not a positive integer; unset it or run under torchrun.")
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
        if isinstance(x, torch.Tensor) and x.is_floating_point() and isinstance(y, torch.Tensor) and y.shape[1:] == x.shape[1:]:
            n = min(len(x), len(y))
            weight = torch.rand((n,) + (1,) * (x.dim() - 1), generator=generator).to(x)
            out.append(weight * x[:n] + (1 - weight) * y[:n])
        else:
            out.append(x)
    if len({len(x) for x in out if isinstance(x, torch.Tensor) and x.dim()}) > 1:
        return a  # batches of unequal size and inputs mixed unevenly: keep the batch as it is
    return tuple(out)
