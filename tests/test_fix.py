"""`normswap lint --fix` and `normswap.fix_source`: each pattern of tests/fix_cases/ is fixed in
a project folder and compared with its reviewed result (tests/fix_cases/*.fixed.py); the fixed
file, imported fresh, builds a model with convert's state-dict keys and, with convert's
weights, convert's outputs; a second run changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap
from fixcases import CASES, FIXED, assert_builds_what_convert_makes, built, context_for, copy_case, load
from normswap.fix import FixError, fix_source
from normswap.render.json import source_fixes_to_dict


@pytest.mark.parametrize("case", FIXED)
def test_fix_matches_the_reviewed_result_and_a_second_run_changes_nothing(
    project: Path, case: str, request: pytest.FixtureRequest
) -> None:
    path = copy_case(project, case)
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for(case), root=project, apply=True, unsafe=True)
    assert fixes.applied and fixes.unfixable == []
    fixed = path.read_text(encoding="utf-8")
    golden = CASES / f"{case}.fixed.py"
    if request.config.getoption("--update-goldens") and (
        not golden.exists() or golden.read_text(encoding="utf-8") != fixed
    ):
        golden.write_text(fixed, encoding="utf-8")
        pytest.fail(
            f"{golden.name} rewritten by --update-goldens: review `git diff {golden}` and rerun without the option"
        )
    assert fixed == golden.read_text(encoding="utf-8")

    again, x, _ = built(path)
    second = fix_source(again, x, context=context_for(case), root=project, apply=True, unsafe=True)
    assert second.edits == [] and second.unfixable == []
    assert path.read_text(encoding="utf-8") == fixed


@pytest.mark.parametrize("case", FIXED)
def test_fixed_source_builds_what_convert_produces(project: Path, case: str) -> None:
    path = copy_case(project, case)
    model, x, _ = built(path)
    context = context_for(case)
    fix_source(model, x, context=context, root=project, apply=True, unsafe=True)
    assert_builds_what_convert_makes(load(path).build(), model, x, context, case)


def test_the_issue_example_line(project: Path) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("direct"), root=project, unsafe=True)
    first = fixes.edits[0]
    assert (first.old, first.new) == ("nn.BatchNorm2d(64, eps=1e-3, momentum=0.01)", "nn.GroupNorm(4, 64, eps=1e-3)")
    assert (first.path, first.line, first.column, first.sites, first.safe) == ("direct.py", 11, 20, ("bn1",), False)
    assert source_fixes_to_dict(fixes)["edits"][0]["safety"] == "unsafe"  # as the JSON report writes it
    assert not fixes.applied and path.read_text() == (CASES / "direct.py").read_text()  # apply=False writes nothing


def test_only_what_changes_differs_byte_for_byte(project: Path) -> None:
    """CRLF line ends, a tab, a form feed and non-ASCII text survive; only the BatchNorm calls change."""
    original = (CASES / "direct.py").read_text()
    original = original.replace("class Net(nn.Module):", "# Größe \u00e9t\u00e9 \x0c\nclass Net(nn.Module):\t# tab")
    path = project / "direct.py"
    path.write_bytes(original.replace("\n", "\r\n").encode())
    model, x, _ = built(path)
    fix_source(model, x, context=context_for("direct"), root=project, apply=True, unsafe=True)
    before, after = original.replace("\n", "\r\n").encode().split(b"\r\n"), path.read_bytes().split(b"\r\n")
    changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
    assert b"\n" not in path.read_bytes().replace(b"\r\n", b"")  # every line still ends in CRLF
    assert [b.decode().strip() for _, b in changed][:1] == [
        "self.bn1 = nn.GroupNorm(4, 64, eps=1e-3)  # a comment that must survive"
    ]
    assert "# Größe été \x0c" in path.read_text(encoding="utf-8") and "class Net(nn.Module):\t# tab" in path.read_text(
        encoding="utf-8"
    )


def test_safe_fixes_only_without_unsafe(project: Path) -> None:
    """Fine-tuning with small batches: auto freezes (safe, applied); elsewhere groupnorm is held back."""
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    held = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True)
    assert held.selected == [] and len(held.held_back) == 2 and path.read_text() == (CASES / "direct.py").read_text()
    frozen = fix_source(model, x, context=normswap.Context(batch_size=2, finetune=True), root=project, apply=True)
    text = path.read_text()
    assert [e.target for e in frozen.selected] == ["frozen", "frozen"] and all(e.safe for e in frozen.edits)
    assert "self.bn1 = normswap.nn.FrozenBatchNorm(64, eps=1e-3)" in text and "import normswap.nn\n" in text
    fresh = load(path).build()
    converted = normswap.convert(model, x, context=normswap.Context(batch_size=2, finetune=True)).model
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.train()(x), model.eval()(x), rtol=1e-5, atol=1e-5)  # frozen keeps the function


def test_computed_widths_get_the_group_count_rule_in_plain_torch(project: Path) -> None:
    """A width computed in the code (a helper's argument, `cin * k`) may be any width in another
    model: the fix calls the helper it defines in the file, which applies the rule; only a
    literal width keeps a literal group count. Nothing imports normswap."""
    path = copy_case(project, "helpers")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("helpers"), root=project, unsafe=True)
    by_line = {e.line: e for e in fixes.edits}
    assert by_line[9].new == "_group_norm(cout)" and by_line[9].sites == (
        "features.0.1",
        "features.1.1",
        "features.2.1",
    )
    assert by_line[13].new == "_group_norm(channels, eps=1e-3)"  # one width in this model, any width in another
    assert by_line[28].new == "_group_norm(cin * k)"  # an expression is written once, as it was
    assert {e.imports for e in fixes.edits} == {("torch",)} and "import normswap" not in fixes.review[0].after


def test_norm_layer_values_follow_positional_and_forwarded_arguments(project: Path) -> None:
    path = copy_case(project, "torchvision_style")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("torchvision_style"), root=project, unsafe=True)
    (edit,) = fixes.edits
    assert (edit.line, edit.old, edit.new) == (67, "nn.BatchNorm2d", "_group_norm")
    assert len(edit.sites) == 8  # the stem, both blocks' norms (positional and keyword) and the downsample
    assert fixes.notes == []  # the init loop already names nn.GroupNorm; `norm_layer = nn.BatchNorm2d` is no test
    coarse = fix_source(
        model, x, context=context_for("torchvision_style"), root=project, unsafe=True, channels_per_group=4
    )
    assert (
        coarse.edits[0].new == "functools.partial(_group_norm, channels_per_group=4)"
    )  # the rule the plan was made with
    assert coarse.edits[0].imports == ("functools", "torch")


def test_a_norm_class_passed_by_the_caller_is_fixed_at_the_caller(project: Path) -> None:
    """`resnet_tiny(norm_layer=nn.BatchNorm2d)` reaches ResNet through **kwargs twice: the
    caller's reference is the one rewritten, not ResNet's default."""
    path = copy_case(project, "torchvision_style")
    path.write_text(
        path.read_text().replace(
            "return resnet_tiny(num_classes=5)", "return resnet_tiny(num_classes=5, norm_layer=nn.BatchNorm2d)"
        )
    )
    model, x, _ = built(path)
    (edit,) = fix_source(model, x, context=context_for("torchvision_style"), root=project, unsafe=True).edits
    assert (edit.line, edit.new) == (127, "_group_norm")


def test_functional_call_becomes_the_functional_norm(project: Path) -> None:
    path = copy_case(project, "functional")
    model, x, _ = built(path)
    (edit,) = fix_source(model, x, context=context_for("functional"), root=project, unsafe=True).edits
    assert edit.new == "F.group_norm(x, 2, self.weight, self.bias, 1e-3)"
    frozen = fix_source(model, x, context=normswap.Context(batch_size=2, finetune=True), root=project).edits[0]
    assert (
        frozen.new == "F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)"
        and frozen.safe
    )


def test_a_functional_channel_layer_norm_is_plain_torch_and_computes_what_convert_does(project: Path) -> None:
    path = copy_case(project, "functional")
    model, x, _ = built(path)
    converted = normswap.convert(model, x, to="layernorm")
    (edit,) = fix_source(model, x, plan=converted.plan, root=project, apply=True, unsafe=True).edits
    assert (
        edit.new == "F.layer_norm(x.movedim(1, -1), (32,), self.weight, self.bias, 1e-3).movedim(-1, 1)"
        and edit.imports == ()
    )
    fresh = load(path).build()
    fresh.load_state_dict(converted.model.state_dict())
    with torch.no_grad():  # the same permutation and kernel as normswap's channel_layer_norm: 1e-6
        torch.testing.assert_close(fresh(x), converted.model(x), rtol=1e-6, atol=1e-6)


def test_unfixable_sites_say_why_and_nothing_is_edited(project: Path) -> None:
    subclass = copy_case(project, "subclass")
    model, x, _ = built(subclass)
    fixes = fix_source(model, x, context=context_for("subclass"), root=project, apply=True, unsafe=True)
    ((site, reason),) = [(u.site, u.reason) for u in fixes.unfixable]
    assert site == "bn1" and "BatchNormAct2d, a BatchNorm subclass" in reason
    assert [e.sites for e in fixes.edits] == [("bn2",)] and "self.bn1 = BatchNormAct2d(32)" in subclass.read_text()

    tabular = copy_case(project, "tabular")
    model, x, _ = built(tabular)
    fixes = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)
    assert {u.site for u in fixes.unfixable} == {"body.0.0", "body.1.0"}
    assert all("different plans (body.0.0: frozen, body.1.0: layernorm)" in u.reason for u in fixes.unfixable)
    assert fixes.edits == [] and tabular.read_text() == (CASES / "tabular.py").read_text()


def test_installed_packages_and_files_outside_the_project_are_never_edited(
    project: Path, zoo: Path, tmp_path: Path
) -> None:
    user = project / "uses_zoo.py"
    model, x, _ = built(user)
    report = normswap.lint(model, x, normswap.Context(batch_size=2))
    site = report.sites[0]
    assert (
        site.defined_at.origin == "installed" and site.defined_at.label == "tinyzoo/__init__.py:10 (installed package)"
    )
    assert (site.built_from.path, site.built_from.line, site.built_from.origin) == ("uses_zoo.py", 7, "project")
    fixes = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)
    ((unfixable,),) = [fixes.unfixable]
    assert (
        unfixable.reason
        == "built in an installed package (tinyzoo/__init__.py), which normswap does not edit; your code builds it at uses_zoo.py:7"
    )
    assert fixes.edits == [] and (zoo / "tinyzoo" / "__init__.py").read_text() == (CASES / "zoo_models.py").read_text()

    elsewhere = tmp_path / "elsewhere"  # another checkout, not under the project root
    elsewhere.mkdir()
    outside = Path(shutil.copy(CASES / "direct.py", elsewhere / "direct_elsewhere.py"))
    model, x, _ = built(outside)
    fixes = fix_source(model, x, context=context_for("direct"), root=project, apply=True, unsafe=True)
    assert fixes.edits == [] and all("a file outside the project" in u.reason for u in fixes.unfixable)
    assert outside.read_text() == (CASES / "direct.py").read_text()


def test_fold_is_a_checkpoint_change_not_a_source_one(project: Path) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=normswap.Context(inference_only=True), root=project, apply=True, unsafe=True)
    assert fixes.edits == [] and {u.site for u in fixes.unfixable} == {"bn1", "bn2"}
    assert all(
        u.reason.startswith("fold changes the weights of the layer before it, not the code") for u in fixes.unfixable
    )


def test_a_model_built_without_recording_is_not_guessed_at(project: Path) -> None:
    path = copy_case(project, "direct")
    module = load(path)
    model = module.build()  # no recording_construction()
    fixes = fix_source(
        model, torch.randn(*module.INPUT_SHAPE), context=context_for("direct"), root=project, unsafe=True
    )
    assert fixes.edits == [] and {u.site for u in fixes.unfixable} == {"bn1", "bn2"}
    assert all("recording_construction()" in u.reason for u in fixes.unfixable)


def test_a_file_changed_since_the_model_was_built_is_refused(project: Path) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    path.write_text(
        path.read_text().replace("    def forward", "    # a new comment shifts nothing above it\n    def forward")
    )
    fixes = fix_source(model, x, context=context_for("direct"), root=project, apply=True, unsafe=True)
    assert fixes.edits == [] and all("changed since the model was built" in u.reason for u in fixes.unfixable)
    assert "# a new comment" in path.read_text() and "nn.BatchNorm2d(64" in path.read_text()


def test_a_file_that_no_longer_parses_is_refused(project: Path) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    path.write_text(path.read_text() + "\ndef broken(:\n")
    fixes = fix_source(model, x, context=context_for("direct"), root=project, apply=True, unsafe=True)
    assert fixes.edits == [] and all(
        "does not parse" in u.reason and "nothing in it was changed" in u.reason for u in fixes.unfixable
    )


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_read_only_files_are_refused_before_anything_is_written(project: Path) -> None:
    direct, aliases = copy_case(project, "direct"), copy_case(project, "aliases")
    first, x1, _ = built(direct)
    second, x2, _ = built(aliases)
    from normswap.fix import FixJob, plan_fixes
    from normswap.policy import make_plan

    jobs = []
    for model, x in ((first, x1), (second, x2)):
        report = normswap.lint(model, x, normswap.Context(batch_size=2))
        jobs.append(FixJob(model, report.sites, make_plan(report.sites, report.findings, report.context, strict=False)))
    fixes = plan_fixes(jobs, project, unsafe=True)
    aliases.chmod(stat.S_IRUSR | stat.S_IRGRP)
    try:
        with pytest.raises(FixError, match=r"'aliases.py' is read-only, so nothing was fixed"):
            fixes.apply()
    finally:
        aliases.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert direct.read_text() == (CASES / "direct.py").read_text()  # refused before the first write
    assert not fixes.applied


def test_a_crash_while_writing_leaves_the_file_whole(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("direct"), root=project, unsafe=True)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        fixes.apply()
    assert path.read_text() == (CASES / "direct.py").read_text()
    assert sorted(p.name for p in project.iterdir()) == ["direct.py", "pyproject.toml"]  # no temporary left behind


def test_a_file_changed_between_fixing_and_writing_is_refused(project: Path) -> None:
    path = copy_case(project, "direct")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("direct"), root=project, unsafe=True)
    path.write_text(path.read_text() + "# edited meanwhile\n")
    with pytest.raises(FixError, match="changed while it was being fixed; nothing was written"):
        fixes.apply()
    assert path.read_text().endswith("# edited meanwhile\n")


def test_the_mode_of_a_fixed_file_is_kept(project: Path) -> None:
    path = copy_case(project, "direct")
    path.chmod(0o640)
    model, x, _ = built(path)
    fix_source(model, x, context=context_for("direct"), root=project, apply=True, unsafe=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and "GroupNorm" in path.read_text()


def test_suggestions_cover_whole_lines_and_import_insertions(project: Path) -> None:
    path = copy_case(project, "helpers")
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=context_for("helpers"), root=project, unsafe=True)
    suggestions = fixes.suggestions()
    (helper,) = [s for s in suggestions if not s.edits]  # the function the fix defines, after the imports
    assert (helper.hunk.start, helper.hunk.end) == (
        7,
        7,
    ) and "\ndef _group_norm(num_features, eps=1e-5," in helper.hunk.text
    lines = (CASES / "helpers.py").read_text().splitlines(keepends=True)
    applied = list(lines)
    for suggestion in sorted(
        suggestions, key=lambda s: s.hunk.start, reverse=True
    ):  # each suggestion replaces its lines
        assert "".join(lines[suggestion.hunk.start - 1 : suggestion.hunk.end]) == suggestion.hunk.old
        applied[suggestion.hunk.start - 1 : suggestion.hunk.end] = [suggestion.hunk.text]
    assert "".join(applied) == fixes.review[0].after


def test_drop_in_classes_take_batchnorm_arguments() -> None:
    from normswap.nn import ChannelLayerNorm, FrozenBatchNorm, GroupNormBN

    for cls in (GroupNormBN, ChannelLayerNorm, FrozenBatchNorm):
        layer = cls(32, 1e-3, 0.01, False, True, None, torch.float64)  # BatchNorm2d's positional order
        assert (layer.num_features, layer.eps, layer.weight) == (32, 1e-3, None)
        keyword = cls(
            num_features=32, eps=1e-3, momentum=None, affine=True, track_running_stats=True, dtype=torch.float64
        )
        assert keyword.weight.dtype == torch.float64 and keyword.weight.shape == (32,)
    assert GroupNormBN(64).num_groups == 4 and GroupNormBN(64, groups=8).num_groups == 8
    assert GroupNormBN(128, groups={64: 2, 128: 8}).num_groups == 8
    assert GroupNormBN(512, groups={64: 2}).num_groups == 32  # a width the mapping lacks gets the rule, never an error
    with pytest.raises(ValueError, match="track_running_stats=False has nothing to freeze"):
        FrozenBatchNorm(8, track_running_stats=False)
    x = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(
        GroupNormBN(32, groups=2, affine=False)(x), nn.functional.group_norm(x, 2), rtol=0, atol=0
    )
    torch.testing.assert_close(
        ChannelLayerNorm(32, affine=False)(x),
        nn.functional.layer_norm(x.permute(0, 2, 3, 1), (32,)).permute(0, 3, 1, 2),
    )


def test_recording_construction_restores_batchnorm_and_nests() -> None:
    original = nn.modules.batchnorm._NormBase.__init__
    with normswap.recording_construction():
        with normswap.recording_construction():
            inner = nn.BatchNorm2d(4)
        outer = nn.BatchNorm1d(4)
    after = nn.BatchNorm2d(4)
    assert nn.modules.batchnorm._NormBase.__init__ is original
    from normswap.source import construction_of

    assert construction_of(inner).calls[0].path == __file__ and construction_of(outer) is not None
    assert construction_of(after) is None


def _fixed(project: Path, name: str, source: bytes) -> tuple[Path, normswap.fix.SourceFixes]:
    """Write `source` as project/name, build its `build()` under recording, fix it (unsafe too)."""
    path = project / name
    path.write_bytes(source)
    model, x, _ = built(path)
    return path, fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)


MODULE_PATH_SPELLING = b"""import torch
from torch.nn.modules import batchnorm


def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 24, 1), torch.nn.modules.batchnorm.BatchNorm2d(24), batchnorm.BatchNorm2d(24, eps=1e-3))


INPUT_SHAPE = (2, 3, 8, 8)
"""


def test_batchnorm_spelt_through_its_module_becomes_torch_nn(project: Path) -> None:
    path, fixes = _fixed(project, "spelt.py", MODULE_PATH_SPELLING)
    assert len(fixes.edits) == 2 and fixes.unfixable == []
    assert "torch.nn.GroupNorm(1, 24)" in path.read_text() and "torch.nn.GroupNorm(1, 24, eps=1e-3)" in path.read_text()
    assert [type(m).__name__ for m in load(path).build()][1:] == [
        "GroupNorm",
        "GroupNorm",
    ]  # batchnorm.GroupNorm does not exist


SHADOWED = """import torch.nn as nn

{binding}


def build(norm_layer=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(3, 24, 1), norm_layer(24))


INPUT_SHAPE = (2, 3, 8, 8)
"""


@pytest.mark.parametrize(
    ("binding", "finetune", "reason"),
    [
        (
            'normswap = {"enabled": True}',
            True,
            "the fix names `normswap`, but shadow.py:3 binds `normswap` to something else; rename that",
        ),
        ("torch = None", False, "the fix names `torch`, but shadow.py:3 binds `torch` to something else; rename that"),
        (
            "_group_norm = None",
            False,
            "the fix defines the function `_group_norm`, but shadow.py:3 binds `_group_norm` already; rename that",
        ),
    ],
    ids=["normswap", "torch", "helper"],
)
def test_a_name_the_fix_needs_that_the_file_binds_is_not_shadowed(
    project: Path, binding: str, finetune: bool, reason: str
) -> None:
    """frozen names normswap.nn, groupnorm's helper names torch and itself."""
    source = SHADOWED.format(binding=binding).encode()
    path = project / "shadow.py"
    path.write_bytes(source)
    model, x, _ = built(path)
    fixes = fix_source(
        model, x, context=normswap.Context(batch_size=2, finetune=finetune), root=project, apply=True, unsafe=True
    )
    assert fixes.edits == [] and path.read_bytes() == source
    assert [u.reason for u in fixes.unfixable] == [reason]


def test_crlf_files_and_byte_order_marks_are_kept(project: Path) -> None:
    source = b"\xef\xbb\xbf" + MODULE_PATH_SPELLING.replace(
        b"batchnorm.BatchNorm2d(24, eps=1e-3)", b"nn.GroupNorm(1, 24)"
    ).replace(b"import torch\n", b"import torch\nimport torch.nn as nn\n")
    source = source.replace(
        b"torch.nn.modules.batchnorm.BatchNorm2d(24)", b"__import__('functools').partial(nn.BatchNorm2d)(24)"
    )
    path, fixes = _fixed(project, "bom.py", source.replace(b"\n", b"\r\n"))
    written = path.read_bytes()
    assert len(fixes.edits) == 1 and written.startswith(b"\xef\xbb\xbf")
    assert b"\r\n\r\n\r\ndef _group_norm(" in written and b"\n" not in written.replace(
        b"\r\n", b""
    )  # every line ends in CRLF, the added helper too


FACTORIES = """import functools

import torch.nn as nn

NORM_LAYERS = {{"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}}


def norm_by_name(kind):
    return {{"batch": functools.partial(nn.BatchNorm2d, eps=1e-3), "none": nn.Identity}}[kind]


def norm_from_table(kind):
    return NORM_LAYERS[kind]


def make_norm(kind):
{factory}


class Block(nn.Module):
    def __init__(self, cin, cout, norm_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = norm_layer(cout)

    def forward(self, x):
        return self.norm(self.conv(x))


def build():
    norm_layer = make_norm("batch")
    return nn.Sequential(Block(3, 16, norm_layer), Block(16, 32, norm_layer=norm_layer))


INPUT_SHAPE = (2, 3, 8, 8)
"""


@pytest.mark.parametrize(
    ("factory", "rewritten"),
    [
        (
            "    return norm_by_name(kind)",
            "functools.partial(_group_norm, eps=1e-3)",
        ),  # a dict lookup inside the factory
        (
            "    return norm_from_table(kind)",
            'NORM_LAYERS = {"batch": _group_norm, "instance": nn.InstanceNorm2d}',
        ),  # a module-level table
        (
            "    layer = nn.BatchNorm2d if kind == 'batch' else nn.Identity\n    return layer",
            "layer = _group_norm if kind",
        ),
    ],
    ids=["dict-in-factory", "module-table", "local-branch"],
)
def test_norm_classes_returned_by_factories_are_followed(project: Path, factory: str, rewritten: str) -> None:
    path, fixes = _fixed(project, "factories.py", FACTORIES.format(factory=factory).encode())
    assert fixes.unfixable == [] and len(fixes.edits) == 1 and len(fixes.edits[0].sites) == 2
    assert rewritten in path.read_text()
    fresh = load(path).build()
    assert [type(m.norm).__name__ for m in fresh] == ["GroupNorm", "GroupNorm"]


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        (
            "    return getattr(nn, 'BatchNorm2d')",
            "the trail breaks at factories.py:17, where `getattr(nn, 'BatchNorm2d')` calls `getattr`, which is not a Python function normswap can read",
        ),
        (
            "    return functools.partial(nn.BatchNorm2d, eps=1e-3) if kind == 'batch' else nn.BatchNorm2d",
            "`functools.partial(nn.BatchNorm2d, eps=1e-3) if kind == 'b...` may hold any of 2 BatchNorm2d classes (factories.py:17), "
            "and normswap cannot tell which one built this layer",
        ),
    ],
    ids=["getattr", "two-candidates"],
)
def test_where_the_trail_breaks_the_reason_names_the_line(project: Path, factory: str, reason: str) -> None:
    source = FACTORIES.format(factory=factory).encode()
    path, fixes = _fixed(project, "factories.py", source)
    assert fixes.edits == [] and path.read_bytes() == source
    assert {u.site for u in fixes.unfixable} == {"0.norm", "1.norm"}
    assert reason in fixes.unfixable[0].reason, fixes.unfixable[0].reason


def test_a_factory_in_an_installed_package_is_named_where_the_trail_leaves_the_project(
    project: Path, zoo: Path
) -> None:
    (zoo / "tinyzoo" / "norms.py").write_text(
        "import torch.nn as nn\n\n\ndef get_norm(kind):\n    return nn.BatchNorm2d\n"
    )
    source = FACTORIES.format(
        factory="    from tinyzoo.norms import get_norm\n\n    return get_norm(kind)"
    ).encode()  # imported where it is used
    path, fixes = _fixed(project, "factories.py", source)
    assert fixes.edits == [] and path.read_bytes() == source
    assert (
        "the trail breaks at factories.py:19, where `get_norm(kind)` calls `get_norm`, defined in tinyzoo/norms.py, outside the project"
        in (fixes.unfixable[0].reason)
    )


NAME_MATCHES = b"""import torch.nn as nn


def init(model):
    for name, m in model.named_modules():
        if type(m).__name__ == "BatchNorm2d":
            nn.init.ones_(m.weight)
        if m.__class__.__name__ in ("BatchNorm1d", "BatchNorm2d"):
            nn.init.zeros_(m.bias)
    decay = [p for name, p in model.named_parameters() if "bn" not in name]
    print("BatchNorm layers:", len(decay))  # a message, not a test of a name
    return decay


def build():
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24))
    init(model)
    return model


INPUT_SHAPE = (2, 3, 8, 8)
"""


def test_code_that_picks_batchnorm_by_class_name_gets_a_note_saying_what_it_does(project: Path) -> None:
    """Class-name tests become notes that say what the code does with the layers and what the fix
    changes; the 'bn' parameter filter (names stay) and the printed message say nothing."""
    path, fixes = _fixed(project, "by_name.py", NAME_MATCHES)
    by_line = {int(note.split(":")[1].split(" ")[0]): note for note in fixes.notes}
    assert sorted(by_line) == [6, 8]
    assert by_line[6] == (
        'by_name.py:6 initialises the layers it selects (`init`) by class name (`if type(m).__name__ == "BatchNorm2d":`): '
        "after the fix the GroupNorm layers would keep their default initialisation instead; make it match GroupNorm too"
    )
    assert [e.target for e in fixes.edits] == ["groupnorm"]  # no mechanical rewrite of a string test
    assert "GroupNorm" in [type(m).__name__ for m in load(path).build()]


SELECTIONS = b"""import torch
import torch.nn as nn


def init(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)


def decay_groups(model):
    no_decay = [p for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for p in m.parameters()]
    return [{"params": no_decay, "weight_decay": 0.0}]


def freeze(model):
    for m in model.modules():
        if type(m) == nn.BatchNorm2d:
            m.weight.requires_grad = False


def eval_statistics(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def count(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def build():
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24))
    init(model)
    return model


INPUT_SHAPE = (2, 3, 8, 8)
"""


def test_each_selection_gets_what_it_needs_and_nothing_where_nothing_changes(project: Path) -> None:
    """An init ladder that already handles nn.GroupNorm and a statistics-only `m.eval()` say
    nothing; isinstance tests (an optimizer group's tuple, a count) get nn.GroupNorm added (unsafe
    edits, held back without --unsafe-fixes); a type test that freezes gets a note; a second fix
    is a no-op."""
    path = project / "selections.py"
    path.write_bytes(SELECTIONS)
    model, x, _ = built(path)
    held = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, unsafe=False)
    assert [(e.line, e.target, e.safe) for e in held.edits] == [
        (14, "selection", False),
        (31, "selection", False),
        (35, "groupnorm", False),
    ]
    assert held.selected == []
    fixes = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)
    selection, counting = [e for e in fixes.edits if e.target == "selection"]
    assert (selection.line, selection.old, selection.new) == (
        14,
        "nn.BatchNorm2d, nn.LayerNorm",  # inside the tuple's parentheses
        "nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm",
    )
    assert selection.selects.startswith(
        "collects the parameters of the layers it selects into an optimizer's parameter group (`decay_groups`)"
    )
    assert counting.new == "(nn.BatchNorm2d, nn.GroupNorm)" and counting.selects.startswith("selects layers (`count`)")
    assert fixes.notes == [
        "selections.py:20 freezes the parameters of the layers it selects (`freeze`) by its class "
        "(`if type(m) == nn.BatchNorm2d:`): after the fix the GroupNorm layers would train; make it match GroupNorm too"
    ]
    fixed = load(path)
    rebuilt = fixed.build()
    assert len(fixed.decay_groups(rebuilt)[0]["params"]) == 2  # the GroupNorm's weight and bias, as BatchNorm's before
    again, x, _ = built(path)
    second = fix_source(again, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)
    assert second.edits == [] and second.notes == []


SELECTION_LINE = b"""import torch.nn as nn
import torch.nn.functional as F


class BatchNormAct2d(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x))


class Net(nn.Module):
    def __init__(self, act=False):
        super().__init__()
        Norm = BatchNormAct2d if act else nn.BatchNorm2d
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = Norm(16)

    def forward(self, x):
        return self.bn(self.conv(x))


def build(act=False):
    return Net(act)


INPUT_SHAPE = (2, 3, 8, 8)
"""


def test_a_branch_that_is_not_plain_batchnorm_is_named_in_a_note_and_in_the_refusal(project: Path) -> None:
    """`Norm = BatchNormAct2d if act else nn.BatchNorm2d`: fixing the plain branch rewrites it and
    names the other (an activation added: not BatchNorm on one device); the model built with
    the other branch is refused with the selection line."""
    path, fixes = _fixed(project, "selection.py", SELECTION_LINE)
    assert [(e.line, e.old, e.new) for e in fixes.edits] == [(13, "nn.BatchNorm2d", "_group_norm")]
    assert fixes.notes == [
        "selection.py:13 selects `BatchNormAct2d` in another branch (`Norm = BatchNormAct2d if act else nn.BatchNorm2d`): "
        "that branch still builds BatchNorm after the fix, as its output differs from BatchNorm's in training mode; "
        "replace it by hand, or lint the model built with that branch"
    ]
    path.write_bytes(SELECTION_LINE)
    module = load(path)
    with normswap.recording_construction():
        model = module.build(act=True)
    refused = fix_source(model, torch.randn(*module.INPUT_SHAPE), context=normswap.Context(batch_size=2), root=project)
    ((site, reason),) = [(u.site, u.reason) for u in refused.unfixable]
    assert site == "bn" and refused.edits == []
    assert reason.startswith(
        "a BatchNormAct2d, a BatchNorm subclass (its output differs from BatchNorm's in training mode)"
    )
    assert reason.endswith("; selection.py:13 selects the class (`Norm = BatchNormAct2d if act else nn.BatchNorm2d`)")


def test_a_conditional_expression_selecting_sync_batchnorm_is_rewritten_in_both_arms(project: Path) -> None:
    """`Norm = nn.SyncBatchNorm if distributed else nn.BatchNorm2d` (the multi-GPU arm is the other
    one): both arms become the GroupNorm the plan writes, and the model built with either equals
    convert's."""
    source = SELECTION_LINE.replace(b"BatchNormAct2d if act else", b"nn.SyncBatchNorm if act else")
    path, fixes = _fixed(project, "selection.py", source)
    assert [(e.column, e.old, e.new, e.sites) for e in fixes.edits] == [
        (16, "nn.SyncBatchNorm", "_group_norm", ("bn",)),
        (45, "nn.BatchNorm2d", "_group_norm", ("bn",)),
    ]
    assert fixes.unfixable == [] and fixes.notes == []
    assert "        Norm = _group_norm if act else _group_norm\n" in path.read_text()
    original = project / "original.py"
    original.write_bytes(source)
    for act in (False, True):
        torch.manual_seed(0)
        before = load(original).build(act=act)
        after = load(path).build(act=act)
        assert_builds_what_convert_makes(
            after, before, torch.randn(2, 3, 8, 8), normswap.Context(batch_size=2), f"act={act}"
        )


def test_the_diff_of_a_file_without_a_final_newline_ends_in_one(project: Path) -> None:
    last = b"import torch\n\nINPUT_SHAPE = (2, 3, 8, 8)\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 24, 1), torch.nn.BatchNorm2d(24))"
    _, fixes = _fixed(project, "last_line.py", last)
    diff = fixes.files[0].diff()
    assert diff.endswith("torch.nn.GroupNorm(1, 24))\n\\ No newline at end of file\n")  # as `diff` and git write it
    assert "BatchNorm2d(24))\n\\ No newline at end of file\n+" in diff  # the old and new last lines do not run together


@pytest.mark.parametrize(("max_groups", "channels_per_group"), [(32, 16), (8, 16), (32, 4), (32, 1), (16, 8)])
def test_the_helper_written_into_the_source_is_converts_group_count_rule(
    max_groups: int, channels_per_group: int
) -> None:
    """The `_group_norm` a fix defines gives every width the count `convert` plans (where no
    group is degenerate, as on any map of two or more values per channel)."""
    from normswap.targets.groupnorm import GROUP_NORM_HELPER, HELPER_SOURCE, choose_num_groups

    namespace: dict = {"torch": torch}
    exec(HELPER_SOURCE, namespace)
    helper = namespace[GROUP_NORM_HELPER]
    for channels in range(1, 1025):
        layer = helper(channels, max_groups=max_groups, channels_per_group=channels_per_group)
        assert isinstance(layer, nn.GroupNorm) and layer.num_channels == channels
        assert layer.num_groups == choose_num_groups(channels, 2, max_groups, channels_per_group)[0], channels
    momentum_ignored = helper(64, 1e-3, 0.01, False, True, None, torch.float64)  # BatchNorm's positional order
    assert (momentum_ignored.eps, momentum_ignored.affine, momentum_ignored.num_groups) == (1e-3, False, 4)


def test_group_counts_no_rule_gives_are_refused_for_computed_widths(project: Path) -> None:
    """A plan edited by hand (16 channels in 4 groups, 32 in 2): no `max_groups` /
    `channels_per_group` gives both, so no code gives other widths theirs; a plan made with
    --channels-per-group 4 is written as that rule."""
    path = copy_case(project, "helpers")
    model, x, _ = built(path)
    document = json.loads(normswap.convert(model, x, context=context_for("helpers")).plan.to_json())
    for entry in document["sites"]:
        if entry["name"] == "features.0.1":
            entry["params"]["num_groups"] = 4
    edited = normswap.Plan.from_json(json.dumps(document))
    fixes = fix_source(model, x, plan=edited, root=project, unsafe=True)
    refused = {u.site: u.reason for u in fixes.unfixable}
    assert set(refused) == {"features.0.1", "features.1.1", "features.2.1"}
    assert refused["features.0.1"].startswith(
        "the plan's group counts for `cout` (16 channels: 4, 32 channels: 2, 64 channels: 4) follow no rule of the form "
        "'the largest divisor up to G groups with at least K channels per group'"
    )
    coarse = normswap.convert(model, x, context=context_for("helpers"), channels_per_group=4).plan
    by_line = {e.line: e.new for e in fix_source(model, x, plan=coarse, root=project, unsafe=True).edits}
    assert by_line[9] == "_group_norm(cout, channels_per_group=4)"  # read off the plan's own counts


def test_a_second_fix_of_a_file_reuses_the_helper_the_first_added(project: Path) -> None:
    path = copy_case(project, "helpers")
    model, x, _ = built(path)
    first = fix_source(
        model,
        x,
        context=context_for("helpers"),
        root=project,
        apply=True,
        unsafe=True,
        keep=("mix_norms.0", "mix_norms.1"),
    )
    assert first.unfixable == [] and "nn.BatchNorm2d(channels, eps=1e-3)" in path.read_text()
    again, x, _ = built(path)
    second = fix_source(again, x, context=context_for("helpers"), root=project, apply=True, unsafe=True)
    assert [e.new for e in second.edits] == ["_group_norm(channels, eps=1e-3)"] and second.unfixable == []
    assert path.read_text() == (CASES / "helpers.fixed.py").read_text()  # one helper, as a single run writes it


def test_a_class_attribute_set_in_a_base_class_is_where_the_trail_breaks(project: Path) -> None:
    source = b"""import torch.nn as nn


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm_layer = nn.BatchNorm2d


class Net(Base):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = self.norm_layer(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def build():
    return Net()


INPUT_SHAPE = (2, 3, 4, 4)
"""
    path, fixes = _fixed(project, "inherited.py", source)
    assert fixes.edits == [] and path.read_bytes() == source
    ((unfixable,),) = [fixes.unfixable]
    assert unfixable.reason.endswith(
        "the trail breaks at inherited.py:14, where `self.norm_layer` is set nowhere in its class that normswap can read (a base class, setattr)"
    )
