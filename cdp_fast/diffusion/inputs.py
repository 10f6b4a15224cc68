"""The training data of :func:`cdp_fast.train_diffusion`, opened and checked before any work.

An ε-model lives in the sampler's space [-1, 1] (docs/design.md §3), so this trainer's float
inputs are model space — unlike a classifier's (``train_trades`` takes [0, 1]). The rule, each
failure a ValueError naming ``data`` (or ``data x`` / ``data y``):

- ``x`` alone (a tensor or anything ``np.asarray`` takes), an ``(x, y)`` pair (y may be None),
  a :class:`cdp_fast.Samples`, a path (npz / out directory, opened as a Samples) or a map-style
  ``torch.utils.data.Dataset`` of (x, y) items;
- float x (tensor / array / Dataset items): NCHW (CHW items) in [-1, 1], finite. Float images
  whose values all lie in [0, 1] are refused as [0, 1] images passed by mistake (pass
  ``2 * x - 1``): a real image set in [-1, 1] has negative values (its dark pixels), and
  training on [0, 1] data would give a model whose samples are off by an affine map;
- uint8 x: NHWC (or grey NHW), read as 2·value/255 − 1; a Samples / npz / out directory as
  :func:`cdp_fast.data.open_images` reads it (uint8 or model-space floats, the latter clamped
  to [-1, 1]), mapped to [-1, 1]; other dtypes are refused naming the dtype;
- labels: whole numbers of shape (N,) (:func:`cdp_fast.data.samples.integer_labels`), one per
  image; required and checked to lie in [0, K) when the model is class-conditional (it has
  ``num_classes = K``), otherwise ignored (their count is still checked). A Dataset's items
  are checked batch by batch as they are read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from cdp_fast.data import Samples, as_source, open_images
from cdp_fast.data.convert import check_image_values
from cdp_fast.data.samples import integer_labels
from cdp_fast.data.sources import is_samples

__all__ = ["TrainingData", "open_training_data", "check_labels_in_range"]

_UNIT_HINT = ("these look like [0, 1] images: train_diffusion takes float images in the "
              "ε-model's space [-1, 1]; pass 2 * x - 1 (or uint8 NHWC images)")


@dataclass(frozen=True)
class TrainingData:
    """N training examples: ``get(idx)`` with idx int64 (B,) numpy -> (x float32 (B, C, H, W)
    in [-1, 1] on the CPU, y int64 (B,) or None); ``raw`` is what :func:`cdp_fast.utils.checkpoint.
    data_fingerprint` hashes (None: not fingerprinted)."""
    n: int
    image_shape: tuple
    get: Callable
    raw: object
    labelled: bool


def check_labels_in_range(y, what: str, num_classes: Optional[int]) -> None:
    """ValueError naming ``what`` unless every label lies in [0, num_classes) (None: no check)."""
    if num_classes is None or y is None or not len(y):
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}) for a model with "
                         f"num_classes={num_classes}, found labels in [{lo}, {hi}]")


def _float_images(x, name: str) -> torch.Tensor:
    """Float NCHW model-space images as a float32 CPU tensor, after the value checks."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be float NCHW in [-1, 1] (or uint8 NHWC), got "
                         f"{x.dtype} {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty")
    lo, _ = check_image_values(x, name, -1.0, 1.0, hint=_UNIT_HINT)
    if lo >= 0.0:
        raise ValueError(f"{name} must be in [-1, 1], got values in [{lo:.3g}, "
                         f"{float(x.max()):.3g}]; {_UNIT_HINT}")
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to("cpu", torch.float32).contiguous()


def _is_float(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return hasattr(x, "dtype") and np.issubdtype(np.dtype(x.dtype), np.floating)


def _labels(y, n: int, name: str) -> Optional[torch.Tensor]:
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = integer_labels(y, f"{name} y")
    if len(y) != n:
        raise ValueError(f"{name}: {len(y)} labels for {n} images (data x and data y must have "
                         "one label per image)")
    return torch.from_numpy(y)


def open_training_data(data, num_classes: Optional[int], name: str = "data") -> TrainingData:
    """Open ``data`` by the module docstring's rule; ``num_classes``: the model's K (labels
    required and range-checked) or None (unconditional: labels ignored)."""
    if isinstance(data, (str, os.PathLike)):
        if not os.path.exists(data):
            raise ValueError(f"{name}: {data} does not exist")
        data = Samples.load(data)
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
        return _dataset(data, num_classes, name)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not _looks_like_images(data):
        x, y = data
        raw = data
    elif is_samples(data):
        x, y, raw = data, None, data
    else:
        x, y, raw = data, None, (data, None)
    what = f"{name} x" if raw is data and not is_samples(data) else name
    if not is_samples(x) and not isinstance(x, torch.Tensor) and not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError):
            raise ValueError(f"{what} must be an image batch, got {type(x).__name__}") from None
    if not is_samples(x) and _is_float(x):
        images = _float_images(x, what)
        n, shape = len(images), tuple(images.shape[1:])

        def read(idx):
            return images[torch.from_numpy(idx)]
    else:   # uint8, a Samples, or a dtype open_images refuses by name
        src = open_images(x, what)
        if src.from_samples:
            y = src.labels
        n, shape = len(src), tuple(src.image_shape)

        def read(idx):
            return src.gather(idx).float().mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)
    labels = _labels(y, n, name)
    if num_classes is not None:
        if labels is None:
            raise ValueError(f"{name} needs labels: the model is class-conditional "
                             f"(num_classes={num_classes}); pass (x, y) or labelled Samples")
        check_labels_in_range(labels, f"{name} y", num_classes)

    def get(idx):
        return read(idx), (None if labels is None else labels[torch.from_numpy(idx)])
    return TrainingData(n=n, image_shape=shape, get=get, raw=raw, labelled=labels is not None)


def _looks_like_images(seq) -> bool:
    """A list/tuple that is itself an image batch (its items are arrays of equal shape beyond
    two), not an (x, y) pair."""
    return len(seq) != 2 or (hasattr(seq[0], "shape") and hasattr(seq[1], "shape")
                             and tuple(seq[0].shape) == tuple(seq[1].shape) and len(seq[0].shape) >= 2)


def _dataset(data, num_classes: Optional[int], name: str) -> TrainingData:
    """A map-style Dataset of (x float CHW in [-1, 1], y) items, checked batch by batch."""
    src = as_source(data, name)

    def get(idx):
        x, y = src.get(idx)
        if not x.is_floating_point():
            raise ValueError(f"{name} items must be float CHW images in [-1, 1], got {x.dtype}")
        lo, _ = check_image_values(x, f"{name} items", -1.0, 1.0, hint=_UNIT_HINT)
        check_labels_in_range(y, f"{name} labels", num_classes)
        return x.float(), (y if num_classes is not None else None)
    return TrainingData(n=len(src), image_shape=tuple(src.image_shape), get=get, raw=data,
                        labelled=True)
