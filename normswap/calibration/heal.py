"""Heal: a short label-free distillation of the converted model toward the original's outputs.

Loss: KL(softmax(original) || softmax(converted)) for (N, K) class scores, MSE otherwise. Early
stopping on a held-out part of the data. Under torchrun (WORLD_SIZE > 1) it runs data-parallel
with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

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
from ..errors import CalibrationError
from ..passes.rebase import TakenOver
from ..targets.layernorm import ChannelLayerNorm
from ..torchutil import preserved
from .data import check_batches
from .drift import flat_outputs
from .options import HealOptions

log = logging.getLogger(__name__)

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)


@dataclass
class HealResult:
    steps: int
    best_heldout_loss: float
    initial_heldout_loss: float
    stopped_early: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    progress: bool | None = None,
    **settings: Any,
) -> HealResult:
    """Distill `converted` toward `original` on unlabeled `batches` (modified in place).

    Args:
        options: the healing settings (default: HealOptions(steps=100)); keyword `settings`
            (steps=, lr=, params=, seed=, ...) override single fields.
        progress: show a progress bar (default: on a terminal).

    Returns:
        HealResult; the converted model holds the parameters with the best held-out loss.
    """
    options = (options or HealOptions(steps=100)).replace(**settings)
    steps, lr, params, seed = options.steps, options.lr, options.params, options.seed
    heldout_fraction, patience, eval_every = options.heldout_fraction, options.patience, options.eval_every
    batches = check_batches(batches)
    if steps < 1:
        raise CalibrationError("heal steps must be at least 1.")
    held = max(1, int(len(batches) * heldout_fraction)) if len(batches) > 1 else 0
    train, heldout = batches[: len(batches) - held] or batches, batches[len(batches) - held :] or batches
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generator = torch.Generator().manual_seed(seed)
    chosen = trainable_parameters(converted, params)
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
    optimizer = torch.optim.Adam(chosen, lr=lr)
    with preserved(original):
        original.eval()
        targets = {}
        with torch.no_grad():
            for i, batch in enumerate(batches):
                targets[i] = [t.detach() for t in flat_outputs(original(*batch))]
        index = {id(b): i for i, b in enumerate(batches)}

        def heldout_loss() -> float:
            with torch.no_grad():
                return sum(float(distillation_loss(flat_outputs(converted(*b)), targets[index[id(b)]])) for b in heldout) / len(heldout)

        converted.eval()  # statistics and dropout fixed: only the chosen parameters move
        best = initial = heldout_loss()
        best_state = {k: v.detach().clone() for k, v in converted.state_dict().items()}
        bad, stopped, step = 0, False, 0
        show = progress if progress is not None else (os.isatty(2) and world == 1)
        with Progress(
            TextColumn("heal"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[drift]}"),
            TimeRemainingColumn(),
            disable=not show,
            transient=True,
        ) as bar:
            task = bar.add_task("heal", total=steps, drift=f"held-out loss {initial:.4g}")
            for step in range(1, steps + 1):
                batch = train[int(torch.randint(len(train), (1,), generator=generator))]
                optimizer.zero_grad(set_to_none=True)
                loss = distillation_loss(flat_outputs(model(*batch)), targets[index[id(batch)]])
                loss.backward()
                optimizer.step()
                if step % eval_every == 0 or step == steps:
                    current = heldout_loss()
                    bar.update(task, advance=0, drift=f"held-out loss {current:.4g}")
                    if current < best - 1e-12:
                        best, bad = current, 0
                        best_state = {k: v.detach().clone() for k, v in converted.state_dict().items()}
                    else:
                        bad += 1
                        if bad >= patience:
                            stopped = True
                            break
                bar.update(task, advance=1)
    log.info("healed %d step(s): held-out loss %.4g -> %.4g%s", step, initial, best, " (stopped early)" if stopped else "")
    converted.load_state_dict(best_state)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return HealResult(step, best, initial, stopped)


def _distributed(model: nn.Module) -> nn.Module:
    """Wrap in DistributedDataParallel, initializing the process group from torchrun's environment."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistributedDataParallel(model, find_unused_parameters=True)
