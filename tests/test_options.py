"""Options are declared once (normswap/options.py): the CLI's click options, the `[tool.normswap]`
keys and the commands lint prints all come from the declarations, and round-trip through them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from normswap.calibration import HealOptions
from normswap.cli import main
from normswap.config import load_config
from normswap.context import Context
from normswap.conversion import ConvertOptions
from normswap.errors import ConfigError
from normswap.linter import LintOptions
from normswap.loader import ModelOptions
from normswap.options import command_line, config_keys, declared, given_on_command_line
from normswap.pipeline import JobOptions

COMMANDS = {
    "lint": (ModelOptions, Context, LintOptions),
    "convert": (ModelOptions, ConvertOptions, HealOptions, Context, JobOptions),
}
EXPLICIT = {"lint": set(), "convert": {"--model", "--out"}}  # arguments of the command itself, not options of an object


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_click_option_is_a_declared_option_and_back(command: str) -> None:
    flags = {
        opts[0] for param in main.commands[command].params if isinstance(param, click.Option) for opts in [param.opts]
    }
    declared_flags = {item.spec.flags[0] for cls in COMMANDS[command] for item in declared(cls) if item.spec.flags}
    assert flags - {"--debug", "--help", "-h"} == declared_flags | EXPLICIT[command]


@pytest.mark.parametrize(
    ("cls", "field", "expected_help"),
    [
        (ConvertOptions, "max_groups", "Largest GroupNorm group count."),
        (
            Context,
            "accumulation",
            "Gradient accumulation steps: the optimizer steps once every N micro-batches of --batch-size; BatchNorm still normalizes each micro-batch alone.",
        ),
    ],
)
def test_help_comes_from_the_declaration(cls: type, field: str, expected_help: str) -> None:
    item = next(item for item in declared(cls) if item.name == field)
    assert item.spec.help == expected_help
    command = "convert" if cls is ConvertOptions else "lint"
    option = next(p for p in main.commands[command].params if p.name == field)
    assert option.help == expected_help


def test_context_flags_round_trip_through_the_printed_command() -> None:
    context = Context(batch_size=2, world_size=8, differential_privacy=True, sequence=True)
    words = command_line(context, {"batch_size", "world_size", "differential_privacy", "sequence"})
    assert words == ["--batch-size 2", "--world-size 8", "--dp", "--sequence"]

    @click.command()
    @_options(Context)
    def parse(**values):
        given = {
            name for name in values if click.get_current_context().get_parameter_source(name).name == "COMMANDLINE"
        }
        return Context(**given_on_command_line(Context, values, given))

    parsed = parse.main(" ".join(words).split(), standalone_mode=False)
    assert parsed == context


def _options(cls: type):
    from normswap.cli.params import options_of

    return options_of(cls)


def test_convert_options_from_the_command_line_are_parsed_into_their_fields() -> None:
    @click.command()
    @_options(ConvertOptions)
    def parse(**values):
        given = {
            name for name in values if click.get_current_context().get_parameter_source(name).name == "COMMANDLINE"
        }
        return given_on_command_line(ConvertOptions, values, given)

    values = parse.main(
        ["--freeze-costly", "2.5", "--keep", "bn1", "--keep", "bn2", "--groups", "8"], standalone_mode=False
    )
    assert values == {"freeze_costly": 0.025, "keep": ("bn1", "bn2"), "max_groups": 8}  # PCT points -> a fraction


def test_every_configuration_key_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "batch_size": "2",
        "world_size": "4",
        "accumulation": "2",
        "differential_privacy": "true",
        "inference_only": "false",
        "finetune": "true",
        "sequence": "true",
        "federated": "true",
        "small_batch_threshold": "8",
        "format": '"json"',
        "fail_on": '"warning"',
        "select": '["NS1"]',
        "ignore": '["NS105"]',
    }
    assert set(values) == {
        item.spec.config_key for cls in (Context, LintOptions) for item in declared(cls) if item.spec.config_key
    }
    (tmp_path / "pyproject.toml").write_text("[tool.normswap]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    config = load_config(tmp_path)
    assert config.context == Context(
        batch_size=2,
        world_size=4,
        accumulation=2,
        differential_privacy=True,
        finetune=True,
        sequence=True,
        federated=True,
        small_batch_threshold=8,
    )
    options = config.make_lint_options({}, set())
    assert (options.output_format, options.fail_on, options.select, options.ignore) == (
        "json",
        "warning",
        ("NS1",),
        ("NS105",),
    )


def test_aliases_and_unknown_keys(tmp_path: Path) -> None:
    assert {"dp", "inference"} <= config_keys(Context)
    (tmp_path / "pyproject.toml").write_text("[tool.normswap]\ndp = true\ninference = true\n")
    assert load_config(tmp_path).context == Context(differential_privacy=True, inference_only=True)
    (tmp_path / "pyproject.toml").write_text("[tool.normswap]\nheal_steps = 5\n")
    with pytest.raises(ConfigError, match="Unknown key 'heal_steps'"):
        load_config(tmp_path)


def test_the_command_line_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.normswap]\nformat = 'json'\nbatch_size = 2\n")
    (tmp_path / "net.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            def build():
                return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    from_file = CliRunner().invoke(main, ["lint", "net.py:build", "--input-shape", "2,3,8,8"])
    assert from_file.stdout.startswith("{") and '"batch_size": 2' in from_file.stdout
    given = CliRunner().invoke(
        main, ["lint", "net.py:build", "--input-shape", "2,3,8,8", "--format", "concise", "--batch-size", "32"]
    )
    assert not given.stdout.startswith("{") and "NS103" not in given.stdout  # 32 per device is not a small batch
