"""The paper's data-selection criteria and DM-Improves-AT's, scored batch by batch by a
classifier on float NCHW images in [0, 1] (inputs checked by :func:`cdp_fast.data.open_images`).

Selection (paper App. D.3, Table 6), per class, classes given by the (pseudo-)labels: the
top K (``k_per_class``) or the top fraction f (``top_fraction``: ⌊f·n_c⌋ of a class of n_c,
DM-Improves-AT's ``select_1M.py --top_scale``; f·n_c within 1e-6 of a whole number counts as
that number, so 0.29 of 100 keeps 29 where ``int(0.29 * 100)`` is 28; a class may keep 0):

==================== ======================================================= =========
criterion            score                                                   keep
==================== ======================================================= =========
"entropy"            H(p(x)) of the classifier (the paper: "LaNet")           smallest
"confidence"         p_ỹ(x), the probability of the sample's label ỹ: the     largest
                     stored / given label, else the pseudo-label (max_k p_k)
"label_probability"  p_y(x) for the stored / given label y only (refused      largest
                     without labels): DM-Improves-AT's ``select_1M.py`` rule
                     for class-conditional samples, ``softmax(f(x))[:, y]``
"grad_norm"          ‖∇_θ CE(f_θ(x), ỹ)‖₂ over all trainable parameters       largest
                     (all parameters of a fully frozen classifier)
"robust_grad_norm"   ‖∇_θ [CE(f_θ(x), ỹ) + β·KL(p_θ(x) ‖ p_θ(x'))]‖₂, x' the   largest
                     TRADES attack point (held fixed), i.e. the per-sample
                     TRADES loss of :mod:`cdp_fast.robust.train`
"separability"       ‖φ(x) − c_ỹ‖₂, φ the penultimate features, c_ỹ the mean  smallest
                     feature of the samples labelled ỹ
==================== ======================================================= =========

Choices where App. D.3 is not explicit (documented here, tested against loop references):

- gradient norms: the classifier in eval mode (BatchNorm with running statistics, so each
  sample's gradient depends on that sample alone), the loss of the single sample (no batch
  averaging), the L2 norm of the concatenation of all trainable parameters' gradients. They
  are computed with ``torch.func``: ``vmap(grad(loss ∘ functional_call))`` over the batch, in
  chunks of ``chunk_size`` samples (a WRN-28-10 gradient is 146 MB per sample);
- "separability": App. D.3 says "compute the L2 distance between each sample and the
  centroid of all classes (... the mean of all samples in this class) and add them together
  ... choose the top K samples that have the smallest distance in each class". We read it as
  the distance of a sample to the centroid of its own (pseudo-)class, centroids over all
  candidate samples of that class; the features are ``classifier.features`` (images in
  [0, 1]) unless ``features=`` is given. Two passes over the images (centroids, then
  distances) keep memory independent of the number of samples;
- stored or given labels (a class-conditional set's labels are its conditioning classes):
  "confidence" is p_ỹ(x), the classifier's probability of the sample's *own* label ỹ (the
  max softmax when ỹ is the classifier's argmax, so pseudo-labelled sets score as before).
  Ranking such a set by the max softmax instead would put first, within a class, the samples
  the classifier most confidently puts in *another* class (issue 23, F2), so "confidence"
  never does that when labels exist. "label_probability" is the same score but refuses
  samples without labels, where "confidence" would fall back to the max softmax: the name to
  use for DM-Improves-AT's rule, which never silently changes meaning. "entropy" is H(p(x))
  for samples whose argmax is ỹ, and H(p(x)) + log K + 1 for samples the classifier puts in
  another class, so those rank after every sample it agrees with (K: the classifier's
  outputs). Without labels "confidence" and "entropy" use the classifier's own argmax;
- ties are broken by the lower index (``select_1M.py``'s ``argsort(p)[::-1]`` takes the higher
  index first among exactly equal scores; otherwise the same samples in the same order); a
  class with fewer than K samples keeps all of them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from cdp_fast.data.sources import open_images
from cdp_fast.label.gradnorm import attack_generator, per_sample_grad_norm
from cdp_fast.label.pseudo import check_batch_size, check_unit_classifier, classify
from cdp_fast.utils.runtime import model_device

__all__ = ["select", "scores", "CRITERIA"]

CRITERIA = ("entropy", "confidence", "label_probability", "grad_norm", "robust_grad_norm",
            "separability")
_KEEP_LARGEST = {"entropy": False, "confidence": True, "label_probability": True, "grad_norm": True,
                 "robust_grad_norm": True, "separability": False}


def scores(samples, criterion: str, *, classifier: Optional[nn.Module] = None,
           labels=None, features: Optional[Callable] = None, batch_size: int = 256,
           device=None, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
           beta: float = 6.0, seed: int = 0, chunk_size: Optional[int] = 16):
    """Per-sample score of ``criterion`` (see the module table) and the labels used.

    ``samples`` and the arguments as in :func:`select` (images in [0, 1], checked).
    Returns (score float64 (N,), labels int64 (N,)): the raw score (entropy, probability,
    gradient norm, distance), not yet oriented; :func:`select` keeps the smallest or largest.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    check_batch_size(batch_size)
    imgs = open_images(samples, "samples")
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    check_unit_classifier(classifier, "select")
    if labels is None and imgs.labels is not None:   # a Samples' labels
        labels = imgs.labels
    needs_clf = criterion != "separability" or features is None or labels is None
    if needs_clf and classifier is None:
        raise ValueError(f"criterion {criterion!r} needs classifier= (a trained classifier)")
    given = labels is not None
    if criterion == "label_probability" and not given:
        raise ValueError("criterion 'label_probability' scores p(y | x) of each sample's stored label y "
                         "(DM-Improves-AT's select_1M.py), but these samples carry no labels: pass "
                         "labels= (the conditioning classes) or use 'confidence' (the max softmax)")
    if given:
        labels = np.asarray(labels)
        if labels.shape != (len(imgs),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer, shape ({len(imgs)},), got {labels.dtype} "
                             f"{labels.shape}")
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if criterion in ("entropy", "confidence", "label_probability") or not given:
        pl = classify(classifier, imgs, batch_size, model_device(classifier, device),
                       labels=labels if given else None)
        if not given:
            labels = pl["label"]
        if criterion in ("confidence", "label_probability"):   # p of the label (max p for pseudo-labels)
            return (pl["p_label"] if given else pl["confidence"]).astype(np.float64), labels
        if criterion == "entropy":      # samples the classifier puts in another class rank last
            h = pl["entropy"].astype(np.float64)
            if given:
                h = h + (pl["label"] != labels) * (np.log(pl["num_classes"]) + 1.0)   # H <= log K
            return h, labels

    from cdp_fast.robust.attacks import trades_attack
    from cdp_fast.utils.runtime import eval_mode

    if criterion in ("grad_norm", "robust_grad_norm"):
        dev = model_device(classifier, device)
        out = []
        with eval_mode(classifier):
            for b, (i, xb) in enumerate(imgs.batches(batch_size)):
                xb = xb.to(dev)
                yb = torch.from_numpy(labels[i:i + len(xb)]).to(dev)
                xa = None
                if criterion == "robust_grad_norm":
                    gen = attack_generator(seed, b, dev)
                    xa = trades_attack(classifier, xb, eps=eps, step_size=step_size,
                                       steps=steps, generator=gen)
                out.append(per_sample_grad_norm(classifier, xb, yb, x_adv=xa, beta=beta,
                                                chunk_size=chunk_size).cpu())
        return torch.cat(out).double().numpy(), labels

    # separability
    if features is None:
        if not callable(getattr(classifier, "features", None)):
            raise ValueError("criterion 'separability' needs features= or a classifier with a "
                             ".features(x) method")
        features = classifier.features
    dev = model_device(classifier, device)   # (CPU or ``device`` without a classifier)
    ctx = eval_mode(classifier) if classifier is not None else contextlib.nullcontext()
    classes, inv = np.unique(labels, return_inverse=True)
    inv = torch.from_numpy(inv.reshape(-1).astype(np.int64))

    def feature_batches():
        for i, xb in imgs.batches(batch_size):
            f = features(xb.to(dev))
            yield i, f.reshape(len(xb), -1).double().cpu()

    # Two passes over the images (features are recomputed rather than kept): memory stays
    # O(classes · d) however many samples there are (1M x 640 doubles would be 5 GB).
    with torch.no_grad(), ctx:
        sums, counts = None, torch.zeros(len(classes), dtype=torch.float64)
        for i, f in feature_batches():
            if sums is None:
                sums = torch.zeros(len(classes), f.shape[1], dtype=torch.float64)
            cls = inv[i:i + len(f)]
            sums.index_add_(0, cls, f)
            counts += torch.bincount(cls, minlength=len(classes)).double()
        centroids = sums / counts[:, None]
        dist = torch.empty(len(imgs), dtype=torch.float64)
        for i, f in feature_batches():
            cls = inv[i:i + len(f)]
            dist[i:i + len(f)] = (f - centroids[cls]).norm(dim=1)
    return dist.numpy(), labels


def _top_per_class(score: np.ndarray, labels: np.ndarray, k, fraction, largest: bool) -> np.ndarray:
    """Indices of the best ``k`` (or ⌊fraction·n_c⌋) samples of every class, by class, best first."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        key = -score[idx] if largest else score[idx]
        order = np.lexsort((idx, key))  # primary: score, ties: lower index first
        keep = k if fraction is None else math.floor(fraction * len(idx) + 1e-6)
        out.append(idx[order[:keep]])
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)


def select(samples, criterion: str, k_per_class: Optional[int] = None, *,
           top_fraction: Optional[float] = None, classifier: Optional[nn.Module] = None,
           labels=None, features: Optional[Callable] = None, batch_size: int = 256,
           device=None, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
           beta: float = 6.0, seed: int = 0, chunk_size: Optional[int] = 16):
    """Keep the best samples of every class by ``criterion`` (App. D.3): the top
    ``k_per_class``, or the top ``top_fraction`` of each class (one of the two).

    Args:
        samples: float NCHW tensor in [0, 1] (values outside [0, 1] are a ValueError), uint8
            NHWC array, a :class:`cdp_fast.Samples` or a path / list of paths
            (:meth:`cdp_fast.Samples.load`).
        criterion: "entropy" | "confidence" | "label_probability" | "grad_norm" |
            "robust_grad_norm" | "separability" (see the module docstring for the exact
            scores; DM-Improves-AT's selection is "label_probability" with top_fraction).
        k_per_class: K >= 1 samples per class (a class with fewer keeps all of them).
        top_fraction: f in (0, 1]: ⌊f·n_c⌋ of a class of n_c samples (see the module docstring
            for the rounding); ValueError if no class keeps any.
        classifier: the trained classifier on [0, 1] images (required except for
            "separability" with both ``features`` and labels given).
        labels: class of each sample; default ``samples.labels``, else the classifier's
            pseudo-labels.
        features: for "separability", x in [0, 1] -> (B, d); default ``classifier.features``.
        eps, step_size, steps, beta: the TRADES attack and β of "robust_grad_norm".
        chunk_size: samples per vmap chunk of the per-sample gradients.
    Returns:
        int64 indices, grouped by class (ascending) and within a class by rank (best first);
        for a Samples input the pair ``(indices, samples.subset(indices))``.
    """
    if (k_per_class is None) == (top_fraction is None):
        raise ValueError("give exactly one of k_per_class (samples per class) and top_fraction "
                         f"(share of each class), got {k_per_class!r} and {top_fraction!r}")
    if k_per_class is not None and (isinstance(k_per_class, bool) or k_per_class < 1
                                    or not isinstance(k_per_class, (int, np.integer))):
        raise ValueError(f"k_per_class must be an int >= 1, got {k_per_class!r}")
    if top_fraction is not None and (isinstance(top_fraction, bool) or not isinstance(
            top_fraction, (int, float, np.integer, np.floating)) or not 0 < top_fraction <= 1):
        raise ValueError(f"top_fraction must be a number in (0, 1], got {top_fraction!r}")
    score, lab = scores(samples, criterion, classifier=classifier, labels=labels,
                        features=features, batch_size=batch_size, device=device, eps=eps,
                        step_size=step_size, steps=steps, beta=beta, seed=seed,
                        chunk_size=chunk_size)
    if not np.all(np.isfinite(score)):
        raise ValueError(f"criterion {criterion!r} produced non-finite scores")
    idx = _top_per_class(score, lab, None if k_per_class is None else int(k_per_class),
                         None if top_fraction is None else float(top_fraction), _KEEP_LARGEST[criterion])
    if not len(idx):
        raise ValueError(f"top_fraction={top_fraction} keeps no sample: the largest class has "
                         f"{int(np.bincount(lab).max())} samples")
    if hasattr(samples, "images") and hasattr(samples, "labels") and hasattr(samples, "subset"):
        return idx, samples.subset(idx)
    return idx
