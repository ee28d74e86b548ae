"""Hostile and broken inputs: one consistent output set, finite numbers, checked plans and config,
signals, locks and links. Every case exits 2 with one sentence and leaves the inputs as they were."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import normswap
from normswap.cli import main
from normswap.errors import OutputError, PlanError
from workspace import SHAPE, convert, state

# a conversion with calibration data (calib.pt, written by each test)
CALIBRATED = (
    "plain.pt",
    "--model",
    "nets:build",
    *SHAPE,
    "--out",
    "out",
    "--no-onnx",
    "--calibration-data",
    "calib.pt",
)


def _sentence(result) -> str:
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# --- one consistent output set ------------------------------------------------------------------


def test_force_replaces_an_earlier_run_as_a_set(work: Path) -> None:
    save_file(state(work), str(work / "w.safetensors"))
    assert convert("w.safetensors", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q").exit_code == 0
    (work / "out" / "notes.txt").write_text("mine")
    assert (
        convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q", "--force").exit_code
        == 0
    )
    names = sorted(p.name for p in (work / "out").iterdir())
    assert names == ["model.pt", "notes.txt", "plan.json", "report.json", "report.md"]  # no model.safetensors left over
    manifest = json.loads((work / "out" / "report.json").read_text())["reports"][0]["manifest"]
    assert sorted(manifest) == ["model.pt", "plan.json", "report.md"]
    import nets

    normswap.load_converted(nets.Net(), work / "out")


@pytest.mark.parametrize("tamper", ["stray-file", "changed-file", "missing-file", "no-manifest"])
def test_load_converted_refuses_a_directory_that_does_not_match_its_manifest(work: Path, tamper: str) -> None:
    import nets

    assert convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q").exit_code == 0
    out = work / "out"
    if tamper == "stray-file":
        save_file(state(work), str(out / "model.safetensors"))  # what an earlier run left behind
        message = "which its manifest does not list"
    elif tamper == "changed-file":
        weights = torch.load(out / "model.pt", weights_only=True)
        weights["bn.weight"] += 1
        torch.save(weights, out / "model.pt")
        message = "changed after the run"
    elif tamper == "missing-file":
        (out / "plan.json").unlink()
        message = "lacks 'plan.json'"
    else:
        (out / "report.json").unlink()
        message = "has no report.json"
    with pytest.raises(OutputError, match=message):
        normswap.load_converted(nets.Net(), out)


def test_a_second_run_into_a_locked_directory_is_refused(work: Path) -> None:
    import fcntl

    with (work / ".out.normswap.lock").open("a+") as held:  # what a running convert holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2
    assert "is being written by another normswap run (pid 4242)" in _sentence(result)
    assert not (work / "out").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_input_reached_through_a_link_in_the_output_directory_is_never_written(work: Path, link: str) -> None:
    (work / "out").mkdir()
    before = (work / "plain.pt").read_bytes()
    if link == "symlink":
        (work / "out" / "model.pt").symlink_to(work / "plain.pt")
    else:
        os.link(work / "plain.pt", work / "out" / "model.pt")
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--force")
    assert result.exit_code == 2 and "which is the input" in _sentence(result)
    assert (work / "plain.pt").read_bytes() == before


def test_out_given_as_a_dangling_symlink(work: Path) -> None:
    (work / "out").symlink_to(work / "nowhere")
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2 and "symbolic link" in _sentence(result) and "does not exist" in result.output


SLOW_EXPORT = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            if torch.onnx.is_in_onnx_export():
                time.sleep(30)  # long enough to be stopped mid-run, with the staging directory in place
            return self.bn(self.conv(x))
    """
)


def _default_signal_dispositions() -> None:
    """In the child, before it execs: the default disposition of the signals under test. A
    non-interactive shell starts a background job with SIGINT ignored, and children inherit an
    ignored signal (Python then installs no KeyboardInterrupt handler), so a test run in the
    background would otherwise see no SIGINT at all."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_mid_run_leaves_no_staging_and_no_output(tmp_path: Path, signum: int) -> None:
    (tmp_path / "slow.py").write_text(SLOW_EXPORT)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        slow = importlib.import_module("slow")
        torch.save(slow.Net().state_dict(), tmp_path / "ckpt.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow", None)
    command = [
        sys.executable,
        "-m",
        "normswap",
        "convert",
        "ckpt.pt",
        "--model",
        "slow.py:Net",
        "--input-shape",
        "2,3,8,8",
        "--out",
        "out",
    ]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signal_dispositions,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.normswap-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".out.normswap-*")), "the run never reached its staging directory"
    time.sleep(1.0)  # inside the export now
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert "stopped; nothing was written" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "slow.py"]  # no staging, no lock, no out


def test_two_links_to_one_directory_share_one_lock(work: Path) -> None:
    from normswap.outputs import output_set

    (work / "real").mkdir()
    (work / "lnkA").symlink_to(work / "real")
    (work / "lnkB").symlink_to(work / "real")
    with (
        pytest.raises(RuntimeError, match="the held run stops here"),
        output_set(work / "lnkA"),
    ):  # a run into lnkA holds the lock...
        result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "lnkB", "--no-onnx")
        raise RuntimeError("the held run stops here")
    assert result.exit_code == 2 and "is being written by another normswap run" in _sentence(
        result
    )  # ...which lnkB sees
    assert list((work / "real").iterdir()) == []


def test_a_directory_filled_after_the_first_check_is_refused_under_the_lock(work: Path) -> None:
    from normswap.outputs import output_set

    (work / "out").mkdir()
    (work / "out" / "theirs.txt").write_text("written by someone else meanwhile")
    with pytest.raises(OutputError, match="already has files; pass --force"), output_set(work / "out"):
        pass
    assert sorted(p.name for p in (work / "out").iterdir()) == ["theirs.txt"]


def test_a_killed_runs_staging_is_swept_by_the_next_run(work: Path) -> None:
    stale = work / ".out.normswap-abc123"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half")
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q")
    assert result.exit_code == 0 and not stale.exists() and (work / "out" / "report.json").is_file()


def test_outputs_have_the_mode_a_new_file_gets(work: Path) -> None:
    previous = os.umask(0o022)
    try:
        assert convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q").exit_code == 0
    finally:
        os.umask(previous)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (work / "out").iterdir()} == {oct(0o644)}


def test_a_model_that_prints_keeps_a_json_report_valid(work: Path) -> None:
    (work / "chatty.py").write_text("print('hello stdout')\nfrom nets import build\n")
    result = CliRunner().invoke(main, ["lint", "chatty.py:build", *SHAPE, "--format", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["reports"][0]["model"] == "chatty.py:build"
    assert "hello stdout" in result.stderr


def test_a_lint_report_written_through_a_symlink_replaces_the_target(work: Path) -> None:
    (work / "reports").mkdir()
    (work / "reports" / "lint.json").write_text("old")
    (work / "latest.json").symlink_to(work / "reports" / "lint.json")
    result = CliRunner().invoke(main, ["lint", "nets:build", *SHAPE, "--format", "json", "-o", "latest.json"])
    assert result.exit_code == 0 and (work / "latest.json").is_symlink()
    assert json.loads((work / "reports" / "lint.json").read_text())["schema_version"] == 1


@pytest.mark.slow  # a fresh interpreter imports torch
def test_signals_arriving_during_heavy_imports_are_held_until_after() -> None:
    """A fresh interpreter, as the `normswap` command starts: SIGINT while torch imports lands
    after the import, as a KeyboardInterrupt the CLI handles (not inside torch's import)."""
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from normswap._entry import signals_held
        assert "torch" not in sys.modules  # `import normswap` is cheap: the engine loads on use
        try:
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                import torch  # noqa: F401
                print("imported", flush=True)
        except KeyboardInterrupt:
            print("interrupted after", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_default_signal_dispositions,
    )
    assert result.stdout.splitlines() == ["imported", "interrupted after"], result.stderr


@pytest.mark.slow  # a fresh interpreter imports torch
def test_a_trusted_pickled_module_of_a_model_file_loads(work: Path) -> None:
    (work / "files").mkdir()
    (work / "files" / "tinynet.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 8, 3)\n        self.bn = torch.nn.BatchNorm2d(8)\n"
        "    def forward(self, x):\n        return self.bn(self.conv(x))\n"
    )
    script = "import sys, torch; sys.path.insert(0, 'files'); import tinynet; torch.save(tinynet.Net(), 'whole.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True)
    result = convert(
        "whole.pt", "--model", "files/tinynet.py:Net", *SHAPE, "--out", "out", "--no-onnx", "--trust-checkpoint", "-q"
    )
    assert result.exit_code == 0, result.output


# --- finite numbers -----------------------------------------------------------------------------


def test_a_checkpoint_with_nan_weights_is_refused(work: Path) -> None:
    weights = state(work)
    weights["bn.running_var"][2] = float("nan")
    torch.save(weights, work / "nan.pt")
    result = convert("nan.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2 and "NaN or infinite values in bn.running_var" in _sentence(result)
    assert not (work / "out").exists()


def test_integer_weights_for_float_parameters_are_refused(work: Path) -> None:
    weights = state(work)
    weights["conv.weight"] = weights["conv.weight"].round().long()
    torch.save(weights, work / "ints.pt")
    result = convert("ints.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2 and "conv.weight (torch.int64 for a torch.float32 parameter)" in _sentence(result)


@pytest.mark.parametrize(
    "heal_args,message",
    [
        (["--heal-lr", "-1e-3"], "Invalid value for '--heal-lr': -0.001 is not in the range x>0."),
        (["--heal-lr", "nan"], "Invalid value for '--heal-lr': 'nan' is not a finite number."),
        (["--heal-lr", "1e30", "--heal-steps", "30"], "Healing diverged"),
    ],
    ids=["negative-lr", "nan-lr", "diverging"],
)
def test_healing_that_cannot_work_is_refused(work: Path, heal_args: list[str], message: str) -> None:
    torch.save(torch.randn(64, 3, 8, 8), work / "calib.pt")
    result = convert(*CALIBRATED, *heal_args)
    assert (
        result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    )  # click's usage error, or one sentence
    assert not (work / "out").exists()


def test_calibration_on_data_of_extreme_scale_is_refused(work: Path) -> None:
    torch.save(torch.randn(64, 3, 8, 8) * 1e38, work / "calib.pt")
    result = convert(
        "plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--calibration-data", "calib.pt"
    )
    assert result.exit_code == 2, result.output
    assert "non-finite" in _sentence(result) or "NaN or infinite" in result.output
    assert not (work / "out").exists()


def test_non_finite_weights_are_never_written(work: Path, monkeypatch) -> None:
    import sys

    conversion_module = sys.modules["normswap.conversion"]
    real = conversion_module.calibrate_and_heal

    def poisoned(converted, *args, **kwargs):  # whatever step goes wrong, the writer is the last line
        outcome = real(converted, *args, **kwargs)
        with torch.no_grad():
            converted.bn.bias[0] = float("inf")
        return outcome

    monkeypatch.setattr(conversion_module, "calibrate_and_heal", poisoned)
    torch.save(torch.randn(64, 3, 8, 8), work / "calib.pt")
    result = convert(
        "plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--calibration-data", "calib.pt"
    )
    assert result.exit_code == 2 and "layer 'bn' (bn.bias) hold NaN or infinite values" in _sentence(result)
    assert not (work / "out").exists()


# --- checked plans and config -------------------------------------------------------------------

GOOD = {"num_groups": 2, "num_channels": 8, "eps": 1e-5, "affine": True}
PLANS = [
    ({**GOOD, "num_groups": 0}, "'num_groups' must be positive"),
    ({**GOOD, "num_groups": 3}, "num_groups 3 does not divide num_channels 8"),
    ({k: v for k, v in GOOD.items() if k != "eps"}, "lacks the parameter 'eps'"),
    ({**GOOD, "eps": "1e-5"}, "'eps' must be a number"),
    ({**GOOD, "eps": -1e-5}, "'eps' must be positive"),
    ({**GOOD, "affine": "yes"}, "'affine' must be true or false"),
    ({**GOOD, "num_channels": 16}, "expects 16 channels but the model's layer has 8"),
    ({**GOOD, "num_groups": 2.5}, "'num_groups' must be an integer"),
]


@pytest.mark.parametrize(
    "params,message",
    PLANS,
    ids=[
        "zero-groups",
        "indivisible",
        "missing",
        "eps-string",
        "eps-negative",
        "affine-string",
        "channels",
        "fraction",
    ],
)
def test_plan_values_are_checked_before_the_model_is_touched(work: Path, params: dict, message: str) -> None:
    plan = {"version": 1, "sites": [{"name": "bn", "target": "groupnorm", "params": params}]}
    (work / "plan.json").write_text(json.dumps(plan))
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--plan", "plan.json")
    assert result.exit_code == 2 and message in _sentence(result) and "'bn'" in result.output
    assert not (work / "out").exists()
    import nets

    if "channels" not in message:  # the parameters alone are wrong: Plan.from_json refuses them
        with pytest.raises(PlanError, match="bn"):
            normswap.Plan.from_json(json.dumps(plan))
    else:  # they fit some model, not this one: apply_plan refuses before touching it
        model = nets.Net()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(PlanError, match=message):
            normswap.apply_plan(model, normswap.Plan.from_json(json.dumps(plan)), inplace=True)
        assert type(model.bn).__name__ == "BatchNorm2d" and all(
            torch.equal(before[k], v) for k, v in model.state_dict().items()
        )


@pytest.mark.parametrize(
    "toml,message",
    [
        ('differential_privacy = "false"', "'differential_privacy' in [tool.normswap]"),
        ("batch_size = true", "'batch_size' in [tool.normswap]"),
        ("world_size = 2.5", "'world_size' in [tool.normswap]"),
        ('dp = "yes"', "'dp' in [tool.normswap]"),
    ],
    ids=["dp-string", "batch-size-bool", "world-size-float", "alias-string"],
)
def test_config_types_are_strict(work: Path, toml: str, message: str) -> None:
    (work / "pyproject.toml").write_text(f"[tool.normswap]\n{toml}\n")
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2 and message in _sentence(result)


# --- resources, trust and environment -----------------------------------------------------------


def test_an_input_shape_larger_than_memory_is_refused_before_allocating(work: Path) -> None:
    result = convert(
        "plain.pt", "--model", "nets:build", "--input-shape", "100000,3,224,224", "--out", "out", "--no-onnx"
    )
    assert result.exit_code == 2 and "need 60.2 GB" in _sentence(result) and "smaller batch" in result.output


def test_trusting_a_checkpoint_is_said_on_stderr_and_in_the_report(work: Path) -> None:
    import nets

    torch.save(nets.Net(), work / "whole.pt")
    result = convert(
        "whole.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q", "--trust-checkpoint"
    )
    assert result.exit_code == 0, result.output
    assert "warning: --trust-checkpoint" in result.output  # CliRunner mixes stderr in
    notes = json.loads((work / "out" / "report.json").read_text())["reports"][0]["notes"]
    assert any("--trust-checkpoint" in note for note in notes)


def test_world_size_without_a_launcher(work: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    torch.save(torch.randn(64, 3, 8, 8), work / "calib.pt")
    result = convert(*CALIBRATED, "--heal")
    assert result.exit_code == 2 and "WORLD_SIZE=4 is set but no launcher started this process" in _sentence(result)


@pytest.mark.parametrize("name", ["calib.txt", "calib.csv"])
def test_calibration_data_in_an_unknown_format_names_the_accepted_ones(work: Path, name: str) -> None:
    (work / name).write_text("1,2,3\n4,5,6\n")
    result = convert(
        "plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--calibration-data", name
    )
    assert result.exit_code == 2 and ".pt / .pth" in _sentence(result) and ".npy, .npz or .safetensors" in result.output


def test_npy_calibration_data_is_read(work: Path) -> None:
    import numpy as np

    np.save(work / "calib.npy", torch.randn(64, 3, 8, 8).numpy())
    result = convert(
        "plain.pt",
        "--model",
        "nets:build",
        *SHAPE,
        "--out",
        "out",
        "--no-onnx",
        "-q",
        "--calibration-data",
        "calib.npy",
    )
    assert result.exit_code == 0, result.output
