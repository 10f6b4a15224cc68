"""Feature spaces the guidance did not use: the PCA of the real training images
(:func:`fit_pca`, the default; unwhitened, so distances are pixel distances within the
subspace) and any user callable run batch by batch (:func:`extract_features`).
"""
from __future__ import annotations

from typing import Callable

import torch

from cdp_fast.metrics.inputs import as_features, as_x01, check_positive_int

__all__ = ["PCAFeatures", "fit_pca", "extract_features"]


class PCAFeatures:
    """x (B, C, H, W) in [0, 1] -> (B, k) float64: the projection of the flattened pixels,
    centred on the fitted mean, onto the top-k principal axes (unwhitened). Each axis' sign is
    fixed so that its largest-magnitude loading is positive (deterministic across runs).

    Attributes: mean (D,), components (k, D) orthonormal rows, explained_variance (k,)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, explained_variance: torch.Tensor):
        self.mean, self.components, self.explained_variance = mean, components, explained_variance

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(torch.float64)
        return (flat - self.mean) @ self.components.T

    def __repr__(self):
        return f"PCAFeatures(k={self.dim}, D={self.components.shape[1]})"


def fit_pca(x, n_components: int = 20) -> PCAFeatures:
    """PCA of images (the default independent feature space; fit it on the *real* set).

    Args:
        x: (N, C, H, W) images in [0, 1] (anything :func:`as_image_set` takes as images), or
            any float (N, ...) tensor (e.g. features, to project them to 2-D).
        n_components: k >= 1 (ValueError naming n_components otherwise); capped at
            min(D, N − 1).
    Returns:
        :class:`PCAFeatures`. Computed in float64 from the D × D covariance (eigh), so the cost
        is O(N D² + D³) and N may be large; for D ≫ 10⁴ pass your own extractor.
    """
    check_positive_int(n_components, "n_components")
    xf = x if isinstance(x, torch.Tensor) and x.is_floating_point() else as_x01(x, "pca data")
    xf = xf.reshape(len(xf), -1).to(torch.float64)
    n, d = xf.shape
    if n < 2:
        raise ValueError("fit_pca needs at least 2 images")
    k = max(1, min(int(n_components), d, n - 1))
    mean = xf.mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, 8192):
        c = xf[s:s + 8192] - mean
        cov += c.T @ c
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True, stable=True)[:k]
    comps = evecs[:, order].T.contiguous()
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return PCAFeatures(mean, comps, evals[order].clamp_min(0))


def extract_features(features: Callable, x, *, batch_size: int = 1024, device=None) -> torch.Tensor:
    """``features`` over ``x`` in batches, under no_grad (eval mode for an nn.Module).

    Args:
        features: callable (B, C, H, W) in [0, 1] -> (B, d) (or (B, ...), flattened).
        x: images (anything :func:`as_image_set` takes as images).
    Returns:
        float64 (N, d) CPU tensor. ValueError naming ``features`` if it returns NaN or inf.
    """
    from cdp_fast.utils.runtime import eval_mode, model_device

    x = as_x01(x)
    dev = model_device(features, device)
    ctx = eval_mode(features)          # a plain callable: nothing to switch
    out = []
    with torch.no_grad(), ctx:
        for s in range(0, len(x), batch_size):
            f = features(x[s:s + batch_size].to(dev))
            out.append(torch.as_tensor(f).reshape(min(batch_size, len(x) - s), -1).to("cpu", torch.float64))
    name = getattr(features, "description", None) or getattr(features, "__name__", None) \
        or type(features).__name__
    return as_features(torch.cat(out), f"features ({name}) of the images")
