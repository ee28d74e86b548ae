"""Gradient accumulation in the lint context (`--accumulate N`, `Context.accumulation`): BatchNorm
normalizes each micro-batch of `--batch-size`, so NS103 and NS104 judge the micro-batch and say
that the optimizer's larger batch does not reach BatchNorm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_rules import RULES, site

from normswap import Context
from normswap.cli import main
from normswap.config import load_config
from normswap.errors import ConfigError
from normswap.rules import Finding


def _message(code: str, context: Context, **overrides) -> str | None:
    result = RULES[code].check(site(**overrides), context)
    return result.message if isinstance(result, Finding) else None


@pytest.mark.parametrize(
    ("context", "fires"),
    [
        pytest.param(Context(batch_size=4, accumulation=8), True, id="micro-batch-4-optimizer-batch-32"),
        pytest.param(Context(batch_size=32, accumulation=8), False, id="micro-batch-32-is-not-small"),
        pytest.param(Context(batch_size=15, accumulation=2), True, id="just-below-the-threshold"),
        pytest.param(Context(batch_size=16, accumulation=100), False, id="the-threshold-itself"),
        pytest.param(Context(batch_size=2, accumulation=8, inference_only=True), False, id="inference-only"),
    ],
)
def test_small_batch_judges_the_micro_batch_not_the_optimizers_batch(context: Context, fires: bool) -> None:
    assert (_message("NS103", context) is not None) is fires


def test_the_small_batch_message_names_both_batches() -> None:
    message = _message("NS103", Context(batch_size=4, accumulation=8))
    assert message == (
        "'layer.bn' estimates its statistics from micro-batches of 4 sample(s) per device (threshold 16); "
        "gradient accumulation over 8 steps makes the optimizer's batch 32 per device, but not BatchNorm's, "
        "so they will be noisy."
    )
    # without accumulation the message is what it always was
    assert _message("NS103", Context(batch_size=4)) == (
        "'layer.bn' estimates its statistics from 4 sample(s) per device (threshold 16); they will be noisy."
    )


def test_batch_of_one_with_accumulation_still_raises_and_says_why() -> None:
    message = _message("NS104", Context(batch_size=1, accumulation=16), input_shape=(8, 64))
    assert message == (
        "'layer.bn' sees one value per channel at a micro-batch of 1 (input (8, 64)): training raises ValueError; "
        "gradient accumulation over 16 steps makes the optimizer's batch 16 per device, but not BatchNorm's."
    )
    assert _message("NS104", Context(batch_size=2, accumulation=16), input_shape=(8, 64)) is None  # two values: runs
    assert _message("NS104", Context(batch_size=1, accumulation=16)) is None  # 14x14 values per channel


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        pytest.param(0, "accumulation must be a positive integer, got 0", id="zero"),
        pytest.param(True, "accumulation must be a positive integer, got True", id="a-bool"),
        pytest.param(2.0, "accumulation must be a positive integer, got 2.0", id="a-float"),
    ],
)
def test_accumulation_is_a_positive_integer(value: object, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        Context(accumulation=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["accumulation", "accumulate"])
def test_accumulation_in_the_configuration(tmp_path: Path, key: str) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.normswap]\nbatch_size = 4\n{key} = 8\n")
    assert load_config(tmp_path).context == Context(batch_size=4, accumulation=8)
    (tmp_path / "pyproject.toml").write_text(f'[tool.normswap]\n{key} = "8"\n')
    with pytest.raises(ConfigError, match=f"'{key}' in .*accumulation must be a positive integer"):
        load_config(tmp_path)


NETS = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
"""


def test_accumulate_on_the_command_line_reaches_the_message_and_the_recommended_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    (tmp_path / "accnets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["lint", "accnets.py:build", "--input-shape", "2,3,8,8", "--batch-size", "4", "--accumulate", "8"]
    result = CliRunner().invoke(main, [*args, "--format", "json"], catch_exceptions=False)
    document = json.loads(result.output)
    assert document["reports"][0]["context"]["accumulation"] == 8
    [finding] = document["reports"][0]["findings"]
    assert finding["code"] == "NS103"
    assert "gradient accumulation over 8 steps makes the optimizer's batch 32 per device" in finding["message"]
    text = CliRunner().invoke(main, args, catch_exceptions=False).output
    assert "--batch-size 4 --accumulate 8 --out converted/" in text  # the command it recommends keeps the context
    refused = CliRunner().invoke(main, [*args[:-1], "0"])
    assert refused.exit_code == 2 and "--accumulate" in refused.output
