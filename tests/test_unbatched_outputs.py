"""Models whose outputs are not all batch-first (an auxiliary scalar loss, per-channel statistics,
a Python number, an output whose length the data decides) convert, export and validate: fidelity
compares every output, batch independence judges the batch-carrying ones and names the others."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap
from workspace import convert

OUTPUT_NETS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class AuxLoss(nn.Module):
        \"\"\"Logits and an auxiliary loss (a 0-dimensional tensor), as TabNet's M_loss.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.bn(self.fc(x))
            return self.head(h), h.pow(2).mean()

    class PerChannel(nn.Module):
        \"\"\"Pooled features and per-channel statistics of shape (C,): C = 4 is also the batch size.\"\"\"

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return h.mean((2, 3)), h.mean((0, 2, 3))

    class Number(nn.Module):
        \"\"\"Features and a Python number.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 16), nn.BatchNorm1d(16)

        def forward(self, x):
            return self.bn(self.fc(x)), 0.5

    class DataLength(nn.Module):
        \"\"\"Features and the values above a threshold: a length the data decides, as a detector's boxes.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 16), nn.BatchNorm1d(16)

        def forward(self, x):
            h = self.bn(self.fc(x))
            return h, h[h > 0.5]
    """
)
SHAPES = {"AuxLoss": (4, 8), "PerChannel": (4, 3, 8, 8), "Number": (4, 8), "DataLength": (4, 8)}
LEFT_OUT = {
    "AuxLoss": "output 1 left out: it has no batch axis (shape () at batch 4, () at batch 1)",
    "PerChannel": "output 1 left out: it has no batch axis (shape (4,) at batch 4, (4,) at batch 1)",
    "Number": "output 1 left out: it has no batch axis (shape () at batch 4, () at batch 1)",
    "DataLength": "output 1 left out: its length depends on the data",
}


@pytest.fixture()
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "outputs_nets.py").write_text(OUTPUT_NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("outputs_nets", None)
    return importlib.import_module("outputs_nets")


def _trained(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        module.train()(torch.randn(16, *shape[1:]) * 2 + 1)  # running statistics away from 0 / 1
    return module.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHAPES))
def test_api_converts_exports_and_validates(nets, tmp_path: Path, name: str) -> None:
    shape = SHAPES[name]
    model = _trained(getattr(nets, name)(), shape)
    x = torch.randn(*shape)
    conversion = normswap.convert(model, x)
    path = normswap.export_onnx(conversion.model, x, tmp_path / f"{name}.onnx")
    validation = normswap.validate_onnx(conversion.model, path, x, original=model, plan=conversion.plan)
    assert validation.passed, validation.messages
    assert {check.output for check in validation.outputs} == {0, 1}  # fidelity compares the unbatched output too
    assert all(check.passed for check in validation.outputs)
    assert validation.batch_independent_eval and validation.batch_independent_train  # judged on output 0
    assert any(LEFT_OUT[name] in reason for reason in validation.skipped), validation.skipped


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AuxLoss", "PerChannel", "Number"])
def test_cli_converts_and_the_report_says_what_was_judged(nets, tmp_path: Path, name: str) -> None:
    torch.save(_trained(getattr(nets, name)(), SHAPES[name]).state_dict(), tmp_path / "weights.pt")
    shape = ",".join(map(str, SHAPES[name]))
    result = convert("weights.pt", "--model", f"outputs_nets:{name}", "--input-shape", shape, "--out", "out", "-q")
    assert result.exit_code == 0, result.output
    validation = json.loads((tmp_path / "out" / "report.json").read_text())["reports"][0]["validation"]
    assert validation["passed"] and validation["batch_independence"] == {"eval": True, "train": True, "required": True}
    assert f"batch independence: {LEFT_OUT[name]}" in validation["skipped"]
    assert f"not checked: batch independence: {LEFT_OUT[name]}" in (tmp_path / "out" / "report.md").read_text()


def test_an_output_whose_shape_differs_in_onnxruntime_is_one_sentence() -> None:
    from normswap.export.tolerance import compare, describe_check

    check = compare(torch.zeros(5, 4), torch.zeros(6, 4).numpy(), 4, 1)
    assert not check.passed
    assert describe_check(check) == (
        "output 1 at batch 4: FAILED (onnxruntime returned shape (6, 4), PyTorch (5, 4): the two disagree on a length "
        "the model's own predictions decide, or on the output itself)"
    )


def test_calibration_and_healing_read_outputs_without_a_batch_axis(nets) -> None:
    model = _trained(nets.AuxLoss(), (4, 8))
    data = [torch.randn(8, 8) for _ in range(4)]
    conversion = normswap.convert(
        model, data[0], calibration_data=data, heal=normswap.HealOptions(steps=5), attribution_samples=8
    )
    assert conversion.calibration and conversion.healing is not None and conversion.healing.steps == 5
    assert conversion.drift["healed"].samples == 8  # measured on the held-out part: the last batch of a list
