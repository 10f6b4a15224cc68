"""Pseudo-labels for generated images and the paper's data-selection criteria.

Pseudo-labelling (paper §2: "ỹ_i are pseudo labels assigned by a classifier learned on the
training data"): ``label = argmax softmax(f(x))``, ``confidence = max softmax``,
``entropy = −Σ_k p_k log p_k`` (nats), computed batch by batch so a million lazily stored
images never sit in memory at once.

Selection (paper App. D.3, Table 6), top-K per class, classes given by the (pseudo-)labels:

==================== ======================================================= =========
criterion            score                                                   keep
==================== ======================================================= =========
"entropy"            H(p(x)) of the classifier (the paper: "LaNet")           smallest
"confidence"         p_ỹ(x) = max_k p_k(x) for pseudo-labels (DM-Improves-AT's  largest
                     filtering of generated data by classifier confidence)
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
  max softmax when ỹ is the classifier's argmax, so pseudo-labelled sets score as before);
  "entropy" is H(p(x)) for samples whose argmax is ỹ, and H(p(x)) + log K + 1 for samples the
  classifier puts in another class, so those rank after every sample it agrees with (K: the
  classifier's outputs). Without labels both use the classifier's own argmax;
- ties are broken by the lower index; a class with fewer than K samples keeps all of them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdp_fast.data.sources import open_images
from cdp_fast.utils.checks import looks_like_probabilities
from cdp_fast.utils.runtime import model_device

__all__ = ["pseudo_label", "select", "scores", "per_sample_grad_norm", "attack_generator",
           "CRITERIA"]

CRITERIA = ("entropy", "confidence", "grad_norm", "robust_grad_norm", "separability")
_KEEP_LARGEST = {"entropy": False, "confidence": True, "grad_norm": True,
                 "robust_grad_norm": True, "separability": False}


# --------------------------------------------------------------------------- arguments
def _check_bs(batch_size, name="batch_size"):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {batch_size!r}")


# --------------------------------------------------------------------------- pseudo-labels
def pseudo_label(classifier: nn.Module, images, *, batch_size: int = 512, device=None,
                 progress: bool = False) -> dict:
    """Pseudo-labels of ``images`` by ``classifier`` (eval mode; modes restored).

    Args:
        classifier: (B, C, H, W) in [0, 1] -> logits (B, K).
        images: float NCHW tensor in [0, 1], uint8 NHWC array/tensor, a
            :class:`cdp_fast.Samples` (uint8 images, or float images in [-1, 1]) or a path
            (read by :func:`cdp_fast.data.open_images`).
        batch_size: images per forward pass.
        device: where the classifier runs (default: its own device).
        progress: tqdm bar over the images (shown by rank 0 only under torchrun).
    Returns:
        {"label": int64 (N,), "confidence": float32 (N,) = max softmax,
         "entropy": float32 (N,) = −Σ p log p in nats}, numpy arrays.

    A classifier that returns probabilities instead of logits (every row of a batch >= 0 and
    summing to 1 within 1e-2, :func:`cdp_fast.utils.checks.looks_like_probabilities`) is
    detected: its outputs are used as the probabilities (not
    softmaxed again), with one UserWarning.
    """
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    _check_bs(batch_size)
    imgs = open_images(images)
    dev = model_device(classifier, device)
    from cdp_fast.utils import distributed as cdist

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        tqdm = None
    bar = (tqdm(total=len(imgs), desc="pseudo-label", unit="img", leave=False,
                disable=not progress or not cdist.is_main()) if tqdm is not None else None)
    try:
        out = _classify(classifier, imgs, batch_size, dev, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return {k: out[k] for k in ("label", "confidence", "entropy")}


def _classify(classifier, imgs, batch_size, dev, *, labels=None, bar=None) -> dict:
    """One pass of ``classifier`` over ``imgs`` (an ImageSource): label, confidence (max p),
    entropy, num_classes (K) and, with ``labels`` (int64 (N,)), p_label = p of the given label
    (numpy arrays).

    A classifier that returns probabilities (every row of a batch >= 0 and summing to 1) is
    read as such, not softmaxed a second time (which would squash the confidences towards
    1/K), with one UserWarning."""
    from cdp_fast.utils.runtime import eval_mode

    labs, conf, ent, plab = [], [], [], []
    warned = False
    with torch.no_grad(), eval_mode(classifier):
        for i, xb in imgs.batches(batch_size):
            out = torch.as_tensor(classifier(xb.to(dev))).float()
            if looks_like_probabilities(out):
                if not warned:
                    import warnings

                    warnings.warn("the classifier returns probabilities (rows >= 0 summing to 1), "
                                  "not logits: they are used as probabilities as they are",
                                  UserWarning, stacklevel=3)
                    warned = True
                logp = out.clamp_min(1e-45).log()
                p = out
            else:
                logp = F.log_softmax(out, dim=1)
                p = logp.exp()
            c, lab = p.max(dim=1)
            labs.append(lab.cpu())
            conf.append(c.cpu())
            ent.append((-(p * logp).sum(dim=1)).cpu())
            if labels is not None:
                yb = torch.from_numpy(labels[i:i + len(xb)]).to(p.device)
                if len(yb) and int(yb.max()) >= p.shape[1]:
                    raise ValueError(f"labels go up to {int(yb.max())} but the classifier has "
                                     f"{p.shape[1]} outputs")
                plab.append(p.gather(1, yb[:, None])[:, 0].cpu())
            if bar is not None:
                bar.update(len(xb))
    out = {"label": torch.cat(labs).numpy().astype(np.int64),
           "confidence": torch.cat(conf).numpy().astype(np.float32),
           "entropy": torch.cat(ent).numpy().astype(np.float32), "num_classes": int(out.shape[1])}
    if labels is not None:
        out["p_label"] = torch.cat(plab).numpy().astype(np.float32)
    return out


# --------------------------------------------------------------------------- gradient norms
def per_sample_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         x_adv: Optional[torch.Tensor] = None, beta: float = 6.0,
                         chunk_size: Optional[int] = 16) -> torch.Tensor:
    """‖∇_θ ℓ_i‖₂ for every sample, with ``torch.func`` (vmap of grad of functional_call).

    ℓ_i = CE(f_θ(x_i), y_i), or with ``x_adv`` the per-sample TRADES loss
    CE(f_θ(x_i), y_i) + β·KL(p_θ(x_i) ‖ p_θ(x_adv_i)) (x_adv held fixed). The model is
    called with its current mode (use eval mode so BatchNorm uses running statistics).
    The gradient is over the parameters with ``requires_grad``; a model with none (a frozen
    classifier, e.g. the bundled digits one) is taken over all its parameters.
    Shapes: x (B, C, H, W), y (B,), x_adv like x -> (B,) float32.
    """
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    if not named:
        raise ValueError("per_sample_grad_norm: the model has no parameters")
    trainable = {k for k, v in named.items() if v.requires_grad}
    wrt = trainable or set(named)        # a frozen classifier: all its parameters
    params = {k: v.detach() for k, v in named.items() if k in wrt}
    frozen = {k: v.detach() for k, v in named.items() if k not in wrt}
    buffers = {k: v for k, v in model.named_buffers()}

    def logits_of(p, xi):
        return functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),)).float()

    def ce(p, xi, yi):
        return F.cross_entropy(logits_of(p, xi), yi.unsqueeze(0))

    def trades(p, xi, yi, xai):
        ln = logits_of(p, xi)
        la = logits_of(p, xai)
        kl = F.kl_div(F.log_softmax(la, dim=1), F.softmax(ln, dim=1), reduction="sum")
        return F.cross_entropy(ln, yi.unsqueeze(0)) + beta * kl

    if x_adv is None:
        g = vmap(grad(ce), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    else:
        g = vmap(grad(trades), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, x, y, x_adv)
    sq = sum(v.reshape(v.shape[0], -1).float().pow(2).sum(1) for v in g.values())
    return sq.sqrt()


# --------------------------------------------------------------------------- scores
def attack_generator(seed: int, batch_index: int, device) -> torch.Generator:
    """Generator of the TRADES attack start for batch ``batch_index`` of "robust_grad_norm"
    (seeded by (seed, batch_index); the start is x + 0.001·N(0, I), so the batch size only
    moves the scores at that scale)."""
    s = int(np.random.SeedSequence([int(seed), 11, int(batch_index)]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(s)


def scores(samples, criterion: str, *, classifier: Optional[nn.Module] = None,
           labels=None, features: Optional[Callable] = None, batch_size: int = 256,
           device=None, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
           beta: float = 6.0, seed: int = 0, chunk_size: Optional[int] = 16):
    """Per-sample score of ``criterion`` (see the module table) and the labels used.

    Returns (score float64 (N,), labels int64 (N,)): the raw score (entropy, confidence,
    gradient norm, distance), not yet oriented; :func:`select` keeps the smallest or largest.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    _check_bs(batch_size)
    imgs = open_images(samples, "samples")
    if classifier is not None and not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    if labels is None and imgs.labels is not None:   # a Samples' labels
        labels = imgs.labels
    needs_clf = criterion != "separability" or features is None or labels is None
    if needs_clf and classifier is None:
        raise ValueError(f"criterion {criterion!r} needs classifier= (a trained classifier)")
    given = labels is not None
    if given:
        labels = np.asarray(labels)
        if labels.shape != (len(imgs),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer, shape ({len(imgs)},), got {labels.dtype} "
                             f"{labels.shape}")
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if criterion in ("entropy", "confidence") or not given:
        pl = _classify(classifier, imgs, batch_size, model_device(classifier, device),
                       labels=labels if given else None)
        if not given:
            labels = pl["label"]
        if criterion == "confidence":   # p of the sample's label (= max p for pseudo-labels)
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


def _top_k_per_class(score: np.ndarray, labels: np.ndarray, k: int, largest: bool) -> np.ndarray:
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        key = -score[idx] if largest else score[idx]
        order = np.lexsort((idx, key))  # primary: score, ties: lower index first
        out.append(idx[order[:k]])
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)


def select(samples, criterion: str, k_per_class: int, *, classifier: Optional[nn.Module] = None,
           labels=None, features: Optional[Callable] = None, batch_size: int = 256,
           device=None, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10,
           beta: float = 6.0, seed: int = 0, chunk_size: Optional[int] = 16):
    """Keep the top ``k_per_class`` samples of every class by ``criterion`` (App. D.3).

    Args:
        samples: float NCHW tensor in [0, 1], uint8 NHWC array, or a :class:`cdp_fast.Samples`.
        criterion: "entropy" | "confidence" | "grad_norm" | "robust_grad_norm" |
            "separability" (see the module docstring for the exact scores).
        k_per_class: K >= 1.
        classifier: the trained classifier (required except for "separability" with both
            ``features`` and labels given).
        labels: class of each sample; default ``samples.labels``, else the classifier's
            pseudo-labels.
        features: for "separability", x in [0, 1] -> (B, d); default ``classifier.features``.
        eps, step_size, steps, beta: the TRADES attack and β of "robust_grad_norm".
        chunk_size: samples per vmap chunk of the per-sample gradients.
    Returns:
        int64 indices, grouped by class (ascending) and within a class by rank (best first);
        for a Samples input the pair ``(indices, samples.subset(indices))``.
    """
    if isinstance(k_per_class, bool) or not isinstance(k_per_class, (int, np.integer)) or k_per_class < 1:
        raise ValueError(f"k_per_class must be an int >= 1, got {k_per_class!r}")
    score, lab = scores(samples, criterion, classifier=classifier, labels=labels,
                        features=features, batch_size=batch_size, device=device, eps=eps,
                        step_size=step_size, steps=steps, beta=beta, seed=seed,
                        chunk_size=chunk_size)
    if not np.all(np.isfinite(score)):
        raise ValueError(f"criterion {criterion!r} produced non-finite scores")
    idx = _top_k_per_class(score, lab, int(k_per_class), _KEEP_LARGEST[criterion])
    if hasattr(samples, "images") and hasattr(samples, "labels") and hasattr(samples, "subset"):
        return idx, samples.subset(idx)
    return idx

