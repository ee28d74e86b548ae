"""A project folder with a small conv-BN model file and a trained checkpoint, for CLI tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from normswap.cli import main

NETS = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, 4)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    def build(width=8):
        return Net(width)

    def returns_string():
        return "net"
    """
)
SHAPE = ["--input-shape", "2,3,8,8"]


@pytest.fixture()
def work(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("nets", None)
    nets = importlib.import_module("nets")
    torch.manual_seed(0)
    model = nets.Net()
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 8, 8) * 2 + 1)  # non-trivial running statistics
        model.bn.weight.uniform_(0.5, 1.5)
    torch.save(model.eval().state_dict(), tmp_path / "plain.pt")
    return tmp_path


def convert(*args: str, catch: bool = True):
    return CliRunner().invoke(main, ["convert", *args], catch_exceptions=catch)


def state(work: Path) -> dict:
    return torch.load(work / "plain.pt", weights_only=True)
