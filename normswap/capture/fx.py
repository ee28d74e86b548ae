"""Capture strategy 1: torch.fx symbolic tracing (a graph: producers, consumers, functional calls)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..source import location_from_stack_trace
from .calls import BatchNormCall, Capture, run_eagerly, shape_of
from .order import graph_order
from .tracer import (
    CALL_SITE_META,
    BatchNormArgs,
    BatchNormTracer,
    describe_node,
    is_batch_norm_call,
    is_batchnorm_like,
    trace,
)


def propagate_shapes(graph_module: fx.GraphModule, inputs: tuple) -> None:
    """Fill node.meta['val'] by running the graph once (eval mode, no gradients).

    A real run costs one forward pass; fake tensors avoid the arithmetic but pay ~3 ms of
    dispatch per module, which is slower for all but very large inputs (benchmarks/bench_lint.py).
    """
    graph_module.eval()
    with torch.no_grad():
        _RealShapeProp(graph_module).run(*inputs)


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


class _RealShapeProp(fx.Interpreter):
    """Records each node's output shape (not the tensor: nothing large is kept alive)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["val"] = _Shape(tuple(result.shape))
        return result


def capture_fx(model: nn.Module, inputs: tuple) -> Capture:
    model.train()
    graph_module = trace(model)
    try:
        propagate_shapes(graph_module, inputs)
    except Exception:  # tell a model that cannot run (CaptureError) from one fx cannot trace (re-raised)
        run_eagerly(model, inputs)  # raises CaptureError if the model itself cannot run
        raise
    modules = dict(graph_module.named_modules())
    module_calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module_calls[str(node.target)] = module_calls.get(str(node.target), 0) + 1
    calls = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and is_batchnorm_like(modules[node.target]):
            calls.append(_fx_call(node, modules, module_calls, module=str(node.target)))
        elif is_batch_norm_call(node):
            calls.append(_fx_call(node, modules, module_calls, module=None))
    if any(call.module is None for call in calls):
        _record_eval_training_flags(model, calls)
    if any(call.producer_exclusive for call in calls):
        _require_exclusive_in_eval(model, calls)
    return Capture("fx", calls, graph_module, attribute_reads=_attribute_reads(graph_module, modules))


def _exclusive_producers(graph_module: fx.GraphModule) -> set[tuple[str, str]]:
    """(BatchNorm call, producer module) pairs of a graph where the producer runs once and its
    output feeds that call alone: what folding the call into the producer needs."""
    runs: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            runs[str(node.target)] = runs.get(str(node.target), 0) + 1
    modules = dict(graph_module.named_modules())
    pairs = set()
    for node in graph_module.graph.nodes:
        module_call = node.op == "call_module" and is_batchnorm_like(modules[node.target])
        if not (module_call or is_batch_norm_call(node)) or not node.all_input_nodes:
            continue
        source = node.all_input_nodes[0]
        if source.op == "call_module" and len(source.users) == 1 and runs[str(source.target)] == 1:
            pairs.add((str(node.target) if module_call else node.name, str(source.target)))
    return pairs


def _require_exclusive_in_eval(model: nn.Module, calls: list[BatchNormCall]) -> None:
    """Fold serves inference, so a producer must be exclusive in the eval-mode graph too: a
    forward that picks its BatchNorm by `self.training` may feed one convolution to a train-only
    BatchNorm and to another one in eval (a model fx cannot trace in eval mode folds nothing)."""
    was_training = model.training
    model.eval()
    try:
        exclusive = _exclusive_producers(trace(model))
    except Exception:  # noqa: BLE001 - the user's forward in eval mode: not traceable means no fold
        exclusive = set()
    finally:
        model.train(was_training)
    for call in calls:
        if call.producer_exclusive and (call.name, call.producer_module) not in exclusive:
            call.producer_exclusive = False


def _attribute_reads(graph_module: fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """The tensors of BatchNorm modules that forward reads directly (`get_attr bn.running_var`),
    which a replacement must keep for forward to run."""
    reads: dict[str, list[str]] = {}
    for node in graph_module.graph.nodes:
        owner, _, attribute = str(node.target).rpartition(".")
        if node.op == "get_attr" and owner in modules and is_batchnorm_like(modules[owner]):
            reads.setdefault(owner, []).append(attribute)
    return {owner: tuple(dict.fromkeys(attributes)) for owner, attributes in reads.items()}


def _fx_call(
    node: fx.Node, modules: dict[str, nn.Module], module_calls: dict[str, int], module: str | None
) -> BatchNormCall:
    source = node.args[0] if node.args else None
    call = BatchNormCall(
        name=module if module is not None else node.name,
        module=module,
        owner=owner_from_stack(node.meta.get("nn_module_stack")) if module is None else module,
        input_shape=shape_of(source.meta.get("val")) if isinstance(source, fx.Node) else None,
        called_at=node.meta.get(CALL_SITE_META) or location_from_stack_trace(node.stack_trace),
        producers=tuple(describe_node(a, modules) for a in node.all_input_nodes[:1]),
        consumers=tuple(describe_node(u, modules) for u in node.users),
    )
    if call.input_shape is not None and len(call.input_shape) == 3:
        call.order = graph_order(node, modules)
    if isinstance(source, fx.Node) and source.op == "call_module":
        call.producer_module = str(source.target)
        # folding rewrites the producer's weights: nothing else may see its output or call it
        call.producer_exclusive = len(source.users) == 1 and module_calls.get(str(source.target), 0) == 1
    if module is None:
        args = BatchNormArgs.of_node(node)
        call.training = bool(args.training)
        call.eps = float(args.eps)
        call.momentum = None if args.momentum is None else float(args.momentum)
        call.has_running_stats = args.running_mean is not None and args.running_var is not None
        call.has_affine = args.weight is not None
    return call


def owner_from_stack(stack: dict | None) -> str:
    """The innermost module of an `nn_module_stack` meta entry, without torch.export's "@N" call suffix."""
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"@\d+$", "", path)


def _record_eval_training_flags(model: nn.Module, calls: list[BatchNormCall]) -> None:
    """Trace again in eval mode: `training=self.training` is a constant in each trace."""
    model.eval()
    eval_graph = BatchNormTracer().trace(model)
    flags = {n.name: bool(BatchNormArgs.of_node(n).training) for n in eval_graph.nodes if is_batch_norm_call(n)}
    for call in calls:
        if call.module is None:
            call.training_in_eval = flags.get(call.name, call.training)
