"""Small models for tests: importable as `tiny_models:factory` by the CLI and by Ray workers."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """conv(3->4, 3x3, stride 2) -> ReLU -> conv(4->6) -> ReLU -> global max -> linear(6->5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny() -> nn.Module:
    return Tiny()


class Sequence3d(nn.Module):
    """A layer whose output is (N, C, T, H, W): not indexable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.lift = nn.Identity()

    def forward(self, x):
        return self.lift(self.conv(x).unsqueeze(2))


def seq3d() -> nn.Module:
    return Sequence3d()
