"""Adversarial training on real + generated data: TRADES (default) and Madry PGD-AT.

The recipe is the paper's (App. D, "Adversarial Training": "we follow the same setting as
Gowal et al. (2021)") as DM-Improves-AT implements it (facts of its public code,
``train-wa.py`` / ``gowal21uncovering/utils/watrain.py``):

- every batch mixes real and synthetic images at a fixed ratio: ``real_fraction`` = 0.3 of the
  batch is real (DM-Improves-AT's ``--unsup-fraction 0.7``); an "epoch" is
  ``ceil(len(real) / batch_size)`` updates whatever the synthetic set size (their
  ``update_steps`` per epoch is derived from the real set size the same way);
- TRADES (Zhang et al. 2019, eq. (5) and the public ``trades.py``), β = 6 by default:

      L = CE(f(x), y) + β · (1/B) Σ_i KL(p(x_i) ‖ p(x'_i)),   p = softmax ∘ f,

  where x' comes from :func:`cdp_fast.attacks.trades_attack` (10 L∞ PGD steps on the same KL,
  model in eval mode during the attack, as in Zhang et al.'s code; DM-Improves-AT instead keeps
  BatchNorm in train mode with frozen statistics there). In code that is
  ``F.kl_div(log_softmax(f(x')), softmax(f(x)), reduction="batchmean")``: the natural
  distribution is the *target* of ``kl_div``, so gradients flow through both f(x) and f(x');
- PGD-AT (Madry et al. 2018): L = CE(f(x'), y) with x' from
  :func:`cdp_fast.attacks.pgd_attack` (random start, model in eval mode for the attack);
- optional label smoothing on the clean CE term (DM-Improves-AT's ``--ls``);
- SGD with Nesterov momentum 0.9, weight decay 5e-4 on every parameter except those of the
  normalisation layers (DM-Improves-AT's ``group_weight``), cosine learning-rate schedule per
  update (optionally after a linear warm-up);
- EMA of the weights ("stochastic weight averaging with decay 0.995", App. D) with the
  warm-up of Gowal et al.: decay_k = min(ema, (1 + k) / (10 + k)) after the k-th update
  (k = 1, 2, ...). The float buffers (BatchNorm running statistics) are averaged the same way
  (DM-Improves-AT instead copies the live model's statistics into the average at each epoch
  end; averaging keeps statistics consistent with the averaged weights);
- augmentation on tensors: random crop after zero padding (``pad``, 4 for CIFAR; use 1 or 2
  for 8x8 digits) and an optional horizontal flip (off for digits);
- on CUDA: bf16 autocast and ``torch.compile`` (``amp="auto"``, ``compile="auto"``); on CPU
  fp32 eager unless asked.

Determinism and resume. Every random choice is a function of (``seed``, epoch) — the data
order — or (``seed``, update index) — crops, flips, attack starts — through dedicated
generators, never the global RNG. A ``checkpoint=`` path receives, after every epoch and
atomically (temp + fsync + rename), the model, EMA, optimizer state, epoch, update count,
history, RNG state and the run's configuration; calling again with the same arguments resumes
from it (``torch.load(weights_only=True)``) and on CPU ends at bitwise the same weights as an
uninterrupted run. A checkpoint written with different arguments is refused (ValueError).
The learning rate is a pure function of the update index, so the "scheduler state" is that
index.

Distributed data parallel (``torchrun --nproc_per_node=N``, or any initialised default
process group with world size N > 1; :func:`cdp_fast.distributed.maybe_init` joins it, nccl
on CUDA, gloo on CPU): the model is wrapped in ``torch.nn.parallel.DistributedDataParallel``
(gradients all-reduced and averaged by DDP's bucketed reducer during ``backward``).
:class:`MixedBatchSampler` gives every rank its disjoint share (rows ``rank::N``) of the same
global mixed real/synthetic batch order, a function of (seed, epoch) (``set_epoch`` as
torch's ``DistributedSampler``); ``batch_size`` is the global batch and must be divisible by N,
so the shares are equal and DDP's average is the gradient of the global batch-mean loss. The
random draws of an update (crops, flips, attack starts) are made for the whole global batch
from (seed, update) on every rank and each rank keeps its rows: image j of global batch k gets
the same randomness whatever N, so a run can be resumed with any number of processes. The
inner attacks run on the unwrapped module (``ddp.module``), so their input gradients never
touch DDP's gradient hooks. BatchNorm: each rank normalises with its local batch statistics
unless ``sync_bn=True`` (``torch.nn.SyncBatchNorm``, CUDA/nccl only in torch); rank 0's
running statistics are broadcast after every update (DDP's ``broadcast_buffers``, moved after
the step) so parameters, buffers and hence the EMA are identical on every rank. Only rank 0
writes the checkpoint (its path must be visible to every rank to resume) and shows a progress
bar. Per-rank training throughput is gathered into ``model.throughput``.

Inputs (``train_data`` and ``synthetic``): a tuple ``(x, y)`` of tensors / arrays (x float
NCHW in [0, 1], or uint8 NHWC; y int64), a ``torch.utils.data.Dataset`` of (x, y) pairs (x
float CHW in [0, 1]), a :class:`cdp_fast.Samples` (uint8 NHWC images, or float images in
[-1, 1] model space), or a path (npz with image/label or arr_0/arr_1 keys, or an out
directory of :func:`cdp_fast.sample`).
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train_trades", "train_pgd_at", "trades_loss", "pgd_at_loss", "as_source",
           "augment_batch", "ema_decay", "cosine_lr", "mix_counts", "epoch_indices",
           "MixedBatchSampler"]

_CKPT_VERSION = 1


# --------------------------------------------------------------------------- losses
def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES objective (Zhang et al. 2019, eq. (5); public ``trades.py``):
    ``CE(f(x), y) + β · KL(p(x) ‖ p(x'))`` averaged over the batch (KL "batchmean").

    Shapes: logits (B, K), y (B,) int64 -> scalar. Computed in fp32.
    """
    logits_nat = logits_nat.float()
    logits_adv = logits_adv.float()
    natural = F.cross_entropy(logits_nat, y, label_smoothing=label_smoothing)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                      reduction="batchmean")
    return natural + beta * robust


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor, *,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """Madry et al. (2018) adversarial training objective: CE(f(x'), y), batch mean."""
    return F.cross_entropy(logits_adv.float(), y, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------- schedules
def ema_decay(ema: float, k: int) -> float:
    """EMA decay after the k-th update (k >= 1): min(ema, (1 + k) / (10 + k)) (Gowal et al.
    2020's warm-up, DM-Improves-AT ``ema_update(dynamic_decay=True)``)."""
    return min(float(ema), (1.0 + k) / (10.0 + k))


def cosine_lr(lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up over ``warmup`` updates, then
    ``lr · ½(1 + cos(π · (step − warmup) / (total − warmup)))``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


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


def _step_seed(seed: int, step: int) -> int:
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
        seed: data-order seed. rank, world_size: default from :mod:`cdp_fast.distributed`.
    Iterating yields, per step, this rank's list of ``batch_size // world_size`` indices.
    """

    def __init__(self, n_real: int, n_synthetic: int, batch_size: int, real_fraction: float = 0.3,
                 steps_per_epoch: Optional[int] = None, *, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        _check_number("n_real", n_real, 1, integer=True)
        _check_number("n_synthetic", n_synthetic, 0, integer=True)
        _check_number("batch_size", batch_size, 1, integer=True)
        _check_number("real_fraction", real_fraction, 0.0, 1.0)
        if steps_per_epoch is not None:
            _check_number("steps_per_epoch", steps_per_epoch, 1, integer=True)
        if rank is None or world_size is None:
            from cdp_fast.distributed import world_info

            r, w = world_info()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        _check_number("world_size", world_size, 1, integer=True)
        _check_number("rank", rank, 0, world_size - 1, integer=True)
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
        _check_number("epoch", epoch, 0, integer=True)
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


@torch.no_grad()
def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (DDP's broadcast_buffers semantics)."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


# --------------------------------------------------------------------------- data
class _Source:
    """Uniform random access to (x float32 NCHW in [0, 1], y int64) batches."""

    def __init__(self, get: Callable[[np.ndarray], tuple], n: int, image_shape: tuple, what: str):
        self._get, self.n, self.image_shape, self.what = get, n, image_shape, what

    def __len__(self):
        return self.n

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get(idx)


def _images_to_float(arr, name: str) -> torch.Tensor:
    """uint8 NHWC -> float NCHW / 255; float NCHW in [0, 1] passes through."""
    t = torch.as_tensor(np.asarray(arr)) if not isinstance(arr, torch.Tensor) else arr
    if t.dtype == torch.uint8:
        if t.dim() == 3:  # (N, H, W) grey
            t = t.unsqueeze(-1)
        return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise ValueError(f"{name} images must be uint8 NHWC or float NCHW in [0, 1], got {t.dtype}")
    return t.float()


def as_source(data, name: str = "train_data") -> _Source:
    """Wrap any accepted input form (see the module docstring) as a batch source."""
    if isinstance(data, (str, os.PathLike)):
        from cdp_fast.data import Samples

        data = Samples.load(data)
    if hasattr(data, "images") and hasattr(data, "labels"):  # cdp_fast.Samples (duck-typed)
        images, labels = data.images, data.labels
        if labels is None:
            raise ValueError(f"{name} has no labels: pseudo-label it first "
                             "(cdp_fast.label.pseudo_label)")
        labels = np.asarray(labels).astype(np.int64)
        n = len(images)
        if len(labels) != n:
            raise ValueError(f"{name}: {len(labels)} labels for {n} images")
        dtype = np.dtype(getattr(images, "dtype", np.uint8))
        if n == 0:
            raise ValueError(f"{name} is empty")
        probe = np.asarray(images[np.array([0])])
        if dtype == np.uint8:
            shape = tuple(_images_to_float(probe, name).shape[1:])

            def get(idx):
                order = np.argsort(idx, kind="stable")  # sorted reads are shard-friendly
                arr = np.asarray(images[idx[order]])
                x = torch.empty((len(idx),) + shape)
                x[torch.from_numpy(order)] = _images_to_float(arr, name)
                return x, torch.from_numpy(labels[idx])
        else:  # float model-space images in [-1, 1] (Samples output="float")
            shape = tuple(probe.shape[1:])

            def get(idx):
                x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32))
                return ((x + 1) * 0.5).clamp_(0, 1), torch.from_numpy(labels[idx])
        return _Source(get, n, shape, name)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be an (x, y) pair, got {len(data)} items")
        x, y = data
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} labels must be integers, got {y.dtype}")
        y = y.long().cpu()
        if x.dim() < 3 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: x {tuple(x.shape)} and y {tuple(y.shape)} must be a "
                             "non-empty image batch and matching labels")
        if x.dtype == torch.uint8:
            shape = tuple(_images_to_float(x[:1], name).shape[1:])

            def get(idx):
                i = torch.from_numpy(idx)
                return _images_to_float(x[i.to(x.device)].cpu(), name), y[i]
        else:
            if not x.is_floating_point() or x.dim() != 4:
                raise ValueError(f"{name} x must be float NCHW in [0, 1] or uint8 NHWC, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name} x must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
            shape = tuple(x.shape[1:])

            def get(idx):
                i = torch.from_numpy(idx)
                return x[i.to(x.device)].float(), y[i]
        return _Source(get, len(x), shape, name)
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise ValueError(f"{name} must be a map-style Dataset with len()") from None
        if n == 0:
            raise ValueError(f"{name} is empty")
        x0, _ = data[0]
        shape = tuple(torch.as_tensor(x0).shape)

        def get(idx):
            xs, ys = zip(*(data[int(i)] for i in idx))
            x = torch.stack([torch.as_tensor(v) for v in xs]).float()
            return x, torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
        return _Source(get, n, shape, name)
    raise ValueError(f"{name} must be an (x, y) pair, a Dataset, a Samples or a path; got "
                     f"{type(data).__name__}")


# --------------------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, *, pad: int, flip: bool,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` (torchvision ``RandomCrop(size, padding)``
    semantics: offsets uniform in [0, 2·pad]) and, if ``flip``, a horizontal flip with
    probability ½, independently per image. x: (B, C, H, W) -> same shape."""
    return _apply_augment(x, *_augment_draws(len(x), pad, flip, generator, x.device), pad=pad)


def _augment_draws(b: int, pad: int, flip: bool, generator, dev):
    """Random draws of :func:`augment_batch` for b images: crop offsets (B,), (B,) and flip
    mask (B,) (None where unused), in that order from ``generator``."""
    oy = ox = m = None
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    if flip:
        m = torch.rand((b,), generator=generator, device=dev) < 0.5
    return oy, ox, m


def _apply_augment(x, oy, ox, m, *, pad: int) -> torch.Tensor:
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


def _trades_attack_from(model, x, noise, *, eps, step_size, steps):
    """:func:`cdp_fast.attacks.trades_attack` (Zhang et al. 2019, eq. (5)) with its Gaussian
    start ``noise`` (B, C, H, W) given instead of drawn, so the draws can be made for the whole
    global batch and sliced per rank: :func:`cdp_fast.attacks.trades_from_noise`."""
    from cdp_fast.attacks import trades_from_noise

    return trades_from_noise(model, x, noise, eps=eps, step_size=step_size, steps=steps)


def _pgd_attack_from(model, x, y, u, *, eps, step_size, steps):
    """:func:`cdp_fast.attacks.pgd_attack` (Madry et al. 2018, random start) with the uniform
    draws ``u`` (B, C, H, W) of its start given: x⁰ = clip(x + (2u − 1)·ε, 0, 1). Model in
    eval mode; bitwise the same as ``pgd_attack`` for the same draws (tested)."""
    from cdp_fast.attacks import eval_mode, pgd_from_start

    with torch.no_grad(), eval_mode(model):
        x = x.detach()
        x_adv = torch.clamp(x + (2.0 * u - 1.0) * eps, 0.0, 1.0)
        return pgd_from_start(model, x, y, x_adv, eps=eps, step_size=step_size, steps=steps)


# --------------------------------------------------------------------------- checkpoints
def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file, fsync, rename, fsync the directory (cdp_fast.data.atomic_write)."""
    from cdp_fast.data import atomic_write

    atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------- the loop
def _check_number(name, v, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    ok_type = (isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.number)))
    if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")


def _no_decay_params(model: nn.Module) -> set:
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                  nn.modules.instancenorm._InstanceNorm)
    ids = set()
    for m in model.modules():
        if isinstance(m, norm_types):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


@torch.no_grad()
def _ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    ep = [p for p in ema_model.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for be, bm in zip(ema_model.buffers(), model.buffers()):
        if be.is_floating_point():
            be.lerp_(bm, 1.0 - decay)
        else:
            be.copy_(bm)


def _rank_device(device, model: nn.Module, cdist) -> torch.device:
    """``device``, else the model's device; under torchrun (WORLD_SIZE > 1) with CUDA, an
    unindexed or absent CUDA device means ``cuda:LOCAL_RANK`` (one GPU per process)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if cdist.world_info()[1] > 1 and torch.cuda.is_available() and (
            device is None or (dev.type == "cuda" and dev.index is None)):
        dev = cdist.local_device()
    return dev


def _fit(kind: str, model: nn.Module, train_data, *, synthetic, real_fraction, epochs, eps,
         step_size, steps, beta, batch_size, ema, progress, lr, momentum, weight_decay,
         nesterov, label_smoothing, augment, pad, flip, steps_per_epoch, warmup_epochs,
         checkpoint, resume, seed, device, amp, compile, callback, sync_bn=False):
    # ---- validation (ValueError naming the argument)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_number("real_fraction", real_fraction, 0.0, 1.0)
    _check_number("epochs", epochs, 1, integer=True)
    _check_number("eps", eps, 0.0)
    _check_number("step_size", step_size, 0.0)
    _check_number("steps", steps, 0, integer=True)
    _check_number("beta", beta, 0.0)
    _check_number("batch_size", batch_size, 1, integer=True)
    if ema is not None:
        _check_number("ema", ema, 0.0, 1.0, hi_open=True)
    _check_number("lr", lr, 0.0, lo_open=True)
    _check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
    _check_number("weight_decay", weight_decay, 0.0)
    _check_number("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
    _check_number("pad", pad, 0, integer=True)
    _check_number("warmup_epochs", warmup_epochs, 0, integer=True)
    _check_number("seed", seed, 0, integer=True)
    if steps_per_epoch is not None:
        _check_number("steps_per_epoch", steps_per_epoch, 1, integer=True)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    if amp not in ("auto", True, False):
        raise ValueError(f"amp must be 'auto', True or False, got {amp!r}")
    if compile not in ("auto", True, False):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable or None")
    if not isinstance(sync_bn, bool):
        raise ValueError(f"sync_bn must be True or False, got {sync_bn!r}")
    epochs, steps, batch_size, pad, seed = int(epochs), int(steps), int(batch_size), int(pad), int(seed)

    real = as_source(train_data, "train_data")
    syn = as_source(synthetic, "synthetic") if synthetic is not None else None
    if real_fraction == 0.0 and syn is None:
        raise ValueError("real_fraction=0 trains on synthetic data only, but synthetic is None")
    if syn is not None and syn.image_shape != real.image_shape:
        raise ValueError(f"synthetic images {syn.image_shape} differ from train_data images "
                         f"{real.image_shape}")
    n_real_b, n_syn_b = mix_counts(batch_size, float(real_fraction), syn is not None)
    spe = int(steps_per_epoch) if steps_per_epoch is not None else math.ceil(len(real) / batch_size)
    total = epochs * spe
    warmup = int(warmup_epochs) * spe

    from cdp_fast import distributed as cdist

    dev = _rank_device(device, model, cdist)
    model.to(dev)

    rank, world = cdist.maybe_init(dev)
    if world > 1 and batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
    if sync_bn and world > 1 and dev.type != "cuda":
        raise ValueError("sync_bn=True needs CUDA devices (nccl): torch.nn.SyncBatchNorm has no "
                         f"CPU/gloo implementation (device is {dev})")
    sampler = MixedBatchSampler(len(real), 0 if syn is None else len(syn), batch_size,
                                float(real_fraction), spe, seed=seed, rank=rank,
                                world_size=world)
    use_amp = (dev.type == "cuda") if amp == "auto" else bool(amp)
    use_compile = (dev.type == "cuda") if compile == "auto" else bool(compile)

    decay_ids = _no_decay_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(nesterov))
    ema_model = copy.deepcopy(model).eval() if ema is not None else None
    if ema_model is not None:
        for p in ema_model.parameters():
            p.requires_grad_(False)

    config = {
        "kind": kind, "real_fraction": float(real_fraction), "epochs": epochs, "eps": float(eps),
        "step_size": float(step_size), "steps": steps, "beta": float(beta),
        "batch_size": batch_size, "ema": None if ema is None else float(ema), "lr": float(lr),
        "momentum": float(momentum), "weight_decay": float(weight_decay),
        "nesterov": bool(nesterov), "label_smoothing": float(label_smoothing),
        "augment": bool(augment), "pad": pad, "flip": bool(flip), "steps_per_epoch": spe,
        "warmup_epochs": int(warmup_epochs), "seed": seed, "n_real": len(real),
        "n_synthetic": 0 if syn is None else len(syn),
    }
    if sync_bn:   # (key absent otherwise: checkpoints of earlier versions still resume)
        config["sync_bn"] = True
    start_epoch, step, history = 0, 0, []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("version") != _CKPT_VERSION:
            raise ValueError(f"checkpoint {ckpt_path} has an unknown format version")
        old = state["config"]
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {ckpt_path} was written with different arguments "
                             f"({details}); pass a new checkpoint path or resume=False")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"].cpu())

    restore_bn = []
    if sync_bn and world > 1:
        # SyncBatchNorm shares the BatchNorm modules' parameters and buffers; the original
        # modules are put back after training.
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    restore_bn.append((parent, name, child))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model   # what the training forward calls (DDP wrapper under torch.distributed)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync at forward: rank 0's buffers are broadcast after each update instead
        # (below), before the EMA update, so the EMA is identical on every rank.
        import inspect

        no_fwd_sync = ({"forward_sync_buffers": False}   # torch >= 2.13's name (init sync kept)
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_fwd_sync)
    fwd, attack_fwd = net, model
    if use_compile:
        fwd = torch.compile(net)
        attack_fwd = fwd if net is model else torch.compile(model)
    amp_ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_amp else \
        (lambda: torch.autocast(dev.type, enabled=False))
    has_buffers = any(True for _ in model.buffers())
    rows = torch.as_tensor(sampler.rows, device=dev)   # this rank's positions in a global batch

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        tqdm = None

    run_images, run_seconds = 0, 0.0
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        batches = sampler.global_batches()[:, sampler.rows]   # (spe, batch_size / world)
        n_real = len(real)
        sums = torch.zeros(3, device=dev, dtype=torch.float64)  # loss, clean correct, adv correct
        seen = 0
        bar = (tqdm(total=spe, desc=f"{kind} epoch {epoch + 1}/{epochs}", leave=False,
                    disable=not progress or rank != 0) if tqdm is not None else None)
        model.train()
        for i in range(spe):
            # This rank's rows of global batch i: real images first, then synthetic ones.
            idx = batches[i]
            xs, ys = [], []
            if (idx < n_real).any():
                xr, yr = real.get(idx[idx < n_real])
                xs.append(xr), ys.append(yr)
            if (idx >= n_real).any():
                xg, yg = syn.get(idx[idx >= n_real] - n_real)
                xs.append(xg), ys.append(yg)
            x = torch.cat(xs).to(dev, non_blocking=True)
            y = torch.cat(ys).to(dev, non_blocking=True)
            # Draws for the whole global batch, in a fixed order; this rank keeps its rows.
            gen = torch.Generator(device=dev).manual_seed(_step_seed(seed, step))
            if augment:
                draws = _augment_draws(batch_size, pad, flip, gen, dev)
                x = _apply_augment(x, *(d if d is None else d[rows] for d in draws), pad=pad)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, step, total, warmup)
            with amp_ctx():
                if kind == "trades":
                    noise = torch.randn((batch_size,) + tuple(x.shape[1:]), generator=gen,
                                        device=dev, dtype=x.dtype)[rows]
                    x_adv = _trades_attack_from(attack_fwd, x, noise, eps=eps,
                                                step_size=step_size, steps=steps)
                    logits_nat = fwd(x)
                    logits_adv = fwd(x_adv)
                    loss = trades_loss(logits_nat, logits_adv, y, beta=beta,
                                       label_smoothing=label_smoothing)
                else:
                    u = torch.rand((batch_size,) + tuple(x.shape[1:]), generator=gen,
                                   device=dev, dtype=x.dtype)[rows]
                    x_adv = _pgd_attack_from(attack_fwd, x, y, u, eps=eps, step_size=step_size,
                                             steps=steps)
                    logits_adv = fwd(x_adv)
                    logits_nat = None
                    loss = pgd_at_loss(logits_adv, y, label_smoothing=label_smoothing)
            if dev.type == "cpu" and not bool(torch.isfinite(loss.detach())):
                # (on GPU the per-epoch check below avoids a sync per update)
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, update {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()          # under DDP: gradients averaged over the ranks here
            opt.step()
            if world > 1 and has_buffers:
                _broadcast_buffers(model)
            step += 1
            if ema_model is not None:
                _ema_update(ema_model, model, ema_decay(ema, step))
            with torch.no_grad():
                sums[0] += loss.detach().double() * len(y)
                if logits_nat is not None:
                    sums[1] += (logits_nat.argmax(1) == y).sum()
                sums[2] += (logits_adv.argmax(1) == y).sum()
            seen += len(y)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        run_images += seen
        run_seconds += seconds
        if world > 1:
            import torch.distributed as dist

            sums = torch.cat([sums, sums.new_tensor([float(seen)])])
            dist.all_reduce(sums)
            seen = int(round(sums[3].item()))
        s = sums.tolist()
        entry = {"epoch": epoch + 1, "loss": s[0] / seen,
                 "train_clean_acc": s[1] / seen if kind == "trades" else float("nan"),
                 "train_adv_acc": s[2] / seen, "lr": cosine_lr(lr, step - 1, total, warmup),
                 "updates": step, "time_s": seconds, "images_per_s": seen / seconds}
        history.append(entry)
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
        if ckpt_path is not None and rank == 0:
            _atomic_torch_save({
                "version": _CKPT_VERSION, "config": config, "epoch": epoch + 1, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "ema": None if ema_model is None else ema_model.state_dict(),
                "history": history, "rng": {"torch": torch.get_rng_state()},
            }, ckpt_path)
        if ckpt_path is not None and world > 1:
            cdist.barrier()   # every rank sees the finished checkpoint before going on
        if callback is not None:
            callback({"epoch": epoch + 1, "epochs": epochs, "history": history,
                      "model": model, "ema_model": ema_model})

    # Throughput: images (training examples, attack passes not counted) per second of this
    # rank's training loop, gathered from every rank (small objects, never tensors of data).
    model.throughput = cdist.all_gather_object(
        {"rank": rank, "images": run_images, "seconds": run_seconds,
         "images_per_s": run_images / run_seconds if run_seconds > 0 else 0.0})
    for parent, name, child in restore_bn:
        setattr(parent, name, child)
    if ema_model is not None:
        model.load_state_dict(ema_model.state_dict())
    model.eval()
    model.history = history
    return model


_DOC_ARGS = """
    Args:
        model: classifier, (B, C, H, W) in [0, 1] -> logits (B, K); trained in place.
        train_data: real data (see the module docstring for accepted forms).
        synthetic: generated data (same forms; needs labels) or None (real data only).
        real_fraction: share of each batch drawn from ``train_data`` when ``synthetic`` is
            given (0.3 = DM-Improves-AT's unsup_fraction 0.7); ignored otherwise.
        epochs: number of epochs (>= 1); an epoch is ``steps_per_epoch`` updates, by default
            ``ceil(len(train_data) / batch_size)``.
        eps, step_size, steps: L∞ budget ε, PGD step α and PGD steps of the inner attack
            (the paper: 8/255, 2/255, 10 on CIFAR-10).
        beta: TRADES β (6.0; unused by PGD-AT).
        batch_size: images per update (real + synthetic).
        ema: EMA decay (0.995) or None for no averaging; returned weights are the EMA's.
        progress: tqdm bar per epoch.
        lr, momentum, weight_decay, nesterov: SGD (DM-Improves-AT: lr 0.2 at batch 512,
            Nesterov, 5e-4).
        label_smoothing: on the clean CE term (TRADES) or the adversarial CE (PGD-AT).
        augment, pad, flip: random crop with zero padding ``pad`` and horizontal flips.
        steps_per_epoch, warmup_epochs: schedule shape (cosine after linear warm-up).
        checkpoint: path written atomically after each epoch; resume=True continues from it.
        seed: all randomness (data order, crops, attack starts) derives from it.
        device: defaults to the model's device; under torchrun with CUDA, None or "cuda"
            means ``cuda:LOCAL_RANK``. amp / compile: "auto" = bf16 autocast and
            torch.compile on CUDA only.
        callback: called after each epoch (after checkpointing) with a dict
            {epoch, epochs, history, model, ema_model}.
        sync_bn: under torch.distributed, train with ``torch.nn.SyncBatchNorm`` (batch
            statistics over the global batch; CUDA/nccl only, ValueError on CPU); the model's
            own BatchNorm modules are put back afterwards. No effect in a single process.
    Returns:
        ``model`` with the EMA weights loaded (the last weights when ema=None), in eval mode,
        with ``model.history``: one dict per epoch (loss, train accuracies, lr, time_s,
        images_per_s summed over ranks) and ``model.throughput``: one dict per rank
        {rank, images, seconds, images_per_s} for the epochs this call ran (images = training
        examples; the attack's extra passes are not counted).
    Raises:
        ValueError naming the argument for bad inputs or a checkpoint from other arguments.
"""


def train_trades(model: nn.Module, train_data, *, synthetic=None, real_fraction: float = 0.3,
                 epochs: int, eps: float, step_size: float, steps: int = 10,
                 beta: float = 6.0, batch_size: int, ema: Optional[float] = 0.995,
                 progress: bool = True, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True,
                 label_smoothing: float = 0.0, augment: bool = True, pad: int = 4,
                 flip: bool = True, steps_per_epoch: Optional[int] = None,
                 warmup_epochs: int = 0, checkpoint=None, resume: bool = True, seed: int = 0,
                 device=None, amp="auto", compile="auto",
                 callback: Optional[Callable[[dict], None]] = None,
                 sync_bn: bool = False) -> nn.Module:
    """TRADES adversarial training (Zhang et al. 2019) on real + synthetic data, the paper's
    recipe (App. D: Gowal et al. 2021's setting, β = 6, 10-step PGD, EMA 0.995).

    Example:
        >>> model = cdp_fast.models.get_model("wrn-28-10-swish")
        >>> cdp_fast.train_trades(model, (x, y), synthetic="gen/", epochs=400, eps=8/255,
        ...                       step_size=2/255, batch_size=512)
    """
    return _fit("trades", model, train_data, synthetic=synthetic, real_fraction=real_fraction,
                epochs=epochs, eps=eps, step_size=step_size, steps=steps, beta=beta,
                batch_size=batch_size, ema=ema, progress=progress, lr=lr, momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, label_smoothing=label_smoothing,
                augment=augment, pad=pad, flip=flip, steps_per_epoch=steps_per_epoch,
                warmup_epochs=warmup_epochs, checkpoint=checkpoint, resume=resume, seed=seed,
                device=device, amp=amp, compile=compile, callback=callback, sync_bn=sync_bn)


def train_pgd_at(model: nn.Module, train_data, *, synthetic=None, real_fraction: float = 0.3,
                 epochs: int, eps: float, step_size: float, steps: int = 10,
                 beta: float = 6.0, batch_size: int, ema: Optional[float] = 0.995,
                 progress: bool = True, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True,
                 label_smoothing: float = 0.0, augment: bool = True, pad: int = 4,
                 flip: bool = True, steps_per_epoch: Optional[int] = None,
                 warmup_epochs: int = 0, checkpoint=None, resume: bool = True, seed: int = 0,
                 device=None, amp="auto", compile="auto",
                 callback: Optional[Callable[[dict], None]] = None,
                 sync_bn: bool = False) -> nn.Module:
    """Madry et al. (2018) PGD adversarial training with the same options as
    :func:`train_trades` (``beta`` is accepted for symmetry and ignored); the revised paper's
    App. F.1 variant."""
    return _fit("pgd_at", model, train_data, synthetic=synthetic, real_fraction=real_fraction,
                epochs=epochs, eps=eps, step_size=step_size, steps=steps, beta=beta,
                batch_size=batch_size, ema=ema, progress=progress, lr=lr, momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, label_smoothing=label_smoothing,
                augment=augment, pad=pad, flip=flip, steps_per_epoch=steps_per_epoch,
                warmup_epochs=warmup_epochs, checkpoint=checkpoint, resume=resume, seed=seed,
                device=device, amp=amp, compile=compile, callback=callback, sync_bn=sync_bn)


train_trades.__doc__ += _DOC_ARGS
train_pgd_at.__doc__ += _DOC_ARGS
