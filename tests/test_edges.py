"""No silent wrong result at the edges (issue 22): each real pattern gives the right result or one
sentence naming the layer. Legacy weight_norm and tied weights under fold, hooks, parametrizations,
unreached BatchNorms, a forward that reads the statistics, float64, the meta device, SyncBatchNorm
under a CPU process group, TorchScript."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

import normswap
from normswap.errors import CaptureError, PlanError


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics away from 0 / 1 and a non-trivial affine: a fold or a freeze that loses
    them shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()(x * 2 + 1)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _same(a: nn.Module, b: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(*inputs), b.eval()(*inputs), rtol=tol, atol=tol)


# --- fold: the producer's weights must be its own plain parameters ------------------------------


class WeightNormed(nn.Module):
    """A conv under the legacy `torch.nn.utils.weight_norm` (audio and vocoder checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates the legacy form; checkpoints still use it
            self.conv = nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TiedWeights(nn.Module):
    """A linear layer whose weight another layer reuses (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.decode = nn.Linear(8, 8)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.relu(self.bn(self.encode(x))))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class WeightReadInForward(ConvBN):
    """The producer's weight is also used directly in forward (a second, weight-shared branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + nn.functional.conv1d(x, self.conv.weight, padding=1)


class HookedProducer(ConvBN):
    """A forward hook on the producer (feature extraction that also shifts the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv.register_forward_hook(lambda module, args, output: output + 1)


class HookedBatchNorm(ConvBN):
    """A forward pre-hook on the BatchNorm: it rescales the BatchNorm's input, which a fold removes."""

    def __init__(self) -> None:
        super().__init__()
        self.bn.register_forward_pre_hook(lambda module, args: (args[0] * 2,))


class TrainingBranch(nn.Module):
    """One convolution feeding a train-only BatchNorm and, in eval mode, another one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.bn_train, self.bn = nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_train(self.conv(x)) if self.training else self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("model", "x", "reason"),
    [
        (WeightNormed, torch.randn(4, 4, 10), "recomputed before every call"),
        (TiedWeights, torch.randn(4, 8), "shared with decode.weight (tied weights)"),
        (WeightReadInForward, torch.randn(4, 4, 10), "forward also reads directly (conv.weight)"),
        (HookedProducer, torch.randn(4, 4, 10), "whose output a forward hook sees"),
        (HookedBatchNorm, torch.randn(4, 4, 10), "has forward hooks"),
        (TrainingBranch, torch.randn(4, 4, 10), "also used elsewhere, in train or eval mode"),
    ],
    ids=[
        "legacy-weight-norm",
        "tied-weights",
        "weight-read-in-forward",
        "hooked-producer",
        "hooked-batchnorm",
        "training-branch",
    ],
)
def test_fold_refuses_a_producer_whose_weights_are_not_its_own(model: type, x: torch.Tensor, reason: str) -> None:
    original = _trained(model(), x)
    for conversion in (
        normswap.convert(original, x, to="fold"),
        normswap.convert(original, x, context=normswap.Context(inference_only=True)),
    ):
        entry = conversion.plan.get("bn_train" if model is TrainingBranch else "bn")
        assert entry.target == "frozen" and reason in entry.reason  # fell back, saying why
        _same(conversion.model, original, x)  # the eval function, exactly
        _same(conversion.model, original, x)  # and again: nothing recomputed the weights in between


# --- hooks, attributes and parametrizations carry over -------------------------------------------


def test_hooks_on_a_batchnorm_carry_over_with_their_flags() -> None:
    x = torch.randn(4, 3, 8, 8)
    original = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), x)
    reference = original(x)
    features: list[torch.Tensor] = []
    original[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))  # input rescaling
    handle = original[1].register_forward_hook(
        lambda module, args, kwargs, output: features.append(output), with_kwargs=True
    )
    original[1].tag = "exclude-from-weight-decay"  # an attribute code put there
    expected = original(x)
    assert not torch.allclose(expected, reference)  # the pre-hook matters
    conversion = normswap.convert(original, x, to="frozen", inplace=True)
    frozen = conversion.model[1]
    assert frozen is original[1] and type(frozen).__name__ == "FrozenBatchNorm"
    features.clear()
    with torch.no_grad():
        assert torch.equal(conversion.model(x), expected)  # frozen is BatchNorm's eval function, hooks included
    assert len(features) == 1 and frozen.tag == "exclude-from-weight-decay"
    handle.remove()  # the user's handle still removes the hook from the replacement
    conversion.model(x)
    assert len(features) == 1


class Exp(nn.Module):
    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v.exp()

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w.log()


def test_a_parametrization_of_the_batchnorm_weight_moves_to_the_replacement() -> None:
    x = torch.randn(4, 3, 8, 8)
    original = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), x)
    parametrize.register_parametrization(original[1], "weight", Exp())  # weight = exp(v)
    conversion = normswap.convert(original, x, to="groupnorm")
    norm = conversion.model[1]
    assert isinstance(norm, nn.GroupNorm) and parametrize.is_parametrized(norm, "weight")
    assert "1.parametrizations.weight.original" in conversion.model.state_dict()
    torch.testing.assert_close(
        norm.parametrizations.weight.original, original[1].parametrizations.weight.original, rtol=0, atol=0
    )
    reference = nn.functional.group_norm(
        original[0](x), norm.num_groups, original[1].weight, original[1].bias, norm.eps
    )
    torch.testing.assert_close(conversion.model(x), reference, rtol=1e-5, atol=1e-6)
    # fold absorbs the parametrized weight into the convolution: the function stays
    folded = normswap.convert(original, x, to="fold")
    _same(folded.model, original, x)


def test_a_parametrization_with_no_place_in_the_replacement_is_refused_by_name() -> None:
    x = torch.randn(4, 3, 8, 8)
    original = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), x)
    parametrize.register_parametrization(original[1], "running_var", Exp())  # statistics kept in log space
    with pytest.raises(
        PlanError,
        match=r"Layer '1' has a parametrization on its running_var \(Exp\), and its replacement has no running_var",
    ):
        normswap.convert(original, x, to="groupnorm")
    _same(normswap.convert(original, x, to="frozen").model, original, x)  # frozen keeps running_var: it moves


# --- layers the example inputs do not reach --------------------------------------------------------


class PerDomain(nn.Module):
    """One BatchNorm per domain, selected by a forward argument (domain-specific BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norms = nn.ModuleDict({"photo": nn.BatchNorm2d(16), "sketch": nn.BatchNorm2d(16)})

    def forward(self, x: torch.Tensor, domain: str = "photo") -> torch.Tensor:
        return self.norms[domain](self.conv(x))


class Branchy(nn.Module):
    """A branch only some inputs take."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.common, self.rare = nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if float(x.mean()) > 10:  # data-dependent: the example never takes it
            return self.rare(h)
        return self.common(h)


def _batch_independent(model: nn.Module, *call: object) -> bool:
    """Sample 0 alone equals sample 0 in the batch, with the model in train mode."""
    x, *rest = call
    with torch.no_grad():
        model.train()
        together, alone = model(x, *rest)[:1], model(x[:1], *rest)
    return torch.allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_unreached_layers_are_converted_under_an_explicit_target_and_lint_says_so() -> None:
    x = torch.randn(4, 3, 8, 8)
    conversion = normswap.convert(PerDomain(), x, to="groupnorm")
    assert all(isinstance(m, nn.GroupNorm) for m in conversion.model.norms.values())
    assert "not reached by the example inputs" in conversion.plan.get("norms.sketch").reason
    assert _batch_independent(conversion.model, x, "sketch")  # the domain the example did not take
    report = normswap.lint(PerDomain(), x)
    assert [f.site.name for f in report.findings if f.code == "NS205"] == ["norms.sketch"]

    branchy = normswap.convert(Branchy(), torch.randn(4, 8))
    assert branchy.plan.get("rare").target == "layernorm"  # auto: a BatchNorm1d's natural target, reached or not
    assert _batch_independent(branchy.model, torch.randn(4, 8) + 20)  # the branch the example did not take


def test_an_unreached_lazy_layer_has_no_channel_count_and_is_refused_by_name() -> None:
    class LazyAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.aux = nn.BatchNorm1d(8), nn.LazyBatchNorm1d()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    for call in (
        lambda: normswap.convert(LazyAux(), torch.randn(4, 8), to="groupnorm"),
        lambda: normswap.lint(LazyAux(), torch.randn(4, 8)),
    ):
        with pytest.raises(
            PlanError, match=r"Lazy layer 'aux' \(LazyBatchNorm1d\) was not reached by the example inputs.*reach it"
        ):
            call()


# --- a forward that reads the BatchNorm's own tensors or attributes -------------------------------


class ReadsStatistics(nn.Module):
    """De-normalizes with the BatchNorm's running variance (reads `bn.running_var` in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * torch.sqrt(self.bn.running_var + self.bn.eps)


class ReadsMomentum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * (1 - self.bn.momentum)


def test_statistics_the_forward_reads_are_kept_and_said() -> None:
    x = torch.randn(4, 8)
    original = _trained(ReadsStatistics(), x)
    conversion = normswap.convert(original, x, to="layernorm")
    entry = conversion.plan.get("bn")
    assert entry.read_by_forward == ("running_var",) and "forward reads its running_var" in entry.reason
    assert "bn.running_var" in conversion.model.state_dict() and "bn.running_mean" not in conversion.model.state_dict()
    torch.testing.assert_close(conversion.model.bn.running_var, original.bn.running_var)
    conversion.model(x)  # runs
    fresh = normswap.apply_plan(ReadsStatistics(), normswap.Plan.from_json(conversion.plan.to_json()))
    fresh.load_state_dict(conversion.model.state_dict())  # the plan file says it too: the same keys


class LooksUpStatistics(nn.Module):
    """Reads a statistic through the buffer table, where no attribute access shows it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * dict(self.bn.named_buffers())["running_var"].sqrt()


def test_a_forward_reading_an_attribute_the_replacement_lacks_is_refused() -> None:
    with pytest.raises(PlanError, match=r"forward reads 'momentum' of a replaced layer \(bn\).*--keep LAYER"):
        normswap.convert(ReadsMomentum(), torch.randn(4, 8), to="groupnorm")
    with pytest.raises(
        PlanError, match=r"looks up 'running_var' in the state of a replaced layer \(bn\).*--keep LAYER"
    ):
        normswap.convert(LooksUpStatistics(), torch.randn(4, 8), to="groupnorm")


# --- dtype, device, process group, TorchScript ----------------------------------------------------


def test_float64_models_are_converted_in_float64() -> None:
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    original = _trained(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).double(), x)
    frozen = normswap.convert(original, x, to="frozen").model
    assert frozen[1].running_var.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(frozen(x), original(x))  # the same float64 arithmetic: not one bit off
    grouped = normswap.convert(original, x, to="groupnorm").model
    assert grouped[1].weight.dtype == torch.float64 and torch.equal(grouped[1].weight, original[1].weight)


def test_a_model_on_the_meta_device_converts_as_a_skeleton() -> None:
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    conversion = normswap.convert(skeleton, torch.empty(2, 3, 8, 8, device="meta"), to="groupnorm")
    norm = conversion.model[1]
    assert isinstance(norm, nn.GroupNorm) and norm.weight.is_meta
    real = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(norm.num_groups, 8), nn.ReLU())
    conversion.model.load_state_dict(real.state_dict(), assign=True)  # the usual path: skeleton first, then weights
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conversion.model(x), real(x))


def test_syncbn_under_a_cpu_process_group_is_refused(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(
            PlanError, match=r"Layer '1' .*cannot become a SyncBatchNorm here: a gloo process group is running.*GPU"
        ):
            normswap.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), torch.randn(2, 3, 8, 8), to="syncbn")
    finally:
        dist.destroy_process_group()


def test_a_torchscript_module_is_one_sentence() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    for call in (
        lambda: normswap.convert(scripted, torch.randn(2, 3, 8, 8)),
        lambda: normswap.lint(scripted, torch.randn(2, 3, 8, 8)),
    ):
        with pytest.raises(CaptureError) as refused:
            call()
        message = str(refused.value)
        assert (
            message.startswith("RecursiveScriptModule is a TorchScript module")
            and "convert the eager model, then script" in message
        )
        assert message.count(". ") == 0  # one sentence
