"""The ecosystem's own functions on converted real models: each leaves every converted site
batch-independent (no batch_norm call with batch statistics, norms in train mode) or is a no-op,
and none crashes. torch and timm `convert_sync_batchnorm`, timm `freeze` / `unfreeze`,
`torch.func.replace_all_batch_norm_modules_`, a Lightning `Trainer(sync_batchnorm=True)` fit,
Opacus (validation and DP-SGD steps in hooks and ew modes), torch.func per-sample gradients,
torch.compile, autocast, channels_last, and pickling the whole module."""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
from pathlib import Path

import lightning
import pytest
import timm
import timm.layers
import timm.utils.model
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import converted, example

from normswap.postcondition import batch_statistics_users

# BatchNormAct2d families, a plain torchvision ResNet with in-place ReLUs, a transformers model
MODELS = ("timm/efficientnet_b0", "timm/regnetx_002", "torchvision/resnet18", "transformers/resnet")
TARGETS = ("groupnorm", "layernorm", "frozen")
CASES = [(m, t) for m in MODELS for t in TARGETS]
IDS = [f"{m}-{t}" for m, t in CASES]


def _logits(output: object) -> torch.Tensor:
    """Class scores, whether a model returns a tensor or a transformers output."""
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _logits(model.eval()(x))


def _still_converted(walked: nn.Module, name: str) -> None:
    assert not any(isinstance(m, _BatchNorm) for m in walked.modules())
    assert batch_statistics_users(walked, (example(name),), train=True) == []


@pytest.mark.parametrize(("name", "target"), CASES, ids=IDS)
def test_sync_batchnorm_conversion_by_torch_and_by_timm_leaves_it_converted(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    by_torch = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(conversion.model))
    _still_converted(by_torch, name)
    by_timm = timm.layers.convert_sync_batchnorm(copy.deepcopy(conversion.model))
    _still_converted(by_timm, name)
    torch.testing.assert_close(_eval(by_timm, example(name)), _eval(conversion.model, example(name)))


@pytest.mark.parametrize(("name", "target"), CASES, ids=IDS)
def test_batchnorm_freezing_and_functorch_replacement_do_not_crash(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    model = copy.deepcopy(conversion.model)
    timm.utils.model.freeze(model)  # timm's freezing: parameters, and BatchNorm2d -> FrozenBatchNorm2d by isinstance
    assert not any(p.requires_grad for p in model.parameters())
    _still_converted(model, name)
    timm.utils.model.unfreeze(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in dict(conversion.model.named_parameters()))
    torch.func.replace_all_batch_norm_modules_(model)
    _still_converted(model, name)
    torch.testing.assert_close(_eval(model, example(name)), _eval(conversion.model, example(name)))


class _Classifier(lightning.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(_logits(self.model(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("name", ["timm/efficientnet_b0", "torchvision/resnet18"])
def test_a_lightning_fit_with_sync_batchnorm_trains_the_converted_model(name: str, tmp_path: Path) -> None:
    _, conversion = converted(name, "groupnorm")
    module = _Classifier(copy.deepcopy(conversion.model))
    data = torch.utils.data.TensorDataset(example(name, batch=8), torch.randint(0, 4, (8,)))
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        sync_batchnorm=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # it trained
    _still_converted(module.model, name)


@pytest.mark.parametrize(("name", "target"), CASES, ids=IDS)
def test_opacus_finds_nothing_about_norms(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    errors = ModuleValidator.validate(copy.deepcopy(conversion.model).train(), strict=False)
    assert not [e for e in errors if "Norm" in str(e)], errors


@pytest.mark.parametrize("mode", ["hooks", "ew"])
@pytest.mark.parametrize("name", ["torchvision/resnet18", "timm/efficientnet_b0", "timm/regnetx_002"])
def test_a_model_converted_for_dp_runs_a_dp_sgd_step(name: str, mode: str) -> None:
    _, conversion = converted(name, "auto", dp=True)
    if name == "torchvision/resnet18":  # ReLU(inplace=True) and `out += identity` on norm outputs (opacus issue 828)
        assert any("made out-of-place for Opacus' backward hooks" in note for note in conversion.notes)
    model = copy.deepcopy(conversion.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.utils.data.TensorDataset(example(name, batch=8), torch.randint(0, 4, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    x, y = next(iter(loader))
    nn.functional.cross_entropy(_logits(private(x)), y).backward()
    optimizer.step()  # per-sample gradients clipped and noised: the DP-SGD step ran


@pytest.mark.parametrize(
    ("name", "target"), [(m, t) for m in ("timm/regnetx_002", "torchvision/resnet18") for t in TARGETS]
)
def test_per_sample_gradients_with_torch_func(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    model = copy.deepcopy(conversion.model).eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x, y = example(name, batch=2), torch.tensor([0, 3])

    def loss(parameters: dict, sample: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            _logits(functional_call(model, parameters, (sample.unsqueeze(0),))), label.unsqueeze(0)
        )

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    alone = grad(loss)(params, x[1], y[1])
    for n in list(params)[:: max(1, len(params) // 8)]:
        torch.testing.assert_close(per_sample[n][1], alone[n], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "target"),
    [(m, t) for m in ("timm/efficientnet_b0", "torchvision/resnet18") for t in ("groupnorm", "layernorm")],
)
def test_torch_compile_sees_no_graph_break_at_a_norm(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    explanation = torch._dynamo.explain(copy.deepcopy(conversion.model).eval())(example(name))
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]


@pytest.mark.parametrize(("name", "target"), CASES, ids=IDS)
def test_autocast_and_channels_last(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    model = copy.deepcopy(conversion.model).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _logits(model(example(name)))
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    x = example(name)
    torch.testing.assert_close(
        _eval(model, x.to(memory_format=torch.channels_last)), _eval(model, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("name", "target"), CASES, ids=IDS)
def test_the_whole_module_pickles_as_itself(name: str, target: str) -> None:
    _, conversion = converted(name, target)
    buffer = io.BytesIO()
    torch.save(conversion.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_eval(loaded, example(name)), _eval(conversion.model, example(name)), rtol=0, atol=0)
    torch.testing.assert_close(
        _eval(copy.deepcopy(conversion.model), example(name)), _eval(conversion.model, example(name)), rtol=0, atol=0
    )


def _forward_in_a_child(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _eval(model, x)


def test_multiprocessing_spawn_carries_a_converted_timm_model() -> None:
    _, conversion = converted("timm/efficientnet_b0", "groupnorm")
    tests = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(_forward_in_a_child, (conversion.model, example("timm/efficientnet_b0")))
    torch.testing.assert_close(remote, _eval(conversion.model, example("timm/efficientnet_b0")), rtol=0, atol=0)
