"""A batch-normalized LSTM (Cooijmans et al., "Recurrent Batch Normalization"): BatchNorm1d on
the gate pre-activations, one module reused at every time step."""

import torch
from torch import nn


class BNLSTMCell(nn.Module):
    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(input_size, 4 * hidden, bias=False)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.bn_ih = nn.BatchNorm1d(4 * hidden)
        self.bn_hh = nn.BatchNorm1d(4 * hidden)
        self.bn_c = nn.BatchNorm1d(hidden)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.bn_ih(self.ih(x)) + self.bn_hh(self.hh(h))
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.bn_c(c))
        return h, c


class Net(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.cell = BNLSTMCell(features, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden)
        c = x.new_zeros(x.shape[0], self.cell.hidden)
        for step in range(x.shape[1]):
            h, c = self.cell(x[:, step], (h, c))
        return self.head(h)


def build() -> nn.Module:
    return Net()


INPUT_SHAPE = (4, 5, 6)
