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
    default_ops = {
        n.op_type
        for n in onnx.load(str(normswap.export_onnx(conv.model, input_for("resnet"), tmp_path / "d.onnx"))).graph.node
    }
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
    expected = torch.tensor([1e4, -2e3, 5.0])
    close = expected.numpy() * (1 + 1e-6)
    assert compare(expected, close, 1, 0).passed  # ~8 fp32 ulps at the output's scale
    assert not compare(expected, expected.numpy() + np.array([0, 0, 2.0], dtype=np.float32), 1, 0).passed
    explicit = compare(expected, close, 1, 0, atol=1e-9, rtol=0.0)
    assert not explicit.passed and explicit.needed_atol == pytest.approx(
        np.abs(close - expected.numpy()).max(), rel=1e-3
    )


def test_tiny_outputs_get_tiny_tolerances() -> None:
    expected = torch.randn(16) * 1e-30
    assert compare(expected, expected.numpy() * (1 + 1e-6), 1, 0).passed
    other = (torch.randn(16) * 1e-30).numpy()  # what other weights compute: same scale, other values
    check = compare(expected, other, 1, 0)
    assert not check.passed and check.atol < 1e-34  # no floor above the outputs themselves


def test_tolerance_follows_the_dtype() -> None:
    half = torch.linspace(-4, 4, 64).half()
    ulp = float(torch.finfo(torch.float16).eps) * 4  # one unit in the last place at |x| = 4
    assert compare(half, half.double().numpy() + ulp, 1, 0).passed  # one fp16 ulp: rounding, not an export bug
    assert not compare(half, half.double().numpy() + 64 * ulp, 1, 0).passed
    single = torch.linspace(-4, 4, 64)
    assert not compare(single, single.double().numpy() + ulp, 1, 0).passed  # the same error is far too big for fp32


def test_the_models_own_rounding_widens_the_tolerance() -> None:
    expected = torch.ones(8)
    error = 40 * float(torch.finfo(torch.float32).eps)  # 40 ulps: more than the 16-ulp floor
    assert not compare(expected, expected.numpy() + error, 1, 0).passed
    assert compare(expected, expected.numpy() + error, 1, 0, rounding=error / 4).passed  # 4x the model's own rounding
    assert not compare(expected, expected.numpy() + error, 1, 0, rounding=error / 32).passed


class Scaled(nn.Module):
    """Outputs of about 1e-30: the case where an absolute tolerance floor passes anything."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))) * 1e-30


def test_an_export_of_other_weights_fails_on_tiny_outputs(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    exported = normswap.convert(Scaled().eval(), x, to="groupnorm").model
    torch.manual_seed(1)
    other = normswap.convert(Scaled().eval(), x, to="groupnorm").model
    path = normswap.export_onnx(exported, x, tmp_path / "scaled.onnx")
    assert normswap.validate_onnx(exported, path, x).passed
    validation = normswap.validate_onnx(other, path, x)
    assert not validation.passed and not validation.fidelity_passed


class DeepConvNet(nn.Module):
    """32 conv-BN-ReLU blocks: rounding errors accumulate with depth."""

    def __init__(self, blocks: int = 32, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_a_deep_network_is_judged_against_its_own_rounding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeepConvNet()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        model.train()(x)
    conv = normswap.convert(model.eval(), x, to="groupnorm")
    path = normswap.export_onnx(conv.model, x, tmp_path / "deep.onnx")
    validation = normswap.validate_onnx(conv.model, path, x, plan=conv.plan)
    assert validation.passed, validation.messages
    for check in validation.outputs:  # both numbers are reported
        assert check.rounding is not None and check.rounding > 0
        assert check.max_abs <= check.atol + check.rtol * check.scale


def test_fp16_export_is_judged_at_fp16_precision(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model.train()(torch.randn(64, 10) * 3)
    conv = normswap.convert(model.eval().half(), torch.randn(8, 10).half(), to="layernorm")
    path = normswap.export_onnx(conv.model, torch.randn(8, 10).half(), tmp_path / "half.onnx")
    validation = normswap.validate_onnx(conv.model, path, torch.randn(8, 10).half(), plan=conv.plan)
    assert validation.passed, validation.messages
    assert {check.dtype for check in validation.outputs} == {"float16"}


def test_unwritable_output_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("resnet")
    with pytest.raises(OutputError, match="does not exist"):
        normswap.export_onnx(model, input_for("resnet"), tmp_path / "missing" / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()

    def refused(*args, **kwargs):  # what a directory without write permission does (root ignores the mode bits)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("normswap.files.tempfile.mkstemp", refused)
    with pytest.raises(OutputError, match=r"Cannot write to '.*locked': Permission denied; choose a writable location"):
        normswap.export_onnx(model, input_for("resnet"), locked / "m.onnx")
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
