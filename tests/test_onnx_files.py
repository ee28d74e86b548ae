"""ONNX files that are what they say (issue 30): the opset in a file's opset_import is the one asked
for (lowered op by op, or refused naming the op), validation checks it; a traced file says that it
holds one path of data-dependent control flow, naming the line; nested inputs are fed as the
exporters flatten them."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import normswap
from normswap.errors import ExportError, ValidationError
from normswap.export import export_onnx_with_info
from normswap.export.onnx import METADATA_OPSET, METADATA_TRACED

pytestmark = pytest.mark.slow  # every test here exports at least one ONNX file


def _net() -> nn.Sequential:
    """The issue's model: a global average pool is a ReduceMean, which torch.onnx writes at opset 18."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    ).eval()


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _opsets(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.domain: e.version for e in model.opset_import}, {p.key: p.value for p in model.metadata_props}


def _every_op_defined_at(path: Path, opset: int) -> None:
    """An oracle independent of normswap's lowering: onnx's own schemas at that opset accept
    every node (attributes, inputs, types by strict shape inference)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        onnx.defs.get_schema(node.op_type, opset, node.domain)  # raises for an op the opset lacks
    onnx.checker.check_model(model, full_check=True)


OPSETS = [(target, opset) for target in ("layernorm", "groupnorm", "fold") for opset in (14, 16, 17, 18)]


@pytest.mark.parametrize(("target", "opset"), OPSETS, ids=[f"{t}-opset{o}" for t, o in OPSETS])
def test_the_file_is_the_opset_asked_for(tmp_path: Path, target: str, opset: int) -> None:
    conversion = normswap.convert(_net(), X, to=target)
    info = export_onnx_with_info(conversion.model, X, tmp_path / "model.onnx", opset=opset)
    imports, metadata = _opsets(info.path)
    assert imports[""] == opset and metadata[METADATA_OPSET] == str(opset)
    _every_op_defined_at(info.path, opset)
    if opset < 18:  # torch.onnx wrote 18: the global average pool's ReduceMean was lowered
        assert any(entry.startswith("ReduceMean") for entry in info.lowered), info.lowered
    if target == "layernorm" and opset < 17:
        assert any(entry.startswith("LayerNormalization") for entry in info.lowered), info.lowered
    validation = normswap.validate_onnx(conversion.model, info.path, X, plan=conversion.plan, opset=opset)
    assert validation.passed, validation.messages
    assert validation.opset == str(opset)


def test_lowered_ops_keep_the_function_at_other_inputs(tmp_path: Path) -> None:
    """The decomposed LayerNormalization and the attribute-axes ReduceMean against PyTorch on inputs
    of another scale and batch size than the export's (float32 rounding of a two-pass mean and
    variance: relative to the output's scale)."""
    conversion = normswap.convert(_net(), X, to="layernorm")
    path = export_onnx_with_info(conversion.model, X, tmp_path / "model.onnx", opset=14).path
    other = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 30 + 4
    actual = onnxruntime.InferenceSession(str(path)).run(None, {"input": other.numpy()})[0]
    with torch.no_grad():
        expected = conversion.model(other).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


class _Bitwise(nn.Module):
    """BitwiseAnd exists from opset 18 only, and no lowering keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.bitwise_and((x > 0).to(torch.int32), (x < 1).to(torch.int32))
        return self.net(x * mask)


def test_an_op_without_a_lowering_is_refused_naming_it(tmp_path: Path) -> None:
    conversion = normswap.convert(_Bitwise().eval(), X, to="groupnorm")
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"holds a BitwiseAnd op, which opset 17 does not have .* --opset 18"):
        export_onnx_with_info(conversion.model, X, target, opset=17)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


class _MishChunk(nn.Module):
    """Mish (opset 18) and chunk (Split with num_outputs at opset 18), both lowered below 18."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.act(self.bn(self.conv(x))).chunk(2, dim=1)
        return (a * b).mean(dim=(2, 3))


def test_mish_and_chunk_are_lowered(tmp_path: Path) -> None:
    conversion = normswap.convert(_MishChunk().eval(), X, to="groupnorm")
    info = export_onnx_with_info(conversion.model, X, tmp_path / "model.onnx", opset=16)
    assert _opsets(info.path)[0][""] == 16
    _every_op_defined_at(info.path, 16)
    assert normswap.validate_onnx(conversion.model, info.path, X, plan=conversion.plan, opset=16).passed


def test_validation_checks_the_files_own_opset(tmp_path: Path) -> None:
    conversion = normswap.convert(_net(), X, to="groupnorm")
    path = export_onnx_with_info(conversion.model, X, tmp_path / "model.onnx", opset=18).path
    asked = normswap.validate_onnx(conversion.model, path, X, plan=conversion.plan, opset=17)
    assert not asked.passed and asked.fidelity_passed
    assert "the file is opset 18 (its opset_import), not the opset 17 it was exported for" in asked.messages
    assert "validation FAILED" in asked.summary()
    lying = onnx.load(str(path))  # a file whose metadata says another opset than it imports
    onnx.helper.set_model_props(lying, {**{p.key: p.value for p in lying.metadata_props}, METADATA_OPSET: "17"})
    onnx.save(lying, str(tmp_path / "lying.onnx"))
    checked = normswap.validate_onnx(conversion.model, tmp_path / "lying.onnx", X, plan=conversion.plan)
    assert checked.opset == "18" and not checked.passed
    assert "the file's metadata records opset 17 but it imports opset 18" in checked.messages


def test_a_file_that_is_not_onnx_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\xff\xff\xff\xff not a protobuf")
    conversion = normswap.convert(_net(), X, to="groupnorm")
    with pytest.raises(ValidationError, match="it is not a readable ONNX file"):
        normswap.validate_onnx(conversion.model, tmp_path / "model.onnx", X)


# --- a traced file holds one path of data-dependent control flow -------------------------------


class _Branch(nn.Module):
    """The issue's model: a branch on the input's values, which torch.export cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + 3.0 if x.mean() > 0 else y


BRANCH_LINE = inspect.getsourcelines(_Branch.forward)[1] + 2  # the `return ... if x.mean() > 0` line


def test_a_traced_file_says_it_holds_one_path_naming_the_line(tmp_path: Path) -> None:
    model = _Branch().eval()
    positive = X.abs()
    conversion = normswap.convert(model, positive, to="groupnorm")
    info = export_onnx_with_info(conversion.model, positive, tmp_path / "model.onnx")
    where = f"tests/test_onnx_files.py:{BRANCH_LINE} `return y + 3.0 if x.mean() > 0 else y`"
    assert "TorchScript" in info.exporter and where in info.traced and "holds only the path" in info.traced
    assert _opsets(info.path)[1][METADATA_TRACED] == info.traced
    validation = normswap.validate_onnx(conversion.model, info.path, positive, plan=conversion.plan)
    assert validation.passed and validation.traced == info.traced
    assert validation.summary().startswith("validation passed") and validation.summary().endswith(info.traced)
    # what the sentence warns about: inputs taking the other branch differ by the 3.0 the file froze
    other = -positive
    session = onnxruntime.InferenceSession(str(info.path))
    with torch.no_grad():
        gap = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0] - conversion.model(other).numpy()
    np.testing.assert_allclose(gap, 3.0, rtol=1e-5)


def test_a_file_the_dynamo_exporter_wrote_carries_no_such_sentence(tmp_path: Path) -> None:
    conversion = normswap.convert(_net(), X, to="groupnorm")
    info = export_onnx_with_info(conversion.model, X, tmp_path / "model.onnx")
    assert "dynamo" in info.exporter and info.traced == "" and METADATA_TRACED not in _opsets(info.path)[1]
    validation = normswap.validate_onnx(conversion.model, info.path, X, plan=conversion.plan)
    assert validation.traced == "" and "path" not in validation.summary()


# --- nested inputs ------------------------------------------------------------------------------


class _ListInput(nn.Module):
    """Takes a list of images, as torchvision's detectors do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.stack(images))


def test_a_model_taking_a_list_of_tensors_validates(tmp_path: Path) -> None:
    images = [X[0], X[1], X[2]]
    conversion = normswap.convert(_ListInput().eval(), (images,), to="groupnorm")
    path = export_onnx_with_info(conversion.model, (images,), tmp_path / "model.onnx").path
    validation = normswap.validate_onnx(conversion.model, path, (images,), plan=conversion.plan)
    assert validation.passed, validation.messages
    assert validation.outputs and all(check.passed for check in validation.outputs)


class _KeptValues(nn.Module):
    """Traced (a branch on the input), with a reshape whose size the trace fixes from the example's
    data: at another batch onnxruntime cannot compute output 0; output 1 does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        y = y * 2 if x.sum() > -1e9 else y
        kept = y[y > 0]
        kept = torch.cat([kept, kept])  # an even count, so PyTorch's reshape always works
        return kept.reshape(2, int(kept.numel()) // 2).sum(0), y * 2


def test_an_output_onnxruntime_cannot_compute_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    conversion = normswap.convert(_KeptValues().eval(), x, to="groupnorm")
    path = export_onnx_with_info(conversion.model, x, tmp_path / "model.onnx").path
    with pytest.raises(ValidationError) as refused:
        normswap.validate_onnx(conversion.model, path, x, plan=conversion.plan)
    message = str(refused.value)
    output = onnx.load(str(path)).graph.output[0].name
    assert message.startswith(
        f"onnxruntime cannot compute output 0 ('{output}') of the exported model on inputs of shape (1, 1, 3, 3)"
    )
    assert "its Reshape node" in message and "The input tensor cannot be reshaped to the requested shape" in message
    assert "output 1" not in message
