"""Feature hints for healing: the output of every converted site is matched to what the original
BatchNorm there computed, at every call, so every depth gets a signal of its own, not only what
reaches the model's outputs. Loss per site: MSE / Var(original output), averaged over sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

WEIGHT = 10.0  # of the mean site loss, beside the distillation loss at the outputs


def hinted_sites(converted: nn.Module, original: nn.Module) -> list[str]:
    """Names of the modules where the original has a BatchNorm and the converted model no longer
    has one (functional sites have no module to observe and are left out)."""
    converted_modules = dict(converted.named_modules())
    return [
        name
        for name, module in original.named_modules()
        if isinstance(module, _BatchNorm)
        and name in converted_modules
        and not isinstance(converted_modules[name], _BatchNorm)
    ]


class Hints:
    """Records the sites' outputs in both models during one forward each; `loss()` compares them."""

    def __init__(self, converted: nn.Module, original: nn.Module) -> None:
        self.sites = hinted_sites(converted, original)
        self.converted, self.original = converted, original
        self.student: dict[str, list[torch.Tensor]] = {}
        self.teacher: dict[str, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        handles = []
        for name in self.sites:
            handles.append(self.converted.get_submodule(name).register_forward_hook(self._record(self.student, name)))
            handles.append(self.original.get_submodule(name).register_forward_hook(self._record(self.teacher, name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _record(store: dict[str, list[torch.Tensor]], name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                store.setdefault(name, []).append(output)

        return hook

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    def loss(self) -> torch.Tensor | None:
        """The mean over sites and calls of MSE / Var(original), or None when nothing was seen."""
        terms = []
        for name in self.sites:
            for s, t in zip(self.student.get(name, ()), self.teacher.get(name, ()), strict=False):
                if s.shape == t.shape:
                    t = t.detach()
                    terms.append(F.mse_loss(s, t) / (t.var() + 1e-8))
        self.clear()
        return torch.stack(terms).mean() * WEIGHT if terms else None
