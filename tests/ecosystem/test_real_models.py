"""Every real model of the zoo crossed with every target: no converted site is a BatchNorm, none
normalizes with batch statistics in train mode, and the ONNX export holds no BatchNormalization op
and validates with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import MODELS, converted, example

import normswap
from normswap.postcondition import batch_statistics_users

TARGETS = ("auto", "groupnorm", "layernorm", "frozen", "fold", "syncbn")
CASES = [(name, target) for name in MODELS for target in TARGETS]


@pytest.mark.parametrize(("name", "target"), CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_a_real_model_converts_to_each_target(name: str, target: str, tmp_path: Path) -> None:
    _, conversion = converted(name, target)
    model, plan = conversion.model, conversion.plan
    assert plan.converted, "every model of the zoo has BatchNorm that uses batch statistics"
    kept_on_purpose = {e.name for e in plan if e.target in ("keep", "syncbn")}
    left = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert left <= kept_on_purpose, sorted(left - kept_on_purpose)[:5]
    if target != "syncbn":
        assert not kept_on_purpose - {e.name for e in plan if e.params.get("batch_independent")}
        assert (
            batch_statistics_users(model, (example(name),), train=True) == []
        )  # norms in train mode: no batch statistics
    if not MODELS[name].exports:
        return
    path = normswap.export_onnx(model, example(name), tmp_path / "model.onnx")
    validation = normswap.validate_onnx(model, path, example(name), plan=conversion.plan)
    assert validation.passed, validation.messages
    assert validation.residual_onnx_ops == 0 or target == "syncbn"
