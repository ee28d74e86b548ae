"""What healing optimises and how often it judges, by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import normswap
from models import build, input_for
from normswap.calibration import UNHEALED_NOTE
from normswap.calibration.heldout import distillation_loss


def test_class_scores_are_distilled_by_kl_or_as_logits() -> None:
    teacher = torch.randn(8, 10)
    # a softmax cannot see a shift of every logit: KL does not, the logits' MSE does
    assert float(distillation_loss([teacher + 0.5], [teacher])) < 1e-6
    assert torch.allclose(distillation_loss([teacher + 0.5], [teacher], "mse"), torch.tensor(0.25))
    student = torch.randn(8, 10)
    assert torch.allclose(distillation_loss([student], [teacher], "mse"), ((student - teacher) ** 2).mean())
    kl = (teacher.softmax(1) * (teacher.log_softmax(1) - student.log_softmax(1))).sum(1).mean()
    assert torch.allclose(distillation_loss([student], [teacher]), kl, atol=1e-6)


def test_mse_healing_minimises_and_judges_the_logits_mse() -> None:
    torch.manual_seed(0)
    model = build("resnet").eval()
    converted = normswap.convert(model, input_for("resnet"), to="groupnorm").model
    batches = [input_for("resnet", batch=8) * (1 + i / 4) for i in range(5)]
    result = normswap.heal(converted, model, batches, steps=6, eval_every=3, loss="mse", progress=False)
    heldout = batches[-1:]  # a fifth of 40 samples: the last batch
    with torch.no_grad():
        expected = float(((result.model(*heldout) - model(*heldout)) ** 2).mean())
    assert result.best.loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="heal loss must be one of kl, mse"):
        normswap.HealOptions(loss="l1")


def test_outputs_of_another_shape_or_dtype_are_left_out() -> None:
    features, boxes = torch.randn(4, 3, 5), torch.randn(4, 2)
    loss = distillation_loss([features, boxes, torch.arange(4)], [features + 1, boxes[:3], torch.arange(4) + 1])
    assert torch.allclose(loss, torch.tensor(1.0))  # only the features: boxes differ in length, ids are integers


def test_default_healing_judges_about_twenty_times_and_stops_after_eight_without_gain() -> None:
    options = normswap.HealOptions()
    assert options.planned_steps(batches_per_pass=63, batch_size=128) == 512  # 65,536 samples at 128
    assert options.resolved_eval_every(512) == 25 and options.resolved_eval_every(60) == 5
    torch.manual_seed(0)
    model = build("mlp")
    converted = normswap.convert(model, input_for("mlp"), to="layernorm").model
    result = normswap.heal(converted, model, [torch.randn(16, 10) for _ in range(5)], steps=100, progress=False)
    assert [p.step for p in result.curve][:3] == [0, 5, 10]  # 100 planned steps: every 5
    assert result.stopped in {"plateau", "steps"}
    if result.stopped == "plateau":  # eight evaluations after the best one
        best = min(p.step for p in result.curve if p.score == result.best)
        assert result.steps == best + 8 * 5


def _deep_mlp(sites: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for _ in range(sites):
        layers += [torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


@pytest.mark.parametrize("sites,lr", [(4, 1e-3), (20, 1e-3), (40, 5e-4)])
def test_the_default_rate_is_scaled_down_by_depth_beyond_twenty_sites(sites: int, lr: float) -> None:
    torch.manual_seed(0)
    model = _deep_mlp(sites)
    converted = normswap.convert(model, torch.randn(2, 8), to="layernorm").model
    applied: list[list[float]] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: applied.append([group["lr"] for group in optimizer.param_groups])
    )
    try:
        result = normswap.heal(converted, model, [torch.randn(16, 8) for _ in range(5)], steps=1, progress=False)
    finally:
        hook.remove()
    assert result.options is not None and result.options.lr == pytest.approx(lr)  # the report names the rate used
    # one planned step: no warm-up below the rate; the new layers at it, the trained weights at a third
    assert applied == [[pytest.approx(lr), pytest.approx(lr / 3)]]


class _FunctionalDeepMLP(torch.nn.Module):
    """`sites` Linear layers each normalized by an `F.batch_norm` call on its own parameters and
    statistics (the way some libraries write BatchNorm without a module)."""

    def __init__(self, sites: int) -> None:
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(sites))
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(8)) for _ in range(sites))
        self.biases = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(8)) for _ in range(sites))
        for i in range(sites):
            self.register_buffer(f"mean{i}", torch.zeros(8))
            self.register_buffer(f"var{i}", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x)
            mean, var = getattr(self, f"mean{i}"), getattr(self, f"var{i}")
            x = torch.relu(F.batch_norm(x, mean, var, self.weights[i], self.biases[i], self.training, 0.1, 1e-5))
        return x


def test_functional_sites_count_for_the_rate_and_train_at_it() -> None:
    torch.manual_seed(0)
    model = _FunctionalDeepMLP(40).eval()
    converted = normswap.convert(model, torch.randn(2, 8), to="layernorm").model
    applied: list[list[float]] = []
    sizes: list[list[int]] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        applied.append([group["lr"] for group in optimizer.param_groups])
        sizes.append([len(group["params"]) for group in optimizer.param_groups])

    hook = register_optimizer_step_pre_hook(record)
    try:
        result = normswap.heal(converted, model, [torch.randn(16, 8) for _ in range(5)], steps=1, progress=False)
    finally:
        hook.remove()
    assert result.options is not None and result.options.lr == pytest.approx(5e-4)  # 40 sites, as modules
    # the 40 calls' weight and bias at the rate; the 40 Linear layers' weight and bias at a third
    assert applied == [[pytest.approx(5e-4), pytest.approx(5e-4 / 3)]] and sizes == [[80, 80]]


def test_a_rate_given_is_used_whatever_the_depth() -> None:
    options = normswap.HealOptions(lr=2e-3)
    assert options.resolved_lr(55) == options.resolved_lr(3) == 2e-3
    assert normswap.HealOptions().resolved_lr(55) == pytest.approx(1e-3 * 20 / 55)  # ResNet-56's sites
    assert normswap.HealOptions().resolved_lr(0) == 1e-3  # frozen BN or a fold: no new layers


def test_a_calibration_without_healing_says_to_heal_before_training_on() -> None:
    torch.manual_seed(0)
    model = build("resnet").eval()
    data = [input_for("resnet", batch=8) for _ in range(5)]
    calibrated = normswap.convert(model, input_for("resnet"), to="groupnorm", calibration_data=data)
    assert UNHEALED_NOTE in calibrated.notes
    healed = normswap.convert(
        model, input_for("resnet"), to="groupnorm", calibration_data=data, heal=normswap.HealOptions(steps=2)
    )
    assert healed.healing is not None and UNHEALED_NOTE not in healed.notes
    frozen = normswap.convert(model, input_for("resnet"), to="frozen", calibration_data=data)
    assert UNHEALED_NOTE not in frozen.notes  # frozen BatchNorm keeps the function: nothing was fitted
