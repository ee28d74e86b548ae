"""Build the replacement for one BatchNorm module from its PlanEntry, carrying weights over."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .errors import PlanError
from .norms import ChannelLayerNorm, FrozenBatchNorm, GroupNorm, SwappedBatchNorm, swapped_class
from .plan import PlanEntry


def build_replacement(bn: nn.Module, entry: PlanEntry) -> nn.Module:
    """A new module computing `entry.target` with `bn`'s affine, eps (and statistics for frozen).

    BatchNorm subclasses that override forward are rebased in place (their forward is kept).
    """
    if not isinstance(bn, _BatchNorm):
        raise PlanError(f"Plan entry '{entry.name}' names a {type(bn).__name__}, not a BatchNorm; re-plan for this model.")
    if isinstance(bn, _LazyNormBase) and bn.has_uninitialized_params():
        raise PlanError(f"Layer '{entry.name}' is a lazy BatchNorm that was never run; pass example_inputs so it can be materialized.")
    if type(bn).forward is not _BatchNorm.forward and not type(bn).__module__.startswith("torch.nn"):
        return _rebase_subclass(bn, entry)
    p = entry.params
    if entry.target == "groupnorm":
        new = GroupNorm(int(p["num_groups"]), int(p["num_channels"]), eps=float(p["eps"]), affine=bool(p["affine"]))
    elif entry.target == "layernorm":
        if p.get("layout") == "features":
            new = nn.LayerNorm(int(p["num_channels"]), eps=float(p["eps"]), elementwise_affine=bool(p["affine"]))
        else:
            new = ChannelLayerNorm(int(p["num_channels"]), eps=float(p["eps"]), affine=bool(p["affine"]))
    elif entry.target == "frozen":
        new = FrozenBatchNorm(int(p["num_features"]), eps=float(p["eps"]), affine=bool(p["affine"]))
        _copy(bn, new, ("running_mean", "running_var"))
    elif entry.target == "syncbn":
        new = nn.SyncBatchNorm(
            int(p["num_features"]), eps=float(p["eps"]), momentum=p.get("momentum"),
            affine=bool(p["affine"]), track_running_stats=bool(p.get("track_running_stats", True)),
        )
        _copy(bn, new, ("running_mean", "running_var", "num_batches_tracked"))
    else:
        raise PlanError(f"Target '{entry.target}' of '{entry.name}' does not build a module.")
    _check_channels(bn, entry)
    _copy(bn, new, ("weight", "bias"))
    reference = bn.weight if bn.weight is not None else bn.running_mean
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    if entry.target != "frozen":
        for name in ("weight", "bias"):
            if getattr(bn, name, None) is not None and getattr(new, name, None) is not None:
                getattr(new, name).requires_grad_(getattr(bn, name).requires_grad)
    return new.train(bn.training)


def _check_channels(bn: _BatchNorm, entry: PlanEntry) -> None:
    channels = entry.params.get("num_channels", entry.params.get("num_features"))
    if channels is not None and bn.num_features != int(channels):
        raise PlanError(
            f"Plan entry '{entry.name}' expects {channels} channels but the model's layer has {bn.num_features}; "
            "the plan was made for another configuration of this model."
        )


def _copy(source: nn.Module, target: nn.Module, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name in names:
            value, slot = getattr(source, name, None), getattr(target, name, None)
            if isinstance(value, torch.Tensor) and isinstance(slot, torch.Tensor):
                slot.copy_(value)


def _rebase_subclass(bn: _BatchNorm, entry: PlanEntry) -> nn.Module:
    """Keep the subclass instance and its forward; its `super().forward()` becomes the new norm."""
    _check_channels(bn, entry)
    bn.__class__ = swapped_class(type(bn))
    if not isinstance(bn, SwappedBatchNorm) or type(bn).__mro__.index(SwappedBatchNorm) > type(bn).__mro__.index(_BatchNorm):
        raise PlanError(f"BatchNorm subclass '{entry.name}' cannot be rebased; keep it or replace the class in your code.")
    bn.normswap_target = entry.target
    if entry.target == "groupnorm":
        bn.normswap_num_groups = int(entry.params["num_groups"])
    if entry.target in ("groupnorm", "layernorm"):
        # per-sample normalizations keep no statistics: drop them from state_dict
        bn.track_running_stats = False
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(name, None)
    elif entry.target == "frozen":
        for parameter in (bn.weight, bn.bias):
            if parameter is not None:
                parameter.requires_grad_(False)
    else:
        raise PlanError(f"Target '{entry.target}' cannot replace BatchNorm subclass '{entry.name}'; use groupnorm, layernorm or frozen.")
    return bn
