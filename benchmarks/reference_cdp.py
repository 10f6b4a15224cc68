"""The yardstick: a faithful, plainly written eager implementation of the paper's Algorithm 1.

Contrastive-guided DDIM (Ouyang, Xie, Cheng, ICLR 2023 submission, Algorithm 1):

    x_T ~ N(0, I)
    for t in τ (descending):
        x_p   = positive of x_t           ("previous": x_{t+1} of the same sample, detached;
                                           at the first step x_T itself)
        Δ     = ε_θ(x_t, t) + λ ∇_{x_t} ℓ_contra(f(x_t), f(x_p); τ)          (line 6)
        x̂_0   = (x_t − √(1−ᾱ_t) Δ) / √ᾱ_t
        x_{t−1} = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) Δ                               (line 7, η = 0)

This is what "the straightforward way" costs, and ``benchmarks/throughput.py`` divides by it:
fp32 throughout, the full m×m similarity matrix materialised with ``exp`` (no log-space, the
clamp of Robinson et al.'s public code instead), a Python loop over timesteps, a fresh autograd
graph through the feature extractor each step, and f(x_p) recomputed each step. The ε-model
runs without a graph (ℓ depends on x_t only through f, so ∇_{x_t}ℓ never needs the UNet's
backward — Algorithm 1 line 6 adds the two terms). It is our own code, written from the
paper's formulas (§4.2) and docs/design.md §4, not the authors'.

Loss formulas (docs/design.md §4; Robinson et al. 2021, eq. (3) and their public code):
    a_i = f(x_t^i)/‖·‖, p_i = f(x_p^i)/‖·‖, pos_i = exp(a_i·p_i/τ), neg_ij = exp(a_i·a_j/τ), j ≠ i
    InfoNCE: ℓ_i = −log(pos_i / (pos_i + Σ_j neg_ij))
    HNM:     imp_ij = neg_ij^β, reweight_i = Σ_j imp_ij neg_ij / mean_j imp_ij,
             Ng_i = max((−τ⁺ N pos_i + reweight_i)/(1 − τ⁺), N e^{−1/τ}),
             ℓ_i = −log(pos_i / (pos_i + Ng_i)),    N = m − 1
    ℓ = mean_i ℓ_i
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["reference_loss", "reference_cdp"]


def reference_loss(fa: torch.Tensor, fp: torch.Tensor, *, loss: str, tau: float, tau_plus: float = 0.1,
                   beta: float = 1.0) -> torch.Tensor:
    """ℓ_contra of a batch, fa / fp: (m, d) features of anchors / positives; returns a scalar."""
    m = fa.shape[0]
    a = F.normalize(fa, dim=1)
    p = F.normalize(fp, dim=1)
    pos = torch.exp((a * p).sum(1) / tau)                       # (m,)
    neg = torch.exp(a @ a.T / tau)                              # (m, m), full matrix
    off = ~torch.eye(m, dtype=torch.bool, device=a.device)
    neg = neg.masked_select(off).view(m, m - 1)                 # drop j = i
    if loss == "infonce":
        ng = neg.sum(1)
    elif loss == "hnm":
        n = m - 1
        imp = neg ** beta
        reweight = (imp * neg).sum(1) / imp.mean(1)
        ng = (-tau_plus * n * pos + reweight) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * math.e ** (-1 / tau))
    else:
        raise ValueError(f"loss must be 'infonce' or 'hnm', got {loss!r}")
    return (-torch.log(pos / (pos + ng))).mean()


def reference_cdp(model, x_T: torch.Tensor, features, *, alphas_cumprod: torch.Tensor,
                  timesteps, loss: str = "hnm", lam: float, tau: float, tau_plus: float = 0.1,
                  beta: float = 1.0) -> torch.Tensor:
    """Algorithm 1 with η = 0, positive = previous step. Returns x_0 (B, C, H, W), fp32.

    Args:
        model: ε-model, ``model(x, t) -> eps`` (an object with ``.sample`` is unwrapped).
        x_T: starting noise (B, C, H, W).
        features: f: (B, C, H, W) in [-1, 1] -> (B, d).
        alphas_cumprod: ᾱ, shape (T,). timesteps: descending sequence of ints.
        loss: "hnm" | "infonce"; lam: λ; tau, tau_plus, beta as in §4.2.
    """
    abar = [float(a) for a in alphas_cumprod]
    ts = [int(t) for t in timesteps]
    x = x_T.float()
    x_pos = x.clone()
    for i, t in enumerate(ts):
        abar_t = abar[t]
        abar_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        with torch.no_grad():
            eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            eps = getattr(eps, "sample", eps).float()
            fp = features(x_pos).float()
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            ell = reference_loss(features(x_in).float(), fp, loss=loss, tau=tau, tau_plus=tau_plus, beta=beta)
            grad = torch.autograd.grad(ell, x_in)[0]
        delta = eps + lam * grad
        x0 = (x - math.sqrt(1 - abar_t) * delta) / math.sqrt(abar_t)
        x_new = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * delta
        x_pos = x.detach()
        x = x_new.detach()
    return x
