"""The one image-input adapter: every function that takes a collection of images (training's
:func:`as_source`, :mod:`cdp_fast.metrics`, :mod:`cdp_fast.label`, :func:`cdp_fast.evaluate`)
opens it with :func:`open_images` and reads it through the :class:`ImageSource` it returns.

The rule (docs/design.md §3, the image conventions), checked here, when the input is opened,
before any work, so label, select, train, inspect and eval refuse the same inputs alike:

- accepted: a torch tensor or anything ``np.asarray`` takes (lists; memory-mapped or lazy
  shard views are read piece by piece, never whole); a :class:`~cdp_fast.data.samples.Samples`
  (anything with ``images`` and ``labels``; its labels, confidences and manifest travel along);
  a path or a list of paths (anything :meth:`Samples.load` opens: an npz, an out directory of
  :func:`cdp_fast.sample`, npz parts, a folder of per-class ``{k}.npy`` files); and, with
  ``pairs=True``, an ``(x, y)`` tuple or list (a list of paths is never read as a pair);
- dtype: uint8 images are NHWC (or grey NHW) and read as value / 255; float images of a
  Samples / npz / out directory (not a tensor) are model space [-1, 1] (``output="float"``,
  any item shape) and read as ``((x + 1) / 2).clamp(0, 1)``; every other float input is NCHW
  in [0, 1] and passes through as it is (dtype, device); any other dtype (int64, bool, ...)
  is a ValueError naming the input and the dtype;
- values (float images, scanned once at open, :func:`check_image_values`): NaN or inf is a
  ValueError naming the input and the first bad image; [0, 1] inputs must lie in [0, 1];
  model-space images must lie in [-2, 2] (the sampler does not clip, so a little overshoot
  beyond [-1, 1] is normal and is clamped, as in the uint8 files; 0..255 values are refused,
  naming the range found); model-space images that all lie in [0, 1] are read as model
  space, with one UserWarning that they look like [0, 1] images;
- every read goes through :func:`~cdp_fast.data.convert.images_to_float01`.

Label checks stay the callers' (training: integers in [0, K); the metrics: integers >= 0).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import numpy as np

from cdp_fast.data.convert import MODEL_SPACE_LIMIT, check_image_values, images_to_float01
from cdp_fast.data.lazy import read_rows
from cdp_fast.data.samples import Samples, integer_labels

if TYPE_CHECKING:   # torch is imported where it is used
    import torch

__all__ = ["ImageSource", "open_images", "is_samples", "is_path_list", "check_unit_range", "BatchSource",
           "as_source"]


def is_samples(obj) -> bool:
    """A :class:`Samples`, duck-typed: anything with ``images`` and ``labels``."""
    return hasattr(obj, "images") and hasattr(obj, "labels")


def is_path_list(obj) -> bool:
    """A non-empty list or tuple of paths (str / PathLike): the parts of one set."""
    return (isinstance(obj, (list, tuple)) and len(obj) > 0
            and all(isinstance(p, (str, os.PathLike)) for p in obj))


def check_unit_range(x, what: str) -> None:
    """ValueError ``"{what} must be in [0, 1], got values in [lo, hi]"`` unless every value of
    ``x`` (a tensor, an array or a lazy view, read in chunks) lies in [0, 1]; NaN or inf is a
    ValueError naming ``what`` too."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    check_image_values(x, what, 0.0, 1.0)


def _check_values(images, kind: str, what: str) -> None:
    """The value half of the rule (module docstring): finite, and in range for the kind."""
    if kind == "unit":
        check_image_values(images, what, 0.0, 1.0)
    elif kind == "model":
        lo, _ = check_image_values(
            images, f"{what} (float images of a Samples / npz are model space [-1, 1])",
            -MODEL_SPACE_LIMIT, MODEL_SPACE_LIMIT,
            hint="store 0..255 images as uint8 NHWC, or float images as model space 2·x − 1")
        if lo >= 0.0:
            import warnings

            warnings.warn(f"{what}: float images of a Samples / npz are read as model space "
                          f"[-1, 1], but every value is >= 0, as in [0, 1] images; if they are "
                          "[0, 1] images, store them as 2·x − 1 (or uint8 NHWC)", UserWarning,
                          stacklevel=3)


class ImageSource:
    """N images, read as float NCHW in [0, 1] a piece at a time (:func:`open_images`).

    Attributes: ``images`` (as given: tensor, array or lazy shard view), ``kind`` ("uint8",
    "unit": float in [0, 1], or "model": float in [-1, 1]), ``image_shape`` (of one image as
    read, e.g. (C, H, W)), ``name`` (for messages), and what came along: ``labels`` (raw, or
    None), ``confidence`` (raw, or None), ``meta`` (a Samples' manifest, else {}),
    ``from_samples``.
    """

    def __init__(self, images, kind: str, name: str, image_shape: tuple, *, labels=None,
                 confidence=None, meta=None, from_samples: bool = False):
        self.images, self.kind, self.name, self.image_shape = images, kind, name, image_shape
        self.labels, self.confidence, self.meta = labels, confidence, dict(meta or {})
        self.from_samples = from_samples
        self.n = len(images)

    def __len__(self):
        return self.n

    def rows(self, lo: int, hi: int):
        """Images [lo, hi) as stored (uint8 NHWC, float model space, or the [0, 1] tensor /
        array); a file-backed array is read into a fresh array (:func:`~cdp_fast.data.lazy.read_rows`),
        so a pass over the images leaves no mapped pages behind."""
        return read_rows(self.images, lo, hi)

    def convert(self, rows):
        """Stored rows (:meth:`rows`) as float NCHW in [0, 1] (see :meth:`read`)."""
        if self.kind == "model":
            return images_to_float01(np.asarray(rows, dtype=np.float32), self.name, model_space=True)
        return images_to_float01(rows, self.name)

    def read(self, idx):
        """Images ``idx`` (a slice or an index array) as float NCHW in [0, 1]: float32 for
        uint8 and model-space images; [0, 1] floats as stored (same dtype and device)."""
        if isinstance(idx, slice) and idx.step in (None, 1):
            lo, hi, _ = idx.indices(self.n)
            return self.convert(self.rows(lo, max(lo, hi)))
        return self.convert(self.images[idx])

    def all(self):
        """Every image at once (:meth:`read` of everything; a [0, 1] float tensor is returned
        as it is, not copied)."""
        if self.kind == "model":
            return self.read(slice(None))
        return images_to_float01(self.images, self.name)

    def batches(self, batch_size: int):
        """(start, float32 (B, C, H, W)) for consecutive batches of ``batch_size`` images."""
        for i in range(0, self.n, batch_size):
            yield i, self.read(slice(i, min(self.n, i + batch_size))).float()

    def gather(self, idx: np.ndarray):
        """Images ``idx`` (int64 (B,)) as float32 (B, C, H, W). Lazy views are read in sorted
        order (shard-friendly); a tensor is indexed on its device (uint8 then converted on the
        CPU, floats left where they are)."""
        import torch

        if isinstance(self.images, torch.Tensor):
            part = self.images[torch.from_numpy(idx).to(self.images.device)]
            return images_to_float01(part.cpu(), self.name) if self.kind == "uint8" else part.float()
        if self.kind == "uint8":
            order = np.argsort(idx, kind="stable")  # sorted reads are shard-friendly
            arr = np.asarray(self.images[idx[order]])
            x = torch.empty((len(idx),) + self.image_shape)
            x[torch.from_numpy(order)] = images_to_float01(arr, self.name)
            return x
        return self.read(idx).float()

    def to_tensor(self, limit=None, chunk: int = 4096):
        """The first ``limit`` images (slice semantics; None: all) as one float32 CPU tensor,
        converted ``chunk`` images at a time."""
        import torch

        n = len(range(self.n)[:limit])
        if n == 0:
            raise ValueError(f"{self.name} is empty")
        out = torch.empty((n,) + self.image_shape, dtype=torch.float32)
        for s in range(0, n, chunk):
            part = self.read(slice(s, min(s + chunk, n)))
            out[s:s + len(part)] = part.float().cpu()
        return out


def open_images(data, name: str = "images", *, pairs: bool = False) -> ImageSource:
    """Open any accepted image collection (see the module docstring) as an :class:`ImageSource`.

    Args:
        data: tensor / array-like images, a Samples, a path or list of paths
            (:meth:`Samples.load`), or (``pairs=True``) an (x, y) pair.
        name: names the input in every error.
        pairs: read a tuple or list of two as (images, labels); otherwise a tuple or list is a
            batch of images.
    Raises:
        ValueError naming ``name``: a missing path, a pair of the wrong length, an unsupported
        dtype, float [0, 1] images that are not NCHW, uint8 images that are not NHWC / NHW,
        no images, NaN / inf values, values out of range (the module docstring's rule).
    """
    import torch

    if isinstance(data, (str, os.PathLike)) or is_path_list(data):
        if isinstance(data, (str, os.PathLike)) and not os.path.exists(data) and not (
                isinstance(data, str) and ("," in data or any(c in data for c in "*?["))):
            raise ValueError(f"{name}: {data} does not exist")
        try:
            data = Samples.load(data)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    labels = confidence = None
    meta = {}
    what = name                           # names the images in value errors
    from_samples = is_samples(data)
    if from_samples:
        images, labels = data.images, data.labels
        confidence = getattr(data, "confidence", None)
        meta = getattr(data, "meta", {}) or {}
    elif pairs and isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be an (x, y) pair, got {len(data)} items")
        images, labels = data
        what = f"{name} x"
    else:
        images = data
    if not isinstance(images, torch.Tensor) and not hasattr(images, "dtype"):
        try:
            arr = np.asarray(images)
        except (ValueError, TypeError):   # ragged sequences, a Dataset, ...
            arr = None
        if arr is None or arr.dtype.kind in "OUS":
            forms = "a Samples, a path, an (x, y) pair" if pairs else "a Samples, a path"
            raise ValueError(f"{name} must be {forms} or an image batch; got {type(images).__name__}")
        images = arr
    shape = tuple(images.shape)
    if isinstance(images, torch.Tensor):
        dtype = images.dtype
        kind = "uint8" if dtype == torch.uint8 else "unit" if images.is_floating_point() else None
    else:
        dtype = np.dtype(images.dtype)
        kind = ("uint8" if dtype == np.uint8 else None if not np.issubdtype(dtype, np.floating)
                else "model" if from_samples else "unit")
    if kind is None:
        raise ValueError(f"{name} images must be uint8 (NHWC, 0..255) or float, got dtype {dtype} "
                         f"{shape}; convert 0..255 integers with .astype(np.uint8)")
    if not shape or (kind == "unit" and len(shape) != 4):
        raise ValueError(f"{name} must be float NCHW in [0, 1] or uint8 NHWC, got {dtype} {shape}")
    if kind == "uint8":   # rank and layout errors (NHWC or grey NHW), on the first image
        image_shape = tuple(images_to_float01(images[:1], name).shape[1:])
    else:
        image_shape = shape[1:]
    if shape[0] == 0:
        raise ValueError(f"{name} is empty")
    _check_values(images, kind, what)
    return ImageSource(images, kind, name, image_shape, labels=labels, confidence=confidence,
                       meta=meta, from_samples=from_samples)


# ----------------------------------------------------------------------------- training inputs
class BatchSource:
    """Uniform random access to (x float32 NCHW in [0, 1], y int64) batches (:func:`as_source`)."""

    def __init__(self, get: Callable[[np.ndarray], tuple], n: int, image_shape: tuple, what: str):
        self._get, self.n, self.image_shape, self.what = get, n, image_shape, what

    def __len__(self):
        return self.n

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get(idx)


def as_source(data, name: str = "train_data") -> BatchSource:
    """Wrap any input form of :func:`cdp_fast.train_trades` as a batch source.

    Accepted forms: a tuple ``(x, y)`` of tensors / arrays (x float NCHW in [0, 1], or uint8
    NHWC; y integers), a ``torch.utils.data.Dataset`` of (x, y) pairs (x float CHW in [0, 1]),
    a :class:`Samples` (uint8 NHWC images, or float images in [-1, 1] model space; labels
    required) or a path or list of paths (anything :meth:`Samples.load` opens: an npz with
    image/label or arr_0/arr_1 keys, an out directory of :func:`cdp_fast.sample`, npz parts,
    a folder of per-class ``{k}.npy`` files; read lazily). Images are read through
    :func:`open_images`.

    Returns a :class:`BatchSource`: ``len()``, ``image_shape`` (C, H, W) and ``get(idx)``: idx
    (B,) int64 -> (x float32 (B, C, H, W) in [0, 1], y int64 (B,)). Raises ValueError naming
    ``name`` for anything else.
    """
    import torch

    if not (isinstance(data, (str, os.PathLike, tuple, list)) or is_samples(data)):
        if isinstance(data, torch.utils.data.Dataset):
            return _dataset_source(data, name)
        raise ValueError(f"{name} must be an (x, y) pair, a Dataset, a Samples or a path; got "
                         f"{type(data).__name__}")
    src = open_images(data, name, pairs=True)
    if src.from_samples:
        if src.labels is None:
            raise ValueError(f"{name} has no labels: pseudo-label it first "
                             "(cdp_fast.label.pseudo_label)")
        labels = integer_labels(src.labels, f"{name} labels")
        if len(labels) != len(src):
            raise ValueError(f"{name}: {len(labels)} labels for {len(src)} images")

        def get_labels(idx):
            return torch.from_numpy(labels[idx])
    else:
        y = src.labels
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} labels must be integers, got {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"{name} labels must be class indices of shape (N,), got shape "
                             f"{tuple(y.shape)} (one-hot labels: pass y.argmax(1))")
        y = y.long().cpu()
        if len(src) != len(y):
            raise ValueError(f"{name}: x {tuple(src.images.shape)} and y {tuple(y.shape)} must be a "
                             "non-empty image batch and matching labels")

        def get_labels(idx):
            return y[torch.from_numpy(idx)]
    return BatchSource(lambda idx: (src.gather(idx), get_labels(idx)), len(src), src.image_shape, name)


def _dataset_source(data, name: str) -> BatchSource:
    """A map-style Dataset of (x float CHW in [0, 1], y) items, stacked batch by batch."""
    import torch

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
    return BatchSource(get, n, shape, name)
