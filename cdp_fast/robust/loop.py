"""The training loop's parts behind :func:`cdp_fast.train_trades` / :func:`cdp_fast.train_pgd_at`:
the two recipes, objectives, schedules, the run's configuration, optimizer, checkpoint files,
DDP wrapping and one epoch. :mod:`cdp_fast.robust.train` puts them together top-down and documents
the recipes, the determinism and the distributed semantics they implement. (Over 400 lines:
the pieces of one loop — recipes, checkpoint files with their hash and data fingerprints, DDP,
one epoch — each small, kept beside each other.)
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cdp_fast.robust.attacks import pgd_from_draws, trades_from_draws, trades_from_noise
from cdp_fast.robust.batches import MixedBatchSampler, apply_augment, augment_draws, step_seed
from cdp_fast.data import atomic_write

__all__ = ["Recipe", "RECIPES", "trades_loss", "pgd_at_loss", "ema_decay", "cosine_lr",
           "RunConfig", "make_optimizer", "save_checkpoint", "load_checkpoint", "read_weights_only",
           "state_digest", "data_fingerprint", "check_labels", "wrap_model",
           "broadcast_state", "Loop", "run_epoch", "epoch_entry"]

_CKPT_VERSION = 1


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """What a ``recipe=`` name sets (:mod:`cdp_fast.robust.train` documents the sources).

    trades_start: the TRADES attack's start, "uniform" (clip(x + U(−ε, ε), 0, 1)) or "normal"
        (x + 0.001·N(0, I)); PGD-AT starts uniformly in both recipes.
    trades_mode: the model's mode during the TRADES attack, "train" (batch statistics, running
        statistics frozen) or "eval"; PGD-AT attacks in eval mode in both recipes.
    label_smoothing: the default ``label_smoothing`` per objective ("trades": on the clean CE,
        "pgd_at": on the adversarial CE) when the caller passes None.
    ema_warmup: fraction of the run's updates during which the EMA is an exact copy of the
        model; the decay ramp (1 + δ)/(10 + δ) starts after it (δ = updates − warm-up).
    ema_buffers: "copy" (the model's buffers — BatchNorm statistics — copied into the EMA model
        at the end of every epoch; only parameters are averaged) or "average" (buffers averaged
        like the parameters, integer buffers copied after every update).
    """
    trades_start: str
    trades_mode: str
    label_smoothing: dict
    ema_warmup: float
    ema_buffers: str


RECIPES = {
    "gowal": Recipe(trades_start="uniform", trades_mode="train",
                    label_smoothing={"trades": 0.1, "pgd_at": 0.0}, ema_warmup=0.025,
                    ema_buffers="copy"),
    "zhang": Recipe(trades_start="normal", trades_mode="eval",
                    label_smoothing={"trades": 0.0, "pgd_at": 0.0}, ema_warmup=0.0,
                    ema_buffers="average"),
}
# Checkpoints written before ``recipe`` existed were trained with today's "zhang" behaviour.
_LEGACY_RECIPE = "zhang"


# --------------------------------------------------------------------------- objectives
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
def ema_decay(ema: float, k: int, warmup: float = 0.0) -> float:
    """EMA decay after the k-th update (k >= 1): 0 (the EMA becomes a copy of the model) while
    k < ``warmup``, then min(ema, (1 + δ) / (10 + δ)) with δ = k − warmup
    (``gowal21uncovering/utils/watrain.py``: ``ema_update(..., warmup_steps,
    dynamic_decay=True)``, warmup_steps = 0.025 · the run's updates). With warmup = 0 this is
    min(ema, (1 + k) / (10 + k)) from the first update (the "zhang" recipe)."""
    if k < warmup:
        return 0.0
    delta = k - warmup
    return min(float(ema), (1.0 + delta) / (10.0 + delta))


def cosine_lr(lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up over ``warmup`` updates, then
    ``lr · ½(1 + cos(π · (step − warmup) / (total − warmup)))``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


# --------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class RunConfig:
    """A run's arguments after validation (the integer ones as ints; :mod:`cdp_fast.robust.train`
    validates them): its configuration, read by every part below."""
    kind: str
    real_fraction: float
    epochs: int
    eps: float
    step_size: float
    steps: int
    beta: float
    batch_size: int
    ema: Optional[float]
    progress: bool
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    label_smoothing: float
    augment: bool
    pad: int
    flip: bool
    steps_per_epoch: Optional[int]
    warmup_epochs: int
    seed: int
    amp: Any
    compile: Any
    sync_bn: bool
    recipe: str = "gowal"


def make_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.SGD:
    """SGD, weight decay on every parameter except the normalisation layers' (DM-Improves-AT's
    ``group_weight``)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                  nn.modules.instancenorm._InstanceNorm)
    no_decay = set()
    for m in model.modules():
        if isinstance(m, norm_types):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": run.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum, nesterov=bool(run.nesterov))


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, *, config, epoch, step, model, opt, ema_model, history,
                    data=None) -> None:
    """Everything a resume needs, written atomically (temp + fsync + rename:
    :func:`cdp_fast.data.atomic_write`), with ``data`` (the inputs' fingerprints,
    :func:`data_fingerprint`) and ``sha256``: :func:`state_digest` of all the rest, which
    :func:`load_checkpoint` recomputes (a flipped byte in a weight record loads without any
    error from torch, and would silently resume from other weights)."""
    state = {
        "version": _CKPT_VERSION, "config": config, "epoch": epoch, "step": step,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "ema": None if ema_model is None else ema_model.state_dict(),
        "history": history, "rng": {"torch": torch.get_rng_state()},
        "data": dict(data or {}),
    }
    state["sha256"] = state_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, dev, config, model, opt, ema_model,
                    data=None) -> tuple[int, int, list]:
    """Restore model, optimizer, EMA and RNG from ``path`` in place; (epoch, update, history).

    ValueError naming ``path`` if it cannot be read (truncated, empty, not a torch file,
    pickled objects), is not a training checkpoint, is corrupted (its stored sha256 differs
    from its contents'), was written by another format version, with other arguments, for
    other data (``data``: this call's fingerprints, compared with the stored ones per input,
    the message naming ``train_data`` / ``synthetic``) or for another model. Every rank of a
    distributed run calls this, so every rank verifies what it loads."""
    state = read_weights_only(path, "checkpoint", "a training checkpoint written by "
                              "cdp_fast.train_trades / train_pgd_at", map_location=dev)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a training "
                         "checkpoint (a dict written by cdp_fast.train_trades / train_pgd_at); "
                         "pass another checkpoint path or resume=False")
    # Checkpoints written before the hash existed carry none: they load unchecked, as before.
    stored = state.pop("sha256", None)
    if stored is not None and stored != state_digest(state):
        raise ValueError(f"checkpoint {path} is corrupted: the sha256 of its contents does not "
                         "match the one stored in it (a damaged copy or disk); restore a good "
                         "copy, or delete it to train from the start")
    if state.get("version") != _CKPT_VERSION:
        what = ("a model state_dict (the weights a finished run saves), not a training "
                "checkpoint" if state and all(isinstance(v, torch.Tensor) for v in state.values())
                else "an unknown format version")
        raise ValueError(f"checkpoint {path} has {what}; pass another checkpoint path or "
                         "resume=False")
    old, new = _comparable(state["config"]), _comparable(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint {path} was written with different arguments "
                         f"({details}); pass a new checkpoint path or resume=False")
    # A fingerprint missing on either side (checkpoints from before fingerprints, a Dataset
    # input, which is not fingerprinted) is not checked; the counts in the config still are.
    for name, fp in (data or {}).items():
        was = state.get("data", {}).get(name)
        if fp is not None and was is not None and fp != was:
            raise ValueError(f"checkpoint {path} was written for other {name} data (sha256 "
                             f"{was[:12]}... -> {fp[:12]}...; the same images in another form, "
                             f"e.g. an npz instead of the out directory, count as other); pass "
                             f"that {name}, a new checkpoint path or resume=False")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"checkpoint {path} does not fit this model ({why[:300]}); pass "
                         "another checkpoint path or resume=False") from None
    torch.set_rng_state(state["rng"]["torch"].cpu())
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def read_weights_only(path, what: str, expected: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with every failure as a one-line ValueError
    naming ``what`` and ``path``: truncated, empty or non-torch files (torch raises
    RuntimeError, EOFError, KeyError... depending on the damage) and files holding pickled
    objects that the weights-only unpickler refuses. The latter's message is not repeated:
    torch's advice to load with ``weights_only=False`` would run the file's code."""
    import pickle
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            # (a plain pickle of another protocol: torch warns before refusing it)
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:   # only the object's name: torch's text goes on to advise allow-listing it
            raise ValueError(f"{what} {path} is not {expected}: it holds pickled Python objects "
                             f"({found.group(1)}) that a weights-only load refuses") from None
        # text, garbage or a pickle of another protocol: torch reads the first bytes as opcodes
        op = re.search(r"(Unsupported operand \d+|invalid load key[^.\n]*)", str(e))
        raise ValueError(f"{what} {path} is not {expected}: {_UNREADABLE} "
                         f"{op.group(1) if op else 'UnpicklingError'})") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise    # the path or the machine, not the file's bytes (a truncated zip is EINVAL: below)
    except Exception as e:   # anything else torch.load raises means an unreadable file
        raise ValueError(f"{what} {path} is not {expected}: {_UNREADABLE} "
                         f"{type(e).__name__})") from None


_UNREADABLE = "it cannot be read (empty, truncated, corrupted or not a torch file:"


def state_digest(obj) -> str:
    """sha256 of a checkpoint state: every tensor's dtype, shape and bytes and every other
    value (dicts in their order, which torch.save / torch.load keep), each length-prefixed."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _digest_into(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _digest_into(h, k)
            _digest_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _digest_into(h, v)
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:   # str, int, bool, None (what configs, histories and param groups hold)
        text = f"{type(obj).__name__}:{obj!r}"
        h.update(f"O{len(text)};{text}".encode())


def data_fingerprint(data) -> Optional[str]:
    """sha256 fingerprint of a training input (a form :func:`cdp_fast.data.as_source` takes;
    paths already loaded as :class:`cdp_fast.Samples`), stored in the checkpoint so that a
    resume with other data of the same size is refused; None for a generic Dataset (reading
    every item could take as long as an epoch, and random transforms have no fixed content:
    only its length is checked).

    A Samples read lazily from an out directory of :func:`cdp_fast.sample` is fingerprinted
    by its manifest's shard hashes (names, counts, sha256) and its labels, without reading an
    image; in-memory tensors / arrays and npz files by their bytes (dtype, shape, data)."""
    if data is None:
        return None
    h = hashlib.sha256()
    if hasattr(data, "images") and hasattr(data, "labels"):   # cdp_fast.Samples
        shards = _manifest_shards(data)
        if shards is not None:
            h.update(b"manifest;")
            for name, info in shards:
                text = f"{name}:{int(info['count'])}:{info['sha256']}"
                h.update(f"{len(text)};{text}".encode())
        else:
            _hash_array(h, data.images)
        _hash_array(h, data.labels)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        _hash_array(h, data[0])
        _hash_array(h, data[1])
    elif isinstance(data, torch.utils.data.TensorDataset):
        for t in data.tensors:
            _hash_array(h, t)
    else:
        return None
    return h.hexdigest()


def _manifest_shards(samples):
    """[(name, info)] of the manifest a Samples was loaded with, when its images are still the
    lazy view of exactly those shards (not an in-memory subset carrying the manifest along)."""
    import numpy as np

    shards = samples.meta.get("shards") if isinstance(samples.meta, dict) else None
    if (not isinstance(shards, dict) or not shards
            or isinstance(samples.images, (np.ndarray, torch.Tensor))
            or any(not isinstance(i, dict) or not isinstance(i.get("sha256"), str)
                   for i in shards.values())
            or sum(int(i.get("count", -1)) for i in shards.values()) != len(samples)):
        return None
    return sorted(shards.items(), key=lambda kv: int(kv[1].get("start", 0)))


def _hash_array(h, a, chunk: int = 4096) -> None:
    """dtype, shape and bytes of a tensor, an array (a memory-mapped npz member is read
    through its mapping, never copied whole) or a lazy array view (read ``chunk`` rows at a
    time)."""
    import numpy as np

    if a is None:
        h.update(b"N;")
        return
    if isinstance(a, torch.Tensor):
        _digest_into(h, a)
        return
    if not isinstance(a, np.ndarray) and hasattr(a, "shape") and hasattr(a, "dtype"):
        h.update(f"A{np.dtype(a.dtype).str}{tuple(a.shape)};".encode())
        for s in range(0, len(a), chunk):
            h.update(np.ascontiguousarray(a[s:s + chunk]).view(np.uint8))
        return
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"A{a.dtype.str}{a.shape};".encode())
    if a.size:
        h.update(a.reshape(-1).view(np.uint8))


def _comparable(config: dict) -> dict:
    """The part of a checkpoint configuration a resume must match: a missing ``recipe`` is the
    one every checkpoint before its introduction was trained with, and ``pad`` / ``flip`` do
    not matter without augmentation (their defaults now depend on the image size)."""
    config = dict(config)
    config.setdefault("recipe", _LEGACY_RECIPE)
    if not config.get("augment", True):
        config.pop("pad", None)
        config.pop("flip", None)
    return config


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
            if recipe.trades_start == "uniform":
                u = torch.rand(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
                x_adv = trades_from_draws(loop.attack_fwd, x, u, eps=run.eps,
                                          step_size=run.step_size, steps=run.steps,
                                          mode=recipe.trades_mode)
            else:
                noise = torch.randn(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
                x_adv = trades_from_noise(loop.attack_fwd, x, noise, eps=run.eps,
                                          step_size=run.step_size, steps=run.steps,
                                          mode=recipe.trades_mode)
            logits_nat = loop.fwd(x)
            logits_adv = loop.fwd(x_adv)
            loss = trades_loss(logits_nat, logits_adv, y, beta=run.beta,
                               label_smoothing=run.label_smoothing)
        else:
            u = torch.rand(global_shape, generator=gen, device=dev, dtype=x.dtype)[rows]
            x_adv = pgd_from_draws(loop.attack_fwd, x, y, u, eps=run.eps,
                                   step_size=run.step_size, steps=run.steps)
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
