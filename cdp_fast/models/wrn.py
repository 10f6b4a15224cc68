"""WideResNet with Swish, the variant of Gowal et al. (2020, 2021) used by the paper (App. D).

Architecture facts (DeepMind's ``adversarial_robustness/pytorch/model_zoo.py``, carried over
by DM-Improves-AT as ``wideresnetwithswish``; Zagoruyko & Komodakis 2016 for the WRN itself):

- input in [0, 1], normalised inside the model with the CIFAR-10 mean/std;
- ``init_conv`` 3x3, 16 channels; three groups of (depth - 4) / 6 pre-activation blocks with
  16·w, 32·w, 64·w channels (w = width), strides 1, 2, 2; WRN-28-10: 4 blocks per group,
  channels 160, 320, 640;
- block: BN -> Swish -> conv3x3(stride) -> BN -> Swish -> conv3x3, plus the identity or a
  1x1 conv shortcut when the channel count changes (the shortcut then takes the
  pre-activated input, as in the DeepMind code);
- TensorFlow-style "SAME" padding of the strided conv: pad (0, 1, 0, 1) for stride 2,
  (1, 1, 1, 1) for stride 1;
- BatchNorm momentum 0.01 in PyTorch's convention (= Haiku decay 0.99);
- head: BN -> Swish -> global average pool -> linear; the pooled 64·w-d vector
  (640 for WRN-28-10) is what :meth:`WideResNet.features` returns;
- init: conv weights N(0, 2 / (k·k·out_channels)), BN weight 1 / bias 0, linear bias 0.

Module names match the DeepMind / DM-Improves-AT / RobustBench ``DMWideResNet`` checkpoints
(``init_conv``, ``layer.{g}.block.{i}.batchnorm_0`` ..., ``batchnorm``, ``logits``; mean/std are
non-persistent buffers), so a bare state dict of theirs loads with ``load_state_dict(strict=True)``;
the files as published (``{"model_state_dict": ...}``, ``module.0.`` prefixes, RobustBench's
``mean`` / ``std`` keys, ``.safetensors``) load with :func:`cdp_fast.models.load_wrn_checkpoint`.

Shapes: x (B, C, H, W) in [0, 1] -> logits (B, num_classes); features (B, 64·width).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from cdp_fast.models._common import CIFAR10_MEAN, CIFAR10_STD, Normalize, check_input

__all__ = ["WideResNet", "wrn_28_10"]

_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU}


class _Block(nn.Module):
    """Pre-activation WRN block (BN-act-conv, BN-act-conv) with DeepMind's SAME padding."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act: type):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=0.01)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if self.has_shortcut else None)
        # TF "SAME" for a 3x3 kernel: symmetric at stride 1, bottom/right only at stride 2.
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(pre, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        # The 1x1 shortcut sees the pre-activated input; the identity sees the raw input.
        return out + (self.shortcut(pre) if self.has_shortcut else x)


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, act: type):
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WRN-depth-width (Swish by default), input in [0, 1], normalisation inside.

    Args:
        num_classes: output classes.
        depth: 6k + 4 (28 for WRN-28-10).
        width: widening factor (10 for WRN-28-10).
        activation: "swish" (= SiLU, the Gowal et al. variant) or "relu".
        mean, std: per-channel input statistics (CIFAR-10 by default).
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10,
                 activation: str = "swish",
                 mean: Union[float, Sequence[float]] = CIFAR10_MEAN,
                 std: Union[float, Sequence[float]] = CIFAR10_STD,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6k + 4 with k >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        channels = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.in_channels = in_channels
        self.num_features = channels[3]
        self.normalize = Normalize(mean, std, in_channels)
        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, channels[0], channels[1], 1, act),
            _BlockGroup(n, channels[1], channels[2], 2, act),
            _BlockGroup(n, channels[2], channels[3], 2, act),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: x (B, C, H, W) in [0, 1] -> (B, 64·width) (640 for WRN-28-10)."""
        check_input(x, self.in_channels)
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.relu(self.batchnorm(out))
        # Global average pool (= avg_pool2d(8) of the DeepMind code at 32x32 inputs).
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x (B, C, H, W) in [0, 1] -> (B, num_classes)."""
        return self.logits(self.features(x))


def wrn_28_10(num_classes: int = 10, **kw) -> WideResNet:
    """WRN-28-10 with Swish (the paper's classifier and feature extractor, App. D)."""
    return WideResNet(num_classes=num_classes, depth=28, width=10, **kw)
