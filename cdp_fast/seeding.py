"""Randomness per sample: sample i of a run draws everything random (x_T, η-noise, its "real"
positive, its class) from a generator seeded by (seed, i) alone, so results do not depend on
the batch size, the number of processes or an interruption in between.
"""
from __future__ import annotations

import torch

__all__ = ["sample_seed", "generators", "per_sample_randn"]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (splitmix64 mixing):
    a function of (seed, index) only."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def generators(seed: int, indices) -> list:
    """One CPU ``torch.Generator`` per sample index, seeded by :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def per_sample_randn(gens, shape, device, dtype=torch.float32) -> torch.Tensor:
    """(len(gens), *shape) standard normal draws, row j from ``gens[j]`` (drawn on the CPU,
    then moved: the same numbers on every device)."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(device)
