"""The converted real models in the user's next tools (issue 30): an optimizer built before an
in-place conversion, TorchScript / jit.trace / torch.fx / forward-mode AD on every timm replacement
class, torchvision's feature extractor and FX quantization, eager quantization of torchvision's
quantizable ResNet, Opacus' ew mode on a channel LayerNorm, ONNX at an older opset, the Hugging
Face round trip without a false loading report, and a torchvision detector's `[image]` input."""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from pathlib import Path

import pytest
import timm
import timm.layers
import torch
import torch.autograd.forward_ad as fwAD
import torchvision
import transformers
from opacus import PrivacyEngine
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torchvision.models.feature_extraction import create_feature_extractor
from zoo import build, converted, example

import normswap
from normswap.errors import CheckpointError, PlanError
from normswap.export import export_onnx_with_info
from normswap.nn import ChannelLayerNorm

TARGETS = ("groupnorm", "layernorm", "frozen", "fold", "syncbn")
TOOLS = ("script", "trace", "fx", "forward AD")


def _through(tool: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output through `tool` (script and trace saved and loaded again; a trace made
    on other inputs, so a frozen branch shows; forward AD: the tangent along a fixed direction)."""
    if tool in ("script", "trace"):
        _forget_replaced_ops()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            compiled = torch.jit.script(model) if tool == "script" else torch.jit.trace(model, -x)
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)(x)
    if tool == "fx":
        return torch.fx.symbolic_trace(model)(x)
    with fwAD.dual_level():
        return fwAD.unpack_dual(model(fwAD.make_dual(x, _direction(x)))).tangent


def _forget_replaced_ops() -> None:
    """Work around a torch bug, not a defect of the layers under test. torch.ops registers each op
    packet's `_op` in torch.jit's builtin table by id; torch.library's `_refresh_packet` (run when
    `torch.ao.quantization.fx._decomposed`, imported with this module's `quantize_fx`, adds
    overloads to quantized_decomposed ops) replaces four of them and leaves their ids in the table.
    An object later allocated at such an address (a Conv2d's `_reversed_padding_repeated_twice`
    list) is taken for a builtin by torch.jit.script: "builtin cannot be used as a value", in
    whichever case the allocator reuses the address (measured: 3 of 900 scripts of this file's timm
    cases, on groupnorm, layernorm and frozen alike, each time the Conv2d's list at a replaced op's
    id; none of 600 with this). Drop the ids of ops outside aten/prim that no live packet holds
    (aten/prim entries are also keyed by Python functions such as torch.add, so are kept)."""
    table = torch.jit._builtins._get_builtin_table()
    live = set()
    for space in torch.ops._dir:
        namespace = getattr(torch.ops, space)
        live.update(id(getattr(getattr(namespace, name), "_op", None)) for name in getattr(namespace, "_dir", ()))
    for key in [k for k, op in table.items() if op.split("::")[0] not in ("aten", "prim") and k not in live]:
        del table[key]


def _direction(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(2))


def _reference(tool: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch; for forward AD the same directional derivative by reverse mode."""
    if tool == "forward AD":
        return torch.autograd.functional.jvp(model, x, _direction(x))[1]
    with torch.no_grad():
        return model(x)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 kernels TorchScript or FX may pick differently: relative to the output's scale
    expected = expected.detach()
    torch.testing.assert_close(actual.detach(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# every BatchNorm subclass timm ships in timm/layers/norm_act.py that computes batch_norm itself
# (SyncBatchNormAct calls super().forward(): TorchScript has no super(), in timm either)
TIMM_CLASSES = {
    "BatchNormAct2d-silu": lambda: timm.layers.BatchNormAct2d(16, act_layer=nn.SiLU),
    "BatchNormAct2d-identity": lambda: timm.layers.BatchNormAct2d(16, apply_act=False),
    "BatchNormAct2d-hardswish-drop": lambda: timm.layers.BatchNormAct2d(
        16, act_layer=nn.Hardswish, drop_layer=nn.Dropout
    ),
}
LAYER_CASES = [(layer, target) for layer in TIMM_CLASSES for target in TARGETS]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("layer", "target"), LAYER_CASES, ids=[f"{c}-{t}" for c, t in LAYER_CASES])
def test_every_timm_replacement_class_scripts_traces_fx_traces_and_differentiates(
    layer: str, target: str, tool: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), TIMM_CLASSES[layer]()).train()
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x * 2 + 1)  # running statistics away from (0, 1)
    converted_model = normswap.convert(model.eval(), x, to=target).model
    assert type(converted_model[1]).__name__.endswith("Act2d") and type(converted_model[1]) is not type(model[1])
    _close(_through(tool, converted_model, x), _reference(tool, converted_model, x))


@pytest.mark.parametrize("target", TARGETS)
def test_a_converted_timm_model_scripts_and_traces(target: str) -> None:
    """The issue's failure: torch.jit.script of every converted timm model ('Any')."""
    _, conversion = converted("timm/efficientnet_b0", target)
    model, x = copy.deepcopy(conversion.model).eval(), example("timm/efficientnet_b0")
    for tool in ("script", "trace"):
        _close(_through(tool, model, x), _reference(tool, model, x))


@pytest.mark.parametrize("target", ["groupnorm", "layernorm", "frozen"])
def test_torchvision_feature_extraction_and_fx_quantization_see_through_the_norms(target: str) -> None:
    _, conversion = converted("torchvision/resnet18", target)
    model, x = copy.deepcopy(conversion.model).eval(), example("torchvision/resnet18")
    features = create_feature_extractor(model, return_nodes={"layer2": "layer2", "fc": "fc"})(x)
    with torch.no_grad():
        _close(features["fc"], model(x))
    qconfig = torch.ao.quantization.get_default_qconfig_mapping("x86")
    prepared = prepare_fx(model, qconfig, (x,))
    with torch.no_grad():
        prepared(x)
        quantized = convert_fx(prepared)(x)
    assert quantized.shape == (2, 4) and bool(torch.isfinite(quantized).all())


@pytest.mark.parametrize("name", ["torchvision/resnet18", "timm/efficientnet_b0"])
def test_an_optimizer_built_before_an_in_place_conversion_trains_the_new_layers(name: str) -> None:
    model = build(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    normswap.convert(model, example(name), to="groupnorm", inplace=True)
    assert {id(p) for p in model.parameters()} == held  # every parameter of the converted model is the optimizer's
    norm = next(m for m in model.modules() if isinstance(m, nn.GroupNorm))
    before = norm.weight.detach().clone()
    model(example(name)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    assert not torch.equal(norm.weight, before)


def test_torchvisions_quantizable_resnet_quantizes_frozen_as_batchnorm() -> None:
    """torchvision's own quantization recipe (fuse_model's (conv, bn, relu) lists, prepare, convert)
    on a frozen conversion: the same integers as on the BatchNorm original."""
    torch.manual_seed(0)
    original = torchvision.models.quantization.resnet18(weights=None, quantize=False, num_classes=4)
    x = example("torchvision/resnet18")
    with torch.no_grad():
        original.train()(x * 1.5 + 0.3)
    original.eval()
    frozen = normswap.convert(original, x, to="frozen").model

    def quantized(model: nn.Module) -> nn.Module:
        model = copy.deepcopy(model).eval()
        model.fuse_model()
        model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = torch.ao.quantization.prepare(model)
            with torch.no_grad():
                prepared(x)
            return torch.ao.quantization.convert(prepared)

    with torch.no_grad():
        torch.testing.assert_close(quantized(frozen)(x), quantized(original)(x), rtol=0, atol=0)


def test_opacus_ew_mode_computes_per_sample_gradients_through_a_channel_layernorm() -> None:
    """Under --dp the channel LayerNorm hands the layer before a contiguous gradient, which Opacus'
    expanded-weights convolutions `.view`, and keeps its affine inside F.layer_norm, the function
    expanded weights handle; plain torch, not a custom autograd Function. Each sample's gradient is
    the one that sample alone gives (LayerNorm has no batch dependence)."""
    _, conversion = converted("timm/regnetx_002", "layernorm", dp=True)
    model = copy.deepcopy(conversion.model).train()
    alone = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = example("timm/regnetx_002", batch=4), torch.tensor([0, 1, 2, 3])
    private, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ew",
    )
    nn.functional.cross_entropy(private(x), y).backward()
    norms = [name for name, m in alone.named_modules() if isinstance(m, ChannelLayerNorm)]
    assert norms and all(m.contiguous_gradient for m in alone.modules() if isinstance(m, ChannelLayerNorm))
    weight = f"{norms[0]}.weight"
    sample = dict(model.named_parameters())[weight].grad_sample  # (batch, C): one gradient per sample
    nn.functional.cross_entropy(alone(x[1:2]), y[1:2]).backward()
    expected = dict(alone.named_parameters())[weight].grad
    assert float(expected.abs().max()) > 0
    # float32 through a small RegNet, batched against alone: relative to the gradient's scale
    torch.testing.assert_close(sample[1], expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    optimizer.step()


def test_a_real_model_exports_at_an_older_opset(tmp_path: Path) -> None:
    """torchvision's MobileNetV3 (global pools in its squeeze-excitation blocks, Hardswish) with
    channel LayerNorms, at opset 16: the file is opset 16 and validates."""
    _, conversion = converted("torchvision/mobilenet_v3_small", "layernorm")
    x = example("torchvision/mobilenet_v3_small")
    info = export_onnx_with_info(conversion.model, x, tmp_path / "model.onnx", opset=16)
    import onnx

    assert {e.domain: e.version for e in onnx.load(str(info.path)).opset_import}[""] == 16
    assert any(entry.startswith("LayerNormalization") for entry in info.lowered)
    validation = normswap.validate_onnx(conversion.model, info.path, x, plan=conversion.plan, opset=16)
    assert validation.passed, validation.messages


def test_a_torchvision_detector_taking_a_list_of_images_validates(tmp_path: Path) -> None:
    """SSDlite takes `[image, ...]`: the file's inputs are the flattened images; its boxes depend on
    its own predictions, and torch.export cannot capture it, so the file is traced and says where."""
    _, conversion = converted("torchvision/ssdlite320_mobilenet_v3_large", "groupnorm")
    model = copy.deepcopy(conversion.model).eval()
    images = ([example("torchvision/ssdlite320_mobilenet_v3_large")[0]],)
    info = export_onnx_with_info(model, images, tmp_path / "model.onnx")
    assert "torchvision/models/detection/" in info.traced
    validation = normswap.validate_onnx(model, info.path, images, plan=conversion.plan)
    assert validation.passed, validation.messages
    assert validation.outputs and validation.summary().endswith(info.traced)


def _shown(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    """What a user saw since the last call: transformers' log records (its LOAD REPORT is a
    warning of `transformers.modeling_utils`) and anything printed."""
    printed = capfd.readouterr()
    shown = "\n".join(record.getMessage() for record in caplog.records) + printed.out + printed.err
    caplog.clear()
    return shown


@pytest.mark.parametrize("target", ["groupnorm", "layernorm", "frozen", "fold"])
def test_normswap_from_pretrained_reports_no_false_missing_keys(
    target: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The converted weights load once, into the converted architecture: transformers has nothing
    to report. The plain load of the same folder builds BatchNorm and reports its statistics as
    missing (true of that model), which shows this capture sees the report when there is one."""
    cls = transformers.ResNetForImageClassification
    _, conversion = converted("transformers/resnet", target)
    conversion.model.save_pretrained(tmp_path)
    caplog.set_level(logging.INFO)
    _shown(caplog, capfd)
    loaded = normswap.from_pretrained(cls, tmp_path)
    shown = _shown(caplog, capfd)
    assert "LOAD REPORT" not in shown and "MISSING" not in shown and "newly initialized" not in shown, shown
    assert type(loaded) is cls and not loaded.training
    x = example("transformers/resnet")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, conversion.model.eval()(x).logits, rtol=0, atol=0)
    cls.from_pretrained(tmp_path)
    shown = _shown(caplog, capfd)
    assert "LOAD REPORT" in shown and "MISSING" in shown, shown


def test_normswap_from_pretrained_keeps_the_dtype_asked_for(tmp_path: Path) -> None:
    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    loaded = normswap.from_pretrained(transformers.ResNetForImageClassification, tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    x = example("transformers/resnet")
    with torch.no_grad():
        expected = conversion.model.eval()(x).logits
        actual = loaded(x.to(torch.bfloat16)).logits.float()
    # bfloat16 keeps 8 bits of mantissa: a few of its ulps (2**-8 relative) through a small ResNet
    torch.testing.assert_close(actual, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_normswap_from_pretrained_refuses_a_plan_of_functional_calls(tmp_path: Path) -> None:
    """A plan rewriting functional batch_norm calls makes a traced graph, which transformers cannot
    build and fill: refused before anything loads."""
    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["normswap_plan"]["sites"][0]["kind"] = "functional"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match=r"rewrites functional batch_norm calls .* into a traced graph .*apply_plan"):
        normswap.from_pretrained(transformers.ResNetForImageClassification, tmp_path)


def test_normswap_from_pretrained_refuses_a_folder_missing_a_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = next(key for key in weights if key.endswith("normalization.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["normswap_plan"]
    with pytest.raises(CheckpointError, match=r"lacks .*normalization\.weight.* save the converted model again"):
        normswap.from_pretrained(transformers.ResNetForImageClassification, tmp_path)


def test_normswap_from_pretrained_refuses_a_tensor_of_another_shape(tmp_path: Path) -> None:
    """With ignore_mismatched_sizes=True transformers would re-initialise the tensor and go on: a
    converted model silently part random. Refused, naming the key and both shapes."""
    from safetensors.torch import load_file, save_file

    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = next(key for key in weights if key.endswith("normalization.weight"))
    weights[key] = torch.ones(weights[key].shape[0] + 1)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    channels = conversion.model.state_dict()[key].shape[0]
    with pytest.raises(CheckpointError, match=rf"holds {key} of shape \[{channels + 1}\] where .* has \[{channels}\]"):
        normswap.from_pretrained(transformers.ResNetForImageClassification, tmp_path, ignore_mismatched_sizes=True)


def test_normswap_from_pretrained_asks_for_the_model_class_not_an_auto_class(tmp_path: Path) -> None:
    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"AutoModelForImageClassification.*'architectures'"):
        normswap.from_pretrained(transformers.AutoModelForImageClassification, tmp_path)
