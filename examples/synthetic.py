"""Generated data with real structure, and small BatchNorm models that learn it (no downloads).

- shapes: 16x16 RGB images of 4 classes (horizontal stripes, vertical stripes, checkerboard,
  centred blob) with random frequency, phase, colour, contrast and noise.
- sequences: (N, T=12, F=6) sequences of 3 classes (rising, falling, oscillating trend) with noise.
- tabular: (N, 8) raw features of very different scales (an income around 5e4, an age, a ratio
  around 0.01, counts...) and 3 classes from a nonlinear rule on the standardized features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def shapes_dataset(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    freq = 0.5 + torch.rand(n, 1, 1, generator=g) * 0.9
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    horizontal = torch.sin(ys * freq + phase)
    vertical = torch.sin(xs * freq + phase)
    checker = torch.sin(xs * freq + phase) * torch.sin(ys * freq + phase) * 2
    radius = 3 + torch.rand(n, 1, 1, generator=g) * 3
    blob = (((xs - size / 2) ** 2 + (ys - size / 2) ** 2) < radius**2).float() * 2 - 1
    pattern = torch.stack([horizontal, vertical, checker, blob], 1)[torch.arange(n), labels]  # (N, H, W)
    colour = torch.rand(n, 3, 1, 1, generator=g) + 0.3
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g) * 1.5
    offset = torch.randn(n, 1, 1, 1, generator=g) * 0.5
    images = pattern[:, None] * colour * contrast + offset + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return images, labels


def sequence_dataset(n: int, seed: int = 0, steps: int = 12, features: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    t = torch.linspace(0, 1, steps)[None, :, None]
    slope = (0.8 + torch.rand(n, 1, 1, generator=g)) * torch.where(labels == 0, 1.0, -1.0)[:, None, None]
    trend = torch.where(
        (labels == 2)[:, None, None], torch.sin(t * 12 + torch.rand(n, 1, 1, generator=g) * 6), slope * t * 2
    )
    mixing = torch.rand(n, 1, features, generator=g) + 0.5  # positive: rising stays rising
    data = (
        trend * mixing
        + 0.3 * torch.randn(n, steps, features, generator=g)
        + torch.randn(n, 1, features, generator=g) * 0.5
    )
    return data, labels


TABULAR_SCALES = torch.tensor([5e4, 40.0, 0.01, 3.0, 1e3, 0.5, 200.0, 7.0])
TABULAR_OFFSETS = torch.tensor([6e4, 45.0, 0.02, 10.0, -2e3, 1.0, 500.0, 0.0])


def tabular_dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)  # the standardized features the rule is written in
    score = torch.stack(
        [
            z[:, 0] + 0.8 * z[:, 1] * z[:, 2],
            z[:, 3] - z[:, 4].abs() + 0.5 * z[:, 5],
            torch.sin(2 * z[:, 6]) + z[:, 7] * z[:, 0],
        ],
        1,
    )
    labels = (score + 0.3 * torch.randn(n, 3, generator=g)).argmax(1)
    return z * TABULAR_SCALES + TABULAR_OFFSETS, labels  # what a tabular model receives: raw units


class TabularMLP(nn.Module):
    """A tabular classifier whose first BatchNorm1d standardizes the raw features, as tabular
    models are written (the only normalization of inputs of very different scales)."""

    def __init__(self, features: int = 8, hidden: int = 64, classes: int = 3, hidden_norm: bool = True) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm1d(features)
        self.fc1 = nn.Linear(features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden) if hidden_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden) if hidden_norm else nn.Identity()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(self.input_bn(x))))
        return self.head(F.relu(self.bn2(self.fc2(x))))


class ShapesNet(nn.Module):
    """A small conv-BN classifier (3 conv-BN-ReLU blocks, global pooling, linear head)."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


def sync_shapes_net(width: int = 16) -> nn.Module:
    """ShapesNet as a data-parallel training script leaves it: every BatchNorm a SyncBatchNorm
    (`nn.SyncBatchNorm.convert_sync_batchnorm`); its checkpoints have ShapesNet's keys."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(ShapesNet(width))


class SequenceRNN(nn.Module):
    """An RNN cell that applies one BatchNorm1d at every time step (the recurrent case)."""

    def __init__(self, features: int = 6, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.ih = nn.Linear(features, hidden)
        self.hh = nn.Linear(hidden, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F)
        h = self.hh.weight.new_zeros(x.shape[0], self.hh.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.bn(self.ih(x[:, t]) + self.hh(h)))
        return self.head(h)


def train(
    model: nn.Module,
    data: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """Plain supervised training with Adam; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(data[idx]), labels[idx]).backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.eval()(data).argmax(1) == labels).float().mean())


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, data: torch.Tensor) -> float:
    return float((a.eval()(data).argmax(1) == b.eval()(data).argmax(1)).float().mean())
