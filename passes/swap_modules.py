"""Swap planned BatchNorm modules in the module tree for their replacements (names unchanged)."""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.errors import PlanError
from normswap.fx_utils import parent_and_attribute
from normswap.norms import is_swapped
from normswap.plan import Plan
from normswap.replace import build_replacement

from .base import Pass, PassResult


class SwapBatchNormModules(Pass):
    """Replace each module entry of the plan (target other than keep) via setattr on its parent."""

    def __init__(self, plan: Plan) -> None:
        self.entries = [e for e in plan if e.kind != "functional" and e.converts]

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
                raise PlanError(
                    f"The plan expects a BatchNorm at '{entry.name}' but the model has a {type(module).__name__} there."
                )

    def call(self, model: nn.Module) -> PassResult:
        changes = []
        for entry in self.entries:
            parent, attribute = parent_and_attribute(model, entry.name)
            original = getattr(parent, attribute)
            before = type(original).__name__
            replacement = build_replacement(original, entry)
            if replacement is not original:
                setattr(parent, attribute, replacement)
            changes.append(f"{entry.name}: {before} -> {entry.target}")
        return PassResult(model, bool(changes), changes)

    def ensures(self, model: nn.Module) -> None:
        for entry in self.entries:
            module = model.get_submodule(entry.name)
            if isinstance(module, _BatchNorm) and not is_swapped(module) and entry.target != "syncbn":
                raise PlanError(f"Layer '{entry.name}' is still a {type(module).__name__} after the swap.")
