"""CIFAR-10 from a local folder (:func:`load_cifar10`); nothing is downloaded and nothing is
unpickled beyond numpy arrays: the binary batches are read as raw records, the python batches
by a restricted unpickler.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["load_cifar10"]


def load_cifar10(root, train: bool = True):
    """CIFAR-10 from a local folder; nothing is downloaded.

    Accepts the binary version (``cifar-10-batches-bin/data_batch_{1..5}.bin``,
    ``test_batch.bin``: records of 1 label byte + 3072 pixel bytes, read without any
    unpickling) or the python version (``cifar-10-batches-py/data_batch_{1..5}``,
    ``test_batch``, parsed by a restricted unpickler that admits only numpy arrays).

    Returns (x float32 (N, 3, 32, 32) in [0, 1], y int64 (N,)).
    """
    import torch

    root = Path(root)
    for sub in ("cifar-10-batches-bin", "cifar-10-batches-py"):
        if (root / sub).is_dir():
            root = root / sub
            break
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        if (root / f"{name}.bin").exists():
            raw = np.fromfile(root / f"{name}.bin", dtype=np.uint8)
            if raw.size % 3073:
                raise ValueError(f"root {root}: {name}.bin is not a whole number of 3073-byte records")
            raw = raw.reshape(-1, 3073)
            data, labels = raw[:, 1:], raw[:, 0].astype(np.int64)
        elif (root / name).exists():
            data, labels = _read_cifar_batch(root / name)
        else:
            raise ValueError(f"root {root}: missing CIFAR-10 file {name} (or {name}.bin)")
        xs.append(data)
        ys.append(labels)
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    y = np.concatenate(ys).astype(np.int64)
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y)


def _read_cifar_batch(path):
    """Parse one CIFAR-10 python batch (a pickle of a dict of bytes keys) with a restricted
    unpickler that only admits numpy arrays, lists, ints and bytes — no arbitrary code."""
    import pickle

    class _Restricted(pickle.Unpickler):
        _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                    ("numpy._core.multiarray", "scalar")}

        def find_class(self, module, name):
            if (module, name) in self._ALLOWED:
                import importlib
                return getattr(importlib.import_module(module), name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")

    try:
        with open(path, "rb") as f:
            d = _Restricted(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:   # our refusal, or a damaged pickle stream
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({str(e).splitlines()[0]})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError) as e:   # what pickle raises on truncated or garbled input
        raise ValueError(f"{path}: not a CIFAR-10 python batch (unreadable pickle: "
                         f"{type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (holds a {type(d).__name__}, not a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: not a CIFAR-10 batch (no data/labels)")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise ValueError(f"{path}: not a CIFAR-10 batch (data {data.shape}, labels {labels.shape}; "
                         "expected (N, 3072) and (N,))")
    return data.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)
