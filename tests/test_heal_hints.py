"""Feature hints (HealOptions(hints=True)): each training step matches the converted sites'
outputs to the original BatchNorms' on that step's batch, and on nothing else."""

from __future__ import annotations

import pytest
import torch

import normswap
from models import build, input_for
from normswap.calibration.hints import Hints, hinted_sites


def test_hints_pair_the_same_step_outputs_and_skip_the_heldout_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("resnet").eval()
    converted = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    seen: list[tuple[int, int, bool]] = []
    loss = Hints.loss

    def checked(self: Hints) -> torch.Tensor | None:
        for name in self.sites:
            student, teacher = self.student.get(name, []), self.teacher.get(name, [])
            # one call per site per step in each model, the student's with a gradient: a held-out
            # evaluation (no gradient, 8 samples a batch) recorded here would pair with this step
            seen.append((len(student), len(teacher), all(s.requires_grad for s in student)))
        return loss(self)

    monkeypatch.setattr(Hints, "loss", checked)
    batches = [input_for("resnet", batch=8) * (1 + i / 4) for i in range(5)]
    result = normswap.heal(converted, model, batches, steps=4, eval_every=1, hints=True, progress=False)
    assert result.steps == 4 and len(result.curve) == 5  # evaluated before and after every step
    sites = len(hinted_sites(converted, model))
    assert sites == 3 and seen == [(1, 1, True)] * (4 * sites)


def test_hints_record_inside_observing_only_and_pair_the_two_models() -> None:
    model = build("resnet").eval()
    converted = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    hints = Hints(converted, model)
    x = input_for("resnet", batch=8)
    with hints.observing():
        model(x)
        model(x)  # the original recorded as the student too: hint sites observe both models
    assert hints.loss() is None  # the converted model did not run: nothing to pair
    with hints.observing():
        converted(x)
        model(x)
    hinted = hints.loss()
    assert hinted is not None and float(hinted.detach()) > 0  # a GroupNorm's output differs from the BatchNorm's
    converted(x)  # outside `observing`: not recorded
    assert hints.student == {} and hints.teacher == {}
