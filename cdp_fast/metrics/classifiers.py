"""Metrics of the labels and of classifiers: the label histogram (:func:`class_balance`),
agreement with an independent classifier (:func:`label_agreement`), the stored confidences
(:func:`confidence_summary`) and the linear probe (:func:`fit_logistic_regression`,
:func:`linear_probe`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cdp_fast.metrics.defaults import METRIC_DEFAULTS
from cdp_fast.metrics.inputs import as_labels, as_x01

__all__ = ["class_balance", "predict_labels", "label_agreement", "confidence_summary",
           "fit_logistic_regression", "linear_probe"]


def class_balance(y, num_classes: Optional[int] = None) -> dict:
    """Label histogram of y (N,) over K classes (K = num_classes, else max(y) + 1).

    Returns {"histogram": [n_0 .. n_{K-1}], "entropy_nats": H = −Σ p_c log p_c (0 log 0 = 0),
    "entropy_normalised": H / log K (1 = perfectly balanced; None for K = 1), "max_count",
    "min_count" (over all K classes, so an empty class gives 0), "num_classes": K}."""
    y = as_labels(y, len(y) if hasattr(y, "__len__") else 0)
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    k = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    if len(y) and int(y.max()) >= k:
        raise ValueError(f"labels go up to {int(y.max())} but num_classes = {k}")
    hist = torch.bincount(y, minlength=k).to(torch.float64)
    p = hist / max(1.0, float(hist.sum()))
    nz = p[p > 0]
    h = float(-(nz * nz.log()).sum())
    return {"histogram": [int(v) for v in hist.tolist()], "entropy_nats": h,
            "entropy_normalised": h / math.log(k) if k > 1 else None,
            "max_count": int(hist.max()) if k else 0, "min_count": int(hist.min()) if k else 0,
            "num_classes": k}


def predict_labels(classifier, x, batch_size=1024, device=None):
    """The classifier's argmax on x (N, C, H, W) in [0, 1], in batches, under no_grad and eval
    mode (modes restored): int64 (N,) CPU tensor."""
    from cdp_fast.utils.runtime import eval_mode, model_device

    dev = model_device(classifier, device)
    ctx = eval_mode(classifier)
    preds = []
    with torch.no_grad(), ctx:
        for s in range(0, len(x), batch_size):
            preds.append(torch.as_tensor(classifier(x[s:s + batch_size].to(dev))).argmax(1).cpu())
    return torch.cat(preds)


def label_agreement(classifier: Callable, x, y, *, batch_size: int = 1024, device=None) -> dict:
    """Agreement of the labels y (N,) with an *independent* classifier's argmax on x.

    Args:
        classifier: (B, C, H, W) in [0, 1] -> logits or scores (B, K); it should not be the
            network that produced the labels or the guidance features.
        x: images in [0, 1]; y: int labels.
    Returns: {"agreement": mean 1[argmax = y], "per_class": {c: agreement among y = c}}.
    Random labels agree with any classifier at ≈ the chance rate Σ_c p(y=c) p(ŷ=c) (1/K balanced).
    """
    x = as_x01(x)
    y = as_labels(y, len(x))
    pred = predict_labels(classifier, x, batch_size, device)
    ok = (pred == y).double()
    per = {int(c): float(ok[y == c].mean()) for c in torch.unique(y).tolist()}
    return {"agreement": float(ok.mean()), "per_class": per}


def confidence_summary(conf) -> dict:
    """Summary of stored pseudo-label confidences (max softmax), (N,):
    {"mean", "q05", "q25", "q50", "q75", "q95", "fraction_above_0.8"}. ValueError if ``conf`` is
    empty or holds NaN / inf."""
    c = torch.as_tensor(np.asarray(conf, dtype=np.float64)).reshape(-1)
    if len(c) == 0:
        raise ValueError("confidence is empty: no confidences to summarise")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("confidence holds NaN or inf values")
    out = {"mean": float(c.mean())}
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        out[f"q{int(round(q * 100)):02d}"] = float(torch.quantile(c, q))
    out["fraction_above_0.8"] = float((c > 0.8).double().mean())
    return out


# ----------------------------------------------------------------------------- linear probe
class _Linear(torch.nn.Module):
    """Multinomial logistic regression on flattened [0, 1] pixels: (B, C, H, W) -> logits (B, K)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(x.reshape(len(x), -1))


def fit_logistic_regression(x, y, num_classes: Optional[int] = None, *, steps: int = 100,
                            l2: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """Multinomial logistic regression on flattened images, fitted full batch.

    Minimises mean CE + (l2/2)‖W‖² (bias not penalised) with ``steps`` iterations of
    ``torch.optim.LBFGS`` (strong-Wolfe line search, one ``.step``), from weights drawn with
    ``seed`` (N(0, 0.01²)). Deterministic for a given input and thread count.

    Args:
        x: (N, C, H, W) images in [0, 1]; y: (N,) int labels.
        num_classes: K (default max(y) + 1).
    Returns:
        an eval-mode nn.Module: (B, C, H, W) in [0, 1] -> logits (B, K), float32, CPU.
    """
    x = as_x01(x).reshape(len(x), -1).float()
    y = as_labels(y, len(x))
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    model = _Linear(x.shape[1], k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(model.linear.weight.shape, generator=g) * 0.01)
        model.linear.bias.zero_()
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=int(steps), history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model.linear(x), y) + 0.5 * l2 * (model.linear.weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.description = f"pixel logistic regression ({len(x)} images, {k} classes, LBFGS {steps} steps, l2 {l2:g})"
    return model


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def linear_probe(x_train, y_train, x_test, y_test, *, num_classes: Optional[int] = None,
                 eps: float = METRIC_DEFAULTS["probe_eps"], pgd_steps: int = METRIC_DEFAULTS["probe_pgd_steps"],
                 steps: int = METRIC_DEFAULTS["probe_steps"], l2: float = METRIC_DEFAULTS["probe_l2"],
                 seed: int = 0) -> dict:
    """A linear probe [A16]: logistic regression trained on (x_train, y_train) — the synthetic
    set alone — and tested on real test data.

    Clean accuracy, and robust accuracy under L∞ PGD [M18] on the probe itself
    (:func:`cdp_fast.robust.attacks.pgd_attack`: CE, ``pgd_steps`` steps of 2.5·eps/pgd_steps, uniform
    random start drawn from ``seed``), inputs in [0, 1]. A cheap proxy for "does a classifier
    trained on these data transfer to real data, and how robustly"; not a substitute for
    TRADES training.

    Args:
        x_train, x_test: (N, C, H, W) images in [0, 1]; y_train, y_test: (N,) int labels.
        num_classes: K (default: max label + 1 over both sets).
        eps: L∞ radius on [0, 1] pixels (0: robust = clean is not computed, None returned).
    Returns: {"clean_accuracy", "robust_accuracy", "train_accuracy", "eps", "pgd_steps"}.
    """
    from cdp_fast.robust.attacks import pgd_attack

    xtr, xte = as_x01(x_train, "x_train"), as_x01(x_test, "x_test")
    ytr, yte = as_labels(y_train, len(xtr)), as_labels(y_test, len(xte))
    k = int(num_classes) if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    model = fit_logistic_regression(xtr, ytr, k, steps=steps, l2=l2, seed=seed)
    clean = _accuracy(model, xte, yte)
    robust = None
    if eps and pgd_steps:
        g = torch.Generator().manual_seed(seed)
        xadv = pgd_attack(model, xte, yte, eps=float(eps), step_size=2.5 * float(eps) / pgd_steps,
                          steps=int(pgd_steps), random_start=True, generator=g)
        robust = _accuracy(model, xadv, yte)
    return {"clean_accuracy": clean, "robust_accuracy": robust, "train_accuracy": _accuracy(model, xtr, ytr),
            "eps": float(eps), "pgd_steps": int(pgd_steps)}
