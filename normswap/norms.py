"""Replacement normalizations and the functions the graph rewrite calls.

group norm:         per sample, over groups of C/G channels (and all positions); per-channel affine.

channel layer norm: y[n, :, p] = (x[n, :, p] - mean_c) / sqrt(var_c + eps) * w + b at every position p.
frozen batch norm:  y = (x - running_mean) / sqrt(running_var + eps) * w + b, BatchNorm's eval function.
"""
from __future__ import annotations

import contextvars
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


# How group_norm exports: "layernorm-view" (fastest in onnxruntime, the default) or "native"
# (the exporter's own form; at opset >= 21 that is the GroupNormalization op, opt-in).
GROUP_NORM_EXPORT_FORM: contextvars.ContextVar[str] = contextvars.ContextVar("normswap_group_norm_export_form", default="layernorm-view")


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.group_norm, exported to ONNX as LayerNormalization over a (N, G, C/G * positions) view
    followed by the per-channel affine: the fastest correct form in onnxruntime among those
    measured in benchmarks/bench_formulations.py (the exporter's own is Reshape ->
    InstanceNormalization -> Reshape -> Mul -> Add). Eager PyTorch keeps the fused kernel."""
    native = GROUP_NORM_EXPORT_FORM.get() == "native"
    static = all(isinstance(d, int) for d in x.shape[1:])  # a dynamic C/H/W axis keeps the native form
    if native or not static or not torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or x.dim() < 2:
        return F.group_norm(x, num_groups, weight, bias, eps)
    per_group = math.prod(x.shape[1:]) // num_groups
    y = F.layer_norm(x.reshape(x.shape[0], num_groups, per_group), (per_group,), None, None, eps).reshape(x.shape)
    if weight is None:
        return y
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose ONNX export uses the faster formulation of `group_norm` (same function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def channel_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, num_channels: int | None = None
) -> torch.Tensor:
    """LayerNorm over dim 1 of (N, C, *) at every position; plain LayerNorm(C) on (N, C).

    Pass `num_channels` when known: a Python int keeps the normalized shape static for tracers.
    """
    shape = (int(num_channels),) if num_channels is not None else (x.shape[1],)
    if x.dim() == 2:
        return F.layer_norm(x, shape, weight, bias, eps)
    # (N, C, *) -> (N, *, C): LayerNormalization over the last axis exports as one fused op.
    # Explicit non-negative permutations: the TorchScript exporter mis-exports movedim(-1, 1).
    rank = x.dim()
    to_last = (0, *range(2, rank), 1)
    to_channels = (0, rank - 1, *range(1, rank - 1))
    return F.layer_norm(x.permute(to_last), shape, weight, bias, eps).permute(to_channels)


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


def _register_affine(module: nn.Module, size: int, affine: bool, trainable: bool = True) -> None:
    """`weight` (ones) and `bias` (zeros) parameters named like BatchNorm's, or None without affine."""
    if affine:
        module.weight = nn.Parameter(torch.ones(size), requires_grad=trainable)
        module.bias = nn.Parameter(torch.zeros(size), requires_grad=trainable)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of (N, C, *) inputs, independently at every position.

    Parameters are named `weight` and `bias` like BatchNorm's, so state_dict keys carry over.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        _register_affine(self, num_channels, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.weight, self.bias, self.eps, self.num_channels)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


class FrozenBatchNorm(nn.Module):
    """BatchNorm fixed to its eval-mode function: running statistics and affine do not change.

    `weight`/`bias` stay parameters (with requires_grad=False) so optimiser groups that name them
    keep working; `running_mean`/`running_var` stay buffers, so state_dict keys carry over.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        _register_affine(self, num_features, affine, trainable=False)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class SwappedBatchNorm(_BatchNorm):
    """Mixed into a BatchNorm *subclass* in place of `_BatchNorm.forward`.

    A subclass such as `class BNAct(nn.BatchNorm2d): forward = act(super().forward(x))` is rebased
    onto `(BNAct, SwappedBatchNorm)`: its own forward still runs, and its `super().forward()` lands
    here and normalizes per sample. The instance keeps its class identity, submodules and
    parameter names.
    """

    normswap_target: str = "groupnorm"
    normswap_num_groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normswap_target == "groupnorm":
            return group_norm(x, self.normswap_num_groups, self.weight, self.bias, self.eps)
        if self.normswap_target == "layernorm":
            return channel_layer_norm(x, self.weight, self.bias, self.eps, self.num_features)
        return frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


@functools.lru_cache(maxsize=None)
def swapped_class(cls: type) -> type:
    """`cls` with `SwappedBatchNorm` inserted before `_BatchNorm` in its MRO (cached per class)."""
    return type(cls.__name__, (cls, SwappedBatchNorm), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def is_swapped(module: nn.Module) -> bool:
    """True for modules normswap produced (never reported as BatchNorm again)."""
    return isinstance(module, (SwappedBatchNorm, ChannelLayerNorm, FrozenBatchNorm, GroupNorm))
