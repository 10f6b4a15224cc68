"""Summaries and paired confidence intervals for `cdp-fast demo` (:mod:`cdp_fast.demo`).

Every arm is trained once per seed s and compared with ``real+ddim`` trained with the same seed
s (the synthetic sets of seed s share their x_T), so the comparison is paired: for an arm A
the per-seed differences d_s = A_s − DDIM_s have mean d̄ and sample std s_d (ddof = 1), and the
95% confidence interval of the mean difference is d̄ ± t_{0.975, n−1} · s_d / √n (Student t,
n seeds). The t quantile comes from ``scipy.stats.t`` when SciPy is importable (scikit-learn,
which the demo needs, brings it), else from :data:`T975` (df 1–30, six decimals, computed with
SciPy 1.17) and the Cornish–Fisher expansion beyond (Abramowitz & Stegun 26.7.5; error < 1e-6
for df > 30).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["T975", "t975", "summarise", "paired_ci"]

#: t_{0.975, df} for df = 1..30 (two-sided 95%), six decimals.
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
        2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
        2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
        2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054


def _t975_table(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z, v = _Z975, float(df)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / v + g2 / v ** 2 + g3 / v ** 3 + g4 / v ** 4


def t975(df: int, *, use_scipy: bool = True) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom (SciPy if importable
    and ``use_scipy``, else the table / expansion)."""
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if use_scipy:
        try:
            from scipy.stats import t
        except ImportError:
            pass
        else:
            return float(t.ppf(0.975, int(df)))
    return _t975_table(int(df))


def summarise(values) -> dict:
    """{"mean", "std" (ddof = 1; None for one value), "values"} of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values to summarise")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "values": [float(a) for a in v]}


def paired_ci(a, b, *, use_scipy: bool = True) -> dict:
    """Paired difference a − b over seeds with its 95% Student-t confidence interval.

    a, b: equal-length sequences (value of each seed). Returns {"mean", "std", "n", "t",
    "half_width", "lo", "hi", "diffs"}; with one seed std / t / the interval are None.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_ci needs two equal-length 1-D sequences, got {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    out = {"mean": float(d.mean()), "std": None, "n": int(n), "t": None, "half_width": None, "lo": None,
           "hi": None, "diffs": [float(v) for v in d]}
    if n > 1:
        sd = float(d.std(ddof=1))
        t = t975(n - 1, use_scipy=use_scipy)
        hw = t * sd / math.sqrt(n)
        out.update(std=sd, t=t, half_width=hw, lo=out["mean"] - hw, hi=out["mean"] + hw)
    return out
