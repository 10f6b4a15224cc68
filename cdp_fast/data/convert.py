"""The two pixel conversions: stored or given images to the float NCHW [0, 1] tensors that
classifiers take (:func:`images_to_float01`, the one conversion every reader uses), and
model-space images to the uint8 NHWC of the files (:func:`to_uint8_nhwc`).

torch is imported inside the functions: storage alone never loads it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["images_to_float01", "to_uint8_nhwc", "check_image_values", "MODEL_SPACE_LIMIT"]

#: float images of a Samples / npz are model space [-1, 1]; the sampler does not clip, so a
#: little overshoot is normal (and clamped when read); |value| > 2 is not model space.
MODEL_SPACE_LIMIT = 2.0


def check_image_values(images, what: str, lo: float, hi: float, *, hint: str = "",
                       chunk: int = 4096) -> tuple:
    """(min, max) of the float ``images`` (a tensor, an array, a memory map or a lazy shard
    view, read ``chunk`` images at a time), after checking them.

    Raises ValueError naming ``what``: a NaN or inf value (with the index of the first image
    holding one), or a value outside [lo, hi] (with the range found, then ``hint``)."""
    import torch

    if isinstance(images, torch.Tensor):
        blocks = [(0, images.detach())]
    else:
        blocks = ((s, np.asarray(images[s:s + chunk])) for s in range(0, len(images), chunk))
    vmin, vmax = float("inf"), float("-inf")
    for start, t in blocks:
        if t.size == 0 if isinstance(t, np.ndarray) else t.numel() == 0:
            continue
        flat = t.reshape(len(t), -1)
        ok = torch.isfinite(flat).all(1) if isinstance(t, torch.Tensor) else np.isfinite(flat).all(1)
        if not bool(ok.all()):
            first = start + int((~ok).nonzero()[0].reshape(-1)[0])
            raise ValueError(f"{what} holds NaN or inf values (the first in image {first}); "
                             "images must be finite")
        vmin, vmax = min(vmin, float(t.min())), max(vmax, float(t.max()))
    if vmin < lo or vmax > hi:
        raise ValueError(f"{what} must be in [{lo:g}, {hi:g}], got values in [{vmin:.3g}, {vmax:.3g}]"
                         + (f"; {hint}" if hint else ""))
    return vmin, vmax


def images_to_float01(arr, name: str = "images", *, model_space: bool = False):
    """Images as the float NCHW tensor in [0, 1] that classifiers take (the one conversion).

    - uint8 (N, H, W, C), or grey (N, H, W) -> float32 (N, C, H, W) = value / 255, contiguous;
    - float (N, C, H, W) in [0, 1] passes through (same dtype, device and storage);
    - float with ``model_space=True``: images in model space [-1, 1] (a :class:`Samples` of
      ``output="float"``) -> float32 ``((x + 1) · ½).clamp(0, 1)``, any shape.

    ``arr`` is a torch tensor or anything ``np.asarray`` takes (a memory-mapped shard view
    included; read-only arrays are copied, never written). uint8 NCHW input (last dim not 1
    or 3 while dim 1 is) is refused; other range and layout checks are the caller's. Raises
    ValueError naming ``name`` for other dtypes, ranks or that layout.
    """
    import torch

    if isinstance(arr, torch.Tensor):
        t = arr
    else:
        a = np.asarray(arr)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    if t.dtype == torch.uint8:
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} as uint8 must be NHWC (N, H, W, C) or grey (N, H, W), "
                             f"got shape {tuple(t.shape)}")
        if t.dim() == 3:  # (N, H, W) grey
            t = t.unsqueeze(-1)
        elif t.shape[-1] not in (1, 3) and t.shape[1] in (1, 3):
            # (N, 3, 32, 32) read as NHWC would train on 32-"channel" images of 3 x 32 pixels
            raise ValueError(f"{name} as uint8 must be NHWC (N, H, W, C), got (N, "
                             f"{', '.join(map(str, t.shape[1:]))}): the NCHW layout (channels in "
                             "dim 1); pass NHWC (x.transpose(0, 2, 3, 1)) or float NCHW in [0, 1]")
        return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise ValueError(f"{name} images must be uint8 NHWC or float NCHW in [0, 1], got {t.dtype}")
    if model_space:
        return ((t.float() + 1) * 0.5).clamp_(0, 1)
    return t


def to_uint8_nhwc(x):
    """Model-space images in [-1, 1] -> uint8 via ``(x * 127.5 + 128).clamp(0, 255)``
    (docs/design.md §3), NCHW -> NHWC for 4-D input. Accepts a torch tensor."""
    import torch

    u = (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if u.dim() == 4:
        u = u.permute(0, 2, 3, 1)
    return u.contiguous()
