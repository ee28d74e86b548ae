"""Where in the user's source a site's BatchNorm comes from, and what kind of edit fixes it.

- a call of a torch BatchNorm class (`nn.BatchNorm2d(64)`, `BN(64)`, `torch.nn.BatchNorm2d(c)`):
  the call is rewritten;
- a call of a value (`norm_layer(planes)`, `self._norm_layer(planes)`): the torch BatchNorm class
  bound to that name is followed back along the calls that built the layer (an argument passed
  by keyword or position, a parameter default, an assignment such as `if norm_layer is None:
  norm_layer = nn.BatchNorm2d`, a `self.` attribute, a module-level alias), and that reference
  is rewritten to a drop-in class;
- a functional call (`F.batch_norm(...)`) at the site's call line: the call is rewritten;
- a SyncBatchNorm made by `nn.SyncBatchNorm.convert_sync_batchnorm(model)` (or timm's): that
  call is the spot, and the target says what it becomes (batchnorm: the model it converts).

A site is not fixable, with the reason, when it is built outside the project (an installed model
zoo), when where it was built was not recorded, when its file no longer compiles to the code
that built it, or when it is a BatchNorm subclass (its class, not its construction, is the
BatchNorm) other than one computing plain BatchNorm on one device (a synchronized BatchNorm,
whose class reference is rewritten like torch's).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
from torch import nn

from ..sites import Site
from ..source import CodeSpan, Construction, SourceLocation, code_fingerprint, is_project_file, origin_of, relative_path
from .one_device import batchnorm_on_one_device
from .source_file import COMPREHENSIONS, FUNCTIONAL_BATCHNORM, FixError, SourceFile

CALL, VALUE, FUNCTIONAL, SYNC_CONVERSION = "call", "value", "functional", "sync-conversion"
SELECTION = "selection"  # a class test around the model (selections.py): its references stay
# the functions that make SyncBatchNorm out of a model's BatchNorm layers
SYNC_CONVERSIONS = frozenset(
    {
        "torch.nn.SyncBatchNorm.convert_sync_batchnorm",
        "torch.nn.modules.SyncBatchNorm.convert_sync_batchnorm",
        "torch.nn.modules.batchnorm.SyncBatchNorm.convert_sync_batchnorm",
        "timm.layers.convert_sync_batchnorm",
        "timm.layers.norm_act.convert_sync_batchnorm",
        "timm.models.layers.convert_sync_batchnorm",
    }
)


@dataclass(frozen=True)
class Spot:
    """The node a fix rewrites: a call (CALL, FUNCTIONAL, SYNC_CONVERSION) or a class reference (VALUE)."""

    kind: str
    file: SourceFile
    node: cst.CSTNode

    @property
    def key(self) -> tuple[str, int, int]:
        where = self.file.span(self.node)
        return (str(self.file.path), where.start.line, where.start.column)


@dataclass(frozen=True)
class Unfixable:
    """A site whose source normswap does not edit, and why (with the user's nearest line)."""

    site: str
    reason: str
    location: SourceLocation | None = None
    model: str = ""


class Files:
    """The project's files, parsed once each; normswap edits nothing outside `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._parsed: dict[str, SourceFile | FixError] = {}
        self._namespaces: dict[str, Mapping[str, object]] = {}

    def register(self, model: nn.Module) -> None:
        """Remember the globals each file defining one of `model`'s classes runs with: what its
        names mean at run time when the file was loaded without a sys.modules entry."""
        for module in model.modules():
            for klass in type(module).__mro__:
                if klass.__module__.startswith(("torch.", "builtins")):
                    continue
                for value in vars(klass).values():
                    code = getattr(value, "__code__", None)
                    namespace = getattr(value, "__globals__", None)
                    if isinstance(code, types.CodeType) and isinstance(namespace, dict):
                        self._namespaces.setdefault(os.path.realpath(code.co_filename), namespace)

    def inside(self, path: str) -> bool:
        return is_project_file(path, self.root)

    def relative(self, path: str | Path) -> str:
        """`path` relative to the project root (POSIX separators)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def read(self) -> list[SourceFile]:
        """Every project file read so far (those on the calls that built the layers), by path."""
        return sorted((f for f in self._parsed.values() if isinstance(f, SourceFile)), key=lambda f: str(f.path))

    def get(self, path: str) -> SourceFile:
        """The parsed file; FixError when it cannot be read or parsed."""
        key = str(Path(path).resolve())
        if key not in self._parsed:
            try:
                self._parsed[key] = parsed = SourceFile.read(Path(key))
                parsed.namespace = self._namespaces.get(os.path.realpath(key))
            except FixError as exc:
                self._parsed[key] = exc
        found = self._parsed[key]
        if isinstance(found, FixError):
            raise found
        return found


class _Refused(Exception):
    """Internal: the reason a site cannot be located, raised from deep in the walk."""


@dataclass(frozen=True)
class _Frame:
    """One call on the stack that built a layer: the file and the call node executing. A function
    followed without running it (a factory whose return value is the norm class) has a frame
    whose node is the expression being evaluated and no span."""

    source: SourceFile
    node: cst.CSTNode
    span: CodeSpan | None

    @property
    def function(self) -> cst.FunctionDef | None:
        found = next(self.source.enclosing(self.node, cst.FunctionDef), None)
        return found if isinstance(found, cst.FunctionDef) else None


def locate(site: Site, module: nn.Module | None, construction: Construction | None, files: Files) -> Spot | Unfixable:
    """The spot to rewrite for `site`, or why there is none."""
    if site.kind == "subclass":
        why = batchnorm_on_one_device(type(module), site.input_rank) if module is not None else "unknown"
        if why:
            return _subclass(site, module, construction, files, why)
    if site.kind == "lookalike":
        return Unfixable(
            site.name,
            f"a {site.flavour} is not a torch BatchNorm: normswap does not know what its constructor arguments mean",
            site.defined_at,
        )
    if site.kind == "functional":
        return _functional(site, module, files)
    if construction is None or module is None:
        return Unfixable(
            site.name,
            "no call that built it was recorded: it was made without calling a BatchNorm class under normswap.recording_construction() "
            "(the CLI records every such call; a layer made by copy.deepcopy or unpickling has none)",
            site.defined_at,
        )
    try:
        frames = _frames(site, construction, files)
        first = frames[0]
        assert isinstance(first.node, cst.Call)  # a recorded frame runs a call
        if first.source.qualified(first.node.func) & SYNC_CONVERSIONS:
            return Spot(SYNC_CONVERSION, first.source, first.node)
        if not _builds(first.source, first.node.func, module):
            return _value_reference(frames, module, files)
        return Spot(CALL, first.source, first.node)
    except _Refused as refusal:
        return Unfixable(site.name, str(refusal), site.built_from or site.defined_at)


def _subclass(
    site: Site, module: nn.Module | None, construction: Construction | None, files: Files, why: str
) -> Unfixable:
    """A BatchNorm subclass that is not plain BatchNorm on one device (an activation added, its own
    statistics): its class is the BatchNorm. Where a selection line picked the class
    (`Norm = BatchNormAct2d if act else nn.BatchNorm2d`), the refusal names that line."""
    reason = (
        f"a {site.flavour}, a BatchNorm subclass ({why}): its class, not the line that builds it, is the BatchNorm; "
        "`normswap convert` keeps the class and takes over its normalization, or change the class itself"
    )
    if module is not None and construction is not None:
        with contextlib.suppress(_Refused):
            frames = _frames(site, construction, files)
            first = frames[0]
            assert isinstance(first.node, cst.Call)
            if not _builds(first.source, first.node.func, module):
                spot = _value_reference(frames, module, files)
                line = spot.file.line_of(spot.node)
                reason += f"; {files.relative(spot.file.path)}:{line} selects the class (`{spot.file.lines[line - 1].strip()}`)"
    return Unfixable(site.name, reason, site.defined_at)


def _frames(site: Site, construction: Construction, files: Files) -> list[_Frame]:
    """The project's calls that built the layer, innermost first, each checked against the file
    as it is now; stops at the first call outside the project."""
    first = construction.calls[0]
    if not files.inside(first.path):
        origin = (
            "an installed package" if origin_of(first.path, files.root) == "installed" else "a file outside the project"
        )
        own = next((call for call in construction.calls if files.inside(call.path)), None)
        pointer = f"; your code builds it at {relative_path(own.path)}:{own.line}" if own else ""
        raise _Refused(f"built in {origin} ({relative_path(first.path)}), which normswap does not edit{pointer}")
    frames: list[_Frame] = []
    for span in construction.calls:
        if not files.inside(span.path):
            break
        try:
            source = files.get(span.path)
        except FixError as exc:
            raise _Refused(str(exc).rstrip(".")) from None
        if source.fingerprint(span.function, span.first_line) != span.fingerprint:
            raise _Refused(
                f"{relative_path(span.path)} changed since the model was built (its code is not what ran); rebuild the model and fix again"
            )
        node = source.node_at(span)
        if isinstance(node, COMPREHENSIONS) and frames:
            continue  # the comprehension's own frame (already in) runs in this function's scope
        if not isinstance(node, cst.Call):
            raise _Refused(f"no call at {relative_path(span.path)}:{span.line} where the layer was built")
        frames.append(_Frame(source, node, span))
    return frames


def _builds(source: SourceFile, reference: cst.CSTNode, module: nn.Module) -> bool:
    """Whether `reference` names the torch class `module` is an instance of, or the BatchNorm
    subclass it is an instance of (one computing BatchNorm on one device: locate checked)."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn"):
        dotted = dotted_name(reference)
        return dotted is not None and loaded(source, reference, dotted) is cls
    return any(name.rsplit(".", 1)[-1] == cls.__name__ for name in source.batchnorm_classes(reference))


# --- a class passed as a value ---------------------------------------------------------------


def _value_reference(frames: list[_Frame], module: nn.Module, files: Files) -> Spot:
    """The torch BatchNorm class reference a value-callee (`norm_layer(c)`) was bound to."""
    call = frames[0].node
    assert isinstance(call, cst.Call)
    resolver = _Resolver(frames, module, files)
    found = resolver.expression(call.func, 0)
    if found is None:
        trail = f": the trail breaks at {resolver.trail[0]}" if resolver.trail else ""
        raise _Refused(
            f"built by `{frames[0].source.code(call.func)}(...)`, and the BatchNorm class bound to it was not found along the calls that built it{trail}"
        )
    return Spot(VALUE, *found)


_UNKNOWN = object()
_MAX_FOLLOWED = 8  # functions followed into (factories returning factories), and module-level aliases of aliases
_CONSTANTS = {"None", "True", "False"}
_Found = tuple[SourceFile, cst.CSTNode]


class _Resolver:
    """Follows a name back to the torch BatchNorm class reference it holds, frame by frame, into
    the functions that return it (`get_norm_layer('batch')`) and the mappings it is looked up in.
    `trail` collects where the search hit something it cannot follow, first (deepest) first."""

    def __init__(
        self, frames: list[_Frame], module: nn.Module, files: Files, depth: int = 0, trail: list[str] | None = None
    ) -> None:
        self.frames = frames
        self.module = module
        self.files = files
        self.depth = depth
        self.trail = trail if trail is not None else []
        self.seen: set[tuple[str, int]] = set()

    def expression(self, node: cst.CSTNode, k: int) -> _Found | None:
        """The reference `node`, evaluated in frame `k`, holds."""
        source = self.frames[k].source
        found = [
            reference for reference in source.batchnorm_references(node) if _builds(source, reference, self.module)
        ]
        if found:
            return self._one([(source, reference) for reference in found], source.code(node))
        if not type(self.module).__module__.startswith("torch.nn") and _builds(source, node, self.module):
            return source, node  # a synchronized BatchNorm subclass, named as a value
        if isinstance(node, cst.Name):
            if node.value in _CONSTANTS:
                return None
            result = self.name(node.value, k)
            if result is None:
                self._broke(
                    k,
                    node,
                    "is bound to nothing normswap can read here (a loop variable, a global set elsewhere, a star import)",
                )
            return result
        if isinstance(node, cst.Attribute) and isinstance(node.value, cst.Name) and node.value.value == "self":
            result = self.attribute(node.attr.value, k)
            if result is None:
                self._broke(k, node, "is set nowhere in its class that normswap can read (a base class, setattr)")
            return result
        if isinstance(node, cst.Subscript):  # `NORM_LAYERS[kind]`: the mapping's values
            return self.expression(node.value, k)
        if isinstance(node, cst.IfExp):  # `SyncBN if sync else nn.BatchNorm2d`: the arm naming this class
            arms = [hit for arm in (node.body, node.orelse) if (hit := self.expression(arm, k)) is not None]
            return self._one(arms, source.code(node)) if arms else None
        if isinstance(node, cst.Call):
            return self.returned(node, k)
        self._broke(k, node, "is an expression normswap does not evaluate")
        return None

    def name(self, name: str, k: int) -> _Found | None:
        if (name, k) in self.seen:
            return None
        self.seen.add((name, k))
        frame = self.frames[k]
        function = frame.function
        if function is None:
            return self._module_level(name, k)
        parameter = _parameter(function, name)
        if parameter is not None and k + 1 < len(self.frames):
            # an argument the caller passed wins over the default (None falls through to it)
            passed = self._passed(function, frame.source, parameter, k + 1)
            if passed is _UNKNOWN:
                self._broke(
                    k + 1, self.frames[k + 1].node, f"passes `{name}` in a mapping (**kwargs) normswap cannot read"
                )
                return None
            if isinstance(passed, tuple) and not (isinstance(passed[0], cst.Name) and passed[0].value == "None"):
                return self.expression(*passed)
        # `if norm_layer is None: norm_layer = nn.BatchNorm2d`; a factory's branches
        assigned = [
            found for value in _assigned(function.body, name) if (found := self.expression(value, k)) is not None
        ]
        if assigned:
            return self._one(assigned, name)
        if parameter is not None and parameter.default is not None:
            return self.expression(parameter.default, k)
        return self._module_level(name, k)

    def _passed(
        self, function: cst.FunctionDef, source: SourceFile, parameter: cst.Param, j: int
    ) -> tuple[cst.BaseExpression, int] | object | None:
        """What the call in frame `j` passes for `parameter`: the expression and the frame it is
        evaluated in, following `**kwargs` forwarded from caller to caller (`resnet18(**kwargs)`
        -> `_resnet(..., **kwargs)` -> `ResNet(..., **kwargs)`); None when nothing is passed,
        _UNKNOWN when a mapping normswap cannot see may hold it."""
        call = self.frames[j].node
        assert isinstance(call, cst.Call)  # a caller's frame runs a call
        argument = _argument(call, function, source, parameter)
        if argument is not None:
            return argument, j
        name = parameter.name.value
        while True:
            spread = [a for a in call.args if a.star == "**"]
            if not spread:
                return None
            caller = self.frames[j].function
            forwarded = caller.params.star_kwarg if caller is not None else None
            span = self.frames[j].span
            if (
                len(spread) > 1
                or span is None
                or not (
                    isinstance(spread[0].value, cst.Name)
                    and isinstance(forwarded, cst.Param)
                    and forwarded.name.value == spread[0].value.value
                )
            ):
                return _UNKNOWN
            if name not in span.kwargs_keys:
                return None  # the forwarded mapping did not hold it when the model was built
            if j + 1 >= len(self.frames):
                return _UNKNOWN
            j += 1
            call = self.frames[j].node
            assert isinstance(call, cst.Call)
            keyword = next((a.value for a in call.args if a.keyword is not None and a.keyword.value == name), None)
            if keyword is not None:
                return keyword, j

    def attribute(self, attr: str, k: int) -> _Found | None:
        """`self.<attr>`: its assignments in the class, each evaluated in the frame running the
        method that holds it (ResNet.__init__ calling _make_layer), else as written."""
        if (f"self.{attr}", k) in self.seen:
            return None
        self.seen.add((f"self.{attr}", k))
        frame = self.frames[k]
        klass = next(frame.source.enclosing(frame.node, cst.ClassDef), None)
        for assign in _assignments(klass) if klass is not None else ():
            target = assign.targets[0].target
            if (
                isinstance(target, cst.Attribute)
                and isinstance(target.value, cst.Name)
                and target.value.value == "self"
                and target.attr.value == attr
            ):
                method = next(frame.source.enclosing(assign, cst.FunctionDef), None)
                running = next((j for j in range(k, len(self.frames)) if self.frames[j].function is method), k)
                found = self.expression(assign.value, running)
                if found is not None:
                    return found
        return None

    def returned(self, call: cst.Call, k: int) -> _Found | None:
        """What the function `call` calls returns (a factory: `get_norm_layer(norm_type='batch')`),
        each `return` evaluated in the function with the call's arguments."""
        if self.depth >= _MAX_FOLLOWED:
            self._broke(k, call, "returns it through more nested functions than normswap follows")
            return None
        callee = self._callee(call.func, k)
        if isinstance(callee, str):
            self._broke(k, call, callee)
            return None
        source, function = callee
        found = []
        for value in _returns(function):
            # the function's own frame, then the caller's with this call running, then the rest
            frames = [_Frame(source, value, None), _Frame(self.frames[k].source, call, None), *self.frames[k + 1 :]]
            result = _Resolver(frames, self.module, self.files, self.depth + 1, self.trail).expression(value, 0)
            if result is not None:
                found.append(result)
        if not found:
            where = f"{self.files.relative(source.path)}:{source.line_of(function)}"
            self._broke(
                k,
                call,
                f"calls `{function.name.value}` ({where}), which returns no {type(self.module).__name__} class normswap can see",
            )
            return None
        return self._one(found, source.code(call))

    def _callee(self, func: cst.CSTNode, k: int) -> tuple[SourceFile, cst.FunctionDef] | str:
        """The function definition a call's callee names, or why normswap does not follow it."""
        frame = self.frames[k]
        source = frame.source
        if isinstance(func, cst.Name):
            scopes: list[cst.CSTNode] = [frame.function.body] if frame.function is not None else []
            for scope in (*scopes, source.module):
                for statement in getattr(scope, "body", ()):
                    if isinstance(statement, cst.FunctionDef) and statement.name.value == func.value:
                        return source, statement
        elif isinstance(func, cst.Attribute) and isinstance(func.value, cst.Name) and func.value.value == "self":
            klass = next(source.enclosing(frame.node, cst.ClassDef), None)
            for statement in getattr(getattr(klass, "body", None), "body", ()):
                if isinstance(statement, cst.FunctionDef) and statement.name.value == func.attr.value:
                    return source, statement
        return _imported_function(source, func, self.files)

    def _module_level(self, name: str, k: int) -> _Found | None:
        """A module-level binding: `Norm = nn.BatchNorm2d`, `NORMS = {...}`, `Norm = make_norm()`."""
        source = self.frames[k].source
        for statement in source.module.body:
            for small in getattr(statement, "body", ()) if isinstance(statement, cst.SimpleStatementLine) else ():
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target = small.targets[0].target
                    if isinstance(target, cst.Name) and target.value == name and self.depth < _MAX_FOLLOWED:
                        module_frame = [_Frame(source, small.value, None)]
                        found = _Resolver(module_frame, self.module, self.files, self.depth + 1, self.trail).expression(
                            small.value, 0
                        )
                        if found is not None:
                            return found
        return None

    def _one(self, found: list[_Found], what: str) -> _Found:
        """The one reference among `found`; several distinct ones: the layer could come from any."""
        distinct = list({id(node): (source, node) for source, node in found}.values())
        if len(distinct) > 1:
            places = ", ".join(
                dict.fromkeys(f"{self.files.relative(source.path)}:{source.line_of(node)}" for source, node in distinct)
            )
            raise _Refused(
                f"`{_short(what)}` may hold any of {len(distinct)} {type(self.module).__name__} classes ({places}), "
                "and normswap cannot tell which one built this layer; give each its own name"
            )
        return distinct[0]

    def _broke(self, k: int, node: cst.CSTNode, why: str) -> None:
        source = self.frames[k].source
        self.trail.append(
            f"{self.files.relative(source.path)}:{source.line_of(node)}, where `{_short(source.code(node))}` {why}"
        )


def _short(code: str, limit: int = 60) -> str:
    code = " ".join(code.split())
    return code if len(code) <= limit else code[: limit - 3] + "..."


def _returns(function: cst.FunctionDef) -> list[cst.BaseExpression]:
    """The values `function` returns, not those of functions or classes nested in it."""
    found: list[cst.BaseExpression] = []

    class Collect(cst.CSTVisitor):
        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return node is function

        def visit_Lambda(self, node: cst.Lambda) -> bool:
            return False

        def visit_ClassDef(self, node: cst.ClassDef) -> bool:
            return False

        def visit_Return(self, node: cst.Return) -> None:
            if node.value is not None:
                found.append(node.value)

    function.visit(Collect())
    return found


def _imported_function(source: SourceFile, func: cst.CSTNode, files: Files) -> tuple[SourceFile, cst.FunctionDef] | str:
    """A function the file reaches by a name or a dotted path (`from .norms import get_norm`,
    `networks.get_norm_layer`), found through the loaded modules."""
    dotted = dotted_name(func)
    if dotted is None:
        return "calls something normswap does not follow (only functions named directly)"
    value = loaded(source, func, dotted)
    code = getattr(getattr(value, "__func__", value), "__code__", None)
    if value is None:
        return f"calls `{dotted}`, which is not a function normswap finds in the project (defined in this file, or imported into it)"
    if not isinstance(code, types.CodeType):
        return f"calls `{dotted}`, which is not a Python function normswap can read"
    if not files.inside(code.co_filename):
        return f"calls `{dotted}`, defined in {relative_path(code.co_filename)}, outside the project, which normswap does not follow"
    try:
        defined = files.get(code.co_filename)
    except FixError as exc:
        return f"calls `{dotted}`, whose file cannot be read ({str(exc).rstrip('.')})"
    if defined.fingerprint(code.co_qualname, code.co_firstlineno) != code_fingerprint(code):
        return f"calls `{dotted}`, whose file {relative_path(code.co_filename)} changed since the model was built"
    candidates = [
        node
        for node, where in defined.positions.items()
        if isinstance(node, cst.FunctionDef) and node.name.value == code.co_name
    ]
    following = [node for node in candidates if defined.positions[node].start.line >= code.co_firstlineno]
    if not following:
        return f"calls `{dotted}`, whose definition normswap cannot find in {relative_path(code.co_filename)}"
    return defined, min(following, key=lambda node: defined.positions[node].start.line)


def loaded(source: SourceFile, func: cst.CSTNode, dotted: str) -> object | None:
    """What `func` names at run time: through the file's imports (`tinyzoo.norms.get_norm`) in
    the loaded modules, else through the loaded module that runs this file."""
    for qualified in sorted(source.qualified(func)):
        parts = qualified.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = sys.modules.get(".".join(parts[:cut]))
            if module is not None:
                value: object = module
                for part in parts[cut:]:
                    value = getattr(value, part, None)
                if value is not None:
                    return value
    namespace = _namespace(source)
    if namespace is None:
        return None
    head, *rest = dotted.split(".")
    value = namespace.get(head)
    for part in rest:
        value = getattr(value, part, None)
    return value


def _namespace(source: SourceFile) -> Mapping[str, object] | None:
    """The globals of the loaded module that runs this file (looked up once per file), else those
    a model class defined in it runs with (a file loaded without a sys.modules entry)."""
    if not source.namespace_known:
        path = os.path.realpath(source.path)
        running = next(
            (m for m in list(sys.modules.values()) if os.path.realpath(getattr(m, "__file__", None) or "/") == path),
            None,
        )
        if running is not None:
            source.namespace = vars(running)
        source.namespace_known = True
    return source.namespace


def dotted_name(node: cst.CSTNode) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = dotted_name(node.value)
        return f"{head}.{node.attr.value}" if head is not None else None
    return None


def _parameter(function: cst.FunctionDef, name: str) -> cst.Param | None:
    params = function.params
    return next(
        (p for p in [*params.posonly_params, *params.params, *params.kwonly_params] if p.name.value == name), None
    )


def _argument(
    call: cst.Call, function: cst.FunctionDef, source: SourceFile, parameter: cst.Param
) -> cst.BaseExpression | None:
    """The expression `call` passes for `parameter` of `function`, by keyword or by position
    (a method's or constructor's `self` is passed implicitly)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == parameter.name.value:
            return arg.value
    positional = [*function.params.posonly_params, *function.params.params]
    if _is_method(function, source) and positional:
        positional = positional[1:]
    if parameter not in positional:
        return None
    index = positional.index(parameter)
    passed = []
    for arg in call.args:
        if arg.keyword is not None:
            break
        if arg.star:
            return None  # *args: positions unknown from here
        passed.append(arg.value)
    return passed[index] if index < len(passed) else None


def _is_method(function: cst.FunctionDef, source: SourceFile) -> bool:
    parent = source.parents.get(function)
    while parent is not None and not isinstance(parent, (cst.ClassDef, cst.FunctionDef, cst.Module)):
        parent = source.parents.get(parent)
    static = any(isinstance(d.decorator, cst.Name) and d.decorator.value == "staticmethod" for d in function.decorators)
    return isinstance(parent, cst.ClassDef) and not static


def _assignments(node: cst.CSTNode) -> list[cst.Assign]:
    found: list[cst.Assign] = []

    class Collect(cst.CSTVisitor):
        def visit_Assign(self, assign: cst.Assign) -> None:
            if len(assign.targets) == 1:
                found.append(assign)

    node.visit(Collect())
    return found


def _assigned(body: cst.CSTNode, name: str) -> Iterator[cst.BaseExpression]:
    """Values assigned to the plain name `name` in a function body, in source order."""
    for assign in _assignments(body):
        target = assign.targets[0].target
        if isinstance(target, cst.Name) and target.value == name:
            yield assign.value


# --- functional calls ------------------------------------------------------------------------


def _functional(site: Site, owner: nn.Module | None, files: Files) -> Spot | Unfixable:
    """The F.batch_norm call at the site's call line, in a file that still compiles to the code
    the model ran (`owner`: the module whose forward made the call)."""
    where = site.called_at[0] if site.called_at else None
    if where is None:
        return Unfixable(
            site.name, "the line that calls it is not known (it was captured without source positions)", None
        )
    absolute = where.absolute()
    path = str(absolute) if absolute is not None else where.path
    if absolute is None or not files.inside(path):
        return Unfixable(site.name, f"called in {where.label}, which normswap does not edit", where)
    try:
        source = files.get(path)
    except FixError as exc:
        return Unfixable(site.name, str(exc).rstrip("."), where)
    running = _running_code(owner, path, where.line) if owner is not None else None
    if running is not None and source.fingerprint(running.co_qualname, running.co_firstlineno) != code_fingerprint(
        running
    ):
        return Unfixable(
            site.name,
            f"{where.path} changed since the model was built (its code is not what ran); rebuild the model and fix again",
            where,
        )
    calls = [c for c in source.calls_on_line(where.line) if source.qualified(c.func) & FUNCTIONAL_BATCHNORM]
    if len(calls) != 1:
        return Unfixable(site.name, f"{len(calls)} batch_norm calls on {where}; put each on its own line", where)
    return Spot(FUNCTIONAL, source, calls[0])


def _running_code(owner: nn.Module, path: str, line: int) -> types.CodeType | None:
    """The code object, among the owner class's methods and its module's functions, that holds
    `line` of `path` (innermost)."""
    cls = type(owner)
    candidates = [vars(klass).values() for klass in cls.__mro__ if not klass.__module__.startswith("torch.")]
    module = sys.modules.get(cls.__module__)
    if module is not None:
        candidates.append(vars(module).values())
    best: types.CodeType | None = None
    for values in candidates:
        for value in values:
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            pending = [code] if isinstance(code, types.CodeType) else []
            while pending:
                current = pending.pop()
                holds = os.path.abspath(current.co_filename) == os.path.abspath(path) and any(
                    p[0] == line for p in current.co_positions()
                )
                if holds and (best is None or current.co_firstlineno >= best.co_firstlineno):
                    best = current
                pending.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return best
