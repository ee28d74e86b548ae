"""Drift between the original and the converted model's outputs (information, not a verdict)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..torchutil import as_input_tuple, flat_outputs, preserved


@dataclass
class Drift:
    """How far the converted model's outputs are from the original's, over some samples."""

    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None  # when the output is (N, K) class scores
    samples: int
    # outputs left out: their shapes differ between the models (a length the data decides)
    not_compared: tuple[int, ...] = ()

    @property
    def function_kept(self) -> float:
        """Top-1 agreement where the output is class scores, else the cosine of the outputs."""
        return self.top1_agreement if self.top1_agreement is not None else self.cosine

    @property
    def measure(self) -> str:
        return "top-1 agreement" if self.top1_agreement is not None else "output cosine"


def eval_outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with preserved(model), torch.no_grad():
        model.eval()
        return float_outputs(model(*inputs))


def float_outputs(value: Any) -> list[torch.Tensor]:
    """A model's output as drift compares it: every tensor in it, detached, in float32."""
    return [t.detach().float() for t in flat_outputs(value)]


class DriftAccumulator:
    """Accumulates output differences batch by batch (nothing but sums is kept)."""

    def __init__(self) -> None:
        self.max_abs, self.abs_sum, self.count = 0.0, 0.0, 0
        self.dot = self.norm_a = self.norm_b = 0.0
        self.agree, self.top1_total, self.samples = 0, 0, 0
        self.not_compared: set[int] = set()

    def add(self, reference: list[torch.Tensor], candidate: list[torch.Tensor], samples: int) -> None:
        for index, (a, b) in enumerate(zip(reference, candidate, strict=True)):
            if a.shape != b.shape:
                self.not_compared.add(index)
                continue
            diff = (a - b).abs()
            self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0)
            self.abs_sum += float(diff.sum())
            self.count += diff.numel()
            self.dot += float((a * b).sum())
            self.norm_a += float((a * a).sum())
            self.norm_b += float((b * b).sum())
            if a.dim() == 2 and a.shape[1] > 1:
                self.agree += int((a.argmax(1) == b.argmax(1)).sum())
                self.top1_total += a.shape[0]
        self.samples += samples

    def result(self) -> Drift:
        cosine = self.dot / max((self.norm_a * self.norm_b) ** 0.5, 1e-30)
        top1 = self.agree / self.top1_total if self.top1_total else None
        return Drift(
            self.max_abs,
            self.abs_sum / max(self.count, 1),
            cosine,
            top1,
            self.samples,
            tuple(sorted(self.not_compared)),
        )


def batch_samples(inputs: tuple) -> int:
    return int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1


def measure_drift(original: nn.Module, converted: nn.Module, batches: Iterable[Any]) -> Drift:
    """Compare eval-mode outputs over `batches` (each a tensor or tuple of tensors, on the
    models' device)."""
    accumulator = DriftAccumulator()
    for batch in batches:
        inputs = as_input_tuple(batch)
        accumulator.add(eval_outputs(original, inputs), eval_outputs(converted, inputs), batch_samples(inputs))
    return accumulator.result()
