"""Each CLI option does what its help says: a test per option that fails if the option stops
having its effect (the common ones are exercised throughout; these are the rest)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from normswap._version import __version__
from normswap.cli import main
from workspace import SHAPE

CONVERT = ["convert", "plain.pt", "--model", "nets:build", *SHAPE, "--out", "out"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def report(work: Path) -> dict:
    return json.loads((work / "out" / "report.json").read_text())["reports"][0]


def lint_json(*args: str) -> dict:
    result = run("lint", *args, "--format", "json")
    return json.loads(result.stdout)["reports"][0]


def codes(document: dict) -> set[str]:
    return {f["code"] for f in document["findings"]}


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"normswap, version {__version__}\n"


def test_lint_context_flags_change_the_findings(work: Path) -> None:
    assert codes(lint_json("nets:build", *SHAPE)) == set()
    assert codes(lint_json("nets:build", *SHAPE, "--inference")) == {"NS301"}
    assert codes(lint_json("nets:build", *SHAPE, "--finetune", "--batch-size", "2")) == {"NS103", "NS302"}
    assert codes(lint_json("nets:build", *SHAPE, "--dp")) == {"NS106"}
    assert codes(lint_json("nets:build", *SHAPE, "--world-size", "4")) == {"NS105"}
    inference = lint_json("nets:build", *SHAPE, "--inference")
    assert inference["context"]["inference_only"] is True and inference["recommended"]["auto"] == {"fold": 1}


SEQUENCE_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.conv(x))
"""


def test_sequence_says_padded_steps_change_the_statistics(work: Path) -> None:
    (work / "seq.py").write_text(textwrap.dedent(SEQUENCE_NET))
    args = ["seq:Net", "--input-shape", "2,4,10"]
    plain = next(f for f in lint_json(*args)["findings"] if f["code"] == "NS102")
    sequence = next(f for f in lint_json(*args, "--sequence")["findings"] if f["code"] == "NS102")
    assert (
        "padded steps" not in plain["message"]
        and "padded steps of shorter sequences change the statistics" in sequence["message"]
    )


def test_fail_on_info_fails_on_an_info_finding(work: Path) -> None:
    assert run("lint", "nets:build", *SHAPE, "--inference").exit_code == 0  # NS301 is info: below the default (error)
    assert run("lint", "nets:build", *SHAPE, "--inference", "--fail-on", "info").exit_code == 1
    assert run("lint", "nets:build", *SHAPE, "--inference", "--fail-on", "warning").exit_code == 0


TWO_INPUTS = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Linear(5, 8)

    def forward(self, x, extra):
        return self.bn(self.image(x)).mean((2, 3)) + self.side(extra)
"""


def test_repeated_input_shape_gives_one_input_each(work: Path) -> None:
    (work / "two.py").write_text(textwrap.dedent(TWO_INPUTS))
    document = lint_json("two:Net", "--input-shape", "2,3,8,8", "--input-shape", "2,5", "--batch-size", "2")
    assert document["sites"][0]["input_shape"] == [2, 8, 8, 8] and "NS103" in codes(document)
    one = run("lint", "two:Net", "--input-shape", "2,3,8,8")
    assert one.exit_code == 2 and "does not take the 1 example input(s)" in one.stderr


def test_no_validate_exports_without_checking(work: Path) -> None:
    result = run(*CONVERT, "--no-validate", "-q")
    assert result.exit_code == 0
    assert (work / "out" / "model.onnx").is_file() and report(work)["validation"] is None


def test_no_onnx_writes_no_onnx(work: Path) -> None:
    assert run(*CONVERT, "--no-onnx", "-q").exit_code == 0
    assert not (work / "out" / "model.onnx").exists() and report(work)["validation"] is None


@pytest.mark.parametrize("target", ["frozen", "syncbn", "fold", "layernorm", "groupnorm"])
def test_to_chooses_the_target_from_the_cli(work: Path, target: str) -> None:
    assert run(*CONVERT, "--no-onnx", "--to", target, "-q").exit_code == 0
    (entry,) = json.loads((work / "out" / "plan.json").read_text())["sites"]
    assert entry["target"] == target


def test_channels_per_group_and_groups_shape_the_grouping(work: Path) -> None:
    # 8 channels: the default 16 channels per group leaves one group; 2 per group gives 4; --groups 2 caps it
    assert run(*CONVERT, "--no-onnx", "--to", "groupnorm", "-q").exit_code == 0
    assert json.loads((work / "out" / "plan.json").read_text())["sites"][0]["params"]["num_groups"] == 1
    assert run(*CONVERT, "--no-onnx", "--to", "groupnorm", "--channels-per-group", "2", "--force", "-q").exit_code == 0
    assert json.loads((work / "out" / "plan.json").read_text())["sites"][0]["params"]["num_groups"] == 4
    assert (
        run(
            *CONVERT, "--no-onnx", "--to", "groupnorm", "--channels-per-group", "2", "--groups", "2", "--force", "-q"
        ).exit_code
        == 0
    )
    assert json.loads((work / "out" / "plan.json").read_text())["sites"][0]["params"]["num_groups"] == 2


def test_convert_context_flags_reach_the_report_and_the_plan(work: Path) -> None:
    assert run(*CONVERT, "--no-onnx", "--batch-size", "2", "--world-size", "8", "--dp", "-q").exit_code == 0
    document = report(work)
    assert (
        document["context"]["batch_size"],
        document["context"]["world_size"],
        document["context"]["differential_privacy"],
    ) == (2, 8, True)
    assert {"NS103", "NS105", "NS106"} <= codes(document)
    assert document["plan"]["sites"][0]["reason"].startswith("NS106")  # the most severe finding decides


@pytest.mark.slow
def test_opset_21_is_written_into_the_file(work: Path) -> None:
    assert run(*CONVERT, "--to", "groupnorm", "--opset", "21", "-q").exit_code == 0
    model = onnx.load(str(work / "out" / "model.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert "GroupNormalization" in {n.op_type for n in model.graph.node}


def _calibration(work: Path) -> None:
    torch.save(torch.randn(64, 3, 8, 8) * 1.5 + 0.3, work / "calib.pt")


def test_attribution_samples_zero_measures_nothing(work: Path) -> None:
    _calibration(work)
    base = [*CONVERT, "--no-onnx", "--to", "groupnorm", "--calibration-data", "calib.pt", "-q"]
    assert run(*base, "--attribution-samples", "16").exit_code == 0
    measured = report(work)["attribution"]
    assert [c["site"] for c in measured] == ["bn"] and measured[0]["swap"]["samples"] == 16
    assert run(*base, "--attribution-samples", "0", "--force").exit_code == 0
    assert report(work)["attribution"] == []


@pytest.mark.parametrize("params,loss", [("norm", "kl"), ("all", "mse")])
def test_heal_options_reach_healing(work: Path, params: str, loss: str) -> None:
    """(What each choice trains is measured in tests/test_calibrate.py.)"""
    _calibration(work)
    args = [
        *CONVERT,
        "--no-onnx",
        "--to",
        "groupnorm",
        "--calibration-data",
        "calib.pt",
        "--heal-steps",
        "20",
        "--heal-lr",
        "1e-2",
    ]
    assert run(*args, "--heal-params", params, "--heal-loss", loss, "-q").exit_code == 0
    healing = report(work)["healing"]
    chosen = healing["options"]
    assert (chosen["params"], chosen["loss"], chosen["lr"], chosen["steps"]) == (params, loss, 1e-2, 20)
    assert 1 <= healing["steps"] <= 20 and "healed" in report(work)["drift"]


def test_heal_lr_reaches_healing(work: Path) -> None:
    _calibration(work)
    args = [*CONVERT, "--no-onnx", "--to", "groupnorm", "--calibration-data", "calib.pt", "--heal-steps", "30"]
    assert run(*args, "--heal-lr", "1e30").exit_code == 2  # this learning rate diverges: refused
    assert run(*args, "--heal-lr", "1e-3", "-q").exit_code == 0


def test_calibration_batch_size_sets_the_batches(work: Path) -> None:
    _calibration(work)
    args = [
        *CONVERT,
        "--no-onnx",
        "--to",
        "groupnorm",
        "--calibration-data",
        "calib.pt",
        "--attribution-samples",
        "0",
        "-q",
    ]
    held_out = 64 // 5  # a fifth of the 64 images is held out to measure drift; the rest calibrates
    assert run(*args, "--calibration-batch-size", "64").exit_code == 0
    assert report(work)["calibration"][0]["samples"] == (64 - held_out) * 8 * 8  # 8x8 values per channel
    assert report(work)["drift"]["swap"]["samples"] == held_out
    assert run(*args, "--calibration-batch-size", "7", "--force").exit_code == 0
    assert report(work)["calibration"][0]["samples"] == (64 - held_out) * 8 * 8  # every sample, whatever the batching


def test_calibration_memory_bounds_the_held_batches(work: Path) -> None:
    _calibration(work)
    args = [
        *CONVERT,
        "--no-onnx",
        "--to",
        "groupnorm",
        "--calibration-data",
        "calib.pt",
        "--calibration-batch-size",
        "16",
        "-q",
    ]
    assert run(*args).exit_code == 0
    roomy = report(work)
    assert not any("run again from the input" in note for note in roomy["notes"])
    assert (
        run(*args, "--calibration-memory", "1e-9", "--force").exit_code == 0
    )  # about one byte: one batch held at a time
    tight = report(work)
    assert any("3 of 4 batches were run again from the input" in note for note in tight["notes"])
    assert tight["calibration"] == roomy["calibration"]  # the same fits
    assert run(*args, "--calibration-memory", "0", "--force").exit_code == 2


def test_quiet_prints_nothing_and_device_cpu_runs_on_the_cpu(work: Path) -> None:
    result = run(*CONVERT, "--no-onnx", "--device", "cpu", "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    loud = run(*CONVERT, "--no-onnx", "--force")
    assert "wrote weights: out/model.pt" in loud.stdout
