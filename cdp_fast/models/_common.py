"""Shared pieces of the classifiers: input normalisation inside the model.

Every classifier in :mod:`cdp_fast.models` takes images in [0, 1] (NCHW) and normalises them
itself, ``(x - mean) / std`` per channel, as DM-Improves-AT's / DeepMind's model zoo do. That
keeps attacks simple (the ε-ball and the [0, 1] box are in pixel space) and lets AutoAttack
run on the model unchanged.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = ["Normalize", "CIFAR10_MEAN", "CIFAR10_STD"]

# CIFAR-10 channel statistics as used by DeepMind's model zoo / DM-Improves-AT
# (``wideresnetwithswish.py``): mean (0.4914, 0.4822, 0.4465), std (0.2471, 0.2435, 0.2616).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; x: (B, C, H, W) in [0, 1].

    The statistics are non-persistent buffers: they move with ``.to(device)`` but are not in
    the ``state_dict`` (so checkpoints of the public DeepMind / DM-Improves-AT WRNs, which
    store no mean/std, load with ``strict=True``).
    """

    def __init__(self, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]],
                 channels: int):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 1:
            mean_t = mean_t.expand(channels).clone()
        if std_t.numel() == 1:
            std_t = std_t.expand(channels).clone()
        if mean_t.numel() != channels:
            raise ValueError(f"mean must have 1 or {channels} entries, got {mean_t.numel()}")
        if std_t.numel() != channels:
            raise ValueError(f"std must have 1 or {channels} entries, got {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, channels, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def check_input(x: torch.Tensor, channels: int, name: str = "x") -> None:
    """Raise ValueError unless x is a (B, channels, H, W) floating tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got dtype {x.dtype}")
