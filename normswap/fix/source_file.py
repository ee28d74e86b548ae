"""One Python file as libcst sees it: the parsed tree with positions, qualified names and parents,
and lookups by the positions CPython records (1-based lines, UTF-8 byte columns)."""

from __future__ import annotations

import functools
import hashlib
import re
import types
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import libcst as cst
from libcst.metadata import (
    CodeRange,
    MetadataWrapper,
    ParentNodeProvider,
    PositionProvider,
    QualifiedName,
    ScopeProvider,
)

from ..errors import NormswapError
from ..source import CodeSpan, code_fingerprint

# torch.nn BatchNorm classes a fix can replace (subclasses keep their class; see locate.py)
BATCHNORM_CLASSES = {
    f"torch.nn{module}.{name}"
    for module in ("", ".modules.batchnorm", ".modules")
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
    )
}
COMPREHENSIONS = (cst.ListComp, cst.SetComp, cst.DictComp, cst.GeneratorExp)
FUNCTIONAL_BATCHNORM = {"torch.nn.functional.batch_norm", "torch.batch_norm"}


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def physical_lines(text: str) -> list[str]:
    """`text` split into lines as Python's tokenizer counts them (newline kept): only \\n, \\r\\n
    and \\r end a line, unlike str.splitlines (a form feed or U+2028 in a string is no line end)."""
    return _LINE.findall(text)


class FixError(NormswapError):
    """A source file normswap cannot fix (unreadable, unparsable, read-only, changed)."""


@dataclass
class SourceFile:
    path: Path
    text: str
    digest: str
    wrapper: MetadataWrapper
    positions: dict[cst.CSTNode, CodeRange] = field(default_factory=dict)
    parents: dict[cst.CSTNode, cst.CSTNode] = field(default_factory=dict)
    scopes: Mapping[cst.CSTNode, Any] = field(default_factory=dict)  # libcst Scope of each node
    _compiled: dict[tuple[str, int], str] | None = None
    _calls: dict[tuple[int, int, int, int], cst.CSTNode] | None = None
    # the globals the file's code runs with (its loaded module, else a model class's functions')
    namespace: Mapping[str, Any] | None = None
    namespace_known: bool = False

    @classmethod
    def read(cls, path: Path) -> SourceFile:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise FixError(f"Cannot read '{path}': {exc.strerror or exc}.") from exc
        try:
            text = raw.decode("utf-8")
            wrapper = MetadataWrapper(
                cst.parse_module(text), unsafe_skip_copy=True
            )  # parsed here, nobody else holds it
        except (UnicodeDecodeError, cst.ParserSyntaxError) as exc:
            reason = "is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "does not parse"
            raise FixError(
                f"'{path}' {reason} ({str(exc).splitlines()[0][:120]}); nothing in it was changed."
            ) from None
        resolved = wrapper.resolve_many([PositionProvider, ParentNodeProvider, ScopeProvider])
        positions = cast(dict[cst.CSTNode, CodeRange], dict(resolved[PositionProvider]))
        parents = cast(dict[cst.CSTNode, cst.CSTNode], dict(resolved[ParentNodeProvider]))
        return cls(path, text, hashlib.sha256(raw).hexdigest(), wrapper, positions, parents, resolved[ScopeProvider])

    @property
    def module(self) -> cst.Module:
        return self.wrapper.module

    def _column(self, line: int, byte_column: int) -> int:
        """CPython's UTF-8 byte column on `line` as libcst's character column."""
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return len(text.encode("utf-8")[:byte_column].decode("utf-8", errors="ignore"))

    @functools.cached_property
    def lines(self) -> list[str]:
        return [line.rstrip("\r\n") for line in physical_lines(self.text)]

    def batchnorm_names(self) -> list[cst.CSTNode]:
        """Every expression naming a torch BatchNorm class outside import statements."""
        found: list[cst.CSTNode] = []

        class Finder(cst.CSTVisitor):
            def on_visit(inner, node: cst.CSTNode) -> bool:
                if isinstance(node, (cst.Import, cst.ImportFrom)):
                    return False
                if isinstance(node, (cst.Name, cst.Attribute)) and self.is_batchnorm_class(node):
                    found.append(node)
                    return False
                return True

        self.module.visit(Finder())
        return found

    def node_at(self, span: CodeSpan) -> cst.CSTNode | None:
        """The call (or comprehension: the instruction that runs one) exactly at `span`."""
        if self._calls is None:
            self._calls = {
                (where.start.line, where.start.column, where.end.line, where.end.column): node
                for node, where in self.positions.items()
                if isinstance(node, (cst.Call, *COMPREHENSIONS))
            }
        return self._calls.get(
            (span.line, self._column(span.line, span.col), span.end_line, self._column(span.end_line, span.end_col))
        )

    def call_at(self, span: CodeSpan) -> cst.Call | None:
        """The call expression exactly at `span`."""
        node = self.node_at(span)
        return node if isinstance(node, cst.Call) else None

    def calls_on_line(self, line: int) -> list[cst.Call]:
        found = [
            node
            for node, where in self.positions.items()
            if isinstance(node, cst.Call) and where.start.line <= line <= where.end.line
        ]
        return sorted(found, key=lambda node: (self.positions[node].start.line, self.positions[node].start.column))

    def qualified(self, node: cst.CSTNode) -> set[str]:
        """What `node` names, through the file's imports and aliases (`torch.nn.BatchNorm2d` for
        `nn.BatchNorm2d` under `import torch.nn as nn`, or for `BN` imported as such)."""
        scope = self.scopes.get(node)
        if scope is None:
            return set()
        names: Collection[QualifiedName] = scope.get_qualified_names_for(node)
        return {name.name for name in names}

    def rebinding(self, name: str) -> int | None:
        """The line where the module binds the global `name` to something other than an import
        of it (`normswap = {...}` hides an added `import normswap.nn`), or None."""
        scope = self.scopes.get(self.module)
        if scope is None:
            return None
        for assignment in scope.assignments[name]:
            node = getattr(assignment, "node", None)
            if node is not None and not isinstance(node, (cst.Import, cst.ImportFrom)) and node in self.positions:
                return self.positions[node].start.line
        return None

    def defines(self, name: str, text: str) -> bool:
        """Whether the module defines the function `name` exactly as `text` (a helper an earlier
        fix added)."""
        wanted = "\n".join(line.rstrip() for line in text.strip().splitlines())
        for statement in self.module.body:
            if isinstance(statement, cst.FunctionDef) and statement.name.value == name:
                written = statement.with_changes(leading_lines=())
                return (
                    "\n".join(line.rstrip() for line in self.module.code_for_node(written).strip().splitlines())
                    == wanted
                )
        return False

    def batchnorm_classes(self, node: cst.CSTNode) -> set[str]:
        """The torch BatchNorm classes `node` may name (`torch.nn.BatchNorm2d` for `nn.BatchNorm2d`,
        `BN` imported as such, `torch.nn.BatchNorm2d` written out)."""
        return self.qualified(node) & BATCHNORM_CLASSES

    def is_batchnorm_class(self, node: cst.CSTNode) -> bool:
        return bool(self.batchnorm_classes(node))

    def fingerprint(self, function: str, first_line: int) -> str | None:
        """The fingerprint of the code object `function` starting at `first_line` as this file
        compiles now (`normswap.source.code_fingerprint`), None when there is none."""
        if self._compiled is None:
            self._compiled = {}
            try:
                # a UTF-8 byte-order mark is part of the file, not of the code Python compiled from it
                code = compile(self.text.removeprefix("\ufeff"), str(self.path), "exec", dont_inherit=True)
            except (SyntaxError, ValueError):
                return None
            pending = [code]
            while pending:
                current = pending.pop()
                self._compiled[(current.co_qualname, current.co_firstlineno)] = code_fingerprint(current)
                pending.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        return self._compiled.get((function, first_line))

    def batchnorm_references(self, node: cst.CSTNode) -> list[cst.CSTNode]:
        """References to a torch BatchNorm class inside `node` used as values, not called
        (`nn.BatchNorm2d`, also inside `functools.partial(nn.BatchNorm2d, eps=1e-3)`)."""
        found: list[cst.CSTNode] = []

        class Finder(cst.CSTVisitor):
            def on_visit(inner, candidate: cst.CSTNode) -> bool:
                if isinstance(candidate, (cst.Name, cst.Attribute)) and self.is_batchnorm_class(candidate):
                    parent = self.parents.get(candidate)
                    if not (isinstance(parent, cst.Call) and parent.func is candidate):
                        found.append(candidate)
                    return False
                return True

        node.visit(Finder())
        return found

    def enclosing(self, node: cst.CSTNode, kind: type | tuple[type, ...]) -> Iterator[cst.CSTNode]:
        """The ancestors of `node` of type `kind`, innermost first."""
        current = self.parents.get(node)
        while current is not None:
            if isinstance(current, kind):
                yield current
            current = self.parents.get(current)

    @functools.cached_property
    def _line_offsets(self) -> list[int]:
        offsets = [0]
        for line in physical_lines(self.text):
            offsets.append(offsets[-1] + len(line))
        return offsets

    def char_range(self, node: cst.CSTNode, whole_lines: bool = False) -> tuple[int, int]:
        """`node`'s [start, end) as character offsets into the text; with `whole_lines`, from the
        start of its first line to the end of its last line (newline included)."""
        where, offsets = self.positions[node], self._line_offsets
        if whole_lines:
            return offsets[where.start.line - 1], offsets[min(where.end.line, len(offsets) - 1)]
        return offsets[where.start.line - 1] + where.start.column, offsets[where.end.line - 1] + where.end.column

    def only_used_inside(self, alias: cst.ImportAlias, containers: Collection[cst.CSTNode]) -> bool:
        """Whether every use of the name `alias` binds is one of `containers` or inside one."""
        scope = self.scopes.get(alias)
        if scope is None:
            return False
        bound = alias.asname.name if alias.asname is not None else alias.name
        name = self.code(bound)
        statement = self.parents.get(alias)
        for assignment in scope.assignments[name]:
            if getattr(assignment, "node", None) is not statement:
                continue
            for access in assignment.references:
                if not any(access.node is c or self.contains(c, access.node) for c in containers):
                    return False
        return True

    def contains(self, container: cst.CSTNode, node: cst.CSTNode) -> bool:
        """Whether `node` is inside `container`."""
        return any(ancestor is container for ancestor in self.enclosing(node, cst.CSTNode))

    def text_of(self, node: cst.CSTNode) -> str:
        """The text of `node` exactly as it is in the file (indentation of continuation lines kept)."""
        where = self.positions[node]
        lines = physical_lines(self.text)[where.start.line - 1 : where.end.line]
        if len(lines) == 1:
            return lines[0][where.start.column : where.end.column]
        return lines[0][where.start.column :] + "".join(lines[1:-1]) + lines[-1][: where.end.column]

    def code(self, node: cst.CSTNode) -> str:
        return self.module.code_for_node(node)

    def span(self, node: cst.CSTNode) -> CodeRange:
        return self.positions[node]

    def line_of(self, node: cst.CSTNode) -> int:
        return self.positions[node].start.line
