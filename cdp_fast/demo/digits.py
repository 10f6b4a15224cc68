"""The digits pieces of `cdp-fast demo` (:mod:`cdp_fast.demo`): the k real images, the networks
(each trained on those k images only, and never one network in two roles), the synthetic sets
of the arms, the λ rule and the per-set measurements.

Roles, each its own object:

- **labeler** (pseudo-labels, and the classes of class-conditional guidance): the bundled
  digits classifier's architecture (:func:`cdp_fast.models.digits.build_classifier`) trained
  from scratch with plain cross-entropy on the k real images (Adam, small random crops), wrapped
  as :class:`cdp_fast.models.digits.DigitsLabeler` for the sampler's [-1, 1];
- **guidance features** (the paper's are an adversarially trained WRN's): a
  :func:`cdp_fast.models.small_cnn` TRADES-trained on the k real images
  (:func:`cdp_fast.train_trades`, the library's recipe), wrapped with
  :func:`cdp_fast.models.as_feature_extractor`;
- **measuring instruments** (:mod:`cdp_fast.metrics`): the PCA of the k real images (features
  neither network made) and a pixel logistic regression (:func:`cdp_fast.metrics.
  fit_logistic_regression`) as the judge of label agreement; the arms' classifiers are fresh
  small CNNs trained per arm and seed, evaluated on the test split.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["choose_real", "train_labeler", "train_guidance_net", "generate_set", "fit_independent_classifier",
           "Instruments", "quick_metrics", "select_lambda", "set_report", "SET_KINDS"]

SET_KINDS = ("ddim", "cdp", "cdp-class")


def choose_real(k_per_class: int, seed: int = 0):
    """k images of each class from the digits training split, chosen by a permutation per class
    from ``torch.Generator().manual_seed(seed)``; the rest of the split is left unused.

    Returns (x (10k, 1, 8, 8) float [0, 1], y (10k,) int64, idx (10k,) positions in the split),
    ordered by class."""
    from cdp_fast.models import digits

    x, y = digits.load_digits_data("train")
    smallest = int(torch.bincount(y, minlength=digits.NUM_CLASSES).min())
    if isinstance(k_per_class, bool) or not isinstance(k_per_class, int) or not 1 <= k_per_class <= smallest:
        raise ValueError(f"k_per_class must be an int in [1, {smallest}], got {k_per_class!r}")
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(digits.NUM_CLASSES):
        members = (y == c).nonzero().flatten()
        idx.append(members[torch.randperm(members.numel(), generator=g)[:k_per_class]])
    idx = torch.cat(idx)
    return x[idx].contiguous(), y[idx].contiguous(), idx


def _frozen(module):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def train_labeler(x, y, *, steps: int = 300, lr: float = 1e-3, seed: int = 0, pad: int = 1):
    """The pseudo-labeller's network: :class:`cdp_fast.models.digits.DigitsClassifier` from a
    seeded initialisation, ``steps`` full-batch Adam steps of cross-entropy on (x, y), each on a
    fresh random crop (zero padding ``pad``) of every image. Returns it frozen, in eval mode."""
    import torch.nn.functional as F

    from cdp_fast.robust.batches import augment_batch
    from cdp_fast.models import digits

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = digits.build_classifier()
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    clf.train()
    with torch.enable_grad():
        for _ in range(steps):
            xb = augment_batch(x, pad=pad, flip=False, generator=g)
            loss = F.cross_entropy(clf(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return _frozen(clf)


def train_guidance_net(x, y, *, updates: int = 150, eps: float = 0.1, pgd_steps: int = 5, lr: float = 0.05,
                       seed: int = 0, device=None):
    """The guidance network: :func:`cdp_fast.models.small_cnn` TRADES-trained on (x, y) only
    (recipe "gowal", crops fitted to 8×8, batch = all images up to 128, ``updates`` updates in
    epochs of 10 with one epoch of warm-up). Returns it frozen, in eval mode."""
    import cdp_fast
    from cdp_fast.models import small_cnn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = small_cnn(num_classes=10)
    epochs = max(2, math.ceil(updates / 10))
    net = cdp_fast.train_trades(net, (x, y), epochs=epochs, steps_per_epoch=max(1, updates // epochs), eps=eps,
                                step_size=2.5 * eps / pgd_steps, steps=pgd_steps, batch_size=min(128, len(x)),
                                lr=lr, warmup_epochs=1, seed=seed, device=device, progress=False)
    return _frozen(net)


def generate_set(kind: str, n: int, *, seed: int, eps_model, labeler, features=None, lam=None, tau: float = 10.0,
                 steps: int = 50, batch_size: int = 128, device=None, progress: bool = False):
    """One synthetic set: ``kind`` "ddim" (λ = 0), "cdp" (unconditional HNM on ``features``,
    otherwise the library's defaults = the authors': their loss form, window t >= 0.4·T, the
    online head) or "cdp-class" (the same with negatives="class", classes = the labeler's argmax
    on x̂₀). ``features`` (x in [-1, 1], (B, 1, 8, 8) -> (B, d); or "pixels" with ``lam``) is
    required for "cdp" / "cdp-class": ValueError without it (the sampler has no default feature
    space, issue 23 F7). Same ``seed`` ⇒ same x_T for sample i in every kind. Pseudo-labelled
    by ``labeler``."""
    import cdp_fast
    from cdp_fast.models import digits

    if kind not in SET_KINDS:
        raise ValueError(f"kind must be one of {SET_KINDS}, got {kind!r}")
    kw = dict(loss=None)
    if kind != "ddim" and features is None:
        raise ValueError(f"features: generate_set kind {kind!r} guides and needs features= (e.g. as_feature_extractor("
                         "train_guidance_net(...)), or 'pixels' with lam=)")
    if kind != "ddim":
        kw = dict(loss="hnm", lam=lam, tau=tau, features=features)
        if kind == "cdp-class":
            kw["negatives"] = "class"
    return cdp_fast.sample(eps_model, n, labeler=labeler, image_shape=digits.IMAGE_SHAPE, seed=seed, steps=steps,
                           skip="uniform", eta=0.0, batch_size=min(batch_size, n), device=device, compile=False,
                           progress=progress, **kw)


def fit_independent_classifier(real_train):
    """The judge of label agreement: a multinomial logistic regression on the pixels fitted on
    ``real_train`` = (x, y) (:func:`cdp_fast.metrics.fit_logistic_regression`), independent of
    the guidance's classifier and features; also what `cdp-fast inspect --classifier auto` fits.
    Returns (classifier, description)."""
    from cdp_fast import metrics

    x, y = real_train
    return (metrics.fit_logistic_regression(x, y),
            "independent: pixel logistic regression fitted on the real training split")


class Instruments:
    """The independent measurements: PCA (``components``) of the k real images and their
    features; ``judge`` (optional) labels images for the agreement metric."""

    def __init__(self, x_real, y_real, *, components: int = 20, judge=None):
        from cdp_fast import metrics

        self.x_real, self.y_real = x_real, y_real
        self.pca = metrics.fit_pca(x_real, components)
        self.f_real = metrics.extract_features(self.pca, x_real)
        self.judge = judge


def quick_metrics(samples, inst: Instruments, *, against=None, k: int = 5) -> dict:
    """What the λ rule reads, in the instruments' PCA space with the stored pseudo-labels:
    Fisher ratio, separation mean, effective c (against the k real images), precision / recall
    / density / coverage against the k real images, mean confidence, and with ``against`` the
    label-flip rate."""
    from cdp_fast import metrics

    x = samples.to_tensor()
    y = torch.as_tensor(np.asarray(samples.labels), dtype=torch.int64)
    f = metrics.extract_features(inst.pca, x)
    sep = metrics.class_separation(f, y)
    c = metrics.effective_c(f, y, inst.f_real, inst.y_real)
    out = {"fisher_ratio": sep["fisher_ratio"], "separation_mean": sep["separation_mean"],
           "effective_c": c["effective_c"], "mean_confidence": float(np.mean(np.asarray(samples.confidence)))}
    if len(x) > k and len(inst.f_real) > k:
        out.update({key: v for key, v in metrics.prdc(inst.f_real, f, k=k).items() if key != "k"})
    if against is not None:
        out["label_flip_rate"] = metrics.paired(samples, against)["label_flip_rate"]
    return out


def select_lambda(rows, ddim_row, *, tol: float = 0.05, key: str = "fisher_ratio") -> dict:
    """The λ rule, fixed before any training: among ``rows`` (dicts with "lam", ``key`` and
    "precision") those whose precision is at least DDIM's − ``tol``; of these the largest
    ``key`` (ties: the smaller λ). None qualifying: the smallest λ, said so in "reason".

    Returns {"lam", "key", "tol", "ddim_precision", "qualifying": [λ...], "reason"}."""
    if not rows:
        raise ValueError("select_lambda needs at least one row")
    floor = ddim_row["precision"] - tol
    ok = [r for r in rows if r.get("precision") is not None and r["precision"] >= floor]
    base = {"key": key, "tol": tol, "ddim_precision": ddim_row["precision"], "qualifying": [r["lam"] for r in ok]}
    if not ok:
        lam = min(r["lam"] for r in rows)
        return dict(base, lam=lam, reason=f"no lambda kept precision >= {floor:.3f}; the smallest lambda")
    score = lambda r: -math.inf if r.get(key) is None else r[key]  # noqa: E731
    best = max(ok, key=lambda r: (score(r), -r["lam"]))
    return dict(base, lam=best["lam"], reason=f"largest {key} among the lambdas with precision >= {floor:.3f}")


def set_report(samples, inst: Instruments, *, test, eps: float, against=None) -> dict:
    """:func:`cdp_fast.metrics.report` of one synthetic set against the k real images and the
    test split (the judge = ``inst.judge``; the linear probe attacked at L∞ ``eps``), plus :func:`cdp_fast.metrics.paired` against the
    DDIM set of the same seed (``against``) as ``rep["samples"]["paired"]``."""
    from cdp_fast import metrics

    rep = metrics.report(samples, real=(inst.x_real, inst.y_real), test=test, classifier=inst.judge,
                         num_classes=10, probe_eps=eps)
    if against is not None:
        rep["samples"]["paired"] = metrics.paired(samples, against)
    return rep
