"""Class separation in a feature space: the Fisher ratio and the per-pair distance of the class
means over the within-class std (:func:`class_separation`), and the paper's c read off as the
ratio of synthetic to real separation (:func:`effective_c`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cdp_fast.metrics.inputs import as_features, as_labels

__all__ = ["class_separation", "effective_c"]

#: Scatter is "zero" (so a ratio of two scatters is 0/0, reported as None) when the RMS
#: distance it measures is below ZERO_SPREAD · max(1, RMS norm of the features): float64
#: rounding noise, e.g. on constant images, is ~1e-16 of the features' scale.
ZERO_SPREAD = 1e-10


def _zero_tol(f: torch.Tensor) -> float:
    """The squared-distance threshold of :data:`ZERO_SPREAD` for features f (N, d)."""
    return ZERO_SPREAD ** 2 * max(1.0, float((f ** 2).sum(1).mean()))


def _class_stats(f: torch.Tensor, y: torch.Tensor):
    """Per class c present: n_c, mean m_c (d,), sum of squared deviations Σ‖f − m_c‖²."""
    f = f.to(torch.float64)
    classes = torch.unique(y).tolist()
    stats = {}
    for c in classes:
        fc = f[y == c]
        m = fc.mean(0)
        stats[int(c)] = (len(fc), m, float(((fc - m) ** 2).sum()))
    return stats


def class_separation(f, y) -> dict:
    """Class separation of features f (N, d) with labels y (N,).

    Definitions (all traces, so no d × d matrix is formed):
      - Fisher ratio = tr S_B / tr S_W (Fisher 1936; the trace form of the LDA criterion), with
        S_W = (1/N) Σ_c Σ_{i∈c} (f_i − m_c)(f_i − m_c)ᵀ and S_B = (1/N) Σ_c n_c (m_c − m)(m_c − m)ᵀ.
        For two equally likely classes N(±μ, σ² I_d): tr S_B = ‖μ‖², tr S_W = d σ², so the
        ratio is ‖μ‖² / (d σ²).
      - separation of a class pair (a, b) = ‖m_a − m_b‖ / σ_ab, where σ_ab² = (S_a + S_b) /
        ((n_a + n_b) d) is the pooled within-class variance per dimension of the two classes
        (S_c = Σ_{i∈c} ‖f_i − m_c‖²): "the distance between the class means over the
        within-class std". In the paper's model (§3.1: x | y ~ N(yμ, σ² I)) it is 2‖μ‖/σ.
        For K > 2 classes: ``separation_mean`` = the mean over the K(K−1)/2 pairs,
        ``separation_min`` = the closest pair. Classes with fewer than 2 members are left out.
      - 0/0 is None, not a number: when the within- and the between-class scatter are both
        zero (RMS spread below :data:`ZERO_SPREAD` · max(1, RMS feature norm), e.g. constant
        images, whose float rounding noise would otherwise give any ratio) every value is None;
        a pair whose mean distance and pooled std are both zero is left out of the pairs.
        Within-class scatter zero with the means apart is a true ∞ (JSON: None).
    Returns:
        {"fisher_ratio", "separation_mean", "separation_min", "closest_pair": [a, b],
         "num_classes_used"} (floats; None where fewer than 2 classes qualify or 0/0).
    Raises ValueError if f holds NaN or inf.
    """
    f = as_features(f, "features")
    y = as_labels(y, len(f))
    stats = {c: s for c, s in _class_stats(f, y).items() if s[0] >= 2}
    out = {"fisher_ratio": None, "separation_mean": None, "separation_min": None, "closest_pair": None,
           "num_classes_used": len(stats)}
    if len(stats) < 2:
        return out
    n = sum(s[0] for s in stats.values())
    d = f.shape[1]
    m = sum(s[0] * s[1] for s in stats.values()) / n
    tr_w = sum(s[2] for s in stats.values()) / n
    tr_b = float(sum(s[0] * ((s[1] - m) ** 2).sum() for s in stats.values())) / n
    tol = _zero_tol(f)
    if tr_w <= tol and tr_b <= tol:       # 0/0: no separation to measure
        return out
    out["fisher_ratio"] = tr_b / tr_w if tr_w > tol else math.inf
    pairs = _pair_separations(stats, d, tol)
    if not pairs:
        return out
    vals = list(pairs.values())
    out["separation_mean"] = float(np.mean(vals))
    closest = min(pairs, key=pairs.get)
    out["separation_min"] = float(pairs[closest])
    out["closest_pair"] = list(closest)
    return out


def _pair_separations(stats, d, tol):
    """{(a, b): separation}; a pair whose squared mean distance and pooled variance (· d) are
    both <= tol (0/0) is left out."""
    cs = sorted(stats)
    out = {}
    for i, a in enumerate(cs):
        for b in cs[i + 1:]:
            na, ma, sa = stats[a]
            nb, mb, sb = stats[b]
            var = (sa + sb) / ((na + nb) * d)
            dist = float(torch.linalg.vector_norm(ma - mb))
            if var * d <= tol and dist ** 2 <= tol:
                continue
            out[(a, b)] = dist / math.sqrt(var) if var * d > tol else math.inf
    return out


def effective_c(f_syn, y_syn, f_real, y_real) -> dict:
    """The paper's c (§3.2: synthetic means ±μ̃ = ±cμ with the real σ), measured.

    Since the generated classes need not keep the real within-class spread, c is read off as the
    ratio of *distinguishabilities*: for each class pair (a, b) present (≥ 2 members) in both
    sets, c_ab = sep_syn(a, b) / sep_real(a, b), with sep = ‖m_a − m_b‖ / σ_ab as in
    :func:`class_separation`. For the paper's two Gaussians (real N(±μ, σ²I), synthetic
    N(±cμ, σ²I)) c_ab = c exactly in expectation; a smaller synthetic σ̃ counts as a larger c
    (the same distinguishability at the real σ), which is what Figure 2 shows HNM doing.
    For K > 2: ``effective_c`` = the mean of c_ab over the pairs, ``effective_c_min`` = its min.

    Args: features (N, d) and labels (N,) of the synthetic and of the real set, in one space.
    Returns: {"effective_c", "effective_c_min", "pairs": number of pairs used} (None if none).
    """
    fs, fr = as_features(f_syn, "synthetic features"), as_features(f_real, "real features")
    if fs.shape[1] != fr.shape[1]:
        raise ValueError(f"feature dims differ: synthetic {fs.shape[1]}, real {fr.shape[1]}")
    ss = {c: s for c, s in _class_stats(fs, as_labels(y_syn, len(fs))).items() if s[0] >= 2}
    sr = {c: s for c, s in _class_stats(fr, as_labels(y_real, len(fr))).items() if s[0] >= 2}
    common = {c for c in ss if c in sr}
    ps = _pair_separations({c: ss[c] for c in common}, fs.shape[1], _zero_tol(fs))
    pr = _pair_separations({c: sr[c] for c in common}, fr.shape[1], _zero_tol(fr))
    ratios = [ps[p] / pr[p] for p in ps if p in pr and pr[p] > 0 and math.isfinite(pr[p])]
    if not ratios:
        return {"effective_c": None, "effective_c_min": None, "pairs": 0}
    return {"effective_c": float(np.mean(ratios)), "effective_c_min": float(np.min(ratios)),
            "pairs": len(ratios)}
