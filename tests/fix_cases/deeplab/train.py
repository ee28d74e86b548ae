"""The training script's optimizer (pytorch-deeplab-xception train.py, shrunk): the model's two
learning-rate groups, and with --freeze-bn the norm layers' affine parameters frozen too (a
common addition, chosen by class); parameter names logged by a name filter."""

import torch
import torch.nn as nn

from .modeling import DeepLab


def make_optimizer(model, lr=0.01):
    train_params = [{'params': model.get_1x_lr_params(), 'lr': lr},
                    {'params': model.get_10x_lr_params(), 'lr': lr * 10}]
    return torch.optim.SGD(train_params, momentum=0.9, weight_decay=5e-4)


def freeze_norm_affine(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for p in m.parameters():
                p.requires_grad = False


def logged(model):
    return [name for name, _ in model.named_parameters() if 'bn' in name]


def build_for_training(sync_bn=False):
    return DeepLab(sync_bn=sync_bn)
