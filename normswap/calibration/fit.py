"""Calibrate: fit each new layer's per-channel affine to the original BatchNorm output, layer by layer.

For site k, z is the new layer's normalized output (before its affine) computed from the converted
model's own activations (upstream sites already calibrated) and y the original BatchNorm's
eval-mode output on the original model's activations. Per channel, in closed form:
    scale = cov(z, y) / var(z),   shift = mean(y) - scale * mean(z)
Statistics are streamed batch by batch: per site only per-channel sums are kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .. import targets
from ..capture.tracer import BATCH_NORM_FUNCTIONS, BatchNormArgs, trace
from ..errors import CalibrationError
from ..passes.rewrite_functional import SITE_META
from ..plan import Plan, PlanEntry
from ..sites import SiteKind
from ..targets.takeover import TakenOver
from ..torchutil import preserved, require_module, require_type, tensor_attribute
from .data import check_batches, check_model_accepts
from .device import placed, resolve_device, to_device

log = logging.getLogger(__name__)


@dataclass
class SiteFit:
    """Fit quality for one calibrated site."""

    name: str
    target: str
    r2: float
    samples: int


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has been seen."""


class _BatchNormInputs(TorchFunctionMode):
    """Collects the input of every batch_norm call made while `inside[0]` is true."""

    def __init__(self, inside: list[bool], seen: list[torch.Tensor], calls: int) -> None:
        super().__init__()
        self.inside, self.seen, self.calls = inside, seen, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in BATCH_NORM_FUNCTIONS and self.inside[0]:
            self.seen.append(BatchNormArgs.of(func, args, kwargs).input.detach())
            if len(self.seen) >= self.calls:
                raise _Stop  # nothing downstream is needed
        return func(*args, **(kwargs or {}))


def _run_until_stop(model: nn.Module, inputs: tuple) -> None:
    with contextlib.suppress(_Stop):
        model(*inputs)


def _concatenated(seen: list[torch.Tensor], name: str) -> torch.Tensor:
    if not seen:
        raise CalibrationError(f"Layer '{name}' is never called on the calibration inputs.")
    return torch.cat(seen)  # a module reused at every time step contributes every step


def original_inputs(model: nn.Module, name: str, inputs: tuple, calls: int) -> torch.Tensor:
    """What the original BatchNorm `name` normalized in its first `calls` batch_norm calls: the
    input of the batch_norm call inside its forward (a subclass may transform x first)."""
    module = model.get_submodule(name)
    inside: list[bool] = [False]
    seen: list[torch.Tensor] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
        module.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)),
    ]
    try:
        with _BatchNormInputs(inside, seen, calls):
            _run_until_stop(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return _concatenated(seen, name)


def converted_inputs(model: nn.Module, name: str, inputs: tuple, calls: int) -> torch.Tensor:
    """What the converted layer `name` normalizes: its input, or for a subclass whose
    normalization was taken over, the input of that normalization."""
    module = model.get_submodule(name)
    seen: list[torch.Tensor] = []

    def observe(x: torch.Tensor) -> None:
        seen.append(x.detach())
        if len(seen) >= calls:
            raise _Stop

    if isinstance(module, TakenOver):
        module.normswap_observer = observe
        try:
            _run_until_stop(model, inputs)
        finally:
            module.normswap_observer = None
    else:
        handle = module.register_forward_pre_hook(lambda m, a: observe(a[0]))
        try:
            _run_until_stop(model, inputs)
        finally:
            handle.remove()
    return _concatenated(seen, name)


def original_batchnorm_output(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The original BatchNorm's eval-mode normalization (with affine, without any subclass extras)."""
    mean, var = tensor_attribute(module, "running_mean"), tensor_attribute(module, "running_var")
    weight, bias = tensor_attribute(module, "weight"), tensor_attribute(module, "bias")
    return F.batch_norm(x, mean, var, weight, bias, mean is None, 0.0, module.eps)


def _channel_sums(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    dims = [d for d in range(z.dim()) if d != 1]
    z, y = z.double(), y.double()
    return {
        "z": z.sum(dims),
        "y": y.sum(dims),
        "zz": (z * z).sum(dims),
        "yy": (y * y).sum(dims),
        "zy": (z * y).sum(dims),
        "n": torch.tensor(float(z.numel() // z.shape[1])),
    }


def _call_counts(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


class _ModuleSite:
    """A converted module site: z from the converted layer's input, y from the original BatchNorm."""

    def __init__(self, entry: PlanEntry, converted: nn.Module, original: nn.Module, calls: int) -> None:
        self.entry, self.converted, self.original, self.calls = entry, converted, original, calls
        old, new = original.get_submodule(entry.name), converted.get_submodule(entry.name)
        weight, bias = tensor_attribute(new, "weight"), tensor_attribute(new, "bias")
        if not isinstance(old, _BatchNorm):
            raise CalibrationError(f"Layer '{entry.name}' of the original model is a {type(old).__name__}, not a BatchNorm.")
        if weight is None or bias is None:
            raise CalibrationError(f"Layer '{entry.name}' has no affine parameters (affine=False) to calibrate.")
        self.old, self.weight, self.bias = old, weight, bias

    def pair(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        z = _normalized(self.entry, converted_inputs(self.converted, self.entry.name, batch, self.calls))
        y = original_batchnorm_output(self.old, original_inputs(self.original, self.entry.name, batch, self.calls))
        return z, y

    def set_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.weight.copy_(scale.to(self.weight.dtype))
        self.bias.copy_(shift.to(self.bias.dtype))


class _FunctionalSite:
    """A rewritten functional call: its replacement node in the converted graph (tagged by the
    rewrite pass) and the original call in an eval-mode trace of the original model. Weight and
    bias keep their attribute names through the rewrite."""

    def __init__(self, entry: PlanEntry, converted: fx.GraphModule, original_graph: fx.GraphModule) -> None:
        self.entry, self.converted, self.original_graph = entry, converted, original_graph
        new = next((n for n in converted.graph.nodes if n.meta.get(SITE_META) == entry.name), None)
        old = next((n for n in original_graph.graph.nodes if n.name == entry.name), None)
        if new is None or old is None:
            raise CalibrationError(f"Functional site '{entry.name}' is not in the converted graph; calibrate the model convert() returned.")
        self.new, self.old = new, old
        call = BatchNormArgs.of_node(old)
        if not all(isinstance(v, fx.Node) and v.op == "get_attr" for v in (call.weight, call.bias)):
            raise CalibrationError(f"Functional site '{entry.name}' has no weight/bias attributes to calibrate.")
        self.weight = _attribute(converted, call.weight.target)
        self.bias = _attribute(converted, call.bias.target)

    def pair(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        args, _ = _node_arguments(self.converted, self.new, batch)
        z = _normalized(self.entry, args[0])
        old_args, old_kwargs = _node_arguments(self.original_graph, self.old, batch)
        original_call: Any = self.old.target
        return z, original_call(*old_args, **old_kwargs)  # traced in eval mode: running statistics

    def set_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.weight.copy_(scale.to(self.weight.dtype))
        self.bias.copy_(shift.to(self.bias.dtype))


def _normalized(entry: PlanEntry, x: torch.Tensor) -> torch.Tensor:
    z = targets.get(entry.target).normalize(entry.params, x)
    if z is None:
        raise CalibrationError(f"Target '{entry.target}' of '{entry.name}' is not calibrated.")
    return z


def _attribute(root: nn.Module, target: str) -> torch.Tensor:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _node_arguments(graph_module: fx.GraphModule, node: fx.Node, inputs: tuple) -> tuple[tuple, dict]:
    """Run the graph until `node` and return its evaluated arguments."""
    found: list[tuple[tuple, dict]] = []

    class Until(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n is node:
                found.append(self.fetch_args_kwargs_from_env(n))
                raise _Stop  # (the Interpreter rewrites exception args, so the payload lives outside)
            return super().run_node(n)

    try:
        Until(graph_module).run(*inputs)
    except _Stop:
        return found[0]
    raise CalibrationError(f"Graph node '{node.name}' was not reached on the calibration inputs.")


def _entries_from_modules(converted: nn.Module, original: nn.Module) -> list[PlanEntry]:
    """Without a plan: every calibrated replacement sitting where the original has a BatchNorm."""
    originals = dict(original.named_modules())
    entries = []
    for name, module in converted.named_modules():
        found = targets.recognize(module) if isinstance(originals.get(name), _BatchNorm) else None
        if found is not None:
            target, params = found
            entries.append(PlanEntry(name, target.name, params))
    return entries


def calibrate(
    converted: nn.Module, original: nn.Module, batches: Iterable[Any], plan: Plan | None = None, *, device: str | torch.device | None = "auto"
) -> list[SiteFit]:
    """Fit the affine of every converted site whose target is calibrated (groupnorm, layernorm)
    to the original BatchNorm output.

    Args:
        converted: the converted model (modified in place).
        original: the model before conversion.
        batches: a re-iterable collection of input batches (tensors or tuples of tensors).
        plan: the conversion plan (default: every GroupNorm / LayerNorm at a BatchNorm's name).
        device: where to run ("auto": this process's GPU when there is one, else the CPU); both
            models return to their own devices afterwards.

    Returns:
        Per site, the fit quality (R^2 of the per-channel affine regression).
    """
    require_module(converted, "calibrate")
    require_module(original, "calibrate")
    require_type(plan, Plan, "plan", "calibrate")
    where = resolve_device(device)
    batches = [to_device(b, where) for b in check_batches(batches)]
    entries = list(plan) if plan is not None else _entries_from_modules(converted, original)
    entries = [e for e in entries if e.converts and targets.get(e.target).calibrated]
    if not entries:
        raise CalibrationError("The converted model has no GroupNorm / LayerNorm sites to calibrate (frozen sites keep the function already).")
    fits = []
    with placed(where, converted, original), preserved(original), preserved(converted), torch.no_grad():
        check_model_accepts(original, batches)
        original.eval()
        converted.eval()
        module_names = [e.name for e in entries if e.kind is not SiteKind.FUNCTIONAL]
        calls = _call_counts(original, module_names, batches[0]) if module_names else {}
        original_graph = trace(original) if any(e.kind is SiteKind.FUNCTIONAL for e in entries) else None  # eval: training=False
        for entry in entries:  # graph order: each fit sees the calibrated layers upstream
            site: _ModuleSite | _FunctionalSite
            if entry.kind is SiteKind.FUNCTIONAL:
                if not isinstance(converted, fx.GraphModule) or original_graph is None:
                    raise CalibrationError(f"Functional site '{entry.name}' needs the fx.GraphModule that convert() returned.")
                site = _FunctionalSite(entry, converted, original_graph)
            else:
                site = _ModuleSite(entry, converted, original, calls[entry.name])
            sums: dict[str, torch.Tensor] | None = None
            for batch in batches:
                part = _channel_sums(*site.pair(batch))
                sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
            if sums is None:
                raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
            scale, shift, r2, n = _fit(sums)
            if not (torch.isfinite(scale.float()).all() and torch.isfinite(shift.float()).all()):
                raise CalibrationError(
                    f"Calibrating layer '{entry.name}' gives non-finite affine parameters: the calibration data's scale is far from "
                    "what the model was trained on; check that it is the model's input, preprocessed the same way."
                )
            site.set_affine(scale, shift)
            fits.append(SiteFit(entry.name, entry.target, r2, n))
            log.debug("calibrated %s (%s): R^2 %.3f over %d values per channel", entry.name, entry.target, r2, n)
    return fits


def _fit(s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Per-channel least squares y ~ scale * z + shift from the streamed sums; R^2 over all channels."""
    n = s["n"]
    mean_z, mean_y = s["z"] / n, s["y"] / n
    var_z = s["zz"] / n - mean_z**2
    cov = s["zy"] / n - mean_z * mean_y
    var_y = (s["yy"] / n - mean_y**2).clamp_min(0)
    flat = var_z <= 1e-12  # constant z: only the shift can match
    scale = torch.where(flat, torch.zeros_like(cov), cov / var_z.clamp_min(1e-12))
    shift = mean_y - scale * mean_z
    residual = (var_y - torch.where(flat, torch.zeros_like(cov), cov**2 / var_z.clamp_min(1e-12))).clamp_min(0)
    total = float(var_y.sum())
    r2 = 1.0 - float(residual.sum()) / total if total > 0 else 1.0
    return scale, shift, r2, int(n)
