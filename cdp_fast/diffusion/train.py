"""Training an ε-model: :func:`train_diffusion`, the DDPM objective with EMA, resumable.

Notation (Ho et al. 2020, Algorithm 1 and eq. (14), "L_simple"):
    x_0     a training image in [-1, 1] (augmented: :func:`cdp_fast.diffusion.augment.random_resized_crop`)
    t       uniform on {0, ..., T−1} (the paper's t − 1), ᾱ_t = alphas_cumprod[t]
    ε       standard normal, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε
    loss    ‖ε − ε_θ(x_t, t[, y])‖², averaged over pixels and the batch

Determinism and resume. The data order of an epoch is a permutation drawn from (seed, epoch);
each example's ε, t and crop from (seed, epoch, its dataset index)
(:func:`cdp_fast.diffusion.augment.sample_draws`); the learning rate and the EMA decay are
functions of the update index; dropout masks come from the global generator re-seeded from
(seed, epoch, rank) at every epoch inside ``torch.random.fork_rng`` (the caller's generator is
left as it was). A ``checkpoint=`` path receives after every epoch, atomically, the model, EMA,
AdamW state, epoch, update count, history, configuration and data fingerprint
(:mod:`cdp_fast.utils.checkpoint`); calling again resumes from it (weights-only load) and ends
at bitwise the same weights as an uninterrupted run on the same machine and thread count. The
number of epochs is not part of the configuration: a run of 2 epochs resumed with
``epochs=4`` is a 4-epoch run. A checkpoint written with other arguments or for other data is
refused (ValueError, naming the differences).

Distributed data parallel (``torchrun --nproc_per_node=N``, or an initialised default process
group; :func:`cdp_fast.utils.distributed.maybe_init` joins it): ``batch_size`` is the global
batch (divisible by N); rank r takes rows r::N of every global batch, the model is wrapped in
``DistributedDataParallel`` (gradients averaged over the ranks, so the update is the one of
the global-batch mean loss), every example's draws are those of a single-process run, and the
EMA starts from rank 0's weights; only rank 0 writes the checkpoint and shows a bar. Results
are the same as with one process up to the order of floating-point reductions (and, with
dropout, the per-rank dropout masks).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from cdp_fast.diffusion.augment import crop_boxes, epoch_seed, random_resized_crop, sample_draws
from cdp_fast.diffusion.inputs import open_training_data
from cdp_fast.diffusion.schedule import make_alphas_cumprod
from cdp_fast.utils import distributed as cdist
from cdp_fast.utils.checkpoint import (check_config, check_digest, data_fingerprint, load_states, read_weights_only,
                                       state_digest, write_state)
from cdp_fast.utils.checks import check_number
from cdp_fast.utils.runtime import eval_mode, rank_device
from cdp_fast.utils.seeding import sample_seed

__all__ = ["train_diffusion"]

_CKPT_VERSION = 1
_KIND = "diffusion"


def train_diffusion(model: nn.Module, data, *, epochs: int, batch_size: int, lr: float = 2e-4,
                    weight_decay: float = 0.0, ema: Optional[float] = 0.9995, betas="linear",
                    T: int = 1000, augment: bool = True, crop_scale=(0.8, 1.0),
                    crop_ratio=(0.8, 1.2), warmup_steps: int = 0,
                    grad_clip: Optional[float] = 1.0, checkpoint=None, resume: bool = True,
                    seed: int = 0, device=None, progress: bool = True,
                    callback: Optional[Callable[[dict], None]] = None) -> nn.Module:
    """Train an ε-model with the DDPM objective L_simple (Ho et al. 2020, Algorithm 1), AdamW
    and an EMA of the weights; resumable, torchrun-ready (module docstring).

    Example:
        >>> x, y = cdp_fast.models.digits.load_digits_data("train")      # [0, 1], (N, 1, 8, 8)
        >>> model = cdp_fast.models.unet.UNet(1, ch=32, ch_mult=(1, 2, 2), num_classes=10)
        >>> cdp_fast.train_diffusion(model, (2 * x - 1, y), epochs=200, batch_size=128,
        ...                          checkpoint="eps.pt")
        >>> s = cdp_fast.sample(model, 1000, class_labels=..., image_shape=(1, 8, 8))

    Args:
        model: ε-model ``model(x, t) -> ε`` (B, C, H, W); class-conditional
            ``model(x, t, y)`` when it has an int attribute ``num_classes`` (as
            :class:`cdp_fast.models.unet.UNet` with ``num_classes=K``). Trained in place.
        data: the training images in the ε-model's space [-1, 1]: x (float NCHW in [-1, 1],
            or uint8 NHWC 0..255), an (x, y) pair, a :class:`cdp_fast.Samples`, a path (npz /
            out directory) or a Dataset of (x CHW in [-1, 1], y). Float images all >= 0 are
            refused as [0, 1] images (pass 2·x − 1); :mod:`cdp_fast.diffusion.inputs` has the
            whole rule. Labels y (int, (N,)) are required iff the model is class-conditional.
        epochs: epochs to reach (>= 1); an epoch is ``N // batch_size`` updates over a fresh
            permutation (the remainder is left out of that epoch, a different one each epoch).
        batch_size: global batch (1..N; divisible by the number of processes).
        lr, weight_decay: AdamW's (β = (0.9, 0.999)); lr is constant after ``warmup_steps``
            updates of linear warm-up.
        ema: EMA decay, min(ema, (1 + k)/(10 + k)) after update k, or None; the returned weights
            are the EMA's (the last weights when None).
        betas, T: the noise schedule, as :func:`cdp_fast.make_alphas_cumprod`: "linear" (the
            default of :func:`cdp_fast.sample` and the bundled digits model), "cosine" or a
            tensor of T betas. Sample with the same table: ``sample(..., betas=..., T=...)`` or
            ``alphas_cumprod=model.alphas_cumprod``.
        augment, crop_scale, crop_ratio: RandomResizedCrop back to the same size (minimal-
            diffusion's MNIST setting: scale (0.8, 1), ratio (0.8, 1.2)); augment=False: none.
        grad_clip: max global gradient norm (None: no clipping).
        checkpoint, resume: a path written atomically after every epoch; resume=True continues
            from it (refused if written with other arguments or for other data).
        seed: all randomness derives from it. device: default the model's (``cuda:LOCAL_RANK``
            under torchrun with CUDA). progress: a tqdm bar per epoch (rank 0).
        callback: called after each epoch (after checkpointing) with {epoch, epochs, history,
            model, ema_model}.
    Returns:
        ``model`` with the EMA weights, in eval mode, with ``model.history`` (one dict per epoch:
        epoch, loss — the mean L_simple of its updates —, updates, lr, time_s, images_per_s),
        ``model.throughput`` (one dict per rank) and ``model.alphas_cumprod`` (float64 (T,), the
        table trained with).
    Raises:
        ValueError naming the argument: bad numbers, data out of range / NaN / wrong dtype or
        shape, label count or range, missing labels, a checkpoint from other arguments or data.
    """
    conf = _validate(model, epochs=epochs, batch_size=batch_size, lr=lr,
                     weight_decay=weight_decay, ema=ema, T=T, augment=augment,
                     crop_scale=crop_scale, crop_ratio=crop_ratio, warmup_steps=warmup_steps,
                     grad_clip=grad_clip, seed=seed, progress=progress, callback=callback)
    try:
        abar = make_alphas_cumprod(betas, T)
    except ValueError as e:
        raise ValueError(f"betas: {e}") from None
    num_classes = getattr(model, "num_classes", None)
    num_classes = num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) else None
    td = open_training_data(data, num_classes)
    if batch_size > td.n:
        raise ValueError(f"batch_size={batch_size} is larger than the {td.n} training images")
    dev = rank_device(device, model)
    model.to(dev)
    _probe(model, td, dev, num_classes)
    rank, world = cdist.maybe_init(dev)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")

    config = dict(conf, kind=_KIND, betas=betas if isinstance(betas, str) else state_digest(abar),
                  n=td.n, image_shape=list(td.image_shape), num_classes=num_classes)
    config.pop("epochs"), config.pop("progress")
    if not augment:   # (the crop's ranges do not matter without it)
        config.pop("crop_scale"), config.pop("crop_ratio")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema_model = copy.deepcopy(model).eval() if ema is not None else None
    if ema_model is not None:
        ema_model.requires_grad_(False)
    start, step, history = 0, 0, []
    path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = {"data": data_fingerprint(td.raw)} if path is not None else None
    if path is not None and resume and path.exists():
        start, step, history = _load(path, dev, config, fingerprint, model, opt, ema_model)
        if start > epochs:
            raise ValueError(f"epochs={epochs}: checkpoint {path} already holds {start} epochs; "
                             "pass epochs >= that, a new checkpoint path or resume=False")

    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if ema_model is not None:
            _broadcast(ema_model)
    a = abar.to(dev, torch.float32)
    spe = td.n // batch_size
    rows = np.arange(batch_size)[rank::world]
    parts = _Parts(fwd=fwd, model=model, opt=opt, ema_model=ema_model, data=td, abar=a, conf=conf,
                   num_classes=num_classes, dev=dev)
    run_images, run_seconds = 0, 0.0
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([seed, 7, epoch]).permutation(td.n)[:spe * batch_size]
        total = torch.zeros((), dtype=torch.float64, device=dev)
        bar = _bar(spe, f"diffusion epoch {epoch + 1}/{epochs}", progress and rank == 0)
        model.train()
        with torch.random.fork_rng(devices=_cuda_index(dev)):
            torch.manual_seed(sample_seed(epoch_seed(seed, epoch), -1 - rank))   # dropout masks
            for k in range(spe):
                idx = order[k * batch_size:(k + 1) * batch_size][rows]
                loss = _update(parts, idx, epoch, step)
                total += loss.detach().double() * len(idx)
                step += 1
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        seen = spe * len(rows)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        run_images, run_seconds = run_images + seen, run_seconds + seconds
        entry = {"epoch": epoch + 1, "loss": total.item() / (spe * batch_size), "updates": step,
                 "lr": _lr(lr, step - 1, warmup_steps), "time_s": seconds,
                 "images_per_s": spe * batch_size / seconds}
        history.append(entry)
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
        if path is not None and rank == 0:
            write_state(path, {"version": _CKPT_VERSION, "config": config, "epoch": epoch + 1,
                               "step": step, "model": model.state_dict(),
                               "optimizer": opt.state_dict(),
                               "ema": None if ema_model is None else ema_model.state_dict(),
                               "history": history, "data": fingerprint})
        if path is not None and world > 1:
            cdist.barrier()
        if callback is not None:
            callback({"epoch": epoch + 1, "epochs": epochs, "history": history, "model": model,
                      "ema_model": ema_model})
    model.throughput = cdist.all_gather_object(
        {"rank": rank, "images": run_images, "seconds": run_seconds,
         "images_per_s": run_images / run_seconds if run_seconds > 0 else 0.0})
    if ema_model is not None:
        model.load_state_dict(ema_model.state_dict())
    model.eval()
    model.history = history
    model.alphas_cumprod = abar
    return model


@dataclass(frozen=True)
class _Parts:
    """What every update of a run reads."""
    fwd: Callable                 # the training forward (the DDP wrapper under torch.distributed)
    model: nn.Module              # the module trained
    opt: torch.optim.Optimizer
    ema_model: Optional[nn.Module]
    data: Any                     # cdp_fast.diffusion.inputs.TrainingData
    abar: torch.Tensor            # ᾱ (T,) float32 on dev
    conf: dict                    # the validated settings
    num_classes: Optional[int]
    dev: torch.device


def _update(parts: _Parts, idx, epoch: int, step: int):
    """One AdamW update on this rank's examples ``idx``; the loss (this rank's batch mean)."""
    fwd, model, opt, ema_model, td, a, conf, num_classes, dev = (
        parts.fwd, parts.model, parts.opt, parts.ema_model, parts.data, parts.abar, parts.conf,
        parts.num_classes, parts.dev)
    x0, y = td.get(idx)
    x0 = x0.to(dev, non_blocking=True)
    eps, t, u = sample_draws(conf["seed"], epoch, idx, td.image_shape, len(a), dev)
    if conf["augment"] and x0.dim() == 4:
        boxes = crop_boxes(u, x0.shape[2:], conf["crop_scale"], conf["crop_ratio"])
        x0 = random_resized_crop(x0, *boxes)
    ab = a[t].view(-1, *([1] * (x0.dim() - 1)))
    x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
    out = fwd(x_t, t) if num_classes is None else fwd(x_t, t, y.to(dev, non_blocking=True))
    loss = torch.mean((eps - out.float()) ** 2)
    if dev.type == "cpu" and not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, update {step}")
    for g in opt.param_groups:
        g["lr"] = _lr(conf["lr"], step, conf["warmup_steps"])
    opt.zero_grad(set_to_none=True)
    loss.backward()                      # under DDP: gradients averaged over the ranks here
    if conf["grad_clip"] is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), conf["grad_clip"])
    opt.step()
    if ema_model is not None:
        d = min(conf["ema"], (1.0 + step + 1) / (10.0 + step + 1))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_model.parameters()),
                                 [p.detach() for p in model.parameters()], 1.0 - d)
            for be, bm in zip(ema_model.buffers(), model.buffers()):
                be.copy_(bm)
    return loss


def _cuda_index(dev: torch.device) -> list:
    """The CUDA device whose generator fork_rng saves and restores (none on the CPU)."""
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _lr(lr: float, step: int, warmup: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def _bar(total: int, desc: str, show: bool):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        return None
    return tqdm(total=total, desc=desc, leave=False)


@torch.no_grad()
def _broadcast(module: nn.Module) -> None:
    import torch.distributed as dist

    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t, 0)


def _probe(model, td, dev, num_classes) -> None:
    """One forward pass on two images of the data's shape (eval mode, no gradient, no random
    state used): ValueError if the model does not map (B, C, H, W) to the same shape."""
    x = torch.zeros((2,) + tuple(td.image_shape), device=dev)
    t = torch.zeros(2, dtype=torch.long, device=dev)
    with eval_mode(model):
        try:
            out = model(x, t) if num_classes is None else model(x, t, torch.zeros_like(t))
        except TypeError as e:   # (a classifier, a model of another signature)
            call = "model(x, t)" if num_classes is None else "model(x, t, y)"
            raise ValueError(f"model must be an ε-model called as {call}; calling it failed: {e}") from None
    out = getattr(out, "sample", out)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must map images {tuple(x.shape)} to an ε of the same shape, got {got}")


def _load(path, dev, config, fingerprint, model, opt, ema_model):
    """Restore model, AdamW and EMA from ``path`` in place; (epoch, update, history)."""
    what = "a checkpoint written by cdp_fast.train_diffusion"
    state = read_weights_only(path, "checkpoint", what, map_location=dev)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not {what}; pass "
                         "another checkpoint path or resume=False")
    check_digest(path, state)
    if state.get("version") != _CKPT_VERSION or state.get("config", {}).get("kind") != _KIND:
        raise ValueError(f"checkpoint {path} is not {what} (another format or trainer); pass "
                         "another checkpoint path or resume=False")
    check_config(path, state["config"], config)
    was, now = (state.get("data") or {}).get("data"), (fingerprint or {}).get("data")
    if was is not None and now is not None and was != now:   # (None: a Dataset, not fingerprinted)
        raise ValueError(f"checkpoint {path} was written for other data (sha256 {was[:12]}... -> "
                         f"{now[:12]}...; the same images in another form count as other); pass "
                         "the data it was trained on, a new checkpoint path or resume=False")
    load_states(path, state, model, opt, ema_model)
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _validate(model, *, epochs, batch_size, lr, weight_decay, ema, T, augment, crop_scale,
              crop_ratio, warmup_steps, grad_clip, seed, progress, callback) -> dict:
    """ValueError naming the first bad argument, else the run's settings as a plain dict."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_number("epochs", epochs, 1, integer=True)
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("lr", lr, 0.0, lo_open=True)
    check_number("weight_decay", weight_decay, 0.0)
    if ema is not None:
        check_number("ema", ema, 0.0, 1.0, hi_open=True)
    check_number("T", T, 1, integer=True)
    if not isinstance(augment, bool):
        raise ValueError(f"augment must be True or False, got {augment!r}")
    for name, rng, lo in (("crop_scale", crop_scale, 0.0), ("crop_ratio", crop_ratio, 0.0)):
        if not (isinstance(rng, (tuple, list)) and len(rng) == 2):
            raise ValueError(f"{name} must be a (low, high) pair, got {rng!r}")
        check_number(f"{name}[0]", rng[0], lo, lo_open=True)
        check_number(f"{name}[1]", rng[1], rng[0], 1.0 if name == "crop_scale" else None)
    check_number("warmup_steps", warmup_steps, 0, integer=True)
    if grad_clip is not None:
        check_number("grad_clip", grad_clip, 0.0, lo_open=True)
    check_number("seed", seed, 0, integer=True)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    if callback is not None and not callable(callback):
        raise ValueError("callback must be callable or None")
    return {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
            "weight_decay": float(weight_decay), "ema": None if ema is None else float(ema),
            "T": int(T), "augment": augment, "crop_scale": [float(v) for v in crop_scale],
            "crop_ratio": [float(v) for v in crop_ratio], "warmup_steps": int(warmup_steps),
            "grad_clip": None if grad_clip is None else float(grad_clip), "seed": int(seed),
            "progress": progress}
