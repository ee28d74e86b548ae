"""`--to batchnorm` on the real thing: torch's `convert_sync_batchnorm` of a torchvision ResNet-18 and
timm's of an EfficientNet come back to BatchNorm that runs on CPU in eval and train, computes what
the model computed before it was synchronized, exports and validates (pytorch/pytorch#41081)."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import timm
import timm.layers
import torch
import torch.distributed as dist
import torchvision
from click.testing import CliRunner
from torch import nn
from zoo import build, example

import normswap
from normswap.cli import main


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """Logits in a mode, from a copy (train mode moves the running statistics)."""
    with torch.no_grad():
        return copy.deepcopy(model).train(train)(x)


def _assert_same_function(model: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    # the same kernels on the same values in both modes: bit for bit on CPU
    for train in (False, True):
        torch.testing.assert_close(_outputs(model, x, train), _outputs(original, x, train), rtol=0, atol=0)


def _norm_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_torchvision_resnet18_after_convert_sync_batchnorm_comes_back(tmp_path: Path) -> None:
    original = build("torchvision/resnet18")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    x = example("torchvision/resnet18")
    conversion = normswap.convert(synced, x, to="batchnorm")
    model = conversion.model
    assert _norm_classes(synced) == {nn.SyncBatchNorm} and _norm_classes(model) == {nn.BatchNorm2d}
    assert conversion.plan.counts() == {"batchnorm": 20}
    _assert_same_function(model, original, x)
    torchvision.models.resnet18(num_classes=4).load_state_dict(model.state_dict())  # strict: the same keys

    # on CPU under a process group: SyncBatchNorm refuses to train, the result trains
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
            copy.deepcopy(synced).train()(x)
        trained = copy.deepcopy(model).train()
        trained(x).logsumexp(dim=1).mean().backward()
        assert trained.bn1.weight.grad is not None
    finally:
        dist.destroy_process_group()

    path = normswap.export_onnx(model, x, tmp_path / "resnet18.onnx")
    validation = normswap.validate_onnx(model, path, x, plan=conversion.plan, original=original)
    assert validation.passed, validation.messages
    assert validation.drift is not None and validation.drift.max_abs == 0


SYNC_RESNET = textwrap.dedent(
    """
    import torchvision
    from torch import nn

    def build():
        return nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=4))
    """
)


def test_the_cli_converts_a_sync_checkpoint_and_the_plan_replays(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sync_resnet.py").write_text(SYNC_RESNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    original = build("torchvision/resnet18")
    torch.save(original.state_dict(), tmp_path / "ddp.pt")
    arguments = ["convert", "ddp.pt", "--model", "sync_resnet:build", "--input-shape", "2,3,32,32"]
    result = CliRunner().invoke(main, [*arguments, "--to", "batchnorm", "--out", "out", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())["reports"][0]
    assert report["validation"]["passed"] and {e["target"] for e in report["plan"]["sites"]} == {"batchnorm"}
    import sync_resnet

    fresh = normswap.load_converted(sync_resnet.build(), tmp_path / "out")  # apply_plan(plan.json), then the weights
    assert _norm_classes(fresh) == {nn.BatchNorm2d}
    x = example("torchvision/resnet18")
    torch.testing.assert_close(_outputs(fresh, x, False), _outputs(original, x, False), rtol=0, atol=0)


def test_timm_sync_batchnorm_act_comes_back_as_timms_batchnorm_act2d(tmp_path: Path) -> None:
    original = build("timm/efficientnet_b0")
    synced = timm.layers.convert_sync_batchnorm(copy.deepcopy(original))
    x = example("timm/efficientnet_b0")
    assert timm.layers.SyncBatchNormAct in _norm_classes(synced)
    conversion = normswap.convert(synced, x, to="batchnorm")
    model = conversion.model
    assert _norm_classes(model) <= {timm.layers.BatchNormAct2d, nn.BatchNorm2d}
    assert timm.layers.BatchNormAct2d in _norm_classes(model)
    _assert_same_function(model, original, x)
    assert set(model.state_dict()) == set(original.state_dict())

    # timm's own tools dispatch on its class: they treat the result as they treat the original
    frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(model))
    frozen_original = timm.layers.freeze_batch_norm_2d(copy.deepcopy(original))
    assert {type(m) for m in frozen.modules()} == {type(m) for m in frozen_original.modules()}
    torch.testing.assert_close(_outputs(frozen, x, False), _outputs(frozen_original, x, False), rtol=0, atol=0)
    again = timm.layers.convert_sync_batchnorm(copy.deepcopy(model))
    assert _norm_classes(again) == _norm_classes(synced)

    path = normswap.export_onnx(model, x, tmp_path / "efficientnet.onnx")
    validation = normswap.validate_onnx(model, path, x, plan=conversion.plan, original=original)
    assert validation.passed, validation.messages
