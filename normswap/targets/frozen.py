"""frozen: BatchNorm's eval-mode function with fixed statistics and affine, in train mode too.

y = (x - running_mean) / sqrt(running_var + eps) * w + b
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..capture.tracer import BatchNormArgs
from ..sites import Site
from ..torchutil import Replacement
from .base import (
    NORMSWAP_NN,
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
from .frozen_quantization import register_with_torch
from .layernorm import register_affine
from .takeover import TakenOver


def frozen_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """BatchNorm's eval-mode function, whatever the module's mode."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)


class FrozenBatchNorm(Replacement, nn.Module):
    """BatchNorm fixed to its eval-mode function: running statistics and affine do not change.

    `weight`/`bias` stay parameters (with requires_grad=False) so optimiser groups that name them
    keep working; `running_mean`/`running_var` stay buffers, so state_dict keys carry over.

    A drop-in for BatchNorm: it takes BatchNorm's constructor arguments (`momentum` means nothing
    here; `track_running_stats` must be true: the statistics are the function).
    """

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these annotations
        weight: nn.Parameter | None
        bias: nn.Parameter | None
        running_mean: torch.Tensor
        running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if not track_running_stats:
            raise ValueError(
                "FrozenBatchNorm keeps running statistics: track_running_stats=False has nothing to freeze."
            )
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        register_affine(self, num_features, affine, trainable=False, device=device, dtype=dtype)
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a BatchNorm checkpoint loads as it is: its step counter means nothing once frozen
        # (torchvision's FrozenBatchNorm2d drops it the same way)
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class FrozenTakeover(TakenOver, FrozenBatchNorm):
    """Where torch's BatchNorm was in a taken-over subclass: a frozen BatchNorm (timm's `FrozenBatchNormAct2d` shape)."""

    label = "FrozenBatchNorm"

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
        # a subclass that passes no statistics (in training) still owns them: they are the function
        mean = self.running_mean if running_mean is None else running_mean
        var = self.running_var if running_var is None else running_var
        return frozen_batch_norm(input, mean, var, weight, bias, self.eps)


@dataclass(frozen=True, kw_only=True)
class FrozenParams(NormParams):
    num_features: int = param(ParamKind.INT, positive=True)


class FrozenTarget(Target[FrozenParams]):
    name = "frozen"
    summary = "BatchNorm's eval function with fixed statistics, in train mode too (keeps the function)"
    keeps_function = True
    keeps_batchnorm_op = True
    params_type = FrozenParams

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        channels = require_channels(site)
        if not site.track_running_stats:
            raise Refusal(
                f"{where(site)} keeps no running statistics (track_running_stats=False), so there is nothing to freeze; use groupnorm or layernorm."
            )
        return {"num_features": channels, **common_params(site)}, ""

    def module(self, bn: _BatchNorm, params: FrozenParams) -> nn.Module:
        new = FrozenBatchNorm(params.num_features, eps=params.eps, affine=params.affine, **factory(bn))
        hand_over(bn, new, ("running_mean", "running_var"))
        return carry_affine(bn, new, trainable=False)

    def takeover_base(self, params: FrozenParams) -> type:
        return FrozenTakeover

    def params_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, FrozenBatchNorm):
            return None
        return {"num_features": module.num_features, "eps": module.eps, "affine": module.affine}

    def function(self, params: FrozenParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if call.running_mean is None or call.running_var is None:
            raise Refusal("this batch_norm call has no running statistics to freeze; use groupnorm or layernorm")
        return frozen_batch_norm, (call.input, call.running_mean, call.running_var, call.weight, call.bias, params.eps)

    def source_call(self, call: SourceCall, params: Sequence[FrozenParams]) -> SourceCode | str:
        return SourceCode(
            f"{NORMSWAP_NN}.FrozenBatchNorm({call.arguments['num_features']}{call.keywords()})", (NORMSWAP_NN,)
        )

    def source_class(self, call: SourceCall, params: Sequence[FrozenParams]) -> SourceCode | str:
        return SourceCode(f"{NORMSWAP_NN}.FrozenBatchNorm", (NORMSWAP_NN,))

    def source_function(self, call: SourceCall, params: FrozenParams) -> SourceCode | str:
        """BatchNorm's eval function, plain torch: `batch_norm(..., training=False, momentum=0.0, eps)`."""
        arguments = call.arguments
        mean, var = arguments.get("running_mean"), arguments.get("running_var")
        if mean is None or var is None or "None" in (mean, var):
            return "the call passes no running statistics to freeze"
        weight, bias = arguments.get("weight", "None"), arguments.get("bias", "None")
        eps = arguments.get("eps", repr(float(params["eps"])))
        return SourceCode(
            f"{call.namespace}batch_norm({arguments['input']}, {mean}, {var}, {weight}, {bias}, False, 0.0, {eps})",
            call.imports,
        )

    def prepare_takeover(self, module: nn.Module, params: FrozenParams) -> None:
        # statistics stay (they are the function); the step counter and the affine stop moving
        module.register_buffer("num_batches_tracked", None)
        set_attributes(module, eps=params.eps, affine=params.affine)
        for name in ("weight", "bias"):
            parameter = getattr(module, name)
            if parameter is not None:
                parameter.requires_grad_(False)


TARGET = FrozenTarget()
FrozenTakeover.target = TARGET
register_with_torch(FrozenBatchNorm)  # eager quantization fuses and quantizes it as it does BatchNorm
