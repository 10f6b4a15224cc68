"""Randomness per sample: sample i of a run draws everything random (x_T, its "real" positive,
its class) from a generator seeded by (seed, i) alone, and its per-step noise (η > 0, DDPM)
from a counter-based generator keyed by (seed, i, draw, element) on the device — so results
do not depend on the batch size, the number of processes or an interruption in between, and a
sampling step needs no host round trip (it can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch

__all__ = ["sample_seed", "generators", "per_sample_randn", "sample_seeds", "counter_normal"]

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


# splitmix64 (Steele, Lea, Flood 2014) on int64 tensors: wrapping multiplication, logical right
# shifts by masking the sign-extended bits; the same numbers as sample_seed's Python version
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _M1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _uniform(z: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of z as a float64 in (0, 1) (never 0: the log below stays finite)."""
    return (((z >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) * 2.0 ** -53


def sample_seeds(seed: int, indices, device=None) -> torch.Tensor:
    """(len(indices),) int64: :func:`sample_seed` of each sample, the keys of its noise."""
    return torch.tensor([sample_seed(seed, i) for i in indices], dtype=torch.int64, device=device)


def counter_normal(seeds: torch.Tensor, draw: int, shape, dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal noise on ``seeds``' device, row j a function of
    (seeds[j], draw, element index) only — a counter-based generator: splitmix64 of a Weyl
    sequence over the counter gives two uniforms per element, Box–Muller turns them into a
    normal. No generator state, no host synchronisation: the same numbers on any device, for
    any batch composition, and capturable in a CUDA graph (``draw`` = the index of this draw
    in the trajectory).
    """
    n = 1
    for v in shape:
        n *= int(v)
    offset = ((int(draw) + 1) * _GOLDEN) % (1 << 64)                  # wrap to int64 in Python
    offset -= (1 << 64) if offset >= (1 << 63) else 0
    key = _mix64(seeds.view(-1, 1).to(torch.int64) + offset)                                # (B, 1)
    j = torch.arange(n, device=seeds.device, dtype=torch.int64).view(1, -1)
    u1 = _uniform(_mix64(key + (2 * j + 1) * _GOLDEN))
    u2 = _uniform(_mix64(key + (2 * j + 2) * _GOLDEN))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return z.to(dtype).view((seeds.shape[0],) + tuple(int(v) for v in shape))
