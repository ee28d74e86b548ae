"""syncbn: SyncBatchNorm, BatchNorm whose batch statistics are reduced over every device of the
process group in training (single-device and eval: plain BatchNorm)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture.tracer import BatchNormArgs
from ..sites import Site, SiteKind
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
    hand_over,
    param,
    require_channels,
    set_attributes,
    where,
)
from .takeover import TakenOver


def sync_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """F.batch_norm, with batch statistics synchronised over the default process group when one
    is running (what nn.SyncBatchNorm.forward does, for BatchNorm subclasses that call batch_norm
    themselves). torch supports the synchronised path on accelerators only."""
    if training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.nn.modules._functions import SyncBatchNorm as SyncFunction

        return SyncFunction.apply(
            x, weight, bias, running_mean, running_var, eps, momentum, dist.group.WORLD, dist.get_world_size()
        )
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _synchronisation_problem() -> str:
    """Why a SyncBatchNorm could not synchronise in this process ("" when it can, or when no
    process group runs: then it is a plain BatchNorm, as torch documents)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    backend = str(dist.get_backend())
    if backend == "gloo" or not torch.cuda.is_available():
        return (
            f"a {backend} process group is running{'' if torch.cuda.is_available() else ' on a machine without a GPU'}"
        )
    return ""


class SyncTakeover(TakenOver, nn.SyncBatchNorm):
    """Where torch's BatchNorm was in a taken-over subclass: a SyncBatchNorm (it keeps BatchNorm's semantics)."""

    label = "SyncBatchNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.SyncBatchNorm.forward(self, x)  # BatchNorm's semantics, synchronised

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
        if torch.jit.is_scripting():  # TorchScript has no process group: a plain BatchNorm
            y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        else:
            y = sync_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return y


@dataclass(frozen=True, kw_only=True)
class SyncBatchNormParams(NormParams):
    num_features: int = param(ParamKind.INT, positive=True)
    momentum: float | None = param(ParamKind.OPTIONAL_FLOAT)  # None: a cumulative average, as in torch
    track_running_stats: bool | None = param(ParamKind.BOOL, required=False)  # not given: true


class SyncBatchNormTarget(Target[SyncBatchNormParams]):
    name = "syncbn"
    summary = "SyncBatchNorm: batch statistics reduced across devices (keeps BatchNorm semantics)"
    batch_statistics = True
    keeps_batchnorm_op = True
    params_type = SyncBatchNormParams

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        channels = require_channels(site)
        problem = _synchronisation_problem()
        if problem:
            raise Refusal(
                f"{where(site)} cannot become a SyncBatchNorm here: {problem}, and torch synchronises BatchNorm statistics only for "
                "GPU tensors (NCCL), so its first training step would raise; use --to groupnorm (no communication) or run on GPUs."
            )
        if site.kind not in (SiteKind.MODULE, SiteKind.SUBCLASS):
            raise Refusal(
                f"{where(site)} is a {site.kind} site; SyncBatchNorm replaces only BatchNorm modules, use groupnorm or layernorm."
            )
        params = {"num_features": channels, "momentum": site.momentum, "track_running_stats": site.track_running_stats}
        return {**params, **common_params(site)}, ""

    def module(self, bn: _BatchNorm, params: SyncBatchNormParams) -> nn.Module:
        new = nn.SyncBatchNorm(
            params.num_features,
            eps=params.eps,
            momentum=params.momentum,
            affine=params.affine,
            track_running_stats=params.track_running_stats is not False,
            **factory(bn),
        )
        hand_over(bn, new, ("running_mean", "running_var", "num_batches_tracked"))
        return carry_affine(bn, new)

    def function(self, params: SyncBatchNormParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return sync_batch_norm, call.positional()

    def source_call(self, call: SourceCall, params: Sequence[SyncBatchNormParams]) -> SourceCode | str:
        """The same call with SyncBatchNorm as the class (its arguments are BatchNorm's)."""
        return SourceCode(call.namespace + "SyncBatchNorm" + call.written[len(call.callee) :], call.imports)

    def source_class(self, call: SourceCall, params: Sequence[SyncBatchNormParams]) -> SourceCode | str:
        return SourceCode(call.namespace + "SyncBatchNorm", call.imports)

    def takeover_base(self, params: SyncBatchNormParams) -> type:
        return SyncTakeover

    def prepare_takeover(self, module: nn.Module, params: SyncBatchNormParams) -> None:
        """The subclass keeps its statistics and bookkeeping: only the reduction is synchronised."""
        set_attributes(module, process_group=None)  # the default group, as nn.SyncBatchNorm's own default


TARGET = SyncBatchNormTarget()
SyncTakeover.target = TARGET
