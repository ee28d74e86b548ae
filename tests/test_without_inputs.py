"""`convert(model, None)`: no example inputs, so nothing runs and every BatchNorm module is replaced
from its constructor arguments (what a module-by-module fixer such as Opacus' `ModuleValidator.fix`
has to work with). Where the example would have reached every layer, the result is the same model
`convert` makes with inputs; what cannot be seen without running forward is said in the notes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from models import build, build_real, input_for, inputs_for
from normswap.errors import PlanError
from normswap.rewrite import WITHOUT_INPUTS_NOTE

DP = normswap.Context(differential_privacy=True)


def _model(name: str) -> torch.nn.Module:
    return build_real(name) if name in {"torchvision_resnet", "timm_norm_act", "sync_bn_act"} else build(name)


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    return inputs_for(name) if name in {"torchvision_resnet", "timm_norm_act", "sync_bn_act"} else (input_for(name),)


# (an unreached BatchNorm1d's input may be (N, C) or (N, C, L): its LayerNorm is the channel-first
# form, which on (N, C) features computes what the example's nn.LayerNorm(C) does)
@pytest.mark.parametrize(
    ("name", "context"),
    [
        pytest.param("resnet", normswap.Context(), id="resnet"),
        pytest.param("mlp", normswap.Context(), id="mlp-features"),
        pytest.param("bn3d", normswap.Context(), id="bn3d"),
        pytest.param("timm_norm_act", DP, id="timm-subclass-dp"),
        pytest.param("sync_bn_act", normswap.Context(), id="timm-sync-subclass"),
    ],
)
def test_without_inputs_every_layer_gets_what_convert_gives_it_with_inputs(
    name: str, context: normswap.Context
) -> None:
    model = _model(name)
    blind = normswap.convert(model, None, context=context)
    seen = normswap.convert(model, _inputs(name), context=context)
    assert blind.capture_method == "modules"
    assert [(e.name, e.target) for e in blind.plan] == [(e.name, e.target) for e in seen.plan]
    assert not any(isinstance(m, _BatchNorm) for m in blind.model.modules())
    assert {f.site_name for f in blind.findings if f.code == "NS205"} == {e.name for e in blind.plan}
    assert blind.notes[0] == WITHOUT_INPUTS_NOTE
    with torch.no_grad():  # the same layers with the same weights: the same function, to float rounding
        torch.testing.assert_close(
            blind.model.eval()(*_inputs(name)), seen.model.eval()(*_inputs(name)), rtol=1e-6, atol=1e-6
        )


def test_without_inputs_a_functional_call_is_not_seen_and_the_notes_say_so() -> None:
    blind = normswap.convert(build("functional"), None)
    assert list(blind.plan) == []  # F.batch_norm in forward: only a run sees it
    assert "functional batch_norm calls in forward were not seen" in blind.notes[0]


def test_without_inputs_under_dp_in_place_operations_on_norm_outputs_are_found_in_the_source() -> None:
    x = inputs_for("torchvision_resnet")[0]
    blind = normswap.convert(build_real("torchvision_resnet"), None, context=DP)
    seen = normswap.convert(build_real("torchvision_resnet"), x, context=DP)
    assert not any(getattr(m, "inplace", False) for m in blind.model.modules())
    out_of_place = sorted(c.split(":")[0] for c in blind.changes if "out of place (torch.fx graph)" in c)
    assert out_of_place == sorted(c.split(":")[0] for c in seen.changes if "out of place (torch.fx graph)" in c)
    assert out_of_place  # TorchvisionBasicBlock's `out += identity`, read from its forward's source
    assert any("TorchvisionBasicBlock.forward's `out += identity`" in c for c in blind.changes)
    hooks = [  # what Opacus' hooks mode registers: a full backward hook on every layer with trainable parameters
        m.register_full_backward_hook(lambda module, grad_input, grad_output: None)
        for m in blind.model.modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    blind.model.train()(x).sum().backward()  # no "BackwardHookFunction is a view and is being modified inplace"
    for hook in hooks:
        hook.remove()


def test_in_place_statements_on_other_values_are_left_alone() -> None:
    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            steps = 0
            steps += 1  # not a value a layer returned
            shifted = x.clone()
            shifted.add_(1.0)  # nor this
            return self.bn(self.conv(shifted)) * steps

    blind = normswap.convert(Counter(), None, context=DP)
    assert not isinstance(blind.model, torch.fx.GraphModule)
    assert not any("out of place" in c for c in blind.changes)


def test_without_inputs_a_subclass_computing_statistics_by_hand_is_refused_by_name() -> None:
    with pytest.raises(PlanError, match=r"Layer 'norm1' \(NaiveSyncBatchNorm\) computes its batch statistics by hand"):
        normswap.convert(build_real("naive_sync_bn"), None)
