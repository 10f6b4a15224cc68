"""PreAct-ResNet-18 (He et al. 2016, "Identity mappings in deep residual networks"), the
CIFAR variant used across adversarial-training work (Rice et al. 2020; DM-Improves-AT's
``preact-resnet18``): 3x3 stem with 64 channels, four stages of two pre-activation basic
blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), a final BN-activation, global
average pooling and a linear head. Input in [0, 1], normalised inside the model.

Shapes: x (B, C, H, W) in [0, 1] -> logits (B, num_classes); features (B, 512).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from cdp_fast.models._common import CIFAR10_MEAN, CIFAR10_STD, Normalize, check_input

__all__ = ["PreActResNet", "preact_resnet18"]

_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU}


class _PreActBlock(nn.Module):
    """BN-act-conv3x3(stride), BN-act-conv3x3, plus identity or a 1x1 conv of the
    pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int, act: type):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = act()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = act()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet; ``num_blocks=(2, 2, 2, 2)`` is PreAct-ResNet-18."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 activation: str = "relu",
                 mean: Union[float, Sequence[float]] = CIFAR10_MEAN,
                 std: Union[float, Sequence[float]] = CIFAR10_STD,
                 in_channels: int = 3):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(num_blocks) != 4 or any(int(b) < 1 for b in num_blocks):
            raise ValueError(f"num_blocks must be 4 positive ints, got {tuple(num_blocks)}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        self.in_channels = in_channels
        self.num_features = 512
        self.normalize = Normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
            blocks = []
            for i in range(int(n)):
                blocks.append(_PreActBlock(in_planes, planes, stride if i == 0 else 1, act))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.act = act()
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: x (B, C, H, W) in [0, 1] -> (B, 512)."""
        check_input(x, self.in_channels)
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.act(self.bn(out)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x (B, C, H, W) in [0, 1] -> (B, num_classes)."""
        return self.linear(self.features(x))


def preact_resnet18(num_classes: int = 10, **kw) -> PreActResNet:
    """PreAct-ResNet-18 (2, 2, 2, 2 basic blocks)."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, **kw)
