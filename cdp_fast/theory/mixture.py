"""The two-Gaussian mixture of the paper's §3 / App. C.2 with an exact (analytic, untrained)
ε-predictor, and the guidance settings measured on it: what ``benchmarks/toy2d.py`` (Figure 2)
and the Gaussian part of ``cdp-fast demo`` (:mod:`cdp_fast.demo.gaussian`) share. Moved here
from ``benchmarks/toy2d.py`` (which is not installed) so the demo can import it;
``toy2d`` re-exports every name.

Data: p_0 = ½ N(μ, s₀² I) + ½ N(−μ, s₀² I). Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
(Ho et al. 2020), so p_t = ½ N(m_t, v_t I) + ½ N(−m_t, v_t I) with m_t = √ᾱ_t μ and
v_t = ᾱ_t s₀² + 1 − ᾱ_t. Its score is ∇log p_t(x) = (m_t tanh(m_tᵀx / v_t) − x) / v_t, and the ε
that minimises the DDPM loss is ε*(x, t) = −√(1 − ᾱ_t) ∇log p_t(x) (Song et al. 2021, "score
SDE", eq. (7) ↔ Ho et al. eq. (11)).
"""
from __future__ import annotations

import math

import torch

from cdp_fast.diffusion.schedule import as_alphas_cumprod, make_alphas_cumprod

__all__ = ["MU", "MixtureEps", "sign_labeler", "LAM_CLASS", "LAM_UNCOND", "VARIANTS", "TOY_FORM"]

MU = (1.0, 1.0)


class MixtureEps(torch.nn.Module):
    """Exact ε-predictor of ½ N(μ, s₀²I) + ½ N(−μ, s₀²I) under the DDPM forward process.

    forward(x (B, D) float, t (B,) long) -> ε (B, D). ``alphas_cumprod`` (T,) is a registered
    buffer (float64; outputs are cast to x's dtype). See the module docstring for the formula.
    """

    def __init__(self, mu=MU, s0=1.0, alphas_cumprod=None):
        super().__init__()
        mu = torch.as_tensor(mu, dtype=torch.float64).flatten()
        if mu.numel() < 1 or not torch.isfinite(mu).all() or not (mu != 0).any():
            raise ValueError(f"mu must be a finite non-zero vector, got {mu.tolist()}")
        if not (isinstance(s0, (int, float)) and math.isfinite(s0) and s0 > 0):
            raise ValueError(f"s0 must be > 0, got {s0!r}")
        abar = make_alphas_cumprod("linear", 1000) if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
        self.s0 = float(s0)
        self.register_buffer("mu", mu)
        self.register_buffer("alphas_cumprod", abar.to(torch.float64))

    def _check(self, x, t):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.mu.numel():
            raise ValueError(f"x must be (B, {self.mu.numel()}), got {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.shape != (x.shape[0],):
            raise ValueError(f"t must be a LongTensor of shape ({x.shape[0]},), got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if (t < 0).any() or (t >= self.alphas_cumprod.numel()).any():
            raise ValueError(f"t must lie in [0, {self.alphas_cumprod.numel() - 1}]")

    def _stats(self, t):
        a = self.alphas_cumprod[t][:, None]                   # (B, 1)
        m = a.sqrt() * self.mu                                # (B, D) m_t
        v = a * self.s0 ** 2 + 1 - a                          # (B, 1) v_t
        return a, m, v

    def score(self, x, t):
        """∇_x log p_t(x), (B, D) float64."""
        self._check(x, t)
        _, m, v = self._stats(t)
        x = x.to(torch.float64)
        return (m * torch.tanh((m * x).sum(1, keepdim=True) / v) - x) / v

    def log_prob(self, x, t):
        """log p_t(x), (B,) float64 (for the finite-difference test of :meth:`score`)."""
        self._check(x, t)
        _, m, v = self._stats(t)
        x = x.to(torch.float64)
        D = x.shape[1]
        lp = lambda c: -((x - c) ** 2).sum(1) / (2 * v[:, 0]) - 0.5 * D * torch.log(2 * math.pi * v[:, 0])  # noqa: E731
        return torch.logaddexp(lp(m), lp(-m)) - math.log(2.0)

    def forward(self, x, t):
        self._check(x, t)
        a = self.alphas_cumprod[t][:, None]
        return (-(1 - a).sqrt() * self.score(x, t)).to(x.dtype)


def sign_labeler(mu=MU):
    """labeler(x (B, D)) -> logits (B, 2): class 1 iff xᵀμ > 0 (the boundary of the linear
    classifier θ = μ; with the true μ, the Bayes boundary)."""
    mu_t = torch.as_tensor(mu, dtype=torch.float32)

    def labeler(x):
        s = x.float() @ mu_t.to(x.device)
        return torch.stack([-s, s], 1)
    return labeler


#: How the 2-D guidance was measured (App. C.2 as an illustration, not the authors' CIFAR-10
#: recipe): the anchor loss form at every step, no online head.
TOY_FORM = dict(form="anchors", embedding=None, guide_window=None)

# name -> options (cdp_fast.sample / ContrastiveGuidance keywords). λ: ℓ is the MEAN over the
# m = n anchors, so the per-sample pull is λ/m; class-conditional HNM separates at λ = 3 already
# (Fisher ratio ×2.3), while the unconditional repulsion (negatives all around each anchor)
# only shows up around λ = 300 (within-class spread ⟂ μ +40%; λ = 3 leaves it within noise).
LAM_CLASS, LAM_UNCOND = 3.0, 300.0
_HNM = dict(loss="hnm", tau=0.5, tau_plus=0.0, beta=1.0)
VARIANTS = {
    "no guidance": dict(loss=None),
    "InfoNCE": dict(loss="infonce", tau=0.5, lam=LAM_UNCOND),
    "HNM": dict(_HNM, lam=LAM_UNCOND),
    "class-conditional HNM": dict(_HNM, lam=LAM_CLASS, negatives="class"),
    "HNM, real data as positives": dict(_HNM, lam=LAM_UNCOND, positive="real"),
    "HNM, real data as negatives": dict(_HNM, lam=LAM_UNCOND, negatives="real"),
}
