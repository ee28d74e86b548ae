"""Replace planned BatchNorm modules in the module tree (names unchanged): torch's own classes by
the target's module, subclasses by taking over their normalization (see rebase.py)."""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from normswap import targets
from normswap.errors import PlanError
from normswap.plan import Plan
from normswap.sites import SiteKind
from normswap.torchutil import is_replacement, parent_and_attribute

from .base import Pass, PassResult
from .rebase import is_subclass_instance, take_over


class SwapBatchNormModules(Pass):
    """Replace each module entry of the plan (target other than keep) via setattr on its parent."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.entries = [e for e in plan if e.kind is not SiteKind.FUNCTIONAL and e.converts]

    def requires(self, model: nn.Module) -> None:
        for entry in self.entries:
            try:
                module = model.get_submodule(entry.name)
            except AttributeError:
                raise PlanError(
                    f"The plan names layer '{entry.name}', which this model does not have; "
                    "re-plan for this model or build the model with the same arguments."
                ) from None
            if not isinstance(module, _BatchNorm):
                raise PlanError(f"The plan expects a BatchNorm at '{entry.name}' but the model has a {type(module).__name__} there.")
            if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
                raise PlanError(f"Layer '{entry.name}' is a lazy BatchNorm that was never run; pass example_inputs so it can be materialized.")
            channels = entry.params.get("num_channels", entry.params.get("num_features"))
            if channels is not None and module.num_features != int(channels):
                raise PlanError(
                    f"Plan entry '{entry.name}' expects {channels} channels but the model's layer has {module.num_features}; "
                    "the plan was made for another configuration of this model."
                )

    def call(self, model: nn.Module) -> PassResult:
        changes = []
        aliases = _aliases(model)
        for entry in self.entries:
            with self.working_on(entry.name):
                original = cast(_BatchNorm, model.get_submodule(entry.name))  # requires() checked it
                before = type(original).__name__
                target = targets.get(entry.target)
                target.absorb(model, entry.name, original, entry.params)
                if is_subclass_instance(original):
                    take_over(original, entry)
                else:
                    replacement = target.module(original, entry.params)
                    for name in aliases[id(original)]:  # one module stored under several names stays one module
                        parent, attribute = parent_and_attribute(model, name)
                        setattr(parent, attribute, replacement)
                changes.append(f"{entry.name}: {before} -> {entry.target}")
        return PassResult(model, bool(changes), changes)

    def ensures(self, model: nn.Module) -> None:
        aliases = _aliases(model)
        for entry in self.entries:
            module = model.get_submodule(entry.name)
            if isinstance(module, _BatchNorm) and not is_replacement(module) and not targets.get(entry.target).batch_statistics:
                raise PlanError(f"Layer '{entry.name}' is still a {type(module).__name__} after the swap.")
            for name in aliases[id(module)]:
                if model.get_submodule(name) is not module:
                    raise PlanError(f"Layer '{entry.name}' is also stored as '{name}', which the swap did not replace.")


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object is reachable (a module may be stored twice)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names
