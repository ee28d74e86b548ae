"""A norm class passed as a value: a parameter default, a keyword at the caller, a
functools.partial carrying eps, and a module-level alias."""

import functools

import torch
from torch import nn
import normswap.nn

Norm = normswap.nn.GroupNormBN


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, norm_layer: type[nn.Module] = normswap.nn.GroupNormBN) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = norm_layer(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stage(3, 16)
        self.body = Stage(16, 32, norm_layer=functools.partial(normswap.nn.GroupNormBN, eps=1e-3))
        self.tail = Stage(32, 64, Norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.stem(x))).mean((2, 3))


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (2, 3, 8, 8)
