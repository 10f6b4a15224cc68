"""Augmentation and random draws of :func:`cdp_fast.train_diffusion`, per sample.

- :func:`random_resized_crop`: torchvision's ``RandomResizedCrop`` in plain torch, batched, back
  to the input size — the augmentation of Sehwag et al.'s minimal-diffusion for MNIST-sized
  images (``scale=(0.8, 1)``, ``ratio=(0.8, 1.2)``); :func:`crop_boxes` turns uniforms into
  its integer crop boxes.
- :func:`sample_draws`: the per-sample randomness of one training example — its noise ε, its
  timestep t and its crop uniforms — a function of (seed, epoch, dataset index) only, drawn by
  the counter-based generator :func:`cdp_fast.utils.seeding.counter_normal` on the batch's
  device. A run therefore does not depend on the batch composition, the number of processes
  or an interruption: resume is exact and every rank draws the same numbers for an image.

Shapes: images (B, C, H, W) float; boxes (B,) long each; draws: ε (B, C, H, W), t (B,) long,
u (B, 4) float64 in (0, 1).
"""
from __future__ import annotations

import math

import torch

from cdp_fast.utils.seeding import counter_normal, sample_seed, sample_seeds

__all__ = ["random_resized_crop", "crop_boxes", "sample_draws", "epoch_seed"]


def crop_boxes(u: torch.Tensor, size: tuple, scale=(0.8, 1.0), ratio=(0.8, 1.2)):
    """(top, left, h, w), each long (B,), of RandomResizedCrop boxes from uniforms u (B, 4).

    As ``torchvision.transforms.RandomResizedCrop.get_params``: area fraction s ~ U(scale),
    log aspect ~ U(log ratio), w = round(√(s·H·W·r)), h = round(√(s·H·W / r)), offsets uniform
    over the positions that keep the box inside. One draw per image instead of torchvision's
    up-to-10 rejection tries: w and h are clamped to [1, W] and [1, H] (at 8×8 and the default
    ranges, w and h stay in 6..9 before clamping; torchvision would redraw the 9s)."""
    H, W = int(size[0]), int(size[1])
    u = u.to(torch.float64)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lr0 + (lr1 - lr0) * u[:, 1])
    area = s * (H * W)
    w = torch.round(torch.sqrt(area * r)).long().clamp(1, W)
    h = torch.round(torch.sqrt(area / r)).long().clamp(1, H)
    top = torch.minimum((u[:, 2] * (H - h + 1)).long(), H - h)
    left = torch.minimum((u[:, 3] * (W - w + 1)).long(), W - w)
    return top, left, h, w


def _axis(start, size, out: int):
    """Bilinear source indices and weights along one axis, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes them for an input of ``size`` pixels resized to ``out``:
    src = (d + ½)·size/out − ½ clamped at 0; neighbours i0 and min(i0 + 1, size − 1)."""
    d = torch.arange(out, device=start.device, dtype=torch.float64) + 0.5
    sz = size.to(torch.float64)[:, None]
    src = (d[None, :] * (sz / out) - 0.5).clamp(min=0.0)                   # (B, out)
    i0 = torch.minimum(src.floor().long(), size[:, None] - 1)
    i1 = torch.minimum(i0 + 1, size[:, None] - 1)
    lam = (src - i0.to(torch.float64))
    return start[:, None] + i0, start[:, None] + i1, lam


def random_resized_crop(x: torch.Tensor, top, left, h, w) -> torch.Tensor:
    """Crop box b of image b, resized back to (H, W) bilinearly (``align_corners=False``, no
    antialias: the boxes are at most a pixel or two smaller than the image), batched.

    Args:
        x: (B, C, H, W) float images (any range: the output is a convex combination of input
            pixels, so it stays within [min, max] of its image).
        top, left, h, w: long (B,) boxes inside the image (:func:`crop_boxes`).
    Returns:
        (B, C, H, W), same dtype and device. A box that is the whole image returns that image
        bit for bit (weights exactly 1 and 0). Equal to a per-image ``F.interpolate`` of the
        crop to float rounding (a test)."""
    B, C, H, W = x.shape
    dev = x.device
    top, left, h, w = (v.to(dev) for v in (top, left, h, w))
    r0, r1, ly = _axis(top, h, H)
    c0, c1, lx = _axis(left, w, W)
    ly = ly.to(x.dtype)[:, :, None, None]             # (B, H, 1, 1)
    lx = lx.to(x.dtype)[:, None, :, None]             # (B, 1, W, 1)
    xh = x.permute(0, 2, 3, 1)                        # (B, H, W, C)
    b = torch.arange(B, device=dev)[:, None, None]

    def at(r, c):
        return xh[b, r[:, :, None], c[:, None, :]]    # (B, H, W, C)

    top_row = (1 - lx) * at(r0, c0) + lx * at(r0, c1)
    bottom_row = (1 - lx) * at(r1, c0) + lx * at(r1, c1)
    out = (1 - ly) * top_row + ly * bottom_row
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_seed(seed: int, epoch: int) -> int:
    """The key of epoch ``epoch`` of a run seeded ``seed`` (its data order, its draws)."""
    return sample_seed(sample_seed(seed, 0x5EED), epoch)


def sample_draws(seed: int, epoch: int, index, image_shape: tuple, T: int, device):
    """(ε, t, u) of the training examples with dataset indices ``index`` (B,) in epoch
    ``epoch``: ε (B, *image_shape) float32 standard normal, t (B,) long uniform on {0..T−1},
    u (B, 4) float64 uniform in (0, 1) (the crop's). Each row is a function of (seed, epoch,
    its index) only (counter-based: :func:`cdp_fast.utils.seeding.counter_normal`; the
    uniforms are Φ of its normals)."""
    keys = sample_seeds(epoch_seed(seed, epoch), [int(i) for i in index], device=device)
    eps = counter_normal(keys, 0, tuple(image_shape))
    u = torch.special.ndtr(counter_normal(keys, 1, (5,), dtype=torch.float64))
    t = (u[:, 0] * T).long().clamp(max=T - 1)
    return eps, t, u[:, 1:]
