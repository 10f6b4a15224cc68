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

import numpy as np
import torch

#: the timestep spacings of :func:`timesteps`
SKIPS = ("uniform", "quadratic", "logsnr", "linspace")


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


def timesteps(T: int, steps: int, skip: str = "uniform", alphas_cumprod=None) -> torch.Tensor:
    """The DDIM sub-sequence τ, descending, as a LongTensor of shape (steps,).

    - ``"uniform"``: ``range(0, T, T // steps)`` (official DDIM code; equal to diffusers'
      ``timestep_spacing="leading"``: ``arange(steps) * (T // steps)``), first ``steps``
      entries.
    - ``"quadratic"``: ``(linspace(0, sqrt(0.8 T), steps) ** 2)`` cast to int (official DDIM
      code, used by the paper for CIFAR-10 with 200 steps).
    - ``"logsnr"``: uniform in log-SNR, the spacing DPM-Solver's authors recommend (Lu et al.
      2022, ``skip_type="logSNR"``): ``steps`` points of λ_t = ½·log(ᾱ_t/(1 − ᾱ_t)) evenly from
      λ_{T−1} to λ_0, each at the table timestep nearest in λ (distinct: where two would round
      to one timestep, one moves to the next free one). Needs ``alphas_cumprod`` (T entries);
      entries with ᾱ = 1 (σ = 0) are not used. Equal to diffusers' ``use_lu_lambdas=True``
      grid where that one has no repeats.
    - ``"linspace"``: the authors' MNIST / GTSRB sampler grid, ``np.linspace(0, T - 1, num=steps,
      endpoint=True, dtype=int)`` (``minimal-diffusion-main/main_nonddp.py:130-132`` of
      YiDongOuYang/Contrastive-Guided-Diffusion-Process, ``GuassianDiffusion.
      sample_from_reverse_process``; 250 steps of T = 1000 there), walked in reverse (``:143``).
      numpy's integer ``linspace`` floors the float64 points i·((T − 1)/(steps − 1)) (truncation:
      they are >= 0) and sets the last to T − 1; computed here by that same call, so it is their
      grid bit for bit — also where float rounding puts a point just below an integer (T = 31,
      steps = 23: i = 11 gives 14, not 11·30/22 = 15). Starts at T − 1, ends at 0, no repeats
      (consecutive points are >= 1 apart for steps <= T). Their DDPM step uses the sub-sampled
      chain (β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, ᾱ = 1 before t_0), as every solver here does on any
      grid.

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
    elif skip == "logsnr":
        seq = _logsnr_steps(T, steps, alphas_cumprod)
    elif skip == "linspace":
        seq = np.linspace(0, T - 1, num=steps, endpoint=True, dtype=int).tolist()
    else:
        raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
    return torch.tensor(seq[::-1], dtype=torch.long)


def _logsnr_steps(T: int, steps: int, alphas_cumprod) -> list:
    """Ascending timesteps evenly spaced in λ = log(α/σ) (see :func:`timesteps`)."""
    if alphas_cumprod is None:
        raise ValueError("skip='logsnr' needs alphas_cumprod (the λ of each timestep comes from the ᾱ table)")
    abar = as_alphas_cumprod(alphas_cumprod).double()
    if abar.numel() != T:
        raise ValueError(f"alphas_cumprod has {abar.numel()} entries, T is {T}")
    first = int((abar >= 1).sum())                  # entries with σ = 0 have λ = ∞: not a grid point
    if T - first < steps:
        raise ValueError(f"skip='logsnr': only {T - first} timesteps have σ > 0, fewer than steps={steps}")
    lam = 0.5 * (abar[first:].log() - torch.log1p(-abar[first:]))   # decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    # nearest table entry in λ: λ is decreasing, so search the increasing −λ
    neg = -lam
    hi = torch.searchsorted(neg, -targets).clamp(1, neg.numel() - 1)
    lo = hi - 1
    pick = torch.where((neg[hi] - (-targets)).abs() < ((-targets) - neg[lo]).abs(), hi, lo)
    seq = sorted(int(i) + first for i in pick)
    # distinct: where two points round to one entry, move the later one up, then (where that ran
    # past the table's end, as on a cosine table's flat top) the earlier ones down
    for i in range(1, len(seq)):
        seq[i] = max(seq[i], seq[i - 1] + 1)
    seq[-1] = min(seq[-1], T - 1)
    for i in range(len(seq) - 2, -1, -1):
        seq[i] = min(seq[i], seq[i + 1] - 1)
    return seq


# ----------------------------------------------------------------------------- σ-space (EDM)
def sigmas_of(alphas_cumprod) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), (T,) float64: the noise level of x_σ = x_t/√ᾱ_t = x_0 + σ_t·ε
    (Karras et al. 2022, Table 1, VP column; Song et al. 2021 DDIM §4.3)."""
    abar = as_alphas_cumprod(alphas_cumprod).double()
    return ((1 - abar) / abar).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's σ schedule (Karras et al. 2022, eq. (5)): σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ}
    − σ_max^{1/ρ}))^ρ for i < n, then σ_n = 0; (n + 1,) float64, descending. n = 1 gives
    (σ_max, 0)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not (0 < sigma_min <= sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min!r}, {sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def log_sigmas(alphas_cumprod) -> torch.Tensor:
    """log σ_t of the table, (T,) float64, increasing in t (ᾱ = 1 gives σ = 0: floored at 1e-30)."""
    return sigmas_of(alphas_cumprod).clamp_min(1e-30).log()


def sigma_to_t(sigma, alphas_cumprod) -> torch.Tensor:
    """Fractional timestep of noise level σ on the table: t linear in log σ between the two
    table entries around it, clamped to [0, T − 1] (diffusers' ``_sigma_to_t``, k-diffusion's
    ``DiscreteSchedule.sigma_to_t``). Inverse of :func:`t_to_sigma` inside the table's range."""
    log_table = log_sigmas(alphas_cumprod)
    s = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-300).log()
    T = log_table.numel()
    if T == 1:
        return torch.zeros_like(s)
    hi = torch.searchsorted(log_table, s).clamp(1, T - 1)
    lo = hi - 1
    gap = log_table[hi] - log_table[lo]
    # equal neighbours (a flat stretch of the table, e.g. ᾱ_0 = ᾱ_1): any t between them, take lo
    w = torch.where(gap > 0, (s - log_table[lo]) / gap.where(gap > 0, torch.ones_like(gap)),
                    torch.zeros_like(s)).clamp(0, 1)
    return lo.double() + w


def sigma_at(t, log_table: torch.Tensor) -> torch.Tensor:
    """σ at (fractional) timesteps ``t`` from a :func:`log_sigmas` table on t's device: log σ
    linearly interpolated between entries, t clamped to [0, T − 1]. Tensor arithmetic only
    (no checks, no host copy), so it runs inside compiled models."""
    T = log_table.numel()
    t = t.to(torch.float64).clamp(0, T - 1)
    lo = t.floor().long().clamp(max=max(T - 2, 0))
    hi = (lo + 1).clamp(max=T - 1)
    w = t - lo.double()
    return (log_table[lo] * (1 - w) + log_table[hi] * w).exp()


def t_to_sigma(t, alphas_cumprod) -> torch.Tensor:
    """σ at a (fractional) timestep: log σ linearly interpolated between table entries
    (the inverse of :func:`sigma_to_t`); integer t gives the table's σ_t exactly."""
    t = torch.as_tensor(t)
    return sigma_at(t, log_sigmas(alphas_cumprod).to(t.device))   # t's device: no host sync
