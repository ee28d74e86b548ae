"""The real models of the ecosystem tier: timm, torchvision and transformers classes built with
random weights (nothing is downloaded), small inputs, and non-trivial BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torchvision
import transformers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap


@dataclass(frozen=True)
class RealModel:
    """A model of a real library: how to build it, its example input's shape, and whether its
    output can be exported and compared (a detector's boxes depend on its own predictions)."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    exports: bool = True
    labels_in_train: bool = False  # forward needs targets in train mode (torchvision detection)


def _hf_resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=4
    )
    return transformers.ResNetForImageClassification(config)


def _hf_mobilenet_v2() -> nn.Module:
    # a TensorFlow port: eps 1e-3 and momentum 0.997 (a decay), which NS204 flags and convert carries
    return transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=4)
    )


def _hf_segformer() -> nn.Module:
    config = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=3,
    )
    return transformers.SegformerForSemanticSegmentation(config)


def _hf_conformer() -> nn.Module:
    """wav2vec2-conformer: the conformer convolution module's BatchNorm1d over (N, C, T)."""
    config = transformers.Wav2Vec2ConformerConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_feat_extract_layers=2,
        conv_depthwise_kernel_size=3,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        position_embeddings_type="relative",
    )
    return transformers.Wav2Vec2ConformerModel(config)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=4)


MODELS = {
    model.name: model
    for model in (
        # timm: BatchNormAct2d families (its own F.batch_norm, then drop and act) and a plain ResNet
        RealModel("timm/efficientnet_b0", _timm("efficientnet_b0"), (2, 3, 32, 32)),
        RealModel("timm/mobilenetv3_small_050", _timm("mobilenetv3_small_050"), (2, 3, 32, 32)),
        RealModel("timm/regnetx_002", _timm("regnetx_002"), (2, 3, 32, 32)),
        RealModel("timm/ese_vovnet19b_slim_dw", _timm("ese_vovnet19b_slim_dw"), (2, 3, 32, 32)),
        RealModel("timm/resnet18", _timm("resnet18"), (2, 3, 32, 32)),
        # torchvision: classification, segmentation, detection
        RealModel("torchvision/resnet18", lambda: torchvision.models.resnet18(num_classes=4), (2, 3, 32, 32)),
        RealModel(
            "torchvision/mobilenet_v3_small",
            lambda: torchvision.models.mobilenet_v3_small(num_classes=4),
            (2, 3, 32, 32),
        ),
        RealModel(
            "torchvision/deeplabv3_mobilenet_v3_large",
            lambda: torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=3
            ),
            (2, 3, 64, 64),
        ),
        RealModel(
            "torchvision/ssdlite320_mobilenet_v3_large",
            lambda: torchvision.models.detection.ssdlite320_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=3
            ),
            (2, 3, 64, 64),
            exports=False,
            labels_in_train=True,
        ),
        # transformers: vision models and a conformer speech model
        RealModel("transformers/resnet", _hf_resnet, (2, 3, 32, 32)),
        RealModel("transformers/mobilenet_v2", _hf_mobilenet_v2, (2, 3, 32, 32)),
        RealModel("transformers/segformer", _hf_segformer, (2, 3, 32, 32)),
        RealModel("transformers/wav2vec2_conformer", _hf_conformer, (2, 400)),
    )
}


def build(name: str) -> nn.Module:
    """The model with seeded weights and running statistics away from (0, 1), in eval mode."""
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build()
    x = example(name, batch=4) * 1.5 + 0.3
    with torch.no_grad():
        model.eval()
        for module in model.modules():  # only the norms train: detectors want targets in train mode
            if isinstance(module, _BatchNorm):
                module.train()
        model(x)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def example(name: str, batch: int | None = None) -> torch.Tensor:
    shape = MODELS[name].shape
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((batch or shape[0], *shape[1:]), generator=generator)


_CONVERSIONS: dict[tuple[str, str, bool], tuple[nn.Module, normswap.Conversion]] = {}


def converted(name: str, target: str, dp: bool = False) -> tuple[nn.Module, normswap.Conversion]:
    """(original, Conversion) of a real model to a target (under --dp with `dp`), made once per
    session and shared by the tests; tests that change a model work on a copy."""
    key = (name, target, dp)
    if key not in _CONVERSIONS:
        original = build(name)
        _CONVERSIONS[key] = (
            original,
            normswap.convert(original, example(name), to=target, context=normswap.Context(differential_privacy=dp)),
        )
    return _CONVERSIONS[key]
