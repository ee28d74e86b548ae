"""Federated clients: `--federated` and NS108 in lint, and `normswap.federated.local_state`, the
state-dict names of every normalization site found in the graph: what a FedBN client keeps local
(Li et al. 2021), where Flower's recipe filters names with `"bn" not in key`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import normswap
from normswap.cli import main
from normswap.errors import ConfigError
from normswap.federated import LocalState, local_state
from workspace import SHAPE


class NormAct(nn.BatchNorm2d):
    """A BatchNorm subclass whose activation has a parameter of its own (PReLU): not the norm's."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class Clinic(nn.Module):
    """A CNN whose normalization layers have no "bn" in their names (as torchvision's
    `layer2.0.downsample.1` and MobileNet's `features.0.1`): a module, a subclass, a SyncBatchNorm,
    a functional call on the model's own tensors, and an auxiliary norm forward never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), NormAct(8))
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.SyncBatchNorm(16))
        self.gamma = nn.Parameter(torch.ones(16))
        self.beta = nn.Parameter(torch.zeros(16))
        self.register_buffer("mu", torch.zeros(16))
        self.register_buffer("sigma2", torch.ones(16))
        self.aux = nn.BatchNorm1d(16)  # an auxiliary head's norm: state a client keeps too
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(self.stage(self.features(x)))
        x = F.batch_norm(x, self.mu, self.sigma2, self.gamma, self.beta, self.training)
        return self.head(x.mean(dim=(2, 3)))


NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# written from the model's definition: every tensor a normalization holds, by its state-dict key
CLINIC_LOCAL = {
    *(f"{layer}.{name}" for layer in ("features.1", "stage.1", "downsample.1", "aux") for name in NORM),
    "gamma",
    "beta",
    "mu",
    "sigma2",
}


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_the_graph_finds_every_normalization_a_name_filter_misses() -> None:
    model = Clinic()
    state = model.state_dict()
    found = local_state(model, _x())
    assert isinstance(found, LocalState) and found.capture_method == "fx"
    assert found.names == CLINIC_LOCAL
    assert not {key for key in state if "bn" in key}  # Flower's recipe would keep nothing local
    assert "stage.1.act.weight" not in found  # the activation's parameter is shared like any other
    by_site = {site.site: site for site in found.sites}
    functional = by_site["batch_norm"]
    assert (functional.kind, functional.parameters, functional.buffers) == (
        "functional",
        ("gamma", "beta"),
        ("mu", "sigma2"),
    )
    assert by_site["stage.1"].kind == "subclass" and by_site["aux"].buffers == (
        "aux.running_mean",
        "aux.running_var",
        "aux.num_batches_tracked",
    )
    assert found.local(state).keys() | found.shared(state).keys() == state.keys()
    assert not found.local(state).keys() & found.shared(state).keys()


def test_the_model_is_left_as_it_was() -> None:
    model = Clinic().train()
    before = copy.deepcopy(model.state_dict())
    local_state(model, _x())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Tied(nn.Module):
    """One BatchNorm stored under two names; a weight computed from a parameter; a variance held
    as a plain attribute (no state-dict entry)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.first = self.norm
        self.log_gamma = nn.Parameter(torch.zeros(8))
        self.register_buffer("mean", torch.zeros(8))
        self.variance = torch.ones(8)  # not registered: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(self.conv(x))
        return F.batch_norm(x, self.mean, self.variance, self.log_gamma.exp(), None, False)


def test_aliases_computed_weights_and_tensors_outside_the_state_dict() -> None:
    found = local_state(Tied(), _x())
    by_site = {site.site: site for site in found.sites}
    assert by_site["norm"].parameters == ("norm.weight", "first.weight", "norm.bias", "first.bias")
    functional = by_site["batch_norm"]
    assert functional.parameters == ("log_gamma",) and functional.buffers == ("mean",)
    assert functional.notes == ("its running_var is computed in forward or held outside the state dict",)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx and torch.export fail, the hooks capture runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.scale = nn.Parameter(torch.ones(8))
        self.register_buffer("center", torch.zeros(8))
        self.register_buffer("spread", torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if float(x.mean()) > 100:  # data-dependent
            x = x * 2
        return F.batch_norm(x, self.center, self.spread, self.scale, None, self.training)


def test_functional_tensors_are_named_without_a_graph_too() -> None:
    found = local_state(Untraceable(), _x())
    assert found.capture_method == "hooks"
    assert found.names == {"scale", "center", "spread"}


def test_a_model_without_normalization_keeps_nothing_local() -> None:
    found = local_state(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), _x())
    assert found.sites == () and found.names == frozenset() and len(found) == 0


def test_a_non_module_is_an_api_error() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        local_state(lambda x: x, _x())


# --- a Flower-style FedBN loop, written here ---------------------------------------------------


def _average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FedAvg over equal-sized clients: the mean of each entry (integers through float64, as
    numpy-based strategies do, cast back on load)."""
    return {
        key: torch.stack([s[key].double() for s in states]).mean(dim=0).to(states[0][key].dtype) for key in states[0]
    }


def _run_rounds(select_shared, rounds: int = 3) -> list[nn.Module]:
    """Clients whose features differ (scale and shift grow with the client), each training a few
    steps per round on its own data, then the server averaging what `select_shared` sends."""
    torch.manual_seed(0)
    clients = [Clinic() for _ in range(3)]
    data = []
    for k in range(3):
        generator = torch.Generator().manual_seed(10 + k)
        data.append(
            (
                torch.randn(8, 3, 8, 8, generator=generator) * (1 + k) + 2 * k,
                torch.randint(0, 4, (8,), generator=generator),
            )
        )
    for _ in range(rounds):
        uploads = []
        for client, (x, y) in zip(clients, data, strict=True):
            optimizer = torch.optim.SGD(client.parameters(), lr=0.01)
            client.train()
            for _ in range(3):
                optimizer.zero_grad()
                F.cross_entropy(client(x), y).backward()
                optimizer.step()
            uploads.append(select_shared(client.state_dict()))
        aggregated = _average(uploads)
        for client in clients:
            client.load_state_dict(aggregated, strict=False)  # the rest stays as the client has it
    return clients


def test_fedbn_keeps_each_clients_statistics_where_the_name_filter_averages_them() -> None:
    local = local_state(Clinic(), _x())
    fedbn = _run_rounds(local.shared)
    flower = _run_rounds(lambda state: {key: value for key, value in state.items() if "bn" not in key})

    def spread(clients: list[nn.Module], key: str) -> float:
        values = [client.state_dict()[key].float() for client in clients]
        return max(float((v - values[0]).abs().max()) for v in values)

    for key in ("features.1.running_mean", "features.1.running_var"):
        # the first norm sees the clients' features four units and three times apart: its statistics
        # differ by about 1 (0.3: a wide margin), unless the server averaged them into one
        assert spread(fedbn, key) > 0.3, key
        assert spread(flower, key) == 0.0, key
    for key in ("features.1.weight", "gamma", "downsample.1.bias"):
        # trained by each client on its own data: not equal, unless averaged
        assert spread(fedbn, key) > 0.0, key
        assert spread(flower, key) == 0.0, key
    shared = [client.state_dict() for client in fedbn]
    for key in local.shared(shared[0]):
        assert all(torch.equal(s[key], shared[0][key]) for s in shared), key
    # what FedBN sends holds no step counter (an integer FedAvg would average); the filter's holds four
    integers = [key for key, value in local.shared(shared[0]).items() if not value.is_floating_point()]
    assert integers == []
    assert len([key for key in shared[0] if "bn" not in key and key.endswith("num_batches_tracked")]) == 4


# --- the context and the rule ------------------------------------------------------------------


def test_federated_is_a_context_flag_and_a_configuration_key() -> None:
    assert normswap.Context.from_mapping({"federated": True}).federated
    with pytest.raises(ConfigError, match="'federated' in context: federated must be true or false"):
        normswap.Context.from_mapping({"federated": "yes"})


def test_lint_federated_names_each_batchnorm_and_proposes_groupnorm_or_fedbn(work) -> None:
    result = CliRunner().invoke(main, ["lint", "nets:build", *SHAPE, "--federated", "--format", "json"])
    document = json.loads(result.stdout)["reports"][0]
    (finding,) = [f for f in document["findings"] if f["code"] == "NS108"]
    assert finding["site"] == "bn" and "FedBN" in finding["fix"]["description"]
    assert document["context"]["federated"] is True
    quiet = CliRunner().invoke(main, ["lint", "nets:build", *SHAPE, "--format", "json"])
    assert not [f for f in json.loads(quiet.stdout)["reports"][0]["findings"] if f["code"] == "NS108"]
