"""utils.checkpoint.data_fingerprint of sets stored as several files (npz parts, folders of
per-class ``{k}.npy``): from the parts' metadata, not their images (a 50M-image set is
fingerprinted on every train start / resume), yet a changed part is detected — npz parts by
their zip directory's per-member CRC32 and sizes, ``.npy`` parts by size and the first and last
MiB (header included). The single-npz and in-memory fingerprints that checkpoints already hold
are pinned: they must not change."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cdp_fast.data import Samples
from cdp_fast.data.lazy import LazyConcat
from cdp_fast.utils.checkpoint import data_fingerprint

MIB = 1 << 20


def _no_image_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("an image was read")

    for name in ("__getitem__", "_rows", "_array", "__array__"):
        monkeypatch.setattr(LazyConcat, name, fail)
    monkeypatch.setattr(np, "fromfile", fail)


@pytest.fixture()
def parts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 6, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 60)
    paths = [tmp_path / "p1.npz", tmp_path / "p2.npz"]
    np.savez(paths[0], image=x[:25], label=y[:25])
    np.savez_compressed(paths[1], image=x[25:], label=y[25:])
    return paths, x, y


def test_npz_parts_are_fingerprinted_without_reading_an_image(parts, monkeypatch, tmp_path):
    paths, x, y = parts
    s = Samples.load(paths)
    with monkeypatch.context() as m:
        _no_image_reads(m)
        fp = data_fingerprint(s)
    assert fp == data_fingerprint(Samples.load(paths))
    # the same files elsewhere: the same set (names, not directories, are fingerprinted)
    other = tmp_path / "moved"
    other.mkdir()
    for p in paths:
        shutil.copy(p, other / p.name)
    assert data_fingerprint(Samples.load([other / p.name for p in paths])) == fp
    # one pixel of the stored part changed (same size): its member CRC32 differs
    x2 = x.copy()
    x2[3, 2, 1, 0] ^= 1
    np.savez(paths[0], image=x2[:25], label=y[:25])
    assert os.path.getsize(paths[0]) == os.path.getsize(other / "p1.npz")
    assert data_fingerprint(Samples.load(paths)) != fp
    # ... and in the compressed part
    np.savez(paths[0], image=x[:25], label=y[:25])
    assert data_fingerprint(Samples.load(paths)) == fp
    x3 = x.copy()
    x3[40, 0, 0, 0] ^= 1
    np.savez_compressed(paths[1], image=x3[25:], label=y[25:])
    assert data_fingerprint(Samples.load(paths)) != fp
    # an in-memory subset keeps meta["parts"] but not the lazy images: hashed by its bytes
    assert data_fingerprint(Samples.load([other / p.name for p in paths]).subset(np.arange(60))) \
        == data_fingerprint(Samples(x, y))


def test_npz_part_renamed_or_reordered_is_other_data(parts, tmp_path):
    paths, _, _ = parts
    fp = data_fingerprint(Samples.load(paths))
    assert data_fingerprint(Samples.load(paths[::-1])) != fp
    os.rename(paths[1], tmp_path / "p3.npz")
    assert data_fingerprint(Samples.load([paths[0], tmp_path / "p3.npz"])) != fp


def _class_folder(path, sizes, seed):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for k, n in enumerate(sizes):
        np.save(path / f"{k}.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return path


def _patch(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_class_folder_fingerprint_reads_only_headers_and_ends(tmp_path, monkeypatch):
    """1.npy is 1100 images (3.2 MiB): its first and last MiB (header included) and its size are
    covered; the middle is not (documented: an in-place edit there is not seen)."""
    d = _class_folder(tmp_path / "d", [7, 1100, 3], 1)
    s = Samples.load(d)
    with monkeypatch.context() as m:
        _no_image_reads(m)
        fp = data_fingerprint(s)
    big = d / "1.npy"
    size = os.path.getsize(big)
    assert size > 3 * MIB
    _patch(big, size // 2)
    assert data_fingerprint(Samples.load(d)) == fp      # the middle: not covered
    _patch(big, size // 2)
    for off in (200, MIB - 1, size - MIB, size - 1):     # first / last MiB
        _patch(big, off)
        assert data_fingerprint(Samples.load(d)) != fp, off
        _patch(big, off)
        assert data_fingerprint(Samples.load(d)) == fp
    # small parts are covered whole; a header (shape) or size change is seen
    _patch(d / "0.npy", os.path.getsize(d / "0.npy") // 2)
    assert data_fingerprint(Samples.load(d)) != fp
    _patch(d / "0.npy", os.path.getsize(d / "0.npy") // 2)
    a = np.load(d / "2.npy")
    np.save(d / "2.npy", a[:2])
    assert data_fingerprint(Samples.load(d)) != fp
    np.save(d / "2.npy", a)
    assert data_fingerprint(Samples.load(d)) == fp


def _rchar():
    """Bytes this process has read by system calls (Linux), page cache included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads by /proc/self/io (Linux)")
def test_many_parts_fingerprint_reads_little(tmp_path):
    """24 class files of 4 MiB each: fingerprinting reads at most ~2 MiB a part, not the set."""
    d = tmp_path / "d"
    d.mkdir()
    row = np.zeros((1, 1024, 1024, 4), np.uint8)   # 4 MiB a file
    for k in range(24):
        np.save(d / f"{k}.npy", np.broadcast_to(row, (1, 1024, 1024, 4)))
    s = Samples.load(d)
    before = _rchar()
    data_fingerprint(s)
    assert _rchar() - before <= 24 * (2 * MIB + 8192)     # the whole set: 96 MiB


def test_single_npz_and_in_memory_fingerprints_are_unchanged(tmp_path):
    """Pinned from the code before multi-part fingerprints: checkpoints written then resume."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (13, 5, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 13)
    Samples(x, y).save_npz(tmp_path / "s.npz")
    old = "5e2afaf6e10aa8181e9e24f5be712c1b685c1d9808f859bc226e28df253bcd1e"
    assert data_fingerprint(Samples.load(tmp_path / "s.npz")) == old
    assert data_fingerprint(Samples(x, y)) == old
    assert data_fingerprint((torch.from_numpy(x), torch.from_numpy(y))) == \
        "cafda31f63735716b8d2ab5a2b9ce4a02a5497702e347d3e38934d37d8f8dad8"
