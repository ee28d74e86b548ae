"""Rewrite planned functional batch_norm nodes of an FX graph into the target's functional form.

Each node becomes a call of the function the target names (group_norm, channel_layer_norm,
frozen_batch_norm, ...) on the same graph values, so parameter names are unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from normswap import targets
from normswap.capture.tracer import BatchNormArgs, is_batch_norm_call
from normswap.errors import NormswapError, PlanError
from normswap.plan import Plan, PlanEntry
from normswap.sites import SiteKind

from .base import Pass, PassResult

SITE_META = "normswap_site"
TARGET_META = "normswap_target"  # the target's name on the replacement: healing finds the new layers by it


class RewriteFunctionalBatchNorm(Pass):
    """Replace each functional entry of the plan (matched by graph node name) in a GraphModule."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.entries = {e.name: e for e in plan if e.kind is SiteKind.FUNCTIONAL and e.converts}

    def requires(self, model) -> None:
        if not self.entries:
            return
        if not isinstance(model, fx.GraphModule):
            raise PlanError(
                "Functional batch_norm sites can only be rewritten in a symbolically traced graph; "
                "this model could not be traced with torch.fx, keep those sites (target 'keep')."
            )
        names = {n.name for n in model.graph.nodes if is_batch_norm_call(n)}
        missing = sorted(set(self.entries) - names)
        if missing:
            raise PlanError(
                f"The plan names functional batch_norm call(s) {', '.join(missing)}, which this model's forward does not make."
            )

    def call(self, model: fx.GraphModule) -> PassResult:  # type: ignore[override]
        if not self.entries:
            return PassResult(model, False)
        graph = model.graph
        changes = []
        for node in list(graph.nodes):
            entry = self.entries.get(node.name) if is_batch_norm_call(node) else None
            if entry is None:
                continue
            with self.working_on(node):
                self._rewrite(model, node, entry)
            changes.append(f"{entry.name}: F.batch_norm -> {entry.target}")
        graph.lint()
        model.recompile()
        return PassResult(model, True, changes)

    @staticmethod
    def _rewrite(model: fx.GraphModule, node: fx.Node, entry: PlanEntry) -> None:
        """Replace one batch_norm node by the target's function on the same graph values."""
        graph = model.graph
        call = BatchNormArgs.of_node(node)
        target = targets.get(entry.target)
        try:
            target.absorb(model, entry.name, _Statistics(model, call), entry.params)
            function, arguments = target.function(entry.params, call)
        except NormswapError as exc:
            raise PlanError(f"Could not rewrite `{node.format_node()}` to {entry.target}: {exc}") from exc
        with graph.inserting_after(node):
            replacement = graph.call_function(function, arguments)
        replacement.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
        replacement.meta[SITE_META] = entry.name  # calibration finds the replacement of this site by it
        replacement.meta[TARGET_META] = entry.target
        inputs = node.all_input_nodes
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        # drop only what this rewrite orphaned (e.g. running statistics); a general dead-code
        # pass could also drop the user's in-place calls
        for orphan in inputs:
            if orphan.op == "get_attr" and not orphan.users:
                graph.erase_node(orphan)

    def ensures(self, model) -> None:
        if not self.entries:
            return
        left = [n.name for n in model.graph.nodes if is_batch_norm_call(n) and n.name in self.entries]
        if left:
            raise PlanError(f"Functional batch_norm node(s) {', '.join(left)} survived the rewrite.")


class _Statistics:
    """The tensors a functional batch_norm node reads, by BatchNorm's attribute names."""

    def __init__(self, model: fx.GraphModule, call: BatchNormArgs) -> None:
        for name in ("running_mean", "running_var", "weight", "bias"):
            setattr(self, name, _value(model, getattr(call, name)))


def _value(model: fx.GraphModule, value: Any) -> Any:
    """A get_attr node's tensor; anything else as it is (None for an absent argument)."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        found: Any = model
        for part in str(value.target).split("."):
            found = getattr(found, part)
        return found
    return value
