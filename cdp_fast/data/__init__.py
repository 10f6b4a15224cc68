"""Image data at rest and on its way into a classifier: npz shards, the manifest, the lazy
:class:`Samples` view, the one image conversion (:func:`images_to_float01`) and the one input
adapter of training (:func:`as_source`).

(Over 400 lines: storage, its lazy view and the adapters reading from that view share the
layout conventions below, and splitting them would scatter those conventions.)

Formats (DESIGN.md §6):
  - ``shard-000123.npz``: keys ``image`` (uint8 NHWC for ``output="uint8"``, else float32
    (count, *image_shape)), ``index`` (int64 sample indices), and ``label`` (int64) /
    ``confidence`` (float32) when labels exist. Members are stored uncompressed with a fixed
    zip timestamp, so the same arrays always give the same bytes (resume is checked
    byte-for-byte) and a member can be memory-mapped in place.
  - ``manifest.json``: arguments, counts, seeds and each finished shard's sha256.
  - An npz written by :meth:`Samples.save_npz` has keys ``image`` (uint8 NHWC) and ``label``
    (int64): what DM-Improves-AT and adversarial_robustness_pytorch read.

Every file is written atomically: temp name in the same directory, fsync, rename, fsync of
the directory. Nothing is unpickled: ``np.load(..., allow_pickle=False)`` throughout.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from cdp_fast.utils.checks import is_int

if TYPE_CHECKING:   # torch is imported where it is used: storage alone never loads it
    import torch

__all__ = [
    "Samples", "shard_intact", "write_npz", "atomic_write", "atomic_write_bytes", "atomic_write_json", "sha256_file",
    "to_uint8_nhwc", "images_to_float01", "as_source", "load_cifar10",
]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0o666 minus the process umask: what open() would give (mkstemp gives 0o600)."""
    global _MODE
    if _MODE is None:
        mask = os.umask(0)
        os.umask(mask)
        _MODE = 0o666 & ~mask
    return _MODE


_MODE = None


def _atomic_write(path, write_fn) -> None:
    """Call ``write_fn(fileobj)`` on a temp file next to ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write(path, write_fn) -> None:
    """Atomically create ``path`` from ``write_fn(binary_file)``: temp name in the same
    directory, fsync, rename, fsync of the directory. A crash leaves the old file or none."""
    _atomic_write(path, write_fn)


def atomic_write_bytes(path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- npz
def _write_npz_to(fileobj, arrays) -> None:
    with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                if isinstance(value, np.ndarray) or np.isscalar(value):
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
                else:  # a lazy array: header, then the data chunk by chunk (bounded memory)
                    _write_lazy_array(member, value)


def _write_lazy_array(member, arr, chunk: int = 4096) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(arr.dtype)),
              "fortran_order": False, "shape": tuple(arr.shape)}
    np.lib.format.write_array_header_2_0(member, header)
    for s in range(0, len(arr), chunk):
        member.write(np.ascontiguousarray(arr[s:s + chunk]).tobytes())


def write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) as an uncompressed npz, deterministically and atomically."""
    _atomic_write(path, lambda f: _write_npz_to(f, arrays))


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    _write_npz_to(buf, arrays)
    return buf.getvalue()


def _open_zip(path):
    """The npz at ``path`` as a ZipFile; a truncated or non-zip file is a ValueError naming it."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable npz ({e}); the file is truncated or corrupted") from None


def _npz_member(path, key, mmap: bool = True):
    """Array ``key`` of the npz at ``path``: memory-mapped when the member is stored
    uncompressed (no copy), else read whole. Raises KeyError if absent."""
    with _open_zip(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            raise KeyError(key) from None
        if mmap and info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"{path}: corrupt zip member {key}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype.hasobject:
                    raise ValueError(f"{path}: member {key} holds Python objects; refusing to unpickle")
                offset = f.tell()
            if int(np.prod(shape)) == 0:
                return np.empty(shape, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def _npz_keys(path):
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def shard_intact(path, info: dict) -> bool:
    """Whether the file at ``path`` is the shard its manifest record ``info`` describes: it
    exists, has ``info["bytes"]`` bytes and the sha256 ``info["sha256"]``."""
    f = Path(path)
    return f.is_file() and f.stat().st_size == info.get("bytes") and sha256_file(f) == info.get("sha256")


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


# ----------------------------------------------------------------------------- conversions
def images_to_float01(arr, name: str = "images", *, model_space: bool = False):
    """Images as the float NCHW tensor in [0, 1] that classifiers take (the one conversion).

    - uint8 (N, H, W, C), or grey (N, H, W) -> float32 (N, C, H, W) = value / 255, contiguous;
    - float (N, C, H, W) in [0, 1] passes through (same dtype, device and storage);
    - float with ``model_space=True``: images in model space [-1, 1] (a :class:`Samples` of
      ``output="float"``) -> float32 ``((x + 1) · ½).clamp(0, 1)``, any shape.

    ``arr`` is a torch tensor or anything ``np.asarray`` takes (a memory-mapped shard view
    included; read-only arrays are copied, never written). uint8 NCHW input (last dim not 1
    or 3 while dim 1 is) is refused; other range and layout checks are the caller's. Raises
    ValueError naming ``name`` for other dtypes, ranks or that layout.
    """
    import torch

    if isinstance(arr, torch.Tensor):
        t = arr
    else:
        a = np.asarray(arr)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if t.dtype == torch.uint8:
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} as uint8 must be NHWC (N, H, W, C) or grey (N, H, W), "
                             f"got shape {tuple(t.shape)}")
        if t.dim() == 3:  # (N, H, W) grey
            t = t.unsqueeze(-1)
        elif t.shape[-1] not in (1, 3) and t.shape[1] in (1, 3):
            # (N, 3, 32, 32) read as NHWC would train on 32-"channel" images of 3 x 32 pixels
            raise ValueError(f"{name} as uint8 must be NHWC (N, H, W, C), got (N, "
                             f"{', '.join(map(str, t.shape[1:]))}): the NCHW layout (channels in "
                             "dim 1); pass NHWC (x.transpose(0, 2, 3, 1)) or float NCHW in [0, 1]")
        return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise ValueError(f"{name} images must be uint8 NHWC or float NCHW in [0, 1], got {t.dtype}")
    if model_space:
        return ((t.float() + 1) * 0.5).clamp_(0, 1)
    return t


def to_uint8_nhwc(x):
    """Model-space images in [-1, 1] -> uint8 via ``(x * 127.5 + 128).clamp(0, 255)``
    (DESIGN.md conventions), NCHW -> NHWC for 4-D input. Accepts a torch tensor."""
    import torch

    u = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if u.dim() == 4:
        u = u.permute(0, 2, 3, 1)
    return u.contiguous()


class _LazyConcat:
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
            arr = _npz_member(path, self._key)
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
            keys = _npz_keys(parts[0][0])
            images = _LazyConcat(parts, "image", check)
            labels = np.asarray(_LazyConcat(parts, "label", check)[:]) if "label" in keys else None
            conf = np.asarray(_LazyConcat(parts, "confidence", check)[:]) if "confidence" in keys else None
            return cls(images, labels, conf, meta=manifest)
        if path.is_file():
            keys = _npz_keys(path)
            if "image" in keys:
                ik, lk = "image", "label"
            elif "arr_0" in keys:
                ik, lk = "arr_0", "arr_1"
            else:
                raise ValueError(f"path {path}: npz has neither 'image' nor 'arr_0' (keys: {keys})")
            images = _npz_member(path, ik)
            labels = np.asarray(_npz_member(path, lk)).astype(np.int64) if lk in keys else None
            conf = np.asarray(_npz_member(path, "confidence")) if "confidence" in keys else None
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
            return images_to_float01(arr.astype(np.float32, copy=False), model_space=True)
        if arr.ndim != 4:
            # Not a batch of NHWC images (one image, or grey (N, H, W)): this method has always
            # returned those scaled with their layout untouched.
            import torch

            return torch.from_numpy(arr.copy()).float().div_(255.0)
        return images_to_float01(arr)


# ----------------------------------------------------------------------------- training inputs
class _Source:
    """Uniform random access to (x float32 NCHW in [0, 1], y int64) batches (:func:`as_source`)."""

    def __init__(self, get: Callable[[np.ndarray], tuple], n: int, image_shape: tuple, what: str):
        self._get, self.n, self.image_shape, self.what = get, n, image_shape, what

    def __len__(self):
        return self.n

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get(idx)


def as_source(data, name: str = "train_data") -> _Source:
    """Wrap any input form of :func:`cdp_fast.train_trades` as a batch source.

    Accepted forms: a tuple ``(x, y)`` of tensors / arrays (x float NCHW in [0, 1], or uint8
    NHWC; y integers), a ``torch.utils.data.Dataset`` of (x, y) pairs (x float CHW in [0, 1]),
    a :class:`Samples` (uint8 NHWC images, or float images in [-1, 1] model space; labels
    required) or a path (npz with image/label or arr_0/arr_1 keys, or an out directory of
    :func:`cdp_fast.sample`, read lazily).

    Returns an object with ``len()``, ``image_shape`` (C, H, W) and ``get(idx)``: idx (B,)
    int64 -> (x float32 (B, C, H, W) in [0, 1], y int64 (B,)). Raises ValueError naming
    ``name`` for anything else.
    """
    import torch

    if isinstance(data, (str, os.PathLike)):
        data = Samples.load(data)
    if hasattr(data, "images") and hasattr(data, "labels"):  # cdp_fast.Samples (duck-typed)
        images, labels = data.images, data.labels
        if labels is None:
            raise ValueError(f"{name} has no labels: pseudo-label it first "
                             "(cdp_fast.label.pseudo_label)")
        labels = np.asarray(labels).astype(np.int64)
        n = len(images)
        if len(labels) != n:
            raise ValueError(f"{name}: {len(labels)} labels for {n} images")
        dtype = np.dtype(getattr(images, "dtype", np.uint8))
        if n == 0:
            raise ValueError(f"{name} is empty")
        probe = np.asarray(images[np.array([0])])
        if dtype == np.uint8:
            shape = tuple(images_to_float01(probe, name).shape[1:])

            def get(idx):
                order = np.argsort(idx, kind="stable")  # sorted reads are shard-friendly
                arr = np.asarray(images[idx[order]])
                x = torch.empty((len(idx),) + shape)
                x[torch.from_numpy(order)] = images_to_float01(arr, name)
                return x, torch.from_numpy(labels[idx])
        else:  # float model-space images in [-1, 1] (Samples output="float")
            shape = tuple(probe.shape[1:])

            def get(idx):
                x = images_to_float01(np.asarray(images[idx], dtype=np.float32), name,
                                      model_space=True)
                return x, torch.from_numpy(labels[idx])
        return _Source(get, n, shape, name)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be an (x, y) pair, got {len(data)} items")
        x, y = data
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} labels must be integers, got {y.dtype}")
        y = y.long().cpu()
        if x.dim() < 3 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: x {tuple(x.shape)} and y {tuple(y.shape)} must be a "
                             "non-empty image batch and matching labels")
        if x.dtype == torch.uint8:
            shape = tuple(images_to_float01(x[:1], name).shape[1:])

            def get(idx):
                i = torch.from_numpy(idx)
                return images_to_float01(x[i.to(x.device)].cpu(), name), y[i]
        else:
            if not x.is_floating_point() or x.dim() != 4:
                raise ValueError(f"{name} x must be float NCHW in [0, 1] or uint8 NHWC, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name} x must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
            shape = tuple(x.shape[1:])

            def get(idx):
                i = torch.from_numpy(idx)
                return x[i.to(x.device)].float(), y[i]
        return _Source(get, len(x), shape, name)
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)
        except TypeError:
            raise ValueError(f"{name} must be a map-style Dataset with len()") from None
        if n == 0:
            raise ValueError(f"{name} is empty")
        x0, _ = data[0]
        shape = tuple(torch.as_tensor(x0).shape)

        def get(idx):
            xs, ys = zip(*(data[int(i)] for i in idx))
            x = torch.stack([torch.as_tensor(v) for v in xs]).float()
            return x, torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
        return _Source(get, n, shape, name)
    raise ValueError(f"{name} must be an (x, y) pair, a Dataset, a Samples or a path; got "
                     f"{type(data).__name__}")


# ----------------------------------------------------------------------------- real data
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
