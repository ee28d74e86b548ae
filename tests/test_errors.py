"""Every input error a user can reach, as a table: the command (or API call), the exit code, and
the one sentence that names what is wrong and where. Nothing is written when a run is refused."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap.cli import main
from normswap.errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    NormswapError,
    OutputError,
    PlanError,
    ValidationError,
)
from workspace import SHAPE, state

Setup = Callable[[Path], None]


def _write(name: str, text: str) -> Setup:
    def setup(work: Path) -> None:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    return setup


def _pyproject(section: str) -> Setup:
    return _write("pyproject.toml", section)


def _plan(sites: list | dict, version: object = 1) -> Setup:
    def setup(work: Path) -> None:
        body = sites if isinstance(sites, dict) else {"version": version, "sites": sites}
        (work / "p.json").write_text(json.dumps(body))

    return setup


def _torch_save(name: str, make: Callable[[Path], object]) -> Setup:
    def setup(work: Path) -> None:
        torch.save(make(work), work / name)

    return setup


def _state_with(change: Callable[[dict], None]) -> Callable[[Path], object]:
    def make(work: Path) -> dict:
        weights = state(work)
        change(weights)
        return weights

    return make


def _raw(name: str, data: bytes) -> Setup:
    def setup(work: Path) -> None:
        (work / name).write_bytes(data)

    return setup


def _fifo(name: str) -> Setup:
    def setup(work: Path) -> None:
        os.mkfifo(work / name)

    return setup


def _npz(work: Path) -> None:
    np.savez(work / "two.npz", a=np.zeros((4, 3, 8, 8), np.float32), b=np.zeros((4, 3, 8, 8), np.float32))


def _calibration(work: Path) -> None:
    torch.save(torch.randn(32, 3, 8, 8), work / "calib.pt")


def _complete_output(work: Path) -> None:
    """A finished `normswap convert` output directory in work/done."""
    result = CliRunner().invoke(
        main, ["convert", "plain.pt", "--model", "nets:build", *SHAPE, "--out", "done", "--no-onnx", "-q"]
    )
    assert result.exit_code == 0, result.output


def _both(*setups: Setup) -> Setup:
    def setup(work: Path) -> None:
        for step in setups:
            step(work)

    return setup


FOLD_PLAN = [{"name": "bn", "target": "fold", "params": {"into": "fc", "num_features": 8, "eps": 1e-5}}]
GN = {"num_groups": 2, "num_channels": 8, "eps": 1e-5, "affine": True}
CONVERT = ["convert", "plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx"]
LINT = ["lint", "nets:build", *SHAPE]

CLI_CASES: list[tuple[str, Setup | None, list[str], str]] = [
    # [tool.normswap]
    ("toml-invalid", _pyproject("[tool.normswap\n"), ["lint"], "is not valid TOML"),
    ("toml-tool-not-table", _pyproject("tool = 5\n"), ["lint"], "'tool' in"),
    ("toml-section-not-table", _pyproject("[tool]\nnormswap = 5\n"), ["lint"], "[tool.normswap] in"),
    ("toml-unknown-key", _pyproject("[tool.normswap]\nbatch_sise = 2\n"), ["lint"], "Unknown key 'batch_sise'"),
    ("toml-select-string", _pyproject("[tool.normswap]\nselect = 'NS1'\n"), ["lint"], "'select' in [tool.normswap]"),
    ("toml-fail-on-number", _pyproject("[tool.normswap]\nfail_on = 3\n"), ["lint"], "'fail_on' in [tool.normswap]"),
    (
        "toml-fail-on-unknown",
        _pyproject("[tool.normswap]\nfail_on = 'sometimes'\nmodels = [{model='nets:build', input_shape='2,3,8,8'}]\n"),
        ["lint"],
        "--fail-on must be one of",
    ),
    ("toml-format-unknown", _pyproject("[tool.normswap]\nformat = 'xml'\n"), LINT, "Unknown format 'xml'"),
    (
        "toml-models-string",
        _pyproject("[tool.normswap]\nmodels = 'nets:build'\n"),
        ["lint"],
        "'models' in [tool.normswap]",
    ),
    (
        "toml-model-number",
        _pyproject("[tool.normswap]\ninput_shape = '2,3,8,8'\nmodels = [5]\n"),
        ["lint"],
        "must be a table with a 'model' string",
    ),
    ("toml-model-no-shape", _pyproject("[tool.normswap]\nmodels = ['nets:build']\n"), ["lint"], "needs an input shape"),
    (
        "toml-table-no-shape",
        _pyproject("[tool.normswap]\nmodels = [{model = 'nets:build'}]\n"),
        ["lint"],
        "has no input_shape",
    ),
    (
        "toml-model-unknown-key",
        _pyproject("[tool.normswap]\nmodels = [{model = 'nets:build', shape = '2'}]\n"),
        ["lint"],
        "Unknown key 'shape' in model",
    ),
    (
        "toml-input-shape-number",
        _pyproject("[tool.normswap]\ninput_shape = 5\nmodels = ['nets:build']\n"),
        ["lint"],
        "'input_shape' in [tool.normswap]",
    ),
    (
        "toml-input-shapes-string",
        _pyproject("[tool.normswap]\nmodels = [{model = 'nets:build', input_shapes = '2,3,8,8'}]\n"),
        ["lint"],
        "must be a list of shapes",
    ),
    (
        "toml-kwargs-number",
        _pyproject("[tool.normswap]\nmodels = [{model = 'nets:build', input_shape = '2,3,8,8', kwargs = 5}]\n"),
        ["lint"],
        "'kwargs' of model 'nets:build'",
    ),
    (
        "toml-batch-size-zero",
        _pyproject("[tool.normswap]\nbatch_size = 0\n"),
        LINT,
        "batch_size must be a positive integer, got 0",
    ),
    (
        "toml-world-size-bool",
        _pyproject("[tool.normswap]\nworld_size = true\n"),
        LINT,
        "world_size must be a positive integer, got True",
    ),
    (
        "toml-dp-string",
        _pyproject("[tool.normswap]\ndp = 'false'\n"),
        LINT,
        "differential_privacy must be true or false, got 'false'",
    ),
    (
        "toml-threshold",
        _pyproject("[tool.normswap]\nsmall_batch_threshold = 1\n"),
        LINT,
        "small_batch_threshold must be an integer of at least 2",
    ),
    (
        "no-models",
        _pyproject("[tool.normswap]\nbatch_size = 2\n"),
        ["lint"],
        "No MODEL given and no 'models' in [tool.normswap]",
    ),
    # command line
    ("no-input-shape", None, ["lint", "nets:build"], "--input-shape is required"),
    ("bad-input-shape", None, ["lint", "nets:build", "--input-shape", "2,x"], "Input shape '2,x' is malformed"),
    ("bad-dtype", None, ["lint", "nets:build", "--input-shape", "2,3,8,8:int3"], "Unknown input dtype 'int3'"),
    ("bad-kwarg", None, [*LINT, "-k", "width"], "-k expects KEY=VALUE"),
    ("huge-input", None, ["lint", "nets:build", "--input-shape", "400000,3,224,224"], "GB of memory available"),
    ("unknown-rule", None, [*LINT, "--select", "NS999"], "Unknown rule code 'NS999'"),
    ("unknown-rule-explain", None, ["explain", "NS999"], "Unknown rule 'NS999'"),
    (
        "plan-two-models",
        _pyproject("[tool.normswap]\ninput_shape = '2,3,8,8'\nmodels = ['nets:build', 'nets:build']\n"),
        ["lint", "--plan", "pyproject.toml"],
        "--plan fits one model; 2 are being linted",
    ),
    ("lint-output-is-model", None, [*LINT, "-o", "nets.py"], "--output 'nets.py' is"),
    (
        "lint-output-is-config",
        _pyproject("[tool.normswap]\ninput_shape = '2,3,8,8'\nmodels = ['nets:build']\n"),
        ["lint", "-o", "pyproject.toml"],
        "--output 'pyproject.toml' is",
    ),
    ("lint-output-parent", None, [*LINT, "-o", "no/such/r.json"], "does not exist"),
    ("heal-without-data", None, [*CONVERT, "--heal"], "Healing needs unlabeled inputs: pass --calibration-data"),
    (
        "batch-inputs-text",
        None,
        [*CONVERT, "--batch-inputs", "a"],
        "--batch-inputs expects comma-separated input indices",
    ),
    (
        "batch-inputs-range",
        None,
        [*CONVERT, "--batch-inputs", "3"],
        "names no input: there are 1 --input-shape input(s)",
    ),
    (
        "opset-too-new",
        None,
        [*CONVERT[:-1], "--opset", "99"],
        "Opset 99 is outside what this installation exports and checks",
    ),
    (
        "keep-unknown",
        None,
        [*CONVERT, "--keep", "nope"],
        "--keep names 'nope', which is not a BatchNorm site of this model",
    ),
    (
        "to-unknown-plan-target",
        _plan([{"name": "bn", "target": "instancenorm"}]),
        [*CONVERT, "--plan", "p.json"],
        "has unknown target 'instancenorm'",
    ),
    # the model
    ("spec-without-colon", None, ["lint", "nets.build", *SHAPE], "must be 'package.module:callable'"),
    ("model-file-missing", None, ["lint", "missing.py:Net", *SHAPE], "Model file 'missing.py' does not exist"),
    ("module-missing", None, ["lint", "nosuch.module:build", *SHAPE], "Module 'nosuch.module' not found"),
    (
        "file-syntax-error",
        _write("broken.py", "def f(:\n"),
        ["lint", "broken.py:f", *SHAPE],
        "Importing 'broken.py' failed: SyntaxError",
    ),
    (
        "package-module-as-path",
        lambda work: [
            _write(name, text)(work)
            for name, text in (("pkg/__init__.py", ""), ("pkg/mod.py", "from .parts import Net\n"))
        ],
        ["lint", "pkg/mod.py:Net", *SHAPE],
        "attempted relative import with no known parent package; 'pkg/mod.py' is a module of the package 'pkg': name it by its dotted form, 'pkg.mod:Net'.",
    ),
    (
        "module-raises",
        _write("raises.py", "raise RuntimeError('no GPU here')\n"),
        ["lint", "raises:build", *SHAPE],
        "Importing module 'raises' failed: RuntimeError: no GPU here",
    ),
    ("attribute-missing", None, ["lint", "nets:nothing", *SHAPE], "has no attribute 'nothing'"),
    (
        "not-callable",
        _write("consts.py", "WIDTH = 8\n"),
        ["lint", "consts:WIDTH", *SHAPE],
        "is a int, not a callable that builds a model",
    ),
    (
        "factory-raises",
        _write("fails.py", "def build():\n    raise ValueError('width must be even')\n"),
        ["lint", "fails:build", *SHAPE],
        "Calling 'fails:build' with {} failed: ValueError: width must be even",
    ),
    ("factory-not-module", None, ["lint", "nets:returns_string", *SHAPE], "returned a str, not a torch.nn.Module"),
    (
        "exits-at-import",
        _write("exiter.py", "import sys\nsys.exit(0)\n"),
        ["lint", "exiter.py:Net", *SHAPE],
        "it called sys.exit(0), which a model module must not do",
    ),
    (
        "exits-in-factory",
        _write("exiter2.py", "import sys\ndef build():\n    sys.exit('bye')\n"),
        ["lint", "exiter2:build", *SHAPE],
        "it called sys.exit('bye')",
    ),
    (
        "exits-in-forward",
        _write(
            "exiter3.py",
            "import sys, torch\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        sys.exit(0)\n",
        ),
        ["lint", "exiter3:Net", *SHAPE],
        "the model's code called sys.exit(0) while normswap imported, built or ran it",
    ),
    (
        "wrong-arity",
        None,
        ["lint", "nets:build", *SHAPE, "--input-shape", "2,3"],
        "Net.forward does not take the 2 example input(s)",
    ),
    (
        "cannot-run",
        None,
        ["lint", "nets:build", "--input-shape", "2,5,8,8"],
        "cannot run on example inputs of shape (2, 5, 8, 8)",
    ),
    # checkpoints
    (
        "checkpoint-dir",
        _write("ckpt/x.txt", "x"),
        ["convert", "ckpt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "is a directory; give the weights file inside it",
    ),
    (
        "checkpoint-fifo",
        _fifo("pipe.pt"),
        ["convert", "pipe.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "is not a regular file (a pipe or device?)",
    ),
    (
        "checkpoint-random-bytes",
        _raw("r.pt", os.urandom(64).replace(b"\x80", b"0").replace(b"PK", b"pk")),
        ["convert", "r.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
    ),
    (
        "checkpoint-is-safetensors",
        None,
        ["convert", "renamed.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "is a safetensors file with another suffix",
    ),
    (
        "checkpoint-unsafe-pickle-ops",
        _raw("plain_pickle.pt", pickle.dumps({"a": 1}, protocol=4)),
        ["convert", "plain_pickle.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "its pickle is not one torch.load reads safely",
    ),
    (
        "checkpoint-complex",
        _torch_save("c.pt", _state_with(lambda s: s.update({"conv.weight": s["conv.weight"].to(torch.complex64)}))),
        ["convert", "c.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "holds non-real or integer values",
    ),
    (
        "checkpoint-negative-var",
        _torch_save("v.pt", _state_with(lambda s: s["bn.running_var"].fill_(-1.0))),
        ["convert", "v.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "holds negative running variances in bn.running_var",
    ),
    (
        "checkpoint-nan",
        _torch_save("n.pt", _state_with(lambda s: s["fc.bias"].fill_(float("nan")))),
        ["convert", "n.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "holds NaN or infinite values in fc.bias",
    ),
    (
        "checkpoint-two-models",
        _torch_save("kd.pt", lambda w: {f"{m}.{k}": v for m in ("teacher", "model") for k, v in state(w).items()}),
        ["convert", "kd.pt", "--model", "nets:build", *SHAPE, "--out", "out"],
        "holds 2 models, under 'model.', 'teacher.', each with the keys of Net; choose one with --checkpoint-prefix",
    ),
    (
        "checkpoint-prefix-absent",
        _torch_save("kd2.pt", lambda w: {f"teacher.{k}": v for k, v in state(w).items()}),
        ["convert", "kd2.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--checkpoint-prefix", "model."],
        "holds no tensor under the prefix 'model.'; its keys start with teacher.",
    ),
    # plans
    ("plan-not-json", _write("p.json", "{"), [*CONVERT, "--plan", "p.json"], "p.json is not valid JSON (line 1"),
    (
        "plan-nested",
        _write("p.json", "[" * 100000 + "]" * 100000),
        [*CONVERT, "--plan", "p.json"],
        "is nested too deeply to be a normswap plan",
    ),
    (
        "plan-not-utf8",
        _raw("p.json", b'{"version": 1, "sites": [], "x": "\xe9"}'),
        [*CONVERT, "--plan", "p.json"],
        "is not UTF-8 text",
    ),
    (
        "plan-not-object",
        _plan({"sites": 3}),
        [*CONVERT, "--plan", "p.json"],
        "is not a normswap plan: expected an object with a 'sites' list",
    ),
    (
        "plan-version",
        _plan([], version=2),
        [*CONVERT, "--plan", "p.json"],
        "has plan version 2; this normswap reads version 1",
    ),
    ("plan-version-bool", _plan([], version=True), [*CONVERT, "--plan", "p.json"], "has plan version True"),
    (
        "plan-entry-no-name",
        _plan([{"target": "keep"}]),
        [*CONVERT, "--plan", "p.json"],
        "site #0 needs at least a 'name' and a 'target' string",
    ),
    (
        "plan-params-list",
        _plan([{"name": "bn", "target": "keep", "params": []}]),
        [*CONVERT, "--plan", "p.json"],
        "'params' of site 'bn' must be an object",
    ),
    (
        "plan-kind",
        _plan([{"name": "bn", "target": "keep", "kind": "magic"}]),
        [*CONVERT, "--plan", "p.json"],
        "has unknown kind 'magic'",
    ),
    (
        "plan-twice",
        _plan([{"name": "bn", "target": "keep"}, {"name": "bn", "target": "keep"}]),
        [*CONVERT, "--plan", "p.json"],
        "names site 'bn' twice",
    ),
    (
        "plan-unknown-param",
        _plan([{"name": "bn", "target": "groupnorm", "params": {**GN, "foo": 1}}]),
        [*CONVERT, "--plan", "p.json"],
        "has unknown parameter 'foo'",
    ),
    (
        "plan-missing-param",
        _plan([{"name": "bn", "target": "groupnorm", "params": {"num_groups": 2}}]),
        [*CONVERT, "--plan", "p.json"],
        "lacks the parameter 'num_channels'",
    ),
    (
        "plan-param-type",
        _plan([{"name": "bn", "target": "groupnorm", "params": {**GN, "num_groups": "2"}}]),
        [*CONVERT, "--plan", "p.json"],
        "'num_groups' must be a number",
    ),
    (
        "plan-param-huge",
        _write(
            "p.json",
            '{"version": 1, "sites": [{"name": "bn", "target": "groupnorm", "params": {"num_groups": 1'
            + "0" * 400
            + ', "num_channels": 8, "eps": 1e-5, "affine": true}}]}',
        ),
        [*CONVERT, "--plan", "p.json"],
        "'num_groups' is out of range",
    ),
    (
        "plan-groups-divide",
        _plan([{"name": "bn", "target": "groupnorm", "params": {**GN, "num_groups": 3}}]),
        [*CONVERT, "--plan", "p.json"],
        "num_groups 3 does not divide num_channels 8",
    ),
    (
        "plan-channels",
        _plan([{"name": "bn", "target": "groupnorm", "params": {**GN, "num_channels": 16, "num_groups": 4}}]),
        [*CONVERT, "--plan", "p.json"],
        "expects 16 channels but the model's layer has 8",
    ),
    (
        "plan-other-model",
        _plan([{"name": "bn9", "target": "keep"}]),
        [*CONVERT, "--plan", "p.json"],
        "The plan names 'bn9', which is not a BatchNorm site of this model (its sites: bn)",
    ),
    ("plan-incomplete", _plan([]), [*CONVERT, "--plan", "p.json"], "The plan says nothing about 'bn'"),
    (
        "plan-frozen-eps",
        _plan([{"name": "bn", "target": "frozen", "params": {"num_features": 8, "eps": 10.0, "affine": True}}]),
        [*CONVERT, "--plan", "p.json"],
        "has eps 10.0 but the layer's is 1e-05",
    ),
    (
        "plan-fold-into-wrong",
        _plan(FOLD_PLAN),
        [*CONVERT, "--plan", "p.json"],
        "folds into 'fc', but the layer follows 'conv'",
    ),
    # outputs
    ("out-dangling-link", lambda w: (w / "out").symlink_to(w / "gone"), CONVERT, "is a symbolic link to"),
    ("out-has-files", _write("out/notes.txt", "mine"), CONVERT, "already has files; pass --force"),
    (
        "out-slot-is-dir",
        _write("out/model.pt/x", "x"),
        [*CONVERT, "--force"],
        "has a directory (or other non-file) named 'model.pt'",
    ),
    (
        "out-foreign-file",
        _write("out/model.onnx", "mine"),
        [*CONVERT, "--force"],
        "is not from an earlier normswap run (no manifest lists it)",
    ),
    (
        "out-slot-is-input",
        lambda w: (w / "out").mkdir() or os.link(w / "plain.pt", w / "out" / "model.pt"),
        [*CONVERT, "--force"],
        "would replace 'model.pt', which is the input",
    ),
    # calibration data
    ("calib-missing", None, [*CONVERT, "--calibration-data", "nope.pt"], "Calibration data 'nope.pt' does not exist"),
    (
        "calib-dir",
        _write("calib/x.pt", "x"),
        [*CONVERT, "--calibration-data", "calib"],
        "is a folder with no images (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp); give a folder of images or a tensor file",
    ),
    (
        "calib-suffix",
        _write("calib.csv", "1,2"),
        [*CONVERT, "--calibration-data", "calib.csv"],
        "is not a tensor file normswap reads",
    ),
    (
        "calib-two-arrays",
        _npz,
        [*CONVERT, "--calibration-data", "two.npz"],
        "must hold exactly one tensor of inputs, found 2",
    ),
    (
        "calib-text",
        _write("calib.pt", "not a tensor"),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "could not be read as .pt (not a torch.save file, or a truncated one)",
    ),
    (
        "calib-objects",
        _torch_save("calib.pt", lambda w: argparse.Namespace(x=torch.zeros(2))),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "it holds Python objects (argparse.Namespace), which normswap does not load from data files",
    ),
    (
        "calib-complex",
        _torch_save("calib.pt", lambda w: torch.zeros(8, 3, 8, 8, dtype=torch.complex64)),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "holds complex64 values",
    ),
    (
        "calib-empty",
        _torch_save("calib.pt", lambda w: torch.zeros(0, 3, 8, 8)),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "is empty",
    ),
    (
        "calib-shape",
        _torch_save("calib.pt", lambda w: torch.zeros(8, 5, 8, 8)),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "of shape (8, 5, 8, 8) (per batch) does not fit the model",
    ),
    (
        "calib-nan",
        _torch_save("calib.pt", lambda w: torch.full((8, 3, 8, 8), float("nan"))),
        [*CONVERT, "--calibration-data", "calib.pt"],
        "holds NaN or infinite values; clean the data first",
    ),
    (
        "heal-nothing-to-heal",
        _calibration,
        [*CONVERT, "--to", "frozen", "--calibration-data", "calib.pt", "--heal-params", "norm"],
        "has no normalization",
    ),
    (
        "local-rank",
        _calibration,
        [*CONVERT, "--calibration-data", "calib.pt"],
        "LOCAL_RANK='abc' in the environment is not an integer",
    ),
]


@pytest.mark.parametrize("name,setup,args,message", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_input_errors(
    work: Path, monkeypatch: pytest.MonkeyPatch, name: str, setup: Setup | None, args: list[str], message: str
) -> None:
    if name == "checkpoint-is-safetensors":
        from safetensors.torch import save_file

        save_file(state(work), str(work / "renamed.pt"))
    if name == "local-rank":
        monkeypatch.setenv("LOCAL_RANK", "abc")
    if setup is not None:
        setup(work)
    before = sorted(p.name for p in work.iterdir())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normswap: error: "), result.output  # one sentence
    assert message in lines[0]
    assert "Traceback" not in result.output
    created = sorted({p.name for p in work.iterdir()} - set(before))
    assert created == [], f"a refused run left {created}"


def _converted(work: Path) -> Path:
    _complete_output(work)
    return work / "done"


def _model(work: Path):
    import importlib
    import sys

    sys.modules.pop("nets", None)
    return importlib.import_module("nets").build()


LOAD_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("no-manifest", lambda d: (d / "report.json").unlink(), "has no report.json"),
    ("manifest-garbled", lambda d: (d / "report.json").write_text("{}"), "has no manifest of the outputs"),
    (
        "manifest-foreign",
        lambda d: _edit_manifest(d, {"/etc/hostname": "0" * 64}),
        "lists '/etc/hostname', which is not a normswap output",
    ),
    ("file-missing", lambda d: (d / "plan.json").unlink(), "lacks 'plan.json', which its manifest lists"),
    ("file-changed", lambda d: (d / "plan.json").write_text("{}"), "is not the file its manifest (report.json) lists"),
    ("stray", lambda d: (d / "model.onnx").write_text("old"), "holds model.onnx, which its manifest does not list"),
]


def _edit_manifest(folder: Path, extra: dict) -> None:
    document = json.loads((folder / "report.json").read_text())
    document["reports"][0]["manifest"].update(extra)
    (folder / "report.json").write_text(json.dumps(document))


@pytest.mark.parametrize("name,damage,message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_converted_refuses_a_damaged_directory(
    work: Path, name: str, damage: Callable[[Path], None], message: str
) -> None:
    folder = _converted(work)
    damage(folder)
    with pytest.raises(OutputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        normswap.load_converted(_model(work), folder)


API_CASES: list = [
    (
        "convert-to-unknown",
        lambda: normswap.convert(_net(), _x(), to="instancenorm"),
        PlanError,
        "Unknown target 'instancenorm'",
    ),
    (
        "convert-plan-dict",
        lambda: normswap.convert(_net(), _x(), plan={"version": 1}),
        TypeError,
        "plan must be a Plan",
    ),
    (
        "convert-heal-dict",
        lambda: normswap.convert(_net(), _x(), heal={"steps": 3}),
        TypeError,
        "heal must be a HealOptions",
    ),
    (
        "convert-context-dict",
        lambda: normswap.convert(_net(), _x(), context={"batch_size": 2}),
        TypeError,
        "context must be a Context",
    ),
    (
        "lint-context-string",
        lambda: normswap.lint(_net(), _x(), context="small"),
        TypeError,
        "context must be a Context",
    ),
    ("lint-not-a-module", lambda: normswap.lint("resnet", _x()), TypeError, "needs a torch.nn.Module, got str"),
    (
        "export-not-a-module",
        lambda: normswap.export_onnx("m", _x(), "m.onnx"),
        TypeError,
        "export_onnx() needs a torch.nn.Module",
    ),
    (
        "calibrate-not-a-module",
        lambda: normswap.calibrate("m", _net(), [_x()]),
        TypeError,
        "calibrate() needs a torch.nn.Module",
    ),
    (
        "validate-not-a-module",
        lambda: normswap.validate_onnx("m", "m.onnx", _x()),
        TypeError,
        "validate_onnx() needs a torch.nn.Module",
    ),
    (
        "validate-missing-file",
        lambda: normswap.validate_onnx(_net(), "missing.onnx", _x()),
        ValidationError,
        "ONNX file 'missing.onnx' does not exist",
    ),
    (
        "context-batch-zero",
        lambda: normswap.Context(batch_size=0),
        ValueError,
        "batch_size must be a positive integer, got 0",
    ),
    (
        "plan-from-deep-json",
        lambda: normswap.Plan.from_json("[" * 100000 + "]" * 100000),
        PlanError,
        "nested too deeply",
    ),
    (
        "heal-steps-zero",
        lambda: normswap.HealOptions(steps=0),
        ValueError,
        "heal steps must be a positive integer, got 0",
    ),
    (
        "calibrate-empty",
        lambda: normswap.calibrate(_converted_net(), _net(), []),
        CalibrationError,
        "Calibration data is empty",
    ),
    (
        "calibrate-nothing",
        lambda: normswap.calibrate(_net(), _net(), [_x()]),
        CalibrationError,
        "no GroupNorm / LayerNorm sites to calibrate",
    ),
    pytest.param(
        "nan-output",
        lambda: _validate_nan(),
        ValidationError,
        "holds NaN or infinite values on the example inputs",
        marks=pytest.mark.slow,
    ),
    (
        "apply-plan-lazy",
        lambda: normswap.apply_plan(_lazy(), normswap.Plan([])),
        PlanError,
        "has lazy modules that were never run",
    ),
    (
        "lazy-cannot-run",
        lambda: normswap.convert(_lazy(), torch.randn(2, 5)),
        CaptureError,
        "cannot run on the example inputs to initialize its lazy modules",
    ),
    ("strict-refusal", lambda: normswap.convert(_by_hand(), _x()), PlanError, "computes its batch statistics by hand"),
]


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)).eval()


def _converted_net() -> torch.nn.Module:
    return normswap.convert(_net(), _x(), to="groupnorm").model


def _lazy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.BatchNorm1d(4), torch.nn.Linear(3, 2))


def _by_hand() -> torch.nn.Module:
    class ByHand(torch.nn.BatchNorm2d):  # detectron2's NaiveSyncBatchNorm way: statistics computed by hand
        def forward(self, x):
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            return (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)

    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), ByHand(8)).eval()


def _validate_nan() -> object:
    class NanNet(torch.nn.Module):
        def forward(self, x):
            return torch.log(x - 1e9)

    model = NanNet().eval()
    import tempfile

    folder = tempfile.mkdtemp()
    path = normswap.export_onnx(model, _x(), Path(folder) / "nan.onnx")
    return normswap.validate_onnx(model, path, _x())


@pytest.mark.parametrize(
    "name,call,error,message", API_CASES, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in API_CASES]
)
def test_api_errors(
    name: str,
    call: Callable[[], object],
    error: type[BaseException],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value)
    if issubclass(error, NormswapError):
        assert "\n" not in str(raised.value)


def test_config_errors_are_value_errors_too() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, NormswapError)
