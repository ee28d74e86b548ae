"""The fold target: BatchNorm folded into its producer's weights (inference only, same function)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import normswap
from models import MODELS, build, input_for
from normswap.errors import PlanError

NORMALIZATION_OPS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mlp", "tcn", "bn3d", "no_affine", "subclass", "functional"])
def test_fold_keeps_the_eval_function_and_leaves_no_normalization(tmp_path: Path, name: str) -> None:
    original = build(name)
    x = input_for(name, batch=8)
    conv = normswap.convert(original, input_for(name), to="fold")
    assert set(conv.plan.counts()) == {"fold"}, conv.plan.to_dict()
    with torch.no_grad():
        expected, folded = original(x), conv.model.eval()(x)
    # folding is computed in float64 and rounded once: a few fp32 ulps of the outputs' scale
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    path = normswap.export_onnx(conv.model, input_for(name), tmp_path / f"{name}.onnx")
    assert not _ops(path) & NORMALIZATION_OPS
    validation = normswap.validate_onnx(conv.model, path, input_for(name), original=original, plan=conv.plan)
    assert validation.passed, validation.messages


def test_fold_changes_the_producer_weights() -> None:
    original = build("resnet")
    folded = normswap.convert(original, input_for("resnet"), to="fold").model
    assert isinstance(folded.bn1, nn.Identity)
    scale = original.bn1.weight / torch.sqrt(original.bn1.running_var + original.bn1.eps)
    torch.testing.assert_close(folded.conv1.weight, original.conv1.weight * scale.reshape(-1, 1, 1, 1))
    shift = original.bn1.bias - original.bn1.running_mean * scale  # conv1 had no bias
    torch.testing.assert_close(folded.conv1.bias, shift)


class SharedProducer(nn.Module):
    """conv's output feeds the BatchNorm and a skip connection: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class TransposedGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.up(x))


def _with_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        model.train()(x * 2 + 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_transposed_convolution_with_groups_folds_exactly() -> None:
    x = torch.randn(4, 4, 5, 5)
    model = _with_statistics(TransposedGroups(), x)
    conv = normswap.convert(model, x, to="fold")
    assert conv.plan.get("bn").target == "fold"
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), model(x), rtol=1e-5, atol=1e-5)


SHARED_INPUT = torch.randn(4, 3, 6, 6)


@pytest.mark.parametrize(
    "make,x,site,reason",
    [
        (lambda: _with_statistics(SharedProducer(), SHARED_INPUT), SHARED_INPUT, "bn", "also used elsewhere"),
        (lambda: build("mobilenet"), input_for("mobilenet"), "input_bn", "not a convolution or linear layer"),
        (lambda: build("rnn"), input_for("rnn"), "bn", "runs 4 times per forward"),
    ],
    ids=["shared-producer", "raw-input", "reused"],
)
def test_sites_that_cannot_fold_fall_back_to_frozen_with_the_reason(make, x, site: str, reason: str) -> None:
    original = make()
    conv = normswap.convert(original, x, to="fold")
    entry = conv.plan.get(site)
    assert entry.target == "frozen" and "fell back to frozen" in entry.reason and reason in entry.reason
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), original(x), rtol=1e-5, atol=1e-6)


def test_fold_refuses_without_statistics() -> None:
    with pytest.raises(PlanError, match=r"no running statistics to fold.*its fallback frozen cannot either"):
        normswap.convert(build("no_running_stats"), input_for("no_running_stats"), to="fold")


def test_fold_plan_reapplies_to_a_fresh_instance() -> None:
    original = build("resnet")
    conv = normswap.convert(original, input_for("resnet"), to="fold")
    plan = normswap.Plan.from_json(conv.plan.to_json())
    assert plan.get("bn1").params["into"] == "conv1"
    fresh = normswap.apply_plan(MODELS["resnet"](), plan)
    assert set(fresh.state_dict()) == set(conv.model.state_dict())
    fresh.load_state_dict(conv.model.state_dict())
    x = input_for("resnet")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), conv.model(x), rtol=0, atol=0)


def test_auto_folds_for_inference_and_lint_proposes_it() -> None:
    context = normswap.Context(inference_only=True)
    report = normswap.lint(build("resnet"), input_for("resnet"), context)
    ns301 = [f for f in report.findings if f.code == "NS301"]
    assert [f.site.name for f in ns301] == ["bn1", "bn2", "bn3"]
    assert all(f.remedy.target == "fold" and f.remedy.safe for f in ns301)
    conv = normswap.convert(build("mobilenet"), input_for("mobilenet"), context=context)
    assert conv.plan.get("stem.1").target == "fold"
    assert conv.plan.get("input_bn").target == "frozen"  # nothing to fold into: the same function, kept exactly


@pytest.mark.slow
def test_cli_convert_to_fold(tmp_path: Path, monkeypatch) -> None:
    from normswap.cli import main

    monkeypatch.chdir(tmp_path)
    torch.save(build("resnet").state_dict(), tmp_path / "ckpt.pt")
    spec = f"{Path(__file__).parent / 'models.py'}:ResNetStyle"
    result = CliRunner().invoke(
        main, ["convert", "ckpt.pt", "--model", spec, "--input-shape", "4,3,12,12", "--out", "out", "--to", "fold"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert {site["target"] for site in plan["sites"]} == {"fold"}
    assert not _ops(tmp_path / "out" / "model.onnx") & NORMALIZATION_OPS
    assert "validation passed" in result.output
