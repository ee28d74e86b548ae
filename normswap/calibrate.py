"""Calibrate: fit each new layer's per-channel affine to the original BatchNorm output, layer by layer.

For site k, z is the new layer's normalized output (before its affine) computed from the converted
model's own activations (upstream sites already calibrated) and y the original BatchNorm's
eval-mode output on the original model's activations. Per channel, in closed form:
    scale = cov(z, y) / var(z),   shift = mean(y) - scale * mean(z)
Statistics are streamed batch by batch: per site only per-channel sums are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .capture import as_input_tuple, preserved
from .errors import CalibrationError
from .norms import ChannelLayerNorm, SwappedBatchNorm, channel_layer_norm
from .plan import Plan, PlanEntry


@dataclass
class SiteFit:
    """Fit quality for one calibrated site."""

    name: str
    target: str
    r2: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.name, "target": self.target, "r2": self.r2, "samples": self.samples}


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has been seen."""


def normalize_without_affine(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The new layer's output before its per-channel affine."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, SwappedBatchNorm):
        if module.normswap_target == "groupnorm":
            return F.group_norm(x, module.normswap_num_groups, None, None, module.eps)
        return channel_layer_norm(x, None, None, module.eps, module.num_features)
    if isinstance(module, (ChannelLayerNorm, nn.LayerNorm)):
        return channel_layer_norm(x, None, None, module.eps)
    raise CalibrationError(f"Cannot calibrate a {type(module).__name__}.")


def original_batchnorm_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original BatchNorm's eval-mode normalization (with affine, without any subclass extras)."""
    use_batch = module.running_mean is None
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, use_batch, 0.0, module.eps)


def _channel_sums(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    dims = [d for d in range(z.dim()) if d != 1]
    z, y = z.double(), y.double()
    return {"z": z.sum(dims), "y": y.sum(dims), "zz": (z * z).sum(dims), "yy": (y * y).sum(dims), "zy": (z * y).sum(dims), "n": torch.tensor(float(z.numel() // z.shape[1]))}


def _inputs_of(model: nn.Module, name: str, inputs: tuple, calls: int = 1) -> torch.Tensor:
    """Run `model` until submodule `name` has been called `calls` times; its inputs, concatenated
    along the batch axis (a module reused at every time step contributes every step)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        if len(seen) >= calls:
            raise _Stop  # nothing downstream is needed

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(*inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise CalibrationError(f"Layer '{name}' is never called on the calibration inputs.")
    return torch.cat(seen)


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
    """A converted module: z from a forward pre-hook on it, y from the original BatchNorm module."""

    def __init__(self, name: str, converted: nn.Module, original: nn.Module, calls: int) -> None:
        self.name, self.converted, self.original, self.calls = name, converted, original, calls
        self.new, self.old = converted.get_submodule(name), original.get_submodule(name)
        if self.new.weight is None:
            raise CalibrationError(f"Layer '{name}' has no affine parameters (affine=False) to calibrate.")

    def pair(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        z = normalize_without_affine(self.new, _inputs_of(self.converted, self.name, batch, self.calls))
        y = original_batchnorm_output(self.old, _inputs_of(self.original, self.name, batch, self.calls))
        return z, y

    def set_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.new.weight.copy_(scale.to(self.new.weight.dtype))
        self.new.bias.copy_(shift.to(self.new.bias.dtype))


class _FunctionalSite:
    """A rewritten functional call: its replacement node in the converted graph (tagged by the
    rewrite pass) and the original call in an eval-mode trace of the original model."""

    def __init__(self, name: str, converted: fx.GraphModule, original_graph: fx.GraphModule) -> None:
        from normswap.passes.rewrite_functional import SITE_META

        self.name, self.converted, self.original_graph = name, converted, original_graph
        self.new = next((n for n in converted.graph.nodes if n.meta.get(SITE_META) == name), None)
        self.old = next((n for n in original_graph.graph.nodes if n.name == name), None)
        if self.new is None or self.old is None:
            raise CalibrationError(f"Functional site '{name}' is not in the converted graph; calibrate the model convert() returned.")
        # group_norm(x, G, weight, bias, eps) / channel_layer_norm(x, weight, bias, eps, C)
        self.layer_norm = self.new.target is channel_layer_norm
        weight, bias = self.new.args[1:3] if self.layer_norm else self.new.args[2:4]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(bias, fx.Node) and bias.op == "get_attr"):
            raise CalibrationError(f"Functional site '{name}' has no weight/bias attributes to calibrate.")
        self.weight = _attribute(converted, weight.target)
        self.bias = _attribute(converted, bias.target)

    def pair(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        args, _ = _node_arguments(self.converted, self.new, batch)
        if self.layer_norm:
            z = channel_layer_norm(args[0], None, None, args[3], args[4] if len(args) > 4 else None)
        else:
            z = F.group_norm(args[0], args[1], None, None, args[4])
        old_args, old_kwargs = _node_arguments(self.original_graph, self.old, batch)
        return z, self.old.target(*old_args, **old_kwargs)  # traced in eval mode: running statistics

    def set_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.weight.copy_(scale.to(self.weight.dtype))
        self.bias.copy_(shift.to(self.bias.dtype))


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


def calibrate(converted: nn.Module, original: nn.Module, batches: Iterable[Any], plan: Plan | None = None) -> list[SiteFit]:
    """Fit the affine of every converted groupnorm / layernorm site to the original output.

    Args:
        converted: the converted model (modified in place).
        original: the model before conversion.
        batches: a re-iterable collection of input batches (tensors or tuples of tensors).
        plan: the conversion plan (default: every GroupNorm / LayerNorm module at a BatchNorm's name).

    Returns:
        Per site, the fit quality (R^2 of the per-channel affine regression).
    """
    batches = check_batches(batches)
    originals = dict(original.named_modules())
    if plan is not None:
        entries = [e for e in plan if e.target in ("groupnorm", "layernorm")]
    else:
        entries = [
            PlanEntry(n, "groupnorm" if isinstance(m, nn.GroupNorm) else "layernorm")
            for n, m in converted.named_modules()
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm, SwappedBatchNorm))
        ]
    entries = [e for e in entries if e.kind == "functional" or isinstance(originals.get(e.name), nn.modules.batchnorm._BatchNorm)]
    if not entries:
        raise CalibrationError("The converted model has no GroupNorm / LayerNorm sites to calibrate (frozen sites keep the function already).")
    fits = []
    with preserved(original), torch.no_grad():
        original.eval()
        converted.eval()
        module_names = [e.name for e in entries if e.kind != "functional"]
        calls = _call_counts(original, module_names, batches[0]) if module_names else {}
        original_graph = None
        if any(e.kind == "functional" for e in entries):
            from .capture import trace

            original_graph = trace(original)  # eval mode: `training=self.training` traced as False
        for entry in entries:  # graph order: each fit sees the calibrated layers upstream
            if entry.kind == "functional":
                if not isinstance(converted, fx.GraphModule):
                    raise CalibrationError(f"Functional site '{entry.name}' needs the fx.GraphModule that convert() returned.")
                site = _FunctionalSite(entry.name, converted, original_graph)
            else:
                site = _ModuleSite(entry.name, converted, original, calls[entry.name])
            sums: dict[str, torch.Tensor] | None = None
            for batch in batches:
                part = _channel_sums(*site.pair(batch))
                sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
            scale, shift, r2, n = _fit(sums)
            site.set_affine(scale, shift)
            fits.append(SiteFit(entry.name, entry.target, r2, n))
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


def check_batches(batches: Iterable[Any]) -> list[tuple]:
    """Materialize and check calibration batches: non-empty, finite tensors."""
    checked = [as_input_tuple(b) for b in batches]
    if not checked:
        raise CalibrationError("Calibration data is empty; give at least one batch of inputs.")
    for index, batch in enumerate(checked):
        for x in batch:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationError(f"Calibration batch {index} holds NaN or infinite values; clean the data first.")
    return checked


def batches_from_tensor(data: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]


def load_calibration_tensor(path: str) -> torch.Tensor:
    """Inputs from a .pt / .npz / .safetensors file holding one tensor (first axis = samples)."""
    import os

    import numpy as np

    if not os.path.isfile(path):
        raise CalibrationError(f"Calibration data '{path}' does not exist.")
    try:
        if path.endswith(".npz"):
            with np.load(path) as archive:
                arrays = [archive[k] for k in archive.files]
            tensors = [torch.from_numpy(a) for a in arrays]
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = list(load_file(path).values())
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = [obj] if isinstance(obj, torch.Tensor) else [v for v in (obj.values() if isinstance(obj, dict) else obj) if isinstance(v, torch.Tensor)]
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"Calibration data '{path}' could not be read ({str(exc).splitlines()[0][:160]}).") from exc
    if len(tensors) != 1:
        raise CalibrationError(f"Calibration data '{path}' must hold exactly one tensor of inputs, found {len(tensors)}.")
    data = tensors[0].float()
    if data.dim() == 0 or data.shape[0] == 0:
        raise CalibrationError(f"Calibration data '{path}' is empty.")
    return data


def calibrate_and_heal_from_file(original: nn.Module, conversion, report, options) -> None:
    """The CLI's calibration step: load the file, check it fits, then `convert.calibrate_and_heal`."""
    from .convert import calibrate_and_heal

    data = load_calibration_tensor(options.calibration_data)
    batches = batches_from_tensor(data, options.calibration_batch_size)
    _check_fits(conversion.model, batches[0], options.calibration_data)
    calibrate_and_heal(conversion, original, batches, options.heal_steps, options.heal_lr, options.heal_params, options.seed)
    report.calibration = [fit.to_dict() for fit in conversion.calibration]
    report.drift.update(conversion.drift)


def _check_fits(model: nn.Module, batch: torch.Tensor, path: str) -> None:
    try:
        with preserved(model), torch.no_grad():
            model.eval()(batch)
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(
            f"Calibration data '{path}' of shape {tuple(batch.shape)} (per batch) does not fit the model: {str(exc).splitlines()[0][:160]}."
        ) from exc
