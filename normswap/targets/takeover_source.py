"""A BatchNorm subclass's methods recompiled from their source with each `batch_norm` call made a
call to the converted module's `normswap_batch_norm`: plain Python, which TorchScript, torch.fx,
jit.trace and forward-mode AD see through (a TorchFunctionMode, the fallback, they do not)."""

from __future__ import annotations
import __future__

import ast
import builtins
import inspect
import itertools
import linecache
import textwrap
import types
from typing import Any

import torch.nn.functional as F

from ..capture.tracer import BATCH_NORM_FUNCTIONS

# the method each batch_norm function's call becomes (same arguments, as written)
REDIRECTS = {F.batch_norm: "normswap_batch_norm"} | {
    function: "normswap_torch_batch_norm" for function in BATCH_NORM_FUNCTIONS if function is not F.batch_norm
}
# callees that cannot reach a batch_norm call unseen: torch's functions (not its modules' methods,
# which may call batch_norm in their forward), and the standard library's pure helpers
_SAFE_MODULES = ("torch", "builtins", "math", "operator", "typing", "warnings", "numbers")
_FILES = itertools.count()


class _Local:
    """A value known only at run time: an argument, a local variable, `self` or what hangs off it
    (a submodule's call is its own site; the class's own methods are rewritten too)."""


_LOCAL = _Local()


class Unseen(Exception):
    """A call whose callee might reach batch_norm where this rewrite cannot see it."""


def methods_forward_runs(cls: type) -> set[str]:
    """The names of the methods a call of `cls.forward` may run: forward and, transitively, each
    `self.<name>(...)` / `super().<name>(...)` it calls (a method whose source cannot be read
    counts, its callees unknown). The rest (`__init__`, `extra_repr`...) never see a batch_norm
    call of the converted module."""
    found, queue = set(), ["forward"]
    while queue:
        name = queue.pop()
        if name in found:
            continue
        found.add(name)
        for klass in cls.__mro__:
            value = vars(klass).get(name)
            function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(function, types.FunctionType) and not klass.__module__.startswith("torch."):
                queue += _method_calls(function)
    return found


def _method_calls(function: types.FunctionType) -> list[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return []
    arguments = tree.body[0].args if tree.body and isinstance(tree.body[0], ast.FunctionDef) else None
    receiver = arguments.args[0].arg if arguments is not None and arguments.args else None
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if (isinstance(owner, ast.Name) and owner.id == receiver) or (
                isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super"
            ):
                names.append(node.func.attr)
    return names


def redirected(function: types.FunctionType) -> types.FunctionType:
    """`function` recompiled with its batch_norm calls redirected (itself when it makes none).

    Raises:
        Unseen: no source to read, or a call whose callee cannot be told not to call batch_norm
            (a helper of the user's module): the caller falls back to the TorchFunctionMode.
    """
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError) as exc:
        raise Unseen(f"no source for {function.__qualname__}: {exc}") from None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) or definition.name != function.__name__:
        raise Unseen(f"the source of {function.__qualname__} is not one def statement")
    if definition.decorator_list:
        raise Unseen(f"{function.__qualname__} is decorated")
    redirect = _Redirect(function, definition)
    redirect.visit(definition)
    if not redirect.count:
        return function
    return _compiled(function, definition)


class _Redirect(ast.NodeTransformer):
    """Turns `F.batch_norm(...)` into `self.normswap_batch_norm(...)`; raises Unseen on a callee
    that might call batch_norm itself."""

    def __init__(self, function: types.FunctionType, definition: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function = function
        arguments = definition.args
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
        self.receiver = every[0].arg if every else None
        self.locals = {a.arg for a in every} | _bound_names(definition)
        closure = function.__closure__ or ()
        self.closure = {
            name: cell for name, cell in zip(function.__code__.co_freevars, closure, strict=True) if name != "__class__"
        }
        self.count = 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        callee = self._resolve(node.func)
        method = REDIRECTS.get(callee) if not isinstance(callee, _Local) else None
        if method is not None:
            if self.receiver is None:
                raise Unseen(f"{self.function.__qualname__} calls batch_norm without a `self`")
            self.count += 1
            receiver = ast.Name(id=self.receiver, ctx=ast.Load())
            return ast.copy_location(
                ast.Call(
                    func=ast.Attribute(value=receiver, attr=method, ctx=ast.Load()),
                    args=node.args,
                    keywords=node.keywords,
                ),
                node,
            )
        if not _cannot_call_batch_norm(callee):
            raise Unseen(f"{self.function.__qualname__} calls {ast.unparse(node.func)}, which normswap cannot see into")
        return node

    def _resolve(self, expression: ast.expr) -> Any:
        """The object a callee expression names, `_LOCAL` for a run-time value."""
        if isinstance(expression, ast.Name):
            name = expression.id
            if name in self.locals:
                return _LOCAL
            if name in self.closure:
                try:
                    return self.closure[name].cell_contents
                except ValueError:
                    raise Unseen(f"{self.function.__qualname__} reads the unset closure variable {name}") from None
            if name in self.function.__globals__:
                return self.function.__globals__[name]
            if hasattr(builtins, name):
                return getattr(builtins, name)
            raise Unseen(f"{self.function.__qualname__} calls the unknown name {name}")
        if isinstance(expression, ast.Attribute):
            owner = self._resolve(expression.value)
            if isinstance(owner, _Local):
                return _LOCAL
            value = getattr(owner, expression.attr, _LOCAL)
            return value
        if isinstance(expression, ast.Call):  # `super().forward(x)`: a method of the rebuilt hierarchy
            return _LOCAL if self._resolve(expression.func) is super else self._resolve(expression.func)
        return _LOCAL  # `self.layers[i](x)` and the like: a value of this module


def _cannot_call_batch_norm(callee: Any) -> bool:
    if isinstance(callee, (_Local, type)):
        return True  # run-time values (their own sites), and constructors
    module = getattr(callee, "__module__", None) or ""
    if isinstance(callee, types.ModuleType):
        return True
    if module.startswith("torch.nn.modules"):
        return False  # e.g. nn.BatchNorm2d.forward(self, x): it calls batch_norm
    return module.split(".")[0] in _SAFE_MODULES


def _bound_names(definition: ast.AST) -> set[str]:
    """Every name a function body binds (assignments, loops, with, imports, nested defs)."""
    names = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not definition:
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _compiled(function: types.FunctionType, definition: ast.FunctionDef | ast.AsyncFunctionDef) -> types.FunctionType:
    """The rewritten definition compiled with `function`'s globals, closure variables (`__class__`
    too, for `super()`), defaults and future flags, its source registered in linecache so that
    TorchScript and tracebacks read it."""
    freevars = function.__code__.co_freevars
    body = textwrap.indent(ast.unparse(definition), "    ")
    source = f"def __normswap_make__({', '.join(freevars)}):\n{body}\n    return {definition.name}\n"
    filename = f"<normswap: {function.__qualname__} #{next(_FILES)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    flags = function.__code__.co_flags & __future__.annotations.compiler_flag
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec", flags=flags, dont_inherit=True), function.__globals__, namespace)
    try:
        cells = [
            None if name == "__class__" else cell.cell_contents  # `__class__`: the rebuilt class, set by the caller
            for name, cell in zip(freevars, function.__closure__ or (), strict=True)
        ]
    except ValueError:  # an empty cell: a closure variable not yet assigned
        raise Unseen(f"{function.__qualname__} reads a closure variable that is not set") from None
    new: types.FunctionType = namespace["__normswap_make__"](*cells)
    new.__defaults__, new.__kwdefaults__ = function.__defaults__, function.__kwdefaults__
    new.__dict__.update(function.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = function.__qualname__, function.__doc__, function.__module__
    return new
