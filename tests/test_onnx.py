"""ONNX export and onnxruntime validation (exports are shared through session fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import normswap
from models import build, input_for
from normswap.errors import ExportError, OutputError, ValidationError
from normswap.export.onnx import export_info
from normswap.export.validate import compare, count_onnx_batchnorm

pytestmark = pytest.mark.slow  # every test here exports at least one ONNX file

EXPORTED = [
    "resnet",
    "mobilenet",
    "mlp",
    "tcn",
    "rnn",
    "functional",
    "subclass",
    "bn3d",
    "no_affine",
    "no_running_stats",
    "lazy",
    "untraceable",
    "lookalike",
]
CASES = [(m, t) for m in EXPORTED for t in ("groupnorm", "layernorm")]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """(name, target) -> (conversion, original, onnx path), exported on first use."""
    folder = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            original = build(name)
            conv = normswap.convert(original, input_for(name), to=target)
            path = normswap.export_onnx(conv.model, input_for(name), folder / f"{name}-{target}.onnx")
            cache[(name, target)] = (conv, original, path)
        return cache[(name, target)]

    return get


@pytest.mark.parametrize("name,target", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_converted_export_validates(exports, name: str, target: str) -> None:
    conv, original, path = exports(name, target)
    validation = normswap.validate_onnx(conv.model, path, input_for(name), original=original, plan=conv.plan)
    assert validation.passed, validation.messages
    assert {c.batch_size for c in validation.outputs} == {1, 4}  # the batch axis is really dynamic
    assert count_onnx_batchnorm(path) == 0
    assert validation.batch_independent_eval and validation.batch_independent_train
    assert validation.drift is not None and validation.drift.samples == 4
    onnx.checker.check_model(str(path))
    assert export_info(path)["opset"] == "18"


def test_export_records_exporter_and_runs_at_other_batch_sizes(exports) -> None:
    import onnxruntime as ort

    conv, _, path = exports("resnet", "groupnorm")
    assert export_info(path)["exporter"].startswith("torch.onnx dynamo exporter")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 16):
        x = torch.randn(batch, 3, 12, 12)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = conv.model.eval()(x).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_groupnorm_exports_in_the_measured_fastest_form(exports) -> None:
    _, _, path = exports("mobilenet", "groupnorm")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" in ops and "InstanceNormalization" not in ops  # see benchmarks/bench_formulations.py


def test_opset_21_groupnormalization_is_opt_in(tmp_path: Path) -> None:
    conv = normswap.convert(build("resnet"), input_for("resnet"), to="groupnorm")
    default_ops = {n.op_type for n in onnx.load(str(normswap.export_onnx(conv.model, input_for("resnet"), tmp_path / "d.onnx"))).graph.node}
    assert "GroupNormalization" not in default_ops
    path = normswap.export_onnx(conv.model, input_for("resnet"), tmp_path / "g.onnx", opset=21)
    validation = normswap.validate_onnx(conv.model, path, input_for("resnet"), plan=conv.plan)
    assert validation.passed, validation.messages
    assert export_info(path)["opset"] == "21"
    assert "GroupNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_untraceable_model_falls_back_to_torchscript_exporter(exports) -> None:
    _, _, path = exports("untraceable", "groupnorm")
    assert export_info(path)["exporter"].startswith("torch.onnx TorchScript exporter")


def test_tampered_initializer_fails_with_a_per_output_message(exports, tmp_path: Path) -> None:
    conv, _, path = exports("resnet", "groupnorm")
    model = onnx.load(str(path))
    weight = next(init for init in model.graph.initializer if init.dims and len(init.dims) == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    validation = normswap.validate_onnx(conv.model, tampered, input_for("resnet"), plan=conv.plan)
    assert not validation.passed and not validation.fidelity_passed
    assert any(m.startswith("output 0 at batch 1: FAILED") for m in validation.messages)


def test_batch_dependent_model_is_reported(tmp_path: Path) -> None:
    model = build("no_running_stats")
    path = normswap.export_onnx(model, input_for("no_running_stats"), tmp_path / "bn.onnx")
    validation = normswap.validate_onnx(model, path, input_for("no_running_stats"))
    assert not validation.batch_independent_eval
    assert any("batch-dependent in eval mode" in m for m in validation.messages)
    assert "BatchNorm left in the model: bn" in validation.messages


def test_frozen_keeps_batchnorm_ops_on_purpose(tmp_path: Path) -> None:
    conv = normswap.convert(build("resnet"), input_for("resnet"), to="frozen")
    path = normswap.export_onnx(conv.model, input_for("resnet"), tmp_path / "frozen.onnx")
    validation = normswap.validate_onnx(conv.model, path, input_for("resnet"), plan=conv.plan)
    assert validation.passed, validation.messages
    assert validation.residual_onnx_allowed


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))

    def forward(self, image, features):
        return {"image": self.a(image).mean(dim=(2, 3)), "pair": (self.b(features), features.sum(1))}


def test_several_inputs_and_nested_outputs(tmp_path: Path) -> None:
    inputs = (torch.randn(4, 3, 8, 8), torch.randn(4, 5))
    conv = normswap.convert(TwoInTwoOut().eval(), inputs)
    path = normswap.export_onnx(conv.model, inputs, tmp_path / "multi.onnx")
    validation = normswap.validate_onnx(conv.model, path, inputs, plan=conv.plan)
    assert validation.passed, validation.messages
    assert len({c.output for c in validation.outputs}) == 3


def test_default_tolerance_scales_with_output_magnitude() -> None:
    expected = np.array([1e4, -2e3, 5.0], dtype=np.float32)
    close = expected * (1 + 1e-6)
    assert compare(expected, close, None, 1e-4, 1, 0).passed  # ~1e-6 relative at 1e4 magnitude
    assert not compare(expected, expected + np.array([0, 0, 2.0]), None, 1e-4, 1, 0).passed
    explicit = compare(expected, close, 1e-9, 0.0, 1, 0)
    assert not explicit.passed and explicit.needed_atol == pytest.approx(np.abs(close - expected).max(), rel=1e-3)


def test_unwritable_output_leaves_nothing(tmp_path: Path) -> None:
    model = build("resnet")
    with pytest.raises(OutputError, match="does not exist"):
        normswap.export_onnx(model, input_for("resnet"), tmp_path / "missing" / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):  # root ignores permissions
            with pytest.raises(OutputError, match="Cannot write"):
                normswap.export_onnx(model, input_for("resnet"), locked / "m.onnx")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_export_failure_names_the_problem(tmp_path: Path) -> None:
    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # complex eigenvalues have no ONNX op

    with pytest.raises(ExportError, match="could not export Unsupported"):
        normswap.export_onnx(Unsupported(), torch.randn(2, 3, 3), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_file_is_a_load_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(ValidationError, match="onnxruntime cannot load"):
        normswap.validate_onnx(build("resnet"), garbage, input_for("resnet"))


def test_large_models_use_external_data(tmp_path: Path, monkeypatch) -> None:
    import normswap.export.onnx

    monkeypatch.setattr(normswap.export.onnx, "EXTERNAL_DATA_BYTES", 0)  # treat the test model as large
    conv = normswap.convert(build("resnet"), input_for("resnet"), to="groupnorm")
    path = normswap.export_onnx(conv.model, input_for("resnet"), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    model = onnx.load(str(path), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    validation = normswap.validate_onnx(conv.model, path, input_for("resnet"), plan=conv.plan)
    assert validation.passed, validation.messages
