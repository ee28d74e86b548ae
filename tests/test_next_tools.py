"""The converted model in the user's next tools (issue 30): the optimizer built before an in-place
conversion, a BatchNorm checkpoint loaded into the frozen layer, TorchScript, torch.fx, forward-mode
AD and eager quantization. The same on the real libraries runs in tests/ecosystem/test_next_tools.py."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import normswap
import normswap.nn as normswap_nn
from models import FunctionalBN, SubclassBN, TimmBatchNormAct2d
from normswap.nn import ChannelLayerNorm, FrozenBatchNorm, GroupNormBN

# (target, whether its affine keeps training)
TRAINABLE = {"groupnorm": True, "layernorm": True, "frozen": False, "syncbn": True}


def _conv_bn(*, subclass: bool = False) -> nn.Sequential:
    bn = TimmBatchNormAct2d(8) if subclass else nn.BatchNorm2d(8)
    return nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _x(model: nn.Sequential) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (4, 6) if isinstance(model[0], nn.Linear) else (4, 3, 16, 16)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("target", list(TRAINABLE))
@pytest.mark.parametrize("build", [_conv_bn, _mlp, lambda: _conv_bn(subclass=True)], ids=["conv", "mlp", "subclass"])
def test_an_optimizer_built_before_an_in_place_conversion_trains_the_new_layers(target: str, build) -> None:
    model = build().train()
    x = _x(model)
    batchnorm, weight, bias = model[1], model[1].weight, model[1].bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    conversion = normswap.convert(model, x, to=target, inplace=True)
    layer = conversion.model[1]
    assert conversion.model is model and layer is not batchnorm
    assert layer.weight is weight and layer.bias is bias  # the very Parameters the optimizer holds
    before = weight.detach().clone()
    conversion.model(x).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(weight, before) is not TRAINABLE[target]


def test_a_copy_conversion_leaves_the_callers_parameters_alone() -> None:
    model = _conv_bn().train()
    conversion = normswap.convert(model, _x(model), to="groupnorm")
    assert conversion.model[1].weight is not model[1].weight
    assert {name for name, _ in conversion.model.named_parameters()} == {
        name for name, _ in model.named_parameters()
    }  # the same names: an optimizer built on the converted model's parameters by name finds them


def test_fold_in_place_says_the_batchnorm_parameters_leave_the_model() -> None:
    model = _conv_bn().eval()
    conversion = normswap.convert(model, _x(model), to="fold", inplace=True)
    assert isinstance(conversion.model[1], nn.Identity)
    [note] = [n for n in conversion.notes if "folded into" in n]
    assert note.startswith("1: folded into '0'") and "build it after the conversion" in note
    assert not [n for n in normswap.convert(_conv_bn().eval(), _x(model), to="fold").notes if "folded into" in n]


def test_frozen_batchnorm_loads_a_batchnorm_checkpoint() -> None:
    """What `lint --fix` writes (normswap.nn.FrozenBatchNorm) loads the user's pretrained BatchNorm
    weights as they are: the step counter is dropped, as torchvision's FrozenBatchNorm2d does."""
    trained = _conv_bn().train()
    trained(_x(trained))  # running statistics away from (0, 1), a step counted
    fixed = _conv_bn()
    fixed[1] = FrozenBatchNorm(8)
    fixed.load_state_dict(trained.state_dict())
    assert torch.equal(fixed[1].running_var, trained[1].running_var) and "num_batches_tracked" not in dict(
        fixed[1].named_buffers()
    )
    with torch.no_grad():
        torch.testing.assert_close(fixed.eval()(_x(trained)), trained.eval()(_x(trained)), rtol=0, atol=0)


def test_frozen_batchnorm_still_refuses_a_checkpoint_that_does_not_fit() -> None:
    state = nn.BatchNorm2d(8).state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        FrozenBatchNorm(8).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "running_var"'):
        FrozenBatchNorm(8).load_state_dict({k: v for k, v in state.items() if k != "running_var"})


def test_a_frozen_subclass_loads_the_subclass_checkpoint() -> None:
    original = _conv_bn(subclass=True).train()
    original(_x(original))
    converted = normswap.convert(original.eval(), _x(original), to="frozen").model
    converted.load_state_dict(original.state_dict())  # num_batches_tracked included


# --- TorchScript, torch.fx, forward-mode AD ------------------------------------------------------


class _Sequence(nn.Module):
    """BatchNorm1d over (N, C, L): a channel LayerNorm at every time step under layernorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.Conv1d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


def _helper_batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, 0.1, bn.eps)


class _HelperBatchNorm(nn.BatchNorm2d):
    """A subclass whose batch_norm call is in a helper of this module: invisible to the source rewrite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(_helper_batch_norm(x, self))


MODELS = {
    "conv": (_conv_bn, (4, 3, 16, 16)),
    "mlp": (_mlp, (4, 6)),
    "sequence": (_Sequence, (4, 4, 12)),
    "timm-subclass": (lambda: _conv_bn(subclass=True), (4, 3, 16, 16)),
    "super-subclass": (SubclassBN, (4, 3, 16, 16)),  # super().forward(x): TorchScript has no super()
    "functional": (FunctionalBN, (4, 3, 16, 16)),  # rewritten in an fx.GraphModule
}
TARGETS = ("groupnorm", "layernorm", "frozen", "fold", "syncbn")
TOOLS = ("script", "trace", "fx", "forward AD")  # script and trace include jit.save and jit.load


def _built(name: str, seed: int = 0) -> nn.Module:
    build, _ = MODELS[name]
    torch.manual_seed(seed)
    model = build().train()
    with torch.no_grad():
        model(_input(name) * 2 + 0.5)  # running statistics away from (0, 1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _input(name: str) -> torch.Tensor:
    return torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(1))


_CONVERTED: dict[tuple[str, str], nn.Module] = {}


def _converted(name: str, target: str) -> nn.Module:
    if (name, target) not in _CONVERTED:
        _CONVERTED[name, target] = normswap.convert(_built(name), _input(name), to=target).model
    return _CONVERTED[name, target]


def _expected_to_work(name: str, target: str, tool: str) -> bool:
    """Where the torch layer a replacement stands for works: TorchScript has no `super()`, torch's
    own SyncBatchNorm does not script (a subclass computing batch_norm itself does), and its
    forward branches on the input's rank, which torch.fx cannot follow (BatchNorm2d.forward, which
    the original subclass reaches, neither)."""
    if tool == "script":
        return name != "super-subclass" and (target != "syncbn" or name == "timm-subclass")
    return tool != "fx" or not (name == "super-subclass" and target == "syncbn")


def _through(tool: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on `x` through `tool` (forward AD: the tangent along a fixed direction);
    a trace is recorded on other inputs, so a branch it froze shows."""
    if tool in ("script", "trace"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # torch's nn.GroupNorm warns too
            compiled = torch.jit.script(model) if tool == "script" else torch.jit.trace(model, -x)
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)(x)
    if tool == "fx":
        return torch.fx.symbolic_trace(model)(x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with fwAD.dual_level():
        return fwAD.unpack_dual(model(fwAD.make_dual(x, direction))).tangent


def _reference(tool: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch; for forward AD, the same directional derivative by reverse mode (double
    backward), an independent computation."""
    if tool != "forward AD":
        return model(x)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    return torch.autograd.functional.jvp(model, x, direction)[1]


# fold is inference only (its train mode is its eval mode); syncbn replaces only modules
CASES = [
    (name, target, mode)
    for name in MODELS
    for target in TARGETS
    for mode in ("eval", "train")
    if not (target == "fold" and mode == "train") and not (target == "syncbn" and name == "functional")
]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("name", "target", "mode"), CASES, ids=["-".join(case) for case in CASES])
def test_every_target_scripts_traces_fx_traces_and_differentiates_forward(
    name: str, target: str, mode: str, tool: str
) -> None:
    model, x = _converted(name, target).train(mode == "train"), _input(name)
    if not _expected_to_work(name, target, tool):
        with pytest.raises(Exception):  # noqa: B017 - torch's own error: the torch layer fails the same way
            _through(tool, model, x)
        return
    _compare(tool, model, x)


def _compare(tool: str, model: nn.Module, x: torch.Tensor) -> None:
    """The tool's result against eager PyTorch's, each run from the same state (a train-mode run
    may update running statistics)."""
    with torch.no_grad() if tool != "forward AD" else contextlib.nullcontext():
        state = copy.deepcopy(model.state_dict())
        expected = _reference(tool, model, x).detach()
        model.load_state_dict(state)
        actual = _through(tool, model, x)
        model.load_state_dict(state)
    # float32 kernels TorchScript or FX may pick differently: a few ulp of the output's scale
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class _HelperNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3), _HelperBatchNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_subclass_whose_batch_norm_call_the_rewrite_cannot_see_runs_eagerly_and_refuses_scripting() -> None:
    model = _HelperNet().eval()
    x = _input("conv")
    converted = normswap.convert(model, x, to="groupnorm").model
    layer = converted.bn
    assert isinstance(layer, nn.GroupNorm)
    with torch.no_grad():
        reference = nn.GroupNorm(layer.num_groups, 16, eps=layer.eps)
        reference.load_state_dict({"weight": layer.weight, "bias": layer.bias})
        expected = torch.relu(reference(model.conv(x)))
        torch.testing.assert_close(converted(x), expected)  # computed by the target at run time
        torch.testing.assert_close(torch.jit.trace(converted, -x)(x), expected)
    with pytest.raises(normswap.NormswapError, match=r"cannot be scripted: .*_helper_batch_norm.*torch\.jit\.trace"):
        torch.jit.script(converted)


PUBLIC_LAYERS = {
    "ChannelLayerNorm": lambda: ChannelLayerNorm(8, eps=1e-3),
    "ChannelLayerNorm-contiguous-gradient": lambda: ChannelLayerNorm(8, contiguous_gradient=True),
    "FrozenBatchNorm": lambda: FrozenBatchNorm(8),
    "GroupNormBN": lambda: GroupNormBN(32, groups=4),
    "GroupNorm": lambda: normswap_nn.GroupNorm(2, 8),
    "LayerNorm": lambda: normswap_nn.LayerNorm(8),
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("layer", list(PUBLIC_LAYERS))
def test_what_lint_fix_writes_scripts_traces_fx_traces_and_differentiates_forward(layer: str, tool: str) -> None:
    module = PUBLIC_LAYERS[layer]()
    channels = 32 if layer == "GroupNormBN" else 8
    shape = (4, channels) if layer == "LayerNorm" else (4, channels, 5, 3)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.uniform_(0.5, 1.5)
    model = nn.Sequential(module, nn.Tanh()).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    _compare(tool, model, x)


def test_the_contiguous_gradient_form_hands_the_layer_before_a_contiguous_gradient() -> None:
    """What Opacus' grad_sample_mode="ew" convolutions need (they `.view` their output's gradient):
    the default form hands it back transposed; the two forms compute the same function."""
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    conv = nn.Conv2d(3, 8, 3)
    for flag, contiguous in ((False, False), (True, True)):
        norm = ChannelLayerNorm(8, contiguous_gradient=flag)
        seen = []
        y = conv(x)
        y.register_hook(lambda grad, seen=seen: seen.append(grad.is_contiguous()))
        norm(y).pow(2).sum().backward()
        assert seen == [contiguous]
    default, contiguous_form = ChannelLayerNorm(8), ChannelLayerNorm(8, contiguous_gradient=True)
    with torch.no_grad():
        for form in (default, contiguous_form):
            form.weight.copy_(torch.linspace(0.5, 1.5, 8))
            form.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    y = (conv(x) * 3 + 1).detach().requires_grad_()
    computed = []
    for form in (default, contiguous_form):
        out = form(y)
        computed.append((out, *torch.autograd.grad(out.pow(2).sum(), (y, form.weight, form.bias))))
    for actual, expected in zip(computed[1], computed[0], strict=True):  # the output, d/dx, d/dweight, d/dbias
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)  # float32 rounding of sums over 256 values


def test_a_conversion_for_differential_privacy_asks_for_contiguous_gradients() -> None:
    model = _built("sequence")
    conversion = normswap.convert(
        model, _input("sequence"), to="layernorm", context=normswap.Context(differential_privacy=True)
    )
    assert conversion.model.bn.contiguous_gradient
    assert "bn: channel LayerNorm -> contiguous_gradient=True (Opacus' ew mode)" in conversion.changes
    assert not normswap.convert(model, _input("sequence"), to="layernorm").model.bn.contiguous_gradient


# --- eager quantization ---------------------------------------------------------------------------


def _quantized(model: nn.Module, fuse: list[list[str]], calibration: torch.Tensor) -> nn.Module:
    """torch's eager post-training quantization: fuse, QuantWrapper, prepare, calibrate, convert."""
    model = copy.deepcopy(model).eval()
    if fuse:
        model = torch.ao.quantization.fuse_modules(model, fuse)
    wrapped = torch.ao.quantization.QuantWrapper(model)
    wrapped.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors
        prepared = torch.ao.quantization.prepare(wrapped)
        with torch.no_grad():
            prepared(calibration)
        return torch.ao.quantization.convert(prepared)


# (model, modules to fuse, whether torch quantizes the BatchNorm original: it has no quantized BatchNorm1d)
QUANTIZATION = {
    "conv-bn-relu-fused": ("conv", [["0", "1", "2"]], True),
    "conv-bn-fused": ("conv", [["0", "1"]], True),
    "conv-bn-alone": ("conv", [], True),
    "linear-bn-fused": ("mlp", [["0", "1"]], True),
    "linear-bn-alone": ("mlp", [], False),
}


@pytest.mark.parametrize("case", list(QUANTIZATION))
def test_a_frozen_conversion_quantizes_as_the_batchnorm_original_does(case: str) -> None:
    """The same quantized model as torch makes of the original: fusion folds the same statistics
    into the same weights; a frozen layer left alone becomes a quantized batch norm like BatchNorm
    (over (N, C) too, where torch has none for BatchNorm1d)."""
    name, fuse, original_quantizes = QUANTIZATION[case]
    original = _built(name)
    x = _input(name)
    actual = _quantized(normswap.convert(original, x, to="frozen").model, fuse, x)
    assert not [m for m in actual.modules() if isinstance(m, FrozenBatchNorm)]
    with torch.no_grad():
        float_output = original(x)
        if original_quantizes:
            torch.testing.assert_close(actual(x), _quantized(original, fuse, x)(x), rtol=0, atol=0)  # same integers
        else:
            with pytest.raises(NotImplementedError):
                _quantized(original, fuse, x)(x)
        # a quantization of the model: within a few quantization steps of the float output
        assert float((actual(x) - float_output).abs().max()) < 0.1 * float(float_output.abs().max())


def test_quantization_aware_training_folds_a_frozen_layer_and_trains() -> None:
    frozen = normswap.convert(_built("conv"), _input("conv"), to="frozen").model.train()
    fused = torch.ao.quantization.fuse_modules_qat(frozen, [["0", "1", "2"]])
    assert isinstance(fused[0], torch.ao.nn.intrinsic.ConvReLU2d) and isinstance(fused[1], nn.Identity)
    fused.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    prepared = torch.ao.quantization.prepare_qat(fused)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    before = prepared[0].weight.detach().clone()
    prepared(_input("conv")).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(prepared[0].weight, before)  # the folded convolution trains; no statistics do
    assert not [m for m in prepared.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))]
