"""Training checkpoints of :func:`cdp_fast.train_trades` / :func:`cdp_fast.train_pgd_at`:
writing and verifying them (:func:`save_checkpoint`, :func:`load_checkpoint`, the sha256
of their contents :func:`state_digest`), the fingerprints of the data trained on
(:func:`data_fingerprint`), the configuration a resume must match
(:func:`checkpoint_config`) and the weights-only reader (:func:`read_weights_only`).

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

import hashlib
from pathlib import Path
from typing import Optional

import torch

from cdp_fast.robust.recipes import LEGACY_RECIPE, RunConfig
from cdp_fast.utils.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "read_weights_only", "state_digest",
           "data_fingerprint", "checkpoint_config"]

_CKPT_VERSION = 1


def save_checkpoint(path: Path, *, config, epoch, step, model, opt, ema_model, history,
                    data=None) -> None:
    """Everything a resume needs, written atomically (temp + fsync + rename:
    :func:`cdp_fast.utils.io.atomic_write`), with ``data`` (the inputs' fingerprints,
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
    # (checkpoints of earlier versions have no "recipe": load_checkpoint reads them as "zhang")
    config["recipe"] = run.recipe
    return config
