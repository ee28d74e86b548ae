"""YOLOv5's way of building a detector (models/common.py and models/yolo.py, shrunk): every
convolution of every model size is the one `Conv` class, so one BatchNorm line builds all of them;
the widths come from the model's width multiple (yolov5n 0.25, yolov5s 0.50) through
`make_divisible`, and C3 splits them with `int(c2 * e)`."""

import math

import torch
import torch.nn as nn


def autopad(k, p=None, d=1):
    # Pad to 'same' shape outputs
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def make_divisible(x, divisor):
    # Returns nearest x divisible by divisor
    return math.ceil(x / divisor) * divisor


class Conv(nn.Module):
    # Standard convolution with args(ch_in, ch_out, kernel, stride, padding, groups, dilation, activation)
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    # Standard bottleneck
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    # CSP Bottleneck with 3 convolutions
    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)  # hidden channels
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    # Spatial Pyramid Pooling - Fast (SPPF) layer
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2  # hidden channels
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


# [from, number, module, args]: yolov5's backbone as its yaml writes it
BACKBONE = [
    [-1, 1, Conv, [64, 6, 2, 2]],  # 0-P1/2
    [-1, 1, Conv, [128, 3, 2]],  # 1-P2/4
    [-1, 3, C3, [128]],
    [-1, 1, Conv, [256, 3, 2]],  # 3-P3/8
    [-1, 6, C3, [256]],
    [-1, 1, Conv, [512, 3, 2]],  # 5-P4/16
    [-1, 9, C3, [512]],
    [-1, 1, Conv, [1024, 3, 2]],  # 7-P5/32
    [-1, 3, C3, [1024]],
    [-1, 1, SPPF, [1024, 5]],  # 9
]


def parse_model(d, ch):
    gd, gw = d["depth_multiple"], d["width_multiple"]
    layers, c2 = [], ch
    for _f, n, m, args in d["backbone"]:
        n = max(round(n * gd), 1) if n > 1 else n  # depth gain
        c1, c2 = c2, make_divisible(args[0] * gw, 8)
        args = [c1, c2, *args[1:]]
        if m is C3:
            args.insert(2, n)  # number of repeats
            n = 1
        layers.append(nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args))
    return nn.Sequential(*layers)


class DetectionModel(nn.Module):
    def __init__(self, cfg, ch=3):
        super().__init__()
        self.model = parse_model(cfg, ch)

    def forward(self, x):
        return self.model(x)


def yolov5n():
    return DetectionModel({"depth_multiple": 0.33, "width_multiple": 0.25, "backbone": BACKBONE})


def yolov5s():
    return DetectionModel({"depth_multiple": 0.33, "width_multiple": 0.50, "backbone": BACKBONE})


def build():
    return yolov5n()


INPUT_SHAPE = (2, 3, 64, 64)
# other models built from the lines the fix rewrites, each with its example input (they must equal convert's)
SIBLINGS = {"yolov5s (widths up to 512)": ("yolov5s", (2, 3, 64, 64))}
