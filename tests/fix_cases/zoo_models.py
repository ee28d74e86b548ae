"""Stands for an installed model zoo (copied into a site-packages folder by the tests)."""

from torch import nn


class Tiny(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def create_model(name: str, **kwargs) -> nn.Module:
    return {"tiny": Tiny}[name](**kwargs)
