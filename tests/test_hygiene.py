"""Library hygiene: normswap leaves the host process as it found it (logging, stderr, random
state) and reports API misuse as TypeError / ValueError."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

import normswap
from models import build, input_for
from normswap.torchutil import quiet_torch


def test_quiet_torch_keeps_the_host_application_logs_and_stderr(monkeypatch) -> None:
    stream = io.StringIO()
    host = logging.getLogger("host.application")
    handler = logging.StreamHandler(stream)
    host.addHandler(handler)
    host.setLevel(logging.INFO)
    fake_stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake_stderr)
    try:
        with quiet_torch():
            host.warning("host warning")
            logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed")
            print("host stderr line", file=sys.stderr)
        assert logging.root.manager.disable == 0
    finally:
        host.removeHandler(handler)
    assert "host warning" in stream.getvalue()
    assert fake_stderr.getvalue() == "host stderr line\n"
    assert sys.stderr is fake_stderr  # restored
    assert logging.getLogger("torch.onnx").level == logging.NOTSET  # restored


def test_untraceable_capture_keeps_the_host_logging_level() -> None:
    before = (logging.root.manager.disable, logging.getLogger("torch.export").level)
    normswap.lint(build("untraceable"), input_for("untraceable"))
    assert (logging.root.manager.disable, logging.getLogger("torch.export").level) == before


def test_heal_does_not_touch_the_global_random_state() -> None:
    model = build("resnet")
    converted = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    batches = [input_for("resnet", batch=8) * (1 + i / 10) for i in range(5)]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    normswap.heal(converted, model, batches, steps=5, seed=7, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda: normswap.convert("resnet", input_for("resnet")),
        lambda: normswap.lint(None, input_for("resnet")),
        lambda: normswap.apply_plan(build("resnet"), {"version": 1, "sites": []}),
        lambda: normswap.convert(build("resnet"), "not a tensor"),
    ],
    ids=["convert-non-module", "lint-non-module", "apply-plan-dict", "inputs-string"],
)
def test_api_misuse_is_a_type_error(call) -> None:
    with pytest.raises(TypeError):
        call()


@pytest.mark.parametrize(
    "make",
    [
        lambda: normswap.HealOptions(lr=-1e-3),
        lambda: normswap.HealOptions(lr=float("nan")),
        lambda: normswap.HealOptions(steps=-1),
        lambda: normswap.HealOptions(params="some"),
        lambda: normswap.convert(build("resnet"), input_for("resnet"), max_groups=0),
    ],
    ids=["negative-lr", "nan-lr", "negative-steps", "unknown-params", "zero-groups"],
)
def test_invalid_option_values_are_value_errors(make) -> None:
    with pytest.raises(ValueError):
        make()
