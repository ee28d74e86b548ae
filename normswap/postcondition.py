"""The rewrite's post-condition: no site the plan converted still normalizes with batch statistics.

The converted model runs once with only its normalization layers in train mode (so stochastic
layers stay off and forwards that need labels in training still run) and once in eval mode,
while every batch_norm call is watched and attributed to the innermost module running it. Each
converted BatchNorm subclass is also probed alone, which catches statistics computed by hand.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from . import targets
from .capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs, is_batchnorm_like
from .errors import PlanError
from .plan import Plan, PlanEntry
from .sites import Site, SiteKind, probe
from .targets.takeover import TakenOver
from .torchutil import is_replacement, preserved

log = logging.getLogger(__name__)


class _BatchStatisticsWatch(TorchFunctionMode):
    """Records the module running each batch_norm call that normalizes with batch statistics."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.owners: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in BATCH_NORM_FUNCTIONS:
            call = BatchNormArgs.of(func, args, kwargs)
            if call.training or call.running_mean is None or call.running_var is None:
                self.owners.append(self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def is_normalization(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or is_replacement(module) or is_batchnorm_like(module)


@contextlib.contextmanager
def norms_in_train_mode(model: nn.Module, owners: Sequence[str] = ()) -> Iterator[None]:
    """Eval mode, except the normalization layers (and the modules whose forward makes a
    functional batch_norm call): a train-mode check of normalization without dropout, stochastic
    depth or training-only code paths. State is restored on exit."""
    with preserved(model):
        model.eval()
        for module in model.modules():
            if is_normalization(module):
                module.training = True
        for owner in owners:
            model.get_submodule(owner).training = True
        yield


def batch_statistics_users(model: nn.Module, inputs: tuple, train: bool, owners: Sequence[str] = ()) -> list[str]:
    """Modules (qualified names) whose forward ran a batch_norm with batch statistics."""
    stack: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()  # (a forward hook that returns a value would replace the output)

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    watch = _BatchStatisticsWatch(stack)
    try:
        mode = norms_in_train_mode(model, owners) if train else preserved(model)
        with mode, torch.no_grad(), watch:
            if not train:
                model.eval()
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return watch.owners


def check_no_batch_statistics(
    model: nn.Module, plan: Plan, sites: Sequence[Site], inputs: tuple | None, original: nn.Module
) -> list[str]:
    """Raise PlanError when a site the plan made batch-independent still uses batch statistics,
    or when the converted model cannot run where `original` runs.

    Returns notes on what could not be checked (a forward that fails with its normalization in
    train mode, as the original's does too, is checked per layer only; so is everything without
    example inputs, `inputs=None`).
    """
    independent = {e.name: e for e in plan if e.converts and not targets.get(e.target).batch_statistics}
    notes = _check_whole_model(model, plan, sites, inputs, original, independent) if inputs is not None else []
    shapes = {s.name: s.probe_shape for s in sites}
    for name, entry in independent.items():
        if entry.kind is SiteKind.FUNCTIONAL:
            continue
        module = model.get_submodule(name)
        if isinstance(module, TakenOver):  # a subclass whose normalization was taken over
            behaviour = probe(module, shapes.get(name))
            if behaviour.batch_dependent_train or behaviour.batch_dependent_eval:
                mode = "train" if behaviour.batch_dependent_train else "eval"
                _refuse(
                    name,
                    entry.target,
                    mode,
                    "computes batch statistics without a batch_norm call normswap can take over",
                )
    return notes


def _check_whole_model(
    model: nn.Module,
    plan: Plan,
    sites: Sequence[Site],
    inputs: tuple,
    original: nn.Module,
    independent: dict[str, PlanEntry],
) -> list[str]:
    """The converted model run whole, norms in train mode, then in eval mode (see
    check_no_batch_statistics); returns what could not be checked."""
    notes: list[str] = []
    owners = sorted({s.owner for s in sites if s.kind is SiteKind.FUNCTIONAL and s.owner})
    for train in (True, False):
        try:
            users = batch_statistics_users(model, inputs, train, owners)
        except Exception as exc:  # the converted forward failed in this mode: refused when the original's runs
            log.debug("post-condition run failed", exc_info=True)
            mode = "train" if train else "eval"
            if _runs(original, inputs, train, owners):
                raise PlanError(_broken_by_the_rewrite(exc, mode, plan)) from exc
            notes.append(f"whole-model {mode}-mode check skipped: {type(exc).__name__}: {str(exc).strip()[:160]}")
            continue
        for user in users:
            site = next((n for n in independent if user == n or user.startswith(f"{n}.")), None)
            if site is not None:
                _refuse(
                    site,
                    independent[site].target,
                    "train" if train else "eval",
                    "calls batch_norm with batch statistics",
                )
    return notes


def _runs(model: nn.Module, inputs: tuple, train: bool, owners: Sequence[str]) -> bool:
    """Whether `model` runs on `inputs` in the mode of the post-condition's run."""
    try:
        batch_statistics_users(model, inputs, train, owners)
    except Exception:  # noqa: BLE001 - the user's model: whether it runs is the answer
        return False
    return True


def _broken_by_the_rewrite(exc: BaseException, mode: str, plan: Plan) -> str:
    """One sentence: the converted model fails where the original runs, naming the replaced
    layers and the attribute or state entry forward read that the replacement does not have."""
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    layers = [e.name for e in plan.converted]
    replaced = f"{', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}"
    missing = re.search(r"'(\w+)' object has no attribute '(\w+)'", str(exc))
    if isinstance(exc, AttributeError) and missing:
        return (
            f"The converted model fails in {mode} mode where the original runs ({cause}): its forward reads "
            f"'{missing.group(2)}' of a replaced layer ({replaced}), which the {missing.group(1)} replacing it does "
            f"not have; keep that layer (--keep LAYER) or stop reading the attribute in forward."
        )
    if isinstance(exc, KeyError) and exc.args and exc.args[0] in _BATCHNORM_STATE:
        return (
            f"The converted model fails in {mode} mode where the original runs ({cause}): its forward looks up "
            f"'{exc.args[0]}' in the state of a replaced layer ({replaced}), which its replacement does not keep; "
            f"keep that layer (--keep LAYER) or stop reading it in forward."
        )
    return (
        f"The converted model fails in {mode} mode where the original runs ({cause}); one of the replaced layers "
        f"({replaced}) is the likely cause: keep it (--keep LAYER)."
    )


# what a BatchNorm holds that its replacements may not (named_buffers(), state_dict() lookups)
_BATCHNORM_STATE = ("running_mean", "running_var", "num_batches_tracked")


def _refuse(site: str, target: str, mode: str, how: str) -> None:
    raise PlanError(
        f"Layer '{site}' still normalizes with batch statistics in {mode} mode after the rewrite to {target} (it {how}); "
        "keep it (target 'keep' in a plan) or replace the class in your code."
    )


__all__ = ["batch_statistics_users", "check_no_batch_statistics", "norms_in_train_mode"]
