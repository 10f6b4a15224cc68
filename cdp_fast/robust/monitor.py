"""What a training run of :func:`cdp_fast.train_trades` / :func:`cdp_fast.train_pgd_at` shows of
itself besides ``callback=``: a held-out split of the real training data (``holdout=``),
evaluated every ``eval_every`` epochs with :func:`cdp_fast.evaluate` (clean and PGD-20
accuracy at the run's ε and norm, step ε/4, seeded by the run's seed), and a per-epoch log in
``log_dir=``: ``metrics.csv`` (:data:`LOG_COLUMNS`, one row per finished epoch) and, when
``torch.utils.tensorboard`` and the ``tensorboard`` package import, TensorBoard scalars
(``train/<column>``, ``holdout/<column>``; none otherwise, silently).

The split (:func:`holdout_split`) is drawn from ``train_data`` only — never ``synthetic``, and
the test set never reaches training — as the ``k`` items with the smallest splitmix64 hash of
(seed, index): a function of (seed, N, k) alone, the same in every numpy / torch version and
process count, disjoint from the items trained on (they are removed from the run: ``len`` of
the real data and the updates per epoch shrink). The held-out images are read once into
memory (float32). ``k`` is part of a checkpoint's configuration: a resume with another split
is refused.

Resume: the numbers of evaluated epochs live in the run's history (``model.history``, the
checkpoint), and the CSV is rewritten from the history after every epoch (atomically), so a
resumed run's log holds each epoch once, as the checkpoint has it; TensorBoard events
written after the checkpoint a run resumes from are hidden by ``purge_step``. Evaluation
does not change the training: the evaluated model (the EMA's when ``ema`` is set, else the
model) is run in eval mode without gradients to its weights, on its own random draws.
Under torch.distributed every rank evaluates its share of the split (:func:`cdp_fast.evaluate`
all-reduces the counts) and rank 0 writes the log.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from cdp_fast.data import BatchSource
from cdp_fast.utils.checks import check_number, is_int

__all__ = ["LOG_COLUMNS", "LOG_NAME", "holdout_split", "Monitor"]

#: metrics.csv's first columns (other keys of the history entries follow, sorted)
LOG_COLUMNS = ("epoch", "loss", "train_clean_acc", "train_adv_acc", "lr", "updates", "time_s", "images_per_s",
               "holdout_clean_acc", "holdout_pgd_acc", "holdout_time_s")
LOG_NAME = "metrics.csv"
_TAG = np.uint64(0x686F6C646F7574)     # "holdout": this split's stream of the seed
_M64 = (1 << 64) - 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic): a fixed bijective hash."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_split(n: int, holdout, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held, kept): sorted int64 indices into ``n`` training items, disjoint, together 0..n-1.

    Args:
        n: number of items (>= 2).
        holdout: a fraction in (0, 1) (k = round(holdout · n)) or a count k >= 1; k must leave
            at least one item to train on.
        seed: the run's seed; the k items are those with the smallest splitmix64(seed, index).
    Raises:
        ValueError naming ``holdout`` when it is of another kind or k is 0 or >= n.
    """
    _check_holdout(holdout)
    k = int(round(holdout * n)) if isinstance(holdout, float) else int(holdout)
    if k < 1 or k >= n:
        what = f"holdout={holdout!r} of {n} training items"
        raise ValueError(f"{what} holds no item: give a count, or a larger fraction" if k < 1 else
                         f"{what} leaves nothing to train on")
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([int(seed) & _M64], dtype=np.uint64) ^ _TAG)[0]
        keys = _splitmix64(np.arange(n, dtype=np.uint64) + base)
    held = np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return held, np.flatnonzero(mask).astype(np.int64)


def _check_holdout(holdout) -> None:
    """ValueError unless ``holdout`` is None, a fraction in (0, 1) or an int count >= 1."""
    if holdout is None:
        return
    if isinstance(holdout, float):
        check_number("holdout (a fraction)", holdout, 0.0, 1.0, lo_open=True, hi_open=True)
    elif is_int(holdout) and not isinstance(holdout, bool):
        check_number("holdout (a count)", holdout, 1, integer=True)
    else:
        raise ValueError(f"holdout must be None, a fraction in (0, 1) or a count >= 1, got {holdout!r}")


class Monitor:
    """One run's holdout, its evaluation and its log (set up by :mod:`cdp_fast.robust.train`).

    Args: ``holdout`` (None, a fraction or a count: :func:`holdout_split`), ``eval_every``
    (None: 1 with a holdout; an int >= 1; ValueError without a holdout), ``log_dir`` (None or
    a folder, made in an existing folder). Checked here, before any work.
    """

    def __init__(self, holdout=None, eval_every=None, log_dir=None):
        _check_holdout(holdout)
        if eval_every is not None:
            if holdout is None:
                raise ValueError("eval_every needs holdout= (the held-out split it evaluates)")
            check_number("eval_every", eval_every, 1, integer=True)
        if log_dir is not None:
            if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir).strip():
                raise ValueError(f"log_dir must be a folder path, got {log_dir!r}")
            p = Path(log_dir)
            if p.exists() and not p.is_dir():
                raise ValueError(f"log_dir: {log_dir} is a file, not a folder")
            if not p.exists() and not p.resolve().parent.is_dir():
                raise ValueError(f"log_dir: cannot make {log_dir}: the folder {p.resolve().parent} does not exist")
        self.holdout, self.log_dir = holdout, None if log_dir is None else Path(log_dir)
        self.eval_every = None if holdout is None else int(eval_every or 1)
        self.x = self.y = None
        self._writer, self._logged = None, 0

    def split(self, real, seed: int):
        """``real`` (a :class:`cdp_fast.data.BatchSource`) without the held-out items, which are
        read into ``self.x`` (k, C, H, W) float32 in [0, 1] and ``self.y`` (k,) int64."""
        if self.holdout is None:
            return real
        held, kept = holdout_split(len(real), self.holdout, seed)
        self.x, self.y = real.get(held)
        return BatchSource(lambda idx: real.get(kept[idx]), len(kept), real.image_shape, real.what)

    def config(self) -> dict:
        """The checkpoint configuration entries of the split ({} without one)."""
        return {} if self.holdout is None else {"holdout": len(self.y)}

    def start(self, start_epoch: int, rank: int) -> None:
        """Before the first epoch of this call (``start_epoch`` epochs already done)."""
        self._logged = start_epoch
        if self.log_dir is None or rank != 0:
            return
        self.log_dir.mkdir(exist_ok=True)
        if start_epoch == 0 and (self.log_dir / LOG_NAME).exists():
            warnings.warn(f"log_dir: replacing {self.log_dir / LOG_NAME} of an earlier run (this run starts at "
                          "epoch 1)")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:   # tensorboard not installed: the CSV only
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_epoch + 1)

    def evaluate(self, entry: dict, epochs: int, model, *, eps: float, seed: int, batch_size: int,
                 device=None, norm: str = "linf") -> None:
        """Clean and PGD accuracy on the split into ``entry`` (``holdout_*`` keys) when its
        epoch is a multiple of ``eval_every`` or the last one; nothing otherwise."""
        epoch = entry["epoch"]
        if self.holdout is None or (epoch % self.eval_every and epoch != epochs):
            return
        from cdp_fast.robust.evaluation import evaluate

        t0 = time.perf_counter()
        res = evaluate(model, self.x, self.y, eps=eps, attacks=("clean", "pgd"), seed=seed, batch_size=batch_size,
                       device=device, norm=norm)
        entry.update(holdout_clean_acc=res["clean"], holdout_pgd_acc=res["pgd"],
                     holdout_time_s=time.perf_counter() - t0)

    def write(self, history: list, rank: int) -> None:
        """metrics.csv rewritten from ``history`` and its new entries to TensorBoard (rank 0)."""
        if self.log_dir is None or rank != 0:
            return
        from cdp_fast.utils.io import atomic_write_bytes

        extra = sorted({k for e in history for k in e} - set(LOG_COLUMNS))
        cols = list(LOG_COLUMNS) + extra
        lines = [",".join(cols)] + [",".join(_cell(e.get(c)) for c in cols) for e in history]
        atomic_write_bytes(self.log_dir / LOG_NAME, ("\n".join(lines) + "\n").encode())
        if self._writer is not None:
            for e in history:
                if e["epoch"] <= self._logged:
                    continue
                for k, v in e.items():
                    if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                        group = "holdout" if k.startswith("holdout_") else "train"
                        self._writer.add_scalar(f"{group}/{k.removeprefix('holdout_')}", v, e["epoch"])
            self._writer.flush()
        self._logged = max([self._logged] + [e["epoch"] for e in history])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _cell(v) -> str:
    """A CSV cell: floats in full (repr), missing values empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)
