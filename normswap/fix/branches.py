"""Selection lines: `BatchNorm = SynchronizedBatchNorm2d if sync_bn else nn.BatchNorm2d`, or one
name assigned a norm class in each branch of an `if`. A fix rewrites the branch the linted model
took; the other branches that build a BatchNorm-family class computing what BatchNorm computes
on one device (torch's, a synchronized subclass) get the same replacement (GroupNorm and
LayerNorm need no synchronization), and any other is named, with its line, in a note."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import libcst as cst
from torch.nn.modules.batchnorm import _BatchNorm

from .locate import Spot, dotted_name, loaded
from .one_device import batchnorm_on_one_device
from .source_file import SourceFile


@dataclass(frozen=True)
class Branch:
    """Another arm of the selection that holds a rewritten class reference: the node, and why it
    is not rewritten ("" when it is)."""

    node: cst.CSTNode
    refusal: str


def other_branches(spot: Spot, rank: int | None) -> Iterator[Branch]:
    """The other arms of the conditional expression, or the other assignments to the same name
    in the same function, that name a BatchNorm-family class (arms naming anything else are no
    BatchNorm and are left alone). `rank`: the input rank the rewritten layers saw."""
    for node in _arms(spot.file, spot.node):
        if node is spot.node:
            continue
        cls = branch_class(spot.file, node)
        if cls is None:
            continue
        yield Branch(node, batchnorm_on_one_device(cls, rank))


def _arms(source: SourceFile, node: cst.CSTNode) -> list[cst.CSTNode]:
    parent = source.parents.get(node)
    if isinstance(parent, cst.IfExp) and node in (parent.body, parent.orelse):
        top: cst.CSTNode = parent
        while isinstance(up := source.parents.get(top), cst.IfExp) and top in (up.body, up.orelse):
            top = up
        return list(_leaves(top))
    if isinstance(parent, cst.Assign) and parent.value is node and len(parent.targets) == 1:
        target = parent.targets[0].target
        scope = next(source.enclosing(parent, cst.FunctionDef), None) or source.module
        if isinstance(target, cst.Name):
            return [a.value for a in _assignments_to(scope, target.value)]
    return []


def _leaves(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    if isinstance(node, cst.IfExp):
        yield from _leaves(node.body)
        yield from _leaves(node.orelse)
    else:
        yield node


def _assignments_to(scope: cst.CSTNode, name: str) -> list[cst.Assign]:
    found: list[cst.Assign] = []

    class Collect(cst.CSTVisitor):
        def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
            return node is scope  # not the assignments of nested functions

        def visit_ClassDef(self, node: cst.ClassDef) -> bool:
            return False

        def visit_Assign(self, node: cst.Assign) -> None:
            target = node.targets[0].target if len(node.targets) == 1 else None
            if isinstance(target, cst.Name) and target.value == name:
                found.append(node)

    scope.visit(Collect())
    return found


def branch_class(source: SourceFile, node: cst.CSTNode) -> type[_BatchNorm] | None:
    """The BatchNorm class a plain name or dotted reference names at run time, or None."""
    dotted = dotted_name(node)
    value = loaded(source, node, dotted) if dotted is not None else None
    return value if isinstance(value, type) and issubclass(value, _BatchNorm) else None
