"""Sets stored as several files, as the anchors ship them, opened without a merge in memory
(:meth:`cdp_fast.Samples.load` calls these):

- npz parts (DM-Improves-AT's 20M / 50M sets: 2–4 files with ``image`` uint8 NHWC and
  ``label``): :func:`part_paths` turns a list of paths, or a string of comma-separated paths
  and glob patterns, into the files, and :func:`open_npz_parts` concatenates them lazily;
- a folder of per-class ``{k}.npy`` files (EDM / DM-Improves-AT ``generate.py``: ``k.npy``
  holds the images generated for class k, uint8 NHWC): :func:`open_class_folder`.

Images are a :class:`~cdp_fast.data.lazy.LazyConcat` (read on access); labels are read on
open (int64, 8 bytes an image).
"""
from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path

import numpy as np

from cdp_fast.data.lazy import LazyConcat
from cdp_fast.data.npz import npz_keys, read_member

__all__ = ["part_paths", "image_label_keys", "open_npz_parts", "open_class_folder"]

_GLOB = re.compile(r"[*?\[]")
_CLASS_FILE = re.compile(r"\d+\.npy")


def part_paths(spec) -> list:
    """The files ``spec`` names, as a list of Paths (one for a single path).

    ``spec``: a path (str or PathLike); a list / tuple of paths; or a str naming no existing
    file that holds commas and/or glob characters (``*?[``): split at the commas, each item a
    path or a glob pattern whose matches are taken sorted by name (``"d/50m_part*.npz"``,
    ``"a.npz,b.npz"``). An existing path is always taken as it is, commas and all.

    Raises ValueError: an empty list, an item that is not a path, a pattern that matches
    nothing, a missing file, a file listed twice."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("path: an empty list of parts")
        bad = [p for p in spec if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise ValueError(f"path: the parts must be paths, got {type(bad[0]).__name__}")
        paths = [Path(p) for p in spec]
    elif isinstance(spec, (str, os.PathLike)):
        if not isinstance(spec, str) or os.path.exists(spec) or not ("," in spec or _GLOB.search(spec)):
            return [Path(spec)]
        paths = []
        for item in (t.strip() for t in spec.split(",")):
            if not item:
                raise ValueError(f"path {spec!r}: an empty item between commas")
            if _GLOB.search(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise ValueError(f"path {item} matches no file")
                paths += [Path(f) for f in found]
            else:
                paths.append(Path(item))
    else:
        raise ValueError(f"path must be a path or a list of paths, got {type(spec).__name__}")
    for p in paths:
        if not p.exists():
            raise ValueError(f"path {p} does not exist")
    seen = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"path {p} is listed twice (as {seen[key]} too)")
        seen[key] = p
    return paths


def image_label_keys(path, keys) -> tuple:
    """(image key, label key or None) of an npz with members ``keys``: ``image``/``label``, or
    ``arr_0`` with ``label`` or ``arr_1`` (what ``np.savez(x, y)`` writes)."""
    if "image" in keys:
        ik, lk = "image", "label"
    elif "arr_0" in keys:
        if "label" in keys and "arr_1" in keys:
            raise ValueError(f"path {path}: npz has both 'label' and 'arr_1'; which are the labels?")
        ik, lk = "arr_0", "label" if "label" in keys else "arr_1"
    else:
        raise ValueError(f"path {path}: npz has neither 'image' nor 'arr_0' (keys: {keys})")
    return ik, lk if lk in keys else None


def open_npz_parts(paths) -> tuple:
    """Images, raw labels and confidences of npz ``paths`` (files), in order.

    Returns (images :class:`LazyConcat`, [label array per part] or None, confidence float32
    (N,) or None, meta {"parts": [str]}). Every part must use the same image key, dtype and
    row shape, and either every part has labels or none has (a ValueError names the odd
    one); confidences are kept only when every part has them."""
    info = []
    for p in paths:
        if not Path(p).is_file():
            raise ValueError(f"path {p}: a part of a multi-part set must be an npz file")
        keys = npz_keys(p)
        info.append((p, *image_label_keys(p, keys), "confidence" in keys))
    ik = info[0][1]
    for p, k, _, _ in info:
        if k != ik:
            raise ValueError(f"path {p}: images under '{k}', but {info[0][0]} has them under '{ik}'")
    has = [lk is not None for _, _, lk, _ in info]
    if any(has) and not all(has):
        odd = info[has.index(not has[0])][0]
        raise ValueError(f"path {odd}: {'has' if not has[0] else 'lacks'} labels, unlike {info[0][0]}; "
                         "every part of a set must have labels, or none")
    images = LazyConcat([(str(p), None) for p in paths], ik)
    counts = np.diff(images.starts)
    labels = conf = None
    if all(has):
        labels = [read_member(p, lk) for p, _, lk, _ in info]
        for (p, _, lk, _), lab, c in zip(info, labels, counts):
            if len(lab) != c:
                raise ValueError(f"path {p}: {len(lab)} labels ('{lk}') for {c} images")
    if all(c for *_, c in info):
        conf = [np.asarray(read_member(p, "confidence"), dtype=np.float32) for p in paths]
        conf = np.concatenate(conf) if sum(map(len, conf)) == len(images) else None
    return images, labels, conf, {"parts": [str(p) for p in paths]}


def open_class_folder(path) -> tuple:
    """Images and labels of a folder of per-class ``{k}.npy`` files (no manifest.json).

    Returns (images :class:`LazyConcat` over the files in increasing k, labels int64 (N,) = k
    for every row of ``k.npy``, meta {"path", "parts", "classes"}). Raises ValueError for a
    folder without such files, another ``.npy`` name (``0_1.npy``), a class listed twice
    (``1.npy`` and ``01.npy``), or parts of different dtype / row shape; warns (UserWarning)
    when classes are missing below the largest (a generation that stopped early)."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.suffix == ".npy")
    if not files:
        raise ValueError(f"path {path} has no manifest.json and no per-class {{k}}.npy files: neither a "
                         "cdp_fast out directory nor a folder of per-class images (EDM / DM-Improves-AT)")
    bad = [f.name for f in files if not _CLASS_FILE.fullmatch(f.name)]
    if bad:
        raise ValueError(f"path {path}: {bad[0]} is not a class file; a folder of per-class images holds "
                         "only {k}.npy files, k the class index (0.npy, 1.npy, ...)")
    by_class = {}
    for f in files:
        k = int(f.stem)
        if k in by_class:
            raise ValueError(f"path {path}: class {k} is in both {by_class[k].name} and {f.name}")
        by_class[k] = f
    classes = sorted(by_class)
    missing = sorted(set(range(classes[-1] + 1)) - set(classes))
    if missing:
        warnings.warn(f"{path}: no file for class(es) {missing} (below the largest, {classes[-1]}); "
                      f"loading the {len(classes)} classes present", UserWarning, stacklevel=3)
    images = LazyConcat([(str(by_class[k]), None) for k in classes], None)
    labels = np.repeat(np.asarray(classes, dtype=np.int64), np.diff(images.starts))
    return images, labels, {"path": str(path), "parts": [str(by_class[k]) for k in classes],
                            "classes": classes}
