"""The public API: every exported name resolves, is what the functions return, and the package
root imports nothing heavy until a name is used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap
from fixcases import CASES, built, copy_case


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


def test_every_exported_name_resolves_and_is_listed() -> None:
    for name in normswap.__all__:
        assert getattr(normswap, name) is not None, name
    assert set(normswap.__all__) <= set(dir(normswap))
    with pytest.raises(AttributeError, match="has no attribute 'convrt'"):
        normswap.convrt  # noqa: B018 - the attribute access is the test


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, normswap; assert 'torch' not in sys.modules; normswap.Plan; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # one ONNX export
def test_functions_return_the_exported_types(tmp_path: Path) -> None:
    model, x = _net(), torch.randn(2, 3, 8, 8)
    report = normswap.lint(model, x, normswap.Context(batch_size=2))
    assert isinstance(report, normswap.Report) and all(isinstance(s, normswap.Site) for s in report.sites)
    conversion = normswap.convert(model, x, to="groupnorm")
    assert isinstance(conversion, normswap.Conversion) and isinstance(conversion.plan, normswap.Plan)
    assert all(isinstance(e, normswap.PlanEntry) for e in conversion.plan)
    path = normswap.export_onnx(conversion.model, x, tmp_path / "m.onnx")
    validation = normswap.validate_onnx(conversion.model, path, x, plan=conversion.plan)
    assert isinstance(validation, normswap.Validation) and validation.passed
    assert issubclass(normswap.errors.PlanError, normswap.NormswapError)


def test_recording_construction_attributes_helpers_and_loops(project: Path) -> None:
    path = copy_case(project, "helpers")
    model, x, _ = built(path)
    report = normswap.lint(model, x)
    lines = {site.name: site.defined_at for site in report.sites}
    helper = (CASES / "helpers.py").read_text().splitlines()
    for name, line in [("features.0.1", 9), ("features.2.1", 9), ("mix_norms.1", 13), ("expand_norms.0", 28)]:
        location = lines[name]
        assert (location.path, location.line) == ("helpers.py", line), name
        assert location.code == helper[line - 1].strip() and location.origin == "project"
    assert normswap.SourceLocation.from_dict(lines["mix_norms.1"].to_dict()) == lines["mix_norms.1"]
