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
        "resnet": (3, 12, 12), "mobilenet": (3, 16, 16), "mlp": (10,), "tcn": (4, 20), "rnn": (4, 6),
        "functional": (3, 8, 8), "subclass": (3, 8, 8), "bn3d": (2, 4, 6, 6), "no_affine": (3, 8, 8),
        "no_running_stats": (3, 8, 8), "lazy": (3, 8, 8), "untraceable": (3, 8, 8), "no_bn": (3, 8, 8),
        "lookalike": (3, 8, 8),
    }
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((batch, *shapes[name]), generator=generator)


MODELS = {
    "resnet": ResNetStyle, "mobilenet": MobileNetStyle, "mlp": MLP, "tcn": TemporalConvNet, "rnn": RecurrentBN,
    "functional": FunctionalBN, "subclass": SubclassBN, "bn3d": Conv3dBN, "no_affine": NoAffineBN,
    "no_running_stats": NoRunningStatsBN, "lazy": LazyBN, "untraceable": Untraceable, "no_bn": NoBN,
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
