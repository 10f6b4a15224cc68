"""Export a set of samples as PNG files (project issue 24, item 2): what EDM's ``fid.py``,
clean-fid and torch-fidelity read, so every external FID tool can score CDP data.

Layout: one flat folder (or zip) of ``{index:06d}.png`` (wider when N > 10⁶, the same width
for every file, so name order is index order), plus ``dataset.json`` with EDM's labels
(``{"labels": [["000000.png", 6], ...]}``) when the set has labels. Why flat: EDM's
ImageFolderDataset (``fid.py calc --images``) reads a folder recursively or a zip, clean-fid
globs ``**/*.png`` recursively or reads a zip, but torch-fidelity reads only a folder's own
files (``samples_find_deep=False`` by default) and no zip — a flat folder is read by all
three, the zip by EDM and clean-fid. EDM's ``--subdirs`` layout (``000000/000123.png``) would
need ``samples_find_deep`` in torch-fidelity.

Pixels: uint8 images are written as they are (bit-exact; grey (H, W, 1) or (H, W) as "L",
RGB as "RGB"; encoded by Pillow as :mod:`cdp_fast.utils.png` does); float model-space images
([-1, 1], ``output="float"``) as the package stores them
(:func:`~cdp_fast.data.convert.to_uint8_nhwc`); float [0, 1] tensors as round(255·x).

Lazy (a chunk of images in memory at a time), resumable (a folder's existing PNGs that decode
to the same pixels are kept; others are rewritten) and atomic (each file written to a temp
name and renamed, the folder fsynced once at the end; a zip is built under a temp name and
renamed when complete).
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cdp_fast.data.convert import to_uint8_nhwc
from cdp_fast.data.sources import open_images
from cdp_fast.utils.io import atomic_write, atomic_write_json

__all__ = ["export_png", "png_name", "png_names"]


def png_name(i: int, n: int) -> str:
    """The file name of image ``i`` of N exported: ``{i:0Wd}.png``, W = max(6, digits of N − 1)."""
    return f"{i:0{max(6, len(str(max(n - 1, 0))))}d}.png"


def png_names(n: int) -> list:
    """The file names of all N exported images (:func:`png_name`), in index order."""
    w = max(6, len(str(max(n - 1, 0))))
    return [f"{i:0{w}d}.png" for i in range(n)]


def _uint8_rows(src, lo: int, hi: int) -> np.ndarray:
    """Images [lo, hi) of an ImageSource as uint8 NHWC (N, H, W, C)."""
    import torch

    rows = src.rows(lo, hi)
    if src.kind == "uint8":
        a = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        return a[..., None] if a.ndim == 3 else a
    if src.kind == "model":
        t = torch.as_tensor(np.asarray(rows, dtype=np.float32))
        if t.dim() != 4:
            raise ValueError(f"{src.name}: float images must be (N, C, H, W) to export, got {tuple(t.shape)}")
        return to_uint8_nhwc(t).numpy()
    x = torch.as_tensor(rows).detach().float().cpu()
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def _write_renamed(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp name beside ``path`` and rename it over ``path``: a reader never
    sees half a file. Not fsynced per file (utils.io.atomic_write / png.write_png do: 140
    PNGs/s here against ~2,000 without); after a power cut a file may be empty, and the next
    run's check (:func:`_same_png`) rewrites it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _same_png(data, img: np.ndarray) -> bool:
    """Whether PNG ``data`` (a path or bytes) decodes to exactly ``img`` (H, W, C) uint8."""
    from PIL import Image

    try:
        with Image.open(data if not isinstance(data, bytes) else io.BytesIO(data)) as im:
            a = np.asarray(im)
    except Exception:   # truncated, not a PNG: rewrite it
        return False
    return a.shape in (img.shape, img.shape[:2]) and np.array_equal(a.reshape(img.shape), img)


def export_png(source, out, *, zip: bool = False, chunk: int = 1000, labels: bool = True,
               progress: Optional[Callable] = None) -> dict:
    """Write every image of ``source`` as a PNG into the folder ``out`` (or the zip ``out``).

    Args:
        source: anything :func:`cdp_fast.data.open_images` opens (an out folder, an npz, npz
            parts, a :class:`~cdp_fast.data.Samples`, uint8 NHWC / float NCHW [0, 1] images).
        out: a folder (created; its parent must exist) or, with ``zip=True``, a zip path.
        zip: write one zip (members as the folder's files) instead of a folder.
        chunk: images read and encoded at a time (memory: one chunk).
        labels: write ``dataset.json`` (EDM's format) when the source has labels.
        progress: ``progress(done, total)`` after each chunk.
    Returns: {"n", "written", "skipped" (already there and verified), "out", "labels" (bool)}.
    Raises: ValueError for images the adapter refuses; ImportError naming the extra without Pillow.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError("exporting PNGs needs Pillow: pip install 'cdp_fast[demo]'") from e
    src = open_images(source, "source")
    n, out = len(src), Path(out)
    names = png_names(n)
    lab = None
    if labels and src.labels is not None:
        from cdp_fast.data.samples import integer_labels

        lab = integer_labels(np.asarray(src.labels)[:n], "source labels")
    meta = None if lab is None else {"labels": [[names[i], int(lab[i])] for i in range(n)]}
    step = max(1, int(chunk))
    written = skipped = 0
    if zip:
        if out.is_file() and _zip_complete(out, names, meta):
            return {"n": n, "written": 0, "skipped": n, "out": str(out), "labels": meta is not None}

        def write(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for lo in range(0, n, step):
                    imgs = _uint8_rows(src, lo, min(n, lo + step))
                    for i, img in enumerate(imgs):
                        zf.writestr(zipfile.ZipInfo(names[lo + i], (1980, 1, 1, 0, 0, 0)), _png_bytes(img))
                    if progress is not None:
                        progress(min(n, lo + step), n)
                if meta is not None:
                    zf.writestr(zipfile.ZipInfo("dataset.json", (1980, 1, 1, 0, 0, 0)), json.dumps(meta))
        atomic_write(out, write)
        return {"n": n, "written": n, "skipped": 0, "out": str(out), "labels": meta is not None}
    out.mkdir(exist_ok=True)
    for lo in range(0, n, step):
        imgs = _uint8_rows(src, lo, min(n, lo + step))
        for i, img in enumerate(imgs):
            p = out / names[lo + i]
            if p.is_file() and _same_png(p, img):
                skipped += 1
                continue
            _write_renamed(p, _png_bytes(img))
            written += 1
        if progress is not None:
            progress(min(n, lo + step), n)
    if meta is not None:
        atomic_write_json(out / "dataset.json", meta)
    fd = os.open(out, os.O_RDONLY)       # the renames, durable once (not per file)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"n": n, "written": written, "skipped": skipped, "out": str(out), "labels": meta is not None}


def _zip_complete(path: Path, names: list, meta) -> bool:
    """A finished zip of this export: every member name present (a zip is only ever renamed
    into place complete, so names present means it was written whole) and the same labels."""
    try:
        with zipfile.ZipFile(path) as zf:
            have = set(zf.namelist())
            if not set(names) <= have or (meta is not None) != ("dataset.json" in have):
                return False
            return meta is None or json.loads(zf.read("dataset.json")) == meta
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
