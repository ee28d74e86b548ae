"""Calibration walks both graphs in lockstep: the same fits as layer by layer from the input
(the method before it, kept for models torch.fx cannot trace), with each layer run once per batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from models import RecurrentBN, build, build_real, input_for
from normswap.calibration.fit import calibrate_sites

# (model, target): plain conv and MLP sites, depthwise widths, a BatchNorm1d over sequences, one
# module reused at 4 time steps, functional calls, subclasses calling super().forward and timm's
# subclass with its own F.batch_norm call
CASES = [
    ("resnet", "groupnorm"),
    ("mobilenet", "groupnorm"),
    ("mlp", "layernorm"),
    ("tcn", "groupnorm"),
    ("unrolled_rnn", "layernorm"),
    ("unrolled_rnn", "groupnorm"),
    ("functional", "groupnorm"),
    ("functional", "layernorm"),
    ("subclass", "groupnorm"),
    ("timm_norm_act", "groupnorm"),
    ("timm_norm_act", "layernorm"),
]
TOLERANCE = 1e-5  # the bound on fitted affines; both methods sum the same float64 statistics


class UnrolledRNN(RecurrentBN):
    """`RecurrentBN` written so that torch.fx can trace it (the state built from the input): one
    BatchNorm called at each of 4 time steps, each call reading the one before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hh.in_features)
        for t in range(self.steps):
            h = torch.tanh(self.bn(self.ih(x[:, t]) + self.hh(h)))
        return self.out(h)


def _model(name: str) -> nn.Module:
    if name == "unrolled_rnn":
        model = UnrolledRNN()
        model.load_state_dict(build("rnn").state_dict())
        return model.eval()
    return (build_real if name.startswith("timm") else build)(name).eval()


def _converted(name: str, target: str):
    model = _model(name)
    data = [input_for("rnn" if name == "unrolled_rnn" else name, batch=8) * (1 + 0.5 * i) + 0.1 * i for i in range(3)]
    return model, normswap.convert(model, data[0], to=target), data


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().items(), b.state_dict().items(), strict=True)
    return max(
        float((x.double() - y.double()).abs().max()) if x.is_floating_point() else 0.0 for (_, x), (_, y) in pairs
    )


@pytest.mark.parametrize(("name", "target"), CASES)
def test_lockstep_fits_equal_layer_by_layer(name: str, target: str) -> None:
    model, conversion, data = _converted(name, target)
    walked_model, layered_model = copy.deepcopy(conversion.model), copy.deepcopy(conversion.model)
    walked = calibrate_sites(walked_model, model, data, conversion.plan, device="cpu")
    layered = calibrate_sites(layered_model, model, data, conversion.plan, device="cpu", layer_by_layer=True)
    assert walked.walked and not walked.notes
    assert not layered.walked
    assert (
        sorted(f.name for f in walked.fits)
        == sorted(f.name for f in layered.fits)
        == sorted(e.name for e in conversion.plan.converted)
    )
    assert _max_difference(walked_model, conversion.model) > 1e-3  # calibration did change the affines
    assert _max_difference(walked_model, layered_model) <= TOLERANCE
    r2 = {f.name: f.r2 for f in layered.fits}
    assert all(abs(f.r2 - r2[f.name]) <= 1e-6 for f in walked.fits)


def _leaf_calls(model: nn.Module) -> tuple[dict[str, int], list]:
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            counts[name] = 0
            handles.append(
                module.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1))
            )
    return counts, handles


@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_each_layer_runs_once_per_batch(layer_by_layer: bool) -> None:
    model, conversion, data = _converted("resnet", "groupnorm")
    original_calls, original_handles = _leaf_calls(model)
    converted_calls, converted_handles = _leaf_calls(conversion.model)
    calibrate_sites(conversion.model, model, data, conversion.plan, device="cpu", layer_by_layer=layer_by_layer)
    for handle in original_handles + converted_handles:
        handle.remove()
    # the acceptance check runs the original once on one batch; layers after the last site are not needed
    if layer_by_layer:
        assert max(converted_calls.values()) > 2 * len(data)  # the stem runs again for every site
    else:
        assert max(original_calls.values()) <= len(data) + 1 and max(converted_calls.values()) <= len(data)
        assert sorted(converted_calls.values())[1] == len(data)  # all but the head, which follows the last site


def test_memory_limit_recomputes_batches_with_the_same_fits() -> None:
    model, conversion, data = _converted("resnet", "groupnorm")
    free, tight = copy.deepcopy(conversion.model), copy.deepcopy(conversion.model)
    unlimited = calibrate_sites(free, model, data, conversion.plan, device="cpu")
    limited = calibrate_sites(tight, model, data, conversion.plan, device="cpu", memory_limit=1)
    assert not unlimited.notes
    assert (
        len(limited.notes) == 1
        and f"{len(data) - 1} of {len(data)} batches were run again from the input" in limited.notes[0]
    )
    assert _max_difference(free, tight) == 0.0


@pytest.mark.parametrize("name", ["untraceable", "rnn"])
def test_untraceable_model_is_fitted_layer_by_layer_and_says_so(name: str) -> None:
    # data-dependent control flow; a state built with torch.zeros(x.shape[0], ...)
    model = build(name).eval()
    data = [input_for(name, batch=8) * (1 + i) for i in range(3)]
    conversion = normswap.convert(model, data[0], to="layernorm", calibration_data=data)
    assert conversion.calibration and all(0.0 < f.r2 <= 1.0 for f in conversion.calibration)
    assert any(
        "running both models from the input" in note and "torch.fx cannot trace" in note for note in conversion.notes
    )


@pytest.mark.parametrize(
    ("name", "target"),
    [("resnet", "groupnorm"), ("mobilenet", "groupnorm"), ("mlp", "layernorm"), ("timm_norm_act", "groupnorm")],
)
def test_attribution_from_the_site_equals_a_copy_per_site(name: str, target: str) -> None:
    # downstream of each site from the walk's activations (plain BatchNorms), against the site
    # converted alone in a copy of the model and both models run from the input (every kind)
    from normswap.calibration.attribution import _cost_in_a_copy, site_costs

    model, conversion, data = _converted(name, target)
    batches = [(x,) for x in data]
    walked = {c.site: c for c in site_costs(model, conversion.plan, batches)}
    copied = {e.name: _cost_in_a_copy(model, e, batches, True) for e in conversion.plan.converted}
    assert walked.keys() == copied.keys()
    for site, cost in walked.items():
        for now, before in ((cost.swap, copied[site].swap), (cost.calibrated, copied[site].calibrated)):
            assert now is not None and before is not None
            assert now.top1_agreement == before.top1_agreement
            assert now.cosine == pytest.approx(before.cosine, abs=1e-6) and now.mean_abs == pytest.approx(
                before.mean_abs, rel=1e-5, abs=1e-7
            )


@pytest.mark.parametrize(
    ("name", "target"), [("resnet", "groupnorm"), ("functional", "layernorm"), ("unrolled_rnn", "layernorm")]
)
def test_drift_read_off_the_walk_equals_running_both_models(name: str, target: str) -> None:
    from normswap.calibration.drift import measure_drift

    model, conversion, data = _converted(name, target)
    memory = {"roomy": None, "tight": 1}
    for limit in memory.values():  # batches dropped at a cut run to the outputs from the input
        calibrated = copy.deepcopy(conversion.model)
        walked = calibrate_sites(calibrated, model, data, conversion.plan, device="cpu", memory_limit=limit, drift=True)
        measured = measure_drift(model, calibrated, [(x,) for x in data])
        assert walked.drift is not None and walked.drift.samples == measured.samples == 8 * len(data)
        assert walked.drift.cosine == pytest.approx(measured.cosine, abs=1e-6)
        assert walked.drift.mean_abs == pytest.approx(measured.mean_abs, rel=1e-4, abs=1e-7)
        assert walked.drift.top1_agreement == measured.top1_agreement
