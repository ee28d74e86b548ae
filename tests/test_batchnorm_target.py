"""The batchnorm target: SyncBatchNorm and BatchNorm subclasses back to torch's own BatchNorm1d/2d/3d
(pytorch/pytorch#41081), the same tensors and hooks carried, the function kept in both modes."""

from __future__ import annotations

import copy
import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import normswap
from models import MODELS, DeepLabSyncBNNet, build, build_real, input_for, inputs_for
from normswap.cli import main
from normswap.errors import ConfigError, PlanError
from normswap.linter import LintOptions
from workspace import SHAPE


def _sync(model: nn.Module) -> nn.Module:
    return nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """The model's output in a mode, on a copy (train mode moves running statistics)."""
    with torch.no_grad():
        return copy.deepcopy(model).train(train)(x)


def _assert_same_function(converted: nn.Module, original: nn.Module, x: torch.Tensor, tolerance: float = 0.0) -> None:
    """Eval and train: the same op on the same tensors is bitwise equal (tolerance 0); a subclass
    that computed its statistics by hand differs from the fused kernel by float rounding only."""
    for train in (False, True):
        expected = _outputs(original, x, train)
        torch.testing.assert_close(_outputs(converted, x, train), expected, rtol=tolerance, atol=tolerance)


RANKS = [
    ((6, 5), nn.BatchNorm1d),
    ((6, 5, 7), nn.BatchNorm1d),
    ((6, 5, 4, 4), nn.BatchNorm2d),
    ((6, 5, 3, 3, 3), nn.BatchNorm3d),
]


@pytest.mark.parametrize("shape,torch_class", RANKS, ids=["N,C", "N,C,L", "N,C,H,W", "N,C,D,H,W"])
def test_sync_batchnorm_becomes_the_torch_class_of_its_input_rank(shape: tuple, torch_class: type) -> None:
    original = nn.Sequential(nn.Identity(), nn.SyncBatchNorm(5, eps=1e-3, momentum=0.05))
    with torch.no_grad():
        original.train()(torch.randn(shape) * 3 + 1)
        original[1].weight.uniform_(0.5, 1.5)
    original.eval()
    x = torch.randn(shape)
    working = copy.deepcopy(original)
    tensors = [*working[1].parameters(), *working[1].buffers()]
    conversion = normswap.convert(working, x, to="batchnorm", inplace=True)
    layer = conversion.model[1]
    assert type(layer) is torch_class and (layer.eps, layer.momentum) == (1e-3, 0.05)
    assert conversion.plan.get("1").params["torch_class"] == torch_class.__name__
    # the very same tensors, as convert_sync_batchnorm hands them over: an optimizer keeps working
    assert all(a is b for a, b in zip([*layer.parameters(), *layer.buffers()], tensors, strict=True))
    _assert_same_function(conversion.model, original, x)


@pytest.mark.parametrize("name", [m for m in MODELS if m not in ("functional", "lookalike", "no_bn")])
def test_every_synchronized_test_model_comes_back_computing_the_same(name: str) -> None:
    original = _sync(build(name))
    x = input_for(name, batch=8)
    conversion = normswap.convert(original, input_for(name), to="batchnorm")
    model = conversion.model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    _assert_same_function(model, original, x)
    fresh = normswap.apply_plan(_sync(build(name, seed=1)), normswap.Plan.from_json(conversion.plan.to_json()), x)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    fresh.load_state_dict(model.state_dict())  # strict: the keys did not change
    torch.testing.assert_close(_outputs(fresh, x, False), _outputs(model, x, False), rtol=0, atol=0)


def test_what_is_torch_batchnorm_already_is_kept_and_said_so() -> None:
    conversion = normswap.convert(build("subclass"), input_for("subclass"), to="batchnorm")
    assert [(e.target, e.reason) for e in conversion.plan] == [
        ("keep", "already torch's BatchNorm2d, with what its class BatchNormAct2d adds (an operation in its forward)")
    ]
    functional = normswap.convert(build("functional"), input_for("functional"), to="batchnorm")
    assert [(e.target, e.reason) for e in functional.plan] == [
        ("keep", "a functional batch_norm call computes torch's BatchNorm already")
    ]
    plain = normswap.convert(build("resnet"), input_for("resnet"), to="batchnorm")
    assert {e.reason for e in plain.plan} == {"already torch's BatchNorm2d"}


def test_a_model_trained_with_sync_batchnorm_trains_on_cpu_under_a_process_group(tmp_path: Path) -> None:
    """pytorch/pytorch#41081: under a process group SyncBatchNorm raises on CPU tensors in training."""
    original = _sync(build("resnet"))
    x = input_for("resnet", batch=8)
    working = copy.deepcopy(original)
    optimizer = torch.optim.SGD(working.parameters(), lr=0.1)  # built before the conversion
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
            copy.deepcopy(original).train()(x)
        model = normswap.convert(working, x, to="batchnorm", inplace=True).model
        model.train()
        before = copy.deepcopy(model.state_dict())
        model(x).pow(2).mean().backward()
        optimizer.step()
    finally:
        dist.destroy_process_group()
    after = model.state_dict()
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # the optimizer holds the model's parameters
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])  # batch statistics, as BatchNorm


def test_torchscript_and_eager_fusion_take_the_result() -> None:
    """Two more things SyncBatchNorm refuses: torch.jit.script, and fuse_modules' (conv, bn, relu) pattern."""
    original = _sync(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(Exception):  # noqa: B017 - torch raises a frontend error whose class varies by version
        torch.jit.script(original)
    model = normswap.convert(original, x, to="batchnorm").model
    torch.testing.assert_close(torch.jit.script(model)(x), original(x))
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)  # folded weights: rounding only


def test_hooks_and_attributes_on_the_layer_are_carried() -> None:
    original = _sync(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    seen = []
    handle = original[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    original[1].qconfig = "kept"
    model = normswap.convert(original, torch.randn(2, 3, 8, 8), to="batchnorm", inplace=True).model
    seen.clear()
    model(torch.randn(2, 3, 8, 8))
    assert seen == [torch.Size([2, 8, 6, 6])] and model[1].qconfig == "kept"
    assert not hasattr(model[1], "process_group")  # SyncBatchNorm's own attribute does not travel
    handle.remove()
    model(torch.randn(2, 3, 8, 8))
    assert len(seen) == 1


# --- subclasses -------------------------------------------------------------------------------


def test_deeplab_synchronized_batchnorm_becomes_torch_batchnorm2d_and_pickles() -> None:
    original = build_real("deeplab_sync_bn")
    x = inputs_for("deeplab_sync_bn", batch=6)[0]
    conversion = normswap.convert(original, inputs_for("deeplab_sync_bn"), to="batchnorm")
    model = conversion.model
    assert {type(m) for n, m in model.named_modules() if n.endswith(("bn", "bn1"))} == {nn.BatchNorm2d}
    assert all("adds nothing to torch's BatchNorm" in e.reason for e in conversion.plan)
    assert not any(hasattr(m, "_sync_master") for m in model.modules())
    _assert_same_function(model, original, x)
    # the state dict of a plain model loads: the same keys
    model.load_state_dict(DeepLabSyncBNNet(sync_bn=False).state_dict())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_outputs(restored, x, False), _outputs(model, x, False), rtol=0, atol=0)


def test_detectron2_naive_sync_batchnorm_statistics_by_hand_become_torch_batchnorm2d() -> None:
    original = build_real("naive_sync_bn")
    x = inputs_for("naive_sync_bn", batch=6)[0]
    model = normswap.convert(original, inputs_for("naive_sync_bn"), to="batchnorm").model
    assert type(model.norm1) is nn.BatchNorm2d and type(model.norm2) is nn.BatchNorm2d
    # mean and E[x^2] by hand, then x * scale + bias, against the fused kernel: float rounding
    _assert_same_function(model, original, x, tolerance=1e-5)


class SyncRelu(nn.SyncBatchNorm):
    """A synchronized BatchNorm whose forward adds an activation without a submodule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class SyncNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct shape: `super().forward`, then its `drop` and `act`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class NormAct2d(nn.BatchNorm2d):
    """SyncNormAct's unsynchronized counterpart, as timm's BatchNormAct2d is SyncBatchNormAct's."""

    def __init__(self, num_features: int, act_layer: type = nn.ReLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        statistics = (self.running_mean, self.running_var, self.weight, self.bias)
        return self.act(self.drop(F.batch_norm(x, *statistics, self.training, 0.1, self.eps)))


class SyncNormGelu(SyncNormAct):
    """Named like NormGelu2d, which ignores its `act`: not its counterpart."""


class NormGelu2d(NormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        statistics = (self.running_mean, self.running_var, self.weight, self.bias)
        return F.gelu(F.batch_norm(x, *statistics, self.training, 0.1, self.eps))


def _norm_act_net(sync_class: type) -> nn.Module:
    layer = sync_class(8)
    layer.drop, layer.act = nn.Dropout(0.0), nn.SiLU()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layer).eval()
    with torch.no_grad():
        layer.train()(torch.randn(8, 8, 6, 6) * 2 + 1)
        layer.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_a_subclass_adding_an_activation_keeps_it_over_torch_batchnorm2d() -> None:
    original = nn.Sequential(nn.Conv2d(3, 8, 3), SyncRelu(8)).eval()
    x = torch.randn(4, 3, 8, 8)
    conversion = normswap.convert(original, x, to="batchnorm")
    layer = conversion.model[1]
    assert type(layer).__name__ == "Relu" and isinstance(layer, nn.BatchNorm2d)
    assert not isinstance(layer, nn.SyncBatchNorm) and conversion.plan.get("1").params["keeps_forward"] is True
    _assert_same_function(conversion.model, original, x)
    assert (conversion.model(x) >= 0).all()


def test_a_sync_subclass_comes_back_as_its_modules_unsynchronized_class() -> None:
    original = _norm_act_net(SyncNormAct)
    x = torch.randn(4, 3, 8, 8)
    model = normswap.convert(original, x, to="batchnorm").model
    assert type(model[1]) is NormAct2d and isinstance(model[1].act, nn.SiLU)
    _assert_same_function(model, original, x)
    # what timm's BN freezing and convert_sync_batchnorm dispatch on: the class itself
    assert set(model.state_dict()) == set(original.state_dict())


def test_a_counterpart_that_computes_something_else_is_not_taken() -> None:
    original = _norm_act_net(SyncNormGelu)
    x = torch.randn(4, 3, 8, 8)
    model = normswap.convert(original, x, to="batchnorm").model
    assert type(model[1]).__name__ == "NormGelu" and not isinstance(model[1], NormGelu2d)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[1].act, nn.SiLU)
    _assert_same_function(model, original, x)


def test_a_taken_over_subclass_pickles_as_itself() -> None:
    model = normswap.convert(build_real("sync_bn_act"), inputs_for("sync_bn_act"), to="batchnorm").model
    layer = model.features[1]
    assert type(layer).__name__ == "BatchNormAct" and isinstance(layer, nn.BatchNorm2d)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    x = inputs_for("sync_bn_act")[0]
    assert type(restored.features[1]) is type(layer)
    torch.testing.assert_close(_outputs(restored, x, True), _outputs(model, x, True), rtol=0, atol=0)


# --- refusals ---------------------------------------------------------------------------------


class AuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.SyncBatchNorm(8)
        self.aux = nn.SyncBatchNorm(8)  # never called on the example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_a_sync_batchnorm_the_example_does_not_reach_has_no_rank_and_is_refused() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        PlanError, match=r"Layer 'aux' \(SyncBatchNorm, input unknown\) has no rank of its own .*--keep aux"
    ):
        normswap.convert(AuxHead().eval(), x, to="batchnorm")
    model = normswap.convert(AuxHead().eval(), x, to="batchnorm", keep=["aux"]).model
    assert type(model.bn) is nn.BatchNorm2d and type(model.aux) is nn.SyncBatchNorm


class ByHandAct(nn.BatchNorm2d):
    """Batch statistics by hand, then an activation: torch's BatchNorm2d alone cannot stand in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return F.relu((x - mean) / torch.sqrt(var + self.eps))


def test_statistics_by_hand_plus_an_activation_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ByHandAct(8)).train()
    with pytest.raises(
        PlanError, match=r"computes its batch statistics by hand and its forward adds .*replace the class"
    ):
        normswap.convert(model, torch.randn(4, 3, 8, 8), to="batchnorm")


def test_a_plan_that_drops_what_a_subclass_adds_is_caught_by_the_postcondition() -> None:
    original = nn.Sequential(nn.Conv2d(3, 8, 3), SyncRelu(8)).eval()
    x = torch.randn(4, 3, 8, 8)
    plan = normswap.convert(original, x, to="batchnorm").plan.to_dict()
    plan["sites"][0]["params"]["keeps_forward"] = False  # hand-edited: torch's class alone, without the ReLU
    with pytest.raises(
        PlanError, match=r"Layer '1' computes something else after the rewrite to batchnorm in eval mode"
    ):
        normswap.convert(original, x, plan=normswap.Plan.from_dict(plan))


def test_auto_never_picks_batchnorm() -> None:
    """auto makes every site batch-independent; batchnorm keeps batch statistics by design."""
    conversion = normswap.convert(_sync(build("resnet")), input_for("resnet"))
    assert "batchnorm" not in conversion.plan.counts()


def test_unsynced_distributed_does_not_flag_a_sync_subclass() -> None:
    report = normswap.lint(
        build_real("sync_bn_act"), inputs_for("sync_bn_act"), normswap.Context(world_size=4, batch_size=32)
    )
    assert not [f for f in report.findings if f.code == "NS105"]


# --- lint --to, lint --fix, the CLI -------------------------------------------------------------


def test_lint_recommends_the_target_it_is_given() -> None:
    report = normswap.lint(_sync(build("resnet")), input_for("resnet"), to="batchnorm")
    assert report.lint is not None and report.lint.auto_plan == {"batchnorm": 3}
    assert report.lint.planned_by == "--to batchnorm"
    assert "recommended: --to batchnorm converts 3 × batchnorm" in report.to_text()


SYNC_SOURCE = """import torch
from torch import nn


def build(norm_layer=nn.SyncBatchNorm):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.SyncBatchNorm(8, 1e-3, 0.01, True, True, None),
        nn.Conv2d(8, 8, 1),
        norm_layer(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
        nn.SyncBatchNorm(4, eps=1e-4),
    )


INPUT_SHAPE = (4, 3, 8, 8)
"""

SYNC_FIXED = """import torch
from torch import nn


def build(norm_layer=nn.BatchNorm2d):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.01, affine=True, track_running_stats=True),
        nn.Conv2d(8, 8, 1),
        norm_layer(8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
        nn.BatchNorm1d(4, eps=1e-4),
    )


INPUT_SHAPE = (4, 3, 8, 8)
"""


def test_fix_writes_torch_batchnorm_of_each_rank_as_a_safe_fix(project: Path) -> None:
    from fixcases import built, load

    path = project / "sync.py"
    path.write_text(SYNC_SOURCE)
    model, x, _ = built(path)
    fixes = normswap.fix_source(model, x, root=project, apply=True, to="batchnorm")  # safe fixes only
    assert fixes.applied and fixes.unfixable == [] and all(edit.safe for edit in fixes.edits)
    assert path.read_text() == SYNC_FIXED  # the positional process_group is dropped, the rest kept
    fixed = load(path).build()
    converted = normswap.convert(model, x, to="batchnorm").model
    assert [type(m) for m in fixed.modules()] == [type(m) for m in converted.modules()]
    fixed.load_state_dict(converted.state_dict())
    _assert_same_function(fixed, converted, x)
    again, x, _ = built(path)
    assert normswap.fix_source(again, x, root=project, to="batchnorm").edits == []


CONVERTED_SOURCE = """from torch import nn


def build():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)


INPUT_SHAPE = (4, 3, 8, 8)
"""


def test_fix_takes_the_conversion_out_and_other_targets_say_where_the_fix_belongs(project: Path) -> None:
    from fixcases import built, load

    path = project / "converted.py"
    path.write_text(CONVERTED_SOURCE)
    model, x, _ = built(path)
    groupnorm = normswap.fix_source(model, x, root=project, apply=True, unsafe=True, to="groupnorm")
    assert groupnorm.edits == [] and path.read_text() == CONVERTED_SOURCE
    (unfixable,) = groupnorm.unfixable
    assert unfixable.reason.startswith("made by `nn.SyncBatchNorm.convert_sync_batchnorm(...)` out of BatchNorm layers")
    fixes = normswap.fix_source(model, x, root=project, apply=True, to="batchnorm")
    assert [edit.new for edit in fixes.edits] == ["model"]
    assert "    return model\n" in path.read_text()
    fixed = load(path).build()
    assert type(fixed[1]) is nn.BatchNorm2d
    fixed.load_state_dict(normswap.convert(model, x, to="batchnorm").model.state_dict())


SYNC_NETS = textwrap.dedent(
    """
    from torch import nn
    import nets

    def build():
        return nn.SyncBatchNorm.convert_sync_batchnorm(nets.Net())
    """
)


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow  # exports and validates ONNX
def test_cli_converts_a_sync_checkpoint_and_lint_prints_the_command(work: Path) -> None:
    (work / "sync_nets.py").write_text(SYNC_NETS)
    result = _run(
        "convert", "plain.pt", "--model", "sync_nets:build", *SHAPE, "--out", "out", "--to", "batchnorm", "-q"
    )
    assert result.exit_code == 0, result.output
    document = json.loads((work / "out" / "report.json").read_text())["reports"][0]
    (entry,) = document["plan"]["sites"]
    assert (entry["target"], entry["params"]["torch_class"]) == ("batchnorm", "BatchNorm2d")
    assert document["validation"]["passed"]
    state = torch.load(work / "out" / "model.pt", weights_only=True)
    assert set(state) == set(torch.load(work / "plain.pt", weights_only=True))
    lint = _run("lint", "sync_nets:build", *SHAPE, "--to", "batchnorm")
    assert "recommended: --to batchnorm converts 1 × batchnorm" in lint.output
    assert (
        "normswap convert CHECKPOINT --model sync_nets:build --input-shape 2,3,8,8 --to batchnorm --out converted/"
        in lint.output
    )


def test_lint_refuses_a_plan_and_a_target_together(work: Path) -> None:
    (work / "plan.json").write_text(json.dumps({"version": 1, "sites": []}))
    result = CliRunner().invoke(main, ["lint", "nets:build", *SHAPE, "--plan", "plan.json", "--to", "batchnorm"])
    assert result.exit_code == 2 and "--plan decides every site's target; use it without --to." in result.output
    with pytest.raises(ConfigError):
        LintOptions(plan_path="plan.json", to="batchnorm")


@pytest.mark.slow  # exports and validates ONNX
@pytest.mark.parametrize("name", ["sync_bn_act", "deeplab_sync_bn", "naive_sync_bn"])
def test_the_result_exports_and_validates(tmp_path: Path, name: str) -> None:
    original = build_real(name)
    inputs = inputs_for(name)
    conversion = normswap.convert(original, inputs, to="batchnorm")
    path = normswap.export_onnx(conversion.model, inputs, tmp_path / f"{name}.onnx")
    validation = normswap.validate_onnx(conversion.model, path, inputs, plan=conversion.plan, original=original)
    assert validation.passed, validation.messages
    assert validation.drift is not None and validation.drift.max_abs < 1e-5  # the function, kept
