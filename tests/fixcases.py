"""The source-fix test cases (tests/fix_cases/): a project folder to fix them in, and fresh imports."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import normswap

CASES = Path(__file__).parent / "fix_cases"
# shaped like public repositories, each with SIBLINGS: the other models the file builds
REPOSITORIES = [
    "cifar_resnet",
    "cifar_densenet",
    "yolo_common",
    "pix2pix_networks",
    "dcgan",
    "deepspeech",
    "pointnet",
    "tab_network",
]
FIXED = [
    "direct",
    "aliases",
    "recurrent",
    "helpers",
    "torchvision_style",
    "norm_layer_values",
    "functional",
    *REPOSITORIES,
]
_modules = itertools.count()


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project (a pyproject.toml makes it the repository root) as the working directory."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture()
def zoo(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/fix_cases/zoo_models.py installed as `tinyzoo` in a site-packages folder, and the
    user's uses_zoo.py in the project; returns the site-packages folder."""
    packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (packages / "tinyzoo").mkdir(parents=True)
    shutil.copy(CASES / "zoo_models.py", packages / "tinyzoo" / "__init__.py")
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.delitem(sys.modules, "tinyzoo", raising=False)
    copy_case(project, "uses_zoo")
    return packages


def load(path: Path) -> ModuleType:
    """Import `path` as a new module every time (a fixed file must be read afresh)."""
    spec = importlib.util.spec_from_file_location(f"fixcase_{next(_modules)}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def context_for(case: str) -> normswap.Context:
    return normswap.Context(batch_size=2, sequence=case == "recurrent")


def built(path: Path) -> tuple[nn.Module, torch.Tensor, ModuleType]:
    module = load(path)
    torch.manual_seed(0)
    with normswap.recording_construction():
        model = module.build()
    for layer in model.modules():  # statistics and affine away from their defaults
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var") and buffer.dim() == 1:
            buffer.uniform_(0.5, 2)
    for name, parameter in model.named_parameters():
        if name.endswith(("bn1.weight", "norm.weight", "weight")) and parameter.dim() == 1:
            parameter.data.uniform_(0.5, 1.5)
    return model, torch.randn(*module.INPUT_SHAPE), module


def copy_case(project: Path, case: str) -> Path:
    return Path(shutil.copy(CASES / f"{case}.py", project / f"{case}.py"))


def assert_builds_what_convert_makes(
    fixed: nn.Module, original: nn.Module, x: torch.Tensor, context: normswap.Context, label: str
) -> None:
    """`fixed` (built from the fixed file) has the state-dict keys of convert(`original`), loads
    its weights strictly and computes its outputs: 1e-6, as both run the same torch kernels on
    the same weights (only a reduction order could differ)."""
    converted = normswap.convert(original, x, context=context).model
    assert sorted(fixed.state_dict()) == sorted(converted.state_dict()), label
    fixed.load_state_dict(converted.state_dict())
    for mode in (False, True):  # the new norms do not depend on the mode
        fixed.train(mode)
        converted.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(fixed(x), converted(x), rtol=1e-6, atol=1e-6, msg=lambda m: f"{label}: {m}")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules()), label
