"""The CIFAR model zoo's DenseNet (kuangliu/pytorch-cifar models/densenet.py): one Bottleneck and
one Transition class build every model, at widths that follow from the growth rate, so
densenet_cifar (growth 12) and DenseNet121 (growth 32) share every BatchNorm line at different
widths."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _group_norm(num_features, eps=1e-5, momentum=None, affine=True, track_running_stats=None,
                device=None, dtype=None, *, max_groups=32, channels_per_group=16):
    """torch.nn.GroupNorm taking BatchNorm's arguments (written by `normswap lint --fix`; momentum
    and track_running_stats mean nothing to it). The group count is the one `normswap convert`
    chooses: the largest divisor of num_features up to max_groups that leaves at least
    channels_per_group channels per group, else one group."""
    groups = [g for g in range(1, max_groups + 1)
              if num_features % g == 0 and num_features // g >= channels_per_group]
    return torch.nn.GroupNorm(max(groups, default=1), num_features, eps=eps, affine=affine,
                              device=device, dtype=dtype)


class Bottleneck(nn.Module):
    def __init__(self, in_planes, growth_rate):
        super().__init__()
        self.bn1 = _group_norm(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = _group_norm(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn = _group_norm(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x):
        out = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(out, 2)


class DenseNet(nn.Module):
    def __init__(self, block, nblocks, growth_rate=12, reduction=0.5, num_classes=10):
        super().__init__()
        self.growth_rate = growth_rate

        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, num_planes, kernel_size=3, padding=1, bias=False)

        self.dense1 = self._make_dense_layers(block, num_planes, nblocks[0])
        num_planes += nblocks[0] * growth_rate
        out_planes = math.floor(num_planes * reduction)
        self.trans1 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense2 = self._make_dense_layers(block, num_planes, nblocks[1])
        num_planes += nblocks[1] * growth_rate
        out_planes = math.floor(num_planes * reduction)
        self.trans2 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense3 = self._make_dense_layers(block, num_planes, nblocks[2])
        num_planes += nblocks[2] * growth_rate
        out_planes = math.floor(num_planes * reduction)
        self.trans3 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense4 = self._make_dense_layers(block, num_planes, nblocks[3])
        num_planes += nblocks[3] * growth_rate

        self.bn = _group_norm(num_planes)
        self.linear = nn.Linear(num_planes, num_classes)

    def _make_dense_layers(self, block, in_planes, nblock):
        layers = []
        for _ in range(nblock):
            layers.append(block(in_planes, self.growth_rate))
            in_planes += self.growth_rate
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.dense4(out)
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def DenseNet121():
    return DenseNet(Bottleneck, [6, 12, 24, 16], growth_rate=32)


def densenet_cifar():
    return DenseNet(Bottleneck, [6, 12, 24, 16], growth_rate=12)


def build():
    return densenet_cifar()


INPUT_SHAPE = (2, 3, 32, 32)
# other models built from the lines the fix rewrites, each with its example input (they must equal convert's)
SIBLINGS = {"DenseNet121": ("DenseNet121", (2, 3, 32, 32))}
