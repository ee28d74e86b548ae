"""The converted model in the user's next tools (issue 30): the optimizer built before an in-place
conversion, a BatchNorm checkpoint loaded into the frozen layer, TorchScript, torch.fx, forward-mode
AD and eager quantization. The same on the real libraries runs in tests/ecosystem/test_next_tools.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from models import TimmBatchNormAct2d
from normswap.nn import FrozenBatchNorm

# (target, whether its affine keeps training)
TRAINABLE = {"groupnorm": True, "layernorm": True, "frozen": False, "syncbn": True}


def _conv_bn(*, subclass: bool = False) -> nn.Sequential:
    bn = TimmBatchNormAct2d(8) if subclass else nn.BatchNorm2d(8)
    return nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _x(model: nn.Sequential) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (4, 6) if isinstance(model[0], nn.Linear) else (4, 3, 16, 16)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("target", list(TRAINABLE))
@pytest.mark.parametrize("build", [_conv_bn, _mlp, lambda: _conv_bn(subclass=True)], ids=["conv", "mlp", "subclass"])
def test_an_optimizer_built_before_an_in_place_conversion_trains_the_new_layers(target: str, build) -> None:
    model = build().train()
    x = _x(model)
    batchnorm, weight, bias = model[1], model[1].weight, model[1].bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    conversion = normswap.convert(model, x, to=target, inplace=True)
    layer = conversion.model[1]
    assert conversion.model is model and layer is not batchnorm
    assert layer.weight is weight and layer.bias is bias  # the very Parameters the optimizer holds
    before = weight.detach().clone()
    conversion.model(x).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(weight, before) is not TRAINABLE[target]


def test_a_copy_conversion_leaves_the_callers_parameters_alone() -> None:
    model = _conv_bn().train()
    conversion = normswap.convert(model, _x(model), to="groupnorm")
    assert conversion.model[1].weight is not model[1].weight
    assert {name for name, _ in conversion.model.named_parameters()} == {
        name for name, _ in model.named_parameters()
    }  # the same names: an optimizer built on the converted model's parameters by name finds them


def test_fold_in_place_says_the_batchnorm_parameters_leave_the_model() -> None:
    model = _conv_bn().eval()
    conversion = normswap.convert(model, _x(model), to="fold", inplace=True)
    assert isinstance(conversion.model[1], nn.Identity)
    [note] = [n for n in conversion.notes if "folded into" in n]
    assert note.startswith("1: folded into '0'") and "build it after the conversion" in note
    assert not [n for n in normswap.convert(_conv_bn().eval(), _x(model), to="fold").notes if "folded into" in n]


def test_frozen_batchnorm_loads_a_batchnorm_checkpoint() -> None:
    """What `lint --fix` writes (normswap.nn.FrozenBatchNorm) loads the user's pretrained BatchNorm
    weights as they are: the step counter is dropped, as torchvision's FrozenBatchNorm2d does."""
    trained = _conv_bn().train()
    trained(_x(trained))  # running statistics away from (0, 1), a step counted
    fixed = _conv_bn()
    fixed[1] = FrozenBatchNorm(8)
    fixed.load_state_dict(trained.state_dict())
    assert torch.equal(fixed[1].running_var, trained[1].running_var) and "num_batches_tracked" not in dict(
        fixed[1].named_buffers()
    )
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(_x(trained)), trained.eval()(_x(trained)), rtol=0, atol=0)


def test_frozen_batchnorm_still_refuses_a_checkpoint_that_does_not_fit() -> None:
    state = nn.BatchNorm2d(8).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        FrozenBatchNorm(8).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "running_var"'):
        FrozenBatchNorm(8).load_state_dict({k: v for k, v in state.items() if k != "running_var"})


def test_a_frozen_subclass_loads_the_subclass_checkpoint() -> None:
    original = _conv_bn(subclass=True).train()
    original(_x(original))
    converted = normswap.convert(original.eval(), _x(original), to="frozen").model
    converted.load_state_dict(original.state_dict())  # num_batches_tracked included
