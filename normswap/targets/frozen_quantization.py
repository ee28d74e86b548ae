"""Frozen sites in torch's eager-mode quantization, as BatchNorm is: `fuse_modules` folds
(Conv, FrozenBatchNorm[, ReLU]) and (Linear, FrozenBatchNorm), and `prepare` / `convert` turn a
FrozenBatchNorm left alone into a quantized batch norm with its fixed statistics.

torch reads both from module-level tables keyed by exact class (`fuse_modules` without a custom
mapping, `convert` without one), so `register_with_torch` adds FrozenBatchNorm's rows to them once.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

log = logging.getLogger(__name__)

_CONV_RELU = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def fuse_conv_frozen(is_qat: bool, conv: Any, frozen: Any) -> nn.Module:
    """The convolution with the frozen statistics and affine folded into its weights, in eval and
    in QAT alike: the statistics never change, so there is no BatchNorm to train (unlike torch's
    ConvBn modules for a BatchNorm)."""
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight,
        conv.bias,
        frozen.running_mean,
        frozen.running_var,
        frozen.eps,
        frozen.weight,
        frozen.bias,
        transpose=isinstance(conv, _TRANSPOSED),
    )
    return fused


def fuse_conv_frozen_relu(is_qat: bool, conv: Any, frozen: Any, relu: nn.Module) -> nn.Module:
    """The folded convolution and the ReLU as torch's intrinsic ConvReLU module."""
    return _CONV_RELU[type(conv)](fuse_conv_frozen(is_qat, conv, frozen), relu)


def fuse_linear_frozen(is_qat: bool, linear: nn.Linear, frozen: Any) -> nn.Linear:
    fused = copy.deepcopy(linear)
    fused.weight, fused.bias = fuse_linear_bn_weights(
        linear.weight, linear.bias, frozen.running_mean, frozen.running_var, frozen.eps, frozen.weight, frozen.bias
    )
    return fused


class QuantizedFrozenBatchNorm(nn.Module):
    """A FrozenBatchNorm on quantized tensors (what torch's `convert` swaps in, as it swaps
    `nnq.BatchNorm2d` for a BatchNorm2d): torch's quantized batch norm with the fixed statistics
    and affine, at any rank, quantizing its output with the scale the observer measured."""

    def __init__(
        self,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        scale: float,
        zero_point: int,
    ) -> None:
        super().__init__()
        for name, value in (("running_mean", running_mean), ("running_var", running_var)):
            self.register_buffer(name, value.detach().clone())
        for name, value in (("weight", weight), ("bias", bias)):
            self.register_buffer(name, value.detach().clone())
        self.num_features, self.eps, self.scale, self.zero_point = running_mean.shape[0], eps, scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.scale, self.zero_point
        )

    @classmethod
    def from_float(cls, module: Any, use_precomputed_fake_quant: bool = False) -> QuantizedFrozenBatchNorm:
        scale, zero_point = module.activation_post_process.calculate_qparams()
        channels = module.running_mean.shape[0]
        like = {"dtype": module.running_mean.dtype, "device": module.running_mean.device}
        weight = module.weight if module.weight is not None else torch.ones(channels, **like)
        bias = module.bias if module.bias is not None else torch.zeros(channels, **like)
        return cls(module.running_mean, module.running_var, weight, bias, module.eps, float(scale), int(zero_point))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, scale={self.scale}, zero_point={self.zero_point}"


def register_with_torch(frozen: type[nn.Module]) -> None:
    """Add `frozen`'s rows to torch's default fusion and static-quantization tables (once; if a
    torch release moves them, eager quantization fails on frozen sites as it did before)."""
    try:
        from torch.ao.quantization import fuser_method_mappings, quantization_mappings
    except ImportError:  # pragma: no cover - torch without eager quantization
        return
    fusers: Any = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    modules: Any = getattr(quantization_mappings, "DEFAULT_STATIC_QUANT_MODULE_MAPPINGS", None)
    if not isinstance(fusers, dict) or not isinstance(modules, dict):
        log.debug(
            "torch's eager quantization tables are not where normswap expects them; frozen sites are not registered"
        )
        return
    convolutions: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)
    for conv in convolutions:
        fusers.setdefault((conv, frozen), fuse_conv_frozen)
    for conv in _CONV_RELU:
        fusers.setdefault((conv, frozen, nn.ReLU), fuse_conv_frozen_relu)
    fusers.setdefault((nn.Linear, frozen), fuse_linear_frozen)
    modules.setdefault(frozen, QuantizedFrozenBatchNorm)
