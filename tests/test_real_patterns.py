"""Replicas of how real model zoos write BatchNorm (tests/models.py, REAL_PATTERNS), crossed with
every target: each converts with no batch statistics left, or is refused with a sentence."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from models import REAL_PATTERNS, TimmBatchNormAct2d, build_real, inputs_for
from normswap.errors import PlanError
from normswap.postcondition import batch_statistics_users

TARGETS = ("auto", "groupnorm", "layernorm", "frozen", "syncbn", "batchnorm", "fold")
# (model, target) -> a phrase of the refusal. Everything else must convert.
REFUSED = {
    # batchnorm puts torch's BatchNorm2d in place of the whole subclass: its hand-written statistics go too
    **{("naive_sync_bn", t): "computes its batch statistics by hand" for t in TARGETS if t != "batchnorm"},
    ("timm_norm_act_no_stats", "frozen"): "nothing to freeze",
    ("timm_norm_act_no_stats", "fold"): "no running statistics to fold",
}
CASES = [(m, t) for m in REAL_PATTERNS for t in TARGETS]
IDS = [f"{m}-{t}" for m, t in CASES]
# a graph's nodes are its "batch": a node's output depends on its neighbours by design
NO_BATCH_AXIS = {"pyg_graph"}
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _convert(name: str, target: str):
    original = build_real(name)
    return original, normswap.convert(original, inputs_for(name), to=target)


def _outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name,target", CASES, ids=IDS)
def test_every_real_pattern_converts_or_is_refused(name: str, target: str) -> None:
    if (name, target) in REFUSED:
        with pytest.raises(PlanError, match=REFUSED[(name, target)]):
            _convert(name, target)
        return
    original, conv = _convert(name, target)
    model, plan = conv.model, conv.plan
    converted = {e.name for e in plan.converted}
    # every site of these models uses batch statistics; batchnorm keeps those that are torch's BatchNorm already
    assert converted or target == "batchnorm"

    # names: every key of the converted state_dict was in the original (fold adds its producer's
    # bias), and only the statistics of sites that no longer keep them are gone
    before, after = set(original.state_dict()), set(model.state_dict())
    folded_into = {f"{e.params['into']}.bias" for e in plan if e.target == "fold"}
    assert after - before <= folded_into
    for key in before - after:
        site, _, field = key.rpartition(".")
        assert site in converted and (field in STATISTICS or plan.get(site).target == "fold"), key

    # no converted site is a BatchNorm any more (syncbn and batchnorm keep BatchNorm's semantics on
    # purpose; batchnorm leaves no synchronized class); a subclass keeps its forward's submodules and is
    # an instance of the target's torch class
    for entry in plan.converted:
        before_module, after_module = original.get_submodule(entry.name), model.get_submodule(entry.name)
        assert isinstance(after_module, _BatchNorm) == (entry.target in ("syncbn", "batchnorm")), entry.name
        if entry.target == "batchnorm":
            assert isinstance(after_module, getattr(nn, entry.params["torch_class"]))
            assert not isinstance(after_module, (nn.SyncBatchNorm, type(before_module))), entry.name
        if entry.target == "groupnorm":
            assert isinstance(after_module, nn.GroupNorm)
        if isinstance(before_module, TimmBatchNormAct2d):
            assert not isinstance(after_module, TimmBatchNormAct2d)
            assert type(after_module.act) is type(before_module.act) and type(after_module.drop) is type(
                before_module.drop
            )

    inputs = inputs_for(name)
    if target not in ("syncbn", "batchnorm"):
        # no site that was converted uses batch statistics, with norms in train mode or in eval mode
        for train in (True, False):
            assert batch_statistics_users(model, inputs, train) == []
        if name not in NO_BATCH_AXIS:
            batch = inputs_for(name, batch=4)
            together = _outputs(_norms_train(model), batch)
            alone = torch.cat([_outputs(_norms_train(model), tuple(x[i : i + 1] for x in batch)) for i in range(4)])
            # per-sample normalizations: a sample alone equals the sample inside the batch, up to summation order
            torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)
    if target in ("frozen", "fold", "batchnorm") or (
        target == "auto" and all(e.target in ("frozen", "fold") for e in plan.converted)
    ):
        # BatchNorm's eval function, computed in another order (fold: in the producer's weights)
        torch.testing.assert_close(_outputs(model, inputs), _outputs(original, inputs), rtol=1e-5, atol=1e-5)

    # the plan re-applies to a fresh instance; with the converted weights it computes the same
    fresh = normswap.apply_plan(REAL_PATTERNS[name](), normswap.Plan.from_json(plan.to_json()), example_inputs=inputs)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_outputs(fresh, inputs), _outputs(model, inputs), rtol=0, atol=0)


class _NormsTrain:
    """Calls the model with only its normalization layers in train mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def eval(self) -> _NormsTrain:
        return self

    def __call__(self, *inputs: torch.Tensor):
        from normswap.postcondition import norms_in_train_mode

        with norms_in_train_mode(self.model):
            return self.model(*inputs)


def _norms_train(model: nn.Module) -> _NormsTrain:
    return _NormsTrain(model)


def test_timm_subclass_becomes_a_group_norm_with_its_activation() -> None:
    original, conv = _convert("timm_norm_act", "groupnorm")
    bn = conv.model.get_submodule("stem.1")
    assert isinstance(bn, nn.GroupNorm) and not isinstance(bn, _BatchNorm) and type(bn).__name__ == "TimmGroupNormAct2d"
    x = torch.randn(2, 8, 5, 5)
    groups = conv.plan.get("stem.1").params["num_groups"]
    # oracle built without normswap: the activation after nn.GroupNorm with the copied affine
    reference = nn.GroupNorm(groups, 8, eps=bn.eps)
    reference.load_state_dict(
        {"weight": original.get_submodule("stem.1").weight, "bias": original.get_submodule("stem.1").bias}
    )
    with torch.no_grad():
        torch.testing.assert_close(bn.eval()(x), bn.act(reference(x)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        bn.train()(x)  # timm's momentum bookkeeping runs and finds no statistics to update
    assert bn.num_batches_tracked is None and bn.running_mean is None


def test_subclass_that_computes_statistics_by_hand_is_refused_with_a_sentence() -> None:
    with pytest.raises(PlanError) as refused:
        _convert("naive_sync_bn", "groupnorm")
    message = str(refused.value)
    assert message.count(".") >= 1 and "norm1" in message and "NaiveSyncBatchNorm" in message
    assert "--keep norm1" in message  # what the user can do


def test_keep_leaves_the_named_sites_and_converts_the_rest() -> None:
    model = build_real("naive_sync_bn")
    conv = normswap.convert(model, inputs_for("naive_sync_bn"), to="groupnorm", keep=["norm1", "norm2"])
    assert {e.name: e.target for e in conv.plan} == {"norm1": "keep", "norm2": "keep"}
    assert "kept on request" in conv.plan.get("norm1").reason
    with pytest.raises(PlanError, match="--keep names 'nope'"):
        normswap.convert(model, inputs_for("naive_sync_bn"), keep=["nope"])


def test_wrapper_holding_a_batchnorm_is_looked_through() -> None:
    report = normswap.lint(build_real("pyg_graph"), inputs_for("pyg_graph"))
    assert [s.name for s in report.sites] == ["norm1.module", "norm2.module"]
    assert all(s.kind == "module" and s.flavour == "BatchNorm1d" for s in report.sites)


def test_train_mode_checks_run_without_labels() -> None:
    # the detector raises in train mode without targets; only its norms are put in train mode
    model = build_real("detector")
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        model.train()(*inputs_for("detector"))
    conv = normswap.convert(model.eval(), inputs_for("detector"), to="groupnorm")
    assert conv.notes == []  # the whole-model post-condition ran in both modes


def test_ghost_batchnorm_is_one_site_reused_per_chunk() -> None:
    report = normswap.lint(build_real("tabnet_gbn"), inputs_for("tabnet_gbn"))
    reused = [s for s in report.sites if s.call_count == 2]  # a batch of 4 in virtual batches of 2
    assert reused
    recurrence = {f.site.name for f in report.findings if f.code == "NS101"}
    assert recurrence == {s.name for s in reused}


def test_tf_momentum_is_reported_and_explained() -> None:
    report = normswap.lint(build_real("tf_ported"), inputs_for("tf_ported"))
    ns204 = [f for f in report.findings if f.code == "NS204"]
    assert ns204, "the TF-ported block builds BatchNorm2d(momentum=0.997)"
    momenta = {f.site.momentum: f for f in ns204}
    assert set(momenta) == {0.99, 0.997}  # EfficientNet's stem and MobileNetV2's blocks
    assert "torch momentum 0.003" in momenta[0.997].message and all(f.remedy is None for f in ns204)


def test_subclass_lint_says_what_a_swap_keeps_and_auto_agrees() -> None:
    context = normswap.Context(batch_size=2, world_size=4)
    report = normswap.lint(build_real("timm_norm_act"), inputs_for("timm_norm_act"), context)
    ns202 = {f.site.name: f for f in report.findings if f.code == "NS202"}
    assert ns202, "timm's BatchNormAct2d overrides forward"
    finding = ns202["stem.1"]
    assert "act (ReLU)" in finding.message and "drop (" in finding.message and "keeps its class" in finding.message
    conv = normswap.convert(build_real("timm_norm_act"), inputs_for("timm_norm_act"), context=context)
    for name in ns202:
        assert (
            conv.plan.get(name).target == finding.remedy.target
        )  # small batches on 4 devices: GroupNorm for the conv maps


def test_converted_subclass_survives_deepcopy_and_torch_export() -> None:
    _, conv = _convert("timm_norm_act", "layernorm")
    x = inputs_for("timm_norm_act")
    program = torch.export.export(copy.deepcopy(conv.model).eval(), x, strict=False)
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    torch.testing.assert_close(program.module()(*x), _outputs(conv.model, x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    cache: dict = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            original, conv = _convert(name, target)
            path = normswap.export_onnx(conv.model, inputs_for(name), folder / f"{name}-{target}.onnx")
            cache[(name, target)] = (original, conv, path)
        return cache[(name, target)]

    return get


ONNX_CASES = [case for case in CASES if case not in REFUSED]


@pytest.mark.slow
@pytest.mark.parametrize("name,target", ONNX_CASES, ids=[f"{m}-{t}" for m, t in ONNX_CASES])
def test_every_conversion_exports_and_validates(exported, name: str, target: str) -> None:
    original, conv, path = exported(name, target)
    validation = normswap.validate_onnx(conv.model, path, inputs_for(name), original=original, plan=conv.plan)
    assert validation.passed, validation.messages
    batchnorm_ops = sum(1 for node in onnx.load(str(path)).graph.node if node.op_type == "BatchNormalization")
    if conv.plan.converted and all(not e.keeps_batchnorm_op for e in conv.plan.converted):
        assert batchnorm_ops == 0
    if name in NO_BATCH_AXIS:
        assert any("no input carries a batch" in s or "cut to one sample" in s for s in validation.skipped)
    elif name == "tabnet_gbn":
        assert any(
            "fixed batch size of 4" in s for s in validation.skipped
        )  # chunks of the batch: the graph depends on it
    else:
        assert {c.batch_size for c in validation.outputs} == {1, 4}


def test_non_batch_first_inputs_are_left_whole(tmp_path: Path) -> None:
    from normswap.torchutil import batch_of, resolve_batch_inputs

    x, edge_index = inputs_for("pyg_graph")
    assert resolve_batch_inputs((x, edge_index)) == (0,)
    assert resolve_batch_inputs((x, edge_index), ()) == ()
    resized = batch_of((x, edge_index), 2, (0,))
    assert resized[0].shape[0] == 2 and resized[1] is edge_index
    with pytest.raises(ValueError, match="batch_inputs"):
        resolve_batch_inputs((x, edge_index), (5,))
