"""Read-only arrays over files, read on access: :class:`LazyConcat` (the rows of several npz
members or ``.npy`` files, one after another: an out directory's shards, the parts of a
multi-part npz set, a folder of per-class ``{k}.npy`` files) and :func:`read_rows`.

How rows are read, so that a pass over a set larger than RAM keeps memory flat:

- a run of consecutive rows (a slice) of an uncompressed member / ``.npy`` file is read with
  a positioned file read into a fresh array (``np.fromfile``), not through a memory map,
  whose touched pages would stay in the process's resident set for the whole pass;
- scattered rows (an index array, as training draws them) come from a read-only memory map of
  the part (``np.load(mmap_mode="r")`` for ``.npy``; the member's bytes in place for npz);
- a compressed npz member cannot be mapped or read in pieces: it is decompressed whole when
  first read. A pass over consecutive rows keeps only the part it is in (memory: one part);
  scattered reads keep every part they decompressed (as ``np.load`` of one compressed npz
  would hold it), since random batches would otherwise decompress a part per batch. Store
  parts uncompressed (``np.savez``, as DM-Improves-AT does) to train in flat memory.
"""
from __future__ import annotations

import mmap

import numpy as np

from cdp_fast.data.npz import map_array, member_layout, npy_layout

__all__ = ["LazyConcat", "read_rows"]


def _pread(path, offset: int, dtype, row_shape: tuple, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a C-order array starting at byte ``offset`` of ``path``, read into a
    fresh array."""
    per_row = int(np.prod(row_shape, dtype=np.int64))
    dtype = np.dtype(dtype)
    count = (hi - lo) * per_row
    arr = np.fromfile(path, dtype=dtype, count=count, offset=offset + lo * per_row * dtype.itemsize)
    if arr.size != count:
        raise ValueError(f"{path}: holds fewer rows than its header says (read {arr.size} of {count} "
                         "values); the file is truncated")
    return arr.reshape((hi - lo,) + tuple(row_shape))


def read_rows(arr, lo: int, hi: int):
    """Rows [lo, hi) of ``arr``: for a file-backed array (a :class:`LazyConcat`, or a C-order
    ``np.memmap`` made directly on a file) a fresh array read from the file, so the pass
    leaves no mapped pages behind; anything else sliced as it is (``arr[lo:hi]``)."""
    if isinstance(arr, LazyConcat):
        return arr[lo:hi]
    if (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename
            and arr.flags.c_contiguous and arr.ndim >= 1):
        lo, hi, _ = slice(lo, hi).indices(len(arr))
        return _pread(arr.filename, int(arr.offset), arr.dtype, arr.shape[1:], lo, max(lo, hi))
    return arr[lo:hi]


class LazyConcat:
    """Read-only array view over the rows of several npz members (``key``) or ``.npy`` files
    (``key=None``), loaded on access (see the module docstring for how).

    Args:
        parts: [(path, count)], count the rows the caller expects (a manifest's record), or None
            to take the file's own.
        key: the npz member, or None for ``.npy`` files.
        check: called with a part's path before its first read (an out directory's sha256
            check), or None.

    Every part must hold the dtype and row shape of the first (checked when a part is first
    read; at construction when ``count`` is None). Supports ``len``, ``shape``, ``dtype``,
    integer / slice / index-array ``[]`` and ``np.asarray`` (which materialises everything:
    avoid on a million images)."""

    def __init__(self, parts, key, check=None):
        self._parts = [(str(p), c) for p, c in parts]
        self._key = key
        self._check = check
        self._layouts, self._maps, self._loaded = {}, {}, {}
        if not self._parts:
            raise ValueError("LazyConcat needs at least one part")
        first = self._layout(0)
        self.dtype, self._row = first.dtype, tuple(first.shape[1:])
        if any(c is None for _, c in self._parts):   # headers only: fast even for many parts
            self._parts = [(p, c if c is not None else self._layout(j).shape[0])
                           for j, (p, c) in enumerate(self._parts)]
            for j in range(1, len(self._parts)):
                self._layout(j)
        counts = [c for _, c in self._parts]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self._starts[-1]),) + self._row
        self.ndim = len(self.shape)

    @property
    def paths(self) -> list:
        """The parts' paths, in order."""
        return [p for p, _ in self._parts]

    @property
    def starts(self) -> np.ndarray:
        """int64 (parts + 1,): the first row of each part, then the total number of rows."""
        return self._starts.copy()

    def _layout(self, j):
        lay = self._layouts.get(j)
        if lay is None:
            path, count = self._parts[j]
            if self._check is not None:
                self._check(path)
            lay = npy_layout(path) if self._key is None else member_layout(path, self._key)
            what = "array" if self._key is None else f"member {self._key}"
            if not lay.shape:
                raise ValueError(f"{path}: the {what} is a scalar, not rows")
            if count is not None and lay.shape[0] != count:
                raise ValueError(f"{path}: holds {lay.shape[0]} rows, manifest says {count}")
            if j and (lay.dtype != self.dtype or tuple(lay.shape[1:]) != self._row):
                raise ValueError(f"{path}: rows of {lay.dtype} {tuple(lay.shape[1:])}, but "
                                 f"{self._parts[0][0]} holds {self.dtype} {self._row}; the parts "
                                 "of one set must match")
            self._layouts[j] = lay
        return lay

    def _array(self, j, keep: bool = True):
        """Part ``j`` whole: a memory map, or (compressed npz) decompressed; ``keep=False`` (a
        pass over consecutive rows) drops every other decompressed part first."""
        lay = self._layout(j)
        path = self._parts[j][0]
        if lay.offset is not None:
            if j not in self._maps:
                self._maps[j] = map_array(path, lay, "the array" if self._key is None else f"member {self._key}")
            return self._maps[j]
        if not keep:
            self._loaded = {k: v for k, v in self._loaded.items() if k == j}
        if j not in self._loaded:
            with np.load(path, allow_pickle=False) as z:
                self._loaded[j] = z[self._key]
        return self._loaded[j]

    def _rows(self, j, lo, hi):
        lay = self._layout(j)
        if hi <= lo:
            return np.empty((0,) + self._row, dtype=self.dtype)
        if lay.offset is not None and not lay.fortran:
            return _pread(self._parts[j][0], lay.offset, lay.dtype, self._row, int(lo), int(hi))
        return np.asarray(self._array(j, keep=False)[lo:hi])

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, (int, np.integer)):
            i = int(idx) + (n if idx < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(idx)
            j = int(np.searchsorted(self._starts, i, side="right") - 1)
            return self._rows(j, i - self._starts[j], i - self._starts[j] + 1)[0]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1:
                out = []
                j = int(np.searchsorted(self._starts, start, side="right") - 1) if start < n else len(self._parts)
                pos = start
                while pos < stop and j < len(self._parts):
                    lo = pos - self._starts[j]
                    hi = min(stop, self._starts[j + 1]) - self._starts[j]
                    out.append(self._rows(j, lo, hi))
                    pos = self._starts[j + 1]
                    j += 1
                if not out:
                    return np.empty((0,) + self.shape[1:], dtype=self.dtype)
                return out[0] if len(out) == 1 else np.concatenate(out)
            idx = np.arange(start, stop, step)
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError("index out of range")
        out = np.empty((idx.size,) + self.shape[1:], dtype=self.dtype)
        part = np.searchsorted(self._starts, idx.reshape(-1), side="right") - 1
        flat = idx.reshape(-1)
        for j in np.unique(part):
            sel = part == j
            out[sel] = self._array(int(j))[flat[sel] - self._starts[j]]
        return out.reshape(idx.shape + self.shape[1:])

    def __iter__(self, chunk: int = 1024):
        for s in range(0, len(self), chunk):
            yield from self[s:s + chunk]

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr
