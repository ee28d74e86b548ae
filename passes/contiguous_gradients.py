"""Under differential privacy, every channel LayerNorm computes on its input's own memory layout, so
the layer before receives its gradient laid out as its output: Opacus' grad_sample_mode="ew"
convolutions `.view` that gradient, which the default formulation (F.layer_norm over a transposed
view, faster in eager mode) hands back transposed."""

from __future__ import annotations

from torch import fx, nn

from normswap.targets.layernorm import ChannelLayerNorm, channel_layer_norm

from .base import Pass, PassResult


class ContiguousGradients(Pass):
    """Sets `contiguous_gradient` on channel LayerNorm modules (taken-over subclasses included) and
    on the rewritten functional calls of a graph."""

    def call(self, model: nn.Module) -> PassResult:
        changes = []
        for name, module in model.named_modules():
            if isinstance(module, ChannelLayerNorm) and not module.contiguous_gradient:
                with self.working_on(name):
                    module.contiguous_gradient = True
                    changes.append(f"{name}: channel LayerNorm -> contiguous_gradient=True (Opacus' ew mode)")
        if isinstance(model, fx.GraphModule):
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target is channel_layer_norm:
                    with self.working_on(node):
                        node.kwargs = {**node.kwargs, "contiguous_gradient": True}
                        changes.append(f"{node.name}: channel_layer_norm -> contiguous_gradient=True (Opacus' ew mode)")
            model.recompile()
        return PassResult(model, bool(changes), changes)
