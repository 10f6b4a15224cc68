"""A small CNN for the digit data sets: scikit-learn's 8x8 digits and 28x28 MNIST.

Four 3x3 conv layers in two stages (width, width, 2·width, 2·width channels, each stage
followed by 2x2 max-pooling), an adaptive average pool to a 2x2 grid, a hidden linear layer
(``feature_dim`` units, the features) and a linear head. It is in the spirit of the
"SmallCNN" of Zhang et al.'s TRADES MNIST experiments, made size-agnostic by the adaptive
pool so one class serves 8x8 (-> 2x2 after pooling) and 28x28 (-> 7x7 -> 2x2). No BatchNorm:
per-sample gradients (``cdp_fast.label.select``) then need no buffer handling and train/eval
modes agree. Input in [0, 1], normalised inside: ``(x - mean) / std`` (default 0.5 / 0.5,
i.e. [0, 1] -> [-1, 1]).

Shapes: x (B, C, H, W) in [0, 1], H, W >= 4 -> logits (B, num_classes); features
(B, feature_dim).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from cdp_fast.models._common import Normalize, check_input

__all__ = ["SmallCNN", "small_cnn"]

_ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU}


class SmallCNN(nn.Module):
    """Small CNN for 8x8 / 28x28 digits (any H, W >= 4)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 feature_dim: int = 128, activation: str = "relu",
                 mean: Union[float, Sequence[float]] = 0.5,
                 std: Union[float, Sequence[float]] = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        w = width
        self.in_channels = in_channels
        self.num_features = feature_dim
        self.normalize = Normalize(mean, std, in_channels)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), act(),
            nn.Conv2d(w, w, 3, padding=1), act(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), act(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), act(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 4, feature_dim), act(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        # He-normal init (fan_in): PyTorch's default (kaiming_uniform with a=√5) shrinks the
        # signal through the BN-free stack and TRADES then idles at loss ≈ log K for epochs.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: x (B, C, H, W) in [0, 1] -> (B, feature_dim)."""
        check_input(x, self.in_channels)
        if x.shape[-1] < 4 or x.shape[-2] < 4:
            raise ValueError(f"x must be at least 4x4, got {tuple(x.shape[-2:])}")
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x (B, C, H, W) in [0, 1] -> (B, num_classes)."""
        return self.head(self.features(x))


def small_cnn(num_classes: int = 10, **kw) -> SmallCNN:
    """The small digits CNN (1 input channel by default)."""
    return SmallCNN(num_classes=num_classes, **kw)
