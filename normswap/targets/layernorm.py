"""layernorm: LayerNorm over the channels of each sample at every position (N, C, *), or over the
features of (N, C); BatchNorm's per-channel affine carried over.

    y[n, :, p] = (x[n, :, p] - mean_c) / sqrt(var_c + eps) * w + b
"""

from __future__ import annotations

import re
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
    drop_statistics,
    factory,
    param,
    require_channels,
    set_attributes,
    where,
)
from .takeover import TakenOver


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    num_channels: int | None = None,
    contiguous_gradient: bool = False,
) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, *) at every position; plain LayerNorm(C) on (N, C).

    Plain torch without a branch on the input: it scripts, traces, FX-traces and supports
    forward-mode AD. Pass `num_channels` when known: a Python int keeps the normalized shape
    static for tracers. `contiguous_gradient` hands the layer before a contiguous gradient (Opacus'
    grad_sample_mode="ew" convolutions `.view` it) at the cost of a copy of the input each way, so
    only conversions for --dp ask for it.
    """
    channels = x.shape[1] if num_channels is None else num_channels
    if not torch.jit.is_scripting():  # noqa: SIM102 - TorchScript skips a branch on is_scripting() alone
        if torch.onnx.is_in_onnx_export():
            return _exported_channel_layer_norm(x, weight, bias, eps, channels)
    if contiguous_gradient:
        # F.layer_norm copies its transposed input to (N, *, C) order, so the gradient comes back
        # transposed; narrow_copy's backward copies it into a fresh zeros(x.shape), contiguous
        # (about +20% on the layer's forward and backward at (16, 64, 56, 56), CPU; index_select's
        # index_add: +600%). The affine stays in F.layer_norm: expanded weights handle it, not `*`.
        x = x.narrow_copy(1, 0, channels)
    y = F.layer_norm(x.transpose(1, -1), [channels], weight, bias, eps)  # channels last; (N, C) stays as it is
    return y.transpose(1, -1)


def _exported_channel_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, channels: int
) -> torch.Tensor:
    """(N, C, *) -> (N, *, C): LayerNormalization over the last axis, one fused op in ONNX, with
    explicit non-negative permutations (the TorchScript exporter mis-exports movedim(-1, 1))."""
    if x.dim() == 2:
        return F.layer_norm(x, (channels,), weight, bias, eps)
    rank = x.dim()
    to_last = (0, *range(2, rank), 1)
    to_channels = (0, rank - 1, *range(1, rank - 1))
    return F.layer_norm(x.permute(to_last), (channels,), weight, bias, eps).permute(to_channels)


def register_affine(module: nn.Module, size: int, affine: bool, trainable: bool = True, **factory: Any) -> None:
    """`weight` (ones) and `bias` (zeros) parameters named like BatchNorm's, or None without affine."""
    if affine:
        module.weight = nn.Parameter(torch.ones(size, **factory), requires_grad=trainable)
        module.bias = nn.Parameter(torch.zeros(size, **factory), requires_grad=trainable)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class ChannelLayerNorm(Replacement, nn.Module):
    """LayerNorm over the channel dimension of (N, C, *) inputs, independently at every position
    (plain LayerNorm(C) on (N, C)).

    A drop-in for BatchNorm: it takes BatchNorm's constructor arguments (`momentum` and
    `track_running_stats` are accepted and mean nothing here), so `norm_layer=ChannelLayerNorm`
    works wherever `norm_layer=nn.BatchNorm2d` did. Parameters are named `weight` and `bias` like
    BatchNorm's, so state_dict keys carry over. `contiguous_gradient`: see `channel_layer_norm`
    (Opacus' grad_sample_mode="ew"; conversions for differential privacy set it).
    """

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these annotations
        weight: nn.Parameter | None
        bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        track_running_stats: bool | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        contiguous_gradient: bool = False,
    ) -> None:
        super().__init__()
        self.num_channels = self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.contiguous_gradient = contiguous_gradient
        register_affine(self, num_features, affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.weight, self.bias, self.eps, self.num_channels, self.contiguous_gradient)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


class ChannelLayerNormTakeover(TakenOver, ChannelLayerNorm):
    """Where torch's BatchNorm was in a taken-over subclass over (N, C, *) inputs (timm's `LayerNormAct2d` shape)."""

    label = "LayerNorm"

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
        return channel_layer_norm(input, weight, bias, self.eps, self.num_channels, self.contiguous_gradient)


class LayerNormTakeover(TakenOver, nn.LayerNorm):
    """Where torch's BatchNorm was in a taken-over subclass over (N, C) features: an nn.LayerNorm."""

    label = "LayerNorm"

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
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


class LayerNorm(Replacement, nn.LayerNorm):
    """nn.LayerNorm over the features of (N, C) inputs that also answers `num_features`."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, affine: bool = True, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
        self.num_features = num_features


@dataclass(frozen=True, kw_only=True)
class LayerNormParams(NormParams):
    num_channels: int = param(ParamKind.INT, positive=True)
    # "features": LayerNorm(C) over (N, C); "channels_first" (or not given): over dim 1 at every position
    layout: str | None = param(ParamKind.STR, required=False, choices=("features", "channels_first"))


class LayerNormTarget(Target[LayerNormParams]):
    name = "layernorm"
    summary = "LayerNorm over channels, per sample and position (sequences, recurrence, (N, C) features)"
    calibrated = True
    auto_fallback = "frozen"  # one channel: nothing per sample to normalize, the statistics may remain
    params_type = LayerNormParams

    def plan(self, site: Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        channels = require_channels(site)
        if channels < 2:
            raise Refusal(
                f"{where(site)} has one channel, which LayerNorm over channels would turn into zeros; use --to frozen or keep it."
            )
        layout = (
            "features" if site.input_rank == 2 else "channels_first"
        )  # unreached: the channel form serves (N, C) too
        return {"num_channels": channels, "layout": layout, **common_params(site)}, ""

    def module(self, bn: _BatchNorm, params: LayerNormParams) -> nn.Module:
        new: nn.Module
        if params.layout == "features":
            new = nn.LayerNorm(params.num_channels, eps=params.eps, elementwise_affine=params.affine, **factory(bn))
            set_attributes(new, num_features=params.num_channels)  # what code around a BatchNorm reads
        else:
            new = ChannelLayerNorm(params.num_channels, eps=params.eps, affine=params.affine, **factory(bn))
        return carry_affine(bn, new)

    def takeover_base(self, params: LayerNormParams) -> type:
        return LayerNormTakeover if params.layout == "features" else ChannelLayerNormTakeover

    def prepare_takeover(self, module: nn.Module, params: LayerNormParams) -> None:
        drop_statistics(module)
        set_attributes(module, eps=params.eps)
        if isinstance(module, nn.LayerNorm):
            set_attributes(module, normalized_shape=(params.num_channels,), elementwise_affine=params.affine)
        else:
            set_attributes(module, num_channels=params.num_channels, affine=params.affine, contiguous_gradient=False)

    def function(self, params: LayerNormParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return channel_layer_norm, (call.input, call.weight, call.bias, params.eps, params.num_channels)

    def normalize(self, params: LayerNormParams, x: torch.Tensor) -> torch.Tensor | None:
        return channel_layer_norm(x, None, None, params.eps, params.num_channels)

    def normalized_variance(self, params: LayerNormParams, x: torch.Tensor) -> torch.Tensor | None:
        return x.var(1, unbiased=False)  # over the channels at each position

    def params_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, ChannelLayerNorm):
            return {
                "num_channels": module.num_channels,
                "layout": "channels_first",
                "eps": module.eps,
                "affine": module.affine,
            }
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            channels = module.normalized_shape[0]
            return {
                "num_channels": channels,
                "layout": "features",
                "eps": module.eps,
                "affine": module.elementwise_affine,
            }
        return None

    def source_call(self, call: SourceCall, params: Sequence[LayerNormParams]) -> SourceCode | str:
        """`nn.LayerNorm(C)` on (N, C) features (plain torch), else the channel LayerNorm."""
        channels = call.arguments["num_features"]
        if all(entry.get("layout") == "features" for entry in params):
            return SourceCode(
                f"{call.namespace}LayerNorm({channels}{call.keywords({'affine': 'elementwise_affine'})})", call.imports
            )
        return SourceCode(f"{NORMSWAP_NN}.ChannelLayerNorm({channels}{call.keywords()})", (NORMSWAP_NN,))

    def source_class(self, call: SourceCall, params: Sequence[LayerNormParams]) -> SourceCode | str:
        return SourceCode(f"{NORMSWAP_NN}.ChannelLayerNorm", (NORMSWAP_NN,))  # (N, C) too: plain LayerNorm there

    def source_function(self, call: SourceCall, params: LayerNormParams) -> SourceCode | str:
        """`F.layer_norm` in plain torch: over the features of (N, C), or with the channels moved
        last and back for (N, C, *) (the permutation `channel_layer_norm` makes)."""
        arguments = call.arguments
        weight, bias = arguments.get("weight", "None"), arguments.get("bias", "None")
        eps = arguments.get("eps", repr(float(params["eps"])))
        x, shape = arguments["input"], f"({int(params['num_channels'])},)"
        if params.get("layout") == "features":
            return SourceCode(f"{call.namespace}layer_norm({x}, {shape}, {weight}, {bias}, {eps})", call.imports)
        x = x if re.fullmatch(r"[A-Za-z_][\w.]*", x) else f"({x})"  # `.movedim` binds tighter than any operator in it
        return SourceCode(
            f"{call.namespace}layer_norm({x}.movedim(1, -1), {shape}, {weight}, {bias}, {eps}).movedim(-1, 1)",
            call.imports,
        )


TARGET = LayerNormTarget()
ChannelLayerNormTakeover.target = LayerNormTakeover.target = TARGET
