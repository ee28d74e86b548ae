"""The passes on their own: positive, negative (nothing modified) and edge cases."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from models import build, input_for
from normswap.capture.tracer import trace
from normswap.errors import PlanError
from normswap.nn import ChannelLayerNorm
from normswap.passes import Pass, PassError, PassManager, PassResult, RewriteFunctionalBatchNorm, SwapBatchNormModules
from normswap.plan import Plan, PlanEntry


def test_swap_modules_replaces_planned_layers_only() -> None:
    model = build("resnet")
    plan = Plan(
        [
            PlanEntry(
                "bn1", "layernorm", {"num_channels": 16, "eps": 1e-5, "affine": True, "layout": "channels_first"}
            ),
            PlanEntry("bn2", "keep"),
        ]
    )
    result = SwapBatchNormModules(plan)(model)
    assert result.modified and result.changes == ["bn1: BatchNorm2d -> layernorm"]
    assert isinstance(model.bn1, ChannelLayerNorm) and isinstance(model.bn2, nn.BatchNorm2d)


def test_swap_modules_with_nothing_to_do_modifies_nothing() -> None:
    model = build("resnet")
    before = [type(m) for m in model.modules()]
    result = SwapBatchNormModules(Plan([PlanEntry("bn1", "keep")]))(model)
    assert not result.modified and [type(m) for m in model.modules()] == before


def test_swap_modules_rejects_a_plan_for_another_layer_type() -> None:
    plan = Plan([PlanEntry("conv1", "groupnorm", {"num_groups": 4, "num_channels": 16, "eps": 1e-5, "affine": True})])
    with pytest.raises(PlanError, match="expects a BatchNorm at 'conv1' but the model has a Conv2d"):
        SwapBatchNormModules(plan)(build("resnet"))


def test_swap_modules_rejects_a_channel_mismatch() -> None:
    plan = Plan([PlanEntry("bn1", "groupnorm", {"num_groups": 4, "num_channels": 32, "eps": 1e-5, "affine": True})])
    with pytest.raises(PlanError, match="expects 32 channels but the model's layer has 16"):
        SwapBatchNormModules(plan)(build("resnet"))


def test_rewrite_functional_rewrites_the_node() -> None:
    graph_module = trace(build("functional").train())
    plan = Plan(
        [PlanEntry("batch_norm", "layernorm", {"num_channels": 8, "eps": 1e-5, "affine": True}, kind="functional")]
    )
    result = RewriteFunctionalBatchNorm(plan)(graph_module)
    assert result.modified and "channel_layer_norm" in graph_module.code
    assert "running_mean" not in graph_module.code  # the orphaned statistics went with the call
    model, x = build("functional"), input_for("functional")
    features = model.conv(x)  # what the rewritten graph must compute: LayerNorm over channels, written out
    mean, var = features.mean(1, keepdim=True), features.var(1, unbiased=False, keepdim=True)
    normalized = (features - mean) / torch.sqrt(var + 1e-5) * model.weight.reshape(1, -1, 1, 1) + model.bias.reshape(
        1, -1, 1, 1
    )
    expected = model.head(torch.relu(normalized).mean(dim=(2, 3)))
    torch.testing.assert_close(graph_module(x), expected, rtol=1e-5, atol=1e-6)


def test_rewrite_functional_without_functional_entries_is_a_no_op() -> None:
    model = build("resnet")
    result = RewriteFunctionalBatchNorm(Plan([PlanEntry("bn1", "keep")]))(model)
    assert not result.modified and result.model is model


def test_rewrite_functional_needs_a_graph_and_the_named_node() -> None:
    plan = Plan(
        [
            PlanEntry(
                "batch_norm_7",
                "groupnorm",
                {"num_groups": 2, "num_channels": 8, "eps": 1e-5, "affine": True},
                kind="functional",
            )
        ]
    )
    with pytest.raises(PlanError, match="symbolically traced graph"):
        RewriteFunctionalBatchNorm(plan)(build("functional"))
    with pytest.raises(PlanError, match="batch_norm_7"):
        RewriteFunctionalBatchNorm(plan)(trace(build("functional")))


def test_pass_manager_composes_and_reports_changes() -> None:
    conv = normswap.convert(build("functional"), input_for("functional"), to="groupnorm")
    fresh = trace(build("functional").train())
    result = PassManager([SwapBatchNormModules(conv.plan), RewriteFunctionalBatchNorm(conv.plan)])(fresh)
    assert result.modified and result.changes == ["batch_norm: F.batch_norm -> groupnorm"]
    with torch.no_grad():
        torch.testing.assert_close(
            result.model.eval()(input_for("functional")), conv.model.eval()(input_for("functional"))
        )


class _Broken(Pass):
    """A pass with a bug: it fails on its second layer."""

    def call(self, model: nn.Module) -> PassResult:
        for name in ("bn1", "bn2"):
            with self.working_on(name):
                if name == "bn2":
                    raise KeyError("num_groups")
        return PassResult(model, False)


class _ClaimsInPlace(Pass):
    def call(self, model: nn.Module) -> PassResult:
        return PassResult(copy.deepcopy(model), True)


class _Copies(Pass):
    in_place = False

    def call(self, model: nn.Module) -> PassResult:
        return PassResult(copy.deepcopy(model), False)


def test_a_failure_inside_a_pass_names_the_pass_and_the_layer() -> None:
    with pytest.raises(
        PassError, match=r"Pass _Broken failed while running at `bn2`: KeyError: 'num_groups'"
    ) as caught:
        PassManager([_Broken()])(build("resnet"))
    assert isinstance(caught.value.__cause__, KeyError) and caught.value.exit_code == 3


def test_a_graph_pass_failure_names_the_node() -> None:
    plan = Plan(
        [PlanEntry("batch_norm", "layernorm", {"num_channels": 8, "eps": 1e-5, "affine": True}, kind="functional")]
    )
    rewrite = RewriteFunctionalBatchNorm(plan)
    rewrite._rewrite = lambda model, node, entry: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(PassError, match=r"at `%batch_norm : .*torch.nn.functional.batch_norm.*`: RuntimeError: boom"):
        rewrite(trace(build("functional").train()))


def test_the_manager_holds_each_pass_to_its_in_place_declaration() -> None:
    model = build("resnet")
    with pytest.raises(PassError, match="declares that it works in place, but it did not"):
        PassManager([_ClaimsInPlace()])(model)
    result = PassManager([_Copies()])(model)
    assert result.model is not model and not result.modified
