"""Atomic file writes and file hashes: every file the package writes (shards, manifests,
checkpoints, reports, PNGs) goes through :func:`atomic_write`, so a crash leaves the old file
or none, never a half-written one.

The recipe: write to a temp name in the same directory, fsync, rename over the target, fsync
the directory. The file gets the mode ``open()`` would give (0o666 minus the umask), not the
0o600 of ``mkstemp``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "sha256_file"]


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


def atomic_write(path, write_fn) -> None:
    """Atomically create ``path`` from ``write_fn(binary_file)``: temp name in the same
    directory, fsync, rename, fsync of the directory. A crash leaves the old file or none."""
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


def atomic_write_bytes(path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj) -> None:
    """Atomically write ``obj`` as JSON (indent 1, sorted keys, trailing newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file at ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
