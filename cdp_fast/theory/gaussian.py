"""Section 3 of the paper: closed-form errors of linear classifiers on a Gaussian mixture, the
robust-optimal direction, and the self-training simulation behind Tables 1, 7, 8 and 9.

Setting (paper §3.1): y uniform on {-1, +1}, x | y ~ N(y μ, σ² I_d); classifier sign(θᵀx);
ℓ∞ adversary of radius ε. Synthetic features come from 0.5 N(μ̃, σ² I) + 0.5 N(-μ̃, σ² I) and are
pseudo-labelled by the intermediate classifier θ̂_inter = (1/n) Σ y_i x_i (§3.1).

Notation → code:
    μ            mu            (d,) mean of the positive class
    μ̃            mu_tilde      (d,) mean of the positive synthetic component
    σ            sigma         noise standard deviation (the paper's tables fit σ = 1)
    ε            eps           ℓ∞ radius
    n, ñ         n, n_syn      real / synthetic sample sizes
    c            c             scale of the synthetic mean: μ̃ = c μ (or c (μ - ε1))

Everything is NumPy, float64, vectorised over trials (a trial axis in front). Errors are the
exact expectations over the test distribution (eqs. 6, 7), not test-set estimates, so the only
randomness in ``simulate`` is the training data. ``draw_holdout`` / ``holdout_accuracy`` /
``holdout_sd`` measure the same accuracies on a finite test set instead (the revision's App. B
tests "on 10k extra real data"), to size the noise such a test set adds.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "Q",
    "err_standard",
    "err_robust",
    "hard_threshold",
    "robust_optimal_theta",
    "make_mu",
    "synthetic_mean",
    "self_training",
    "simulate",
    "draw_holdout",
    "holdout_accuracy",
    "holdout_sd",
]

_SQRT2 = math.sqrt(2.0)
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def Q(x):
    """Gaussian tail Q(x) = (1/√(2π)) ∫_x^∞ e^{-t²/2} dt = ½ erfc(x/√2) (paper App. A.1).

    Accepts a scalar or an array of any shape; returns float64 of the same shape (a Python float
    for scalar input). Accurate in both tails (erfc, not 1 - erf).
    """
    arr = np.asarray(x, dtype=np.float64)
    out = 0.5 * _erfc(arr / _SQRT2)
    return float(out) if out.ndim == 0 else out


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _as_theta_mu(theta, mu):
    theta = np.asarray(theta, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 1 or mu.size < 1:
        raise ValueError(f"mu must be a non-empty 1-D vector, got shape {mu.shape}")
    if not np.all(np.isfinite(mu)) or not np.any(mu != 0):
        raise ValueError("mu must be finite and non-zero")
    if theta.ndim < 1 or theta.shape[-1] != mu.shape[0]:
        raise ValueError(f"theta must have shape (..., {mu.shape[0]}), got {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta must be finite")
    norm = np.linalg.norm(theta, axis=-1)
    if np.any(norm == 0):
        raise ValueError("theta must be non-zero (sign(0ᵀx) is no classifier)")
    return theta, mu, norm


def err_standard(theta, mu, sigma=1.0):
    """Standard error of sign(θᵀx), paper eq. (6): Q(μᵀθ / (σ‖θ‖)).

    theta: (..., d) (a batch of classifiers is fine); mu: (d,). Returns (...) float64.
    """
    sigma = _check_positive("sigma", sigma)
    theta, mu, norm = _as_theta_mu(theta, mu)
    return Q(theta @ mu / (sigma * norm))


def err_robust(theta, mu, sigma=1.0, eps=0.0):
    """ℓ∞ robust error of sign(θᵀx), paper eq. (7): Q(μᵀθ/(σ‖θ‖) - ε‖θ‖₁/(σ‖θ‖)).

    The inner infimum over ‖ν‖∞ ≤ ε of y(x+ν)ᵀθ is yxᵀθ - ε‖θ‖₁ (Hölder, attained at
    ν = -ε y sign(θ)). theta: (..., d); mu: (d,). Returns (...) float64.
    """
    sigma = _check_positive("sigma", sigma)
    eps = _check_nonneg("eps", eps)
    theta, mu, norm = _as_theta_mu(theta, mu)
    l1 = np.abs(theta).sum(axis=-1)
    return Q((theta @ mu - eps * l1) / (sigma * norm))


def hard_threshold(mu, eps):
    """T_ε(μ)_j = sign(μ_j) max(|μ_j| - ε, 0) (paper App. A.1, after Deng et al. 2021; the paper
    calls it hard thresholding, the formula is the soft-thresholding operator). mu: (d,)."""
    eps = _check_nonneg("eps", eps)
    mu = np.asarray(mu, dtype=np.float64)
    return np.sign(mu) * np.maximum(np.abs(mu) - eps, 0.0)


def robust_optimal_theta(mu, eps):
    """θ* = T_ε(μ)/‖T_ε(μ)‖, the minimiser of eq. (7) over θ (App. A.1; Deng et al. 2021).

    Why it is optimal: μᵀθ - ε‖θ‖₁ ≤ Σ_j (|μ_j| - ε)⁺ |θ_j| ≤ ‖T_ε(μ)‖ ‖θ‖ (Cauchy-Schwarz), with
    equality at θ ∝ T_ε(μ). Raises ValueError when every |μ_j| ≤ ε (no classifier is robust:
    the robust error is ≥ ½ for every θ).
    """
    t = hard_threshold(mu, eps)
    norm = np.linalg.norm(t)
    if norm == 0:
        raise ValueError(f"eps={eps} >= max|mu_j|: T_eps(mu) = 0, no robust direction exists")
    return t / norm


def make_mu(d, mu_norm2, angle=0.0):
    """The mean μ of the tables: ‖μ‖² = mu_norm2 at ``angle`` degrees from 1_d (hence from ε1_d).

    μ = ‖μ‖ (cos a · 1/√d + sin a · u), u = the unit alternating vector (1, -1, 1, -1, …)/√(2⌊d/2⌋)
    (last coordinate 0 when d is odd), which is orthogonal to 1_d. For d = 2 this is
    μ = ‖μ‖ (cos(45° - a), sin(45° - a)): 0° gives μ ∝ (1, 1), 90° gives μ ∝ (1, -1) — the
    paper's reading "0 degrees, i.e. μ = c 1_d" (App. B). Returns (d,) float64.
    """
    d = _check_int("d", d, 1)
    mu_norm2 = _check_positive("mu_norm2", mu_norm2)
    if isinstance(angle, bool) or not isinstance(angle, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(angle)) or not 0.0 <= float(angle) <= 180.0:
        raise ValueError(f"angle must be a number of degrees in [0, 180], got {angle!r}")
    a = math.radians(float(angle))
    ones = np.full(d, 1.0 / math.sqrt(d))
    if d == 1:
        if abs(math.sin(a)) > 1e-12:
            raise ValueError("angle must be 0 or 180 when d = 1 (no direction orthogonal to 1_d)")
        u = np.zeros(1)
    else:
        m = 2 * (d // 2)
        u = np.zeros(d)
        u[:m] = np.where(np.arange(m) % 2 == 0, 1.0, -1.0) / math.sqrt(m)
    return math.sqrt(mu_norm2) * (math.cos(a) * ones + math.sin(a) * u)


def synthetic_mean(mu, c, eps=0.0, target="clean"):
    """μ̃ of Proposition 1: c μ (``target="clean"``, Case 2) or c (μ - ε1) (``"robust"``, Case 3)."""
    c = _check_positive("c", c)
    mu = np.asarray(mu, dtype=np.float64)
    if target == "clean":
        return c * mu
    if target == "robust":
        return c * (mu - _check_nonneg("eps", eps))
    raise ValueError(f"target must be 'clean' or 'robust', got {target!r}")


def _labelled_mean(rng, mu, n, sigma, trials):
    """Σ_i y_i x_i and nothing else, for n points per class: (trials, d).

    Drawn exactly: with y fixed (n each), Σ y_i x_i = 2n μ + σ Σ y_i z_i and Σ y_i z_i ~ N(0, 2n I).
    """
    d = mu.shape[0]
    return 2 * n * mu + sigma * math.sqrt(2 * n) * rng.standard_normal((trials, d))


def self_training(mu, mu_tilde, *, n, n_syn, sigma=1.0, trials=50, rng=None,
                  include_real=False, labels="pseudo"):
    """The self-training estimator of §3.1 / eq. (5), for ``trials`` independent data sets.

    1. n labelled real points per class, x = y μ + σ z; θ̂_inter = (1/2n) Σ y_i x_i.
    2. ñ = ``n_syn`` synthetic points per component of 0.5 N(μ̃, σ²I) + 0.5 N(-μ̃, σ²I).
    3. Pseudo-labels ỹ_j = sign(θ̂_interᵀ x̃_j) (``labels="pseudo"``; sign(0) := +1), or the
       component the point came from (``labels="oracle"``: the independence the proof of
       Proposition 1 assumes).
    4. θ̂_final = (1/2ñ) Σ ỹ_j x̃_j (synthetic only: App. B of the revision, "learning θ … on
       synthetic data"), or eq. (5) exactly, (Σ y_i x_i + Σ ỹ_j x̃_j)/(2n + 2ñ), when
       ``include_real``.

    As ñ → ∞ with pseudo-labels (σ = 1, v = θ̂_inter/‖θ̂_inter‖, a = vᵀμ̃):
    θ̂_final(synthetic only) → (2Φ(a) - 1) μ̃ + 2φ(a) v. The second term — pseudo-labels are
    correlated with the noise of each point — is what the proof of Proposition 1 drops; it makes
    an orthogonal μ̃ "inefficient" (θ̂_final ∝ θ̂_inter) rather than maximally bad.

    mu, mu_tilde: (d,). Returns (theta_inter, theta_final), each (trials, d) float64. The
    synthetic points are materialised ((trials, 2ñ, d) floats) because the pseudo-labels depend
    on each point, not only on a sufficient statistic.
    """
    sigma = _check_positive("sigma", sigma)
    n = _check_int("n", n, 1)
    n_syn = _check_int("n_syn", n_syn, 1)
    trials = _check_int("trials", trials, 1)
    if labels not in ("pseudo", "oracle"):
        raise ValueError(f"labels must be 'pseudo' or 'oracle', got {labels!r}")
    mu = np.asarray(mu, dtype=np.float64)
    mu_tilde = np.asarray(mu_tilde, dtype=np.float64)
    if mu.ndim != 1 or mu_tilde.shape != mu.shape:
        raise ValueError(f"mu_tilde must have the shape of mu {mu.shape}, got {mu_tilde.shape}")
    rng = np.random.default_rng(rng)
    d = mu.shape[0]
    real_sum = _labelled_mean(rng, mu, n, sigma, trials)
    theta_inter = real_sum / (2 * n)
    comp = np.concatenate([np.ones(n_syn), -np.ones(n_syn)])          # (2ñ,)
    x_syn = comp[None, :, None] * mu_tilde + sigma * rng.standard_normal((trials, 2 * n_syn, d))
    if labels == "pseudo":
        score = np.einsum("tjd,td->tj", x_syn, theta_inter)
        y_syn = np.where(score >= 0, 1.0, -1.0)
    else:
        y_syn = np.broadcast_to(comp, (trials, 2 * n_syn))
    syn_sum = np.einsum("tj,tjd->td", y_syn, x_syn)
    if include_real:
        theta_final = (real_sum + syn_sum) / (2 * n + 2 * n_syn)
    else:
        theta_final = syn_sum / (2 * n_syn)
    return theta_inter, theta_final


def simulate(d, mu_norm2, eps, n, n_syn, c=None, *, angle=0, trials=50, seed=0, sigma=1.0,
             target="clean", include_real=False, labels="pseudo"):
    """One cell of Tables 1/7/8/9: mean and std over ``trials`` of clean and robust accuracy.

    d: dimension; mu_norm2: ‖μ‖²; eps: ℓ∞ radius; angle: degrees between μ and ε1_d
    (``make_mu``); n: labelled real points per class; n_syn: synthetic points per mixture
    component; c: None = "Real" row, θ̂ = (1/2n) Σ y_i x_i from the real data alone; else
    μ̃ = c μ (``target="clean"``) or c (μ - ε1) (``"robust"``) and θ̂ = ``self_training``.
    Accuracies are 1 - eq. (6) and 1 - eq. (7) (exact over the test distribution).

    Returns {"acc_mean", "acc_std", "rob_mean", "rob_std"} (floats; std with ddof = 0).
    Randomness: one NumPy generator seeded by ``seed`` draws all trials in one vectorised batch,
    so a result is a function of (seed, trials, the other arguments).
    """
    d = _check_int("d", d, 1)
    mu = make_mu(d, mu_norm2, angle)
    eps = _check_nonneg("eps", eps)
    sigma = _check_positive("sigma", sigma)
    n = _check_int("n", n, 1)
    n_syn = _check_int("n_syn", n_syn, 1)
    trials = _check_int("trials", trials, 1)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    if c is None:
        theta = _labelled_mean(rng, mu, n, sigma, trials) / (2 * n)
    else:
        mu_tilde = synthetic_mean(mu, c, eps, target)
        _, theta = self_training(mu, mu_tilde, n=n, n_syn=n_syn, sigma=sigma, trials=trials,
                                 rng=rng, include_real=include_real, labels=labels)
    acc = 1.0 - err_standard(theta, mu, sigma)
    rob = 1.0 - err_robust(theta, mu, sigma, eps)
    return {"acc_mean": float(np.mean(acc)), "acc_std": float(np.std(acc)),
            "rob_mean": float(np.mean(rob)), "rob_std": float(np.std(rob))}


def draw_holdout(mu, n_test, sigma=1.0, rng=None):
    """A finite test set of the §3.1 model: y uniform on {-1, +1}, x = y μ + σ z.

    mu: (d,); n_test: number of points. Returns (x (n_test, d), y (n_test,)) float64.
    """
    sigma = _check_positive("sigma", sigma)
    n_test = _check_int("n_test", n_test, 1)
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 1 or mu.size < 1 or not np.all(np.isfinite(mu)):
        raise ValueError(f"mu must be a finite non-empty 1-D vector, got shape {mu.shape}")
    rng = np.random.default_rng(rng)
    y = np.where(rng.random(n_test) < 0.5, 1.0, -1.0)
    x = y[:, None] * mu + sigma * rng.standard_normal((n_test, mu.shape[0]))
    return x, y


def holdout_accuracy(theta, x, y, eps=0.0):
    """Clean and ℓ∞-robust accuracy of sign(θᵀx) measured on the points (x, y).

    A point counts as correct when y θᵀx > 0 and as robustly correct when y θᵀx - ε‖θ‖₁ > 0
    (the worst case over ‖ν‖∞ ≤ ε, as in eq. 7). theta: (..., d); x: (N, d); y: (N,).
    Returns (acc, rob), each (...) float64 (Python floats for a single θ); their expectations
    over the draw of (x, y) are 1 - eq. (6) and 1 - eq. (7).
    """
    eps = _check_nonneg("eps", eps)
    theta = np.asarray(theta, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or theta.ndim < 1 or theta.shape[-1] != x.shape[1]:
        raise ValueError(f"need theta (..., d), x (N, d), y (N,); got theta {theta.shape}, "
                         f"x {x.shape}, y {y.shape}")
    margin = np.einsum("n,nd,...d->...n", y, x, theta)
    l1 = np.abs(theta).sum(axis=-1)
    acc = np.mean(margin > 0, axis=-1)
    rob = np.mean(margin - (eps * l1)[..., None] > 0, axis=-1)
    if acc.ndim == 0:
        return float(acc), float(rob)
    return acc, rob


def holdout_sd(acc, rob, n_test):
    """Sampling noise of accuracies measured on one test set of ``n_test`` iid points.

    For a fixed classifier with true clean accuracy ``acc`` and robust accuracy ``rob``
    (rob ≤ acc: a robustly correct point is correct), the measured pair has standard deviations
    √(acc(1-acc)/N), √(rob(1-rob)/N) and correlation √(rob(1-acc) / (acc(1-rob))), since
    Cov(1[correct], 1[robustly correct]) = rob - acc·rob. Returns (sd_acc, sd_rob, rho).
    """
    n_test = _check_int("n_test", n_test, 1)
    acc, rob = float(acc), float(rob)
    if not 0.0 < rob <= acc < 1.0:
        raise ValueError(f"need 0 < rob <= acc < 1, got acc={acc!r}, rob={rob!r}")
    rho = math.sqrt(rob * (1.0 - acc) / (acc * (1.0 - rob)))
    return math.sqrt(acc * (1.0 - acc) / n_test), math.sqrt(rob * (1.0 - rob) / n_test), rho
