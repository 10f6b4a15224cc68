"""Noise schedules and DDIM timestep sub-sequences.

Notation (Ho et al. 2020; Song et al. 2021, "DDIM"):
    β_t         betas[t], t = 0..T-1 (index t is the paper's step t+1)
    ᾱ_t         alphas_cumprod[t] = Π_{s<=t} (1 - β_s)

Timestep sequences follow the official DDIM code (``runners/diffusion.py``) and diffusers'
``DDIMScheduler(timestep_spacing="leading")``, walked in descending order; after the last
step (t = 0) the sampler uses ᾱ_prev = 1 (``set_alpha_to_one=True``).
"""
from __future__ import annotations

import math

import torch


def make_betas(kind: str | torch.Tensor = "linear", T: int = 1000) -> torch.Tensor:
    """β_1..β_T as float64, shape (T,).

    - ``"linear"``: linspace(1e-4, 0.02, T) (Ho et al. 2020, the CIFAR-10 DDPM / DDIM models;
      diffusers ``beta_schedule="linear"``).
    - ``"cosine"``: Nichol & Dhariwal (2021) eq. (17), ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2),
      s = 0.008, β clipped at 0.999.
    - a tensor: taken as the betas themselves.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if isinstance(kind, torch.Tensor):
        betas = kind.detach().to("cpu", torch.float64).flatten()
        if betas.numel() != T:
            raise ValueError(f"betas has {betas.numel()} entries but T={T}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        return betas
    if kind == "linear":
        # diffusers builds this in float32; linspace in float32 then upcast keeps the
        # equivalence test at float rounding.
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float32).to(torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"betas must be 'linear', 'cosine' or a tensor, got {kind!r}")


def make_alphas_cumprod(betas: str | torch.Tensor = "linear", T: int = 1000) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t}(1-β_s) as float64, shape (T,)."""
    b = make_betas(betas, T)
    # float32 cumprod mirrors diffusers (alphas_cumprod = cumprod(1 - betas) in float32)
    return torch.cumprod(1.0 - b.to(torch.float32), dim=0).to(torch.float64)


def as_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """Validate a foreign ᾱ table (e.g. ``DDIMScheduler.alphas_cumprod``): 1-D, in (0, 1],
    non-increasing. Returns float64 on CPU."""
    a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
    if a.numel() < 1:
        raise ValueError("alphas_cumprod is empty")
    if not torch.isfinite(a).all() or (a <= 0).any() or (a > 1).any():
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    if (a[1:] > a[:-1] + 1e-12).any():
        raise ValueError("alphas_cumprod must be non-increasing")
    return a


def timesteps(T: int, steps: int, skip: str = "uniform") -> torch.Tensor:
    """The DDIM sub-sequence τ, descending, as a LongTensor of shape (steps,).

    - ``"uniform"``: ``range(0, T, T // steps)`` (official DDIM code; equal to diffusers'
      ``timestep_spacing="leading"``: ``arange(steps) * (T // steps)``), first ``steps``
      entries.
    - ``"quadratic"``: ``(linspace(0, sqrt(0.8 T), steps) ** 2)`` cast to int (official DDIM
      code, used by the paper for CIFAR-10 with 200 steps).

    The quadratic sequence repeats small timesteps when steps is large (200 steps of T = 1000,
    the paper's CIFAR-10 setting, start 0, 0, 0, 0, 0, 0, 0, 1, 1, ...); the official code keeps
    them, and a repeated t is an exact no-op of the DDIM update (ᾱ_prev = ᾱ_t), so they are
    kept here too and :func:`cdp_fast.guided_ddim` skips them without a model call.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > T:
        raise ValueError(f"steps ({steps}) must be <= T ({T})")
    if skip == "uniform":
        seq = list(range(0, T, T // steps))[:steps]
    elif skip == "quadratic":
        seq = [int(s) for s in (torch.linspace(0, math.sqrt(T * 0.8), steps, dtype=torch.float64) ** 2)]
    else:
        raise ValueError(f"skip must be 'uniform' or 'quadratic', got {skip!r}")
    return torch.tensor(seq[::-1], dtype=torch.long)
