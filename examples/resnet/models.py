"""CIFAR-style ResNets (He et al., 2016, section 4.2): ResNet-20/32/56/110 and any depth ``6n + 2``.

Three stages of ``n`` basic blocks at 16, 32 and 64 channels (32x32, 16x16, 8x8), global average pooling and a
linear classifier. Where a block changes shape, its shortcut is a 1x1 conv + BatchNorm ("option B", as in
Torch-Pruning's CIFAR ResNet-56), so that every channel of a stage can be pruned through the residual adds.
"""
from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn as nn

WIDTHS: tuple[int, int, int] = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    The shortcut (identity, or 1x1 conv + BN where the block changes shape) is the submodule named
    :attr:`shortcut_name`, which is also its state-dict key; a subclass may store it under another name (the test
    networks in ``tests/nets.py`` use ``shortcut``)."""

    shortcut_name: ClassVar[str] = "downsample"

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.add_module(self.shortcut_name, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + getattr(self, self.shortcut_name)(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``blocks`` basic blocks per stage (depth ``6 * blocks + 2``)."""

    def __init__(self, blocks: int, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks per stage must be >= 1, got {blocks}")
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            layers = [BasicBlock(in_ch if b == 0 else width, width, 2 if (b == 0 and i > 0) else 1) for b in range(blocks)]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(arch: str, num_classes: int = 10) -> CifarResNet:
    """``"resnet20"``, ``"resnet32"``, ``"resnet56"``, ... (any ``resnet<6n+2>``), randomly initialised."""
    m = re.fullmatch(r"resnet(\d+)", arch)
    if m is None or (int(m.group(1)) - 2) % 6 != 0 or int(m.group(1)) < 8:
        raise ValueError(f"unknown arch {arch!r}: use resnet<depth> with depth = 6n + 2 >= 8 (resnet20, resnet32, resnet56)")
    return CifarResNet((int(m.group(1)) - 2) // 6, num_classes)
