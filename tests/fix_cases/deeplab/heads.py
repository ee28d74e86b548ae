"""ASPP and the decoder (pytorch-deeplab-xception modeling/aspp.py and decoder.py, shrunk): each
takes the norm class as `BatchNorm` and initialises its norm layers by class."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sync_batchnorm import SynchronizedBatchNorm2d


class _ASPPModule(nn.Module):
    def __init__(self, inplanes, planes, kernel_size, padding, dilation, BatchNorm):
        super(_ASPPModule, self).__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size=kernel_size, stride=1,
                                     padding=padding, dilation=dilation, bias=False)
        self.bn = BatchNorm(planes)
        self.relu = nn.ReLU()
        self._init_weight()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))

    def _init_weight(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (SynchronizedBatchNorm2d, nn.BatchNorm2d)):
                m.weight.data.fill_(1)
                m.bias.data.zero_()


class ASPP(nn.Module):
    def __init__(self, inplanes, planes, BatchNorm):
        super(ASPP, self).__init__()
        self.aspp1 = _ASPPModule(inplanes, planes, 1, padding=0, dilation=1, BatchNorm=BatchNorm)
        self.aspp2 = _ASPPModule(inplanes, planes, 3, padding=2, dilation=2, BatchNorm=BatchNorm)
        self.conv1 = nn.Conv2d(2 * planes, planes, 1, bias=False)
        self.bn1 = BatchNorm(planes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = torch.cat((self.aspp1(x), self.aspp2(x)), dim=1)
        return self.relu(self.bn1(self.conv1(x)))


class Decoder(nn.Module):
    def __init__(self, num_classes, low_level_inplanes, planes, BatchNorm):
        super(Decoder, self).__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, planes // 2, 1, bias=False)
        self.bn1 = BatchNorm(planes // 2)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(planes + planes // 2, planes, kernel_size=3, stride=1, padding=1, bias=False),
            BatchNorm(planes),
            nn.ReLU(),
            nn.Conv2d(planes, num_classes, kernel_size=1, stride=1))

    def forward(self, x, low_level_feat):
        low_level_feat = self.relu(self.bn1(self.conv1(low_level_feat)))
        x = F.interpolate(x, size=low_level_feat.size()[2:], mode='bilinear', align_corners=True)
        return self.last_conv(torch.cat((x, low_level_feat), dim=1))
