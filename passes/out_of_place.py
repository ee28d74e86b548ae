"""Make in-place operations on the outputs of trainable layers out-of-place, for Opacus' hooks.

Opacus computes per-sample gradients with a full backward hook on every layer that has trainable
parameters; the hook hands the layer's output on as a view, and an in-place operation on that view
(`ReLU(inplace=True)` after a norm, `out += identity` in a residual block) raises "Output 0 of
BackwardHookFunction is a view and is being modified inplace" at the first DP-SGD step (opacus
issue 828). One forward pass finds each such operation and the module running it:

- inside a module that has an `inplace` flag (ReLU, SiLU, Hardswish, Dropout...): the flag is
  turned off;
- in the forward code of a module (`out += identity`): that module is replaced by its torch.fx
  graph, in which the operation is out-of-place (an `fx.GraphModule` with the same submodules,
  parameters and state_dict keys), when the value it modified is used nowhere else.

What it cannot make out-of-place is reported, so a user knows before training. Without example
inputs nothing runs: every `inplace` flag is turned off (which ones follow a hooked layer is not
known), and each module's forward source is read for in-place statements on what a trainable
submodule returned (`out += identity`); such a module is replaced by its graph as above.
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from normswap.capture.tracer import BatchNormTracer
from normswap.torchutil import preserved

from .base import Pass, PassResult
from .replace import module_names, replace_module

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass
class _Found:
    """Where forward modifies a hooked layer's output in place."""

    flagged: dict[str, nn.Module] = field(default_factory=dict)  # modules with an `inplace` flag to turn off
    owners: dict[str, str] = field(default_factory=dict)  # module whose forward code does it -> the operation


def _in_place(func: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    dunder = name.startswith("__i") and name.endswith("__") and name != "__init__"
    return bool(kwargs.get("inplace")) or dunder or (name.endswith("_") and not name.startswith("_"))


class _Watch(TorchFunctionMode):
    """Sees every in-place operation whose target is the output of a hooked layer."""

    def __init__(self, stack: list[tuple[str, nn.Module]], outputs: dict[int, str], found: _Found) -> None:
        super().__init__()
        self.stack, self.outputs, self.found = stack, outputs, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and id(first) in self.outputs and _in_place(func, kwargs) and self.stack:
            name, module = self.stack[-1]
            if hasattr(module, "inplace") and isinstance(module.inplace, bool):
                self.found.flagged[name] = module
            else:
                self.found.owners.setdefault(
                    name, f"{getattr(func, '__name__', func)} on the output of {self.outputs[id(first)]}"
                )
        return func(*args, **kwargs)


def find_in_place(model: nn.Module, inputs: tuple) -> _Found:
    """One forward (train mode for the norms' behaviour is irrelevant: eval, no gradients)."""
    found = _Found()
    stack: list[tuple[str, nn.Module]] = []
    outputs: dict[int, str] = {}
    handles = []

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: stack.append((name, module))

    def leave(name: str, hooked: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            stack.pop()
            if hooked and isinstance(output, torch.Tensor):
                outputs[id(output)] = name or "the model"

        return hook

    for name, module in model.named_modules():
        hooked = any(p.requires_grad for p in module.parameters(recurse=False))  # what Opacus hooks
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name, hooked)))
    try:
        with preserved(model), torch.no_grad(), _Watch(stack, outputs, found):
            model.eval()(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def find_in_place_statically(model: nn.Module) -> _Found:
    """Without a forward pass: every `inplace` flag that is on, and each module whose forward
    source modifies in place a value one of its trainable submodules returned (`out += identity`
    after `out = self.bn2(out)`), which Opacus' hooks hand on as a view."""
    found = _Found(flagged={name: m for name, m in model.named_modules() if getattr(m, "inplace", None) is True})
    for name, module in model.named_modules():
        statement = _in_place_in_source(module)
        if statement is not None:
            found.owners[name] = f"`{statement}`"
    return found


def _in_place_in_source(module: nn.Module) -> str | None:
    """The first statement of `module`'s own forward that modifies in place a name assigned from a
    call of a submodule with trainable parameters (read flow-insensitively from the source:
    conservative); None when there is none, or no source."""
    trainable = {n for n, child in module.named_children() if any(p.requires_grad for p in child.parameters())}
    forward = getattr(type(module), "forward", None)
    if not trainable or forward is None or getattr(forward, "__module__", "").startswith("torch."):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):  # no Python source to read (built, compiled): not searched
        return None
    returned = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _calls_submodule(node.value, trainable)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id in returned:
            return ast.unparse(node)
        if not isinstance(node, ast.Call):
            continue
        method = node.func
        if (  # out.add_(identity), out.relu_()
            isinstance(method, ast.Attribute)
            and method.attr.endswith("_")
            and not method.attr.startswith("_")
            and isinstance(method.value, ast.Name)
            and method.value.id in returned
        ):
            return ast.unparse(node)
        if (  # F.relu(out, inplace=True)
            any(
                k.arg == "inplace" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in returned
        ):
            return ast.unparse(node)
    return None


def _calls_submodule(expression: ast.expr, names: set[str]) -> bool:
    """Whether `expression` calls `self.<name>(...)` for one of `names`."""
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and node.func.attr in names
        for node in ast.walk(expression)
    )


def out_of_place_graph(module: nn.Module) -> fx.GraphModule | None:
    """`module` as its torch.fx graph with in-place operations made out-of-place (where the value
    they modify is used nowhere else); None when it cannot be traced or would lose state."""
    try:
        graph = BatchNormTracer().trace(module)
    except Exception:  # noqa: BLE001 - forward torch.fx cannot trace: left as it is, and reported
        return None
    for node in graph.nodes:
        value = node.args[0] if node.args else None
        if not isinstance(value, fx.Node) or len(value.users) != 1:
            continue  # modifying a value read elsewhere too: out-of-place would change the result
        if node.op == "call_function" and node.target in _IN_PLACE_OPERATORS:
            node.target = getattr(operator, node.target.__name__.replace("i", "", 1))
        elif node.op == "call_function" and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
        elif (
            node.op == "call_method" and str(node.target).endswith("_") and hasattr(torch.Tensor, str(node.target)[:-1])
        ):
            node.target = str(node.target)[:-1]
        elif (
            node.op == "call_function"
            and (name := getattr(node.target, "__name__", "")).endswith("_")
            and hasattr(torch, name[:-1])
        ):
            node.target = getattr(torch, name[:-1])
    graph_module = fx.GraphModule(module, graph, type(module).__name__)
    if set(graph_module.state_dict()) != set(module.state_dict()):
        return None  # state forward never reads would be dropped
    return graph_module.train(module.training)


class OutOfPlaceForHooks(Pass):
    """The pass: see the module docstring. `inputs`: the example inputs the search runs on (None:
    none, see there)."""

    def __init__(self, inputs: tuple | None) -> None:
        super().__init__()
        self.inputs = inputs
        self.left: list[str] = []  # what could not be made out-of-place, for the report

    def call(self, model: nn.Module) -> PassResult:
        found = find_in_place_statically(model) if self.inputs is None else find_in_place(model, self.inputs)
        changes = []
        for name, module in found.flagged.items():
            with self.working_on(name):
                setattr(module, "inplace", False)  # noqa: B010 - a flag of the activation's own class
                changes.append(
                    f"{name or type(model).__name__}: {type(module).__name__}(inplace=True) -> inplace=False"
                )
        aliases = module_names(model)
        for name, operation in found.owners.items():
            with self.working_on(name):
                owner = model.get_submodule(name)
                graph_module = out_of_place_graph(owner) if name else None
                if graph_module is None:
                    self.left.append(f"{name or type(model).__name__} ({type(owner).__name__}): {operation}")
                    continue
                replace_module(model, aliases[id(owner)], owner, graph_module)
                changes.append(f"{name}: {type(owner).__name__}.forward's {operation} -> out of place (torch.fx graph)")
        return PassResult(model, bool(changes), changes)
