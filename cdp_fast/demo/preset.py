"""The preset sweep of the previous `cdp-fast demo` (all 1347 real digits, the bundled classifier
as features and labeller), kept because :data:`cdp_fast.models.digits.DIGITS_GUIDANCE` records
that it was chosen with :func:`guidance_sweep`: :func:`generate` (a DDIM or HNM set from the
bundled models with the digits preset), :func:`synthetic_stats` and :func:`guidance_sweep`.
Re-exported by :mod:`cdp_fast.demo`. The current demo (scarce real data) does not use them.
"""
from __future__ import annotations

import numpy as np
import torch

from cdp_fast.models.digits import DIGITS_GUIDANCE, DIGITS_SAMPLING

__all__ = ["generate", "synthetic_stats", "guidance_sweep"]


def generate(method: str, n: int, *, seed: int = 0, progress: bool = False, device=None,
             compile=False, guidance=None, steps: int | None = None):
    """Synthetic digits from the bundled ε-model: ``method`` "ddim" (λ = 0) or "cdp" (HNM
    guidance on the bundled features), pseudo-labelled by the bundled classifier. Returns a
    :class:`cdp_fast.Samples` (uint8 NHWC (n, 8, 8, 1), labels, confidence)."""
    import cdp_fast
    from cdp_fast.models import digits

    if method not in ("ddim", "cdp"):
        raise ValueError(f"method must be 'ddim' or 'cdp', got {method!r}")
    model = digits.load_digits_eps_model(device)
    labeler = digits.digits_labeler(device)
    kw = {}
    if method == "cdp":
        g = dict(DIGITS_GUIDANCE["hnm"], **(guidance or {}))
        kw = dict(loss="hnm", features=digits.digits_features(device), **g)
    else:
        kw = dict(loss=None)
    samp = dict(DIGITS_SAMPLING)
    # the contrastive batch m is min(128, n): guided batches are always computed full
    samp["batch_size"] = min(samp["batch_size"], n)
    if steps is not None:
        samp["steps"] = steps
    return cdp_fast.sample(model, n, labeler=labeler, image_shape=digits.IMAGE_SHAPE, seed=seed,
                           device=device, compile=compile, progress=progress, **samp, **kw)


def synthetic_stats(samples, features=None) -> dict:
    """Class histogram, mean pseudo-label confidence and feature spread of a sample set."""
    labels = np.asarray(samples.labels)
    conf = np.asarray(samples.confidence, dtype=np.float64)
    hist = np.bincount(labels, minlength=10)
    p = hist / max(1, hist.sum())
    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    out = {"n": int(len(labels)), "class_histogram": hist.tolist(), "label_entropy_nats": ent,
           "mean_confidence": float(conf.mean()), "frac_confidence_gt_0.8": float((conf > 0.8).mean())}
    if features is not None:
        x = samples.to_tensor() * 2 - 1
        with torch.no_grad():
            z = torch.nn.functional.normalize(features(x).float(), dim=1)
        sim = z @ z.T
        n = sim.shape[0]
        same = torch.as_tensor(labels)[:, None] == torch.as_tensor(labels)[None, :]
        off = ~torch.eye(n, dtype=torch.bool)
        out["mean_cosine_same_class"] = float(sim[same & off].mean())
        out["mean_cosine_other_class"] = float(sim[~same].mean())
    return out


def guidance_sweep(taus=(0.1, 1.0, 10.0), lams=(10.0, 100.0, 1000.0, 10000.0), *, loss="hnm", n=256,
                   seed=1000, steps=None, progress=False) -> list:
    """Sample statistics of guided digits for a grid of (τ, λ), plus the unguided baseline
    (λ = 0), each on ``n`` samples from the same starting noise (seed ``seed``, disjoint from
    the demo's seeds). Used once to choose :data:`cdp_fast.models.digits.DIGITS_GUIDANCE`; the
    criterion is in its comment. Returns a list of dicts (tau, lam, and :func:`synthetic_stats`)."""
    from cdp_fast.models import digits

    feats = digits.digits_features()
    rows = [dict(tau=None, lam=0.0, **synthetic_stats(generate("ddim", n, seed=seed, steps=steps), feats))]
    for tau in taus:
        for lam in lams:
            g = {"tau": tau, "lam": lam}
            if loss != "hnm":
                raise ValueError("guidance_sweep: only loss='hnm' is swept")
            s = generate("cdp", n, seed=seed, steps=steps, guidance=g, progress=progress)
            rows.append(dict(tau=tau, lam=lam, **synthetic_stats(s, feats)))
    return rows
