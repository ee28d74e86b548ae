"""DeepLab (pytorch-deeplab-xception modeling/deeplab.py, shrunk): the norm class is selected once,
`SynchronizedBatchNorm2d` when training on several GPUs, and passed to the backbone, ASPP and the
decoder; the optimizer's two parameter groups (`get_1x_lr_params`, `get_10x_lr_params`) are the
parameters of the layers that pass an isinstance test, the norm layers among them."""

import torch.nn as nn
import torch.nn.functional as F

from .backbone import ResNet
from .heads import ASPP, Decoder
from .sync_batchnorm import SynchronizedBatchNorm2d


class DeepLab(nn.Module):
    def __init__(self, num_classes=5, width=16, sync_bn=True, freeze_bn=False):
        super(DeepLab, self).__init__()
        if sync_bn == True:
            BatchNorm = SynchronizedBatchNorm2d
        else:
            BatchNorm = nn.BatchNorm2d

        self.backbone = ResNet([1, 2], BatchNorm, width=width)
        self.aspp = ASPP(4 * width, 2 * width, BatchNorm)
        self.decoder = Decoder(num_classes, 2 * width, 2 * width, BatchNorm)

        if freeze_bn:
            self.freeze_bn()

    def forward(self, input):
        x, low_level_feat = self.backbone(input)
        x = self.decoder(self.aspp(x), low_level_feat)
        return F.interpolate(x, size=input.size()[2:], mode='bilinear', align_corners=True)

    def freeze_bn(self):
        for m in self.modules():
            if isinstance(m, SynchronizedBatchNorm2d):
                m.eval()
            elif isinstance(m, nn.BatchNorm2d):
                m.eval()

    def get_1x_lr_params(self):
        modules = [self.backbone]
        for i in range(len(modules)):
            for m in modules[i].named_modules():
                if isinstance(m[1], nn.Conv2d) or isinstance(m[1], SynchronizedBatchNorm2d) \
                        or isinstance(m[1], nn.BatchNorm2d):
                    for p in m[1].parameters():
                        if p.requires_grad:
                            yield p

    def get_10x_lr_params(self):
        modules = [self.aspp, self.decoder]
        for i in range(len(modules)):
            for m in modules[i].named_modules():
                if isinstance(m[1], nn.Conv2d) or isinstance(m[1], SynchronizedBatchNorm2d) \
                        or isinstance(m[1], nn.BatchNorm2d):
                    for p in m[1].parameters():
                        if p.requires_grad:
                            yield p
