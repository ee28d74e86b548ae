"""TabNet (dreamquark-ai/tabnet pytorch_tabnet/tab_network.py, shrunk): ghost batch norm (GBN: the
batch cut into chunks of `virtual_batch_size`, one BatchNorm1d per chunk, `torch.cat`) in every
GLU layer and attentive transformer, an encoder whose `initial_bn` normalizes the raw features,
and a wrapper that builds an identical `initial_bn` its forward never calls. `BatchNorm1d` is
imported by name from torch.nn."""

import math

import torch
from torch.nn import BatchNorm1d, Linear, ReLU


class GBN(torch.nn.Module):
    """Ghost batch norm: each chunk of the batch is normalized by its own statistics."""

    def __init__(self, input_dim, virtual_batch_size=128, momentum=0.01):
        super().__init__()
        self.input_dim = input_dim
        self.virtual_batch_size = virtual_batch_size
        self.bn = BatchNorm1d(self.input_dim, momentum=momentum)

    def forward(self, x):
        pieces = x.chunk(math.ceil(x.shape[0] / self.virtual_batch_size), 0)
        return torch.cat([self.bn(piece) for piece in pieces], dim=0)


class GLULayer(torch.nn.Module):
    def __init__(self, input_dim, output_dim, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.output_dim = output_dim
        self.fc = Linear(input_dim, 2 * output_dim, bias=False)
        self.bn = GBN(2 * output_dim, virtual_batch_size=virtual_batch_size, momentum=momentum)

    def forward(self, x):
        x = self.bn(self.fc(x))
        return x[:, : self.output_dim] * torch.sigmoid(x[:, self.output_dim :])


class AttentiveTransformer(torch.nn.Module):
    def __init__(self, input_dim, output_dim, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.fc = Linear(input_dim, output_dim, bias=False)
        self.bn = GBN(output_dim, virtual_batch_size=virtual_batch_size, momentum=momentum)

    def forward(self, priors, features):
        return torch.softmax(self.bn(self.fc(features)) * priors, dim=-1)


class TabNetEncoder(torch.nn.Module):
    def __init__(self, input_dim, n_d=8, n_steps=2, gamma=1.3, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.input_dim = input_dim
        self.n_steps = n_steps
        self.gamma = gamma
        self.initial_bn = BatchNorm1d(self.input_dim, momentum=0.01)
        params = {"virtual_batch_size": virtual_batch_size, "momentum": momentum}
        self.initial_splitter = GLULayer(input_dim, n_d, **params)
        self.feat_transformers = torch.nn.ModuleList(GLULayer(input_dim, n_d, **params) for _ in range(n_steps))
        self.att_transformers = torch.nn.ModuleList(
            AttentiveTransformer(n_d, input_dim, **params) for _ in range(n_steps)
        )

    def forward(self, x):
        x = self.initial_bn(x)
        prior = torch.ones_like(x)
        att = self.initial_splitter(x)
        steps = []
        for step in range(self.n_steps):
            mask = self.att_transformers[step](prior, att)
            prior = (self.gamma - mask) * prior
            out = self.feat_transformers[step](mask * x)
            steps.append(ReLU()(out))
            att = out
        return steps


class TabNetNoEmbeddings(torch.nn.Module):
    def __init__(self, input_dim, output_dim, n_d=8, n_steps=2, virtual_batch_size=128, momentum=0.02):
        super().__init__()
        self.input_dim = input_dim
        self.initial_bn = BatchNorm1d(self.input_dim, momentum=0.01)  # built, never called
        self.encoder = TabNetEncoder(input_dim, n_d, n_steps, virtual_batch_size=virtual_batch_size, momentum=momentum)
        self.final_mapping = Linear(n_d, output_dim, bias=False)

    def forward(self, x):
        return self.final_mapping(torch.stack(self.encoder(x)).sum(dim=0))


def build():
    return TabNetNoEmbeddings(6, 3, virtual_batch_size=2)


INPUT_SHAPE = (4, 6)
SIBLINGS = {"16 features, chunks of 4": ("wide", (8, 16))}


def wide():
    return TabNetNoEmbeddings(16, 5, n_d=16, n_steps=3, virtual_batch_size=4)
