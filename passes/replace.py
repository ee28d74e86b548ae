"""Replace one module of a model by another, carrying everything attached to the old one.

What carries over: every hook (forward, pre-forward, backward, state-dict; the same tables, so the
user's handles still remove them), the parametrizations on its tensors (moved, with their exact
original values), the attributes code added to it, its training flag, and the tensors the model's
forward reads from it directly (`self.bn.running_var` in forward: kept as buffers). The new module
is built in the old one's dtype and on its device by the target. What cannot be carried raises a
PlanError naming the layer. Every name the old module is stored under points to the new one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from normswap.errors import PlanError
from normswap.torchutil import parent_and_attribute

# The hook tables of nn.Module (read off an instance, so that a newer torch's tables carry too).
HOOK_TABLES = tuple(name for name in vars(nn.Module()) if "hook" in name)
# What a torch BatchNorm holds on its own: anything else on an instance was put there by code.
_BATCHNORM_ATTRIBUTES = frozenset(vars(nn.BatchNorm1d(1))) | frozenset(vars(nn.SyncBatchNorm(1))) | {"parametrizations"}


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object is reachable (a module may be stored twice)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def replace_module(
    model: nn.Module,
    names: Sequence[str],
    old: nn.Module,
    new: nn.Module,
    read_by_forward: Collection[str] = (),
    affine_absorbed: bool = False,
) -> None:
    """Put `new` wherever `old` is stored in `model` (`names`: every qualified name of `old`).

    Args:
        read_by_forward: attributes of `old` the model's forward reads directly (running_mean,
            running_var...): kept on `new` when it lacks them.
        affine_absorbed: `old`'s affine went into another layer (a fold): its parametrizations,
            computed into that layer's weights, stay behind.

    Raises:
        PlanError: a parametrization on a tensor the new module does not have.
    """
    name = names[0]
    _carry_hooks(old, new)
    _carry_attributes(old, new, read_by_forward)
    if not affine_absorbed:
        _move_parametrizations(old, new, name)
    new.train(old.training)
    for qualified in names:  # one module stored under several names stays one module
        parent, attribute = parent_and_attribute(model, qualified)
        setattr(parent, attribute, new)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    for table in HOOK_TABLES:
        if getattr(old, table, None):
            setattr(new, table, getattr(old, table))  # the same table: RemovableHandle removes from it


def _carry_attributes(old: nn.Module, new: nn.Module, read_by_forward: Collection[str]) -> None:
    """Attributes code set on the BatchNorm, and the tensors forward reads from it, onto `new`."""
    for key, value in vars(old).items():
        if key not in _BATCHNORM_ATTRIBUTES and not key.startswith("_") and key not in vars(new):
            setattr(new, key, value)
    for attribute in read_by_forward:
        if hasattr(new, attribute) and getattr(new, attribute) is not None:
            continue
        value = getattr(old, attribute, None)
        if isinstance(value, nn.Parameter):
            new.register_parameter(attribute, value)
        elif isinstance(value, torch.Tensor):
            new.register_buffer(attribute, value)
        elif value is not None:
            setattr(new, attribute, value)


def _move_parametrizations(old: nn.Module, new: nn.Module, name: str) -> None:
    """Each parametrization of `old` (e.g. weight = exp(v)) registered on `new`, holding the very
    same original tensor and parametrization modules, so that state_dict keys and values stay."""
    if not parametrize.is_parametrized(old) or parametrize.is_parametrized(new):
        return
    chains = cast(nn.ModuleDict, old.parametrizations)
    for tensor_name, chain in chains.items():
        if not isinstance(getattr(new, tensor_name, None), torch.Tensor):
            raise PlanError(
                f"Layer '{name}' has a parametrization on its {tensor_name} ({type(cast(nn.ModuleList, chain)[0]).__name__}), and its replacement has no "
                f"{tensor_name}; keep the layer (--keep {name}) or remove the parametrization first."
            )
        first = cast(nn.ModuleList, chain)[0]
        parametrize.register_parametrization(new, tensor_name, first, unsafe=True)
        cast(nn.ModuleDict, new.parametrizations)[tensor_name] = (
            chain  # the original list: its exact stored tensor, every step
        )
