"""One construction line, several layers: a conv_bn helper called in a loop for different widths,
a norm helper always called with the same width, and a comprehension over a computed width."""

import torch
import torch.nn as nn
import normswap.nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm({16: 1, 32: 2, 64: 4}[cout], cout), nn.ReLU(inplace=True))


def norm(channels: int) -> nn.Module:
    return nn.GroupNorm(4, channels, eps=1e-3)


class Net(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers = []
        cin = 3
        for width in widths:
            layers.append(conv_bn(cin, width, stride=2 if width > 16 else 1))
            cin = width
        self.features = nn.Sequential(*layers)
        self.mix = nn.ModuleList([nn.Conv2d(cin, cin, 1) for _ in range(2)])
        self.mix_norms = nn.ModuleList([norm(cin) for _ in range(2)])
        self.expand = nn.ModuleList([nn.Conv2d(cin, cin * k, 1) for k in (1, 2)])
        self.expand_norms = nn.ModuleList([normswap.nn.GroupNormBN(cin * k, groups={64: 4, 128: 8}) for k in (1, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        for conv, bn in zip(self.mix, self.mix_norms, strict=True):
            x = torch.relu(bn(conv(x)))
        y = [bn(conv(x)) for conv, bn in zip(self.expand, self.expand_norms, strict=True)]
        return y[0].mean((1, 2, 3)) + y[1].mean((1, 2, 3))


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (2, 3, 16, 16)
