"""Capture a model's BatchNorm calls: torch.fx symbolic trace, then torch.export, then forward hooks.

Capture never mutates the user's model: training flags, attributes set in forward and buffers
(running statistics) are restored afterwards.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .errors import CaptureError
from .fx_utils import (
    BATCH_NORM_FUNCTIONS,
    CALL_SITE_META,
    BatchNormTracer,
    batch_norm_arguments,
    describe_node,
    is_batch_norm_call,
    is_batchnorm_like,
)
from .source import SourceLocation, location_from_stack_trace, user_frame_location

METHODS = ("fx", "export", "hooks")


@dataclass
class BatchNormCall:
    """One place in forward where BatchNorm semantics are used, as observed by a capture method."""

    name: str  # module qualified name, or a graph node name ("batch_norm", "batch_norm_1") for functional calls
    module: str | None  # the BN module called; None for a functional call
    owner: str  # qualified name of the module whose forward makes the call ("" = the model)
    input_shape: tuple[int, ...] | None
    called_at: SourceLocation | None
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    # functional calls only: the `training` flag as traced in train / eval mode, and the arguments.
    training: bool | None = None
    training_in_eval: bool | None = None
    eps: float | None = None
    momentum: float | None = None
    has_running_stats: bool | None = None
    has_affine: bool | None = None


@dataclass
class Capture:
    """What capture saw: the method used, the graph (if any) and every BatchNorm call."""

    method: str
    calls: list[BatchNormCall]
    graph_module: fx.GraphModule | None = None
    fallback_reasons: list[str] = field(default_factory=list)
    input_shapes: tuple[tuple[int, ...], ...] = ()


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalize example inputs (a tensor or a tuple/list of tensors) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise CaptureError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}."
    )


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's training flags, instance attributes, classes and buffers on exit."""
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(module.__dict__[key])
        buffers = {name: b.detach().clone() for name, b in module._buffers.items() if isinstance(b, torch.Tensor) and not isinstance(b, nn.parameter.UninitializedBuffer)}
        saved.append((module, module.__class__, state, buffers))
    try:
        yield
    finally:
        for module, cls, state, buffers in saved:
            module.__class__ = cls
            for key in ("_parameters", "_buffers", "_modules"):
                module.__dict__[key].clear()
                module.__dict__[key].update(state[key])
            for key in list(module.__dict__):
                if key not in state:
                    del module.__dict__[key]
            for key, value in state.items():
                if key not in ("_parameters", "_buffers", "_modules"):
                    module.__dict__[key] = value
            with torch.no_grad():
                for name, value in buffers.items():
                    module._buffers[name].copy_(value)


def _shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic dims
        return None


def capture(model: nn.Module, example_inputs: Any, *, methods: Sequence[str] = METHODS) -> Capture:
    """Observe every BatchNorm call of `model` on `example_inputs`, with the first method that works.

    Raises:
        CaptureError: the model cannot run on the example inputs at all.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"Expected a torch.nn.Module, got {type(model).__name__}; pass the model instance.")
    inputs = as_input_tuple(example_inputs)
    reasons: list[str] = []
    capturers = {"fx": _capture_fx, "export": _capture_export, "hooks": _capture_hooks}
    for method in methods:
        try:
            with preserved(model):
                result = capturers[method](model, inputs)
            result.fallback_reasons = reasons
            result.input_shapes = tuple(_shape_of(x) or () for x in inputs)
            return result
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure moves to the next method
            reasons.append(f"{method}: {_one_line(exc)}")
    raise CaptureError(f"Could not capture {type(model).__name__}: {'; '.join(reasons)}.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def run_eagerly(model: nn.Module, inputs: tuple) -> Any:
    """Run the model once in eval mode without gradients; a failure is the user's input problem."""
    with preserved(model), torch.no_grad():
        model.eval()
        try:
            return model(*inputs)
        except Exception as exc:  # noqa: BLE001
            shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)
            raise CaptureError(
                f"{type(model).__name__} cannot run on example inputs of shape {shapes}: {_one_line(exc)}; "
                "check --input-shape (one per model input, batch first)."
            ) from exc


# --- 1. torch.fx symbolic tracing -------------------------------------------------------------


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace with BatchNorm kept as leaves (mode as the model is)."""
    tracer = BatchNormTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(graph_module: fx.GraphModule, inputs: tuple) -> None:
    """Fill node.meta['val'] by running the graph once (eval mode, no gradients).

    A real run costs one forward pass; fake tensors avoid the arithmetic but pay ~3 ms of
    dispatch per module, which is slower for all but very large inputs (benchmarks/bench_lint.py).
    """
    graph_module.eval()
    with torch.no_grad():
        _RealShapeProp(graph_module).run(*inputs)


class _RealShapeProp(fx.Interpreter):
    """Records each node's output shape (not the tensor: nothing large is kept alive)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["val"] = _Shape(tuple(result.shape))
        return result


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def _capture_fx(model: nn.Module, inputs: tuple) -> Capture:
    model.train()
    graph_module = trace(model)
    try:
        propagate_shapes(graph_module, inputs)
    except Exception:
        run_eagerly(model, inputs)  # raises CaptureError if the model itself cannot run
        raise
    modules = dict(graph_module.named_modules())
    calls = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and is_batchnorm_like(modules[node.target]):
            calls.append(_fx_call(node, modules, module=str(node.target)))
        elif is_batch_norm_call(node):
            calls.append(_fx_call(node, modules, module=None))
    if any(call.module is None for call in calls):
        _record_eval_training_flags(model, calls)
    return Capture("fx", calls, graph_module)


def _fx_call(node: fx.Node, modules: dict[str, nn.Module], module: str | None) -> BatchNormCall:
    source = node.args[0] if node.args else None
    call = BatchNormCall(
        name=module if module is not None else node.name,
        module=module,
        owner=_owner_from_stack(node.meta.get("nn_module_stack")) if module is None else module,
        input_shape=_shape_of(source.meta.get("val")) if isinstance(source, fx.Node) else None,
        called_at=node.meta.get(CALL_SITE_META) or location_from_stack_trace(node.stack_trace),
        producers=tuple(describe_node(a, modules) for a in node.all_input_nodes[:1]),
        consumers=tuple(describe_node(u, modules) for u in node.users),
    )
    if module is None:
        args = batch_norm_arguments(node)
        call.training = bool(args["training"])
        call.eps = float(args["eps"])
        call.momentum = None if args["momentum"] is None else float(args["momentum"])
        call.has_running_stats = args["running_mean"] is not None and args["running_var"] is not None
        call.has_affine = args["weight"] is not None
    return call


def _owner_from_stack(stack: dict | None) -> str:
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"@\d+$", "", path)


def _record_eval_training_flags(model: nn.Module, calls: list[BatchNormCall]) -> None:
    """Trace again in eval mode: `training=self.training` is a constant in each trace."""
    model.eval()
    eval_graph = BatchNormTracer().trace(model)
    flags = {n.name: bool(batch_norm_arguments(n)["training"]) for n in eval_graph.nodes if is_batch_norm_call(n)}
    for call in calls:
        if call.module is None:
            call.training_in_eval = flags.get(call.name, call.training)


# --- 2. torch.export --------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's own logging and warnings while a capture method is tried (its failure is expected)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        # torch.export print()s the partial graph to stderr when it fails
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _capture_export(model: nn.Module, inputs: tuple) -> Capture:
    model.train()
    with quiet_torch():
        program = torch.export.export(model, inputs, strict=False)
    calls: list[BatchNormCall] = []
    functional_index = 0
    named = dict(model.named_modules())
    seen_call_keys: set[str] = set()
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        owner = _owner_from_stack(node.meta.get("nn_module_stack"))
        shape = _shape_of(node.args[0].meta.get("val")) if node.args and isinstance(node.args[0], fx.Node) else None
        location = location_from_stack_trace(node.meta.get("stack_trace"))
        if owner in named and is_batchnorm_like(named[owner]):
            call_key = list(node.meta["nn_module_stack"])[-1]  # unique per call ("...bn@1" on reuse)
            if call_key in seen_call_keys:
                continue  # one module call can lower to several batch_norm ops
            seen_call_keys.add(call_key)
            calls.append(BatchNormCall(name=owner, module=owner, owner=owner, input_shape=shape, called_at=location))
        else:
            name = "batch_norm" if functional_index == 0 else f"batch_norm_{functional_index}"
            functional_index += 1
            training = "no_training" not in str(node.target) and bool(node.args[5] if len(node.args) > 5 else False)
            calls.append(
                BatchNormCall(name=name, module=None, owner=owner, input_shape=shape, called_at=location, training=training)
            )
    return Capture("export", calls, None)


# --- 3. forward hooks -------------------------------------------------------------------------


class _FunctionalBatchNormSpy(TorchFunctionMode):
    """Sees `F.batch_norm` / `torch.batch_norm` calls made outside any BatchNorm module."""

    def __init__(self, module_stack: list[tuple[str, nn.Module]], calls: list[BatchNormCall]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inside_norm = any(is_batchnorm_like(module) for _, module in self.module_stack)
        if func in BATCH_NORM_FUNCTIONS and not inside_norm:
            index = sum(1 for c in self.calls if c.module is None)
            x = args[0] if args else kwargs.get("input")
            self.calls.append(
                BatchNormCall(
                    name="batch_norm" if index == 0 else f"batch_norm_{index}",
                    module=None,
                    owner=self.module_stack[-1][0] if self.module_stack else "",
                    input_shape=_shape_of(x),
                    called_at=user_frame_location(skip=2),
                    # hooks run the model in eval mode: the flag seen is the inference one
                    training_in_eval=bool(kwargs.get("training", args[5] if len(args) > 5 else False)),
                )
            )
        return func(*args, **kwargs)


def _capture_hooks(model: nn.Module, inputs: tuple) -> Capture:
    calls: list[BatchNormCall] = []
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append((name, module))
            if is_batchnorm_like(module) and not any(is_batchnorm_like(m) for _, m in stack[:-1]):
                x = args[0] if args else None
                calls.append(
                    BatchNormCall(name=name, module=name, owner=name, input_shape=_shape_of(x), called_at=user_frame_location(skip=2))
                )

        return hook

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
        with _FunctionalBatchNormSpy(stack, calls):
            run_eagerly(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Capture("hooks", calls, None)
