"""Rewrite planned functional batch_norm nodes of an FX graph into per-sample normalizations.

groupnorm: group_norm(x, G, w, b, eps); layernorm: channel_layer_norm(x, w, b, eps);
frozen: frozen_batch_norm(x, running_mean, running_var, w, b, eps). The weight / bias / statistics
come from the same graph values, so parameter names are unchanged.
"""
from __future__ import annotations

from torch import fx

from normswap.errors import PlanError
from normswap.fx_utils import batch_norm_arguments, is_batch_norm_call
from normswap.norms import channel_layer_norm, frozen_batch_norm, group_norm
from normswap.plan import Plan

from .base import Pass, PassResult

SITE_META = "normswap_site"


class RewriteFunctionalBatchNorm(Pass):
    """Replace each functional entry of the plan (matched by graph node name) in a GraphModule."""

    def __init__(self, plan: Plan) -> None:
        self.entries = {e.name: e for e in plan if e.kind == "functional" and e.converts}

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

    def call(self, model: fx.GraphModule) -> PassResult:
        if not self.entries:
            return PassResult(model, False)
        graph = model.graph
        changes = []
        for node in list(graph.nodes):
            entry = self.entries.get(node.name) if is_batch_norm_call(node) else None
            if entry is None:
                continue
            try:
                replacement = _replacement_node(graph, node, entry)
            except Exception as exc:
                raise PlanError(f"Could not rewrite `{node.format_node()}` to {entry.target}: {exc}.") from exc
            inputs = node.all_input_nodes
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            # drop only what this rewrite orphaned (e.g. running statistics); a general dead-code
            # pass could also drop the user's in-place calls
            for orphan in inputs:
                if orphan.op == "get_attr" and not orphan.users:
                    graph.erase_node(orphan)
            changes.append(f"{entry.name}: F.batch_norm -> {entry.target}")
        graph.lint()
        model.recompile()
        return PassResult(model, True, changes)

    def ensures(self, model) -> None:
        if not self.entries:
            return
        left = [n.name for n in model.graph.nodes if is_batch_norm_call(n) and n.name in self.entries]
        if left:
            raise PlanError(f"Functional batch_norm node(s) {', '.join(left)} survived the rewrite.")


def _replacement_node(graph: fx.Graph, node: fx.Node, entry) -> fx.Node:
    args = batch_norm_arguments(node)
    eps = float(entry.params.get("eps", args["eps"]))
    x, weight, bias = args["input"], args["weight"], args["bias"]
    with graph.inserting_after(node):
        if entry.target == "groupnorm":
            new = graph.call_function(group_norm, (x, int(entry.params["num_groups"]), weight, bias, eps))
        elif entry.target == "layernorm":
            new = graph.call_function(channel_layer_norm, (x, weight, bias, eps, int(entry.params["num_channels"])))
        elif entry.target == "frozen":
            if args["running_mean"] is None or args["running_var"] is None:
                raise PlanError(f"functional batch_norm '{entry.name}' has no running statistics to freeze")
            new = graph.call_function(frozen_batch_norm, (x, args["running_mean"], args["running_var"], weight, bias, eps))
        else:
            raise PlanError(f"target '{entry.target}' has no functional form")
    new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack", "val")})
    new.meta[SITE_META] = entry.name  # calibration finds the replacement of this site by it
    return new
