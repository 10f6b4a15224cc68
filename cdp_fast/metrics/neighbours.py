"""Nearest-neighbour metrics, chunked so no N×N matrix is built beyond ``chunk`` rows: k-NN
radii (:func:`knn_radii`), precision / recall / density / coverage (:func:`prdc`), nearest
neighbours (:func:`nn_distances`) and the memorisation check (:func:`memorisation`).
"""
from __future__ import annotations

import math

import torch

from cdp_fast.metrics.inputs import as_features, as_x01, check_positive_int

__all__ = ["knn_radii", "prdc", "nn_distances", "memorisation"]

_DIRECT_MAX_DIM = 128   # up to this dimension distances are computed pair by pair (exact, chunk-independent)


def _cdist(a, b):
    """Euclidean distances (len(a), len(b)) in float64; pair by pair (exact, the same value for a
    pair whatever the chunk) up to 128 dimensions, else by the Gram expansion."""
    mode = "donot_use_mm_for_euclid_dist" if a.shape[1] <= _DIRECT_MAX_DIM else "use_mm_for_euclid_dist"
    return torch.cdist(a, b, compute_mode=mode)


def _flat64(f, name="features"):
    """(N, d) float64; NaN / inf refused naming ``name`` (:func:`as_features`)."""
    return as_features(f, name)


def knn_radii(f, k: int = 5, *, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of f (N, d) to its k-th nearest *other* row (self excluded by
    index), chunked (chunk × N distances at a time). float64 (N,). Needs N > k >= 1
    (ValueError naming k) and finite features."""
    k = check_positive_int(k, "k")
    f = _flat64(f)
    n = len(f)
    if n <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {n}")
    out = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        d = _cdist(f[s:s + chunk], f)
        rows = torch.arange(len(d))
        d[rows, rows + s] = math.inf
        out[s:s + len(d)] = d.topk(k, dim=1, largest=False).values[:, -1]
    return out


def prdc(real_f, fake_f, *, k: int = 5, chunk: int = 1024) -> dict:
    """Precision / recall [K19] and density / coverage [N20] of fake features against real ones.

    With r_i the distance of real point X_i to its k-th nearest other real point and s_j the
    same for the fakes Y_j (:func:`knn_radii`), and strict inequalities as in the reference code:
        precision = (1/M) Σ_j 1[∃ i: ‖Y_j − X_i‖ < r_i]
        recall    = (1/N) Σ_i 1[∃ j: ‖X_i − Y_j‖ < s_j]
        density   = (1/(kM)) Σ_j Σ_i 1[‖Y_j − X_i‖ < r_i]
        coverage  = (1/N) Σ_i 1[min_j ‖X_i − Y_j‖ < r_i]
    Identical sets (no ties) give precision = recall = coverage = 1 and density = 1 (each real
    ball holds its own copy and k − 1 neighbours); i.i.d. draws from one distribution give
    density ≈ 1 in expectation.

    Args:
        real_f: (N, d), fake_f: (M, d) features (both > k rows).
        k: neighbours of the radii (5 as in [N20]).
        chunk: rows per distance block (memory chunk × max(N, M) float64).
    Returns: {"precision", "recall", "density", "coverage", "k"}.
    Raises ValueError naming k (k < 1) or the features holding NaN / inf (a NaN distance
    would silently count as "outside every ball").
    """
    k = check_positive_int(k, "k")
    xr, xf = _flat64(real_f, "real features"), _flat64(fake_f, "fake features")
    if xr.shape[1] != xf.shape[1]:
        raise ValueError(f"feature dims differ: real {xr.shape[1]}, fake {xf.shape[1]}")
    r = knn_radii(xr, k, chunk=chunk)
    s = knn_radii(xf, k, chunk=chunk)
    in_real = 0
    dens = 0.0
    for a in range(0, len(xf), chunk):
        inside = _cdist(xf[a:a + chunk], xr) < r[None, :]
        in_real += int(inside.any(1).sum())
        dens += float(inside.sum())
    rec = 0
    cov = 0
    for a in range(0, len(xr), chunk):
        d = _cdist(xr[a:a + chunk], xf)
        rec += int((d < s[None, :]).any(1).sum())
        cov += int((d.min(1).values < r[a:a + chunk]).sum())
    m, n = len(xf), len(xr)
    return {"precision": in_real / m, "recall": rec / n, "density": dens / (k * m), "coverage": cov / n,
            "k": int(k)}


def nn_distances(a, b, *, exclude_self: bool = False, chunk: int = 1024):
    """Nearest neighbour in b of every row of a: (distance float64 (len(a),), index int64).

    Rows are flattened. Above 128 dimensions the candidate is found by a float32 Gram expansion
    and its distance recomputed exactly in float64 from the difference (so an exact copy has
    distance 0). ``exclude_self``: a and b are the same set; row i never matches itself."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dims differ: {a.shape[1]} vs {b.shape[1]}")
    direct = a.shape[1] <= _DIRECT_MAX_DIM
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    b32 = b.to(torch.float32)
    b_sq = (b32 ** 2).sum(1) if not direct else None
    dist = torch.empty(len(a), dtype=torch.float64)
    idx = torch.empty(len(a), dtype=torch.int64)
    for s in range(0, len(a), chunk):
        if direct:
            d = _cdist(a64[s:s + chunk], b64)
        else:
            q = a[s:s + chunk].to(torch.float32)
            d = (q ** 2).sum(1, keepdim=True) + b_sq[None, :] - 2 * q @ b32.T
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + s] = math.inf
        j = d.argmin(1)
        idx[s:s + len(d)] = j
        dist[s:s + len(d)] = (d[torch.arange(len(d)), j] if direct
                              else torch.linalg.vector_norm(a64[s:s + chunk] - b64[j], dim=1))
    return dist, idx


def _summary(v: torch.Tensor, qs=(0.05, 0.5)) -> dict:
    v = v.to(torch.float64)
    out = {"min": float(v.min()), "mean": float(v.mean())}
    for q in qs:
        out[f"q{int(round(q * 100)):02d}"] = float(torch.quantile(v, q))
    out["max"] = float(v.max())
    return out


def memorisation(x_syn, x_train, *, f_syn=None, f_train=None, quantile: float = 0.05,
                 chunk: int = 1024) -> dict:
    """How close generated images come to the training images (copies = memorisation).

    For each synthetic image, its Euclidean distance to the nearest training image, in pixel
    space (flattened images in [0, 1]) and, when features are given, in that feature space.
    The yardstick is the training set's own spacing: τ = the ``quantile`` (5%) quantile of the
    distances from each training image to its nearest *other* training image; ``fraction_below``
    = the share of synthetic images strictly closer than τ to the training set. Exact copies of
    training images have distance 0 and count (when τ > 0).

    Args:
        x_syn: (M, C, H, W), x_train: (N, C, H, W) images in [0, 1].
        f_syn, f_train: optional features (M, d), (N, d).
    Returns:
        {"pixel": {min, mean, q05, q50, max, "real_nn_q": τ, "fraction_below"}, "features": same
        (if features given), "quantile"}.
    """
    xs, xt = as_x01(x_syn, "x_syn"), as_x01(x_train, "x_train")

    def one(a, b):
        d, _ = nn_distances(a, b, chunk=chunk)
        own, _ = nn_distances(b, b, exclude_self=True, chunk=chunk)
        tau = float(torch.quantile(own, quantile))
        out = _summary(d)
        out["real_nn_q"] = tau
        out["fraction_below"] = float((d < tau).double().mean())
        return out

    res = {"quantile": quantile, "pixel": one(xs, xt)}
    if f_syn is not None and f_train is not None:
        res["features"] = one(_flat64(f_syn, "f_syn"), _flat64(f_train, "f_train"))
    return res
