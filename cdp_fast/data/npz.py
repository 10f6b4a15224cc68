"""Deterministic npz files: writing (:func:`write_npz`, :func:`npz_bytes`), reading one member
without unpickling and, when it is stored uncompressed, without copying (:func:`read_member`),
and checking a finished shard against its manifest record (:func:`shard_intact`).

Members are stored uncompressed with a fixed zip timestamp, so the same arrays always give
the same bytes (resume is checked byte-for-byte) and a member can be memory-mapped in place.
Nothing is unpickled: object members are refused, ``np.load(..., allow_pickle=False)``.
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np

from cdp_fast.utils.io import atomic_write, sha256_file

__all__ = ["write_npz", "npz_bytes", "read_member", "npz_keys", "shard_intact"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


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


def read_member(path, key, mmap: bool = True):
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
            try:
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                 order="F" if fortran else "C")
            except (ValueError, OSError) as e:   # numpy: "mmap length is greater than file size"
                raise ValueError(f"{path}: member {key} claims shape {tuple(shape)} {dtype}, more "
                                 f"than the file holds ({e}); the file is truncated or corrupted") from None
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def npz_keys(path):
    """The member names of the npz at ``path`` (without ``.npy``)."""
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def shard_intact(path, info: dict) -> bool:
    """Whether the file at ``path`` is the shard its manifest record ``info`` describes: it
    exists, has ``info["bytes"]`` bytes and the sha256 ``info["sha256"]``."""
    f = Path(path)
    return f.is_file() and f.stat().st_size == info.get("bytes") and sha256_file(f) == info.get("sha256")
