"""Calibration chooses each new layer's eps: a GroupNorm or LayerNorm divides every sample by its
own spread, so it drops the sample's scale (an image's contrast) that the original BatchNorm kept.
A larger eps lets part of that scale through; calibration takes the smallest eps, from a few
multiples of the typical variance, that fits the original's output best, and writes it into the
layer and the plan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.calibration import calibrate_sites
from normswap.calibration.fit import Swapped
from normswap.plan import Plan


def _contrast_net(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU twice, pooled to 4 class scores, with the BatchNorms' running statistics
    estimated on the data's distribution."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    model.train()
    with torch.no_grad():
        for batch in _batches(seed=seed + 100):
            model(batch)
    return model.eval()


def _batches(seed: int = 0, count: int = 4, size: int = 32) -> list[torch.Tensor]:
    """Images whose contrast varies from sample to sample by up to 10x, as real photographs' does."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        contrast = torch.exp(torch.empty(size, 1, 1, 1).uniform_(-1.15, 1.15, generator=generator))
        batches.append(contrast * torch.randn(size, 3, 8, 8, generator=generator))
    return batches


def _calibrated(target: str, **kwargs) -> tuple[normswap.Conversion, nn.Module, list]:
    model = _contrast_net()
    conversion = normswap.convert(model, _batches()[0][:2], to=target)
    fits = normswap.calibrate(conversion.model, model, _batches(), conversion.plan, **kwargs)
    return conversion, model, fits


def _output_error(converted: nn.Module, original: nn.Module) -> float:
    x = torch.cat(_batches(seed=7))  # data no fit saw
    with torch.no_grad():
        return float((converted(x) - original(x)).abs().mean())


@pytest.mark.parametrize("target", ["groupnorm", "layernorm"])
def test_calibration_chooses_a_larger_eps_where_it_keeps_the_scale(target: str) -> None:
    conversion, model, fits = _calibrated(target)
    first = fits[0]
    assert first.eps is not None and first.eps > 1e-3  # the stem keeps part of each image's contrast
    for fit in fits:  # the layer, its plan entry and the report agree
        entry = conversion.plan.get(fit.name)
        assert entry is not None
        assert conversion.model.get_submodule(fit.name).eps == entry.params.eps
        assert fit.eps is None or fit.eps == entry.params.eps

    # the same calibration with the layers' own eps: a worse fit and a worse model
    own, _, own_fits = _calibrated(target, fit_eps=False)
    assert all(fit.eps is None for fit in own_fits)
    assert own.model.get_submodule(first.name).eps == 1e-5
    assert first.r2 > own_fits[0].r2 + 0.05
    assert _output_error(conversion.model, model) < _output_error(own.model, model)


def test_eps_is_kept_where_a_larger_one_does_not_fit_better() -> None:
    # every sample at the same contrast: the normalization drops nothing BatchNorm kept
    model = _contrast_net()
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(32, 3, 8, 8, generator=generator) for _ in range(4)]
    data = [x / x.flatten(1).std(1).view(-1, 1, 1, 1) for x in data]
    conversion = normswap.convert(model, data[0][:2], to="groupnorm")
    fits = normswap.calibrate(conversion.model, model, data, conversion.plan)
    assert fits[0].eps is None and conversion.model.get_submodule(fits[0].name).eps == 1e-5


def test_the_chosen_eps_travels_with_the_plan() -> None:
    conversion, model, fits = _calibrated("groupnorm")
    assert any(fit.eps is not None for fit in fits)
    plan = Plan.from_json(conversion.plan.to_json())
    rebuilt = normswap.apply_plan(copy.deepcopy(model), plan)
    rebuilt.load_state_dict(conversion.model.state_dict())
    x = torch.cat(_batches(seed=7))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), conversion.model(x), rtol=0, atol=0)


def test_walk_and_layer_by_layer_choose_the_same_eps() -> None:
    _, _, fits = _calibrated("groupnorm")
    model = _contrast_net()
    conversion = normswap.convert(model, _batches()[0][:2], to="groupnorm")
    layered = calibrate_sites(conversion.model, model, _batches(), conversion.plan, layer_by_layer=True)
    assert not layered.walked
    for a, b in zip(fits, layered.fits, strict=True):
        assert a.name == b.name
        assert (a.eps is None) == (b.eps is None)
        if a.eps is not None and b.eps is not None:
            assert a.eps == pytest.approx(b.eps, rel=1e-5)


def test_returning_to_the_swap_restores_each_eps() -> None:
    model = _contrast_net()
    conversion = normswap.convert(model, _batches()[0][:2], to="groupnorm")
    swapped = Swapped.of(conversion.model, conversion.plan)
    fits = normswap.calibrate(conversion.model, model, _batches(), conversion.plan)
    changed = [fit.name for fit in fits if fit.eps is not None]
    assert changed
    swapped.restore(conversion.model, conversion.plan)
    for name in changed:
        entry = conversion.plan.get(name)
        assert entry is not None and entry.params.eps == 1e-5
        assert conversion.model.get_submodule(name).eps == 1e-5


def test_convert_with_calibration_data_reports_the_eps_in_model_and_plan(tmp_path) -> None:
    model = _contrast_net()
    conversion = normswap.convert(model, _batches()[0][:2], to="groupnorm", calibration_data=_batches(count=6))
    chosen = {fit.name: fit.eps for fit in conversion.calibration if fit.eps is not None}
    assert chosen  # the held-out judgement kept the calibrated layers
    for name, eps in chosen.items():
        entry = conversion.plan.get(name)
        assert entry is not None and entry.params.eps == eps == conversion.model.get_submodule(name).eps
    # attribution measured each site alone with its own copy of the entry: the plan holds only what was kept
    assert all(
        conversion.model.get_submodule(e.name).eps == e.params.eps for e in conversion.plan if e.name not in chosen
    )


def test_keep_eps_keeps_the_conversions_eps_through_convert() -> None:
    model = _contrast_net()
    kept = normswap.convert(model, _batches()[0][:2], to="groupnorm", calibration_data=_batches(count=6), keep_eps=True)
    assert kept.calibration and all(fit.eps is None for fit in kept.calibration)
    assert all(e.params.eps == 1e-5 == kept.model.get_submodule(e.name).eps for e in kept.plan)


class _Untraceable(nn.Module):
    """The contrast net behind data-dependent control flow: torch.fx cannot trace it, so each site's
    cost is measured by converting it alone in a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _contrast_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


def test_measuring_a_site_alone_in_a_copy_leaves_the_plan_alone() -> None:
    from normswap.calibration import site_costs

    model = _Untraceable().eval()
    plan = normswap.convert(model, _batches()[0][:2], to="groupnorm").plan
    before = {entry.name: entry.params for entry in plan}
    costs = site_costs(model, plan, [(x,) for x in _batches()], samples=64)
    assert costs and all(cost.calibrated is not None for cost in costs)  # each site fitted alone, in a copy
    assert {entry.name: entry.params for entry in plan} == before  # its eps stayed the measurement's
