"""A new target defined in this file alone: a channel RMSNorm, registered with
`normswap.targets.register` and run through lint, convert, calibrate, heal, export, validate and
`lint --fix`, with no library file edited (CONTRIBUTING's "Add a target" recipe, proven).

    y[n, :, p] = x[n, :, p] / sqrt(mean_c x[n, c, p]^2 + eps) * w + b
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from fixcases import built, load
from normswap import targets
from normswap.capture.tracer import BatchNormArgs
from normswap.cli import main
from normswap.targets.base import (
    NormParams,
    ParamKind,
    PlanOptions,
    SourceCall,
    SourceCode,
    Target,
    carry_affine,
    drop_statistics,
    factory,
    param,
    require_channels,
    set_attributes,
)
from normswap.targets.takeover import TakenOver
from normswap.torchutil import Replacement

HERE = __name__  # the module a fixed source file imports the drop-in from
EPS = 1e-3  # the model's BatchNorms' eps, kept by the target


def channel_rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm over dim 1 of (N, C, *), at every position."""
    y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + eps)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class ChannelRMSNorm(Replacement, nn.Module):
    """The drop-in: BatchNorm's constructor arguments, `weight` and `bias` named like BatchNorm's."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        track_running_stats: bool | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_channels, self.eps, self.affine = num_features, eps, affine
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_rms_norm(x, self.weight, self.bias, self.eps)


class ChannelRMSNormTakeover(TakenOver, ChannelRMSNorm):
    """Where torch's BatchNorm was in a taken-over BatchNorm subclass."""

    label = "RMSNorm"


@dataclass(frozen=True, kw_only=True)
class RMSNormParams(NormParams):
    num_channels: int = param(ParamKind.INT, positive=True)


class RMSNormTarget(Target[RMSNormParams]):
    name = "rmsnorm"
    summary = "RMSNorm over channels, per sample and position"
    calibrated = True
    auto_fallback = "frozen"
    params_type = RMSNormParams

    def plan(self, site: normswap.Site, options: PlanOptions) -> tuple[dict[str, Any], str]:
        return {"num_channels": require_channels(site), "eps": site.eps, "affine": site.affine}, ""

    def module(self, bn: _BatchNorm, params: RMSNormParams) -> nn.Module:
        return carry_affine(
            bn, ChannelRMSNorm(params.num_channels, eps=params.eps, affine=params.affine, **factory(bn))
        )

    def takeover_base(self, params: RMSNormParams) -> type:
        return ChannelRMSNormTakeover

    def prepare_takeover(self, module: nn.Module, params: RMSNormParams) -> None:
        drop_statistics(module)
        set_attributes(module, num_channels=params.num_channels, eps=params.eps, affine=params.affine)

    def function(self, params: RMSNormParams, call: BatchNormArgs) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return channel_rms_norm, (call.input, call.weight, call.bias, params.eps)

    def normalize(self, params: RMSNormParams, x: torch.Tensor) -> torch.Tensor | None:
        return channel_rms_norm(x, None, None, params.eps)

    def params_from_module(self, module: nn.Module) -> dict[str, Any] | None:
        if not isinstance(module, ChannelRMSNorm):
            return None
        return {"num_channels": module.num_channels, "eps": module.eps, "affine": module.affine}

    def source_call(self, call: SourceCall, params: Sequence[RMSNormParams]) -> SourceCode | str:
        return SourceCode(f"{HERE}.ChannelRMSNorm({call.arguments['num_features']}{call.keywords()})", (HERE,))

    def source_class(self, call: SourceCall, params: Sequence[RMSNormParams]) -> SourceCode | str:
        return SourceCode(f"{HERE}.ChannelRMSNorm", (HERE,))

    def source_function(self, call: SourceCall, params: RMSNormParams) -> SourceCode | str:
        arguments = call.arguments
        weight, bias, eps = (
            arguments.get("weight", "None"),
            arguments.get("bias", "None"),
            arguments.get("eps", repr(params.eps)),
        )
        return SourceCode(f"{HERE}.channel_rms_norm({arguments['input']}, {weight}, {bias}, {eps})", (HERE,))


TARGET = RMSNormTarget()
ChannelRMSNormTakeover.target = TARGET


def nets_source(bn2: str) -> str:
    """A network with a BatchNorm module, a functional batch_norm call and, as `bn2`, a
    BatchNorm subclass (`NormAct`) or another module."""
    return f'''
import torch
import torch.nn.functional as F
from torch import nn


class NormAct(nn.BatchNorm2d):
    """A norm-act layer as timm writes one: BatchNorm, then ReLU."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, eps={EPS})
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = {bn2}(8, eps={EPS})
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.weight = nn.Parameter(torch.ones(4))
        self.bias = nn.Parameter(torch.zeros(4))
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x):
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = F.batch_norm(self.conv3(x), self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, {EPS})
        return x.mean((2, 3))


def build():
    return Net()


INPUT_SHAPE = (4, 3, 8, 8)
'''


@pytest.fixture()
def rmsnorm(monkeypatch: pytest.MonkeyPatch) -> RMSNormTarget:
    """The target, registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(targets, "_REGISTERED", dict(targets._REGISTERED))
    targets.register(TARGET)
    return TARGET


@pytest.fixture()
def nets(project: Path) -> Path:
    path = project / "nets.py"
    path.write_text(nets_source("NormAct"))
    return path


def _batches(count: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=generator) for _ in range(count)]


def _by_hand(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The converted network written out with channel_rms_norm (what each site must compute)."""
    h = torch.relu(channel_rms_norm(model.conv1(x), model.bn1.weight, model.bn1.bias, EPS))
    h = torch.relu(channel_rms_norm(model.conv2(h), model.bn2.weight, model.bn2.bias, EPS))
    return channel_rms_norm(model.conv3(h), model.weight, model.bias, EPS).mean((2, 3))


def test_registered_target_is_offered_and_a_name_is_taken_once(rmsnorm: RMSNormTarget) -> None:
    assert "rmsnorm" in targets.choices() and targets.get("rmsnorm") is rmsnorm
    with pytest.raises(normswap.NormswapError, match="already registered"):
        targets.register(RMSNormTarget())


def test_convert_calibrate_heal_export_validate(rmsnorm: RMSNormTarget, nets: Path, tmp_path: Path) -> None:
    original, x, _ = built(nets)
    original.eval()
    conversion = normswap.convert(original, x, to="rmsnorm", calibration_data=_batches())
    plan, converted = conversion.plan, conversion.model.eval()

    # module, subclass (taken over) and functional sites all follow the new target
    assert {(e.name, e.kind.value, e.target) for e in plan} == {
        ("bn1", "module", "rmsnorm"),
        ("bn2", "subclass", "rmsnorm"),
        ("batch_norm", "functional", "rmsnorm"),
    }
    assert isinstance(plan.get("bn1").params, RMSNormParams) and plan.get("bn1").params.num_channels == 8
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    assert isinstance(converted.bn2, ChannelRMSNorm) and type(converted.bn2).__name__ == "RMSNormNormAct"
    with torch.no_grad():  # what the target says it computes, after calibration moved the affine
        torch.testing.assert_close(converted(x), _by_hand(converted, x), rtol=1e-5, atol=1e-6)

    # calibration fitted each site's affine against the BatchNorm it replaced
    assert {fit.name for fit in conversion.calibration} == {"bn1", "bn2", "batch_norm"}
    assert all(fit.target == "rmsnorm" and fit.r2 > 0 for fit in conversion.calibration)
    # ... and without the plan, the target reads its own modules back (functional sites need the plan)
    again = normswap.convert(original, x, to="rmsnorm").model
    fits = normswap.calibrate(again, original, _batches())
    assert {fit.name for fit in fits} == {"bn1", "bn2"}

    # --heal-params norm trains exactly the new layers' affine: what the target names on its
    # modules, and the weight and bias the rewritten functional call reads
    norm_affine = {id(p) for name in ("bn1", "bn2") for p in (getattr(again, name).weight, getattr(again, name).bias)}
    norm_affine |= {id(again.weight), id(again.bias)}
    before = {name: p.detach().clone() for name, p in again.named_parameters()}
    normswap.heal(again, original, _batches(), steps=4, params="norm", eval_every=2, progress=False)
    changed = {id(p) for name, p in again.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= norm_affine and id(again.weight) in changed  # the functional site's too

    # ONNX export with no BatchNormalization left; onnxruntime agrees with PyTorch
    path = normswap.export_onnx(converted, x, tmp_path / "model.onnx")
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    validation = normswap.validate_onnx(converted, path, x, original=original, plan=plan)
    assert validation.passed, validation.messages


def test_cli_convert_and_lint_fix(rmsnorm: RMSNormTarget, nets: Path, project: Path) -> None:
    model, x, _ = built(nets)
    torch.save(model.state_dict(), project / "weights.pt")
    torch.save(torch.cat(_batches()), project / "calibration.pt")
    convert = ["convert", "weights.pt", "--model", "nets.py:build", "--input-shape", "4,3,8,8", "--out", "out"]
    result = CliRunner().invoke(
        main, [*convert, "--to", "rmsnorm", "--calibration-data", "calibration.pt", "--heal-steps", "3"]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((project / "out" / "plan.json").read_text())
    assert {site["target"] for site in written["sites"]} == {"rmsnorm"}
    assert "rmsnorm" in (project / "out" / "report.md").read_text()
    # the plan file reads back into the same conversion (its parameters checked by the target's dataclass)
    result = CliRunner().invoke(main, [*convert[:-1], "replay", "--plan", "out/plan.json"])
    assert result.exit_code == 0, result.output

    # lint --fix writes the target's source form: the drop-in for the constructor, the function for F.batch_norm
    plain_source = project / "plain.py"
    plain_source.write_text(nets_source("nn.BatchNorm2d"))
    plain, x, _ = built(plain_source)
    conversion = normswap.convert(plain, x, to="rmsnorm")
    converted = conversion.model
    (project / "plain.json").write_text(conversion.plan.to_json())
    lint = ["lint", "plain.py:build", "--input-shape", "4,3,8,8", "--plan", "plain.json", "--fix", "--unsafe-fixes"]
    result = CliRunner().invoke(main, lint)
    assert result.exit_code in (0, 1), result.output
    source = plain_source.read_text()
    assert f"{HERE}.ChannelRMSNorm(8, eps={EPS})" in source and f"{HERE}.channel_rms_norm(" in source
    fixed = load(plain_source).build()
    assert not any(isinstance(m, _BatchNorm) for m in fixed.modules())
    fixed.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(x), converted.eval()(x), rtol=1e-6, atol=1e-6)


def test_saved_state_reads_back(rmsnorm: RMSNormTarget, nets: Path, project: Path) -> None:
    model, x, _ = built(nets)
    torch.save(model.state_dict(), project / "weights.pt")
    args = [
        "convert",
        "weights.pt",
        "--model",
        "nets.py:build",
        "--input-shape",
        "4,3,8,8",
        "--out",
        "out",
        "--to",
        "rmsnorm",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    weights = torch.load(project / "out" / "model.pt", weights_only=True)
    loaded = normswap.load_converted(load(nets).build(), project / "out")
    assert sorted(weights) == sorted(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), _by_hand(loaded, x), rtol=1e-5, atol=1e-6)
