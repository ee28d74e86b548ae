"""The rewrite's post-conditions: no site the plan made batch-independent still normalizes with
batch statistics, and a layer whose target keeps the function still computes it.

The converted model runs once with only its normalization layers in train mode (so stochastic
layers stay off and forwards that need labels in training still run) and once in eval mode,
while every batch_norm call is watched and attributed to the innermost module running it. Each
converted BatchNorm subclass is also probed alone, which catches statistics computed by hand.
A replaced layer whose target keeps the function (frozen, batchnorm) runs alone next to the layer
it replaced, on a random input of its shape.
"""

from __future__ import annotations

import contextlib
import copy
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


def layers_keeping_function(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The modules a plan replaces with a target that keeps their function (frozen, batchnorm),
    by site name: what `check_kept_function` compares their replacements with (collected before
    the rewrite, which may be in place)."""
    return {
        entry.name: model.get_submodule(entry.name)
        for entry in plan
        if entry.converts
        and entry.kind is not SiteKind.FUNCTIONAL
        and targets.get(entry.target).keeps_function
        and not targets.get(entry.target).absorbs_affine
    }


def check_kept_function(
    model: nn.Module, plan: Plan, sites: Sequence[Site], replaced: dict[str, nn.Module]
) -> list[str]:
    """Raise PlanError when a layer whose target keeps the function computes something else than
    the layer it replaced, on a random input of the shape the example gave it: in eval mode, and
    in train mode too for a target that keeps batch statistics (batchnorm). Copies are run, without
    their hooks. Returns notes on what could not be compared (a mode the original cannot run in)."""
    shapes = {s.name: s.input_shape for s in sites}
    inputs: dict[tuple, torch.Tensor] = {}  # one random input per shape, dtype and device
    notes = []
    for name, before in replaced.items():
        shape, entry = shapes.get(name), plan.get(name)
        if shape is None or len(shape) < 2 or entry is None:
            continue  # not reached: no input to compare on
        after = model.get_submodule(name)
        modes = (False, True) if targets.get(entry.target).batch_statistics else (False,)
        for train in modes:
            mode = "train" if train else "eval"
            x = _random_input(before, shape, inputs)
            try:
                expected = _forward_copy(before, x, train)
            except Exception as exc:  # noqa: BLE001 - the original layer cannot run alone: nothing to compare with
                notes.append(
                    f"{name}: {mode}-mode function not compared, the original layer fails alone ({type(exc).__name__})"
                )
                continue
            try:
                actual = _forward_copy(after, x, train)
            except Exception as exc:  # the replacement fails where the original runs: one sentence, with the cause
                raise PlanError(
                    f"Layer '{name}' fails alone after the rewrite to {entry.target} in {mode} mode where the layer it "
                    f"replaced runs ({type(exc).__name__}: {str(exc).strip()[:160]}); keep it (--keep {name})."
                ) from exc
            problem = _difference(actual, expected)
            if problem:
                raise PlanError(
                    f"Layer '{name}' computes something else after the rewrite to {entry.target} in {mode} mode "
                    f"({problem} on a random input of its shape); keep it (--keep {name}) or replace the class in your code."
                )
    return notes


def _random_input(module: nn.Module, shape: tuple[int, ...], made: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """Two samples of the layer's input shape (two: batch statistics differ from one sample's), in
    its dtype and on its device; made once per shape."""
    reference = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    where = (reference.device, reference.dtype) if reference is not None else (torch.device("cpu"), torch.float32)
    key = (tuple(shape[1:]), *where)
    if key not in made:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((2, *shape[1:]), generator=generator) * 2 + 1
        made[key] = x.to(device=where[0], dtype=where[1])
    return made[key]


def _forward_copy(module: nn.Module, x: torch.Tensor, train: bool) -> Any:
    with torch.no_grad():
        return copy.deepcopy(module).train(train).forward(x)


def _difference(actual: Any, expected: Any) -> str:
    """What differs between two outputs ("" when they agree). Tolerance: 1e-4 relative to the
    output's scale (1e-2 in 16-bit floats): the same arithmetic in another order, far below a
    change of function."""
    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return "" if type(actual) is type(expected) else f"an output of type {type(actual).__name__}"
    if actual.shape != expected.shape:
        return f"an output of shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    if not expected.numel():
        return ""
    precision = 1e-2 if expected.dtype in (torch.float16, torch.bfloat16) else 1e-4
    difference = float(torch.linalg.vector_norm(actual - expected, ord=float("inf")))
    scale = max(1.0, float(torch.linalg.vector_norm(expected, ord=float("inf"))))
    return "" if difference <= precision * scale else f"max abs difference {difference:.3g}"


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


__all__ = [
    "batch_statistics_users",
    "check_kept_function",
    "check_no_batch_statistics",
    "layers_keeping_function",
    "norms_in_train_mode",
]
