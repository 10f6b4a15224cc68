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

Lazy: a chunk of images in memory at a time; names and ``dataset.json`` entries are made
per image / written per chunk (memory O(chunk) plus the labels as one int64 array). A zip is
the exception: Python's ``zipfile`` keeps one ZipInfo per member (a few hundred bytes) until
it closes, and opening a zip lists every member — for tens of millions of images, export a
folder.

Resumable and atomic:

- folder: each file is written to a temp name and renamed, the folder fsynced once at the
  end. PNGs already there that decode to the same pixels are kept; others are rewritten.
  The folder then holds exactly this export: the files an export writes (six or more digits
  + ``.png`` at the top level, any width, and their temp files) that are not this export's
  names — an earlier, larger export; the other name width past 10⁶ — are deleted, and so is
  an EDM ``dataset.json`` (a ``{"labels": ...}`` file) when this export writes none. Any
  other image file (``cat.png``, ``x.jpg``, ``.npy``, any image in a sub-folder: EDM and
  clean-fid read folders recursively) is never deleted: the export refuses before writing
  anything (ValueError naming them), since every FID tool would score it with the set.
- zip: built under a temp name and renamed when complete, with a record ``.cdp_export.json``
  (n and the sha256 of the exported uint8 pixels and labels; ignored by EDM and clean-fid,
  which read image members only). An existing zip is kept only when its record matches this
  source (one read pass over the source, no encoding); otherwise it is rewritten whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cdp_fast.data.convert import to_uint8_nhwc
from cdp_fast.data.sources import open_images
from cdp_fast.utils.io import atomic_write

__all__ = ["export_png", "png_name", "png_names"]

_MIN_DIGITS = 6          # {index:06d}.png: EDM's names
_RECORD = ".cdp_export.json"
# what EDM (PIL's extensions), clean-fid (its EXTENSIONS, .npy included) and torch-fidelity read
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp", ".npy"}
_OWN = re.compile(r"(\d+)\.png|\.(\d+)\.png\.\d+\.tmp")    # an export's PNG, or its temp file
_DATE = (1980, 1, 1, 0, 0, 0)


def _width(n: int) -> int:
    return max(_MIN_DIGITS, len(str(max(n - 1, 0))))


def png_name(i: int, n: int) -> str:
    """The file name of image ``i`` of N exported: ``{i:0Wd}.png``, W = max(6, digits of N − 1)."""
    return f"{i:0{_width(n)}d}.png"


def png_names(n: int) -> list:
    """The file names of all N exported images (:func:`png_name`), in index order (a list of
    N strings: :func:`export_png` makes them one at a time instead)."""
    w = _width(n)
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
    Returns: {"n", "written", "skipped" (already there and verified), "removed" (stale files
    of an earlier export deleted from the folder; 0 for a zip), "out", "labels" (bool)}.
    Raises: ValueError for images the adapter refuses, or for image files in the folder that
    no export wrote (see the module docstring); ImportError naming the extra without Pillow.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError("exporting PNGs needs Pillow: pip install 'cdp_fast[demo]'") from e
    src = open_images(source, "source")
    n, out = len(src), Path(out)
    lab = None
    if labels and src.labels is not None:
        from cdp_fast.data.samples import integer_labels

        lab = integer_labels(np.asarray(src.labels)[:n], "source labels")
    job = _Job(src, n, _width(n), lab, max(1, int(chunk)), progress)
    res = _export_zip(job, out) if zip else _export_folder(job, out)
    return {"n": n, **res, "out": str(out), "labels": lab is not None}


class _Job:
    """One export: the source, N, the name width, labels (int64 (N,) or None), chunk, progress."""

    def __init__(self, src, n, w, lab, step, progress):
        self.src, self.n, self.w, self.lab, self.step, self.progress = src, n, w, lab, step, progress

    def name(self, i: int) -> str:
        return f"{i:0{self.w}d}.png"

    def chunks(self, digest=None):
        """(first index, uint8 (B, H, W, C) images) per chunk; each chunk's bytes go into
        ``digest`` (and the row shape, once), then ``progress`` is called after the chunk's use."""
        for lo in range(0, self.n, self.step):
            imgs = _uint8_rows(self.src, lo, min(self.n, lo + self.step))
            if digest is not None:   # the same for any chunk size: the row shape once
                if lo == 0:
                    digest.update(f"{imgs.dtype.str}{imgs.shape[1:]};".encode())
                digest.update(np.ascontiguousarray(imgs).reshape(-1).view(np.uint8))
            yield lo, imgs
            if self.progress is not None:
                self.progress(min(self.n, lo + self.step), self.n)

    def new_digest(self):
        return hashlib.sha256(f"cdp-export-1;{self.n};{self.w};".encode())

    def labels_into(self, digest) -> None:
        digest.update(b"N;" if self.lab is None else b"L;")
        if self.lab is not None:
            digest.update(np.ascontiguousarray(self.lab, "<i8").view(np.uint8))

    def write_labels(self, f, per: int = 100_000) -> None:
        """EDM's ``{"labels": [["000000.png", 6], ...]}`` (as json.dumps writes it), by parts."""
        f.write(b'{"labels": [')
        for lo in range(0, self.n, per):
            text = ", ".join(f'["{self.name(i)}", {v}]' for i, v in enumerate(self.lab[lo:lo + per].tolist(), lo))
            f.write(((", " if lo else "") + text).encode())
        f.write(b"]}")


def _export_zip(job: _Job, out: Path) -> dict:
    old = _zip_record(out) if out.is_file() else None
    if old is not None and old.get("n") == job.n and old.get("labels") == (job.lab is not None):
        h = job.new_digest()
        for _ in job.chunks(h):
            pass
        job.labels_into(h)
        if h.hexdigest() == old.get("sha256"):
            return {"written": 0, "skipped": job.n, "removed": 0}

    def write(f):
        h = job.new_digest()
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for lo, imgs in job.chunks(h):
                for i, img in enumerate(imgs):
                    zf.writestr(zipfile.ZipInfo(job.name(lo + i), _DATE), _png_bytes(img))
            if job.lab is not None:
                with zf.open(zipfile.ZipInfo("dataset.json", _DATE), "w", force_zip64=job.n > 20_000_000) as m:
                    job.write_labels(m)
            job.labels_into(h)
            record = {"format": 1, "n": job.n, "labels": job.lab is not None, "sha256": h.hexdigest()}
            zf.writestr(zipfile.ZipInfo(_RECORD, _DATE), json.dumps(record))
    atomic_write(out, write)
    return {"written": job.n, "skipped": 0, "removed": 0}


def _zip_record(path: Path):
    """The ``.cdp_export.json`` record of a zip an export wrote (a zip is only renamed into
    place complete, the record last), or None (no record, not a zip)."""
    try:
        with zipfile.ZipFile(path) as zf:
            rec = json.loads(zf.read(_RECORD))
        return rec if isinstance(rec, dict) else None
    except (KeyError, zipfile.BadZipFile, OSError, ValueError):
        return None


def _export_folder(job: _Job, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    stale, foreign = _scan(out, job)
    if foreign:
        raise ValueError(f"export: {out} holds image files that no export wrote ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}; {len(foreign)} in all): FID tools would read them "
                         "with the set; export to an empty or new folder, or remove them")
    written = skipped = 0
    for lo, imgs in job.chunks():
        for i, img in enumerate(imgs):
            p = out / job.name(lo + i)
            if p.is_file() and _same_png(p, img):
                skipped += 1
                continue
            _write_renamed(p, _png_bytes(img))
            written += 1
    labels_file = out / "dataset.json"
    if job.lab is not None:
        atomic_write(labels_file, job.write_labels)
    elif labels_file.is_file() and _is_edm_labels(labels_file):
        stale.append(labels_file.name)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    fd = os.open(out, os.O_RDONLY)       # the renames and deletions, durable once (not per file)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"written": written, "skipped": skipped, "removed": len(stale)}


def _scan(out: Path, job: _Job) -> tuple:
    """([stale files an export wrote that are not this export's], [image files no export
    wrote, sub-folders included]) of the folder ``out`` (names relative to it)."""
    stale, foreign = [], []
    for root, dirs, files in os.walk(out):
        top = Path(root) == out
        for f in files:
            m = _OWN.fullmatch(f) if top else None
            digits = m and (m.group(1) or m.group(2))
            if digits and len(digits) >= _MIN_DIGITS:
                if m.group(2) or len(digits) != job.w or int(digits) >= job.n:
                    stale.append(f)
            elif os.path.splitext(f)[1].lower() in _IMAGE_SUFFIXES:
                foreign.append(str(Path(root, f).relative_to(out)))
    return stale, sorted(foreign)


def _is_edm_labels(path: Path) -> bool:
    """Whether ``path`` is an EDM labels file (what an export writes: ``{"labels": ...``)."""
    with open(path, "rb") as f:
        return f.read(10) == b'{"labels":'
