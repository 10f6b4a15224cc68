"""PNG output: a uint8 image written atomically (:func:`write_png`), and NHWC images tiled into
one grid image (:func:`image_grid`, :func:`save_grid_png`); used by `cdp-fast sample --grid` and
the demo's sample grids. Needs Pillow (the ``demo`` extra) only when a file is written."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from cdp_fast.utils.io import atomic_write_bytes

__all__ = ["write_png", "image_grid", "save_grid_png"]


def write_png(path, img: np.ndarray) -> None:
    """Write a uint8 image (H, W) grey or (H, W, 1|3) RGB as PNG (Pillow), atomically."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"img must be uint8 (H, W) or (H, W, 1|3), got {img.dtype} {img.shape}")
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("writing PNG grids needs Pillow: pip install 'cdp_fast[demo]'") from e
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")   # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    atomic_write_bytes(Path(path), buf.getvalue())


def image_grid(images: np.ndarray, nrow: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images (N, H, W, C) into one uint8 image, each upscaled ``scale``×
    (nearest neighbour) with a ``pad``-pixel border of value 128; (H', W') for C = 1."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nr = math.ceil(n / ncol)
    grid = np.full((nr * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid[:, :, 0] if c == 1 else grid


def save_grid_png(path, images, nrow: int = 8, scale: int = 4) -> None:
    """Save uint8 NHWC images as a PNG grid."""
    write_png(path, image_grid(np.asarray(images), nrow=nrow, scale=scale))
