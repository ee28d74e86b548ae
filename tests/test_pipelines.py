"""A converted model stays converted through the ordinary next steps of a training pipeline (issue
19), on the replicas (tests/models.py): no converted site is a BatchNorm, so the ecosystem's
BatchNorm walkers leave it alone; it pickles as itself; it runs under torch.compile, autocast,
channels_last and torch.func. The same functions on the real libraries' models run in the
ecosystem tier (tests/ecosystem/)."""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from models import TimmBatchNormAct2d, build_real, inputs_for, timm_convert_sync_batchnorm
from normswap.postcondition import batch_statistics_users

TARGETS = ("groupnorm", "layernorm", "frozen", "fold")


@pytest.fixture(scope="module", params=TARGETS)
def converted(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    original = build_real("timm_norm_act")
    return request.param, original, normswap.convert(original, inputs_for("timm_norm_act"), to=request.param).model


def _x(batch: int = 4) -> torch.Tensor:
    return inputs_for("timm_norm_act", batch)[0]


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_no_converted_site_is_a_batchnorm(converted) -> None:
    target, original, model = converted
    assert [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)] == []
    before = original.get_submodule("stem.1")
    after = model.get_submodule("stem.1")
    assert not isinstance(after, TimmBatchNormAct2d) and type(after.act) is type(before.act)
    if target == "groupnorm":
        assert isinstance(after, nn.GroupNorm)


@pytest.mark.parametrize("walker", ["torch", "timm"])
def test_convert_sync_batchnorm_leaves_the_converted_model_alone(converted, walker: str) -> None:
    _, _, model = converted
    walked = copy.deepcopy(model)
    walked = (
        nn.SyncBatchNorm.convert_sync_batchnorm(walked) if walker == "torch" else timm_convert_sync_batchnorm(walked)
    )
    assert not any(isinstance(m, _BatchNorm) for m in walked.modules())
    assert batch_statistics_users(walked, (_x(),), train=True) == []
    torch.testing.assert_close(_eval(walked, _x()), _eval(model, _x()))


def test_functorch_batchnorm_replacement_is_a_no_op(converted) -> None:
    _, _, model = converted
    walked = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(walked)
    torch.testing.assert_close(_eval(walked, _x()), _eval(model, _x()))


def test_the_whole_module_pickles_as_itself(converted, tmp_path: Path) -> None:
    _, _, model = converted
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.get_submodule("stem.1")) is type(model.get_submodule("stem.1"))
    torch.testing.assert_close(_eval(loaded, _x()), _eval(model, _x()), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_eval(twin, _x()), _eval(model, _x()), rtol=0, atol=0)


def _forward_in_a_child(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow  # a spawned interpreter imports torch
def test_multiprocessing_spawn_carries_the_model() -> None:
    original = build_real("timm_norm_act")
    model = normswap.convert(original, inputs_for("timm_norm_act"), to="groupnorm").model
    tests = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [tests, os.environ.get("PYTHONPATH")])
    )  # `models` imports there too
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.apply(_forward_in_a_child, (model, _x()))
    torch.testing.assert_close(remote, _eval(model, _x()), rtol=0, atol=0)


def test_torch_compile_sees_no_graph_break_at_a_norm(converted) -> None:
    _, _, model = converted
    explanation = torch._dynamo.explain(model.eval())(_x())
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]


def test_autocast_bfloat16_forward_and_backward(converted) -> None:
    _, _, model = converted
    trained = copy.deepcopy(model).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trained(_x())
    out.float().sum().backward()
    grads = [p.grad for p in trained.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_channels_last_inputs_give_the_same_outputs(converted) -> None:
    _, _, model = converted
    x = _x()
    torch.testing.assert_close(
        _eval(model, x.to(memory_format=torch.channels_last)), _eval(model, x), rtol=1e-5, atol=1e-5
    )


def test_per_sample_gradients_with_torch_func(converted) -> None:
    _, _, model = converted
    model = copy.deepcopy(model).eval()
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    x, y = _x(3), torch.tensor([0, 1, 2])

    def loss(parameters: dict, sample: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, parameters, (sample.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, label.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # BatchNorm in train mode breaks this
    for i in range(3):  # the same, one sample at a time
        one = grad(loss)(params, x[i], y[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name], rtol=1e-4, atol=1e-6)


def _full_backward_hooks(model: nn.Module) -> list:
    """What Opacus' hooks mode registers: a full backward hook on every layer with trainable parameters."""
    hooked = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return [m.register_full_backward_hook(lambda module, grad_input, grad_output: None) for m in hooked]


def test_a_differential_privacy_conversion_trains_under_full_backward_hooks() -> None:
    original = build_real("torchvision_resnet")
    x = inputs_for("torchvision_resnet")[0]
    plain = normswap.convert(original, x, to="groupnorm").model
    _full_backward_hooks(plain)
    with pytest.raises(RuntimeError, match="BackwardHookFunction is a view and is being modified inplace"):
        plain.train()(x).sum().backward()  # opacus issue 828: ReLU(inplace=True) and `out += identity`
    conversion = normswap.convert(original, x, context=normswap.Context(differential_privacy=True))
    model = conversion.model
    assert model.relu.inplace is False and model.layer1[0].relu.inplace is False
    assert isinstance(model.layer1[0], torch.fx.GraphModule)  # BasicBlock.forward's `out += identity`, out of place
    assert set(model.state_dict()) == set(plain.state_dict())
    notes = "\n".join(conversion.notes)
    assert (
        "made out-of-place for Opacus' backward hooks" in notes
        and "layer1.0: TorchvisionBasicBlock.forward's add_" in notes
    )
    torch.testing.assert_close(_eval(model, x), _eval(plain, x))  # the same function
    _full_backward_hooks(model)
    model.train()(x).sum().backward()  # a DP-SGD step's backward runs
