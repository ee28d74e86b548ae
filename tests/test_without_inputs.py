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


def test_without_inputs_under_dp_inplace_flags_go_off_but_forward_code_is_not_searched() -> None:
    blind = normswap.convert(build_real("torchvision_resnet"), None, context=DP)
    assert not any(getattr(m, "inplace", False) for m in blind.model.modules())
    assert any("in-place operations in forward code (`out += identity`) were not searched" in n for n in blind.notes)
    seen = normswap.convert(build_real("torchvision_resnet"), inputs_for("torchvision_resnet"), context=DP)
    assert any("out of place (torch.fx graph)" in change for change in seen.changes)  # what inputs make possible
    assert not any("out of place (torch.fx graph)" in change for change in blind.changes)


def test_without_inputs_a_subclass_computing_statistics_by_hand_is_refused_by_name() -> None:
    with pytest.raises(PlanError, match=r"Layer 'norm1' \(NaiveSyncBatchNorm\) computes its batch statistics by hand"):
        normswap.convert(build_real("naive_sync_bn"), None)
