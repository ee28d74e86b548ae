"""fold: BatchNorm folded into the convolution or linear layer that produces its input (inference).

With s = w / sqrt(running_var + eps) per output channel:
    W' = W * s,   b' = (b - running_mean) * s + beta
the BatchNorm becomes the identity: the same eval-mode function at no run-time cost.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..capture.tracer import BatchNormArgs
from ..errors import PlanError
from ..sites import Site, SiteKind
from ..torchutil import tensor_attribute
from .base import (
    ParamKind,
    PlanOptions,
    Refusal,
    SourceCall,
    SourceCode,
    Target,
    TargetParams,
    drop_statistics,
    param,
    set_attributes,
    where,
)
from .takeover import TakenOver

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE_TYPE = re.compile(r"\((Lazy)?(Conv[123]d|ConvTranspose[123]d|Linear)\)$")


def unchanged(x: torch.Tensor) -> torch.Tensor:
    """The folded BatchNorm's function: its producer already computes it."""
    return x


class FoldedTakeover(TakenOver, nn.Module):
    """Where torch's BatchNorm was in a taken-over subclass whose normalization was folded into
    the layer before: nothing (the subclass's activation and dropout stay)."""

    label = "Folded"

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
        return input


@dataclass(frozen=True, kw_only=True)
class FoldParams(TargetParams):
    into: str = param(ParamKind.STR)  # the producer: the conv / linear layer that absorbs the BatchNorm
    num_features: int = param(ParamKind.INT, positive=True)
    eps: float = param(ParamKind.FLOAT, positive=True)


class FoldTarget(Target[FoldParams]):
    name = "fold"
    summary = "fold into the preceding conv / linear weights (inference only; same function, no cost)"
    keeps_function = True
    absorbs_affine = True
    fallback = "frozen"
    params_type = FoldParams

    def refusal(self, site: Site) -> str | None:
        """Why `site` cannot be folded (None: it can)."""
        try:
            self.plan(site, PlanOptions())
        except Refusal as refusal:
            return str(refusal)
        return None

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        if site.kind is SiteKind.LOOKALIKE:
            raise Refusal(f"{where(site)} is not a torch BatchNorm")
        if not site.track_running_stats or site.batch_dependent_eval:
            raise Refusal(f"{where(site)} has no running statistics to fold")
        if site.hooked:
            raise Refusal(
                f"{where(site)} has forward hooks, which would see the folded layer's input and output instead of its own"
            )
        if site.call_count != 1:
            raise Refusal(
                f"{where(site)} runs {site.call_count} times per forward; one set of weights cannot absorb it"
            )
        if site.producer_module is None or not site.producers or not _FOLDABLE_TYPE.search(site.producers[0]):
            producer = site.producers[0] if site.producers else "an unknown producer (no FX graph)"
            raise Refusal(f"{where(site)} follows {producer}, not a convolution or linear layer")
        if not site.producer_exclusive:
            raise Refusal(
                f"{where(site)} follows {site.producers[0]}, whose output is also used elsewhere, in train or eval mode (or which runs more than once)"
            )
        if site.producer_weights_problem:
            raise Refusal(f"{where(site)} follows {site.producers[0]}, {site.producer_weights_problem}")
        if "(Linear)" in site.producers[0] and site.input_rank != 2:
            raise Refusal(f"{where(site)} normalizes dim 1 of a rank-{site.input_rank} linear output, not its features")
        return {
            "into": site.producer_module,
            "num_features": site.num_features,
            "eps": site.eps,
        }, f"folded into {site.producers[0]}"

    def check_against_site(self, site_name: str, params: Mapping[str, Any], site: Site) -> None:
        super().check_against_site(site_name, params, site)
        if params["into"] != site.producer_module:
            raise PlanError(
                f"Plan entry '{site_name}' (fold) folds into '{params['into']}', but the layer follows '{site.producer_module}'; "
                "a BatchNorm folds only into the layer that produces its input."
            )

    def absorb(self, model: nn.Module, site_name: str, statistics: Any, params: FoldParams) -> None:
        try:
            producer = model.get_submodule(params.into)
        except AttributeError:
            raise PlanError(
                f"Plan entry '{site_name}' (fold) folds into '{params['into']}', which this model does not have."
            ) from None
        if not isinstance(producer, (_ConvNd, nn.Linear)):
            raise PlanError(
                f"Plan entry '{site_name}' (fold) folds into '{params['into']}', a {type(producer).__name__}, not a conv or linear layer."
            )
        channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        if channels != params.num_features:
            raise PlanError(
                f"Plan entry '{site_name}' (fold): '{params['into']}' has {channels} outputs, the BatchNorm {params['num_features']}."
            )
        fold_into(producer, statistics, params.eps)

    def module(self, bn: _BatchNorm, params: FoldParams) -> nn.Module:
        return nn.Identity()

    def function(self, params: FoldParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return unchanged, (call.input,)

    def source_call(self, call: SourceCall, params: Sequence[FoldParams]) -> SourceCode | str:
        return "fold changes the weights of the layer before it, not the code: convert the checkpoint (`normswap convert --to fold`)"

    source_class = source_call

    def source_function(self, call: SourceCall, params: FoldParams) -> SourceCode | str:
        return self.source_call(call, [params])

    def takeover_base(self, params: FoldParams) -> type:
        return FoldedTakeover

    def prepare_takeover(self, module: nn.Module, params: FoldParams) -> None:
        drop_statistics(module)
        set_attributes(module, affine=False)
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def fold_into(producer: _ConvNd | nn.Linear, bn: Any, eps: float) -> None:
    """Scale the producer's output channels and shift its bias by BatchNorm's eval-mode affine
    (`bn` has running_mean, running_var and optional weight / bias)."""
    running_mean, running_var = tensor_attribute(bn, "running_mean"), tensor_attribute(bn, "running_var")
    if running_mean is None or running_var is None:
        raise PlanError(
            "fold needs the running statistics as tensors (module buffers or attributes the graph reads directly)"
        )
    gamma, beta_ = tensor_attribute(bn, "weight"), tensor_attribute(bn, "bias")
    with torch.no_grad():
        mean, var = running_mean.double(), running_var.double()
        weight = gamma.double() if gamma is not None else torch.ones_like(mean)
        beta = beta_.double() if beta_ is not None else torch.zeros_like(mean)
        scale = weight / torch.sqrt(var + eps)
        w = producer.weight.double()
        if isinstance(producer, _TRANSPOSED):
            # weight (in, out / groups, *k): the output channel is spread over groups and dim 1
            groups = producer.groups
            w = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
            w = w * scale.reshape(groups, 1, -1, *([1] * (w.dim() - 3)))
            w = w.reshape(producer.weight.shape)
        else:  # Conv / Linear weight (out, ...)
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        old_bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(mean)
        new_bias = (old_bias - mean) * scale + beta
        producer.weight.copy_(w.to(producer.weight.dtype))
        if producer.bias is None:
            producer.bias = nn.Parameter(
                new_bias.to(producer.weight.dtype), requires_grad=producer.weight.requires_grad
            )
        else:
            producer.bias.copy_(new_bias.to(producer.bias.dtype))


TARGET = FoldTarget()
FoldedTakeover.target = TARGET
