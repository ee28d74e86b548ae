"""Tiny purpose-built models: each exercises one way BatchNorm appears in real code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResNetStyle(nn.Module):
    """Conv-BN-ReLU stem, one residual block, pooled linear head (class scores)."""

    def __init__(self, width: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        y = self.bn3(self.conv3(y))
        x = F.relu(x + y)
        return self.fc(x.mean(dim=(2, 3)))


class MobileNetStyle(nn.Module):
    """Depthwise-separable blocks with channel counts 32 does not divide (24, 72) and BN on 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(24, 72, 1, bias=False), nn.BatchNorm2d(72), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(72, 72, 3, padding=1, groups=72, bias=False), nn.BatchNorm2d(72), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(72, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_bn(x))
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    """BatchNorm1d on (N, C) features between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))))


class TemporalConvNet(nn.Module):
    """Conv1d + BatchNorm1d over (N, C, L) sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Conv1d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.out(F.relu(self.bn2(self.conv2(x))))


class RecurrentBN(nn.Module):
    """An RNN cell that applies the same BatchNorm1d at every one of 4 time steps."""

    def __init__(self, features: int = 6, hidden: int = 12, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.ih = nn.Linear(features, hidden)
        self.hh = nn.Linear(hidden, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F)
        h = torch.zeros(x.shape[0], self.hh.in_features)
        for t in range(self.steps):
            h = torch.tanh(self.bn(self.ih(x[:, t]) + self.hh(h)))
        return self.out(h)


class FunctionalBN(nn.Module):
    """Calls F.batch_norm in forward with its own parameters and statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.ones(8))
        self.bias = nn.Parameter(torch.zeros(8))
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training)
        return self.head(F.relu(x).mean(dim=(2, 3)))


class BatchNormAct2d(nn.BatchNorm2d):
    """An activation-fused BatchNorm subclass: normalize, then ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class SubclassBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


class Conv3dBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class NoAffineBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class NoRunningStatsBN(nn.Module):
    """BatchNorm without running statistics: batch-dependent even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LazyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.LazyBatchNorm2d()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it symbolically."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if x.sum() > -1e9:  # always true, but depends on values
            y = F.relu(y)
        return y


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FrozenBatchNorm2d(nn.Module):
    """A look-alike: torchvision-style frozen BN, a fixed per-channel affine."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class LookalikeBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = FrozenBatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn(self.conv(x)))


def input_for(name: str, batch: int = 4) -> torch.Tensor:
    """A deterministic example input for the model called `name`."""
    shapes = {
        "resnet": (3, 12, 12),
        "mobilenet": (3, 16, 16),
        "mlp": (10,),
        "tcn": (4, 20),
        "rnn": (4, 6),
        "functional": (3, 8, 8),
        "subclass": (3, 8, 8),
        "bn3d": (2, 4, 6, 6),
        "no_affine": (3, 8, 8),
        "no_running_stats": (3, 8, 8),
        "lazy": (3, 8, 8),
        "untraceable": (3, 8, 8),
        "no_bn": (3, 8, 8),
        "lookalike": (3, 8, 8),
        # real-world patterns (REAL_PATTERNS below); the first input only, see inputs_for()
        "torchvision_resnet": (3, 8, 8),
        "timm_norm_act": (3, 8, 8),
        "timm_norm_act_no_stats": (3, 8, 8),
        "naive_sync_bn": (3, 8, 8),
        "sync_bn_act": (3, 8, 8),
        "pyg_graph": (6,),
        "detector": (3, 16, 16),
        "speech_conformer": (12, 8),
        "stochastic_depth": (3, 8, 8),
        "tabnet_gbn": (6,),
        "tf_ported": (3, 16, 16),
        "deeplab_sync_bn": (3, 8, 8),
    }
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((batch, *shapes[name]), generator=generator)


MODELS = {
    "resnet": ResNetStyle,
    "mobilenet": MobileNetStyle,
    "mlp": MLP,
    "tcn": TemporalConvNet,
    "rnn": RecurrentBN,
    "functional": FunctionalBN,
    "subclass": SubclassBN,
    "bn3d": Conv3dBN,
    "no_affine": NoAffineBN,
    "no_running_stats": NoRunningStatsBN,
    "lazy": LazyBN,
    "untraceable": Untraceable,
    "no_bn": NoBN,
    "lookalike": LookalikeBN,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model `name` with deterministic weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    x = input_for(name, batch=8)
    with torch.no_grad():
        model.train()
        for _ in range(3):  # move running statistics away from (0, 1)
            model(x * 1.5 + 0.3)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


# =====================================================================================================
# Real-world BatchNorm patterns
#
# Faithful, shrunken replicas of how popular libraries write BatchNorm (timm, detectron2, PyG,
# pytorch-tabnet, torchvision, transformers). Each class names the file it replicates; the forward
# logic follows that file line by line, only sizes are tiny and cross-process pieces are single-device.
# None of these libraries is imported.
#
#   REAL_PATTERNS          name -> model class (constructible with no arguments)
#   inputs_for(name, b)    the tuple of example tensors forward() takes in eval mode
#   labels_for(name, b)    keyword arguments forward() needs in full train mode ({} for most)
#   build_real(name, s)    like build(): deterministic weights and non-trivial running statistics
# =====================================================================================================
import functools  # noqa: E402
import math  # noqa: E402

from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

# --- 1, 2. timm/layers/norm_act.py: BatchNormAct2d ----------------------------------------------------


def _timm_create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True):
    """timm/layers/norm_act.py `_create_act` (without the string -> class lookup)."""
    act_kwargs = act_kwargs or {}
    if act_layer is not None and apply_act:
        if inplace:
            act_kwargs["inplace"] = inplace
        act = act_layer(**act_kwargs)
    else:
        act = nn.Identity()
    return act


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm `timm/layers/norm_act.py: BatchNormAct2d` (named BatchNormAct2d in timm; renamed here only
    because this file already has a simpler `BatchNormAct2d`).

    Inherits BatchNorm2d for state_dict compatibility but never calls `super().forward()`: forward is
    a cut & paste of BatchNorm2d.forward ending in its own `F.batch_norm(...)`, then `self.drop(x)` and
    `self.act(x)`. `apply_act=False` (or act_layer=None) makes `act` an nn.Identity.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats, **factory_kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _timm_create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace, apply_act=apply_act)

    def forward(self, x):
        # cut & paste of torch.nn.BatchNorm2d.forward impl to avoid issues with torchscript and tracing
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")  # timm: trace_utils._assert = torch._assert

        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum

        if self.training and self.track_running_stats:  # noqa: SIM102 - as timm writes it
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # use cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # use exponential moving average
                    exponential_average_factor = self.momentum

        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        x = F.batch_norm(
            x,
            # If buffers are not to be tracked, ensure that they won't be updated
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmNormActNet(nn.Module):
    """timm-style network (timm/layers/conv_bn_act.py ConvNormAct blocks) built from
    `TimmBatchNormAct2d` with ReLU, SiLU, Hardswish (with a drop_layer) and `apply_act=False` (Identity)."""

    track_running_stats = True

    def __init__(self) -> None:
        super().__init__()
        trs = self.track_running_stats
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), TimmBatchNormAct2d(8, act_layer=nn.ReLU, track_running_stats=trs))
        self.dw = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), TimmBatchNormAct2d(8, act_layer=nn.SiLU, track_running_stats=trs)
        )
        self.pw = nn.Sequential(
            nn.Conv2d(8, 12, 1, bias=False),
            TimmBatchNormAct2d(12, act_layer=nn.Hardswish, track_running_stats=trs, drop_layer=functools.partial(nn.Dropout, p=0.1)),
        )
        self.proj = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), TimmBatchNormAct2d(8, apply_act=False, track_running_stats=trs))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.proj(self.pw(self.dw(x)))
        return self.head(x.mean(dim=(2, 3)))


class TimmNormActNoStatsNet(TimmNormActNet):
    """`TimmNormActNet` with every `TimmBatchNormAct2d(track_running_stats=False)` (timm/layers/norm_act.py):
    running_mean/var are None, so `bn_training` is True in eval too: batch statistics at inference."""

    track_running_stats = False


# --- 3. detectron2/layers/batch_norm.py: NaiveSyncBatchNorm ------------------------------------------


def _differentiable_all_reduce(vec: torch.Tensor) -> torch.Tensor:
    """fvcore.nn.distributed.differentiable_all_reduce on a single process: the identity."""
    return vec


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2 `detectron2/layers/batch_norm.py: NaiveSyncBatchNorm`, single-device.

    In training it computes mean and E[x^2] over (N, H, W) by hand, "all-reduces" them (identity here),
    updates the running statistics itself and returns `input * scale + bias`: no batch_norm call is made.
    Eval uses `super().forward()` (running statistics). Deviation: detectron2 also takes
    `super().forward()` when world_size == 1; this replica always takes the hand-written path in
    training, as on a multi-GPU job.
    """

    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        assert stats_mode in ["", "N"]
        self._stats_mode = stats_mode

    def forward(self, input):
        if not self.training:
            return super().forward(input)

        B, C = input.shape[0], input.shape[1]

        half_input = input.dtype == torch.float16
        if half_input:
            # fp16 does not have good enough numerics for the reduction here
            input = input.float()
        mean = torch.mean(input, dim=[0, 2, 3])
        meansqr = torch.mean(input * input, dim=[0, 2, 3])

        if self._stats_mode == "":
            assert B > 0, 'SyncBatchNorm(stats_mode="") does not support zero batch size.'
            vec = torch.cat([mean, meansqr], dim=0)
            vec = _differentiable_all_reduce(vec) * (1.0 / 1)  # 1 / dist.get_world_size()
            mean, meansqr = torch.split(vec, C)
            momentum = self.momentum
        else:
            if B == 0:
                vec = torch.zeros([2 * C + 1], device=mean.device, dtype=mean.dtype)
                vec = vec + input.sum()  # make sure there is gradient w.r.t input
            else:
                vec = torch.cat([mean, meansqr, torch.ones([1], device=mean.device, dtype=mean.dtype)], dim=0)
            vec = _differentiable_all_reduce(vec * B)

            total_batch = vec[-1].detach()
            momentum = total_batch.clamp(max=1) * self.momentum  # no update if total_batch is 0
            mean, meansqr, _ = torch.split(vec / total_batch.clamp(min=1), C)  # avoid div-by-zero

        var = meansqr - mean * mean
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        bias = self.bias - mean * scale
        scale = scale.reshape(1, -1, 1, 1)
        bias = bias.reshape(1, -1, 1, 1)

        self.running_mean += momentum * (mean.detach() - self.running_mean)
        self.running_var += momentum * (var.detach() - self.running_var)
        ret = input * scale + bias
        if half_input:
            ret = ret.half()
        return ret


class NaiveSyncBNNet(nn.Module):
    """A detectron2-style conv trunk with `norm="naiveSyncBN"` / `"naiveSyncBN_N"` (detectron2/layers/batch_norm.py
    get_norm): every norm is a NaiveSyncBatchNorm, whose training statistics never go through batch_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = NaiveSyncBatchNorm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm2 = NaiveSyncBatchNorm(8, stats_mode="N")
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.norm1(self.conv1(x)))
        x = F.relu_(self.norm2(self.conv2(x)))
        return self.head(x)


# --- 4. timm/layers/norm_act.py: SyncBatchNormAct + convert_sync_batchnorm ----------------------------


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm `timm/layers/norm_act.py: SyncBatchNormAct(nn.SyncBatchNorm)`: `super().forward(x)` then the
    `drop` and `act` attributes that `convert_sync_batchnorm` copies over from a BatchNormAct2d.
    (nn.SyncBatchNorm runs on CPU without a process group: it only syncs when torch.distributed is
    initialized and the module is training.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)  # SyncBN doesn't work with torchscript anyways, so this is fine
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_convert_sync_batchnorm(module, process_group=None):
    """timm `timm/layers/norm_act.py: convert_sync_batchnorm`: BatchNormAct2d -> SyncBatchNormAct (act and
    drop attributes copied), other BatchNorm -> nn.SyncBatchNorm; parameters and buffers are shared."""
    module_output = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        if isinstance(module, TimmBatchNormAct2d):
            module_output = SyncBatchNormAct(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group=process_group
            )
            module_output.act = module.act
            module_output.drop = module.drop
        else:
            module_output = torch.nn.SyncBatchNorm(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
            )
        if module.affine:
            with torch.no_grad():
                module_output.weight = module.weight
                module_output.bias = module.bias
        module_output.running_mean = module.running_mean
        module_output.running_var = module.running_var
        module_output.num_batches_tracked = module.num_batches_tracked
        if hasattr(module, "qconfig"):
            module_output.qconfig = module.qconfig
    for name, child in module.named_children():
        module_output.add_module(name, timm_convert_sync_batchnorm(child, process_group))
    del module
    return module_output


class SyncBatchNormActNet(nn.Module):
    """A timm model after `timm.layers.convert_sync_batchnorm(model)` (what timm's train.py does with
    --sync-bn): TimmBatchNormAct2d layers became SyncBatchNormAct, a plain BatchNorm2d became nn.SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            TimmBatchNormAct2d(8, act_layer=nn.SiLU),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            TimmBatchNormAct2d(8, act_layer=nn.ReLU),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.features = timm_convert_sync_batchnorm(features)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# --- 5. torch_geometric/nn/norm/batch_norm.py: BatchNorm wrapper ---------------------------------------


class BatchNorm(nn.Module):
    """PyG `torch_geometric/nn/norm/batch_norm.py: BatchNorm(torch.nn.Module)`: a plain Module holding
    `self.module = torch.nn.BatchNorm1d(...)` over node features (num_nodes, C). With
    `allow_single_element=True` a batch of <= 1 node calls `F.batch_norm(..., False, 0.0, eps)` with the
    running statistics instead."""

    def __init__(
        self,
        in_channels: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        allow_single_element: bool = False,
    ):
        super().__init__()

        if allow_single_element and not track_running_stats:
            raise ValueError("'allow_single_element' requires 'track_running_stats' to be set to `True`")

        self.module = torch.nn.BatchNorm1d(in_channels, eps, momentum, affine, track_running_stats)
        self.in_channels = in_channels
        self.allow_single_element = allow_single_element

    def reset_parameters(self):
        self.module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.allow_single_element and x.size(0) <= 1:
            return torch.nn.functional.batch_norm(
                x,
                self.module.running_mean,
                self.module.running_var,
                self.module.weight,
                self.module.bias,
                False,  # bn_training
                0.0,  # momentum
                self.module.eps,
            )
        return self.module(x)

    def __repr__(self):
        return f"{self.__class__.__name__}({self.module.num_features})"


class PygGraphNet(nn.Module):
    """A two-layer GIN-style GNN (torch_geometric GINConv pattern, message passing written with plain
    torch: `index_add_` over `edge_index`) normalizing node features with the PyG `BatchNorm` wrapper.

    forward(x, edge_index): x (num_nodes, 6) float, edge_index (2, num_edges) int64 (row 0 source,
    row 1 target). BatchNorm statistics are over nodes: dimension 0 of x is the "batch"; dimension 0
    of edge_index is always 2.
    """

    def __init__(self, in_channels: int = 6, hidden: int = 16, out_channels: int = 3) -> None:
        super().__init__()
        self.lin1 = nn.Linear(in_channels, hidden)
        self.norm1 = BatchNorm(hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.norm2 = BatchNorm(hidden, allow_single_element=True)
        self.out = nn.Linear(hidden, out_channels)

    @staticmethod
    def propagate(h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Sum aggregation of source-node messages at each target node."""
        return torch.zeros_like(h).index_add_(0, edge_index[1], h[edge_index[0]])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x + self.propagate(x, edge_index))
        h = F.relu(self.norm1(h))
        h = self.lin2(h + self.propagate(h, edge_index))
        h = F.relu(self.norm2(h))
        return self.out(h)


# --- 6. torchvision/models/detection: forward(images, targets=None) -----------------------------------


class TinyDetector(nn.Module):
    """A conv-BN single-shot detector following torchvision `models/detection/ssd.py` / `retinanet.py` /
    `generalized_rcnn.py`: in training, `forward(images, targets=None)` does
    `torch._assert(False, "targets should not be none when in training mode")` and returns a dict of
    losses; in eval it returns the head outputs. BatchNorm as in `ssdlite.py`
    (`norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)`).

    Deviations: `images` is one batched tensor (N, 3, H, W) rather than a list, there is no transform
    or box decoding / NMS; eval returns (cls_logits (N, HWA, classes), bbox_regression (N, HWA, 4)).
    Train-mode targets: see labels_for("detector", n).
    """

    def __init__(self, num_classes: int = 3, num_anchors: int = 2) -> None:
        super().__init__()
        norm_layer = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            norm_layer(8),
            nn.ReLU6(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            norm_layer(8),
            nn.ReLU6(inplace=True),
            nn.Conv2d(8, 16, 1, bias=False),
            norm_layer(16),
            nn.ReLU6(inplace=True),
        )
        # ssdlite.py _prediction_block: depthwise ConvBNActivation, then a 1x1 projection
        self.cls_head = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            norm_layer(16),
            nn.ReLU6(inplace=True),
            nn.Conv2d(16, num_classes * num_anchors, 1),
        )
        self.bbox_head = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), norm_layer(16), nn.ReLU6(inplace=True), nn.Conv2d(16, 4 * num_anchors, 1)
        )

    @staticmethod
    def _flatten(results: torch.Tensor, k: int) -> torch.Tensor:
        # ssd.py SSDScoringHead._get_result_from_module_list: (N, A * K, H, W) -> (N, HWA, K)
        N, _, H, W = results.shape
        results = results.view(N, -1, k, H, W)
        results = results.permute(0, 3, 4, 1, 2)
        return results.reshape(N, -1, k)

    def forward(self, images: torch.Tensor, targets=None):
        if self.training:
            if targets is None:
                torch._assert(False, "targets should not be none when in training mode")
            else:
                for target in targets:
                    boxes = target["boxes"]
                    if isinstance(boxes, torch.Tensor):
                        torch._assert(
                            len(boxes.shape) == 2 and boxes.shape[-1] == 4,
                            f"Expected target boxes to be a tensor of shape [N, 4], got {boxes.shape}.",
                        )
                    else:
                        torch._assert(False, f"Expected target boxes to be of type Tensor, got {type(boxes)}.")

        features = self.backbone(images)
        cls_logits = self._flatten(self.cls_head(features), self.num_classes)
        bbox_regression = self._flatten(self.bbox_head(features), 4)

        if self.training:
            # stand-in for anchor matching: each image's first ground-truth box and label
            labels = torch.stack([t["labels"][0] for t in targets])
            boxes = torch.stack([t["boxes"][0] for t in targets])
            return {
                "classification": F.cross_entropy(cls_logits.mean(dim=1), labels),
                "bbox_regression": F.smooth_l1_loss(bbox_regression.mean(dim=1), boxes),
            }
        return cls_logits, bbox_regression


# --- 7. transformers speech: wav2vec2-conformer conv module, SpecAugment, FastSpeech2 label check ------


def _compute_mask_indices(shape, mask_prob: float, mask_length: int, min_masks: int = 0):
    """transformers `models/wav2vec2/modeling_wav2vec2.py: _compute_mask_indices`, simplified: per row,
    `int(mask_prob * length / mask_length + rand)` (at least min_masks) random spans of mask_length
    steps. Uses torch's RNG where transformers uses numpy's."""
    batch_size, sequence_length = shape
    mask = torch.zeros(shape, dtype=torch.bool)
    for b in range(batch_size):
        num_masked_span = int(mask_prob * sequence_length / mask_length + torch.rand(()).item())
        num_masked_span = min(max(num_masked_span, min_masks), sequence_length // mask_length)
        starts = torch.randperm(sequence_length - mask_length + 1)[:num_masked_span]
        for start in starts.tolist():
            mask[b, start : start + mask_length] = True
    return mask.numpy()  # transformers returns a numpy array, turned into a tensor by the caller


class ConformerConvolutionModule(nn.Module):
    """transformers `models/wav2vec2_conformer/modeling_wav2vec2_conformer.py: Wav2Vec2ConformerConvolutionModule`:
    LayerNorm, pointwise Conv1d + GLU, depthwise Conv1d, `nn.BatchNorm1d(hidden_size)` over (N, C, T),
    activation (swish), pointwise Conv1d, dropout. Input and output (N, T, C)."""

    def __init__(self, hidden_size: int = 16, conv_depthwise_kernel_size: int = 3, conformer_conv_dropout: float = 0.1) -> None:
        super().__init__()
        if (conv_depthwise_kernel_size - 1) % 2 == 1:
            raise ValueError("`config.conv_depthwise_kernel_size` should be a odd number for 'SAME' padding")
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.pointwise_conv1 = nn.Conv1d(hidden_size, 2 * hidden_size, kernel_size=1, stride=1, padding=0, bias=False)
        self.glu = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv1d(
            hidden_size,
            hidden_size,
            conv_depthwise_kernel_size,
            stride=1,
            padding=(conv_depthwise_kernel_size - 1) // 2,
            groups=hidden_size,
            bias=False,
        )
        self.batch_norm = nn.BatchNorm1d(hidden_size)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=1, stride=1, padding=0, bias=False)
        self.dropout = nn.Dropout(conformer_conv_dropout)

    def forward(self, hidden_states):
        hidden_states = self.layer_norm(hidden_states)
        # exchange the temporal dimension and the feature dimension
        hidden_states = hidden_states.transpose(1, 2)

        # GLU mechanism
        hidden_states = self.pointwise_conv1(hidden_states)
        hidden_states = self.glu(hidden_states)

        # 1D Depthwise Conv
        hidden_states = self.depthwise_conv(hidden_states)
        hidden_states = self.batch_norm(hidden_states)
        hidden_states = self.activation(hidden_states)

        hidden_states = self.pointwise_conv2(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states.transpose(1, 2)
        return hidden_states


class SpeechConformer(nn.Module):
    """A tiny speech model assembled from transformers patterns:
    - `modeling_fastspeech2_conformer.py`: `if self.training and has_missing_labels:
      raise ValueError("All labels must be provided to run in training mode.")`;
    - `modeling_wav2vec2.py: Wav2Vec2Model._mask_hidden_states`: SpecAugment time masking only when
      `self.training` (`hidden_states[mask_time_indices] = self.masked_spec_embed`);
    - `modeling_wav2vec2_conformer.py`: the conformer convolution module (depthwise Conv1d + BatchNorm1d).

    forward(input_features (N, T=12, F=8), labels=None (N, T) int64): eval -> logits (N, T, vocab);
    with labels -> (loss, logits).
    """

    def __init__(
        self,
        input_dim: int = 8,
        hidden_size: int = 16,
        vocab_size: int = 5,
        mask_time_prob: float = 0.3,
        mask_time_length: int = 2,
        mask_time_min_masks: int = 2,
    ) -> None:
        super().__init__()
        self.mask_time_prob = mask_time_prob
        self.mask_time_length = mask_time_length
        self.mask_time_min_masks = mask_time_min_masks
        self.feature_projection = nn.Linear(input_dim, hidden_size)
        self.masked_spec_embed = nn.Parameter(torch.Tensor(hidden_size).uniform_())
        self.conv_module = ConformerConvolutionModule(hidden_size)
        self.final_layer_norm = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size)

    def _mask_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # generate indices & apply SpecAugment along time axis
        batch_size, sequence_length, _ = hidden_states.size()
        if self.mask_time_prob > 0 and self.training:
            mask_time_indices = _compute_mask_indices(
                (batch_size, sequence_length), mask_prob=self.mask_time_prob, mask_length=self.mask_time_length, min_masks=self.mask_time_min_masks
            )
            mask_time_indices = torch.tensor(mask_time_indices, device=hidden_states.device, dtype=torch.bool)
            hidden_states[mask_time_indices] = self.masked_spec_embed.to(hidden_states.dtype)
        return hidden_states

    def forward(self, input_features: torch.Tensor, labels=None):
        has_missing_labels = labels is None
        if self.training and has_missing_labels:
            raise ValueError("All labels must be provided to run in training mode.")
        hidden_states = self.feature_projection(input_features)
        hidden_states = self._mask_hidden_states(hidden_states)
        hidden_states = hidden_states + self.conv_module(hidden_states)
        logits = self.lm_head(self.final_layer_norm(hidden_states))
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            return loss, logits
        return logits


# --- 8. torchvision/ops/stochastic_depth.py, timm/layers/drop.py ---------------------------------------


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision `torchvision/ops/stochastic_depth.py: stochastic_depth` (minus API-usage logging)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input

    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    """torchvision `torchvision/ops/stochastic_depth.py: StochasticDepth`."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode})"


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm `timm/layers/drop.py: drop_path` (stochastic depth per sample)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class StochasticDepthNet(nn.Module):
    """Residual conv-BN blocks with stochastic depth three ways: torchvision `StochasticDepth(p, "row")`
    and `StochasticDepth(p, "batch")` modules (as in torchvision efficientnet.py / convnext.py), a
    functional timm `drop_path(x, rate, self.training)` call (timm/layers/drop.py), and a final
    `F.dropout(x, p, training=self.training)` before the classifier."""

    def __init__(
        self, width: int = 8, classes: int = 4, stochastic_depth_prob: float = 0.2, drop_path_rate: float = 0.1, dropout: float = 0.2
    ) -> None:
        super().__init__()

        def block() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
            )

        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = block()
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.block2 = block()
        self.drop_path_rate = drop_path_rate
        self.block3 = block()
        self.batch_depth = StochasticDepth(stochastic_depth_prob, "batch")
        self.dropout = dropout
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.stochastic_depth(self.block1(x)))
        x = F.relu(x + drop_path(self.block2(x), self.drop_path_rate, self.training))
        x = F.relu(x + self.batch_depth(self.block3(x)))
        x = F.dropout(x.mean(dim=(2, 3)), self.dropout, training=self.training)
        return self.fc(x)


# --- 9. pytorch_tabnet/tab_network.py: ghost batch norm -----------------------------------------------


class GBN(nn.Module):
    """pytorch-tabnet `pytorch_tabnet/tab_network.py: GBN` (Ghost Batch Normalization): the batch is cut
    into `ceil(N / virtual_batch_size)` chunks, one BatchNorm1d normalizes each chunk, results are
    concatenated (math.ceil where tabnet uses np.ceil)."""

    def __init__(self, input_dim, virtual_batch_size=128, momentum=0.01):
        super().__init__()
        self.input_dim = input_dim
        self.virtual_batch_size = virtual_batch_size
        self.bn = nn.BatchNorm1d(self.input_dim, momentum=momentum)

    def forward(self, x):
        chunks = x.chunk(math.ceil(x.shape[0] / self.virtual_batch_size), 0)
        res = [self.bn(x_) for x_ in chunks]
        return torch.cat(res, dim=0)


class GLULayer(nn.Module):
    """pytorch-tabnet `tab_network.py: GLU_Layer`: Linear -> GBN -> gated linear unit."""

    def __init__(self, input_dim, output_dim, fc=None, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.output_dim = output_dim
        self.fc = fc if fc else nn.Linear(input_dim, 2 * output_dim, bias=False)
        self.bn = GBN(2 * output_dim, virtual_batch_size=virtual_batch_size, momentum=momentum)

    def forward(self, x):
        x = self.fc(x)
        x = self.bn(x)
        return torch.mul(x[:, : self.output_dim], torch.sigmoid(x[:, self.output_dim :]))


class AttentiveTransformer(nn.Module):
    """pytorch-tabnet `tab_network.py: AttentiveTransformer` (GBN -> Linear -> x priors -> selector);
    softmax stands in for sparsemax."""

    def __init__(self, input_dim, output_dim, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim, bias=False)
        self.bn = GBN(output_dim, virtual_batch_size=virtual_batch_size, momentum=momentum)

    def forward(self, priors, processed_feat):
        x = self.bn(processed_feat)
        x = self.fc(x)
        x = torch.mul(x, priors)
        return torch.softmax(x, dim=-1)


class TabNetGBN(nn.Module):
    """A two-step TabNet (pytorch-tabnet `tab_network.py: TabNetNoEmbeddings`) with `initial_bn =
    BatchNorm1d(input_dim, momentum=0.01)` and ghost batch norm everywhere else, virtual_batch_size=2
    (a batch of 4 is normalized as 2 chunks of 2). Returns the logits only (TabNet also returns M_loss)."""

    def __init__(
        self,
        input_dim: int = 6,
        output_dim: int = 3,
        n_d: int = 8,
        n_steps: int = 2,
        gamma: float = 1.3,
        virtual_batch_size: int = 2,
        momentum: float = 0.02,
    ) -> None:
        super().__init__()
        self.n_steps = n_steps
        self.gamma = gamma
        self.initial_bn = nn.BatchNorm1d(input_dim, momentum=0.01)
        params = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        self.initial_attention = AttentiveTransformer(input_dim, input_dim, **params)
        self.feat_transformers = nn.ModuleList(
            nn.ModuleList([GLULayer(input_dim, n_d, **params), GLULayer(n_d, n_d, **params)]) for _ in range(n_steps)
        )
        self.att_transformers = nn.ModuleList(AttentiveTransformer(input_dim, input_dim, **params) for _ in range(n_steps))
        self.final_mapping = nn.Linear(n_d, output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = 0
        initial_x = self.initial_bn(x)
        prior = torch.ones(x.shape).to(x.device)
        M = self.initial_attention(prior, x)
        for step in range(self.n_steps):
            prior = 1 - self.gamma * M
            masked_x = torch.mul(M, x)
            first, second = self.feat_transformers[step]
            out = first(masked_x)
            out = (out + second(out)) * math.sqrt(0.5)  # GLU_Block: x = (x + glu(x)) * sqrt(0.5)
            res = torch.add(res, F.relu(out))
            M = self.att_transformers[step](prior, initial_x)
        return self.final_mapping(res)


# --- 10. transformers TF-ported convnets: mobilenet_v2 / efficientnet ---------------------------------


def apply_tf_padding(features: torch.Tensor, conv_layer: nn.Conv2d) -> torch.Tensor:
    """transformers `models/mobilenet_v2/modeling_mobilenet_v2.py: apply_tf_padding` (TensorFlow "SAME")."""
    in_height = int(features.shape[-2])
    in_width = int(features.shape[-1])
    stride_height, stride_width = conv_layer.stride
    kernel_height, kernel_width = conv_layer.kernel_size
    dilation_height, dilation_width = conv_layer.dilation

    if in_height % stride_height == 0:
        pad_along_height = max(kernel_height - stride_height, 0)
    else:
        pad_along_height = max(kernel_height - (in_height % stride_height), 0)

    if in_width % stride_width == 0:
        pad_along_width = max(kernel_width - stride_width, 0)
    else:
        pad_along_width = max(kernel_width - (in_width % stride_width), 0)

    pad_left = pad_along_width // 2
    pad_right = pad_along_width - pad_left
    pad_top = pad_along_height // 2
    pad_bottom = pad_along_height - pad_top

    padding = (pad_left * dilation_width, pad_right * dilation_width, pad_top * dilation_height, pad_bottom * dilation_height)
    return nn.functional.pad(features, padding, "constant", 0.0)


class MobileNetV2ConvLayer(nn.Module):
    """transformers `modeling_mobilenet_v2.py: MobileNetV2ConvLayer` with `config.tf_padding=True`:
    `nn.BatchNorm2d(num_features=out_channels, eps=config.layer_norm_eps (0.001), momentum=0.997, ...)`.
    momentum=0.997 is TensorFlow's decay copied unconverted: in PyTorch terms each training batch
    replaces 99.7% of the running statistics."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_activation: bool = True,
        layer_norm_eps: float = 0.001,
    ) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False, padding_mode="zeros"
        )
        self.normalization = nn.BatchNorm2d(num_features=out_channels, eps=layer_norm_eps, momentum=0.997, affine=True, track_running_stats=True)
        self.activation = nn.ReLU6() if use_activation else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = apply_tf_padding(features, self.convolution)
        features = self.convolution(features)
        if self.normalization is not None:
            features = self.normalization(features)
        if self.activation is not None:
            features = self.activation(features)
        return features


class TFPortedNet(nn.Module):
    """TF-ported conv blocks from transformers: an EfficientNet stem (`models/efficientnet/modeling_efficientnet.py:
    EfficientNetEmbeddings`: ZeroPad2d((0, 1, 0, 1)), stride-2 "valid" conv, `nn.BatchNorm2d(eps=config.batch_norm_eps
    (1e-3), momentum=config.batch_norm_momentum (0.99))`, swish) and a MobileNetV2 inverted residual of
    `MobileNetV2ConvLayer`s with BatchNorm2d(eps=1e-3, momentum=0.997) and TF "SAME" padding."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.padding = nn.ZeroPad2d(padding=(0, 1, 0, 1))
        self.convolution = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding="valid", bias=False)
        self.batchnorm = nn.BatchNorm2d(8, eps=1e-3, momentum=0.99)
        self.activation = nn.SiLU()
        self.expand_1x1 = MobileNetV2ConvLayer(8, 24, kernel_size=1)
        self.conv_3x3 = MobileNetV2ConvLayer(24, 24, kernel_size=3, stride=1, groups=24)
        self.reduce_1x1 = MobileNetV2ConvLayer(24, 8, kernel_size=1, use_activation=False)
        self.classifier = nn.Linear(8, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.batchnorm(self.convolution(self.padding(pixel_values))))
        x = x + self.reduce_1x1(self.conv_3x3(self.expand_1x1(x)))
        return self.classifier(x.mean(dim=(2, 3)))


# --- registry and helpers -------------------------------------------------------------------------------

# --- torchvision/models/resnet.py: BasicBlock ------------------------------------------------------------


class TorchvisionBasicBlock(nn.Module):
    """torchvision `BasicBlock`: `self.relu = nn.ReLU(inplace=True)` after each norm and `out += identity`
    (both in place on a norm's output: what fails under Opacus' backward hooks)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class TorchvisionResNet(nn.Module):
    """A two-block torchvision ResNet (stem, a block, a downsampling block, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(16, 16), TorchvisionBasicBlock(16, 32, 2, downsample))
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


# --- 11. pytorch-deeplab-xception modeling/sync_batchnorm/batchnorm.py: SynchronizedBatchNorm2d ------


class _SyncMaster:
    """vacancy/Synchronized-BatchNorm-PyTorch `comm.py: SyncMaster` (vendored by pytorch-deeplab-xception),
    reduced to its state: the queue its replicas report to under its DataParallelWithCallback. It
    pickles without the queue (`__getstate__`), as the upstream version does."""

    def __init__(self, master_callback) -> None:
        import collections
        import queue

        self._master_callback = master_callback
        self._queue = queue.Queue()
        self._registry = collections.OrderedDict()
        self._activated = False

    def __getstate__(self):
        return {"master_callback": self._master_callback}

    def __setstate__(self, state) -> None:
        self.__init__(state["master_callback"])


class _SynchronizedBatchNorm(_BatchNorm):
    """pytorch-deeplab-xception `_SynchronizedBatchNorm(_BatchNorm)`: built on torch's base class (it has
    no rank of its own). Outside its DataParallelWithCallback, or in eval, forward is `F.batch_norm`.
    Deviation: the multi-GPU path (sum and square sum reduced by the sync master, statistics by hand)
    is not replicated: it runs only after `__data_parallel_replicate__` set `_is_parallel`."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self._sync_master = _SyncMaster(self._data_parallel_master)
        self._is_parallel = False
        self._parallel_id = None
        self._slave_pipe = None

    def forward(self, input):
        # If it is not parallel computation or is in evaluation mode, use PyTorch's implementation.
        if not (self._is_parallel and self.training):
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        raise NotImplementedError("the DataParallelWithCallback path is not replicated")

    def __data_parallel_replicate__(self, ctx, copy_id):
        self._is_parallel = True
        self._parallel_id = copy_id

    def _data_parallel_master(self, intermediates):
        raise NotImplementedError("the DataParallelWithCallback path is not replicated")


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    """pytorch-deeplab-xception `SynchronizedBatchNorm2d`: its rank lives in `_check_input_dim` only."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        super()._check_input_dim(input)


class _ASPPModule(nn.Module):
    """pytorch-deeplab-xception `modeling/aspp.py: _ASPPModule`: atrous conv, the chosen BatchNorm, ReLU."""

    def __init__(self, inplanes, planes, kernel_size, padding, dilation, BatchNorm):
        super().__init__()
        self.atrous_conv = nn.Conv2d(
            inplanes, planes, kernel_size=kernel_size, stride=1, padding=padding, dilation=dilation, bias=False
        )
        self.bn = BatchNorm(planes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.atrous_conv(x)
        x = self.bn(x)
        return self.relu(x)


class DeepLabSyncBNNet(nn.Module):
    """A DeepLab ASPP head built as pytorch-deeplab-xception's `DeepLab(sync_bn=True)` builds it:
    `BatchNorm = SynchronizedBatchNorm2d if sync_bn else nn.BatchNorm2d`, passed down to each module."""

    def __init__(self, sync_bn: bool = True) -> None:
        super().__init__()
        BatchNorm = SynchronizedBatchNorm2d if sync_bn else nn.BatchNorm2d
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(8)
        self.aspp1 = _ASPPModule(8, 8, 1, padding=0, dilation=1, BatchNorm=BatchNorm)
        self.aspp2 = _ASPPModule(8, 8, 3, padding=2, dilation=2, BatchNorm=BatchNorm)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        return self.head(torch.cat([self.aspp1(x), self.aspp2(x)], dim=1))


REAL_PATTERNS = {
    "torchvision_resnet": TorchvisionResNet,
    "timm_norm_act": TimmNormActNet,
    "timm_norm_act_no_stats": TimmNormActNoStatsNet,
    "naive_sync_bn": NaiveSyncBNNet,
    "sync_bn_act": SyncBatchNormActNet,
    "pyg_graph": PygGraphNet,
    "detector": TinyDetector,
    "speech_conformer": SpeechConformer,
    "stochastic_depth": StochasticDepthNet,
    "tabnet_gbn": TabNetGBN,
    "tf_ported": TFPortedNet,
    "deeplab_sync_bn": DeepLabSyncBNNet,
}

# models whose forward raises in full train mode without labels/targets: build_real() trains only
# their BatchNorm modules (the rest stays in eval, so no labels are needed)
REAL_NEEDS_LABELS = frozenset({"detector", "speech_conformer"})


def inputs_for(name: str, batch: int = 4) -> tuple[torch.Tensor, ...]:
    """The positional example inputs of REAL_PATTERNS[name] for an eval-mode forward, batch first.

    Every model takes `(input_for(name, batch),)` except "pyg_graph", which takes
    `(x, edge_index)`: x = input_for("pyg_graph", batch) is (batch, 6) node features and edge_index
    is a (2, 2 * batch) int64 ring graph (i -> i+1 and i+1 -> i, modulo batch).
    """
    x = input_for(name, batch)
    if name == "pyg_graph":
        nodes = torch.arange(batch, dtype=torch.int64)
        following = (nodes + 1) % batch
        edge_index = torch.stack([torch.cat([nodes, following]), torch.cat([following, nodes])])
        return (x, edge_index)
    return (x,)


def labels_for(name: str, batch: int = 4) -> dict:
    """Keyword arguments forward() needs in full train mode: {"targets": [...]} for "detector" (per image a
    dict with "boxes" (2, 4) float and "labels" (2,) int64), {"labels": (batch, 12) int64} for
    "speech_conformer", {} otherwise."""
    generator = torch.Generator().manual_seed(4321)
    if name == "detector":
        return {
            "targets": [
                {"boxes": torch.rand((2, 4), generator=generator), "labels": torch.randint(0, 3, (2,), generator=generator)} for _ in range(batch)
            ]
        }
    if name == "speech_conformer":
        return {"labels": torch.randint(0, 5, (batch, 12), generator=generator)}
    return {}


def build_real(name: str, seed: int = 0) -> nn.Module:
    """REAL_PATTERNS[name] with deterministic weights and non-trivial BatchNorm statistics (like build()).

    Three no-grad train-mode passes on shifted inputs (batch 8); for REAL_NEEDS_LABELS only the
    BatchNorm modules are in train mode. Then every affine BatchNorm gets weights in [0.5, 1.5] and
    biases in [-0.2, 0.2]. Returned in eval mode.
    """
    torch.manual_seed(seed)
    model = REAL_PATTERNS[name]()
    shifted = tuple(x * 1.5 + 0.3 if x.is_floating_point() else x for x in inputs_for(name, batch=8))
    with torch.no_grad():
        if name in REAL_NEEDS_LABELS:
            model.eval()
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    module.train()
        else:
            model.train()
        for _ in range(3):  # move running statistics away from (0, 1)
            model(*shifted)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()
