"""What the metrics take: an :class:`ImageSet` (x float32 NCHW in [0, 1] on the CPU, int64
labels or None, confidences, an out folder's manifest), made by :func:`as_image_set` from
anything the package produces through the one image adapter
(:func:`cdp_fast.data.open_images`), and the two argument helpers every metric calls
(:func:`as_x01`, :func:`as_labels`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from cdp_fast.data.samples import integer_labels
from cdp_fast.data.sources import open_images

__all__ = ["ImageSet", "as_image_set", "as_x01", "as_labels", "as_features", "check_positive_int"]


@dataclass
class ImageSet:
    """A set of images in the metrics' convention.

    x: float32 (N, C, H, W) in [0, 1], CPU; y: int64 (N,) or None; confidence: float (N,)
    numpy or None; meta: the manifest of an out folder (or {}); name: for messages.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    confidence: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)
    name: str = "images"

    def __len__(self):
        return len(self.x)


def as_image_set(data, name: str = "samples", *, max_samples: Optional[int] = None) -> ImageSet:
    """Convert what the package produces into an :class:`ImageSet`.

    Args:
        data: a :class:`cdp_fast.Samples`; a path (npz or out folder, via ``Samples.load``);
            an ``(x, y)`` pair (x uint8 NHWC / grey NHW or float NCHW in [0, 1], tensor or array;
            y integers or None); an image batch alone; or an :class:`ImageSet` (returned as is,
            cut to ``max_samples``). Read by :func:`cdp_fast.data.open_images`.
        name: used in error messages.
        max_samples: keep the first N >= 1 images only (None: all).
    Returns:
        ImageSet with x float32 (N, C, H, W) in [0, 1]. Float images of a ``Samples`` are model
        space [-1, 1] (``output="float"``) and are mapped by ``images_to_float01(model_space=True)``.
    Raises:
        ValueError naming ``name`` for anything else, labels of the wrong length, or images
        the adapter refuses (NaN / inf, out of range: :mod:`cdp_fast.data.sources`); naming
        ``max_samples`` unless it is None or an int >= 1.
    """
    if max_samples is not None:
        check_positive_int(max_samples, "max_samples")
    if isinstance(data, ImageSet):
        s = data
    else:
        src = open_images(data, name, pairs=True)
        n = len(src) if max_samples is None else min(len(src), int(max_samples))
        x = src.to_tensor(n)
        if x.dim() != 4:
            raise ValueError(f"{name} must be a batch of images (N, C, H, W), got shape {tuple(x[:1].shape)}")
        y = None
        labels = src.labels
        if labels is not None:
            y_arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if not np.issubdtype(y_arr.dtype, np.integer):
                raise ValueError(f"{name} labels must be integers, got {y_arr.dtype}")
            if len(y_arr) < n:
                raise ValueError(f"{name}: {len(y_arr)} labels for {len(src)} images")
            y = torch.from_numpy(y_arr[:n].astype(np.int64))
            if len(y) and int(y.min()) < 0:
                raise ValueError(f"{name} labels must be >= 0")
        conf = None if src.confidence is None else np.asarray(src.confidence, np.float64)
        return ImageSet(x, y, None if conf is None else conf[:n], src.meta, name)
    if max_samples is not None and len(s) > max_samples:
        m = int(max_samples)
        s = ImageSet(s.x[:m], None if s.y is None else s.y[:m],
                     None if s.confidence is None else s.confidence[:m], s.meta, s.name)
    return s


def as_x01(x, name="x") -> torch.Tensor:
    """float NCHW [0, 1] from anything :func:`as_image_set` accepts as images (a float tensor
    is taken as it is, cast to float32)."""
    if isinstance(x, ImageSet):
        return x.x
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return as_image_set((x, None), name).x


def as_labels(y, n, name="y") -> torch.Tensor:
    """y as an int64 CPU tensor (N,); ValueError naming ``name`` unless it has ``n`` entries of
    whole numbers (float labels like 3.0 are taken, 8.7 is refused, never truncated)."""
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = torch.from_numpy(integer_labels(y.reshape(-1), f"{name} labels"))
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} items")
    return y


def as_features(f, name: str = "features") -> torch.Tensor:
    """Features (N, ...) as float64 (N, d) on the CPU; ValueError naming ``name`` if any value
    is NaN or inf (a distance or a class mean from them would be silently wrong)."""
    f = torch.as_tensor(f)
    f = f.reshape(len(f), -1).to("cpu", torch.float64)
    ok = torch.isfinite(f).all(1)
    if not bool(ok.all()):
        raise ValueError(f"{name} hold NaN or inf values ({int((~ok).sum())} of {len(f)} rows, the "
                         f"first at row {int((~ok).nonzero()[0, 0])}); features must be finite")
    return f


def check_positive_int(v, name: str) -> int:
    """``v`` as an int; ValueError naming ``name`` unless it is an int >= 1 (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)
