"""A diffusion model that needs no training: the exact ε of a class-conditional Gaussian
mixture fitted in a PCA subspace plus an isotropic residual — the paper's §3 model family
(Gaussian classes) made rich enough to draw recognisable 28×28 digits, with a closed-form
ε(x_t, t, y). :func:`fit_pca_mixture` fits it in seconds; :class:`PCAMixtureEps` is an ε-model
that every solver of :func:`cdp_fast.sample` runs and :class:`cdp_fast.ContrastiveGuidance`
guides like a network.

Model (images flattened to D = C·H·W, in [-1, 1]). PCA of the fitting images: mean μ (D,),
orthonormal basis U (D, k) of the top-k directions, P⊥ = I − UUᵀ. Class y is a mixture of M
Gaussians with weights π_{y,c}, means μ + U m_{y,c} and covariances
C_{y,c} = U Σ_{y,c} Uᵀ + s² P⊥, where s² is the mean variance the k directions leave
(the isotropic residual). Under q(x_t | x_0) = N(√ᾱ x_0, (1 − ᾱ) I) each component stays
Gaussian: mean √ᾱ (μ + U m), covariance U A Uᵀ + v⊥ P⊥ with A = ᾱ Σ + (1 − ᾱ) I_k and
v⊥ = ᾱ s² + 1 − ᾱ. With z = Uᵀ(x − √ᾱ μ) and r = P⊥(x − √ᾱ μ), the score is

    ∇ log p_t(x | y) = U Σ_c w_c(x) (−A_c⁻¹ (z − √ᾱ m_c)) − r / v⊥,

w_c the posterior weights of the components (the r-terms are common to all components and
cancel in w_c), and ε*(x, t, y) = −√(1 − ᾱ) ∇ log p_t (Song et al. 2021, score SDE eq. (7) ↔
Ho et al. 2020 eq. (11)), the minimiser of the DDPM loss. Σ = V diag(λ) Vᵀ is
eigendecomposed once, so A⁻¹ and log det A cost O(k²) per sample and step. Without y the
classes are mixed with their empirical frequencies.

EM (k-means++ start, full covariances) runs per class in float64; each covariance gets
``reg`` × (the class's mean PCA variance) on its diagonal, so classes with fewer images than
dimensions (100 per class at the 1K split, k = 40) still have full-rank components.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cdp_fast.diffusion.schedule import as_alphas_cumprod, make_alphas_cumprod
from cdp_fast.utils.checks import check_number

__all__ = ["PCAMixtureEps", "fit_pca_mixture"]


class PCAMixtureEps(torch.nn.Module):
    """Exact ε-model of a class-conditional PCA Gaussian mixture (module docstring).

    forward(x (B, *image_shape), t (B,) long in [0, T), y (B,) long or None) -> ε (B, *image_shape)
    (x's dtype; computed in float64). Buffers (float64): ``mean`` (D,), ``basis`` (D, k),
    ``means`` (K, M, k), ``evecs`` (K, M, k, k), ``evals`` (K, M, k), ``log_weights`` (K, M)
    (−inf for padding components), ``class_log_prior`` (K,), ``resid_var`` (), ``alphas_cumprod`` (T,).
    """

    def __init__(self, *, mean, basis, means, covs, log_weights, class_log_prior, resid_var, image_shape,
                 alphas_cumprod):
        super().__init__()
        covs = torch.as_tensor(covs, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(covs)
        if not bool((evals > 0).all()):
            raise ValueError("every component covariance must be positive definite")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(covs.shape[0])
        for name, v in (("mean", mean), ("basis", basis), ("means", means), ("evecs", evecs), ("evals", evals),
                        ("log_weights", log_weights), ("class_log_prior", class_log_prior),
                        ("resid_var", resid_var), ("alphas_cumprod", alphas_cumprod)):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float64).clone())
        if math.prod(self.image_shape) != self.mean.numel():
            raise ValueError(f"image_shape {self.image_shape} does not hold {self.mean.numel()} values")

    # ------------------------------------------------------------------ the closed form
    def _components(self, y, B):
        """Per-sample component parameters: y (B,) or None -> (means (B, M', k), evecs, evals,
        log_w (B, M'))."""
        K, M, k = self.means.shape
        if y is None:
            lw = (self.log_weights + self.class_log_prior[:, None]).reshape(1, K * M).expand(B, -1)
            return (self.means.reshape(1, K * M, k).expand(B, -1, -1), self.evecs.reshape(1, K * M, k, k).expand(B, -1, -1, -1),
                    self.evals.reshape(1, K * M, k).expand(B, -1, -1), lw)
        if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype != torch.long:
            raise ValueError(f"y must be a LongTensor of shape ({B},), got {getattr(y, 'dtype', type(y))} "
                             f"{tuple(getattr(y, 'shape', ()))}")
        if bool((y < 0).any()) or bool((y >= K).any()):
            raise ValueError(f"y must lie in [0, {K - 1}]")
        y = y.to(self.means.device)
        return self.means[y], self.evecs[y], self.evals[y], self.log_weights[y]

    def score(self, x, t, y=None):
        """∇_x log p_t(x | y): x (B, *image_shape), t (B,) long -> (B, D) float64."""
        B = x.shape[0]
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be (B, {self.image_shape}), got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.is_floating_point() or bool((t < 0).any()) \
                or bool((t >= self.alphas_cumprod.numel()).any()):
            raise ValueError(f"t must be (B,) integers in [0, {self.alphas_cumprod.numel() - 1}]")
        a = self.alphas_cumprod[t.to(self.mean.device)][:, None]              # (B, 1)
        xc = x.reshape(B, -1).to(torch.float64) - a.sqrt() * self.mean         # (B, D)
        z = xc @ self.basis                                                    # (B, k)
        r = xc - z @ self.basis.T                                              # (B, D)
        m, V, lam, lw = self._components(y, B)
        d = torch.einsum("bmkj,bmk->bmj", V, z[:, None, :] - a.sqrt()[:, :, None] * m)   # (B, M, k)
        s = a[:, :, None] * lam + (1 - a)[:, :, None]                          # eigenvalues of A
        logp = lw - 0.5 * ((d * d) / s).sum(-1) - 0.5 * torch.log(s).sum(-1)  # (B, M) up to a constant
        w = torch.softmax(logp, dim=1)                                         # (B, M)
        sz = -torch.einsum("bmkj,bmj->bmk", V, d / s)                           # (B, M, k): −A⁻¹(z − √ᾱ m)
        v_perp = a * self.resid_var + 1 - a                                    # (B, 1)
        return (w[:, :, None] * sz).sum(1) @ self.basis.T - r / v_perp

    def forward(self, x, t, y=None):
        score = self.score(x, t, y)                                            # checks x, t, y
        a = self.alphas_cumprod[t.to(self.mean.device)][:, None]
        eps = -(1 - a).sqrt() * score
        return eps.reshape(x.shape).to(x.dtype)

    # ------------------------------------------------------------------ exact draws of p_0
    def draw(self, y: torch.Tensor, generator: torch.Generator = None) -> torch.Tensor:
        """Exact samples of p_0(x | y) (no diffusion): y (n,) long -> (n, *image_shape) float64,
        for checking the samplers' outputs against the fit."""
        y = torch.as_tensor(y, dtype=torch.long)
        n, k = len(y), self.basis.shape[1]
        c = torch.multinomial(self.log_weights[y].exp(), 1, generator=generator).flatten()
        V, lam, m = self.evecs[y, c], self.evals[y, c], self.means[y, c]
        g = torch.randn(n, k, generator=generator, dtype=torch.float64)
        z = m + torch.einsum("nkj,nj->nk", V, lam.sqrt() * g)
        e = torch.randn(n, self.mean.numel(), generator=generator, dtype=torch.float64)
        e = e - (e @ self.basis) @ self.basis.T
        return (self.mean + z @ self.basis.T + self.resid_var.sqrt() * e).reshape(n, *self.image_shape)

    def moments(self, y: int):
        """Mean (D,) and covariance (D, D) of p_0(x | y), float64 (the fit's own moments)."""
        w = self.log_weights[y].exp()
        covs = self.evecs[y] @ torch.diag_embed(self.evals[y]) @ self.evecs[y].transpose(-1, -2)
        mz = (w[:, None] * self.means[y]).sum(0)
        dm = self.means[y] - mz
        cz = (w[:, None, None] * (covs + dm[:, :, None] * dm[:, None, :])).sum(0)
        U = self.basis
        D = U.shape[0]
        cov = U @ cz @ U.T + self.resid_var * (torch.eye(D, dtype=torch.float64) - U @ U.T)
        return self.mean + U @ mz, cov


# ---------------------------------------------------------------------- fitting
def fit_pca_mixture(x, y, *, pca_dim: int = 40, components: int = 4, reg: float = 0.05, iters: int = 100,
                    seed: int = 0, betas="linear", T: int = 1000, alphas_cumprod=None) -> PCAMixtureEps:
    """Fit :class:`PCAMixtureEps` to images x (N, *image_shape) in [-1, 1] with labels y (N,)
    in [0, K): PCA on all of x (k = ``pca_dim`` ≤ min(D, N − 1)), then EM with ``components``
    full-covariance Gaussians per class (fewer when a class has fewer images), ``reg`` the
    diagonal load relative to the class's mean PCA variance, at most ``iters`` EM iterations
    (stops when the mean log-likelihood gains < 1e-7), ``seed`` for the k-means++ start.
    The diffusion schedule is ``alphas_cumprod`` (T,), else ``make_alphas_cumprod(betas, T)``.
    Deterministic for a given (x, y, arguments)."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if not x.is_floating_point() or x.dim() < 2 or len(x) < 2:
        raise ValueError(f"x must be a float tensor (N, *image_shape) with N >= 2, got {x.dtype} {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < -1 - 1e-6 or float(x.max()) > 1 + 1e-6:
        raise ValueError("x must be finite images in [-1, 1] (the diffusion model's range; map [0, 1] by 2x - 1)")
    if y.shape != (len(x),) or y.is_floating_point() or bool((y < 0).any()):
        raise ValueError(f"y must be ({len(x)},) non-negative integer labels, got {y.dtype} {tuple(y.shape)}")
    for name, v in (("pca_dim", pca_dim), ("components", components), ("iters", iters)):
        check_number(name, v, lo=1, integer=True)
    check_number("reg", reg, lo=0, lo_open=True)
    pca_dim, components, iters = int(pca_dim), int(components), int(iters)
    N, image_shape = len(x), tuple(x.shape[1:])
    X = x.reshape(N, -1).to(torch.float64)
    D = X.shape[1]
    k = min(pca_dim, D, N - 1)
    mean = X.mean(0)
    _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    basis = Vh[:k].T.contiguous()                                              # (D, k)
    var = S ** 2 / (N - 1)
    resid = float(var[k:].sum() / max(D - k, 1)) if D > k else 0.0
    resid_var = max(resid, 1e-6 * float(var[0]))
    Z = (X - mean) @ basis
    K = int(y.max()) + 1
    M = components
    means = torch.zeros(K, M, k, dtype=torch.float64)
    covs = torch.eye(k, dtype=torch.float64).repeat(K, M, 1, 1)
    log_w = torch.full((K, M), -math.inf, dtype=torch.float64)
    counts = torch.bincount(y, minlength=K)
    if bool((counts == 0).any()):
        raise ValueError(f"every class in [0, {K - 1}] needs at least one image; counts {counts.tolist()}")
    for c in range(K):
        zc = Z[y == c]
        load = reg * float(zc.var(0, unbiased=False).mean()) if len(zc) > 1 else reg * float(var[:k].mean())
        mu, cov, lw = _em(zc, min(M, len(zc)), iters, load, np.random.default_rng([int(seed), c]))
        means[c, :len(mu)], covs[c, :len(mu)], log_w[c, :len(mu)] = mu, cov, lw
    abar = make_alphas_cumprod(betas, T) if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
    return PCAMixtureEps(mean=mean, basis=basis, means=means, covs=covs, log_weights=log_w,
                         class_log_prior=torch.log(counts.double() / N), resid_var=resid_var,
                         image_shape=image_shape, alphas_cumprod=abar)


def _gauss_logpdf(z, mu, cov):
    """log N(z; mu_c, cov_c) for every component: z (n, k), mu (M, k), cov (M, k, k) -> (n, M)."""
    L = torch.linalg.cholesky(cov)
    diff = (z[None] - mu[:, None]).transpose(1, 2)                             # (M, k, n)
    sol = torch.linalg.solve_triangular(L, diff, upper=False)
    maha = (sol ** 2).sum(1).T                                                 # (n, M)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (maha + logdet + z.shape[1] * math.log(2 * math.pi))


def _em(z, M, iters, load, rng):
    """EM for an M-component full-covariance Gaussian mixture on z (n, k), k-means++ start;
    ``load`` added to every covariance's diagonal. Returns means (M, k), covs (M, k, k), log π (M,)."""
    n, k = z.shape
    first = int(rng.integers(n))
    centres = [z[first]]
    for _ in range(1, M):
        d2 = torch.cdist(z, torch.stack(centres)).amin(1) ** 2
        p = (d2 / d2.sum()).numpy() if float(d2.sum()) > 0 else np.full(n, 1.0 / n)
        centres.append(z[int(rng.choice(n, p=p))])
    resp = torch.nn.functional.one_hot(torch.cdist(z, torch.stack(centres)).argmin(1), M).double()
    eye = torch.eye(k, dtype=torch.float64)
    prev = -math.inf
    for _ in range(iters):
        nk = resp.sum(0) + 1e-10                                               # M-step
        mu = (resp.T @ z) / nk[:, None]
        diff = z[None] - mu[:, None]                                           # (M, n, k)
        cov = torch.einsum("mn,mni,mnj->mij", resp.T, diff, diff) / nk[:, None, None] + load * eye
        log_pi = torch.log(nk / n)
        logp = _gauss_logpdf(z, mu, cov) + log_pi                              # E-step
        ll = float(torch.logsumexp(logp, 1).mean())
        resp = torch.softmax(logp, 1)
        if ll - prev < 1e-7:
            break
        prev = ll
    return mu, cov, log_pi
