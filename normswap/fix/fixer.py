"""From a plan to source edits: locate every site's spot, group the sites built at one spot,
write one replacement per spot, rewrite each file once, and apply or diff the result."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import targets
from ..errors import PlanError
from ..plan import Plan, PlanEntry
from ..sites import Site
from ..source import construction_of
from ..targets.base import PlanOptions, SourceCode
from . import selections
from .apply import FileFix, Hunk, check_writable, write
from .branches import branch_class, other_branches
from .emit import is_safe, replacement
from .importers import importers
from .locate import SELECTION, VALUE, Files, Spot, Unfixable, locate
from .source_file import FixError, physical_lines
from .splice import spliced

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixJob:
    """One model to fix: its sites, the plan to write into its source, and which sites to fix
    (`only`; None: every site the plan converts). `label` names it in multi-model runs;
    `options`: what the plan was made with, when known (a group-count rule written into the
    source follows them)."""

    model: nn.Module
    sites: Sequence[Site]
    plan: Plan
    label: str = ""
    only: Collection[str] | None = None
    options: PlanOptions | None = None


@dataclass(frozen=True)
class Edit:
    """One replacement in a file: the code at lines/columns (1-based, columns in characters)
    `old` becomes `new`, for `sites`. `hunk`: the whole lines around it before and after (what
    a review suggestion replaces)."""

    path: str
    line: int
    column: int
    end_line: int
    end_column: int
    old: str
    new: str
    sites: tuple[str, ...]
    target: str
    safe: bool
    imports: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    hunk: Hunk | None = None
    members: tuple[tuple[str, str], ...] = ()  # (model label, site) for every site in `sites`
    # code around the model: what the rewritten code selects and why the edit keeps it selecting
    # (an isinstance test); or the other branch of a selection line; "" for a site's own edit
    selects: str = ""


@dataclass
class SourceFixes:
    """What `lint --fix` does to a project's source.

    `edits`: every fix found (safe and unsafe); `selected`: those this run applies (safe ones,
    and unsafe ones with `unsafe=True`); `unfixable`: sites with the reason their source is not
    edited; `files`: each touched file before and after the selected edits; `review`: after
    every edit (for code-review suggestions); `notes`: what a reader should still look at.
    """

    edits: list[Edit] = field(default_factory=list)
    unfixable: list[Unfixable] = field(default_factory=list)
    files: list[FileFix] = field(default_factory=list)
    review: list[FileFix] = field(default_factory=list)
    unsafe: bool = False
    applied: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def selected(self) -> list[Edit]:
        return [edit for edit in self.edits if edit.safe or self.unsafe]

    @property
    def held_back(self) -> list[Edit]:
        """Unsafe fixes this run does not apply (they need `--unsafe-fixes`)."""
        return [edit for edit in self.edits if not (edit.safe or self.unsafe)]

    @property
    def pending(self) -> list[Edit]:
        return [] if self.applied else self.selected

    def fixed_sites(self) -> set[str]:
        """Sites whose source the applied fixes changed."""
        return {site for edit in self.selected for site in edit.sites} if self.applied else set()

    def diff(self) -> str:
        return "".join(f.diff() for f in self.files if f.changed)

    def apply(self) -> list[Path]:
        """Write every file the selected edits change, each atomically: read-only or changed
        files are refused before anything is written.

        Raises:
            FixError: a file is read-only or changed since it was read (nothing written).
        """
        changed = [f for f in self.files if f.changed]
        check_writable([f.path for f in changed])
        for fix in changed:
            if fix.path.read_bytes().decode("utf-8", errors="replace") != fix.before:
                raise FixError(f"'{fix.relative}' changed while it was being fixed; nothing was written, run again.")
        for fix in changed:
            write(fix)
        self.applied = True
        return [f.path for f in changed]

    def suggestions(self) -> list[Suggestion]:
        """Every change as whole-line replacements of the original files (what a code-review
        suggestion applies), each with the edits inside it (none for an import change)."""
        found = []
        for review in self.review:
            edits = [e for e in self.edits if e.path == review.relative]
            for hunk in review.hunks():
                inside = tuple(e for e in edits if hunk.start <= e.line and e.end_line <= max(hunk.end, hunk.start))
                found.append(Suggestion(review.relative, hunk.covering(review.before), inside, review.before))
        return found

    def for_model(self, label: str) -> SourceFixes:
        """The part of the fixes that concerns one model of a multi-model run: its edits, each
        listing only this model's sites."""
        return SourceFixes(
            edits=[
                dataclasses.replace(e, sites=tuple(site for model, site in e.members if model == label))
                for e in self.edits
                if label in e.models
            ],
            unfixable=[u for u in self.unfixable if u.model == label],
            files=self.files,
            review=self.review,
            unsafe=self.unsafe,
            applied=self.applied,
            notes=self.notes,
        )


@dataclass(frozen=True)
class Suggestion:
    """Lines `hunk.start`..`hunk.end` of `path` replaced by `hunk.text`; `edits` inside it."""

    path: str
    hunk: Hunk
    edits: tuple[Edit, ...]
    before: str

    def char_range(self) -> tuple[int, int]:
        """(offset, length) of the replaced lines in the original text, in characters."""
        lines = physical_lines(self.before)
        offset = sum(len(line) for line in lines[: self.hunk.start - 1])
        return offset, len("".join(lines[self.hunk.start - 1 : self.hunk.end]))


@dataclass
class _Member:
    label: str
    site: Site
    entry: PlanEntry
    wanted: bool
    options: PlanOptions | None = None
    module: nn.Module | None = None


def plan_fixes(jobs: Sequence[FixJob], root: Path, unsafe: bool = False) -> SourceFixes:
    """The source edits that make each job's model build what its plan converts it to."""
    files = Files(root)
    spots: dict[tuple[str, int, int], Spot] = {}
    members: dict[tuple[str, int, int], list[_Member]] = {}
    result = SourceFixes(unsafe=unsafe)
    for job in jobs:
        files.register(job.model)
    for job in jobs:
        modules = dict(job.model.named_modules())
        by_name = {site.name: site for site in job.sites}
        for entry in job.plan:
            site = by_name.get(entry.name)
            if site is None:
                continue
            wanted = entry.converts and (job.only is None or entry.name in job.only)
            module = modules.get(site.owner if site.kind == "functional" else site.name)
            construction = construction_of(module) if module is not None and site.kind != "functional" else None
            found = locate(site, module, construction, files)
            if isinstance(found, Unfixable):
                if wanted:
                    result.unfixable.append(Unfixable(site.name, found.reason, found.location, job.label))
                continue
            spots.setdefault(found.key, found)
            members.setdefault(found.key, []).append(_Member(job.label, site, entry, wanted, job.options, module))
    chosen: list[tuple[Spot, SourceCode, Edit]] = []
    several = len(jobs) > 1
    for key, group in members.items():
        chosen += _edit(spots[key], group, result, files, several)
    reached = {key for key, group in members.items() if any(m.site.reached for m in group if m.wanted)}
    chosen = _no_dependency_for_unreached(chosen, reached, result)
    if chosen:
        fixed = {(m.label, m.site.name): m for group in members.values() for m in group}
        labels = tuple(dict.fromkeys(job.label for job in jobs))
        chosen += _selection_edits(chosen, _replaced_classes(chosen, fixed), result, files, labels)
    _rewrite_files(chosen, result, files)
    return result


def _replaced_classes(
    chosen: list[tuple[Spot, SourceCode, Edit]], fixed: dict[tuple[str, str], _Member]
) -> dict[type, tuple[type, ...]]:
    """Each BatchNorm class the edits rewrite (the layers' own, and the class an edited other
    branch of a selection line named) -> the classes the fixed code builds in its place."""
    replaced: dict[type, dict[type, None]] = {}
    for spot, _, edit in chosen:
        built = [fixed[member] for member in edit.members if member in fixed]
        new = {cls: None for member in built if (cls := _new_class(member)) is not None}
        old = [type(m.module) for m in built if m.module is not None]
        if edit.selects:  # the other branch of a selection line: the class it names
            named = branch_class(spot.file, spot.node)
            old = [named] if named is not None else []
        for cls in old:
            replaced.setdefault(cls, {}).update(new)
    return {cls: tuple(new) for cls, new in replaced.items() if new}


def _new_class(member: _Member) -> type | None:
    """The class of the module the fixed code builds for this layer (what convert makes of it)."""
    module = member.module
    if not isinstance(module, _BatchNorm):
        return None
    if not type(module).__module__.startswith("torch.nn"):  # a synchronized subclass: as torch's
        rank = member.site.input_rank or 4
        module = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)(
            module.num_features, affine=module.affine
        )
    try:
        return type(targets.get(member.entry.target).module(module, member.entry.params))
    except PlanError:
        return None


def _selection_edits(
    chosen: list[tuple[Spot, SourceCode, Edit]],
    replaced: dict[type, tuple[type, ...]],
    result: SourceFixes,
    files: Files,
    labels: tuple[str, ...],
) -> list[tuple[Spot, SourceCode, Edit]]:
    """The code around the model that selects layers by class (selections.py), in the files the
    edits change, the files on the calls that built the layers, and the project files importing
    an edited one: isinstance tests get the new class (unsafe edits), the rest a note."""
    edited = {spot.file.path: spot.file for spot, _, _ in chosen}
    sources = {source.path: source for source in files.read()}
    sources.update(edited)
    for source in importers(files, edited):
        sources.setdefault(source.path, source)
    found = []
    for path in sorted(sources):
        source = sources[path]
        relative = files.relative(path)
        rewrites, notes = selections.scan(source, replaced, relative)
        result.notes.extend(notes)
        for rewrite in rewrites:
            where = source.span(rewrite.node)
            edit = Edit(
                path=relative,
                line=where.start.line,
                column=where.start.column + 1,
                end_line=where.end.line,
                end_column=where.end.column + 1,
                old=source.text_of(rewrite.node),
                new=rewrite.code.text,
                sites=(),
                target="selection",
                safe=False,
                imports=rewrite.code.imports,
                models=labels,
                selects=rewrite.selects,
            )
            found.append((Spot(SELECTION, source, rewrite.node), rewrite.code, edit))
    return found


def _no_dependency_for_unreached(
    chosen: list[tuple[Spot, SourceCode, Edit]], reached: set[tuple[str, int, int]], result: SourceFixes
) -> list[tuple[Spot, SourceCode, Edit]]:
    """An edit whose layers the example inputs never reached does not make its file import
    normswap by itself (an unreached BatchNorm1d, whose input rank is unknown, plans the
    channel LayerNorm that serves any rank): unless the file imports normswap already or another
    edit there does, its layers are reported instead, with what to do."""

    def needs_normswap(code: SourceCode) -> bool:
        return any(module.split(".")[0] == "normswap" for module in code.imports)

    importing = {
        spot.file.path
        for spot, code, _ in chosen
        if needs_normswap(code)
        and (spot.key in reached or re.search(r"^\s*(import|from)\s+normswap\b", spot.file.text, re.M))
    }
    kept, refused = [], set()
    for spot, code, edit in chosen:
        if needs_normswap(code) and spot.file.path not in importing:
            for label, site in edit.members:
                if (label, site) in refused:
                    continue  # the other branch of its selection line
                refused.add((label, site))
                result.unfixable.append(
                    Unfixable(
                        site,
                        f"not reached by the example inputs, and its replacement `{code.text}` would make {edit.path} "
                        "depend on normswap where no reached layer does (an unknown input rank plans the channel LayerNorm "
                        "that serves every rank); lint with inputs that reach it, or --keep it",
                        None,
                        label,
                    )
                )
            continue
        kept.append((spot, code, edit))
    return kept


def _edit(
    spot: Spot, group: list[_Member], result: SourceFixes, files: Files, several: bool
) -> list[tuple[Spot, SourceCode, Edit]]:
    """One edit for every site built at `spot` (and one for each other branch of its selection
    line that builds a BatchNorm the same replacement serves), or each site's reason there is none."""
    wanted = [m for m in group if m.wanted]
    if not wanted:
        return []
    where = spot.file.span(spot.node)
    location_text = f"{files.relative(spot.file.path)}:{where.start.line}"
    others = [m for m in group if not m.wanted]
    code: SourceCode | str
    if others:
        names = ", ".join(f"{m.label}:{m.site.name}" if several else m.site.name for m in others[:4]) + (
            ", ..." if len(others) > 4 else ""
        )
        code = f"{location_text} also builds {names}, which this run leaves as BatchNorm; build them on separate lines or give them the same plan"
    else:
        code = replacement(spot, [m.entry for m in wanted], wanted[0].options)
        for module in code.imports if not isinstance(code, str) else ():
            root = module.split(".")[0]
            line = spot.file.rebinding(root)
            if line is not None:
                code = f"the fix names `{root}`, but {files.relative(spot.file.path)}:{line} binds `{root}` to something else; rename that"
        for name, text in code.helpers if not isinstance(code, str) else ():
            line = spot.file.rebinding(name)
            if line is not None and not spot.file.defines(name, text):
                code = f"the fix defines the function `{name}`, but {files.relative(spot.file.path)}:{line} binds `{name}` already; rename that"
    if isinstance(code, str):
        for member in wanted:
            result.unfixable.append(Unfixable(member.site.name, code, member.site.defined_at, member.label))
        return []
    target = wanted[0].entry.target
    edit = Edit(
        path=files.relative(spot.file.path),
        line=where.start.line,
        column=where.start.column + 1,
        end_line=where.end.line,
        end_column=where.end.column + 1,
        old=spot.file.text_of(spot.node),
        new=code.text,
        sites=tuple(m.site.name for m in wanted),
        target=target,
        safe=is_safe(target),
        imports=code.imports,
        models=tuple(dict.fromkeys(m.label for m in wanted)),
        members=tuple((m.label, m.site.name) for m in wanted),
    )
    found = [(spot, code, edit)]
    if spot.kind == VALUE:
        found += _other_branches(spot, code, edit, wanted[0].site.input_rank, result)
    return found


def _other_branches(
    spot: Spot, code: SourceCode, edit: Edit, rank: int | None, result: SourceFixes
) -> list[tuple[Spot, SourceCode, Edit]]:
    """The same replacement in the other branches of the selection line that holds `spot`
    (`SynchronizedBatchNorm2d if sync_bn else nn.BatchNorm2d`: the branch trained on several
    GPUs), for the same layers; a branch whose class is not plain BatchNorm on one device is
    named in a note instead."""
    found = []
    for branch in other_branches(spot, rank):
        where = spot.file.span(branch.node)
        line_text = spot.file.lines[where.start.line - 1].strip()
        if branch.refusal:
            result.notes.append(
                f"{edit.path}:{where.start.line} selects `{spot.file.code(branch.node)}` in another branch (`{line_text}`): "
                f"that branch still builds BatchNorm after the fix, as {branch.refusal}; replace it by hand, "
                "or lint the model built with that branch"
            )
            continue
        other = dataclasses.replace(
            edit,
            line=where.start.line,
            column=where.start.column + 1,
            end_line=where.end.line,
            end_column=where.end.column + 1,
            old=spot.file.text_of(branch.node),
            selects=f"the other branch of the selection at line {where.start.line} (`{line_text}`), rewritten alike",
        )
        found.append((Spot(VALUE, spot.file, branch.node), code, other))
    return found


def _rewrite_files(chosen: list[tuple[Spot, SourceCode, Edit]], result: SourceFixes, files: Files) -> None:
    """Each file rewritten once: with the selected edits (to apply) and with all (to review)."""
    by_file: dict[Path, list[tuple[Spot, SourceCode, Edit]]] = {}
    for item in chosen:
        by_file.setdefault(item[0].file.path, []).append(item)
    for path, items in sorted(by_file.items()):
        source = items[0][0].file
        all_spots = [(spot, code) for spot, code, _ in items]
        selected = [(spot, code) for spot, code, edit in items if edit.safe or result.unsafe]
        name = files.relative(path)
        review = FileFix(path, source.text, spliced(source, all_spots), name)
        result.review.append(review)
        result.files.append(FileFix(path, source.text, spliced(source, selected) if selected else source.text, name))
        hunks = review.hunks()
        for _, _, edit in items:
            hunk = next((h for h in hunks if h.start <= edit.line <= max(h.end, h.start)), None)
            result.edits.append(dataclasses.replace(edit, hunk=hunk))
        replaced = {spot.node for spot, _ in all_spots}
        for node in source.batchnorm_names():
            parent = source.parents.get(node)
            built_here = isinstance(parent, cst.Call) and parent.func is node
            if built_here and not any(node is r or source.contains(r, node) for r in replaced):
                line = source.line_of(node)
                result.notes.append(
                    f"{name}:{line} still builds {source.code(node)} (`{source.lines[line - 1].strip()}`): no model of this "
                    "run builds its layers there; lint the models that do to fix it too"
                )
    result.edits.sort(key=lambda e: (e.path, e.line, e.column))
