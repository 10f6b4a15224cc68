"""The training loop's running parts behind :func:`cdp_fast.train_trades` /
:func:`cdp_fast.train_pgd_at`: DDP wrapping (:func:`wrap_model`), one epoch (:func:`run_epoch`:
batches, draws, attack, loss, SGD step, EMA) and its history entry (:func:`epoch_entry`).
:mod:`cdp_fast.robust.train` sets a run up and puts the parts together.

Distributed data parallel (``torchrun --nproc_per_node=N``, or any initialised default process
group with world size N > 1; :func:`cdp_fast.utils.distributed.maybe_init` joins it, nccl on CUDA,
gloo on CPU): the model is wrapped in ``torch.nn.parallel.DistributedDataParallel`` (gradients
all-reduced and averaged by DDP's bucketed reducer during ``backward``).
:class:`cdp_fast.robust.batches.MixedBatchSampler` gives every rank its disjoint share (rows
``rank::N``) of the same global mixed real/synthetic batch order, a function of (seed, epoch)
(``set_epoch`` as torch's ``DistributedSampler``); ``batch_size`` is the global batch and must
be divisible by N, so the shares are equal and DDP's average is the gradient of the global
batch-mean loss. The random draws of an update (crops, flips, attack starts) are made for the
whole global batch from (seed, update) on every rank and each rank keeps its rows: image j of
global batch k gets the same randomness whatever N, so a run can be resumed with any number of
processes. The inner attacks run on the unwrapped module (``ddp.module``), so their input
gradients never touch DDP's gradient hooks. BatchNorm: each rank normalises with its local
batch statistics unless ``sync_bn=True`` (``torch.nn.SyncBatchNorm``, CUDA/nccl only in
torch) — in the training forwards and, with recipe="gowal", in the TRADES attack too, so a
BatchNorm model's attack (like its training forward) depends on how the global batch is split
over the ranks; models without BatchNorm train the same whatever N. Rank 0's running
statistics are broadcast after every update (DDP's ``broadcast_buffers``, moved after the
step) and the EMA starts from rank 0's model, so parameters, buffers and hence the EMA are
identical on every rank. Only rank 0 writes the checkpoint (its path must be visible to every
rank to resume) and shows a progress bar. Per-rank training throughput is gathered into
``model.throughput``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from cdp_fast.robust.attacks import pgd_from_draws, trades_from_draws, trades_from_noise
from cdp_fast.robust.batches import MixedBatchSampler, apply_augment, augment_draws, step_seed
from cdp_fast.robust.recipes import Recipe, RunConfig, cosine_lr, ema_decay, pgd_at_loss, trades_loss

__all__ = ["check_labels", "wrap_model", "broadcast_state", "Loop", "run_epoch", "epoch_entry"]


# --------------------------------------------------------------------------- DDP
def wrap_model(model: nn.Module, dev: torch.device, world: int, run: RunConfig):
    """(model, fwd, attack_fwd, restore_bn): the module trained (SyncBatchNorm-converted when
    asked), what the training forward calls (DDP wrapper under torch.distributed, compiled
    when asked), what the inner attack calls (never DDP: its input gradients must not reach
    DDP's gradient hooks), and the (parent, name, BatchNorm) to put back afterwards."""
    restore_bn = []
    if run.sync_bn and world > 1:
        # SyncBatchNorm shares the BatchNorm modules' parameters and buffers; the original
        # modules are put back after training.
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    restore_bn.append((parent, name, child))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer sync at forward: rank 0's buffers are broadcast after each update instead,
        # before the EMA update, so the EMA is identical on every rank.
        no_fwd_sync = ({"forward_sync_buffers": False}   # torch >= 2.13's name (init sync kept)
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_fwd_sync)
    fwd, attack_fwd = net, model
    if (dev.type == "cuda") if run.compile == "auto" else bool(run.compile):
        fwd = torch.compile(net)
        attack_fwd = fwd if net is model else torch.compile(model)
    return model, fwd, attack_fwd, restore_bn


@torch.no_grad()
def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere (DDP's broadcast_buffers semantics)."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


@torch.no_grad()
def broadcast_state(model: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere, in place."""
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t, 0)


# --------------------------------------------------------------------------- one epoch
@dataclass(frozen=True)
class Loop:
    """What every update of a run reads (set up once per run by :mod:`cdp_fast.robust.train`)."""
    run: RunConfig
    real: Any
    syn: Any
    sampler: MixedBatchSampler
    model: nn.Module          # the module trained (its state is checkpointed)
    fwd: Callable             # training forward (DDP / compiled)
    attack_fwd: Callable      # inner attack's forward
    opt: torch.optim.Optimizer
    ema_model: Optional[nn.Module]
    dev: torch.device
    rank: int
    world: int
    use_amp: bool
    has_buffers: bool
    rows: torch.Tensor        # this rank's positions in a global batch
    total: int                # updates of the whole run (cosine schedule)
    warmup: int               # warm-up updates
    recipe: Recipe            # what run.recipe names
    num_classes: Optional[int] = None   # the model's outputs K: labels must lie in [0, K)


def run_epoch(loop: Loop, epoch: int, step: int):
    """Train one epoch from update ``step``; (next update, sums (3,) float64 of loss · B,
    clean correct, adversarial correct on this rank, images seen on this rank)."""
    run, sampler = loop.run, loop.sampler
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        tqdm = None
    sampler.set_epoch(epoch)
    batches = sampler.global_batches()[:, sampler.rows]   # (spe, batch_size / world)
    n_real = len(loop.real)
    sums = torch.zeros(3, device=loop.dev, dtype=torch.float64)
    seen = 0
    bar = (tqdm(total=len(batches), desc=f"{run.kind} epoch {epoch + 1}/{run.epochs}",
                leave=False, disable=not run.progress or loop.rank != 0)
           if tqdm is not None else None)
    loop.model.train()
    for idx in batches:
        # This rank's rows of the global batch: real images first, then synthetic ones.
        xs, ys = [], []
        if (idx < n_real).any():
            xr, yr = loop.real.get(idx[idx < n_real])
            check_labels(yr, "train_data", loop.num_classes)
            xs.append(xr), ys.append(yr)
        if (idx >= n_real).any():
            xg, yg = loop.syn.get(idx[idx >= n_real] - n_real)
            check_labels(yg, "synthetic", loop.num_classes)
            xs.append(xg), ys.append(yg)
        x = torch.cat(xs).to(loop.dev, non_blocking=True)
        y = torch.cat(ys).to(loop.dev, non_blocking=True)
        loss, logits_nat, logits_adv = _update(loop, x, y, epoch, step)
        step += 1
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
    if loop.ema_model is not None and loop.recipe.ema_buffers == "copy":
        # (every rank's buffers are rank 0's after each update, so the copies agree)
        _copy_buffers(loop.ema_model, loop.model)
    if loop.dev.type == "cuda":
        torch.cuda.synchronize(loop.dev)
    return step, sums, seen


def check_labels(y: torch.Tensor, name: str, num_classes: Optional[int]) -> None:
    """ValueError naming ``name`` unless every label of ``y`` lies in [0, num_classes) (no
    check for None). Run on the CPU labels of every batch before they reach the device
    (microseconds; Datasets whose labels are not known up front are caught here)."""
    if num_classes is None or not len(y):
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}) for a model with "
                         f"{num_classes} outputs, found labels in [{lo}, {hi}]")


def _update(loop: Loop, x, y, epoch: int, step: int):
    """Update ``step`` on this rank's rows (x, y): draws, attack, loss, SGD step, buffer
    broadcast, EMA. Returns (loss, clean logits or None, adversarial logits)."""
    run, dev, rows = loop.run, loop.dev, loop.rows
    # Draws for the whole global batch, in a fixed order; this rank keeps its rows.
    gen = torch.Generator(device=dev).manual_seed(step_seed(run.seed, step))
    if run.augment:
        draws = augment_draws(run.batch_size, run.pad, run.flip, gen, dev)
        x = apply_augment(x, *(d if d is None else d[rows] for d in draws), pad=run.pad)
    for g in loop.opt.param_groups:
        g["lr"] = cosine_lr(run.lr, step, loop.total, loop.warmup)
    global_shape = (run.batch_size,) + tuple(x.shape[1:])
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if loop.use_amp
           else torch.autocast(dev.type, enabled=False))
    with amp:
        if run.kind == "trades":
            recipe = loop.recipe
            # (L2: x + 0.001·N(0, I) in both recipes, as both public codes; recipes.py)
            if recipe.trades_start == "uniform" and run.norm == "linf":
                u = torch.rand(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
                x_adv = trades_from_draws(loop.attack_fwd, x, u, eps=run.eps,
                                          step_size=run.step_size, steps=run.steps,
                                          mode=recipe.trades_mode)
            else:
                noise = torch.randn(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
                x_adv = trades_from_noise(loop.attack_fwd, x, noise, eps=run.eps,
                                          step_size=run.step_size, steps=run.steps,
                                          mode=recipe.trades_mode, norm=run.norm)
            logits_nat = loop.fwd(x)
            logits_adv = loop.fwd(x_adv)
            loss = trades_loss(logits_nat, logits_adv, y, beta=run.beta,
                               label_smoothing=run.label_smoothing)
        else:
            u = torch.rand(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
            x_adv = pgd_from_draws(loop.attack_fwd, x, y, u, eps=run.eps,
                                   step_size=run.step_size, steps=run.steps, norm=run.norm)
            logits_adv = loop.fwd(x_adv)
            logits_nat = None
            loss = pgd_at_loss(logits_adv, y, label_smoothing=run.label_smoothing)
    if dev.type == "cpu" and not bool(torch.isfinite(loss.detach())):
        # (on GPU the per-epoch check on the history entry avoids a sync per update)
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, update {step}")
    loop.opt.zero_grad(set_to_none=True)
    loss.backward()          # under DDP: gradients averaged over the ranks here
    loop.opt.step()
    if loop.world > 1 and loop.has_buffers:
        _broadcast_buffers(loop.model)
    if loop.ema_model is not None:
        decay = ema_decay(run.ema, step + 1, loop.recipe.ema_warmup * loop.total)
        _ema_update(loop.ema_model, loop.model, decay,
                    buffers=loop.recipe.ema_buffers == "average")
    return loss, logits_nat, logits_adv


@torch.no_grad()
def _ema_update(ema_model: nn.Module, model: nn.Module, decay: float, *,
                buffers: bool = True) -> None:
    """ema ← decay · ema + (1 − decay) · model on the parameters (decay 0: an exact copy) and,
    if ``buffers``, on the float buffers (BatchNorm statistics averaged like the weights they
    go with; integer buffers copied)."""
    ep = [p for p in ema_model.parameters()]
    mp = [p.detach() for p in model.parameters()]
    if decay == 0.0:
        torch._foreach_copy_(ep, mp)
    else:
        torch._foreach_lerp_(ep, mp, 1.0 - decay)
    if not buffers:
        return
    for be, bm in zip(ema_model.buffers(), model.buffers()):
        if be.is_floating_point():
            be.lerp_(bm, 1.0 - decay)
        else:
            be.copy_(bm)


@torch.no_grad()
def _copy_buffers(ema_model: nn.Module, model: nn.Module) -> None:
    """The model's buffers (BatchNorm running statistics, ``num_batches_tracked``) into the EMA
    model, values only (``watrain.py``'s ``update_bn`` assigns the tensors themselves, so its
    average shares them from then on; at the epoch ends, the only points where the EMA model
    is read, the two are equal)."""
    for be, bm in zip(ema_model.buffers(), model.buffers()):
        be.copy_(bm)


def epoch_entry(loop: Loop, epoch: int, step: int, sums, seen: int, seconds: float) -> dict:
    """The history entry of an epoch, its sums and image count all-reduced over the ranks."""
    run = loop.run
    if loop.world > 1:
        import torch.distributed as dist

        sums = torch.cat([sums, sums.new_tensor([float(seen)])])
        dist.all_reduce(sums)
        seen = int(round(sums[3].item()))
    s = sums.tolist()
    return {"epoch": epoch + 1, "loss": s[0] / seen,
            "train_clean_acc": s[1] / seen if run.kind == "trades" else float("nan"),
            "train_adv_acc": s[2] / seen,
            "lr": cosine_lr(run.lr, step - 1, loop.total, loop.warmup),
            "updates": step, "time_s": seconds, "images_per_s": seen / seconds}
