"""The one place that decides which implementation runs (STYLE.md habit 4).

``CDP_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``:
  - auto: Triton kernels on CUDA tensors (or when ``TRITON_INTERPRET=1``), the PyTorch path
    otherwise; an automatic choice falls back quietly.
  - triton / torch: forced; an explicitly requested backend that cannot run raises.

Contract used by the rest of the package (kept stable):
  contrastive_impl(name) -> callable | None      name in {"hnm", "infonce"}; None = dense reference
  ddim_update(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False)
      -> (x_prev, x0_pred | None)
"""
from __future__ import annotations

import os

import torch

__all__ = ["requested_backend", "contrastive_impl", "ddim_update", "ddim_update_ref"]


def requested_backend() -> str:
    value = os.environ.get("CDP_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"CDP_FAST_BACKEND must be auto, triton or torch, got {value!r}")
    return value


def contrastive_impl(name: str):
    """Streaming contrastive loss implementation, or None to use the dense reference."""
    if name not in ("hnm", "infonce"):
        raise ValueError(f"unknown contrastive loss {name!r}")
    if requested_backend() == "triton":
        raise RuntimeError("CDP_FAST_BACKEND=triton requested but no Triton contrastive kernel is available")
    return None


def ddim_update_ref(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False):
    """DDIM eq. (12) of Song et al. 2021 with Δ = ε + λg in place of ε (Algorithm 1, line 7):

        x̂_0     = (x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t
        x_{t-1} = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·Δ + σ·z

    x_t, eps, g, noise: same shape; lam, abar_t, abar_prev, sigma: Python floats.
    """
    delta = eps if (g is None or lam == 0) else eps + lam * g
    x0 = (x_t - (1.0 - abar_t) ** 0.5 * delta) / abar_t ** 0.5
    dir_coef = max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + dir_coef * delta
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, (x0 if return_x0 else None)


def ddim_update(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False):
    """Dispatching DDIM update (see ddim_update_ref for the formula)."""
    if requested_backend() == "triton":
        raise RuntimeError("CDP_FAST_BACKEND=triton requested but no Triton DDIM kernel is available")
    return ddim_update_ref(x_t, eps, g, lam=lam, abar_t=abar_t, abar_prev=abar_prev,
                           sigma=sigma, noise=noise, return_x0=return_x0)
