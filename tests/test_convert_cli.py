"""`normswap convert` on checkpoints: formats, outputs, round trip, safety, bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import normswap
from workspace import SHAPE, convert, state


class Marker:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize(
    "filename,wrap",
    [
        ("a.pt", lambda s: s),
        ("b.pth", lambda s: {"state_dict": s, "epoch": 3}),
        ("c.ckpt", lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "global_step": 10}),  # Lightning
        ("d.pt", lambda s: {f"module.{k}": v for k, v in s.items()}),  # DataParallel
        ("e.pt", lambda s: {"model": s, "optimizer": {}}),
        ("f.pt", lambda s: {"module": s}),
        ("g.pt", lambda s: {f"module._orig_mod.{k}": v for k, v in s.items()}),  # DDP over torch.compile
        ("h.pt", lambda s: {f"_orig_mod.module.{k}": v for k, v in s.items()}),  # torch.compile over DDP
        ("i.ckpt", lambda s: {"state_dict": {f"model._orig_mod.{k}": v for k, v in s.items()}}),  # Lightning, compiled
    ],
    ids=[
        "state_dict",
        "nested-state_dict",
        "lightning-prefix",
        "dataparallel-prefix",
        "nested-model",
        "nested-module",
        "ddp-compiled-prefixes",
        "compiled-ddp-prefixes",
        "lightning-compiled-prefixes",
    ],
)
def test_torch_checkpoint_layouts(work: Path, filename: str, wrap) -> None:
    torch.save(wrap(state(work)), work / filename)
    result = convert(filename, "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "out").iterdir()) == ["model.pt", "plan.json", "report.json", "report.md"]
    converted = torch.load(work / "out" / "model.pt", weights_only=True)
    torch.testing.assert_close(converted["bn.weight"], state(work)["bn.weight"], rtol=0, atol=0)
    assert "bn.running_mean" not in converted  # groupnorm keeps no statistics


def _distillation(work: Path) -> dict:
    """A distillation checkpoint: a teacher and a student of the same architecture, side by side."""
    student = state(work)
    teacher = {k: v * 2 if v.is_floating_point() else v for k, v in student.items()}
    return {**{f"teacher.{k}": v for k, v in teacher.items()}, **{f"model.{k}": v for k, v in student.items()}}


def test_a_checkpoint_holding_two_models_is_refused_naming_them(work: Path) -> None:
    torch.save({"state_dict": _distillation(work)}, work / "distilled.pt")
    result = convert("distilled.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "holds 2 models, under 'model.', 'teacher.', each with the keys of Net" in message
    assert "choose one with --checkpoint-prefix, e.g. --checkpoint-prefix model." in message
    assert not (work / "out").exists()


@pytest.mark.parametrize("prefix", ["model.", "teacher."])
def test_checkpoint_prefix_chooses_one_model(work: Path, prefix: str) -> None:
    saved = _distillation(work)
    torch.save(saved, work / "distilled.pt")
    result = convert(
        "distilled.pt",
        "--model",
        "nets:build",
        *SHAPE,
        "--out",
        "out",
        "--no-onnx",
        "-q",
        "--checkpoint-prefix",
        prefix,
    )
    assert result.exit_code == 0, result.output
    converted = torch.load(work / "out" / "model.pt", weights_only=True)
    torch.testing.assert_close(converted["conv.weight"], saved[f"{prefix}conv.weight"], rtol=0, atol=0)


def test_a_checkpoint_prefix_the_checkpoint_lacks_is_one_sentence(work: Path) -> None:
    torch.save(_distillation(work), work / "distilled.pt")
    result = convert(
        "distilled.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--checkpoint-prefix", "ema."
    )
    assert result.exit_code == 2
    assert "holds no tensor under the prefix 'ema.'; its keys start with model., teacher." in " ".join(
        result.output.split()
    )


@pytest.mark.slow
def test_safetensors_in_safetensors_out_and_full_outputs(work: Path) -> None:
    save_file(state(work), str(work / "w.safetensors"))
    result = convert("w.safetensors", "--model", "nets.py:build", *SHAPE, "--out", "out")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (work / "out").iterdir())
    assert names == ["model.onnx", "model.safetensors", "plan.json", "report.json", "report.md"]
    report = json.loads((work / "out" / "report.json").read_text())["reports"][0]
    assert report["validation"]["passed"] is True
    assert report["plan"]["sites"][0]["target"] == "groupnorm"
    assert "validation passed" in result.output and "wrote weights" in result.output
    assert "#### Validation" in (work / "out" / "report.md").read_text()


def test_round_trip_into_a_training_pipeline(work: Path) -> None:
    assert convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "-q").exit_code == 0
    import nets

    converted = normswap.load_converted(nets.Net(), work / "out")
    reference = normswap.convert(_loaded(work), torch.zeros(2, 3, 8, 8)).model
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), reference.eval()(x), rtol=0, atol=0)


def _loaded(work: Path):
    import nets

    model = nets.Net()
    model.load_state_dict(state(work))
    return model.eval()


def test_saved_plan_is_reapplied(work: Path) -> None:
    assert (
        convert(
            "plain.pt", "--model", "nets:build", *SHAPE, "--out", "first", "--to", "layernorm", "--no-onnx", "-q"
        ).exit_code
        == 0
    )
    result = convert(
        "plain.pt", "--model", "nets:build", *SHAPE, "--out", "second", "--plan", "first/plan.json", "--no-onnx", "-q"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads((work / "second" / "plan.json").read_text())
    assert plan["sites"][0]["target"] == "layernorm"


def test_force_and_existing_outputs(work: Path) -> None:
    (work / "out").mkdir()
    (work / "out" / "notes.txt").write_text("mine")
    refused = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert refused.exit_code == 2 and "already has files; pass --force" in refused.output
    assert sorted(p.name for p in (work / "out").iterdir()) == ["notes.txt"]
    forced = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--force", "-q")
    assert forced.exit_code == 0
    assert (work / "out" / "notes.txt").read_text() == "mine"  # the user's file survives
    assert (work / "out" / "model.pt").exists()


def test_input_is_never_overwritten(work: Path) -> None:
    (work / "out").mkdir()
    torch.save(state(work), work / "out" / "model.pt")
    before = (work / "out" / "model.pt").read_bytes()
    result = convert("out/model.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--force", "--no-onnx")
    assert result.exit_code == 2 and "which is the input" in result.output
    assert (work / "out" / "model.pt").read_bytes() == before


@pytest.mark.slow
def test_validation_failure_exits_1_and_keeps_outputs(work: Path) -> None:
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--atol", "1e-30", "--rtol", "0")
    assert result.exit_code == 1, result.output
    report = json.loads((work / "out" / "report.json").read_text())["reports"][0]
    assert report["validation"]["passed"] is False
    assert "validation FAILED" in result.output


def test_malicious_pickle_does_not_run(work: Path) -> None:
    marker = work / "pwned"
    with open(work / "evil.pt", "wb") as handle:
        pickle.dump({"state_dict": Marker(str(marker))}, handle)
    result = convert("evil.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert result.exit_code == 2
    assert "would run code when loaded" in result.output and "--trust-checkpoint" in result.output
    assert not marker.exists()
    assert not (work / "out").exists()


def test_pickled_module_needs_trust(work: Path) -> None:
    torch.save(_loaded(work), work / "whole.pt")
    refused = convert("whole.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx")
    assert refused.exit_code == 2 and "--trust-checkpoint" in refused.output
    trusted = convert(
        "whole.pt", "--model", "nets:build", *SHAPE, "--out", "out", "--no-onnx", "--trust-checkpoint", "-q"
    )
    assert trusted.exit_code == 0, trusted.output


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["missing.pt", "--model", "nets:build"], "does not exist"),
        ("empty", ["empty.pt", "--model", "nets:build"], "is empty (0 bytes)"),
        ("truncated", ["truncated.pt", "--model", "nets:build"], "truncated or corrupt"),
        (
            "text",
            ["notes.pt", "--model", "nets:build"],
            "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)",
        ),
        ("list", ["list.pt", "--model", "nets:build"], "without model weights"),
        ("badsafetensors", ["bad.safetensors", "--model", "nets:build"], "not a readable safetensors file"),
        (None, ["plain.pt", "--model", "nosuch.module:build"], "Module 'nosuch.module' not found"),
        (None, ["plain.pt", "--model", "nets:nothing"], "has no attribute 'nothing'"),
        (None, ["plain.pt", "--model", "nets:returns_string"], "returned a str, not a torch.nn.Module"),
        (
            None,
            ["plain.pt", "--model", "nets:build", "-k", "width=16"],
            "mis-shaped keys: bn.bias (checkpoint (8,), model (16,))",
        ),
        ("extra_key", ["extra.pt", "--model", "nets:build"], "unexpected keys: head.weight"),
        ("missing_key", ["partial.pt", "--model", "nets:build"], "missing keys: fc.bias"),
        ("out_file", ["plain.pt", "--model", "nets:build", "--out", "taken"], "is a file"),
        (None, ["plain.pt", "--model", "nets:build", "--out", "no/such/dir"], "does not exist"),
        (
            None,
            ["plain.pt", "--model", "nets:build", "--input-shape", "2,5,8,8"],
            "cannot run on example inputs of shape (2, 5, 8, 8)",
        ),
    ],
    ids=[
        "missing",
        "empty",
        "truncated",
        "not-a-checkpoint",
        "list",
        "bad-safetensors",
        "module",
        "attribute",
        "not-module",
        "shape-mismatch",
        "unexpected-key",
        "missing-key",
        "out-is-file",
        "out-parent-missing",
        "input-shape",
    ],
)
def test_bad_input(work: Path, setup: str | None, args: list[str], message: str) -> None:
    if setup == "empty":
        (work / "empty.pt").write_bytes(b"")
    elif setup == "truncated":
        data = (work / "plain.pt").read_bytes()
        (work / "truncated.pt").write_bytes(data[: len(data) // 2])
    elif setup == "text":
        (work / "notes.pt").write_text("these are my notes")
    elif setup == "list":
        torch.save([1, 2, 3], work / "list.pt")
    elif setup == "badsafetensors":
        (work / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif setup == "extra_key":
        torch.save({**state(work), "head.weight": torch.zeros(2)}, work / "extra.pt")
    elif setup == "missing_key":
        torch.save({k: v for k, v in state(work).items() if k != "fc.bias"}, work / "partial.pt")
    elif setup == "out_file":
        (work / "taken").write_text("x")
    if "--out" not in args:
        args = [*args, "--out", "out"]
    if "--input-shape" not in args:
        args = [*args, *SHAPE]
    before = sorted(p.name for p in work.iterdir())
    result = convert(*args, "--no-onnx")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == sorted(
        n for n in before if not n.startswith(".")
    ), "no partial output"
    assert not [p for p in work.iterdir() if p.name.startswith(".out.normswap-")]


def test_unwritable_output_directory(work: Path) -> None:
    # /sys refuses new entries even to root, so this runs wherever CI runs
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "/sys/normswap-out", "--no-onnx")
    assert result.exit_code == 2 and "choose a writable --out" in result.output
    assert "Traceback" not in result.output


def test_unwritable_output_directory_by_permissions(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = work / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # a 0500 directory, as a non-root user sees it (root ignores mode bits)
        if Path(path).resolve() == locked.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr("normswap.outputs.os.access", access)
    result = convert("plain.pt", "--model", "nets:build", *SHAPE, "--out", "locked/out", "--no-onnx")
    assert (
        result.exit_code == 2
        and "Output directory 'locked/out' is not writable; choose another --out." in result.output
    )
    assert list(locked.iterdir()) == []
