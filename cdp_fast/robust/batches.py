"""Which images each update sees and how they are perturbed: the training loop's data order.

- :func:`mix_counts`, :func:`epoch_indices`, :class:`MixedBatchSampler`: the fixed-ratio
  real/synthetic mixing of every batch (DM-Improves-AT's ``--unsup-fraction``), a function of
  (seed, epoch), split over torch.distributed ranks as rows ``rank::N`` of each global batch;
- :func:`step_seed`: the seed of one update's random draws (crops, flips, attack starts), the
  same on every rank;
- :func:`augment_batch` (= :func:`augment_draws` + :func:`apply_augment`): random crop after
  zero padding and horizontal flips on tensors, the draws separable from their application so
  they can be made for the whole global batch and sliced per rank; :func:`augment_defaults`:
  the padding and flips that fit an image size when the caller leaves them to the library.

Every random choice goes through a dedicated generator seeded from (seed, epoch) or (seed,
update), never the global RNG, so a run resumes bitwise and does not depend on the number of
processes (see :mod:`cdp_fast.robust.checkpoint` and :mod:`cdp_fast.robust.loop`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cdp_fast.utils.checks import check_number

__all__ = ["mix_counts", "epoch_indices", "step_seed", "MixedBatchSampler", "augment_batch",
           "augment_draws", "apply_augment", "augment_defaults"]


# --------------------------------------------------------------------------- data order
def mix_counts(batch_size: int, real_fraction: float, has_synthetic: bool) -> tuple[int, int]:
    """(real, synthetic) images per batch: ``round(batch_size · real_fraction)`` real."""
    if not has_synthetic:
        return batch_size, 0
    n_real = int(round(batch_size * real_fraction))
    n_syn = batch_size - n_real
    if 0.0 < real_fraction < 1.0 and (n_real == 0 or n_syn == 0):
        raise ValueError(f"batch_size={batch_size} is too small to mix at real_fraction="
                         f"{real_fraction}: one side would get 0 images")
    return n_real, n_syn


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _stream(n: int, start: int, count: int, key: tuple) -> np.ndarray:
    """Positions [start, start + count) of the endless concatenation of permutations
    P_0, P_1, ... of range(n), P_j drawn from ``key + (j,)``: every item is used once before
    any repeats."""
    out = []
    j, pos = start // n, start % n
    while count > 0:
        perm = _rng(*key, j).permutation(n)
        take = min(count, n - pos)
        out.append(perm[pos:pos + take])
        count -= take
        j, pos = j + 1, 0
    return np.concatenate(out) if out else np.empty(0, np.int64)


def epoch_indices(seed: int, epoch: int, steps: int, n_real: int, n_syn_total: int,
                  per_batch: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Data order of one epoch, (steps, n_real_b) and (steps, n_syn_b) index arrays.

    Real images: a fresh permutation per epoch (seeded by (seed, epoch)), extended by further
    permutations when the epoch needs more than one pass. Synthetic images: one endless
    stream of permutations across epochs, so the synthetic set is walked through once before
    any image repeats whatever the epoch length.
    """
    r, s = per_batch
    real = _stream(n_real, 0, steps * r, (seed, 1, epoch)) if r else np.empty(0, np.int64)
    syn = (_stream(n_syn_total, epoch * steps * s, steps * s, (seed, 2))
           if s else np.empty(0, np.int64))
    return real.reshape(steps, r).astype(np.int64), syn.reshape(steps, s).astype(np.int64)


def step_seed(seed: int, step: int) -> int:
    """Seed of update ``step``'s random draws; the same on every rank (each rank keeps its rows
    of draws made for the whole global batch)."""
    key = [int(seed), 3, int(step)]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))


class MixedBatchSampler:
    """Distributed-aware real/synthetic mixing batch sampler (this loop's DistributedSampler).

    Each epoch has ``steps_per_epoch`` global batches of ``batch_size`` images: the first
    ``round(batch_size · real_fraction)`` positions are real images, the rest synthetic
    (:func:`mix_counts`), in the order :func:`epoch_indices` derives from (seed, epoch). Rank r
    of N gets rows ``r::N`` of every global batch, so the ranks' shares are disjoint, together
    make the global batch, and do not depend on N beyond the split. Indices address the
    concatenation ``real + synthetic`` (synthetic image j is ``n_real + j``), so the sampler
    can also drive a ``DataLoader(ConcatDataset([real, synthetic]), batch_sampler=...)``.

    Args:
        n_real, n_synthetic: dataset sizes (n_synthetic = 0: real data only).
        batch_size: global batch (divisible by world_size).
        real_fraction: share of real images per batch when n_synthetic > 0.
        steps_per_epoch: batches per epoch, default ``ceil(n_real / batch_size)``.
        seed: data-order seed. rank, world_size: default from :mod:`cdp_fast.utils.distributed`.
    Iterating yields, per step, this rank's list of ``batch_size // world_size`` indices.
    """

    def __init__(self, n_real: int, n_synthetic: int, batch_size: int, real_fraction: float = 0.3,
                 steps_per_epoch: Optional[int] = None, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        check_number("n_real", n_real, 1, integer=True)
        check_number("n_synthetic", n_synthetic, 0, integer=True)
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("real_fraction", real_fraction, 0.0, 1.0)
        if steps_per_epoch is not None:
            check_number("steps_per_epoch", steps_per_epoch, 1, integer=True)
        if rank is None or world_size is None:
            from cdp_fast.utils.distributed import world_info

            r, w = world_info()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        check_number("world_size", world_size, 1, integer=True)
        check_number("rank", rank, 0, world_size - 1, integer=True)
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the world size "
                             f"{world_size}")
        if n_synthetic == 0 and real_fraction == 0.0:
            raise ValueError("real_fraction=0 needs synthetic data (n_synthetic > 0)")
        self.n_real, self.n_synthetic = int(n_real), int(n_synthetic)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_batch = mix_counts(self.batch_size, float(real_fraction), self.n_synthetic > 0)
        self.steps = (int(steps_per_epoch) if steps_per_epoch is not None
                      else math.ceil(self.n_real / self.batch_size))
        self.rows = np.arange(self.batch_size)[self.rank::self.world_size]  # global positions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call before each epoch)."""
        check_number("epoch", epoch, 0, integer=True)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def global_batches(self) -> np.ndarray:
        """(steps, batch_size) int64 indices into real + synthetic: every rank's batches."""
        r, sidx = epoch_indices(self.seed, self.epoch, self.steps, self.n_real,
                                self.n_synthetic, self.per_batch)
        return np.concatenate([r, sidx + self.n_real], axis=1)

    def __iter__(self):
        for row in self.global_batches():
            yield row[self.rows].tolist()


# --------------------------------------------------------------------------- augmentation
def augment_defaults(image_shape, pad: Optional[int] = None,
                     flip: Optional[bool] = None) -> tuple[int, bool]:
    """(pad, flip) for images of shape (C, H, W), each None replaced by the rule that fits the
    input (a given value is returned unchanged):

    - pad: ``min(H, W) / 8`` rounded half up, at least 1 — CIFAR's customary 4 at 32×32
      (Gowal et al. 2021 / ``core/data/cifar10s.py``: ``RandomCrop(32, padding=4)``), 1 at
      8×8, 4 at 28×28. A fixed 4 on 8×8 digits crops away up to half of every digit: TRADES
      on the digits then reaches about a third of its clean accuracy (tests/test_train.py);
    - flip: True only for 3-channel images (natural images such as CIFAR-10, whose classes
      are mirror-symmetric), never for 1-channel ones (digits, MNIST: a mirrored 2, 3, 7 is
      no longer that digit). Pass flip=False for 3-channel signs or text (e.g. GTSRB), whose
      meaning changes under a mirror.
    """
    c, h, w = (int(v) for v in tuple(image_shape)[-3:])
    if pad is None:
        pad = max(1, math.floor(min(h, w) / 8 + 0.5))
    if flip is None:
        flip = c == 3
    return pad, flip


def augment_batch(x: torch.Tensor, *, pad: int, flip: bool,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` (torchvision ``RandomCrop(size, padding)``
    semantics: offsets uniform in [0, 2·pad]) and, if ``flip``, a horizontal flip with
    probability ½, independently per image. x: (B, C, H, W) -> same shape."""
    return apply_augment(x, *augment_draws(len(x), pad, flip, generator, x.device), pad=pad)


def augment_draws(b: int, pad: int, flip: bool, generator, dev) -> tuple:
    """Random draws of :func:`augment_batch` for b images: crop offsets (B,), (B,) and flip
    mask (B,) (None where unused), in that order from ``generator``."""
    oy = ox = m = None
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    if flip:
        m = torch.rand((b,), generator=generator, device=dev) < 0.5
    return oy, ox, m


def apply_augment(x, oy, ox, m, *, pad: int) -> torch.Tensor:
    """Apply draws of :func:`augment_draws` (each (B,) or None) to x (B, C, H, W): the window
    at (oy, ox) of the image zero-padded by ``pad``, mirrored where ``m``. Same shape out."""
    b, c, h, w = x.shape
    dev = x.device
    if oy is not None:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (oy[:, None] + torch.arange(h, device=dev)[None])          # (B, H)
        cols = (ox[:, None] + torch.arange(w, device=dev)[None])          # (B, W)
        bi = torch.arange(b, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2).contiguous()
    if m is not None:
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x
