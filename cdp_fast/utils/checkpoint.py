"""Training-checkpoint integrity, shared by the trainers (:func:`cdp_fast.train_trades` /
:func:`cdp_fast.train_pgd_at` in :mod:`cdp_fast.robust.checkpoint`, :func:`cdp_fast.train_diffusion`
in :mod:`cdp_fast.diffusion.train`):

- :func:`write_state`: a checkpoint dict written atomically (temp + fsync + rename,
  :func:`cdp_fast.utils.io.atomic_write`) with ``sha256`` = :func:`state_digest` of the rest;
- :func:`read_weights_only`: ``torch.load(weights_only=True)`` with every failure (truncated,
  empty, not a torch file, pickled objects) as a one-line ValueError;
- :func:`read_weights` / :func:`write_weights`: a weights file by its suffix — ``.safetensors``
  (safetensors, no pickle at all) or anything else (torch, :func:`read_weights_only`);
- :func:`check_digest`, :func:`check_config`, :func:`check_data`: the refusals of a resume — a
  corrupted file (its stored sha256 differs from its contents'), other arguments (the
  configuration dicts differ, each difference named), other data (:func:`data_fingerprint`s
  differ, the input named);
- :func:`data_fingerprint`: the sha256 fingerprint of a training input.

Nothing here knows a trainer: the configuration dicts, the inputs' names and the format
versions are the callers'.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from cdp_fast.utils.io import atomic_write

__all__ = ["write_state", "read_weights_only", "read_weights", "write_weights", "is_safetensors", "check_digest",
           "check_config", "check_data", "load_states", "state_digest", "data_fingerprint"]


def write_state(path: Path, state: dict) -> None:
    """``state`` plus ``"sha256"`` (:func:`state_digest` of everything else), written
    atomically: a crash leaves the old checkpoint or none, and a flipped byte in a weight
    record (which loads without any error from torch) is caught by :func:`check_digest`."""
    state = dict(state)
    state.pop("sha256", None)
    state["sha256"] = state_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def check_digest(path, state: dict) -> None:
    """Pop ``state["sha256"]`` and ValueError naming ``path`` unless it is the digest of the
    rest. Checkpoints written before the hash existed carry none: they pass unchecked."""
    stored = state.pop("sha256", None)
    if stored is not None and stored != state_digest(state):
        raise ValueError(f"checkpoint {path} is corrupted: the sha256 of its contents does not "
                         "match the one stored in it (a damaged copy or disk); restore a good "
                         "copy, or delete it to train from the start")


def check_config(path, old: dict, new: dict) -> None:
    """ValueError naming ``path`` and every key whose value differs between the stored
    configuration ``old`` and this call's ``new`` (``key: old -> new``)."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint {path} was written with different arguments "
                         f"({details}); pass a new checkpoint path or resume=False")


def check_data(path, stored: Optional[dict], data: Optional[dict]) -> None:
    """ValueError naming ``path`` and the input when a fingerprint of this call (``data``:
    input name -> :func:`data_fingerprint`) differs from the stored one. A fingerprint missing
    on either side (checkpoints from before fingerprints, an input that is not fingerprinted,
    such as a generic Dataset) is not checked."""
    for name, fp in (data or {}).items():
        was = (stored or {}).get(name)
        if fp is not None and was is not None and fp != was:
            raise ValueError(f"checkpoint {path} was written for other {name} data (sha256 "
                             f"{was[:12]}... -> {fp[:12]}...; the same images in another form, "
                             f"e.g. an npz instead of the out directory, count as other); pass "
                             f"that {name}, a new checkpoint path or resume=False")


def load_states(path, state: dict, model, opt, ema_model) -> None:
    """Load a checkpoint's ``model`` / ``optimizer`` / ``ema`` states into their objects
    (``ema_model`` may be None); a state that does not fit is a ValueError naming the path."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"checkpoint {path} does not fit this model ({why[:300]}); pass "
                         "another checkpoint path or resume=False") from None


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


def is_safetensors(path) -> bool:
    """Whether ``path`` names a safetensors file (by its suffix, ``.safetensors``)."""
    return Path(path).suffix.lower() == ".safetensors"


def _safetensors_torch(what):
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError(f"{what} .safetensors files need the safetensors package: pip install "
                         "'cdp_fast[safetensors]'") from None
    return safetensors.torch


def read_weights(path, what: str, expected: str, map_location="cpu"):
    """A weights file by its suffix: ``.safetensors`` -> its tensors (dict name -> tensor, on
    ``map_location``); anything else -> :func:`read_weights_only`. Every failure is a one-line
    ValueError naming ``what`` and ``path`` (a missing file is FileNotFoundError, as there)."""
    if not is_safetensors(path):
        return read_weights_only(path, what, expected, map_location)
    st = _safetensors_torch(what)
    if not Path(path).exists():
        raise FileNotFoundError(path)
    try:
        return st.load_file(str(path), device=str(map_location))
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:      # safetensors' SafetensorError (header, size, dtype), OSError...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what} {path} is not {expected}: not a readable safetensors file ({msg[:200]})") from None


def write_weights(path, state: dict) -> None:
    """Write a state dict atomically (:func:`cdp_fast.utils.io.atomic_write`): ``.safetensors``
    by safetensors (tensors only; each copied to contiguous CPU memory, so tensors sharing
    storage are written apart), any other suffix by ``torch.save``."""
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"write_weights: a state dict of tensors only; {bad[:3]} are not tensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if is_safetensors(path):
        st = _safetensors_torch("write_weights:")
        data = st.save({k: v.clone() for k, v in tensors.items()})
        atomic_write(Path(path), lambda f: f.write(data))
    else:
        atomic_write(Path(path), lambda f: torch.save(tensors, f))


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
    image; one read lazily from several files (npz parts, a folder of per-class ``{k}.npy``:
    :mod:`cdp_fast.data.parts`) by each part's name and size, an npz part's per-member CRC32
    and sizes from its zip directory (content-covered) and a ``.npy`` part's first and last
    MiB (header included; the middle of a larger file is not covered: :func:`_parts_digest`),
    and its labels, also without reading the images (~2 MiB read a part); in-memory tensors /
    arrays and a single npz file by their bytes (dtype, shape, data)."""
    if data is None:
        return None
    h = hashlib.sha256()
    if hasattr(data, "images") and hasattr(data, "labels"):   # cdp_fast.Samples
        shards, parts = _manifest_shards(data), _lazy_parts(data)
        if shards is not None:
            h.update(b"manifest;")
            for name, info in shards:
                text = f"{name}:{int(info['count'])}:{info['sha256']}"
                h.update(f"{len(text)};{text}".encode())
        elif parts is not None:
            h.update(f"parts{len(parts)};".encode())
            for p in parts:
                _parts_digest(h, p)
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


def _lazy_parts(samples):
    """The part paths of a Samples loaded from several files (``meta["parts"]``), when its
    images are still the lazy view of exactly those files (``images.paths``), else None."""
    import numpy as np

    parts = samples.meta.get("parts") if isinstance(samples.meta, dict) else None
    paths = getattr(samples.images, "paths", None)
    if (not isinstance(parts, list) or not parts or isinstance(samples.images, (np.ndarray, torch.Tensor))
            or not isinstance(paths, list) or [str(p) for p in parts] != [str(p) for p in paths]):
        return None
    return [str(p) for p in parts]


_END = 1 << 20   # bytes hashed at each end of a .npy part


def _parts_digest(h, path) -> None:
    """Fingerprint one part file into ``h`` without reading its images. Covered:

    - always: the file's name (not its folder: a moved set is the same set) and size;
    - a zip (npz): every member's name, CRC32, size, compressed size and compression, from
      the zip's central directory (``zipfile.ZipFile.infolist``; the end of the file only).
      The CRC32 is of the member's content, so any content rewritten by a zip writer
      (``np.savez``, :func:`cdp_fast.data.write_npz`) is seen; a byte patched in place
      without updating the CRC (not a zip write) is not;
    - anything else (``.npy``): sha256 of the first and the last MiB (the header with dtype
      and shape included; a file up to 2 MiB is covered whole). An in-place edit that keeps
      the size and lies outside those two MiB is NOT seen.
    Cost: a directory read per npz part, 2 MiB per ``.npy`` part."""
    import os
    import zipfile

    size = os.path.getsize(path)
    head = f"{os.path.basename(path)}:{size}"
    h.update(f"P{len(head)};{head}".encode())
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":   # not a zip
            f.seek(0)
            h.update(b"F" + hashlib.sha256(f.read(_END)).digest())
            if size > _END:
                f.seek(max(_END, size - _END))
                h.update(hashlib.sha256(f.read(_END)).digest())
            return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a readable npz ({e}); the file is truncated or corrupted") from None
    h.update(f"Z{len(infos)};".encode())
    for i in infos:
        text = f"{i.filename}:{i.CRC}:{i.file_size}:{i.compress_size}:{i.compress_type}"
        h.update(f"{len(text)};{text}".encode())


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
