"""The Gaussian part of `cdp-fast demo`: the paper's §3 mechanism end to end, exactly.

Setting (§3.1): y uniform on {−1, +1}, x | y ~ N(yμ, σ²I), σ = 1, in the two settings of the
paper's Table 1 (:data:`GAUSS_SETTINGS`): d = 2, μ = (1, 1), ε = 0.5 (App. C.2's mixture) and
d = 100, ‖μ‖² = 4, μ ∝ 1_d, ε = 0.1. For each seed s:

1. n real points per class (a NumPy generator seeded by (s, 7)); θ̂_inter = (1/2n) Σ y_i x_i;
2. ñ synthetic points from the *exact-score* diffusion (:class:`cdp_fast.theory.mixture.MixtureEps`,
   50 uniform DDIM steps, one contrastive batch of ñ, ``cdp_fast.sample`` with seed s, so every
   arm starts from the same x_T): ``ddim`` unguided; ``cdp`` unconditional HNM (λ = 300);
   ``cdp-class`` class-conditional HNM (λ = 3; the classes of the negatives are θ̂_inter's
   labels of the current x̂₀, not the oracle's). τ = 0.5, τ⁺ = 0, anchor form at every step, no
   head: the settings ``benchmarks/toy2d.py`` measured for Figure 2 / App. C.2
   (:data:`cdp_fast.theory.mixture.VARIANTS`), fixed before this chain existed, never tuned on accuracy;
3. pseudo-labels ỹ_j = sign(θ̂_interᵀ x̃_j) (sign(0) := +1), as §3.1;
4. θ̂_final from eq. (5): (Σ y_i x_i + Σ ỹ_j x̃_j) / (2n + ñ) (``real+…`` arms), the real-only
   estimate θ̂_inter (``real``), or the synthetic points alone (``syn-only``: the cdp set);
5. standard and robust accuracy 1 − eq. (6), 1 − eq. (7) (:func:`cdp_fast.theory.err_standard`,
   :func:`cdp_fast.theory.err_robust`): exact expectations over the test distribution, so the
   only randomness is the training data and the x_T.

The arms are paired by seed; :func:`cdp_fast.demo.stats.paired_ci` gives each guided arm's
difference to ``real+ddim``. :func:`fisher_along` records how far each guided set's pseudo-classes
moved apart along μ, i.e. whether the guidance did anything in that setting (the λ were measured
in 2-D; in d = 100 they move the samples much less).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from cdp_fast.demo.stats import paired_ci, summarise

__all__ = ["GAUSS_ARMS", "GAUSS_DEFAULTS", "GAUSS_SETTINGS", "fisher_along", "gaussian_settings", "eq5", "pseudo_labels", "accuracies", "linear_labeler",
           "gaussian_chain"]

GAUSS_ARMS = ("real", "real+ddim", "real+cdp", "real+cdp-class", "syn-only")
GAUSS_DEFAULTS = {"mu": (1.0, 1.0), "sigma": 1.0, "eps": 0.5, "n_real": 10, "n_syn": 200, "steps": 50,
                  "seeds": 20}
#: the two settings of the paper's Table 1 the demo runs: d = 2 (‖μ‖² = 2, ε = 0.5; App. C.2's
#: mixture, where the λ of :data:`cdp_fast.theory.mixture.VARIANTS` were measured) and d = 100 (‖μ‖² = 4,
#: ε = 0.1, μ along 1_d as :func:`cdp_fast.theory.make_mu` at 0°), with the same λ
GAUSS_SETTINGS = {"d=2": {"dim": 2, "mu_norm2": 2.0, "eps": 0.5}, "d=100": {"dim": 100, "mu_norm2": 4.0, "eps": 0.1}}


def fisher_along(x, y, mu) -> float:
    """(m₊ − m₋)² / (Var₊ + Var₋) of the projections xᵀμ/‖μ‖ by label ±1 (ddof 0): how far the
    guidance moved a set's classes apart along μ; NaN if a class has < 2 points."""
    u = np.asarray(mu, np.float64) / np.linalg.norm(mu)
    p = np.asarray(x, np.float64) @ u
    a, b = p[np.asarray(y) > 0], p[np.asarray(y) < 0]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float((a.mean() - b.mean()) ** 2 / (a.var() + b.var()))


def pseudo_labels(theta, x) -> np.ndarray:
    """ỹ = sign(θᵀx) with sign(0) := +1, (n,) float64 in {−1, +1}."""
    return np.where(np.asarray(x, np.float64) @ np.asarray(theta, np.float64) >= 0, 1.0, -1.0)


def eq5(x_real, y_real, x_syn=None, y_syn=None) -> np.ndarray:
    """θ̂ of eq. (5): (Σ y_i x_i + Σ ỹ_j x̃_j) / (n + ñ) over all given points (labels ±1);
    without synthetic points the real-only mean (1/n) Σ y_i x_i (= θ̂_inter)."""
    xr, yr = np.asarray(x_real, np.float64), np.asarray(y_real, np.float64)
    total, count = yr @ xr, len(yr)
    if x_syn is not None:
        xs, ys = np.asarray(x_syn, np.float64), np.asarray(y_syn, np.float64)
        total, count = total + ys @ xs, count + len(ys)
    return total / count


def accuracies(theta, mu, sigma, eps) -> tuple:
    """(1 − eq. (6), 1 − eq. (7)) of sign(θᵀx)."""
    from cdp_fast import theory

    return (1.0 - float(theory.err_standard(theta, mu, sigma)),
            1.0 - float(theory.err_robust(theta, mu, sigma, eps)))


def linear_labeler(theta):
    """The sampler's labeller for sign(θᵀx): x (B, D) -> logits (B, 2) = (−θᵀx, θᵀx)."""
    th = torch.as_tensor(np.asarray(theta), dtype=torch.float32)

    def labeler(x):
        s = x.float() @ th.to(x.device)
        return torch.stack([-s, s], 1)
    return labeler


def _synthetic(kind, model, n_syn, steps, seed, labeler):
    import cdp_fast
    from cdp_fast.theory.mixture import TOY_FORM, VARIANTS

    name = {"ddim": "no guidance", "cdp": "HNM", "cdp-class": "class-conditional HNM"}[kind]
    opts = dict(VARIANTS[name])
    kw = {} if opts["loss"] is None else dict(TOY_FORM, features="pixels")   # the 2-D points are the features
    s = cdp_fast.sample(model, n_syn, labeler=labeler, image_shape=(model.mu.numel(),), output="float",
                        steps=steps, skip="uniform", batch_size=n_syn, seed=seed, progress=False, compile=False,
                        device="cpu", **kw, **opts)
    return np.asarray(s.images, dtype=np.float64)


def gaussian_chain(*, seeds=None, n_real: int = 10, n_syn: int = 200, steps: int = 50, eps: float = 0.5,
                   mu=(1.0, 1.0), sigma: float = 1.0, callback=None) -> dict:
    """Run the chain of the module docstring for each seed; returns a JSON-ready dict with the
    config, per-arm standard / robust accuracy (mean, std, per seed), each arm's paired
    difference to real+ddim with its 95% CI, θ̂ per seed and arm ({"cos_mu": cos(θ̂, μ), "theta":
    θ̂ for d <= 10, else None}), the Fisher ratio along μ of each set, and the time taken.

    seeds: list of ints (default ``range(GAUSS_DEFAULTS["seeds"])``); n_real: real points per
    class; n_syn: synthetic points (one contrastive batch); eps: ℓ∞ radius of eq. (7).
    """
    from cdp_fast.theory.mixture import LAM_CLASS, LAM_UNCOND, MixtureEps

    seeds = list(range(GAUSS_DEFAULTS["seeds"])) if seeds is None else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"gaussian seeds must be non-negative ints, got {seeds!r}")
    for name, v, lo in (("n_real", n_real, 1), ("n_syn", n_syn, 2), ("steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"gaussian {name} must be an int >= {lo}, got {v!r}")
    mu = np.asarray(mu, np.float64)
    if sigma != 1.0:
        raise ValueError("the exact-score model is the mixture with s0 = 1: sigma must be 1")
    t0 = time.time()
    model = MixtureEps(mu=tuple(mu), s0=1.0)
    acc = {a: {"standard": [], "robust": []} for a in GAUSS_ARMS}
    thetas = {a: [] for a in GAUSS_ARMS}
    fisher = {k: [] for k in ("ddim", "cdp", "cdp-class")}
    for seed in seeds:
        rng = np.random.default_rng([seed, 7])
        y = np.concatenate([np.ones(n_real), -np.ones(n_real)])
        x = y[:, None] * mu + sigma * rng.standard_normal((2 * n_real, mu.size))
        theta_inter = eq5(x, y)
        lab = linear_labeler(theta_inter)
        syn = {k: _synthetic(k, model, n_syn, steps, seed, lab) for k in ("ddim", "cdp", "cdp-class")}
        ys = {k: pseudo_labels(theta_inter, v) for k, v in syn.items()}
        for k in syn:
            fisher[k].append(fisher_along(syn[k], ys[k], mu))
        th = {"real": theta_inter, "syn-only": eq5(syn["cdp"], ys["cdp"])}
        for k in ("ddim", "cdp", "cdp-class"):
            th["real+" + k] = eq5(x, y, syn[k], ys[k])
        for a in GAUSS_ARMS:
            s_acc, r_acc = accuracies(th[a], mu, sigma, eps)
            acc[a]["standard"].append(s_acc)
            acc[a]["robust"].append(r_acc)
            cos = float(th[a] @ mu / (np.linalg.norm(th[a]) * np.linalg.norm(mu)))
            thetas[a].append({"cos_mu": cos, "theta": [float(v) for v in th[a]] if mu.size <= 10 else None})
        if callback is not None:
            callback({"stage": "gaussian", "seed": seed,
                      "result": {a: (acc[a]["standard"][-1], acc[a]["robust"][-1]) for a in GAUSS_ARMS}})
    arms = {a: {m: summarise(v) for m, v in acc[a].items()} for a in GAUSS_ARMS}
    paired = {a: {m: paired_ci(acc[a][m], acc["real+ddim"][m]) for m in ("standard", "robust")}
              for a in GAUSS_ARMS if a != "real+ddim"}
    return {
        "config": {"mu": mu.tolist(), "sigma": sigma, "eps": eps, "n_real_per_class": n_real, "n_syn": n_syn,
                   "steps": steps, "seeds": seeds, "lam_class": LAM_CLASS, "lam_uncond": LAM_UNCOND,
                   "guidance": "HNM tau=0.5, tau_plus=0, beta=1, anchor form, every step, no head "
                               "(cdp_fast.theory.mixture.VARIANTS, as benchmarks/toy2d.py measured Figure 2)",
                   "labels": "sign(theta_inter^T x), theta_inter = real-only mean of y x (section 3.1); the "
                             "class-conditional negatives use the same rule on the current x0-hat",
                   "estimator": "eq. (5) on real + pseudo-labelled synthetic; syn-only: the cdp set alone",
                   "accuracy": "1 - eq. (6) / 1 - eq. (7): exact over the test distribution"},
        "arms": arms, "paired_vs_ddim": paired, "theta": thetas,
        "fisher_along_mu": {k: summarise(v) for k, v in fisher.items()}, "seconds": time.time() - t0,
    }


def gaussian_settings(*, seeds=None, callback=None) -> dict:
    """:func:`gaussian_chain` in each of :data:`GAUSS_SETTINGS` (same seeds): {name: result}."""
    from cdp_fast.theory.gaussian import make_mu

    return {name: gaussian_chain(seeds=seeds, mu=make_mu(st["dim"], st["mu_norm2"]), eps=st["eps"],
                                 callback=callback)
            for name, st in GAUSS_SETTINGS.items()}
