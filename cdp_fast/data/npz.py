"""Deterministic npz files: writing (:func:`write_npz`, :func:`npz_bytes`; :func:`stream_npz`
chunk by chunk), reading one member without unpickling and, when it is stored uncompressed,
without copying (:func:`read_member`; :func:`member_layout` / :func:`npy_layout` locate an npz
member / a ``.npy`` file's array in its file), and checking a finished shard against its
manifest record (:func:`shard_intact`).

Members are stored uncompressed with a fixed zip timestamp, so the same arrays always give
the same bytes (resume is checked byte-for-byte) and a member can be memory-mapped in place.
Nothing is unpickled: object members are refused, ``np.load(..., allow_pickle=False)``.
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from cdp_fast.utils.io import atomic_write, sha256_file

__all__ = ["write_npz", "npz_bytes", "read_member", "npz_keys", "shard_intact", "stream_npz",
           "Layout", "member_layout", "npy_layout", "map_array"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _write_npz_to(fileobj, arrays) -> None:
    with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            with zf.open(_info(key), "w", force_zip64=True) as member:
                if isinstance(value, np.ndarray) or np.isscalar(value):
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
                else:  # a lazy array: header, then the data chunk by chunk (bounded memory)
                    _write_lazy_array(member, value)


def _write_lazy_array(member, arr, chunk: int = 4096) -> None:
    np.lib.format.write_array_header_2_0(member, _header(arr.dtype, arr.shape))
    for s in range(0, len(arr), chunk):
        member.write(np.ascontiguousarray(arr[s:s + chunk]).tobytes())


def write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> array) as an uncompressed npz, deterministically and atomically."""
    atomic_write(path, lambda f: _write_npz_to(f, arrays))


def npz_bytes(arrays: dict) -> bytes:
    """The bytes :func:`write_npz` would write for ``arrays``."""
    buf = io.BytesIO()
    _write_npz_to(buf, arrays)
    return buf.getvalue()


def _open_zip(path):
    """The npz at ``path`` as a ZipFile; a truncated or non-zip file is a ValueError naming it."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable npz ({e}); the file is truncated or corrupted") from None


class Layout(NamedTuple):
    """Where an array lies in a file: ``offset`` of its first byte (None when the npz member is
    compressed: it can only be decompressed whole), ``dtype``, ``shape``, ``fortran`` order."""
    offset: Optional[int]
    dtype: np.dtype
    shape: tuple
    fortran: bool


def _npy_header(f, path, what) -> tuple:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError(f"{path}: {what} holds Python objects; refusing to unpickle")
    return tuple(shape), bool(fortran), dtype


def member_layout(path, key) -> Layout:
    """The :class:`Layout` of array ``key`` of the npz at ``path`` (headers only, nothing of the
    data is read). Raises KeyError if absent, ValueError for a corrupt or object member."""
    with _open_zip(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            raise KeyError(key) from None
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as m:
                shape, fortran, dtype = _npy_header(m, path, f"member {key}")
            return Layout(None, dtype, shape, fortran)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: corrupt zip member {key}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _npy_header(f, path, f"member {key}")
        return Layout(f.tell(), dtype, shape, fortran)


def npy_layout(path) -> Layout:
    """The :class:`Layout` of the ``.npy`` file at ``path`` (its header only)."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _npy_header(f, path, "the array")
            return Layout(f.tell(), dtype, shape, fortran)
    except (ValueError, EOFError) as e:
        if "objects" in str(e):
            raise
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def map_array(path, lay: Layout, what: str):
    """The array ``lay`` describes in the file at ``path``, memory-mapped read-only."""
    if int(np.prod(lay.shape)) == 0:
        return np.empty(lay.shape, dtype=lay.dtype)
    try:
        return np.memmap(path, dtype=lay.dtype, mode="r", offset=lay.offset, shape=lay.shape,
                         order="F" if lay.fortran else "C")
    except (ValueError, OSError) as e:   # numpy: "mmap length is greater than file size"
        raise ValueError(f"{path}: {what} claims shape {lay.shape} {lay.dtype}, more than the "
                         f"file holds ({e}); the file is truncated or corrupted") from None


def read_member(path, key, mmap: bool = True):
    """Array ``key`` of the npz at ``path``: memory-mapped when the member is stored
    uncompressed (no copy), else read whole. Raises KeyError if absent."""
    if mmap:
        lay = member_layout(path, key)
        if lay.offset is not None:
            return map_array(path, lay, f"member {key}")
    else:
        with _open_zip(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise KeyError(key)
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def stream_npz(path, lead: str, lead_dtype, lead_shape: tuple, chunks, tail: dict) -> int:
    """Write an uncompressed npz whose member ``lead`` (dtype, shape) is filled chunk by chunk,
    with no array of the whole file in memory: ``chunks`` yields ``(lead rows, {name: rows})``;
    the ``tail`` members (name -> dtype, 1-D) are spilled to temporary files beside ``path``
    as they come and written after ``lead``, in ``tail``'s order. Atomic like :func:`write_npz`.
    Returns the number of rows; ValueError if they do not add up to ``lead_shape[0]``."""
    import tempfile

    path = Path(path)

    def write(f):
        spills = {k: tempfile.TemporaryFile(dir=str(path.parent)) for k in tail}
        try:
            n = 0
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as zf:
                with zf.open(_info(lead), "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, _header(lead_dtype, lead_shape))
                    for rows, extra in chunks:
                        rows = np.ascontiguousarray(rows, dtype=lead_dtype)
                        if rows.shape[1:] != tuple(lead_shape[1:]) or n + len(rows) > lead_shape[0]:
                            raise ValueError(f"{path}: rows {rows.shape} do not fit {lead} {lead_shape}")
                        member.write(rows.tobytes())
                        for k, spill in spills.items():
                            spill.write(np.ascontiguousarray(extra[k], dtype=tail[k]).reshape(-1).tobytes())
                        n += len(rows)
                if n != lead_shape[0]:
                    raise ValueError(f"{path}: {n} rows written, {lead} {lead_shape} expected")
                for k, spill in spills.items():
                    if spill.tell() != n * np.dtype(tail[k]).itemsize:
                        raise ValueError(f"{path}: {k} does not have one value per row")
                    spill.seek(0)
                    with zf.open(_info(k), "w", force_zip64=True) as member:
                        np.lib.format.write_array_header_2_0(member, _header(tail[k], (n,)))
                        while block := spill.read(1 << 22):
                            member.write(block)
            return n
        finally:
            for spill in spills.values():
                spill.close()

    out = []
    atomic_write(path, lambda f: out.append(write(f)))
    return out[0]


def _info(key) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _header(dtype, shape) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(int(v) for v in shape)}


def npz_keys(path):
    """The member names of the npz at ``path`` (without ``.npy``)."""
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def shard_intact(path, info: dict) -> bool:
    """Whether the file at ``path`` is the shard its manifest record ``info`` describes: it
    exists, has ``info["bytes"]`` bytes and the sha256 ``info["sha256"]``."""
    f = Path(path)
    return f.is_file() and f.stat().st_size == info.get("bytes") and sha256_file(f) == info.get("sha256")
