"""Rewrite a file's text by splicing: each replaced expression, each added or trimmed import is
a character range of the original text; everything outside those ranges is the original, byte
for byte. (libcst's codemod import visitors re-analyse the whole module per pass, seconds on a
thousand-line file; the parse normswap already has answers the same questions.)"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import libcst as cst

from ..targets.base import SourceCode
from .locate import SELECTION, Spot
from .source_file import BATCHNORM_CLASSES, FixError, SourceFile, physical_lines


def spliced(source: SourceFile, spots: Sequence[tuple[Spot, SourceCode]]) -> str:
    """`source`'s text with every spot replaced, the imports and helper functions the new code
    needs added, and `from torch.nn import BatchNorm2d [as BN]` imports nothing uses any more
    trimmed."""
    replaced = [spot.node for spot, _ in spots if spot.kind != SELECTION]  # a class test keeps its references
    edits = [(*source.char_range(spot.node), code.text) for spot, code in spots]
    edits += _trimmed_imports(source, replaced)
    helpers = {name: text for _, code in spots for name, text in code.helpers if not source.defines(name, text)}
    users = [spot.node for spot, code in spots if code.helpers]
    edits += _added_code(source, sorted({name for _, code in spots for name in code.imports}), helpers, users)
    text = source.text
    for start, end, new in sorted(edits, key=lambda edit: (edit[0], edit[1]), reverse=True):
        text = text[:start] + new + text[end:]
    try:
        compile(
            text.removeprefix("\ufeff"), str(source.path), "exec", dont_inherit=True
        )  # a byte-order mark is not code
    except SyntaxError as exc:  # a bug in normswap's fix, never the user's code
        raise FixError(
            f"normswap's fix of '{source.path}' would not compile ({exc.msg}, line {exc.lineno}); nothing was written. Please report this."
        ) from None
    return text


def _top_level_imports(source: SourceFile) -> list[tuple[cst.SimpleStatementLine, cst.Import | cst.ImportFrom]]:
    found = []
    for statement in source.module.body:
        if isinstance(statement, cst.SimpleStatementLine):
            found += [(statement, small) for small in statement.body if isinstance(small, (cst.Import, cst.ImportFrom))]
    return found


def _added_code(
    source: SourceFile, modules: Sequence[str], helpers: Mapping[str, str], users: Sequence[cst.CSTNode]
) -> list[tuple[int, int, str]]:
    """`import X` lines for the modules the new code names and the file does not bind yet, after
    the last top-level import (else after the docstring, else at the top), then the helper
    functions it calls, two blank lines apart; a helper goes before the first top-level
    statement that uses it when that statement comes earlier (`Norm = _group_norm` runs at import)."""
    imports = _top_level_imports(source)
    bound = {
        source.code(alias.name)
        for _, node in imports
        if isinstance(node, cst.Import)
        for alias in node.names
        if alias.asname is None
    }
    bound_roots = {name.split(".")[0] for name in bound}
    missing = [m for m in modules if not (m in bound or ("." not in m and m in bound_roots))]
    if not missing and not helpers:
        return []
    anchor: cst.CSTNode | None = imports[-1][0] if imports else _docstring(source)
    offset = source.char_range(anchor, whole_lines=True)[1] if anchor is not None else 0
    newline = source.module.default_newline  # a CRLF file gets CRLF import lines
    added = "".join(f"import {m}{newline}" for m in missing)
    definitions = [text.replace("\n", newline) for text in helpers.values()]
    first_use = min(
        (source.char_range(_top_level(source, node), whole_lines=True)[0] for node in users), default=offset
    )
    if definitions and first_use < offset:
        return [(offset, offset, added), (first_use, first_use, "".join(d + newline * 2 for d in definitions))]
    if not definitions:
        return [(offset, offset, added)]
    following = re.match(r"(?:[ \t]*(?:\r\n|\r|\n))*", source.text[offset:])
    blank = len(physical_lines(following.group())) if following else 0
    return [(offset, offset, added + "".join(newline * 2 + d for d in definitions) + newline * max(0, 2 - blank))]


def _top_level(source: SourceFile, node: cst.CSTNode) -> cst.CSTNode:
    """The module-level statement that holds `node`."""
    while (parent := source.parents.get(node)) is not None and not isinstance(parent, cst.Module):
        node = parent
    return node


def _docstring(source: SourceFile) -> cst.CSTNode | None:
    first = source.module.body[0] if source.module.body else None
    if (
        isinstance(first, cst.SimpleStatementLine)
        and isinstance(first.body[0], cst.Expr)
        and isinstance(first.body[0].value, cst.SimpleString)
    ):
        return first
    return None


def _trimmed_imports(source: SourceFile, replaced: Sequence[cst.CSTNode]) -> list[tuple[int, int, str]]:
    """`from torch.nn import BatchNorm2d as BN`: the alias goes when every use of `BN` was
    replaced; the statement goes with its last alias."""
    edits = []
    for statement, node in _top_level_imports(source):
        if not isinstance(node, cst.ImportFrom) or isinstance(node.names, cst.ImportStar) or node.module is None:
            continue
        module_name = source.code(node.module)
        unused = [
            alias
            for alias in node.names
            if f"{module_name}.{source.code(alias.name)}" in BATCHNORM_CLASSES
            and source.only_used_inside(alias, replaced)
        ]
        if not unused:
            continue
        kept = [alias for alias in node.names if alias not in unused]
        if not kept and len(statement.body) == 1:
            edits.append((*source.char_range(statement, whole_lines=True), ""))
        elif kept:
            trimmed = node.with_changes(names=[*kept[:-1], kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)])
            edits.append((*source.char_range(node), source.module.code_for_node(trimmed)))
    return edits
