"""The README stays true: its rule table is the catalogue, its CLI synopses name every option the
CLI has, and `.ci/run` runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from normswap.cli import main
from normswap.rules import CATALOGUE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_rule_table_lists_every_rule_with_its_name_severity_and_fix() -> None:
    rows = re.findall(
        r"^\| `(NS\d{3})` \| ([\w-]+) \| (\w+) \| (\w+) \| (\w+) \|", _section("Rules"), flags=re.MULTILINE
    )
    assert rows, "the Rules section has no table rows"
    expected = [
        (rule.code, rule.name, rule.severity.value, rule.fix_safety.value, rule.source_fix.value) for rule in CATALOGUE
    ]
    assert rows == expected


@pytest.mark.parametrize("command", ["lint", "convert"])
def test_synopsis_names_every_option(command: str) -> None:
    synopsis = re.search(rf"```text\nnormswap {command} (.*?)```", README, flags=re.DOTALL)
    assert synopsis is not None, f"no `normswap {command}` synopsis in the README"
    options = [
        param.opts
        for param in main.commands[command].params
        if isinstance(param, click.Option) and "--help" not in param.opts
    ]
    assert options, f"`normswap {command}` has no options"
    named = [
        opts
        for opts in options
        if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", synopsis.group(1)) for name in opts)
    ]
    assert [opts[0] for opts in options if opts not in named] == []


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Two commands"))
    assert len(commands) == 2, "the README's two commands"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()


def test_ci_runs_the_readme_ecosystem_command_after_the_main_one() -> None:
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Testing"))
    assert len(commands) == 1 and "-m ecosystem" in commands[0], "the ecosystem tier's command"
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    main = re.findall(r"```bash\n(.*?)\n```", _section("Two commands"))[1]
    assert lines.index(commands[0]) > lines.index(main)
