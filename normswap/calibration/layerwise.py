"""Calibration layer by layer from the input: for each site and batch, both models run from the
input up to that site. Time grows with depth × sites; it needs no graph, so it serves models
torch.fx cannot trace (captured by torch.export or hooks)."""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from ..errors import CalibrationError
from .affine import AffineSite, BatchNormInputs, Stop, concatenated, observing
from .stats import EpsSums


def _run_until_stop(model: nn.Module, inputs: tuple) -> None:
    with contextlib.suppress(Stop):
        model(*inputs)


def call_counts(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, int]:
    """How many times forward calls each of the modules `names` on `inputs`."""
    counts = dict.fromkeys(names, 0)
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts[n] + 1))
        for n in names
    ]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def original_inputs(model: nn.Module, name: str, inputs: tuple, calls: int) -> torch.Tensor:
    """What the original BatchNorm `name` normalized in its first `calls` batch_norm calls."""
    module = model.get_submodule(name)
    inside: list[bool] = [False]
    seen: list[torch.Tensor] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
        module.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)),
    ]
    try:
        with BatchNormInputs(inside, seen, calls):
            _run_until_stop(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return concatenated(seen, name)


def converted_inputs(model: nn.Module, name: str, inputs: tuple, calls: int) -> torch.Tensor:
    """What the converted layer `name` normalizes in its first `calls` calls."""
    seen: list[torch.Tensor] = []
    with observing(model.get_submodule(name), seen, calls):
        _run_until_stop(model, inputs)
    return concatenated(seen, name)


def _node_arguments(graph_module: fx.GraphModule, node: fx.Node, inputs: tuple) -> tuple[tuple, dict]:
    """Run the graph until `node` and return its evaluated arguments."""
    found: list[tuple[tuple, dict]] = []

    class Until(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n is node:
                found.append(self.fetch_args_kwargs_from_env(n))
                raise Stop  # (the Interpreter rewrites exception args, so the payload lives outside)
            return super().run_node(n)

    try:
        Until(graph_module).run(*inputs)
    except Stop:
        return found[0]
    raise CalibrationError(f"Graph node '{node.name}' was not reached on the calibration inputs.")


def module_pair(site: AffineSite, converted: nn.Module, original: nn.Module, batch: tuple, calls: int) -> EpsSums:
    """The sums of one batch for a module site, each model run from the input to the site."""
    x = converted_inputs(converted, site.name, batch, calls)
    return site.sums(x, site.target(original_inputs(original, site.name, batch, calls)))


def functional_pair(
    site: AffineSite,
    converted: fx.GraphModule,
    new: fx.Node,
    original_graph: fx.GraphModule,
    old: fx.Node,
    batch: tuple,
) -> EpsSums:
    """The sums of one batch for a functional site: its replacement node `new` in the converted
    graph and the original call `old` in the eval-mode trace, each run from the input."""
    args, _ = _node_arguments(converted, new, batch)
    old_args, old_kwargs = _node_arguments(original_graph, old, batch)
    original_call = old.target
    assert callable(original_call)
    return site.sums(args[0], original_call(*old_args, **old_kwargs))  # running statistics
