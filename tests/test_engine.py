"""Core engine: capture, discovery, plan and rewrite on every test model and every target."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import normswap
from models import MODELS, build, input_for
from normswap.errors import CaptureError, PlanError
from normswap.export.residual import count_batch_statistics_calls, residual_batchnorm
from normswap.nn import ChannelLayerNorm, FrozenBatchNorm

TARGETS = ("auto", "groupnorm", "layernorm", "frozen", "syncbn", "batchnorm", "fold")
# (model, target) pairs where the target cannot replace a site: planning must refuse clearly.
REFUSED = {
    ("no_running_stats", "frozen"): "nothing to freeze",
    ("functional", "syncbn"): "SyncBatchNorm replaces only",
    ("no_running_stats", "fold"): "no running statistics to fold",
}
CASES = [(m, t) for m in MODELS for t in TARGETS]


def _convert(name: str, to: str):
    model = build(name)
    return model, normswap.convert(model, input_for(name), to=to)


@pytest.mark.parametrize("name,to", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_convert_every_model_every_target(name: str, to: str) -> None:
    if (name, to) in REFUSED:
        with pytest.raises(PlanError, match=REFUSED[(name, to)]):
            _convert(name, to)
        return
    original, conv = _convert(name, to)
    model, plan = conv.model, conv.plan
    x = input_for(name, batch=8)

    # no BatchNorm left unless the plan keeps it on purpose
    assert residual_batchnorm(model, plan) == []

    # batchnorm keeps the function in both modes (before training moves the statistics below):
    # the same op on the same tensors, bit for bit
    if to == "batchnorm":
        for train in (False, True):
            with torch.no_grad():
                expected = copy.deepcopy(original).train(train)(x)
                torch.testing.assert_close(copy.deepcopy(model).train(train)(x), expected, rtol=0, atol=0)

    # forward and backward in train and eval mode
    for train in (True, False):
        model.train(train)
        out = model(x)
        out.float().pow(2).mean().backward()
        assert torch.isfinite(out).all()
    model.eval()

    # per-sample targets are batch-independent even in train mode: sample alone == inside a batch of 8
    if to in ("groupnorm", "layernorm", "frozen") or (to == "auto" and all(e.target != "syncbn" for e in plan)):
        kept_dependent = [s for s in conv.sites if s.batch_dependent and plan.get(s.name).target == "keep"]
        if not kept_dependent:
            owners = [s.owner for s in conv.sites if s.kind == "functional"]  # forward(training=self.training)
            assert count_batch_statistics_calls(model, x, train=True, owners=owners) == 0
            model.train()
            with torch.no_grad():
                together = model(x)
                alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
            # fp32: per-sample reductions differ only by summation order between batch sizes
            torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
            model.eval()

    # frozen keeps the eval-mode function exactly (same op, same statistics)
    if to == "frozen":
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-6)

    # the plan round-trips through JSON and re-applies to a fresh instance
    restored_plan = normswap.Plan.from_json(plan.to_json())
    assert restored_plan.to_dict() == plan.to_dict()
    fresh = normswap.apply_plan(MODELS[name](), restored_plan, example_inputs=x)
    assert set(fresh.state_dict()) == set(model.state_dict())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_leaves_the_input_model_untouched(name: str) -> None:
    model = build(name)
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    normswap.convert(model, input_for(name), to="auto")
    after = model.state_dict()
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert [type(m) for m in model.modules()] == classes
    assert model.training is False


def test_inplace_conversion_modifies_the_model() -> None:
    model = build("resnet")
    conv = normswap.convert(model, input_for("resnet"), to="groupnorm", inplace=True)
    assert conv.model is model
    assert isinstance(model.bn1, nn.GroupNorm)


def test_capture_methods_cascade() -> None:
    assert normswap.convert(build("resnet"), input_for("resnet")).capture_method == "fx"
    assert (
        normswap.convert(build("rnn"), input_for("rnn")).capture_method == "export"
    )  # torch.zeros(x.shape[0]) in forward
    assert normswap.convert(build("untraceable"), input_for("untraceable")).capture_method == "hooks"


def test_sites_record_what_design_lists() -> None:
    conv = normswap.convert(build("resnet"), input_for("resnet"))
    bn1 = conv.sites[0]
    assert (bn1.name, bn1.kind, bn1.flavour, bn1.num_features) == ("bn1", "module", "BatchNorm2d", 16)
    assert bn1.input_shape == (4, 16, 12, 12)
    assert (bn1.affine, bn1.track_running_stats, bn1.eps, bn1.momentum, bn1.call_count) == (True, True, 1e-5, 0.1, 1)
    assert bn1.producers == ("conv1 (Conv2d)",)
    assert bn1.consumers == ("relu",)
    assert bn1.defined_at.path == "tests/models.py"
    assert bn1.defined_at.code == "self.bn1 = nn.BatchNorm2d(width)"
    assert bn1.called_at[0].code == "x = F.relu(self.bn1(self.conv1(x)))"


def test_recurrent_reuse_is_one_site_with_call_count() -> None:
    conv = normswap.convert(build("rnn"), input_for("rnn"))
    (site,) = conv.sites
    assert site.call_count == 4
    assert conv.plan.get("bn").target == "layernorm"
    assert isinstance(conv.model.bn, nn.LayerNorm)


def test_functional_site_is_rewritten_in_the_graph() -> None:
    conv = normswap.convert(build("functional"), input_for("functional"), to="groupnorm")
    (site,) = conv.sites
    assert (site.kind, site.name, site.owner) == ("functional", "batch_norm", "")
    assert isinstance(conv.model, fx.GraphModule)
    assert "group_norm" in conv.model.code and "batch_norm" not in conv.model.code
    assert {"weight", "bias"} <= set(conv.model.state_dict())


def test_subclass_keeps_its_activation() -> None:
    model = build("subclass")
    conv = normswap.convert(model, input_for("subclass"), to="groupnorm")
    bn = conv.model.bn
    assert type(bn).__name__ == "GroupNormAct2d" and isinstance(bn, torch.nn.GroupNorm)
    assert not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    x = torch.randn(2, 8, 5, 5)
    reference = torch.relu(torch.nn.functional.group_norm(x, bn.num_groups, bn.weight, bn.bias, bn.eps))
    torch.testing.assert_close(bn(x), reference)
    assert (bn(x) >= 0).all()  # the ReLU survived the swap


def test_lookalike_frozen_bn_is_left_alone() -> None:
    conv = normswap.convert(build("lookalike"), input_for("lookalike"))
    lookalike = next(s for s in conv.sites if s.name == "bn")
    assert lookalike.kind == "lookalike" and not lookalike.batch_dependent
    assert conv.plan.get("bn").target == "keep"
    assert not any(f.site is lookalike for f in conv.findings)


def test_replacement_modules_carry_weights_and_names() -> None:
    model = build("resnet")
    gn = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    assert isinstance(gn.bn1, nn.GroupNorm) and gn.bn1.num_groups == 1  # 16 channels: one group of 16
    torch.testing.assert_close(gn.bn1.weight, model.bn1.weight, rtol=0, atol=0)
    ln = normswap.convert(model, input_for("resnet"), to="layernorm").model
    assert isinstance(ln.bn1, ChannelLayerNorm)
    frozen = normswap.convert(model, input_for("resnet"), to="frozen").model
    assert isinstance(frozen.bn1, FrozenBatchNorm)
    torch.testing.assert_close(frozen.bn1.running_var, model.bn1.running_var, rtol=0, atol=0)
    assert set(frozen.state_dict()) == set(model.state_dict()) - {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize(
    "channels,values,max_groups,per_group,expected",
    [
        (64, 49, 32, 16, 4),  # 16 channels per group
        (512, 49, 32, 16, 32),  # at most 32 groups
        (2048, 49, 32, 16, 32),  # 64 channels per group at the cap
        (72, 1, 32, 16, 4),  # largest divisor with >= 16 channels per group: 18 per group
        (24, 4, 32, 16, 1),  # narrower than 32 channels: one group
        (256, 49, 8, 16, 8),  # --groups 8 caps it
        (64, 49, 32, 4, 16),  # --channels-per-group 4
        (16, 1, 32, 1, 8),  # one channel per group asked for, but not of single values: 2 per group
        (72, 1, 32, 1, 24),  # asked for: one channel per group where each holds several values... of 1: 3 per group
    ],
    ids=["64ch", "512ch", "2048ch", "72ch-pooled", "24ch", "cap-8", "per-group-4", "16-features-k1", "72-pooled-k1"],
)
def test_group_choice(channels: int, values: int, max_groups: int, per_group: int, expected: int) -> None:
    from normswap.targets.groupnorm import choose_num_groups

    groups, reason = choose_num_groups(channels, values, max_groups, per_group)
    assert groups == expected
    assert channels % groups == 0 and (channels // groups) * values >= 2  # never a group of one value
    assert f"GroupNorm({groups}, {channels})" in reason


def test_mobilenet_groups_divide_channels() -> None:
    conv = normswap.convert(build("mobilenet"), input_for("mobilenet"), to="groupnorm")
    for entry in conv.plan:
        assert entry.params["num_channels"] % entry.params["num_groups"] == 0
    assert conv.plan.get("expand.1").params["num_groups"] == 4  # 72 channels: 18 per group
    narrow = normswap.convert(build("mobilenet"), input_for("mobilenet"), to="groupnorm", channels_per_group=1)
    assert narrow.plan.get("expand.1").params["num_groups"] == 24  # the largest divisor of 72 up to 32, when asked


def test_not_a_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        normswap.convert(lambda x: x, torch.zeros(1))


def test_inputs_the_model_cannot_run_are_refused() -> None:
    with pytest.raises(CaptureError, match=r"cannot run on example inputs of shape \(2, 5, 8, 8\)"):
        normswap.convert(build("resnet"), torch.zeros(2, 5, 8, 8))


def test_plan_for_another_model_is_refused() -> None:
    plan = normswap.convert(build("resnet"), input_for("resnet")).plan
    with pytest.raises(PlanError, match=r"another configuration|does not have"):
        normswap.apply_plan(build("mlp"), plan)


def test_plan_json_is_validated() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        normswap.Plan.from_json("{")
    with pytest.raises(PlanError, match="unknown target 'instancenorm'"):
        normswap.Plan.from_json('{"version": 1, "sites": [{"name": "bn", "target": "instancenorm"}]}')


class WithAuxHead(nn.Module):
    """An auxiliary head with BatchNorm that forward never uses (like Inception's aux logits in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.slow
def test_an_unreached_batchnorm_is_converted_and_said_so(tmp_path) -> None:
    x = torch.randn(4, 3, 8, 8)
    conv = normswap.convert(WithAuxHead().eval(), x, to="groupnorm")
    entry = conv.plan.get("aux.1")
    assert entry.target == "groupnorm" and "not reached by the example inputs" in entry.reason
    assert isinstance(conv.model.aux[1], nn.GroupNorm)
    assert [f.code for f in conv.findings if f.site is not None and f.site.name == "aux.1"] == ["NS205"]
    assert residual_batchnorm(conv.model, conv.plan) == []
    path = normswap.export_onnx(conv.model, x, tmp_path / "aux.onnx")
    assert normswap.validate_onnx(conv.model, path, x, plan=conv.plan).passed


class StoredTwice(nn.Module):
    """One BatchNorm object registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 1)
        shared = nn.BatchNorm2d(24)
        self.bn_a = shared
        self.bn_b = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.bn_a(self.conv(x)))


def _stored_twice(sync: bool) -> StoredTwice:
    model = StoredTwice()
    if sync:  # by hand: torch's convert_sync_batchnorm would make two layers of the one
        model.bn_a = model.bn_b = nn.SyncBatchNorm(24)
    return model.eval()


@pytest.mark.parametrize("to", ["auto", "groupnorm", "layernorm", "frozen", "syncbn", "batchnorm"])
def test_a_batchnorm_stored_under_two_names_stays_one_module(to: str) -> None:
    x = torch.randn(4, 3, 8, 8)
    model = _stored_twice(sync=to == "batchnorm")  # batchnorm: the way back from SyncBatchNorm
    conv = normswap.convert(model, x, to=to, context=normswap.Context(batch_size=2))
    assert conv.model.bn_a is conv.model.bn_b and type(conv.model.bn_b) is not type(model.bn_b)
    fresh = normswap.apply_plan(_stored_twice(sync=to == "batchnorm"), conv.plan)
    assert fresh.bn_a is fresh.bn_b and type(fresh.bn_b) is type(conv.model.bn_b)
    fresh.load_state_dict(conv.model.state_dict())  # strict: the same keys under both names
    if to not in ("syncbn", "batchnorm"):  # they keep batch statistics by design
        assert count_batch_statistics_calls(conv.model, x) == 0
