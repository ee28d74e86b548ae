"""Three ways to name BatchNorm: an imported alias, `from torch import nn`, and torch.nn spelt out."""

import torch
from torch import nn
from torch.nn import Conv2d, ReLU


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = Conv2d(3, 32, 3, padding=1)
        self.norm_a = torch.nn.GroupNorm(2, 32)
        self.act = ReLU()
        self.norm_b = torch.nn.GroupNorm(2, 32, eps=1e-4)
        self.norm_c = nn.GroupNorm(2, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_c(self.norm_b(self.act(self.norm_a(self.conv(x)))))


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (2, 3, 8, 8)
