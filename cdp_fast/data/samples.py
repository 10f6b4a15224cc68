"""The lazy view of generated samples: :class:`Samples` (images, labels, confidences, the
manifest) loaded from an out directory of :func:`cdp_fast.sample` or an npz, and the
read-only array (:class:`LazyConcat`) that reads its shards on access, so a million images
are never all in RAM.

An out directory's shards are checked against the manifest's size and sha256 the first time
any of their members is read; only the shard names the sampler makes are opened.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cdp_fast.data.convert import MODEL_SPACE_LIMIT, check_image_values, images_to_float01
from cdp_fast.data.npz import npz_keys, read_member, shard_intact, write_npz
from cdp_fast.utils.checks import is_int

__all__ = ["Samples", "LazyConcat", "integer_labels"]

_SHARD_NAME = re.compile(r"shard-\d{6}\.npz")


class _ShardCheck:
    """Checks each shard of an out directory against its manifest record (size, sha256) the
    first time any of its members is read; shared by the image / label / confidence views."""

    def __init__(self, records: dict, enabled: bool):
        self.records, self.enabled, self.done = records, enabled, set()

    def __call__(self, path: str) -> None:
        if not self.enabled or path in self.done:
            return
        if not shard_intact(path, self.records[path]):
            raise ValueError(f"{path}: missing, truncated or corrupted (its sha256 does not match the manifest); "
                             "run the same cdp_fast.sample call again to regenerate it")
        self.done.add(path)


class LazyConcat:
    """Read-only array view over shard members, loaded on access (memory-mapped).

    Supports ``len``, ``shape``, ``dtype``, integer / slice / index-array ``[]`` and
    ``np.asarray`` (which materialises everything: avoid on a million images)."""

    def __init__(self, parts, key, check=None):
        self._parts = list(parts)  # [(path, count)]
        self._key = key
        self._check = check        # a _ShardCheck (out directories), or None
        self._cache = {}
        counts = [c for _, c in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first = self._get(0) if self._parts else None
        self.dtype = first.dtype if first is not None else np.dtype(np.uint8)
        tail = tuple(first.shape[1:]) if first is not None else ()
        self.shape = (int(self._starts[-1]),) + tail
        self.ndim = len(self.shape)

    def _get(self, j):
        arr = self._cache.get(j)
        if arr is None:
            path, count = self._parts[j]
            if self._check is not None:
                self._check(path)
            arr = read_member(path, self._key)
            if len(arr) != count:
                raise ValueError(f"{path}: holds {len(arr)} rows, manifest says {count}")
            self._cache[j] = arr
        return arr

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(idx)
            j = int(np.searchsorted(self._starts, i, side="right") - 1)
            return np.asarray(self._get(j)[i - self._starts[j]])
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1:
                out = []
                j = int(np.searchsorted(self._starts, start, side="right") - 1) if start < n else len(self._parts)
                pos = start
                while pos < stop and j < len(self._parts):
                    lo = pos - self._starts[j]
                    hi = min(stop, self._starts[j + 1]) - self._starts[j]
                    out.append(np.asarray(self._get(j)[lo:hi]))
                    pos = self._starts[j + 1]
                    j += 1
                if not out:
                    return np.empty((0,) + self.shape[1:], dtype=self.dtype)
                return np.concatenate(out)
            idx = np.arange(start, stop, step)
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError("index out of range")
        out = np.empty((idx.size,) + self.shape[1:], dtype=self.dtype)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for j in np.unique(shard):
            sel = shard == j
            out[sel] = self._get(int(j))[idx[sel] - self._starts[j]]
        return out.reshape(idx.shape + self.shape[1:])

    def __iter__(self):
        for j in range(len(self._parts)):
            yield from self._get(j)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr


def integer_labels(labels, what: str = "labels") -> np.ndarray:
    """``labels`` as int64 (N,): integer dtypes as they are; float labels only when every value
    is a whole number (3.0 -> 3; 8.7 is never truncated to 8). ValueError naming ``what`` for
    fractional, NaN / inf, non-numeric or not 1-D labels (one-hot (N, K) included)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{what} must be class indices of shape (N,), got shape {y.shape} "
                         "(one-hot labels: store labels.argmax(1))")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{what} must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise ValueError(f"{what} must be whole numbers, got {y[i]!r} at index {i} "
                             f"(dtype {y.dtype}); refusing to truncate")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- Samples
class Samples:
    """Generated samples: ``images``, ``labels`` (int64 or None), ``confidence`` (or None).

    ``images`` is uint8 NHWC (N, H, W, C) for ``output="uint8"`` (the on-disk layout), or
    float32 (N, *image_shape) in model space [-1, 1] for ``output="float"``. For a directory
    or a large npz the arrays are lazy (memory-mapped shards): indexing reads only what it
    needs, so a million images are never all in RAM.

    Examples:
        >>> s = Samples.load("gen/")              # an out directory of cdp_fast.sample
        >>> s.images[:16].shape                   # (16, 32, 32, 3), uint8
        >>> s.save_npz("cifar10_cdp.npz")         # keys image (uint8 NHWC), label (int64)
    """

    def __init__(self, images, labels=None, confidence=None, *, meta=None):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
        if confidence is not None and len(confidence) != len(images):
            raise ValueError(f"confidence has {len(confidence)} entries for {len(images)} images")
        self.images = images
        self.labels = labels
        self.confidence = confidence
        self.meta = dict(meta or {})

    def __len__(self):
        return len(self.images)

    def __repr__(self):
        lab = "none" if self.labels is None else "int64"
        return f"Samples(n={len(self)}, images={tuple(self.images.shape)} {self.images.dtype}, labels={lab})"

    # -- loading
    @classmethod
    def load(cls, path, *, verify: bool = True) -> "Samples":
        """An out directory of :func:`cdp_fast.sample` (its manifest lists the finished
        shards), or an npz with ``image``/``label`` (or ``arr_0``/``arr_1``) keys.

        For a directory, only shard names the sampler makes (``shard-NNNNNN.npz``, inside it)
        are accepted, and each shard is checked against the manifest's size and sha256 the
        first time it is read (``verify=False`` skips the hashing: faster, trusts the files);
        a missing, truncated or corrupted shard is a ValueError naming it. Labels and
        confidences are read on load, so every shard holding them is checked then."""
        path = Path(path)
        if path.is_dir():
            manifest_path = path / "manifest.json"
            if not manifest_path.exists():
                raise ValueError(f"path {path} has no manifest.json: not a cdp_fast out directory")
            try:
                manifest = json.loads(manifest_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{manifest_path}: not valid JSON ({e})") from None
            records = manifest.get("shards", {})
            bad = [name for name in records if not _SHARD_NAME.fullmatch(name)]
            if bad:
                raise ValueError(f"{manifest_path}: lists shard names the sampler never makes ({bad[0]!r}); "
                                 "refusing to read outside the directory")
            broken = [name for name, info in records.items()
                      if not (isinstance(info, dict) and is_int(info.get("start")) and is_int(info.get("count"))
                              and info["start"] >= 0 and info["count"] >= 0)]
            if broken:
                raise ValueError(f"{manifest_path}: the record of shard {broken[0]!r} lacks a valid start/count "
                                 "(a damaged or hand-edited manifest)")
            shards = sorted(records.items(), key=lambda kv: kv[1]["start"])
            if not manifest.get("complete", False):
                import warnings
                warnings.warn(f"{path}: the run is incomplete; loading the {len(shards)} finished shards")
            parts = [(str(path / name), int(info["count"])) for name, info in shards]
            if not parts:
                raise ValueError(f"path {path} holds no finished shard")
            check = _ShardCheck({str(path / name): info for name, info in shards}, verify)
            check(parts[0][0])
            keys = npz_keys(parts[0][0])
            images = LazyConcat(parts, "image", check)
            labels = np.asarray(LazyConcat(parts, "label", check)[:]) if "label" in keys else None
            conf = np.asarray(LazyConcat(parts, "confidence", check)[:]) if "confidence" in keys else None
            return cls(images, labels, conf, meta=manifest)
        if path.is_file():
            keys = npz_keys(path)
            if "image" in keys:
                ik, lk = "image", "label"
            elif "arr_0" in keys:
                if "label" in keys and "arr_1" in keys:
                    raise ValueError(f"path {path}: npz has both 'label' and 'arr_1'; which are the labels?")
                ik, lk = "arr_0", "label" if "label" in keys else "arr_1"
            else:
                raise ValueError(f"path {path}: npz has neither 'image' nor 'arr_0' (keys: {keys})")
            images = read_member(path, ik)
            labels = integer_labels(read_member(path, lk), f"{path}: {lk}") if lk in keys else None
            conf = np.asarray(read_member(path, "confidence")) if "confidence" in keys else None
            return cls(images, labels, conf, meta={"path": str(path)})
        raise ValueError(f"path {path} does not exist")

    # -- saving
    def save_npz(self, path) -> None:
        """Write ``image`` (as stored: uint8 NHWC for uint8 samples) and ``label`` (int64,
        when present) to one uncompressed npz, atomically, chunk by chunk (bounded memory)."""
        arrays = {"image": self.images if not isinstance(self.images, np.memmap) else self.images}
        if self.labels is not None:
            arrays["label"] = np.asarray(self.labels, dtype=np.int64)
        if self.confidence is not None:
            arrays["confidence"] = np.asarray(self.confidence, dtype=np.float32)
        write_npz(path, arrays)

    # -- access helpers
    def subset(self, indices) -> "Samples":
        idx = np.asarray(indices, dtype=np.int64)
        return Samples(np.asarray(self.images[idx]),
                       None if self.labels is None else np.asarray(self.labels)[idx],
                       None if self.confidence is None else np.asarray(self.confidence)[idx],
                       meta=self.meta)

    def to_tensor(self, indices=None):
        """Images as a float32 torch tensor NCHW in [0, 1] (uint8 NHWC input), or the float
        model-space images mapped from [-1, 1] to [0, 1] (3-D images) — the training format
        (:func:`images_to_float01`)."""
        arr = self.images[:] if indices is None else self.images[np.asarray(indices)]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):   # int64, bool, ...: never model space
                raise ValueError(f"Samples images must be uint8 (NHWC, 0..255) or float (model space "
                                 f"[-1, 1]), got dtype {arr.dtype}; convert 0..255 integers with "
                                 ".astype(np.uint8)")
            check_image_values(arr, "Samples images (float: model space [-1, 1])",
                               -MODEL_SPACE_LIMIT, MODEL_SPACE_LIMIT)
            return images_to_float01(arr.astype(np.float32, copy=False), model_space=True)
        if arr.ndim != 4:
            # Not a batch of NHWC images (one image, or grey (N, H, W)): this method has always
            # returned those scaled with their layout untouched.
            import torch

            return torch.from_numpy(arr.copy()).float().div_(255.0)
        return images_to_float01(arr)
