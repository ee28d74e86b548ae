"""`normswap.federated.local_state` on real models: what a FedBN client keeps local, found in the
graph, against the name filter of Flower's FedBN recipe (`"bn" not in key`)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from zoo import build, example

from normswap.federated import local_state

# the state-dict keys a BatchNorm module holds, by module name
NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _norm_state(model: nn.Module) -> set[str]:
    """Independent oracle: the keys of every BatchNorm module's own tensors, from the module tree
    (the zoo's models use modules only)."""
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in NORM_KEYS
    }


@pytest.mark.parametrize(
    ("name", "missed_by_name"),
    [("torchvision/resnet18", 3), ("torchvision/mobilenet_v3_small", 34), ("timm/efficientnet_b0", 0)],
    ids=["resnet18", "mobilenet_v3_small", "efficientnet_b0"],
)
def test_local_state_names_what_the_bn_filter_misses(name: str, missed_by_name: int) -> None:
    model = build(name)
    state = model.state_dict()
    found = local_state(model, example(name))
    assert found.names == _norm_state(model)
    by_name = {key for key in state if "bn" in key}
    missed = {key.rpartition(".")[0] for key in found.names - by_name}
    assert len(missed) == missed_by_name  # BatchNorm layers Flower's filter would average across clients
    # an activation's parameters are shared like any other; only the norm's own tensors are local
    assert all(not key.startswith(tuple(f"{s.site}.act." for s in found.sites)) for key in found.names)
    shared = found.shared(state)
    assert all(value.is_floating_point() for value in shared.values())  # no step counter left to average
    assert len(shared) + len(found.local(state)) == len(state)


def test_timm_norm_act_layers_are_subclass_sites_with_their_own_tensors_only() -> None:
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=4, act_layer=nn.PReLU)
    found = local_state(model, torch.randn(2, 3, 32, 32))
    kinds = {site.kind for site in found.sites}
    assert kinds == {"subclass"}  # timm's BatchNormAct2d everywhere
    prelu = {key for key in model.state_dict() if ".act." in key}
    assert prelu and not prelu & found.names  # PReLU's weight is not the norm's
    assert found.names == _norm_state(model)
