"""The lazy view of generated samples: :class:`Samples` (images, labels, confidences, the
manifest) loaded from an out directory of :func:`cdp_fast.sample`, an npz, several npz parts
or a folder of per-class ``{k}.npy`` files (:mod:`cdp_fast.data.parts`), its images a
read-only array that reads the files on access (:class:`cdp_fast.data.lazy.LazyConcat`), so
a million images are never all in RAM.

An out directory's shards are checked against the manifest's size and sha256 the first time
any of their members is read; only the shard names the sampler makes are opened.
"""
from __future__ import annotations

import json
import re

import numpy as np

from cdp_fast.data.convert import MODEL_SPACE_LIMIT, check_image_values, images_to_float01
from cdp_fast.data.lazy import LazyConcat
from cdp_fast.data.npz import npz_keys, read_member, shard_intact, write_npz
from cdp_fast.data.parts import image_label_keys, open_class_folder, open_npz_parts, part_paths
from cdp_fast.utils.checks import is_int

__all__ = ["Samples", "integer_labels"]

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
        """Samples stored in any of these forms, images read lazily (never merged in memory):

        - an out directory of :func:`cdp_fast.sample` (its manifest lists the finished shards);
        - an npz with ``image``/``label`` (or ``arr_0``/``arr_1``) keys;
        - several npz parts, concatenated in order (DM-Improves-AT's 20M / 50M sets): a list of
          paths, or a string naming no existing file that lists them with commas and/or glob
          patterns (``"aux/50m_part*.npz"``, matches sorted by name;
          :func:`cdp_fast.data.parts.part_paths`); all parts with labels, or none;
        - a folder of per-class ``{k}.npy`` files without manifest.json (EDM / DM-Improves-AT
          ``generate.py``: ``k.npy`` holds class k's images, uint8 NHWC): labels k.

        Uncompressed members and ``.npy`` files are memory-mapped / read by position; a
        compressed npz part is decompressed whole when read (:mod:`cdp_fast.data.lazy`).
        For an out directory, only shard names the sampler makes (``shard-NNNNNN.npz``, inside
        it) are accepted, and each shard is checked against the manifest's size and sha256 the
        first time it is read (``verify=False`` skips the hashing: faster, trusts the files);
        a missing, truncated or corrupted shard is a ValueError naming it. Labels and
        confidences are read on load, so every shard holding them is checked then."""
        paths = part_paths(path)
        if len(paths) > 1:
            images, labels, conf, meta = open_npz_parts(paths)
            if labels is not None:
                labels = np.concatenate([integer_labels(lab, f"path {p}: labels")
                                         for p, lab in zip(paths, labels)])
            return cls(images, labels, conf, meta=meta)
        path = paths[0]
        if path.is_dir():
            manifest_path = path / "manifest.json"
            if not manifest_path.exists():
                images, labels, meta = open_class_folder(path)
                return cls(images, labels, meta=meta)
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
            ik, lk = image_label_keys(path, keys)
            images = read_member(path, ik)
            labels = integer_labels(read_member(path, lk), f"{path}: {lk}") if lk else None
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
