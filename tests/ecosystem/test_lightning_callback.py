"""The NormSwap Lightning callback on the real Lightning: the model is converted in `setup`, before
`configure_optimizers`, with the Trainer's per-device batch, world size and gradient accumulation;
`sync_batchnorm=True` finds nothing to synchronise; the report reaches the logger; checkpoints
resume, evaluate and load into the converted model; a two-process DDP fit runs; and a callback that
comes too late, or a checkpoint trained with another plan, is refused with one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import build

import normswap
from normswap.errors import IntegrationError
from normswap.integrations.lightning import CHECKPOINT_KEY, NormSwap, load_from_checkpoint


class Classifier(lightning.LightningModule):
    """A LightningModule around `model` (torchvision's ResNet-18 by default), with a forward."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model if model is not None else build("torchvision/resnet18").train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> None:
        x, y = batch
        self.log("loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SmallNet(Classifier):
    """A conv-BN classifier small enough for several fits per test."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(4)
            )
        )
        self.model(torch.randn(2, 3, 8, 8))  # the lazy head gets its shape


class NoForward(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(1), nn.Linear(2048, 4)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(shape: tuple[int, ...] = (3, 8, 8), batch: int = 2, samples: int = 16) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randn((samples, *shape), generator=generator), torch.randint(0, 4, (samples,), generator=generator)
    )
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _trainer(root: Path, **kwargs: Any) -> lightning.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
        **kwargs,
    }
    return lightning.Trainer(**settings)


class _OptimizerParameters(lightning.Callback):
    """Records which parameters the optimizers hold when training starts."""

    held: set[int] = set()

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self.held = {
            id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
        }


def test_a_fit_converts_before_the_optimizers_with_the_trainers_context(tmp_path: Path) -> None:
    module = Classifier()
    loader = _loader((3, 32, 32))
    callback = NormSwap(calibration_data=loader, calibration_batches=2, attribution_samples=0)
    seen = _OptimizerParameters()
    trainer = _trainer(
        tmp_path,
        accumulate_grad_batches=4,
        sync_batchnorm=True,  # convert_sync_batchnorm after the conversion: nothing left to synchronise
        logger=CSVLogger(tmp_path),
        callbacks=[callback, seen],
    )
    before = {id(p) for p in module.parameters()}
    trainer.fit(module, loader)
    assert trainer.global_step == 2
    assert callback.context == normswap.Context(batch_size=2, world_size=1, accumulation=4)
    assert callback.conversion is not None and callback.conversion.plan.counts() == {"groupnorm": 20}
    assert not any(isinstance(m, _BatchNorm) for m in module.modules())  # no SyncBatchNorm either
    # the optimizer holds the converted model's parameters: the BatchNorms' own weight and bias
    # objects, handed to their GroupNorms in place (as convert_sync_batchnorm hands them on)
    assert seen.held == {id(p) for p in module.parameters()} == before
    report = (Path(trainer.log_dir) / "normswap" / "report.md").read_text()
    assert "gradient accumulation over 4 steps makes the optimizer's batch 8 per device, but not BatchNorm's" in report
    assert (
        json.loads((Path(trainer.log_dir) / "normswap" / "plan.json").read_text())["sites"][0]["target"] == "groupnorm"
    )
    assert yaml.safe_load((Path(trainer.log_dir) / "hparams.yaml").read_text())["normswap"]["groupnorm"] == 20
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "normswap/top1_agreement_calibrated" in metrics


def test_a_submodule_by_name_and_a_module_without_forward(tmp_path: Path) -> None:
    module = NoForward()
    with pytest.raises(IntegrationError, match=r"NoForward defines no forward.*attribute='model'"):
        _trainer(tmp_path, callbacks=[NormSwap()]).fit(module, _loader())
    callback = NormSwap(attribute="backbone")
    _trainer(tmp_path, callbacks=[callback]).fit(module, _loader())
    assert isinstance(module.backbone[1], nn.GroupNorm)
    with pytest.raises(IntegrationError, match=r"NormSwap\(attribute='head'\): NoForward has no submodule 'head'"):
        _trainer(tmp_path, callbacks=[NormSwap(attribute="head")]).fit(NoForward(), _loader())


def test_a_context_that_disagrees_with_the_trainer_is_refused(tmp_path: Path) -> None:
    callback = NormSwap(context=normswap.Context(batch_size=64, finetune=True))
    with pytest.raises(IntegrationError, match="Context\\(batch_size=64\\) disagrees with the Trainer's batch size 2"):
        _trainer(tmp_path, callbacks=[callback]).fit(SmallNet(), _loader())
    agreeing = NormSwap(context=normswap.Context(batch_size=2, finetune=True))
    _trainer(tmp_path, callbacks=[agreeing]).fit(SmallNet(), _loader())
    assert agreeing.context is not None and agreeing.context.finetune  # what the Trainer cannot know stays
    assert agreeing.conversion is not None and agreeing.conversion.plan.counts() == {"frozen": 1}  # NS302


def test_checkpoints_resume_evaluate_and_load_into_the_converted_model(tmp_path: Path) -> None:
    first = SmallNet()
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    _trainer(tmp_path, callbacks=[NormSwap(), saving], enable_checkpointing=True).fit(first, _loader())
    last = tmp_path / "checkpoints" / "last.ckpt"
    stored = torch.load(last, weights_only=True)[CHECKPOINT_KEY]
    assert [site["target"] for site in stored["plan"]["sites"]] == ["groupnorm"]
    x = _loader().dataset.tensors[0]
    with torch.no_grad():
        expected = first.eval()(x)

    resumed = SmallNet()
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[NormSwap()])
    trainer.fit(resumed, _loader(), ckpt_path=last)  # the plan is made again and checked against the checkpoint's
    assert trainer.global_step == 4

    evaluated = SmallNet()  # a BatchNorm model: validate applies the checkpoint's plan before its weights load
    _trainer(tmp_path, callbacks=[NormSwap()]).validate(evaluated, _loader(), ckpt_path=last, verbose=False)
    loaded = load_from_checkpoint(SmallNet, last)
    for model in (evaluated, loaded):
        assert isinstance(model.model[1], nn.GroupNorm)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    _trainer(tmp_path, callbacks=[NormSwap(), saving], enable_checkpointing=True).fit(SmallNet(), _loader())
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[NormSwap(to="frozen")])
    with pytest.raises(IntegrationError, match=r"trained with normswap plan \(1 × groupnorm\).*to \(1 × frozen\)"):
        trainer.fit(SmallNet(), _loader(), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)  # a run without NormSwap: BatchNorm weights
    _trainer(tmp_path, callbacks=[plain], enable_checkpointing=True).fit(SmallNet(), _loader())
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[NormSwap()])
    with pytest.raises(
        IntegrationError, match=r"weights of the model before conversion \(model.1.num_batches_tracked, \.\.\.\)"
    ):
        trainer.fit(SmallNet(), _loader(), ckpt_path=tmp_path / "plain" / "last.ckpt")


class _AttachesLate(lightning.Callback):
    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        trainer.callbacks.append(NormSwap())  # the optimizers exist by now


def test_a_callback_attached_after_the_optimizers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrationError, match="NormSwap was attached after this fit's setup"):
        _trainer(tmp_path, callbacks=[_AttachesLate()]).fit(SmallNet(), _loader())
    module, trainer = SmallNet(), _trainer(tmp_path)
    trainer.fit(module, _loader())  # a first fit without the callback: its optimizer holds the BatchNorm's parameters
    trainer.callbacks.append(NormSwap())
    with pytest.raises(IntegrationError, match="NormSwap runs after the optimizers were configured"):
        trainer.fit(module, _loader())


@pytest.mark.skipif(sys.platform == "win32", reason="gloo on CPU")
def test_a_two_process_ddp_fit_with_sync_batchnorm(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    script = Path(__file__).with_name("lightning_ddp.py")
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(out.read_text())
    assert (seen["world_size"], seen["batch_size"], seen["accumulation"]) == (2, 4, 2)
    assert seen["plan"] == {"groupnorm": 1} and seen["norm"] == "GroupNorm" and not seen["batchnorm_left"]
    assert seen["global_step"] == 2 and seen["trained"]
