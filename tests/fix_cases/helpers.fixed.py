"""One construction line, several layers: a conv_bn helper called in a loop for different widths,
a norm helper always called with the same width, and a comprehension over a computed width."""

import torch
import torch.nn as nn


def _group_norm(num_features, eps=1e-5, momentum=None, affine=True, track_running_stats=None,
                device=None, dtype=None, *, max_groups=32, channels_per_group=16):
    """torch.nn.GroupNorm taking BatchNorm's arguments (written by `normswap lint --fix`; momentum
    and track_running_stats mean nothing to it). The group count is the one `normswap convert`
    chooses: the largest divisor of num_features up to max_groups that leaves at least
    channels_per_group channels per group, else one group."""
    groups = [g for g in range(1, max_groups + 1)
              if num_features % g == 0 and num_features // g >= channels_per_group]
    return torch.nn.GroupNorm(max(groups, default=1), num_features, eps=eps, affine=affine,
                              device=device, dtype=dtype)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _group_norm(cout), nn.ReLU(inplace=True))


def norm(channels: int) -> nn.Module:
    return _group_norm(channels, eps=1e-3)


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
        self.expand_norms = nn.ModuleList([_group_norm(cin * k) for k in (1, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        for conv, bn in zip(self.mix, self.mix_norms, strict=True):
            x = torch.relu(bn(conv(x)))
        y = [bn(conv(x)) for conv, bn in zip(self.expand, self.expand_norms, strict=True)]
        return y[0].mean((1, 2, 3)) + y[1].mean((1, 2, 3))


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (2, 3, 16, 16)
