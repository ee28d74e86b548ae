"""Replace planned BatchNorm modules in the module tree (names unchanged) by what the target puts
in their place (`Target.replace`: by default torch's own classes by the target's module,
subclasses by a module of the target's class that keeps their forward, see
normswap/targets/takeover.py); each with everything attached to it carried over (replace.py)."""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from normswap import targets
from normswap.errors import PlanError
from normswap.plan import Plan
from normswap.sites import SiteKind

from .base import Pass, PassResult
from .replace import module_names, replace_module


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
                raise PlanError(
                    f"The plan expects a BatchNorm at '{entry.name}' but the model has a {type(module).__name__} there."
                )
            if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
                raise PlanError(
                    f"Layer '{entry.name}' is a lazy BatchNorm that was never run; pass example_inputs so it can be materialized."
                )
            channels = entry.params.get("num_channels", entry.params.get("num_features"))
            if channels is not None and module.num_features != int(channels):
                raise PlanError(
                    f"Plan entry '{entry.name}' expects {channels} channels but the model's layer has {module.num_features}; "
                    "the plan was made for another configuration of this model."
                )

    def call(self, model: nn.Module) -> PassResult:
        changes = []
        aliases = module_names(model)
        for entry in self.entries:
            with self.working_on(entry.name):
                original = cast(_BatchNorm, model.get_submodule(entry.name))  # requires() checked it
                target = targets.get(entry.target)
                target.absorb(model, entry.name, original, entry.params)
                replacement = target.replace(original, entry.params, entry.name)
                replace_module(
                    model, aliases[id(original)], original, replacement, entry.read_by_forward, target.absorbs_affine
                )
                changes.append(f"{entry.name}: {type(original).__name__} -> {entry.target}")
        return PassResult(model, bool(changes), changes)

    def ensures(self, model: nn.Module) -> None:
        aliases = module_names(model)
        for entry in self.entries:
            module = model.get_submodule(entry.name)
            if isinstance(module, _BatchNorm) and not targets.get(entry.target).batch_statistics:
                raise PlanError(f"Layer '{entry.name}' is still a {type(module).__name__} after the swap.")
            for name in aliases[id(module)]:
                if model.get_submodule(name) is not module:
                    raise PlanError(f"Layer '{entry.name}' is also stored as '{name}', which the swap did not replace.")
