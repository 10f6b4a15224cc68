"""Adversarial training on real + generated data: the public entry points
:func:`train_trades` (TRADES, the default) and :func:`train_pgd_at` (Madry PGD-AT), their
argument checks and one run put together top-down (:func:`_fit`). The parts: the recipes,
objectives and schedules, with their sources, :mod:`cdp_fast.robust.recipes`; checkpoints,
determinism and resume, :mod:`cdp_fast.robust.checkpoint`; DDP and one epoch,
:mod:`cdp_fast.robust.loop`; data order, mixing and augmentation,
:mod:`cdp_fast.robust.batches`; the inner attacks, :mod:`cdp_fast.robust.attacks`.

Inputs (``train_data`` and ``synthetic``, read through :func:`cdp_fast.data.as_source`): a
tuple ``(x, y)`` of tensors / arrays (x float NCHW in [0, 1], or uint8 NHWC; y int64), a
``torch.utils.data.Dataset`` of (x, y) pairs (x float CHW in [0, 1]), a
:class:`cdp_fast.Samples` (uint8 NHWC images, or float images in [-1, 1] model space), or a
path (npz with image/label or arr_0/arr_1 keys, or an out directory of :func:`cdp_fast.sample`).
The model takes images in [0, 1] (checked on the data by ``as_source``); a network that declares
another range — a ``cdp_fast.models.as_labeler`` / ``as_feature_extractor`` adapter, which takes
the sampler's [-1, 1] — is refused (:mod:`cdp_fast.models.ranges`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from cdp_fast.data import Samples, as_source
from cdp_fast.data.sources import is_path_list
from cdp_fast.models.ranges import UNIT_RANGE, check_range_contract
from cdp_fast.robust.attacks import check_norm
from cdp_fast.robust.batches import MixedBatchSampler, augment_defaults, mix_counts
from cdp_fast.robust.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from cdp_fast.robust.loop import Loop, broadcast_state, check_labels, epoch_entry, run_epoch, wrap_model
from cdp_fast.robust.monitor import Monitor
from cdp_fast.robust.recipes import RECIPES, RunConfig, make_optimizer
from cdp_fast.utils import distributed as cdist
from cdp_fast.utils.checkpoint import data_fingerprint
from cdp_fast.utils.checks import check_number
from cdp_fast.utils.runtime import eval_mode, rank_device

__all__ = ["train_trades", "train_pgd_at"]


# --------------------------------------------------------------------------- public API
def train_trades(model: nn.Module, train_data, *, synthetic=None, real_fraction: float = 0.3,
                 epochs: int, eps: float, step_size: float, steps: int = 10,
                 beta: float = 6.0, batch_size: int, ema: Optional[float] = 0.995,
                 progress: bool = True, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True,
                 label_smoothing: Optional[float] = None, augment: bool = True,
                 pad: Optional[int] = None, flip: Optional[bool] = None,
                 steps_per_epoch: Optional[int] = None,
                 warmup_epochs: int = 0, checkpoint=None, resume: bool = True, seed: int = 0,
                 device=None, amp="auto", compile="auto",
                 callback: Optional[Callable[[dict], None]] = None,
                 sync_bn: bool = False, recipe: str = "gowal", norm: str = "linf",
                 holdout=None, eval_every: Optional[int] = None, log_dir=None) -> nn.Module:
    """TRADES adversarial training (Zhang et al. 2019) on real + synthetic data, the paper's
    recipe by default (App. D: Gowal et al. 2021's setting, β = 6, 10-step PGD, EMA 0.995;
    ``recipe="gowal"``; :mod:`cdp_fast.robust.recipes` documents both recipes and their
    sources).

    Example:
        >>> model = cdp_fast.models.get_model("wrn-28-10-swish")
        >>> cdp_fast.train_trades(model, (x, y), synthetic="gen/", epochs=400, eps=8/255,
        ...                       step_size=2/255, batch_size=512)

    Args:
        model: classifier, (B, C, H, W) in [0, 1] -> logits (B, K); trained in place.
        train_data: real data (see the module docstring for accepted forms).
        synthetic: generated data (same forms; needs labels) or None (real data only).
        real_fraction: share of each batch drawn from ``train_data`` when ``synthetic`` is
            given (0.3 = DM-Improves-AT's unsup_fraction 0.7); ignored otherwise.
        epochs: number of epochs (>= 1); an epoch is ``steps_per_epoch`` updates, by default
            ``ceil(len(train_data) / batch_size)``.
        eps, step_size, steps: budget ε (in ``norm``), PGD step α and PGD steps of the inner
            attack (the paper: L∞ 8/255, 2/255, 10 on CIFAR-10; DM-Improves-AT's L2: 128/255,
            15/255, 10).
        beta: TRADES β (6.0; unused by PGD-AT).
        batch_size: images per update (real + synthetic).
        ema: EMA decay (0.995) or None for no averaging; returned weights are the EMA's.
        progress: tqdm bar per epoch.
        lr, momentum, weight_decay, nesterov: SGD (DM-Improves-AT: lr 0.2 at batch 512,
            Nesterov, 5e-4).
        label_smoothing: on the clean CE term (TRADES) or the adversarial CE (PGD-AT); None
            (default): the recipe's — 0.1 for TRADES with "gowal", 0 otherwise.
        augment, pad, flip: random crop with zero padding ``pad`` and horizontal flips (no
            effect when ``augment=False``). None (default) fits them to the images (C, H, W)
            (:func:`cdp_fast.robust.batches.augment_defaults`): pad = min(H, W)/8 rounded half up,
            at least 1 (4 at 32×32, 1 at 8×8); flip = True for 3-channel images only (never
            for 1-channel digits / MNIST). Pass flip=False for signs or text (e.g. GTSRB).
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
        recipe: ``"gowal"`` (default: Gowal et al. 2021 as the paper used it — uniform attack
            start, train-mode BatchNorm with frozen statistics in the attack, label smoothing
            0.1, EMA copied for the first 2.5 % of updates then ramped, BatchNorm statistics
            of the EMA model copied from the model each epoch) or ``"zhang"`` (this library's
            behaviour before recipes, bit for bit: Zhang et al.'s ``trades.py`` attack —
            x + 0.001·N(0, I) start, eval mode — no label smoothing, EMA ramp from the first
            update with averaged BatchNorm statistics). Part of the checkpoint's
            configuration; checkpoints written before recipes existed resume as "zhang".
        norm: the inner attack's threat model, ``"linf"`` (default) or ``"l2"``
            (:func:`cdp_fast.robust.attacks.pgd_step_l2`; TRADES' L2 attack starts from
            x + 0.001·N(0, I) in both recipes, as Zhang's and Gowal et al.'s code). Part of the
            checkpoint's configuration.
        holdout, eval_every, log_dir: (:mod:`cdp_fast.robust.monitor`) None, a fraction in
            (0, 1) or a count of ``train_data``'s items (never ``synthetic``) held out by ``seed``
            and evaluated (clean, PGD-20 at ``eps``; the EMA model) every ``eval_every`` epochs
            (None: 1) and after the last, into the history (``holdout_*``); ``log_dir``: a
            folder for ``metrics.csv`` (a row per epoch) and TensorBoard scalars if installed.
    Returns:
        ``model`` with the EMA weights loaded (the last weights when ema=None), in eval mode,
        with ``model.history``: one dict per epoch (loss, train accuracies, lr, time_s,
        images_per_s summed over ranks) and ``model.throughput``: one dict per rank
        {rank, images, seconds, images_per_s} for the epochs this call ran (images = training
        examples; the attack's extra passes are not counted).
    Raises:
        ValueError naming the argument for bad inputs or a checkpoint from other arguments.
    """
    return _fit("trades", model, train_data, synthetic=synthetic, real_fraction=real_fraction,
                epochs=epochs, eps=eps, step_size=step_size, steps=steps, beta=beta,
                batch_size=batch_size, ema=ema, progress=progress, lr=lr, momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, label_smoothing=label_smoothing,
                augment=augment, pad=pad, flip=flip, steps_per_epoch=steps_per_epoch,
                warmup_epochs=warmup_epochs, checkpoint=checkpoint, resume=resume, seed=seed,
                device=device, amp=amp, compile=compile, callback=callback, sync_bn=sync_bn,
                recipe=recipe, norm=norm, holdout=holdout, eval_every=eval_every, log_dir=log_dir)


def train_pgd_at(model: nn.Module, train_data, *, synthetic=None, real_fraction: float = 0.3,
                 epochs: int, eps: float, step_size: float, steps: int = 10,
                 beta: float = 6.0, batch_size: int, ema: Optional[float] = 0.995,
                 progress: bool = True, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True,
                 label_smoothing: Optional[float] = None, augment: bool = True,
                 pad: Optional[int] = None, flip: Optional[bool] = None,
                 steps_per_epoch: Optional[int] = None,
                 warmup_epochs: int = 0, checkpoint=None, resume: bool = True, seed: int = 0,
                 device=None, amp="auto", compile="auto",
                 callback: Optional[Callable[[dict], None]] = None,
                 sync_bn: bool = False, recipe: str = "gowal", norm: str = "linf",
                 holdout=None, eval_every: Optional[int] = None, log_dir=None) -> nn.Module:
    """Madry et al. (2018) PGD adversarial training with the same options as
    :func:`train_trades` (``beta`` is accepted for symmetry and ignored); the revised paper's
    App. F.1 variant.

    Args:
        as :func:`train_trades`, except: ``beta`` is ignored; ``eps``, ``step_size``,
        ``steps`` define the PGD attack with random start (:func:`cdp_fast.robust.attacks.pgd_attack`)
        whose point alone is trained on; ``label_smoothing`` applies to that adversarial CE
        (None: 0 in both recipes, as ``core/utils/train.py``'s ``Trainer.adversarial_loss``);
        ``recipe`` sets the EMA only (the attack is the same in both);
        ``history``'s ``train_clean_acc`` is NaN (no clean forward pass).
    Returns:
        as :func:`train_trades`.
    Raises:
        as :func:`train_trades`.
    """
    return _fit("pgd_at", model, train_data, synthetic=synthetic, real_fraction=real_fraction,
                epochs=epochs, eps=eps, step_size=step_size, steps=steps, beta=beta,
                batch_size=batch_size, ema=ema, progress=progress, lr=lr, momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, label_smoothing=label_smoothing,
                augment=augment, pad=pad, flip=flip, steps_per_epoch=steps_per_epoch,
                warmup_epochs=warmup_epochs, checkpoint=checkpoint, resume=resume, seed=seed,
                device=device, amp=amp, compile=compile, callback=callback, sync_bn=sync_bn,
                recipe=recipe, norm=norm, holdout=holdout, eval_every=eval_every, log_dir=log_dir)


# --------------------------------------------------------------------------- a run, top-down
def _fit(kind: str, model: nn.Module, train_data, *, synthetic, checkpoint, resume, device,
         callback, holdout=None, eval_every=None, log_dir=None, **options) -> nn.Module:
    """One run: validation, data, device and process group, optimizer and EMA, resume, DDP
    wrapping; then the epochs, each followed by its checkpoint and the callback; then the EMA
    weights into ``model``. The parts live in :mod:`cdp_fast.robust.recipes`,
    :mod:`cdp_fast.robust.checkpoint` and :mod:`cdp_fast.robust.loop`."""
    run = _validate(kind, model, callback=callback, **options)
    monitor = Monitor(holdout, eval_every, log_dir)      # (its arguments checked before any work)
    # Paths are opened once here, so the data trained on is the data fingerprinted.
    train_data, synthetic = _open_path(train_data), _open_path(synthetic)
    real, syn, spe = _sources(train_data, synthetic, run, monitor)
    if run.augment:
        if len(real.image_shape) != 3:
            raise ValueError(f"train_data: augmentation (crops, flips) needs images (C, H, W), got items of "
                             f"shape {tuple(real.image_shape)}; pass augment=False")
        pad, flip = augment_defaults(real.image_shape, run.pad, run.flip)
        run = dataclasses.replace(run, pad=pad, flip=flip)
    dev = rank_device(device, model)
    model.to(dev)
    use_amp = (dev.type == "cuda") if run.amp == "auto" else bool(run.amp)
    num_classes = _num_outputs(model, real, dev, use_amp)
    _check_labels(train_data, "train_data", num_classes)
    _check_labels(synthetic, "synthetic", num_classes)
    rank, world = cdist.maybe_init(dev)
    if world > 1 and run.batch_size % world:
        raise ValueError(f"batch_size={run.batch_size} must be divisible by the world size "
                         f"{world}")
    if run.sync_bn and world > 1 and dev.type != "cuda":
        raise ValueError("sync_bn=True needs CUDA devices (nccl): torch.nn.SyncBatchNorm has no "
                         f"CPU/gloo implementation (device is {dev})")
    sampler = MixedBatchSampler(len(real), 0 if syn is None else len(syn), run.batch_size,
                                float(run.real_fraction), spe, seed=run.seed, rank=rank,
                                world_size=world)
    opt = make_optimizer(model, run)
    ema_model = copy.deepcopy(model).eval() if run.ema is not None else None
    if ema_model is not None:
        for p in ema_model.parameters():
            p.requires_grad_(False)

    config = {**checkpoint_config(run, spe, real, syn), **monitor.config()}
    start_epoch, step, history = 0, 0, []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    fingerprints = None
    if ckpt_path is not None:   # (hashing in-memory data costs ~1 s per GB: only when needed)
        fingerprints = {"train_data": data_fingerprint(train_data),
                        "synthetic": data_fingerprint(synthetic)}
    if ckpt_path is not None and resume and ckpt_path.exists():
        start_epoch, step, history = load_checkpoint(ckpt_path, dev, config, model, opt,
                                                     ema_model, data=fingerprints)

    model, fwd, attack_fwd, restore_bn = wrap_model(model, dev, world, run)
    if world > 1 and ema_model is not None:
        # DDP gave every rank rank 0's weights; the EMA (copied before) must start from them
        # too, or ranks that built the model with different random inits keep different EMAs.
        broadcast_state(ema_model)
    loop = Loop(run=run, real=real, syn=syn, sampler=sampler, model=model, fwd=fwd,
                attack_fwd=attack_fwd, opt=opt, ema_model=ema_model, dev=dev, rank=rank,
                world=world, use_amp=use_amp, has_buffers=any(True for _ in model.buffers()),
                rows=torch.as_tensor(sampler.rows, device=dev), total=run.epochs * spe,
                warmup=run.warmup_epochs * spe, recipe=RECIPES[run.recipe],
                num_classes=num_classes)
    run_images, run_seconds = 0, 0.0
    monitor.start(start_epoch, rank)
    for epoch in range(start_epoch, run.epochs):
        t0 = time.perf_counter()
        step, sums, seen = run_epoch(loop, epoch, step)
        seconds = time.perf_counter() - t0
        run_images += seen
        run_seconds += seconds
        entry = epoch_entry(loop, epoch, step, sums, seen, seconds)
        history.append(entry)
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
        monitor.evaluate(entry, run.epochs, ema_model if ema_model is not None else model, eps=run.eps,
                         seed=run.seed, batch_size=run.batch_size, device=dev, norm=run.norm)
        if ckpt_path is not None and rank == 0:
            save_checkpoint(ckpt_path, config=config, epoch=epoch + 1, step=step, model=model,
                            opt=opt, ema_model=ema_model, history=history, data=fingerprints)
        if ckpt_path is not None and world > 1:
            cdist.barrier()   # every rank sees the finished checkpoint before going on
        monitor.write(history, rank)      # (after the checkpoint: the log never runs ahead of it)
        if callback is not None:
            callback({"epoch": epoch + 1, "epochs": run.epochs, "history": history,
                      "model": model, "ema_model": ema_model})
    monitor.close()

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


def _validate(kind, model, *, real_fraction, epochs, eps, step_size, steps, beta, batch_size,
              ema, progress, lr, momentum, weight_decay, nesterov, label_smoothing, augment,
              pad, flip, steps_per_epoch, warmup_epochs, seed, amp, compile, callback,
              sync_bn, recipe, norm="linf") -> RunConfig:
    """ValueError naming the first bad argument (in this order), else the run's RunConfig
    (label_smoothing resolved from the recipe; pad / flip may still be None: the images'
    shape decides them)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_range_contract(model, UNIT_RANGE, "model (training gives it images in [0, 1])",
                         "train the classifier itself (the adapter's .model)")
    check_number("real_fraction", real_fraction, 0.0, 1.0)
    check_number("epochs", epochs, 1, integer=True)
    check_number("eps", eps, 0.0)
    check_number("step_size", step_size, 0.0)
    check_number("steps", steps, 0, integer=True)
    check_number("beta", beta, 0.0)
    check_number("batch_size", batch_size, 1, integer=True)
    if ema is not None:
        check_number("ema", ema, 0.0, 1.0, hi_open=True)
    check_number("lr", lr, 0.0, lo_open=True)
    check_number("momentum", momentum, 0.0, 1.0, hi_open=True)
    check_number("weight_decay", weight_decay, 0.0)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    norm = check_norm(norm)
    if label_smoothing is None:
        label_smoothing = RECIPES[recipe].label_smoothing[kind]
    check_number("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
    if pad is not None:
        check_number("pad", pad, 0, integer=True)
    if flip not in (None, True, False):
        raise ValueError(f"flip must be None, True or False, got {flip!r}")
    check_number("warmup_epochs", warmup_epochs, 0, integer=True)
    check_number("seed", seed, 0, integer=True)
    if steps_per_epoch is not None:
        check_number("steps_per_epoch", steps_per_epoch, 1, integer=True)
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
    return RunConfig(kind=kind, real_fraction=real_fraction, epochs=int(epochs), eps=eps,
                     step_size=step_size, steps=int(steps), beta=beta, batch_size=int(batch_size),
                     ema=ema, progress=progress, lr=lr, momentum=momentum,
                     weight_decay=weight_decay, nesterov=nesterov,
                     label_smoothing=label_smoothing, augment=augment,
                     pad=None if pad is None else int(pad), flip=flip,
                     steps_per_epoch=steps_per_epoch, warmup_epochs=int(warmup_epochs),
                     seed=int(seed), amp=amp, compile=compile, sync_bn=sync_bn, recipe=recipe,
                     norm=norm)


def _sources(train_data, synthetic, run: RunConfig, monitor=None):
    """(real less ``monitor``'s holdout, synthetic or None, updates per epoch); ValueError if
    they do not fit together."""
    real = as_source(train_data, "train_data")
    if monitor is not None:
        real = monitor.split(real, run.seed)
    syn = as_source(synthetic, "synthetic") if synthetic is not None else None
    if run.real_fraction == 0.0 and syn is None:
        raise ValueError("real_fraction=0 trains on synthetic data only, but synthetic is None")
    if syn is not None and syn.image_shape != real.image_shape:
        raise ValueError(f"synthetic images {syn.image_shape} differ from train_data images "
                         f"{real.image_shape}")
    mix_counts(run.batch_size, float(run.real_fraction), syn is not None)   # (its ValueError)
    spe = (int(run.steps_per_epoch) if run.steps_per_epoch is not None
           else math.ceil(len(real) / run.batch_size))
    return real, syn, spe


def _open_path(data):
    """A path, or a list of paths (the parts of one set), as the :class:`cdp_fast.Samples` it
    names (what as_source would open), so the fingerprint covers every part."""
    return Samples.load(data) if isinstance(data, (str, os.PathLike)) or is_path_list(data) else data


def _num_outputs(model: nn.Module, real, dev, use_amp: bool) -> Optional[int]:
    """K, the size of the model's output (B, K), from one forward pass on a zero image of the
    data's shape (eval mode, no gradient: nothing of the model or the random state changes);
    None when the output is not (1, K). Labels are checked against it before training (an
    out-of-range label would otherwise fail deep in cross_entropy, on CUDA as a device-side
    assert)."""
    x0 = torch.zeros((1,) + tuple(real.image_shape), device=dev)
    with torch.no_grad(), eval_mode(model), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                           enabled=use_amp):
        out = model(x0)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _check_labels(data, name: str, num_classes: Optional[int]) -> None:
    """Every label of ``data`` in [0, K) when its labels are at hand (arrays, a Samples, a
    TensorDataset); other Datasets are checked batch by batch in the loop
    (:func:`cdp_fast.robust.loop.check_labels`)."""
    if data is None or num_classes is None:
        return
    if hasattr(data, "images") and hasattr(data, "labels"):
        labels = data.labels
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        labels = data[1]
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) >= 2:
        labels = data.tensors[1]
    else:
        return
    if labels is not None and len(labels):
        check_labels(torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor)
                                     else labels), name, num_classes)
