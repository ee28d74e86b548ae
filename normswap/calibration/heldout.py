"""How healing is judged: top-1 agreement with the original on held-out data (the measure users
care about when the output is class scores) and the distillation loss there."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..torchutil import flat_outputs


@dataclass(frozen=True)
class HeldOutScore:
    """The converted model against the original on the held-out samples."""

    loss: float  # the distillation loss healing minimises (HealOptions.loss)
    agreement: float | None  # top-1 agreement when an output is (N, K) class scores

    def better_than(self, other: HeldOutScore) -> bool:
        """Higher agreement, or equal agreement and a lower loss (or a lower loss without scores)."""
        if self.agreement is not None and other.agreement is not None and self.agreement != other.agreement:
            return self.agreement > other.agreement
        return self.loss < other.loss - 1e-12


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], loss: str = "kl") -> torch.Tensor:
    """Per output: on (N, K) class scores, KL(softmax(teacher) || softmax(student)) ("kl") or the
    MSE between the logits ("mse"); MSE on every other output. Outputs whose shapes differ (a
    length the model's own predictions decide) cannot be matched element by element and are left
    out."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape or not s.is_floating_point():
            continue
        if loss == "kl" and is_class_scores(s):
            total = total + F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
        else:
            total = total + F.mse_loss(s, t)
    return total


def is_class_scores(output: torch.Tensor) -> bool:
    return output.dim() == 2 and output.shape[1] > 1 and output.is_floating_point()


def teacher_outputs(teacher: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in flat_outputs(teacher(*inputs))]


class HeldOut:
    """Scores the student on held-out batches against the teacher's outputs (computed once)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, heldout: list[tuple], loss: str = "kl") -> None:
        self.student, self.heldout, self.loss = student, heldout, loss
        teacher.eval()
        self.targets = [teacher_outputs(teacher, b) for b in heldout]
        self.samples = sum(int(t[0].shape[0]) if t and t[0].dim() else 1 for t in self.targets)

    def __call__(self) -> HeldOutScore:
        losses, agree, scored = [], 0, 0
        training = self.student.training
        self.student.eval()
        with torch.no_grad():
            for batch, target in zip(self.heldout, self.targets, strict=True):
                outputs = flat_outputs(self.student(*batch))
                losses.append(float(distillation_loss(outputs, target, self.loss)))
                for s, t in zip(outputs, target, strict=True):
                    if s.shape == t.shape and is_class_scores(t):
                        agree += int((s.argmax(1) == t.argmax(1)).sum())
                        scored += t.shape[0]
                        break  # the first class-score output speaks for the sample
        self.student.train(training)
        return HeldOutScore(sum(losses) / len(losses), agree / scored if scored else None)
