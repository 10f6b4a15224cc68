"""The authors' four-layer MNIST CNN (two 5×5 convolutions, two linear layers), the classifier
and guidance feature network of the paper's MNIST experiment (revised paper App. D.1: "the
four-layer CNN"; their ``core/models/mnist_net.py``): conv 5×5 1→4, ReLU, max-pool 2; conv
5×5 4→10, ReLU, max-pool 2; linear 160→100, ReLU (the 100-d features the guidance head reads);
linear 100→10. No padding, no normalisation: 28×28 inputs in [0, 1] (4×4×10 = 160 after the
second pool; other sizes are refused). 18,224 parameters.

Shapes: x (B, 1, 28, 28) in [0, 1] -> logits (B, num_classes); features (B, 100).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdp_fast.models._common import check_input

__all__ = ["MnistNet", "mnist_net"]


class MnistNet(nn.Module):
    """Four-layer CNN for 28×28 single-channel digits (see the module docstring)."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 100):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        self.in_channels = 1
        self.num_features = feature_dim
        self.conv_1 = nn.Conv2d(1, 4, kernel_size=5)
        self.conv_2 = nn.Conv2d(4, 10, kernel_size=5)
        self.fc_1 = nn.Linear(4 * 4 * 10, feature_dim)
        self.fc_2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(fc_1): x (B, 1, 28, 28) in [0, 1] -> (B, feature_dim)."""
        check_input(x, 1)
        if tuple(x.shape[-2:]) != (28, 28):
            raise ValueError(f"x must be 28x28, got {tuple(x.shape[-2:])}")
        h = F.max_pool2d(F.relu(self.conv_1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv_2(h)), 2)
        return F.relu(self.fc_1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x (B, 1, 28, 28) in [0, 1] -> (B, num_classes)."""
        return self.fc_2(self.features(x))


def mnist_net(num_classes: int = 10, **kw) -> MnistNet:
    """The authors' four-layer MNIST CNN."""
    return MnistNet(num_classes=num_classes, **kw)
