"""`normswap lint`, `rules`, `explain` through click's CliRunner, and once as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from normswap.cli import main
from normswap.rules import CATALOGUE

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3)
            self.bn = nn.BatchNorm2d(width)

        def forward(self, x):
            return self.bn(self.conv(x))

    def build(width=8):
        return Net(width)

    def not_a_model():
        return 42

    CONSTANT = 3
    """
)


@pytest.fixture()
def project(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "nets.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nets", raising=False)  # another test's `nets` module, imported first
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_lint_text_exit_codes(project: Path) -> None:
    clean = run("lint", "nets.py:build", "--input-shape", "2,3,8,8")
    assert clean.exit_code == 0, clean.output
    assert "nets.py:build: 1 BatchNorm site(s), no findings" in clean.output
    dp = run("lint", "nets.py:build", "--input-shape", "2,3,8,8", "--dp")
    assert dp.exit_code == 1 and "NS106" in dp.output
    assert "nets.py:9" in dp.output  # the line `self.bn = nn.BatchNorm2d(width)`
    warn = run("lint", "nets.py:build", "--input-shape", "2,3,8,8", "--batch-size", "2")
    assert warn.exit_code == 0 and "NS103" in warn.output
    assert (
        run("lint", "nets.py:build", "--input-shape", "2,3,8,8", "--batch-size", "2", "--fail-on", "warning").exit_code
        == 1
    )


def test_a_location_that_reads_as_an_emoji_code_is_printed_as_it_is(project: Path) -> None:
    """`nets.py:100:` holds `:100:`, an emoji code to rich: the location must stay text."""
    (project / "padded.py").write_text("\n" * 91 + MODEL_FILE)  # `self.bn = ...` on line 100
    result = run("lint", "padded.py:build", "--input-shape", "2,3,8,8", "--dp", "--format", "concise")
    assert "padded.py:100: NS106" in result.output


def test_lint_module_spec_kwargs_and_json_output_file(project: Path) -> None:
    result = run(
        "lint",
        "nets:build",
        "-k",
        "width=16",
        "--input-shape",
        "2,3,8,8",
        "--world-size",
        "4",
        "--format",
        "json",
        "-o",
        "out.json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads((project / "out.json").read_text())
    (report,) = document["reports"]
    assert report["sites"][0]["num_features"] == 16
    assert [f["code"] for f in report["findings"]] == ["NS105"]
    assert report["findings"][0]["location"]["path"] == "nets.py"


def test_lint_without_arguments_uses_pyproject(project: Path) -> None:
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.normswap]
            batch_size = 1
            fail_on = "never"
            models = [{ model = "nets:build", input_shape = "2,3,8,8" }, "nets.py:build"]
            input_shape = "4,3,8,8"
            """
        )
    )
    result = run("lint", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert result.output.count("### normswap:") == 2
    flags_win = run("lint", "--batch-size", "64", "--format", "json")
    reports = json.loads(flags_win.output)["reports"]
    assert all(r["context"]["batch_size"] == 64 for r in reports)


def test_select_ignore_flags(project: Path) -> None:
    result = run(
        "lint",
        "nets:build",
        "--input-shape",
        "2,3,8,8",
        "--dp",
        "--batch-size",
        "2",
        "--ignore",
        "NS106",
        "--format",
        "json",
    )
    codes = [f["code"] for f in json.loads(result.output)["reports"][0]["findings"]]
    assert codes == ["NS103"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["lint", "nosuchpkg.mod:build", "--input-shape", "2,3,8,8"], "Module 'nosuchpkg.mod' not found"),
        (["lint", "nets:missing", "--input-shape", "2,3,8,8"], "has no attribute 'missing'"),
        (["lint", "nets:CONSTANT", "--input-shape", "2,3,8,8"], "not a callable"),
        (["lint", "nets:not_a_model", "--input-shape", "2,3,8,8"], "returned a int, not a torch.nn.Module"),
        (["lint", "nowhere.py:build", "--input-shape", "2,3,8,8"], "Model file 'nowhere.py' does not exist"),
        (["lint", "nets:build", "--input-shape", "2,three,8"], "Input shape '2,three,8' is malformed"),
        (["lint", "nets:build", "--input-shape", "2,5,8,8"], "cannot run on example inputs of shape (2, 5, 8, 8)"),
        (["lint", "nets:build", "--input-shape", "2,3,8,8", "--select", "NS999"], "Unknown rule code 'NS999'"),
        (["lint", "nets:build"], "--input-shape is required"),
        (["explain", "NS999"], "Unknown rule 'NS999'"),
    ],
    ids=[
        "module",
        "attribute",
        "not-callable",
        "not-module",
        "file",
        "shape",
        "cannot-run",
        "rule-code",
        "no-shape",
        "explain",
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(project: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_invalid_pyproject_section(project: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.normswap]\nbatch_sise = 2\n")
    result = CliRunner().invoke(main, ["lint", "nets:build", "--input-shape", "2,3,8,8"])
    assert result.exit_code == 2
    assert "Unknown key 'batch_sise'" in result.output and "pyproject.toml" in result.output


def test_debug_shows_the_traceback(project: Path) -> None:
    from normswap.errors import ModelLoadError

    plain = CliRunner().invoke(main, ["lint", "nets:missing", "--input-shape", "2,3,8,8"])
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)  # one sentence, no traceback
    debug = CliRunner().invoke(main, ["lint", "nets:missing", "--input-shape", "2,3,8,8", "--debug"])
    assert isinstance(debug.exception, ModelLoadError) and "has no attribute 'missing'" in str(
        debug.exception
    )  # re-raised


def test_rules_and_explain() -> None:
    listing = run("rules")
    assert listing.exit_code == 0 and len(listing.output.strip().splitlines()) == len(CATALOGUE) == 16
    assert listing.output.splitlines()[0].startswith("NS101  batchnorm-in-recurrence")
    explained = run("explain", "NS103")
    assert "34.7%" in explained.output and "## Fix safety" in explained.output
    assert "Examples:" in run("lint", "--help").output


@pytest.mark.slow
def test_console_script_and_python_m(project: Path) -> None:
    script = Path(sys.executable).parent / "normswap"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "normswap"]
    result = subprocess.run(
        [*command, "lint", "nets.py:build", "--input-shape", "2,3,8,8", "--dp", "--format", "sarif"],
        capture_output=True,
        text=True,
        cwd=project,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["runs"][0]["results"][0]["ruleId"] == "NS106"
    module = subprocess.run([sys.executable, "-m", "normswap", "rules"], capture_output=True, text=True, cwd=project)
    assert module.returncode == 0 and "NS901" in module.stdout


def test_internal_error_exits_3(project: Path, monkeypatch) -> None:
    import normswap.cli.commands

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(normswap.cli.commands, "lint", broken)
    result = CliRunner().invoke(main, ["lint", "nets:build", "--input-shape", "2,3,8,8"])
    assert result.exit_code == 3
    assert "internal error: ZeroDivisionError" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output


TOKENS = textwrap.dedent(
    """
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.conv = nn.Conv1d(16, 16, 3, padding=1)
            self.bn = nn.BatchNorm1d(16)

        def forward(self, tokens):  # (N, L) token ids
            return self.bn(self.conv(self.embed(tokens).transpose(1, 2)))
    """
)


def test_integer_inputs_for_token_models(project: Path) -> None:
    (project / "tagger.py").write_text(TOKENS)
    result = run("lint", "tagger.py:Tagger", "--input-shape", "4,12:int64", "--format", "json")
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)["reports"]
    assert report["sites"][0]["input_shape"] == [4, 16, 12]
    assert [f["code"] for f in report["findings"]] == ["NS102"]
    bad = CliRunner().invoke(main, ["lint", "tagger.py:Tagger", "--input-shape", "4,12:int7"])
    assert bad.exit_code == 2 and "Unknown input dtype 'int7'" in bad.output
