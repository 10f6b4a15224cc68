"""Class separation in a feature space: the Fisher ratio and the per-pair distance of the class
means over the within-class std (:func:`class_separation`), and the paper's c read off as the
ratio of synthetic to real separation (:func:`effective_c`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cdp_fast.metrics.inputs import as_labels

__all__ = ["class_separation", "effective_c"]


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
    Returns:
        {"fisher_ratio", "separation_mean", "separation_min", "closest_pair": [a, b],
         "num_classes_used"} (floats; None where fewer than 2 classes qualify).
    """
    f = torch.as_tensor(f).to(torch.float64)
    y = as_labels(y, len(f))
    f = f.reshape(len(f), -1)
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
    out["fisher_ratio"] = tr_b / tr_w if tr_w > 0 else math.inf
    pairs = _pair_separations(stats, d)
    vals = list(pairs.values())
    out["separation_mean"] = float(np.mean(vals))
    closest = min(pairs, key=pairs.get)
    out["separation_min"] = float(pairs[closest])
    out["closest_pair"] = list(closest)
    return out


def _pair_separations(stats, d):
    cs = sorted(stats)
    out = {}
    for i, a in enumerate(cs):
        for b in cs[i + 1:]:
            na, ma, sa = stats[a]
            nb, mb, sb = stats[b]
            var = (sa + sb) / ((na + nb) * d)
            dist = float(torch.linalg.vector_norm(ma - mb))
            out[(a, b)] = dist / math.sqrt(var) if var > 0 else math.inf
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
    fs, fr = torch.as_tensor(f_syn).to(torch.float64), torch.as_tensor(f_real).to(torch.float64)
    fs, fr = fs.reshape(len(fs), -1), fr.reshape(len(fr), -1)
    if fs.shape[1] != fr.shape[1]:
        raise ValueError(f"feature dims differ: synthetic {fs.shape[1]}, real {fr.shape[1]}")
    ss = {c: s for c, s in _class_stats(fs, as_labels(y_syn, len(fs))).items() if s[0] >= 2}
    sr = {c: s for c, s in _class_stats(fr, as_labels(y_real, len(fr))).items() if s[0] >= 2}
    common = {c for c in ss if c in sr}
    ps = _pair_separations({c: ss[c] for c in common}, fs.shape[1])
    pr = _pair_separations({c: sr[c] for c in common}, fr.shape[1])
    ratios = [ps[p] / pr[p] for p in ps if pr[p] > 0 and math.isfinite(pr[p])]
    if not ratios:
        return {"effective_c": None, "effective_c_min": None, "pairs": 0}
    return {"effective_c": float(np.mean(ratios)), "effective_c_min": float(np.min(ratios)),
            "pairs": len(ratios)}
