"""A norm class passed as a value: a parameter default, a keyword at the caller, a
functools.partial carrying eps, and a module-level alias."""

import functools

import torch
from torch import nn


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


Norm = _group_norm


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, norm_layer: type[nn.Module] = _group_norm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = norm_layer(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stage(3, 16)
        self.body = Stage(16, 32, norm_layer=functools.partial(_group_norm, eps=1e-3))
        self.tail = Stage(32, 64, Norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.stem(x))).mean((2, 3))


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (2, 3, 8, 8)
