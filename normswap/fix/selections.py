"""Code around the model that selects layers by BatchNorm class or class name: isinstance and
type tests, `classname.find('BatchNorm')`. After a fix the rewritten layers are another class,
so such code no longer selects them; what that changes depends on what the code does with them
(an optimizer's parameter group, an init loop, a freeze list). Adding the new class to an
isinstance test is mechanical: an unsafe edit. Anything else is a note saying what the code
selects and what changes. Code that only handles BatchNorm statistics (`m.eval()`), tests that
already name the new class, and layer-name filters (`'bn' in name`: the names stay) say nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import libcst as cst

from ..targets.base import SourceCode
from .locate import dotted_name, loaded
from .source_file import SourceFile

# what the code guarded by a test does with the layers it selects, by the words in it
_FREEZES = re.compile(r"requires_grad\s*=\s*False|requires_grad_\(\s*False")
_COLLECTS = re.compile(r"\byield\b|\.parameters\(|\.named_parameters\(|\.append\(")
_INITIALISES = re.compile(r"\binit\.\w+_\(|\.(fill|zero|normal|uniform|constant|ones|zeros)_\(")
_STATISTICS = re.compile(r"\.eval\(\)|\.train\(|momentum|running_(mean|var)|track_running_stats|num_batches_tracked")
_GROUP_WORDS = re.compile(r"param|lr|decay|group|optim", re.IGNORECASE)


@dataclass(frozen=True)
class Use:
    """What the code guarded by a selection does: `what` it selects, what would change after the
    fix without it (`after`, with `{new}` for the new class), and whether it matters at all."""

    what: str
    after: str
    matters: bool = True


@dataclass(frozen=True)
class Rewrite:
    """An isinstance test's class argument `node` becomes `code` (the new class added)."""

    source: SourceFile
    node: cst.CSTNode
    code: SourceCode
    selects: str


def scan(
    source: SourceFile, replaced: Mapping[type, tuple[type, ...]], relative: str
) -> tuple[list[Rewrite], list[str]]:
    """The rewrites and notes for the selections in one file. `replaced`: each BatchNorm class a
    fix rewrote -> the classes it builds now (GroupNorm for maps, LayerNorm for features). One chain (an `or` of tests, an if/elif ladder) gets
    the new class once, preferably in a test naming torch's class."""
    chains: dict[int, list[tuple[cst.CSTNode, list[type], str]]] = {}
    for selection in _selections(source, replaced):
        chains.setdefault(id(_chain(source, selection[0])[0]), []).append(selection)
    rewrites: list[Rewrite] = []
    notes: list[str] = []
    for selections in chains.values():
        chain = _chain(source, selections[0][0])
        named = {cls for classes in _classes_in(source, chain, replaced) for cls in classes}
        new = tuple(dict.fromkeys(c for cls in selections[0][1] for c in replaced[cls] if c not in named))
        if not new:
            continue  # the chain already names the new classes: nothing changes
        use = _use(source, selections[0][0])
        if not use.matters:
            continue
        names = " / ".join(dict.fromkeys(c.__name__ for c in new))
        after = use.after.format(new=names)
        tests = sorted(selections, key=lambda s: (s[2] != "isinstance", not s[1][0].__module__.startswith("torch.")))
        test, _, how = tests[0]
        code = _added(source, test, new) if how == "isinstance" else None
        if code is not None:
            rewrites.append(
                Rewrite(
                    source,
                    _class_argument(test),
                    code,
                    f"{use.what}: {names} added, so that it keeps selecting the layers the fix rewrites "
                    f"(without it {after})",
                )
            )
            continue
        line = source.line_of(test)
        notes.append(
            f"{relative}:{line} {use.what} by {how} (`{source.lines[line - 1].strip()}`): after the fix {after}; "
            f"make it match {names} too"
        )
    return rewrites, notes


def _selections(
    source: SourceFile, replaced: Mapping[type, tuple[type, ...]]
) -> Iterator[tuple[cst.CSTNode, list[type], str]]:
    """(test, the replaced classes it names, how it selects) for every test in the file."""
    for node in source.positions:
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == "isinstance":
            classes = [c for c in _classes_of(source, _class_argument(node)) if c in replaced]
            if classes and len(node.args) == 2:
                yield node, classes, "isinstance"
        elif isinstance(node, cst.Comparison):
            yield from _comparison(source, node, replaced)


def _comparison(
    source: SourceFile, node: cst.Comparison, replaced: Mapping[type, tuple[type, ...]]
) -> Iterator[tuple[cst.CSTNode, list[type], str]]:
    """`type(m) == nn.BatchNorm2d`, `type(m) in (...)`, `m.__class__.__name__ == 'BatchNorm2d'`;
    `classname.find('BatchNorm') != -1` (a call on the left)."""
    parts = [node.left, *(target.comparator for target in node.comparisons)]
    classes = [c for part in parts for c in _classes_of(source, part) if c in replaced]
    if classes:
        yield node, classes, "its class"
        return
    names = [name for part in parts for name in _class_names(part)]
    matched = [c for c in replaced if any(name in c.__name__ for name in names)]
    if matched:
        yield node, matched, "class name"


def _class_names(node: cst.CSTNode) -> Iterator[str]:
    """Strings in `node` that spell a BatchNorm class name ('BatchNorm', 'BatchNorm2d'), not a
    layer's name ('bn', 'batch_norm': attribute names, which a fix keeps)."""
    for string in _strings(node):
        if "BatchNorm" in string:
            yield string


def _strings(node: cst.CSTNode) -> Iterator[str]:
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        if isinstance(value, str):
            yield value
    for child in node.children:
        yield from _strings(child)


def _class_argument(call: cst.CSTNode) -> cst.CSTNode:
    assert isinstance(call, cst.Call)
    return call.args[1].value


def _classes_of(source: SourceFile, node: cst.CSTNode) -> list[type]:
    """The classes a class reference, or a tuple of them, names at run time."""
    if isinstance(node, (cst.Tuple, cst.List, cst.Set)):
        return [c for element in node.elements for c in _classes_of(source, element.value)]
    dotted = dotted_name(node)
    value = loaded(source, node, dotted) if dotted is not None else None
    return [value] if isinstance(value, type) else []


def _chain(source: SourceFile, test: cst.CSTNode) -> list[cst.CSTNode]:
    """Every test that decides together with `test`: the operands of its `or` / `and`, and the
    tests of its if/elif ladder."""
    top = test
    while isinstance(parent := source.parents.get(top), (cst.BooleanOperation, cst.UnaryOperation)):
        top = parent
    statement = source.parents.get(top)
    if not (isinstance(statement, cst.If) and statement.test is top):
        return [top]
    ladder = statement
    while isinstance(up := source.parents.get(ladder), cst.If) and up.orelse is ladder:
        ladder = up
    tests: list[cst.CSTNode] = []
    current: cst.BaseSuite | cst.If | cst.Else | None = ladder
    while isinstance(current, cst.If):
        tests.append(current.test)
        current = current.orelse
    return tests


def _classes_in(
    source: SourceFile, chain: list[cst.CSTNode], replaced: Mapping[type, tuple[type, ...]]
) -> Iterator[list[type]]:
    """The classes each test of a chain names (isinstance arguments, compared classes), and the
    replaced classes whose new class a class-name string names ('GroupNorm')."""
    for test in chain:
        found: list[type] = []
        for node in _walk(test):
            if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == "isinstance":
                if len(node.args) == 2:
                    found += _classes_of(source, _class_argument(node))
            elif isinstance(node, (cst.Name, cst.Attribute)) and _looks_like_a_class(node):
                found += _classes_of(source, node)
        strings = list(_strings(test))
        found += [new for news in replaced.values() for new in news if any(new.__name__ in s for s in strings)]
        yield found


def _looks_like_a_class(node: cst.CSTNode) -> bool:
    """A capitalised name (`GroupNorm`, `nn.BatchNorm2d`): the only ones worth resolving."""
    last = node.attr.value if isinstance(node, cst.Attribute) else getattr(node, "value", "")
    return isinstance(last, str) and last[:1].isupper()


def _walk(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    yield node
    for child in node.children:
        yield from _walk(child)


def _use(source: SourceFile, test: cst.CSTNode) -> Use:
    """What the code the test guards does with what it selects."""
    function = next(source.enclosing(test, cst.FunctionDef), None)
    name = function.name.value if isinstance(function, cst.FunctionDef) else "module level"
    guarded = source.code(_guarded(source, test))
    if _FREEZES.search(guarded):
        return Use(f"freezes the parameters of the layers it selects (`{name}`)", "the {new} layers would train")
    if _COLLECTS.search(guarded) and (_GROUP_WORDS.search(name) or "yield" in guarded):
        return Use(
            f"collects the parameters of the layers it selects into an optimizer's parameter group (`{name}`)",
            "the {new} layers' parameters would leave that group",
        )
    if _INITIALISES.search(guarded):
        return Use(
            f"initialises the layers it selects (`{name}`)",
            "the {new} layers would keep their default initialisation instead",
        )
    if _STATISTICS.search(guarded):
        return Use(f"handles BatchNorm statistics (`{name}`)", "", matters=False)  # the new layers have none
    return Use(f"selects layers (`{name}`)", "it would no longer select the {new} layers")


def _guarded(source: SourceFile, test: cst.CSTNode) -> cst.CSTNode:
    """The code that runs for what the test selects: an `if`'s body, a comprehension's element,
    a conditional expression's value; else the statement that holds the test."""
    node = test
    while (parent := source.parents.get(node)) is not None:
        if isinstance(parent, cst.If) and parent.test is node:
            return parent.body
        if isinstance(parent, cst.IfExp) and parent.test is node:
            return parent.body
        if isinstance(parent, cst.CompIf):
            comprehension = next(
                source.enclosing(parent, (cst.ListComp, cst.SetComp, cst.GeneratorExp, cst.DictComp)), None
            )
            return comprehension if comprehension is not None else parent
        if isinstance(parent, (cst.SimpleStatementLine, cst.BaseCompoundStatement)):
            return parent
        node = parent
    return node


def _added(source: SourceFile, test: cst.CSTNode, new: tuple[type, ...]) -> SourceCode | None:
    """`isinstance(m, X)` -> `(X, nn.GroupNorm)`; `(X, Y)` -> `(X, Y, nn.GroupNorm)`; None when
    a new class is normswap's and the file does not import normswap (a selection edit never
    adds that dependency)."""
    argument = _class_argument(test)
    references = [_reference(source, cls, argument) for cls in new]
    if any(reference is None for reference in references):
        return None
    text = ", ".join(reference[0] for reference in references if reference is not None)
    imports = tuple(dict.fromkeys(m for reference in references if reference is not None for m in reference[1]))
    written = source.text_of(argument)
    if isinstance(argument, cst.Tuple):  # its parentheses lie outside the node's span: add inside them
        if written.startswith("(") and written.endswith(")"):
            inner = written[1:-1].rstrip()
            return SourceCode(f"({inner}{'' if inner.endswith(',') else ','} {text})", imports)
        inner = written.rstrip()
        return SourceCode(f"{inner}{'' if inner.endswith(',') else ','} {text}", imports)
    return SourceCode(f"({written}, {text})", imports)


def _reference(source: SourceFile, new: type, near: cst.CSTNode) -> tuple[str, tuple[str, ...]] | None:
    """How this file names `new`: through the torch.nn alias the test uses (`nn.GroupNorm`), else
    `torch.nn.GroupNorm` (adding `import torch`); normswap's classes only where the file imports
    normswap already."""
    if new.__module__.startswith("torch.nn"):
        for node in (*_walk(near), *source.positions):  # the test's own spelling first, else the file's
            if isinstance(node, cst.Attribute) and source.qualified(node.value) == {"torch.nn"}:
                return f"{source.code(node.value)}.{new.__name__}", ()
        return f"torch.nn.{new.__name__}", ("torch",)
    if new.__module__.startswith("normswap") and re.search(r"^\s*import normswap\.nn\b", source.text, re.M):
        return f"normswap.nn.{new.__name__}", ()
    return None
