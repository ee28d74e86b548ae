"""Hugging Face round trip: a converted PreTrainedModel records its plan in its config;
`save_pretrained` writes it and `normswap.from_pretrained` rebuilds the converted model, equal to
the one saved. Plain `from_pretrained` builds the BatchNorm architecture instead (documented)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn.modules.batchnorm import _BatchNorm
from zoo import converted, example

import normswap
from normswap.errors import PlanError


@pytest.mark.parametrize("target", ["groupnorm", "frozen", "fold", "layernorm"])
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("transformers/resnet", transformers.ResNetForImageClassification),
        ("transformers/segformer", transformers.SegformerForSemanticSegmentation),
    ],
    ids=["resnet", "segformer"],
)
def test_save_pretrained_and_normswap_from_pretrained_round_trip(
    name: str, cls: type, target: str, tmp_path: Path
) -> None:
    _, conversion = converted(name, target)
    conversion.model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["normswap_plan"] == conversion.plan.to_dict()
    loaded = normswap.from_pretrained(cls, tmp_path)
    assert not any(isinstance(m, _BatchNorm) for m in loaded.modules())
    x = example(name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, conversion.model.eval()(x).logits, rtol=0, atol=0)


def test_plain_from_pretrained_builds_the_batchnorm_model(tmp_path: Path) -> None:
    _, conversion = converted("transformers/resnet", "groupnorm")
    conversion.model.save_pretrained(tmp_path)
    plain = transformers.ResNetForImageClassification.from_pretrained(tmp_path)
    assert any(isinstance(m, _BatchNorm) for m in plain.modules())  # what the README warns about


def test_a_folder_without_a_plan_is_one_sentence(tmp_path: Path) -> None:
    transformers.ResNetForImageClassification(
        transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])
    ).save_pretrained(tmp_path)
    with pytest.raises(
        PlanError, match=r"holds no normswap plan.*load it with ResNetForImageClassification.from_pretrained"
    ):
        normswap.from_pretrained(transformers.ResNetForImageClassification, tmp_path)
