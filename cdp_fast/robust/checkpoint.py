"""Training checkpoints of :func:`cdp_fast.train_trades` / :func:`cdp_fast.train_pgd_at`:
writing and verifying them (:func:`save_checkpoint`, :func:`load_checkpoint`, the sha256
of their contents :func:`cdp_fast.utils.checkpoint.state_digest`), the fingerprints of the data trained on
(:func:`cdp_fast.utils.checkpoint.data_fingerprint`), the configuration a resume must match
(:func:`checkpoint_config`) and the weights-only reader
(:func:`cdp_fast.utils.checkpoint.read_weights_only`); the generic integrity parts live in
:mod:`cdp_fast.utils.checkpoint`, shared with :func:`cdp_fast.train_diffusion`.

Determinism and resume. Every random choice is a function of (``seed``, epoch) — the data
order — or (``seed``, update index) — crops, flips, attack starts — through dedicated
generators, never the global RNG. A ``checkpoint=`` path receives, after every epoch and
atomically (temp + fsync + rename), the model, EMA, optimizer state, epoch, update count,
history, RNG state and the run's configuration; calling again with the same arguments resumes
from it (``torch.load(weights_only=True)``) and on CPU ends at bitwise the same weights as an
uninterrupted run. A checkpoint written with different arguments is refused (ValueError).
The file also holds the sha256 of its contents (every tensor's bytes, in a fixed order) and
fingerprints of ``train_data`` and ``synthetic`` (an out directory: its manifest's shard
hashes and the labels, no image read; arrays and npz files: their bytes; a generic Dataset:
none): a corrupted checkpoint, or other data of the same size, is refused by name instead of
resuming from other weights or on other data. Checkpoints of earlier versions carry neither and
resume unchecked. Unreadable files (truncated, empty, not a torch file, pickled objects) and
labels outside the model's K outputs are ValueErrors too.
The learning rate is a pure function of the update index, so the "scheduler state" is that
index.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cdp_fast.robust.recipes import LEGACY_RECIPE, RunConfig
from cdp_fast.utils.checkpoint import (check_config, check_data, check_digest, load_states, read_weights_only,
                                      write_state)

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_config"]

_CKPT_VERSION = 1


def save_checkpoint(path: Path, *, config, epoch, step, model, opt, ema_model, history,
                    data=None) -> None:
    """Everything a resume needs, written atomically (temp + fsync + rename:
    :func:`cdp_fast.utils.checkpoint.write_state`), with ``data`` (the inputs' fingerprints,
    :func:`cdp_fast.utils.checkpoint.data_fingerprint`) and ``sha256``: the
    :func:`~cdp_fast.utils.checkpoint.state_digest` of all the rest, which :func:`load_checkpoint`
    recomputes (a flipped byte in a weight record loads without any
    error from torch, and would silently resume from other weights)."""
    state = {
        "version": _CKPT_VERSION, "config": config, "epoch": epoch, "step": step,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "ema": None if ema_model is None else ema_model.state_dict(),
        "history": history, "rng": {"torch": torch.get_rng_state()},
        "data": dict(data or {}),
    }
    write_state(path, state)


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
    check_digest(path, state)   # (checkpoints written before the hash carry none)
    if state.get("version") != _CKPT_VERSION:
        what = ("a model state_dict (the weights a finished run saves), not a training "
                "checkpoint" if state and all(isinstance(v, torch.Tensor) for v in state.values())
                else "an unknown format version")
        raise ValueError(f"checkpoint {path} has {what}; pass another checkpoint path or "
                         "resume=False")
    check_config(path, _comparable(state["config"]), _comparable(config))
    # A fingerprint missing on either side (checkpoints from before fingerprints, a Dataset
    # input, which is not fingerprinted) is not checked; the counts in the config still are.
    check_data(path, state.get("data"), data)
    load_states(path, state, model, opt, ema_model)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _comparable(config: dict) -> dict:
    """The part of a checkpoint configuration a resume must match: a missing ``recipe`` is the
    one every checkpoint before its introduction was trained with, and ``pad`` / ``flip`` do
    not matter without augmentation (their defaults now depend on the image size)."""
    config = dict(config)
    config.setdefault("recipe", LEGACY_RECIPE)
    if not config.get("augment", True):
        config.pop("pad", None)
        config.pop("flip", None)
    return config


def checkpoint_config(run: RunConfig, spe: int, real, syn) -> dict:
    """What a checkpoint must match to be resumed (a resume with other values is refused)."""
    config = {
        "kind": run.kind, "real_fraction": float(run.real_fraction), "epochs": run.epochs,
        "eps": float(run.eps), "step_size": float(run.step_size), "steps": run.steps,
        "beta": float(run.beta), "batch_size": run.batch_size,
        "ema": None if run.ema is None else float(run.ema), "lr": float(run.lr),
        "momentum": float(run.momentum), "weight_decay": float(run.weight_decay),
        "nesterov": bool(run.nesterov), "label_smoothing": float(run.label_smoothing),
        "augment": bool(run.augment), "pad": run.pad, "flip": bool(run.flip),
        "steps_per_epoch": spe, "warmup_epochs": run.warmup_epochs, "seed": run.seed,
        "n_real": len(real), "n_synthetic": 0 if syn is None else len(syn),
    }
    if run.sync_bn:   # (key absent otherwise: checkpoints of earlier versions still resume)
        config["sync_bn"] = True
    if run.norm != "linf":   # (likewise: L∞ checkpoints of earlier versions still resume)
        config["norm"] = run.norm
    # (checkpoints of earlier versions have no "recipe": load_checkpoint reads them as "zhang")
    config["recipe"] = run.recipe
    return config
