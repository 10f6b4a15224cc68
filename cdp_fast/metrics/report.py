"""All the metrics together: the paired comparison of two sets from the same x_T
(:func:`paired`), every metric that applies as one JSON-serialisable dict (:func:`report`),
and its rows for the `cdp-fast inspect` table (:func:`table_rows`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from cdp_fast.metrics.classifiers import (class_balance, confidence_summary, label_agreement, linear_probe,
                                          predict_labels)
from cdp_fast.metrics.defaults import METRIC_DEFAULTS
from cdp_fast.metrics.features import PCAFeatures, extract_features, fit_pca
from cdp_fast.metrics.inputs import ImageSet, as_image_set, check_positive_int
from cdp_fast.metrics.neighbours import memorisation, prdc
from cdp_fast.metrics.separation import class_separation, effective_c

__all__ = ["paired", "report", "table_rows"]


def paired(a, b) -> dict:
    """Two sets generated from the same x_T (sample i of both from the same seed and index,
    e.g. ``loss=None`` vs ``loss="hnm"``): what the guidance changed.

    Args:
        a, b: :class:`ImageSet`-convertible sets, paired by position (the sample index of an
            out folder); the first min(len) pairs are compared.
    Returns:
        {"n_pairs", "label_flip_rate": mean 1[y_a ≠ y_b] (None without labels on both),
         "dx_l2_mean", "dx_l2_median": per-sample ‖x_a − x_b‖₂ over all pixels in [0, 1],
         "dx_linf_mean", "same_seed": whether both manifests name the same seed (None if unknown)}.
    """
    a, b = as_image_set(a, "a"), as_image_set(b, "b")
    if a.x.shape[1:] != b.x.shape[1:]:
        raise ValueError(f"paired sets have different image shapes {tuple(a.x.shape[1:])} and "
                         f"{tuple(b.x.shape[1:])}")
    n = min(len(a), len(b))
    diff = (a.x[:n] - b.x[:n]).reshape(n, -1).to(torch.float64)
    l2 = torch.linalg.vector_norm(diff, dim=1)
    flip = None
    if a.y is not None and b.y is not None:
        flip = float((a.y[:n] != b.y[:n]).double().mean())
    sa, sb = _manifest_seed(a.meta), _manifest_seed(b.meta)
    return {"n_pairs": n, "label_flip_rate": flip, "dx_l2_mean": float(l2.mean()),
            "dx_l2_median": float(l2.median()), "dx_linf_mean": float(diff.abs().max(1).values.mean()),
            "same_seed": None if sa is None or sb is None else sa == sb}


def _manifest_seed(meta):
    for key in ("seed",):
        if key in meta:
            return meta[key]
        args = meta.get("args") or meta.get("arguments") or {}
        if isinstance(args, dict) and key in args:
            return args[key]
    return None


# ----------------------------------------------------------------------------- report
def _describe(obj):
    """A one-line name: the object's ``description`` attribute, else its type (a PCA's repr)."""
    if isinstance(obj, PCAFeatures):
        return repr(obj)
    return getattr(obj, "description", None) or getattr(obj, "__qualname__", None) or type(obj).__name__


def report(samples, *, real, test=None, against=None, features=None, classifier=None,
           num_classes: Optional[int] = None, k: int = METRIC_DEFAULTS["k"],
           pca_components: int = METRIC_DEFAULTS["pca_components"], probe_eps: float = METRIC_DEFAULTS["probe_eps"],
           max_samples: Optional[int] = None, seed: int = METRIC_DEFAULTS["seed"],
           chunk: int = METRIC_DEFAULTS["chunk"]) -> dict:
    """Every metric of this module that applies, in one JSON-serialisable dict.

    Args:
        samples: the generated set (Samples, npz path / out folder, or (x, y)).
        real: the real *training* set (x, y): the PCA basis, the precision/recall reference,
            the memorisation yardstick and the real reference values.
        test: real test set (x, y) for the linear probe (None: no probe).
        against: a second generated set (same x_T, e.g. unguided DDIM) → its own metrics and
            the paired comparison.
        features: callable (B, C, H, W) in [0, 1] -> (B, d), independent of the guidance; None
            = PCA of the real images (``pca_components``). Give it a ``description`` attribute
            to name it in the output.
        classifier: callable (B, C, H, W) in [0, 1] -> logits, independent of the labeller and
            the guidance; None = no agreement metric (and unlabelled samples stay unlabelled).
            Unlabelled samples are labelled by it (``labels_from = "classifier"``).
        num_classes: K (default: max label + 1 over the labelled sets; one UserWarning when a
            generated set holds classes the real set lacks, e.g. labels 10..19 against 0..9).
        k, probe_eps, seed, chunk: see :data:`METRIC_DEFAULTS`.
        max_samples: first N >= 1 of each generated set only.
    Raises ValueError, before any work, naming k, pca_components or max_samples unless each
    is an int >= 1, and naming any input the image adapter refuses (NaN / inf images, values
    out of range) or features that come out NaN / inf.
    Returns:
        {"setup": {...}, "real": reference values on the real set, "samples": per-set metrics,
         "against": per-set metrics (with ``against``), "paired": :func:`paired` (with
         ``against``)}. Per-set keys: n, labels_from, class_balance, separation (Fisher ratio,
         separation mean/min, effective_c), fidelity (precision, recall, density, coverage),
         agreement, confidence, probe, memorisation, guidance_strength (the manifest's, if any).
    """
    check_positive_int(k, "k")
    check_positive_int(pca_components, "pca_components")
    if max_samples is not None:
        check_positive_int(max_samples, "max_samples")
    r = as_image_set(real, "real")
    if r.y is None:
        raise ValueError("real: labels are required")
    t = as_image_set(test, "test") if test is not None else None
    sets = {"samples": as_image_set(samples, "samples", max_samples=max_samples)}
    if against is not None:
        sets["against"] = as_image_set(against, "against", max_samples=max_samples)
    for s in sets.values():
        if s.x.shape[1:] != r.x.shape[1:]:
            raise ValueError(f"{s.name}: image shape {tuple(s.x.shape[1:])} differs from the real "
                             f"data's {tuple(r.x.shape[1:])}")

    if features is None:
        features = fit_pca(r.x, pca_components)
        feat_desc = f"PCA of the real training images ({features.dim} components, unwhitened)"
    else:
        feat_desc = _describe(features)
    f_real = extract_features(features, r.x)

    labels_from = {}
    for key, s in sets.items():
        if s.y is not None:
            labels_from[key] = "stored"
        elif classifier is not None:
            sets[key] = ImageSet(s.x, predict_labels(classifier, s.x), s.confidence, s.meta, s.name)
            labels_from[key] = "classifier"
        else:
            labels_from[key] = None
    ys = [r.y] + [s.y for s in sets.values() if s.y is not None] + ([t.y] if t is not None and t.y is not None
                                                                     else [])
    K = int(num_classes) if num_classes is not None else max(int(y.max()) for y in ys) + 1
    if num_classes is None:
        _warn_unknown_classes(r.y, {key: s.y for key, s in sets.items() if s.y is not None}, K)

    setup = {"features": feat_desc, "feature_dim": int(f_real.shape[1]), "k": int(k), "num_classes": K,
             "real_train_n": len(r), "real_test_n": None if t is None else len(t),
             "classifier": None if classifier is None else _describe(classifier), "seed": seed,
             "probe": {"model": "multinomial logistic regression on pixels, full-batch LBFGS",
                       "steps": METRIC_DEFAULTS["probe_steps"], "l2": METRIC_DEFAULTS["probe_l2"], "eps": probe_eps,
                       "pgd_steps": METRIC_DEFAULTS["probe_pgd_steps"]} if t is not None else None}

    ref = {"n": len(r), "class_balance": class_balance(r.y, K), "separation": class_separation(f_real, r.y)}
    if t is not None and t.y is not None:
        ref["probe"] = linear_probe(r.x, r.y, t.x, t.y, num_classes=K, eps=probe_eps, seed=seed)
        if classifier is not None:
            ref["classifier_test_accuracy"] = label_agreement(classifier, t.x, t.y)["agreement"]
    out = {"setup": setup, "real": ref}

    for key, s in sets.items():
        m = {"n": len(s), "labels_from": labels_from[key]}
        f_s = extract_features(features, s.x)
        if s.y is not None:
            m["class_balance"] = class_balance(s.y, K)
            sep = class_separation(f_s, s.y)
            sep.update(effective_c(f_s, s.y, f_real, r.y))
            m["separation"] = sep
        if len(s) > k and len(r) > k:
            m["fidelity"] = prdc(f_real, f_s, k=k, chunk=chunk)
        if classifier is not None and labels_from[key] == "stored":
            m["agreement"] = label_agreement(classifier, s.x, s.y)
        if s.confidence is not None:
            m["confidence"] = confidence_summary(s.confidence)
        if t is not None and t.y is not None and s.y is not None:
            m["probe"] = linear_probe(s.x, s.y, t.x, t.y, num_classes=K, eps=probe_eps, seed=seed)
        m["memorisation"] = memorisation(s.x, r.x, f_syn=f_s, f_train=f_real, chunk=chunk)
        if s.meta.get("guidance_strength"):
            m["guidance_strength"] = [dict(v) for v in s.meta["guidance_strength"]]
        out[key] = m
    if against is not None:
        out["paired"] = paired(sets["samples"], sets["against"])
    return _jsonable(out)


def _warn_unknown_classes(y_real, labelled: dict, k: int) -> None:
    """One UserWarning when a generated set's labels hold classes the real set lacks (K is then
    set by the generated labels alone; pass num_classes= to say which K is meant)."""
    real = set(torch.unique(y_real).tolist())
    extra = {key: sorted(set(torch.unique(y).tolist()) - real) for key, y in labelled.items()}
    extra = {key: v for key, v in extra.items() if v}
    if extra:
        import warnings

        what = "; ".join(f"{key}: {v[:8]}{' ...' if len(v) > 8 else ''}" for key, v in extra.items())
        warnings.warn(f"labels of classes the real set lacks ({what}); K = {k} from the labels, "
                      "pass num_classes= if that is not meant", UserWarning, stacklevel=3)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return obj


#: (label, path into a per-set dict, path into the real reference or None)
_ROWS = [
    ("n", ("n",), ("n",)),
    ("classes: entropy / log K", ("class_balance", "entropy_normalised"), ("class_balance", "entropy_normalised")),
    ("classes: entropy (nats)", ("class_balance", "entropy_nats"), ("class_balance", "entropy_nats")),
    ("classes: largest count", ("class_balance", "max_count"), ("class_balance", "max_count")),
    ("classes: smallest count", ("class_balance", "min_count"), ("class_balance", "min_count")),
    ("Fisher ratio tr S_B / tr S_W", ("separation", "fisher_ratio"), ("separation", "fisher_ratio")),
    ("separation |m_a-m_b|/sigma, mean", ("separation", "separation_mean"), ("separation", "separation_mean")),
    ("separation, closest pair", ("separation", "separation_min"), ("separation", "separation_min")),
    ("effective c (mean over pairs)", ("separation", "effective_c"), None),
    ("effective c (min over pairs)", ("separation", "effective_c_min"), None),
    ("precision", ("fidelity", "precision"), None),
    ("recall", ("fidelity", "recall"), None),
    ("density", ("fidelity", "density"), None),
    ("coverage", ("fidelity", "coverage"), None),
    ("label agreement with the classifier", ("agreement", "agreement"), ("classifier_test_accuracy",)),
    ("confidence: mean", ("confidence", "mean"), None),
    ("confidence: median", ("confidence", "q50"), None),
    ("confidence: 5% quantile", ("confidence", "q05"), None),
    ("probe: clean acc. (real test)", ("probe", "clean_accuracy"), ("probe", "clean_accuracy")),
    ("probe: PGD acc. (real test)", ("probe", "robust_accuracy"), ("probe", "robust_accuracy")),
    ("NN dist. to train, pixels, median", ("memorisation", "pixel", "q50"), None),
    ("NN dist. to train, pixels, min", ("memorisation", "pixel", "min"), None),
    ("frac. closer than real 5% NN, pixels", ("memorisation", "pixel", "fraction_below"), None),
    ("NN dist. to train, features, median", ("memorisation", "features", "q50"), None),
    ("frac. closer than real 5% NN, feats", ("memorisation", "features", "fraction_below"), None),
]


def _get(d, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def table_rows(rep: dict) -> list:
    """The rows of the `cdp-fast inspect` table: [(label, [value per set: samples(, against)],
    real reference value or None)], values as in ``rep`` (None where a metric does not apply),
    followed by the paired rows (one value each) when ``rep`` has them."""
    keys = [k for k in ("samples", "against") if k in rep]
    rows = []
    for label, path, rpath in _ROWS:
        vals = [_get(rep[k], path) for k in keys]
        refv = _get(rep.get("real", {}), rpath) if rpath else None
        if all(v is None for v in vals) and refv is None:
            continue
        rows.append((label, vals, refv))
    if "paired" in rep:
        p = rep["paired"]
        for label, key in (("paired: label-flip rate", "label_flip_rate"), ("paired: mean |dx|_2", "dx_l2_mean"),
                           ("paired: median |dx|_2", "dx_l2_median"), ("paired: pairs", "n_pairs")):
            rows.append((label, [p.get(key)], None))
    return rows
