"""batchnorm: torch's own BatchNorm1d/2d/3d, its rank read off the layer's input. SyncBatchNorm and
BatchNorm subclasses (the synchronized ones of pytorch-deeplab-xception, detectron2, timm) go back
to plain BatchNorm with the same parameters and statistics: the function and batch statistics stay."""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..capture.tracer import BatchNormArgs
from ..sites import Site, SiteKind
from ..torchutil import module_class
from .base import (
    NormParams,
    ParamKind,
    PlanOptions,
    Refusal,
    SourceCall,
    SourceCode,
    Target,
    carry_affine,
    common_params,
    factory,
    param,
    require_channels,
    where,
)
from .takeover import TakenOver, is_subclass_instance, take_over

TORCH_CLASSES: dict[str, type[_BatchNorm]] = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
}
# BatchNorm1d takes (N, C) and (N, C, L); 2d (N, C, H, W); 3d (N, C, D, H, W)
_BY_INPUT_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
# a small input of each class's rank, to compare two forwards (batch 3: batch statistics differ from one sample's)
_PROBE_SHAPES = {"BatchNorm1d": (3, -1, 4), "BatchNorm2d": (3, -1, 4, 4), "BatchNorm3d": (3, -1, 3, 3, 3)}
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def torch_class_for(site: Site) -> str | None:
    """The torch class the site becomes: by its input's rank (SyncBatchNorm has none of its own);
    for a layer the example did not reach, the rank its class has (its torch base, else the
    `1d`/`2d`/`3d` its name ends with: SynchronizedBatchNorm2d); None when nothing tells."""
    if site.input_rank is not None:
        return _BY_INPUT_RANK.get(site.input_rank)
    if site.torch_base in TORCH_CLASSES:
        return site.torch_base
    return next((name for name in TORCH_CLASSES if site.flavour.endswith(name[-2:])), None)


def unsynchronized_name(name: str) -> str:
    """SyncBatchNormAct -> BatchNormAct, SynchronizedBatchNorm2d -> BatchNorm2d."""
    return re.sub(r"Sync(hronized)?", "", name, count=1) or name


def _additions(site: Site) -> str:
    return ", ".join(site.submodules) or "an operation in its forward"


@dataclass(frozen=True, kw_only=True)
class BatchNormParams(NormParams):
    num_features: int = param(ParamKind.INT, positive=True)
    torch_class: str = param(ParamKind.STR, choices=tuple(TORCH_CLASSES))
    momentum: float | None = param(ParamKind.OPTIONAL_FLOAT)  # None: a cumulative average, as in torch
    track_running_stats: bool = param(ParamKind.BOOL)
    # a subclass whose forward adds to BatchNorm (an activation, dropout): its forward is kept
    # over torch's class (or its module's unsynchronized class); otherwise the layer becomes torch's class
    keeps_forward: bool = param(ParamKind.BOOL)


class _Unsynchronized:
    """What the takeover bases below share: named after the subclass without "Sync"
    (SyncBatchNormAct -> BatchNormAct), with the input check of their own rank."""

    label = "BatchNorm"
    checks_own_input = True
    forward = _BatchNorm.forward  # torch's own: batch statistics in training, running ones in eval

    @classmethod
    def class_name(cls, name: str) -> str:
        return unsynchronized_name(name)

    def normswap_normalize(
        self,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        """A batch_norm call of the subclass's forward, as it was written (no statistics filled in)."""
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


class BatchNorm1dTakeover(_Unsynchronized, TakenOver, nn.BatchNorm1d):
    """Where torch's BatchNorm was in a taken-over subclass: torch's BatchNorm1d."""


class BatchNorm2dTakeover(_Unsynchronized, TakenOver, nn.BatchNorm2d):
    """Where torch's BatchNorm was in a taken-over subclass: torch's BatchNorm2d."""


class BatchNorm3dTakeover(_Unsynchronized, TakenOver, nn.BatchNorm3d):
    """Where torch's BatchNorm was in a taken-over subclass: torch's BatchNorm3d."""


_TAKEOVER_BASES: dict[str, type] = {
    "BatchNorm1d": BatchNorm1dTakeover,
    "BatchNorm2d": BatchNorm2dTakeover,
    "BatchNorm3d": BatchNorm3dTakeover,
}


class BatchNormTarget(Target[BatchNormParams]):
    name = "batchnorm"
    summary = (
        "torch's own BatchNorm1d/2d/3d: SyncBatchNorm and BatchNorm subclasses back to plain BatchNorm "
        "(keeps the function and batch statistics)"
    )
    keeps_function = True
    batch_statistics = True
    keeps_batchnorm_op = True
    replaces_forward = True
    params_type = BatchNormParams

    def unchanged(self, site: Site) -> str | None:
        if site.kind is SiteKind.FUNCTIONAL:
            return "a functional batch_norm call computes torch's BatchNorm already"
        torch_class = torch_class_for(site)
        if site.kind is SiteKind.MODULE and site.flavour == torch_class:
            return f"already torch's {torch_class}"
        if (
            site.kind is SiteKind.SUBCLASS
            and site.torch_base == torch_class
            and site.adds_to_batchnorm
            and not site.normalizes_by_hand
        ):
            return f"already torch's {torch_class}, with what its class {site.flavour} adds ({_additions(site)})"
        return None

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        if site.kind is SiteKind.FUNCTIONAL:
            raise Refusal(f"{where(site)} is a functional batch_norm call, torch's BatchNorm already; keep it.")
        channels = require_channels(site)
        torch_class = torch_class_for(site)
        if torch_class is None:
            raise Refusal(
                f"{where(site)} has no rank of its own and the example inputs did not reach it, so it is unknown whether "
                f"it becomes BatchNorm1d, 2d or 3d; give example inputs that reach it, or keep it (--keep {site.name})."
            )
        keeps_forward = site.kind is SiteKind.SUBCLASS and site.adds_to_batchnorm
        if keeps_forward and site.normalizes_by_hand:
            raise Refusal(
                f"{where(site)} computes its batch statistics by hand and its forward adds {_additions(site)}, so torch's "
                f"{torch_class} cannot stand in for it; replace the class in your code (by {torch_class} and what it adds), "
                f"or keep it (--keep {site.name})."
            )
        params = {
            "num_features": channels,
            "torch_class": torch_class,
            "momentum": site.momentum,
            "track_running_stats": site.track_running_stats,
            "keeps_forward": keeps_forward,
        }
        if keeps_forward:
            why = f"its forward adds {_additions(site)}: kept, over torch's {torch_class}"
        elif site.kind is SiteKind.SUBCLASS:
            why = f"its forward adds nothing to torch's BatchNorm in one process: torch's {torch_class}"
        elif site.input_shape is not None:
            why = f"torch's {torch_class} for its rank-{site.input_rank} input"
        else:
            why = f"torch's {torch_class}, the rank of its class"
        return {**params, **common_params(site)}, why

    def replace(self, bn: _BatchNorm, params: BatchNormParams, name: str) -> nn.Module:
        """torch's class holding `bn`'s tensors; a subclass that adds to BatchNorm keeps its
        forward: as the unsynchronized class its own module defines when that one computes the
        same (timm's SyncBatchNormAct -> BatchNormAct2d), else taken over over torch's class."""
        if not (params.keeps_forward and is_subclass_instance(bn)):
            return self.module(bn, params)
        taken = take_over(bn, self, params, name)
        return unsynchronized_counterpart(bn, taken, params.torch_class) or taken

    def module(self, bn: _BatchNorm, params: BatchNormParams) -> nn.Module:
        new = TORCH_CLASSES[params.torch_class](
            params.num_features,
            eps=params.eps,
            momentum=params.momentum,
            affine=params.affine,
            track_running_stats=params.track_running_stats,
            **factory(bn),
        )
        carry_affine(bn, new)  # values and requires_grad; a parametrized tensor: its current value
        share_tensors(bn, new)
        return new

    def function(self, params: BatchNormParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return F.batch_norm, call.positional()

    def takeover_base(self, params: BatchNormParams) -> type:
        return _TAKEOVER_BASES[params.torch_class]

    def prepare_takeover(self, module: nn.Module, params: BatchNormParams) -> None:
        """Statistics and bookkeeping stay (they are BatchNorm's); the process group goes."""
        vars(module).pop("process_group", None)

    def source_call(self, call: SourceCall, params: Sequence[BatchNormParams]) -> SourceCode | str:
        """The torch class with the arguments as written (`process_group` dropped)."""
        torch_class = _one_class(params)
        if torch_class is None:
            return "the layers built here normalize inputs of different ranks; build them on separate lines"
        arguments = call.arguments
        keywords = "".join(
            f", {name}={arguments[name]}"
            for name in ("eps", "momentum", "affine", "track_running_stats", "device", "dtype")
            if name in arguments
        )
        return SourceCode(f"{call.namespace}{torch_class}({arguments['num_features']}{keywords})", call.imports)

    def source_class(self, call: SourceCall, params: Sequence[BatchNormParams]) -> SourceCode | str:
        torch_class = _one_class(params)
        if torch_class is None:
            return "the layers built with this class normalize inputs of different ranks; pass one class per rank"
        return SourceCode(call.namespace + torch_class, call.imports)

    def source_sync_conversion(self, call: SourceCall, params: Sequence[BatchNormParams]) -> SourceCode | str:
        """The model it converts: without the conversion its layers are torch's BatchNorm."""
        return SourceCode(call.arguments["module"])

    def source_function(self, call: SourceCall, params: BatchNormParams) -> SourceCode | str:
        return "a functional batch_norm call is torch's BatchNorm already"


def _one_class(params: Sequence[BatchNormParams]) -> str | None:
    classes = {p.torch_class for p in params}
    return classes.pop() if len(classes) == 1 else None


def share_tensors(bn: nn.Module, new: nn.Module) -> None:
    """`bn`'s own parameters and buffers become `new`'s: the same objects, as torch's
    `convert_sync_batchnorm` hands them over, so an optimizer built before the conversion still
    holds the model's parameters."""
    for name in ("weight", "bias"):
        parameter = bn._parameters.get(name)
        if isinstance(parameter, nn.Parameter) and isinstance(new._parameters.get(name), nn.Parameter):
            new._parameters[name] = parameter
    for name in STATISTICS:
        buffer = bn._buffers.get(name)
        if isinstance(buffer, torch.Tensor) and isinstance(new._buffers.get(name), torch.Tensor):
            new._buffers[name] = buffer


def unsynchronized_counterpart(bn: _BatchNorm, taken: nn.Module, torch_class: str) -> nn.Module | None:
    """`bn`'s state in the class its own module defines as its unsynchronized form, or None.

    The class is found by name in the module that defines `bn`'s class: without "Sync" and with
    or without the rank (timm's SyncBatchNormAct -> BatchNormAct2d), a subclass of torch's
    `torch_class` and not of SyncBatchNorm. It is taken only when it computes what `taken` (the
    subclass's own forward over torch's class) computes, with each submodule in the same place:
    a class of that name that ignores the activation is not the counterpart.
    """
    cls = module_class(bn)
    stem = unsynchronized_name(cls.__name__)
    home = sys.modules.get(cls.__module__)
    if home is None or stem == cls.__name__ or parametrize.is_parametrized(bn):
        return None
    for name in dict.fromkeys((stem, stem + torch_class[-2:])):
        candidate = getattr(home, name, None)
        if not (
            isinstance(candidate, type)
            and issubclass(candidate, TORCH_CLASSES[torch_class])
            and not issubclass(candidate, nn.SyncBatchNorm)
        ):
            continue
        instance = candidate.__new__(candidate)
        state = dict(bn.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(state[key])  # its own tables; the hook tables stay shared (users' handles)
        state.pop("process_group", None)
        instance.__dict__.update(state)
        if same_forward(instance, taken, torch_class):
            return instance
    return None


class _Mark(nn.Module):
    """Stands in for a submodule while two forwards are compared: a distinct scale shows where
    (and whether) each forward applies it."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def same_forward(first: nn.Module, second: nn.Module, torch_class: str) -> bool:
    """Whether two modules holding the same state compute the same, in train and in eval mode, on
    a random input of the rank of `torch_class`, with each submodule replaced by a distinct scale
    (copies are compared; hooks are not run)."""
    copies = [copy.deepcopy(first), copy.deepcopy(second)]
    for index, (child, _) in enumerate(first.named_children()):
        for module in copies:
            setattr(module, child, _Mark(1.5 + index))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same random affine in both: a zero one would map every forward to zero
        for name, parameter in copies[0].named_parameters():
            if parameter.is_floating_point():
                values = torch.rand(parameter.shape, generator=generator) + 0.5
                parameter.copy_(values)
                copies[1].get_parameter(name).copy_(values)
    channels = int(getattr(first, "num_features", 1))
    x = torch.randn([channels if d == -1 else d for d in _PROBE_SHAPES[torch_class]], generator=generator) * 2 + 1
    reference = next(iter(first.parameters(recurse=False)), None)
    if reference is not None:
        x = x.to(device=reference.device, dtype=reference.dtype)
    try:
        with torch.no_grad():
            for training in (True, False):
                outputs = [module.train(training).forward(x) for module in copies]
                # 1e-4 relative: the same arithmetic in another order, far below any change of function
                if not torch.allclose(outputs[0].float(), outputs[1].float(), rtol=1e-4, atol=1e-5):
                    return False
    except Exception:  # noqa: BLE001 - a forward the candidate cannot run is not the same forward
        return False
    return True


TARGET = BatchNormTarget()
for _base in _TAKEOVER_BASES.values():
    _base.target = TARGET  # type: ignore[attr-defined]  # TakenOver's class attribute
