"""`lint --fix` on code shaped like public repositories (tests/fix_cases/: the CIFAR model zoo,
YOLOv5's common.py, pix2pix's networks.py, PyTorch's DCGAN example, DeepSpeech's SequenceWise,
a U-Net package): after fixing the source for one model, every other model the file builds (other
widths, sizes, variants: each case's SIBLINGS) still builds and is exactly what `convert` makes of
that model built from the original file."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import normswap
from fixcases import CASES, REPOSITORIES, assert_builds_what_convert_makes, built, context_for, copy_case, load
from normswap.capture import capture
from normswap.cli import main
from normswap.fix import fix_source


@pytest.mark.parametrize("case", REPOSITORIES)
def test_every_model_built_from_the_fixed_file_equals_convert_at_its_own_widths(project: Path, case: str) -> None:
    path = copy_case(project, case)
    model, x, module = built(path)
    fixes = fix_source(model, x, context=context_for(case), root=project, apply=True, unsafe=True)
    assert fixes.unfixable == [] and fixes.edits
    assert "import normswap" not in path.read_text()  # plain torch: the fixed file runs without normswap
    for label, (factory, shape) in module.SIBLINGS.items():
        torch.manual_seed(0)
        original = getattr(load(CASES / f"{case}.py"), factory)()
        fixed = getattr(load(path), factory)()  # a KeyError here was the bug: a table of the linted model's widths
        assert_builds_what_convert_makes(fixed, original, torch.randn(*shape), context_for(case), f"{case}: {label}")


def _import_fresh(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for loaded in [m for m in sys.modules if m == name.split(".")[0] or m.startswith(name.split(".")[0] + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    return importlib.import_module(name)


def test_a_package_module_is_named_by_its_dotted_form_and_fixed_through_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A U-Net package (`from .unet_parts import *`): the path form cannot import it and says
    which dotted form can; the dotted form fixes the parts module, and the other variant of the
    model (bilinear: other widths) equals convert's."""
    shutil.copytree(CASES / "unet", project / "unet")
    args = ["--input-shape", "2,3,32,32", "-k", "width=8", "--batch-size", "2"]
    by_path = CliRunner().invoke(main, ["lint", "unet/unet_model.py:UNet", *args])
    assert by_path.exit_code == 2
    assert (
        "attempted relative import with no known parent package; 'unet/unet_model.py' is a module of the package 'unet': "
        in by_path.stderr
    )
    assert by_path.stderr.rstrip().endswith("name it by its dotted form, 'unet.unet_model:UNet'.")
    original = _import_fresh("unet.unet_model", monkeypatch).UNet(bilinear=True, width=12)
    fixed = CliRunner().invoke(main, ["lint", "unet.unet_model:UNet", *args, "--fix", "--unsafe-fixes"])
    assert fixed.exit_code == 0, fixed.output
    assert "fixed: 18 sites in unet/unet_parts.py" in fixed.stdout
    parts = (project / "unet" / "unet_parts.py").read_text()
    assert "            _group_norm(mid_channels),\n" in parts and "            _group_norm(out_channels),\n" in parts
    sibling = _import_fresh("unet.unet_model", monkeypatch).UNet(bilinear=True, width=12)
    assert_builds_what_convert_makes(
        sibling, original, torch.randn(2, 3, 32, 32), normswap.Context(batch_size=2), "U-Net, bilinear, width 12"
    )


def test_a_sequence_flattened_into_the_batch_is_no_batch_of_one() -> None:
    """DeepSpeech's SequenceWise BatchNorm sees (T*N, H): at one sample per device it still has
    T values per channel and training runs, so NS104 stays silent; the MNIST-RNN example's
    BatchNorm1d on the last step's (N, H) does raise there, and NS104 says so."""
    deepspeech = load(CASES / "deepspeech.py")
    model, x = deepspeech.build(), torch.randn(*deepspeech.INPUT_SHAPE)
    report = normswap.lint(model, x, normswap.Context(batch_size=1))
    flattened = {s.name: s for s in report.sites if s.flavour == "BatchNorm1d"}
    assert {s.input_shape for s in flattened.values()} == {(12, 64)} and {
        s.rows_per_sample for s in flattened.values()
    } == {6}
    assert [f for f in report.findings if f.code == "NS104"] == [] and report.exit_code() == 0
    one = deepspeech.build().train()
    one(torch.randn(1, *deepspeech.INPUT_SHAPE[1:])).sum().backward()  # the claim itself: a batch of one trains

    small = normswap.lint(model, x, normswap.Context(batch_size=2))
    (message,) = {f.message for f in small.findings if f.code == "NS103" and f.site_name == "rnns.1.batch_norm.module"}
    assert message == (
        "'rnns.1.batch_norm.module' estimates its statistics from 2 sample(s) per device, 12 rows of 6 per sample, "
        "which are steps of the same samples (threshold 16); they will be noisy."
    )

    class MnistRNN(nn.Module):  # pytorch/examples mnist_rnn: BatchNorm1d on the last step's output
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(input_size=28, hidden_size=64, batch_first=True)
            self.batchnorm = nn.BatchNorm1d(64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            output, _ = self.rnn(x.reshape(-1, 28, 28))
            return self.fc(self.batchnorm(output[:, -1, :]))

    (error,) = [
        f
        for f in normswap.lint(MnistRNN(), torch.randn(2, 1, 28, 28), normswap.Context(batch_size=1)).findings
        if f.code == "NS104"
    ]
    assert error.site_name == "batchnorm" and "training raises ValueError" in error.message
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        MnistRNN().train()(torch.randn(1, 1, 28, 28))


def test_a_point_set_is_planned_like_the_pixels_of_a_map_not_as_a_sequence() -> None:
    """PointNet's BatchNorm1d over (N, C, points) after kernel-1 convolutions: no NS102, GroupNorm
    in the plan; the same network with a kernel-3 convolution reads its points as ordered steps
    (NS102 names the convolution), with the graph and without one (forward hooks)."""
    pointnet = load(CASES / "pointnet.py")
    x = torch.randn(*pointnet.INPUT_SHAPE)
    report = normswap.lint(pointnet.build(), x, normswap.Context(batch_size=2))
    assert [f for f in report.findings if f.code == "NS102"] == []
    targets = {e.name: e.target for e in report.lint.plan}
    points = [s.name for s in report.sites if s.input_rank == 3]
    assert points == ["feat.stn.bn1", "feat.stn.bn2", "feat.bn1", "feat.bn2"]
    assert {targets[name] for name in points} == {"groupnorm"} and targets["bn1"] == "layernorm"
    assert "(N, C, L) points, no evidence of order along L" in next(
        e.reason for e in report.lint.plan if e.name == "feat.bn1"
    )

    ordered = pointnet.build()
    ordered.feat.conv1 = nn.Conv1d(3, 16, 3, padding=1)
    sequence = normswap.lint(ordered, x, normswap.Context(batch_size=2))
    found = {f.site_name: f.message for f in sequence.findings if f.code == "NS102"}
    assert sorted(found) == ["feat.bn1", "feat.bn2"]  # downstream of the kernel-3 convolution only
    assert "(its steps are ordered: it follows feat.conv1 (Conv1d, kernel 3))" in found["feat.bn1"]
    for method in ("export", "hooks"):  # the other captures read the same evidence
        calls = {c.name: c.order for c in capture(ordered, x, methods=(method,)).calls}
        assert calls["feat.stn.bn1"] == "" and calls["feat.bn1"].startswith("it follows feat.conv1 ("), (method, calls)
    said = normswap.lint(pointnet.build(), x, normswap.Context(batch_size=2, sequence=True))
    assert {f.site_name for f in said.findings if f.code == "NS102"} == set(points)  # --sequence: the user says so


def test_ghost_batches_are_chunks_of_one_step_and_an_unreached_twin_takes_the_live_form() -> None:
    """TabNet: GBN normalizes a batch of 4 as 2 chunks of 2. NS103 counts the chunk, NS101 says
    chunks of one step, not time; the wrapper's never-called `initial_bn` takes the encoder's
    identical call's form (torch.nn.LayerNorm over features), not the channel LayerNorm."""
    tabnet = load(CASES / "tab_network.py")
    with normswap.recording_construction():
        model = tabnet.build()
    report = normswap.lint(model, torch.randn(*tabnet.INPUT_SHAPE), normswap.Context(batch_size=4))
    by_code = {(f.code, f.site_name): f.message for f in report.findings}
    ghost = "encoder.att_transformers.0.bn.bn"
    assert by_code[("NS103", ghost)] == (
        f"'{ghost}' estimates its statistics from chunks of 2 sample(s), one call per chunk of the batch "
        "(ghost batch norm; 4 sample(s) per device, threshold 16); they will be noisy."
    )
    assert "across the chunks of one step, not across time steps" in by_code[("NS101", ghost)]
    assert by_code[("NS103", "encoder.initial_bn")].startswith("'encoder.initial_bn' estimates its statistics from 4")
    plan = {e.name: e for e in report.lint.plan}
    assert plan[ghost].reason.endswith("(N, C) features: LayerNorm over the features of each sample")
    assert (plan["initial_bn"].target, plan["initial_bn"].params) == ("layernorm", plan["encoder.initial_bn"].params)
    assert "built by the same call as 'encoder.initial_bn'" in plan["initial_bn"].reason


UNREACHED_ALONE = b"""import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.aux = nn.BatchNorm1d(8)  # an auxiliary head's norm this forward never calls

    def forward(self, x):
        return self.bn(self.conv(x))


def build():
    return Net()


INPUT_SHAPE = (2, 3, 8, 8)
"""


def test_an_unreached_layer_without_a_twin_never_makes_the_file_depend_on_normswap(project: Path) -> None:
    path = project / "aux_head.py"
    path.write_bytes(UNREACHED_ALONE)
    model, x, _ = built(path)
    fixes = fix_source(model, x, context=normswap.Context(batch_size=2), root=project, apply=True, unsafe=True)
    (refused,) = fixes.unfixable
    assert (
        refused.site == "aux"
        and "would make aux_head.py depend on normswap where no reached layer does" in refused.reason
    )
    text = path.read_text()
    assert "normswap" not in text and "self.bn = nn.GroupNorm(1, 16)" in text
    assert "self.aux = nn.BatchNorm1d(8)" in text


def _deeplab(project: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> tuple[ModuleType, nn.Module]:
    """The deeplab package of the project, imported fresh, and a DeepLab built from it (recorded)."""
    modeling = _import_fresh("deeplab.modeling", monkeypatch)
    torch.manual_seed(0)
    with normswap.recording_construction():
        return modeling, modeling.DeepLab(**kwargs)


def _norm_parameters_in_groups(model: nn.Module) -> tuple[int, int]:
    """(norm-layer parameters in the optimizer's two groups, norm-layer parameters in the model)."""
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        for p in m.parameters()
    }
    grouped = {id(p) for p in [*model.get_1x_lr_params(), *model.get_10x_lr_params()]}
    return len(norms & grouped), len(norms)


DEEPLAB_INPUT = (2, 3, 32, 32)


@pytest.mark.parametrize("sync_bn", [False, True], ids=["one-gpu", "sync-bn"])
def test_deeplab_fix_keeps_the_optimizer_groups_and_rewrites_both_branches_of_the_selection(
    project: Path, monkeypatch: pytest.MonkeyPatch, sync_bn: bool
) -> None:
    """pytorch-deeplab-xception: `BatchNorm = SynchronizedBatchNorm2d` or `nn.BatchNorm2d` by
    `sync_bn`, passed through three files; the optimizer's groups pick norm layers by isinstance.
    Fixing either branch's model rewrites both branches (GroupNorm needs no synchronization); the
    parameter groups keep every norm parameter (34 of 34 before and after; 226 of 226 measured on
    a copy of the real repository); both models built from the fixed package equal convert's; a
    second fix is a no-op."""
    shutil.copytree(CASES / "deeplab", project / "deeplab")
    _, model = _deeplab(project, monkeypatch, sync_bn=sync_bn)
    before = _norm_parameters_in_groups(model)
    assert before == (34, 34)
    x = torch.randn(*DEEPLAB_INPUT)
    context = normswap.Context(batch_size=2)
    fixes = fix_source(model, x, context=context, root=project, apply=True, unsafe=True)
    assert fixes.unfixable == [] and fixes.notes == []  # freeze_bn's m.eval() only handles statistics: nothing to say
    modeling_text = (project / "deeplab" / "modeling.py").read_text()
    assert "            BatchNorm = _group_norm\n        else:\n            BatchNorm = _group_norm\n" in modeling_text
    assert modeling_text.count("or isinstance(m[1], (nn.BatchNorm2d, nn.GroupNorm)):") == 2
    assert "elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):" in (project / "deeplab" / "backbone.py").read_text()
    assert "(SynchronizedBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm)" in (project / "deeplab" / "heads.py").read_text()
    train = (project / "deeplab" / "train.py").read_text()  # imports the edited module: read too
    assert "if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):" in train and "if 'bn' in name]" in train
    selection = {(e.path, e.line): e.selects for e in fixes.edits if e.target == "selection"}
    assert sorted(selection) == [
        ("deeplab/backbone.py", 72),
        ("deeplab/heads.py", 27),
        ("deeplab/modeling.py", 46),
        ("deeplab/modeling.py", 56),
        ("deeplab/train.py", 19),
    ]
    assert selection[("deeplab/train.py", 19)].startswith(
        "freezes the parameters of the layers it selects (`freeze_norm_affine`): GroupNorm added"
    )
    assert selection[("deeplab/backbone.py", 72)].startswith("initialises the layers it selects (`_init_weight`)")
    assert selection[("deeplab/modeling.py", 46)] == (
        "collects the parameters of the layers it selects into an optimizer's parameter group (`get_1x_lr_params`): "
        "GroupNorm added, so that it keeps selecting the layers the fix rewrites (without it the GroupNorm layers' "
        "parameters would leave that group)"
    )

    for flag in (False, True):
        original = _deeplab_original(monkeypatch, sync_bn=flag)
        _, fixed = _deeplab(project, monkeypatch, sync_bn=flag)
        assert _norm_parameters_in_groups(fixed) == before  # all -> all
        assert_builds_what_convert_makes(fixed, original, x, context, f"DeepLab(sync_bn={flag})")
        groups = importlib.import_module("deeplab.train").make_optimizer(fixed).param_groups
        assert sum(len(g["params"]) for g in groups) == len(list(fixed.parameters()))  # the script's optimizer

    _, again = _deeplab(project, monkeypatch, sync_bn=sync_bn)
    second = fix_source(again, x, context=context, root=project, apply=True, unsafe=True)
    assert second.edits == [] and second.unfixable == [] and second.notes == []


def _deeplab_original(monkeypatch: pytest.MonkeyPatch, sync_bn: bool) -> nn.Module:
    """DeepLab built from the unfixed package in tests/fix_cases (the weights convert starts from)."""
    monkeypatch.syspath_prepend(str(CASES))
    modeling = _import_fresh("deeplab.modeling", monkeypatch)
    torch.manual_seed(0)
    model = modeling.DeepLab(sync_bn=sync_bn)
    monkeypatch.syspath_prepend(str(Path.cwd()))  # the project's package first again
    return model
