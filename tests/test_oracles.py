"""Independent oracles: every converted site against a reference built without normswap.

Per module site, on the input the site saw in the original model: groupnorm against
`nn.GroupNorm` and layernorm on (N, C) against `nn.LayerNorm`, both built from the copied
weights; the channel LayerNorm against its formula written out here; frozen against
BatchNorm's eval function; fold against BatchNorm's eval function applied to the producer's
original output. Per model, the whole converted model against the original model run with each
`batch_norm` call (modules, subclasses, functional calls) replaced by that formula: the
reference sees the call's own eps, weights and statistics, never the plan's copies of them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

import normswap
from models import MODELS, REAL_PATTERNS, build, build_real, input_for, inputs_for

TARGETS = ("auto", "groupnorm", "layernorm", "frozen", "fold", "syncbn", "batchnorm")
REFUSED = {
    ("no_running_stats", "frozen"),
    ("no_running_stats", "fold"),
    ("functional", "syncbn"),
    ("timm_norm_act_no_stats", "frozen"),
    ("timm_norm_act_no_stats", "fold"),
    *(("naive_sync_bn", t) for t in TARGETS if t != "batchnorm"),
}
NAMES = [m for m in MODELS if m not in ("no_bn", "lookalike")] + list(REAL_PATTERNS)
CASES = [(m, t) for m in NAMES for t in TARGETS if (m, t) not in REFUSED]


def _model_and_inputs(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name in REAL_PATTERNS:
        return build_real(name), inputs_for(name)
    return build(name), (input_for(name),)


# --- the formulas, written out ---------------------------------------------------------------


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def batchnorm_eval(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return _affine((x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps), weight, bias)


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = grouped.var(dim=2, unbiased=False, keepdim=True)
    return _affine(((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape), weight, bias)


def channel_layer_norm(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Over dim 1 only, independently at every position."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return _affine((x - mean) / torch.sqrt(var + eps), weight, bias)


def reference(
    target: str, params: dict[str, Any], x: torch.Tensor, mean, var, weight, bias, eps: float
) -> torch.Tensor | None:
    """What `target` computes from one batch_norm call's own arguments; None: the call as it is."""
    if target == "groupnorm":
        return group_norm(x, int(params["num_groups"]), weight, bias, eps)
    if target == "layernorm":
        return channel_layer_norm(x, weight, bias, eps)
    if target in ("frozen", "fold"):
        return batchnorm_eval(x, mean, var, weight, bias, eps)
    return None  # keep, syncbn (one process: BatchNorm itself), batchnorm


# --- per module site -------------------------------------------------------------------------


def _recorded_inputs(model: nn.Module, inputs: tuple, names: set[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone())
                )
            )
    with torch.no_grad():
        model.eval()(*inputs)
    for handle in handles:
        handle.remove()
    return seen


def _torch_reference(target: str, params: dict, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm / nn.LayerNorm built here from the copied weights, the channel formula, or
    BatchNorm's own eval function."""
    weight = bn.weight.detach() if bn.weight is not None else None
    bias = bn.bias.detach() if bn.bias is not None else None
    if target == "groupnorm":
        layer = nn.GroupNorm(int(params["num_groups"]), bn.num_features, eps=bn.eps, affine=bn.affine)
    elif target == "layernorm" and x.dim() == 2:
        layer = nn.LayerNorm(bn.num_features, eps=bn.eps, elementwise_affine=bn.affine)
    elif target == "layernorm":
        return channel_layer_norm(x, weight, bias, bn.eps)
    else:  # frozen; batchnorm in eval
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, training=False, eps=bn.eps)
    if bn.affine:
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return layer(x)


@pytest.mark.parametrize("name,to", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_every_converted_module_site_matches_a_reference_built_without_normswap(name: str, to: str) -> None:
    original, inputs = _model_and_inputs(name)
    conv = normswap.convert(original, inputs, to=to)
    sites = {s.name: s for s in conv.sites}
    entries = [
        e
        for e in conv.plan.converted
        if sites[e.name].kind == "module" and e.target in ("groupnorm", "layernorm", "frozen", "fold", "batchnorm")
    ]
    producers = {e.params["into"] for e in entries if e.target == "fold"}
    seen = _recorded_inputs(original, inputs, {e.name for e in entries} | producers)
    checked = 0
    for entry in entries:
        if entry.name not in seen:  # never called on the example: nothing to compare
            continue
        bn = original.get_submodule(entry.name)
        with torch.no_grad():
            if entry.target == "fold":
                x = seen[entry.params["into"]]
                expected = F.batch_norm(
                    original.get_submodule(entry.params["into"])(x),
                    bn.running_mean,
                    bn.running_var,
                    bn.weight,
                    bn.bias,
                    eps=bn.eps,
                )
                actual = conv.model.get_submodule(entry.params["into"])(x)
            else:
                x = seen[entry.name]
                expected = _torch_reference(entry.target, entry.params, bn, x)
                actual = conv.model.get_submodule(entry.name).eval()(x)
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(
            actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: {entry.name} ({entry.target})"
        )
        checked += 1
    if to in ("groupnorm", "layernorm", "frozen") and any(s.kind == "module" and s.call_count for s in conv.sites):
        assert checked, "a module site of this model was converted: it must have been compared"


# --- the whole model -------------------------------------------------------------------------


class _Reference(TorchFunctionMode):
    """Runs the original model with every batch_norm call replaced by its site's planned
    formula; a call belongs to the BatchNorm module running it, else (functional) to the next
    functional site in call order."""

    def __init__(self, plan: normswap.Plan, sites: list, model: nn.Module) -> None:
        super().__init__()
        self.entries = {e.name: e for e in plan}
        self.functional = [s.name for s in sites if s.kind == "functional"]
        self.running: list[str] = []
        self.calls = 0
        self.handles = []
        for name, module in model.named_modules():
            if name in self.entries and isinstance(module, _BatchNorm):
                self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self.running.append(name)))
                self.handles.append(module.register_forward_hook(self._leave))

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (F.batch_norm, torch.batch_norm):
            return func(*args, **kwargs)
        if func is torch.batch_norm:
            x, weight, bias, mean, var, _, _, eps = args[:8]
        else:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            bound = {**dict(zip(names, args, strict=False)), **kwargs}
            x, mean, var, weight, bias, eps = (
                bound.get(k) for k in ("input", "running_mean", "running_var", "weight", "bias", "eps")
            )
            eps = 1e-5 if eps is None else eps
        site = self.running[-1] if self.running else self.functional[min(self.calls, len(self.functional) - 1)]
        self.calls += not self.running
        entry = self.entries[site]
        value = reference(entry.target, entry.params, x, mean, var, weight, bias, float(eps))
        return func(*args, **kwargs) if value is None else value


@contextlib.contextmanager
def _as_reference(plan: normswap.Plan, sites: list, model: nn.Module) -> Iterator[None]:
    mode = _Reference(plan, sites, model)
    try:
        with mode:
            yield
    finally:
        for handle in mode.handles:
            handle.remove()


@pytest.mark.slow  # the per-site oracle above runs in the inner loop; this one adds subclasses and functional calls
@pytest.mark.parametrize("name,to", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_the_converted_model_matches_the_original_with_reference_norms(name: str, to: str) -> None:
    original, inputs = _model_and_inputs(name)
    conv = normswap.convert(original, inputs, to=to)
    with torch.no_grad():
        actual = conv.model.eval()(*inputs)
        with _as_reference(conv.plan, conv.sites, original):
            expected = original.eval()(*inputs)
    actual, expected = (actual[0], expected[0]) if isinstance(actual, tuple) else (actual, expected)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# --- eps ---------------------------------------------------------------------------------------


class _SmallVariance(nn.Module):
    """Two BatchNorm layers with eps 1e-3 on activations whose variance (~1e-4) is below it: an
    eps that does not carry over changes the output by a factor of ~3."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16) if rank == 2 else nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm1d(16, eps=1e-3) if rank == 2 else nn.BatchNorm2d(16, eps=1e-3)
        with torch.no_grad():  # small activations from the producer itself, so that fold applies
            self.linear.weight.mul_(0.01)
            self.linear.bias.mul_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


@pytest.mark.parametrize("to", ["groupnorm", "layernorm", "frozen", "fold", "syncbn"])
@pytest.mark.parametrize("rank", [2, 4])
def test_a_non_default_eps_arrives_in_the_replacement(to: str, rank: int) -> None:
    torch.manual_seed(0)
    model = _SmallVariance(rank).eval()
    with torch.no_grad():
        model.bn.running_var.fill_(1e-4)
    x = torch.randn(4, 8) if rank == 2 else torch.randn(4, 8, 3, 3)
    conv = normswap.convert(model, x, to=to)
    (entry,) = conv.plan.converted
    assert entry.target == to
    if "eps" in entry.params:
        assert entry.params["eps"] == 1e-3
    layer = conv.model.get_submodule("bn")
    if to != "fold":
        assert layer.eps == 1e-3
    with torch.no_grad(), _as_reference(conv.plan, conv.sites, model):
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(conv.model(x), expected, rtol=1e-4, atol=1e-5)
        dropped = reference(
            entry.target,
            entry.params,
            model.linear(x),
            model.bn.running_mean,
            model.bn.running_var,
            model.bn.weight,
            model.bn.bias,
            1e-5,
        )
    if dropped is not None:  # the oracle tells the two eps apart
        assert (dropped - expected).abs().max() > 0.1


# --- calibration ---------------------------------------------------------------------------------


class _NormCalls(TorchFunctionMode):
    """Records, in call order, what each normalization call got and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any], torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("batch_norm", "group_norm", "layer_norm"):
            bound = inspect.signature(getattr(F, name)).bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append((name, bound.arguments, out))
        return out


def _norm_calls(model: nn.Module, batches: list[torch.Tensor]) -> list[list[tuple]]:
    """Per batch, the normalization calls of one eval forward."""
    found = []
    for batch in batches:
        with torch.no_grad(), _NormCalls() as mode:
            model.eval()(batch)
        found.append(mode.calls)
    return found


@pytest.mark.parametrize("name,to", [("resnet", "groupnorm"), ("functional", "groupnorm"), ("mlp", "layernorm")])
def test_calibration_is_the_least_squares_fit_at_every_site(name: str, to: str) -> None:
    """Each calibrated affine equals the per-channel least-squares fit, solved here with
    torch.linalg.lstsq, of the original BatchNorm output on the normalized input the calibrated
    model feeds that site (upstream sites already calibrated)."""
    original = build(name)
    generator = torch.Generator().manual_seed(7)
    batches = [input_for(name, batch=16) * (1 + 0.5 * i) + torch.randn(1, generator=generator) for i in range(4)]
    # calibrate alone, on every batch: convert's calibration holds the last batch out and keeps
    # the swap where the fits lower held-out agreement; what is checked here is the fit itself
    conv = normswap.convert(original, batches[0], to=to)
    fits = normswap.calibrate(conv.model, original, batches, conv.plan)
    targets = _norm_calls(original, batches)
    sources = _norm_calls(conv.model, batches)
    sites = len(fits)
    assert sites == len(conv.plan.converted) and sites >= 1
    for index in range(sites):
        y = torch.cat([calls[index][2] for calls in targets])  # the original BatchNorm output
        name, arguments, _ = sources[0][index]
        inputs = torch.cat([calls[index][1]["input"] for calls in sources])
        weight, bias, eps = arguments["weight"], arguments["bias"], arguments["eps"]
        if name == "group_norm":
            z = F.group_norm(inputs, arguments["num_groups"], None, None, eps)
        else:
            assert name == "layer_norm" and inputs.dim() == 2, "the oracle covers LayerNorm over (N, C) features"
            z = F.layer_norm(inputs, arguments["normalized_shape"], None, None, eps)
        channels = y.shape[1]
        zc = z.transpose(0, 1).reshape(channels, -1).double()
        yc = y.transpose(0, 1).reshape(channels, -1).double()
        for c in range(channels):
            design = torch.stack([zc[c], torch.ones_like(zc[c])], dim=1)
            scale, shift = torch.linalg.lstsq(design, yc[c].unsqueeze(1)).solution.squeeze(1)
            torch.testing.assert_close(
                weight[c].double(), scale, rtol=1e-4, atol=1e-5, msg=f"{name} site {index} channel {c} scale"
            )
            torch.testing.assert_close(
                bias[c].double(), shift, rtol=1e-4, atol=1e-5, msg=f"{name} site {index} channel {c} shift"
            )
