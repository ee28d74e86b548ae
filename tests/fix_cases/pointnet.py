"""PointNet (fxia22/pointnet.pytorch pointnet/model.py, shrunk): a shared per-point MLP written
as kernel-1 Conv1d layers, each followed by BatchNorm1d over (N, C, points), a max over the
points, then BatchNorm1d on (N, C) features in the classifier head; a small spatial transformer
(STN) predicts a 3x3 transform first. The points are a set, not a sequence."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TransformNet(nn.Module):
    def __init__(self, k=3, width=16):
        super().__init__()
        self.k = k
        self.conv1 = nn.Conv1d(k, width, 1)
        self.conv2 = nn.Conv1d(width, 2 * width, 1)
        self.fc1 = nn.Linear(2 * width, width)
        self.fc2 = nn.Linear(width, k * k)
        self.bn1 = nn.BatchNorm1d(width)
        self.bn2 = nn.BatchNorm1d(2 * width)
        self.bn3 = nn.BatchNorm1d(width)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.max(x, 2)[0]
        x = F.relu(self.bn3(self.fc1(x)))
        identity = torch.eye(self.k, device=x.device).flatten()
        return (self.fc2(x) + identity).view(-1, self.k, self.k)


class PointFeatures(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stn = TransformNet(3, width)
        self.conv1 = nn.Conv1d(3, width, 1)
        self.conv2 = nn.Conv1d(width, 4 * width, 1)
        self.bn1 = nn.BatchNorm1d(width)
        self.bn2 = nn.BatchNorm1d(4 * width)

    def forward(self, x):
        transform = self.stn(x)
        x = torch.bmm(x.transpose(2, 1), transform).transpose(2, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return torch.max(x, 2)[0]


class PointNetClassifier(nn.Module):
    def __init__(self, k=4, width=16):
        super().__init__()
        self.feat = PointFeatures(width)
        self.fc1 = nn.Linear(4 * width, 2 * width)
        self.fc2 = nn.Linear(2 * width, k)
        self.bn1 = nn.BatchNorm1d(2 * width)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(self.feat(x))))
        return F.log_softmax(self.fc2(x), dim=1)


def build():
    return PointNetClassifier()


INPUT_SHAPE = (2, 3, 32)
SIBLINGS = {"wider, 10 classes": ("wide", (2, 3, 24))}


def wide():
    return PointNetClassifier(k=10, width=32)
