"""Pseudo-labels for generated images (paper §2: "ỹ_i are pseudo labels assigned by a classifier
learned on the training data"): ``label = argmax softmax(f(x))``, ``confidence = max softmax``,
``entropy = −Σ_k p_k log p_k`` (nats), computed batch by batch so a million lazily stored
images never sit in memory at once; :func:`pseudo_label_to_npz` writes them to a file as it
goes. The classifier takes float NCHW images in [0, 1] (inputs are checked by
:func:`cdp_fast.data.open_images`).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdp_fast.data.sources import open_images
from cdp_fast.models.ranges import UNIT_RANGE, check_range_contract
from cdp_fast.utils.checks import looks_like_probabilities
from cdp_fast.utils.runtime import model_device

__all__ = ["pseudo_label", "pseudo_label_to_npz", "classify", "classify_batches", "check_batch_size"]


def check_unit_classifier(classifier, who: str) -> None:
    """Refuse a network that declares it takes [-1, 1] images (the sampler's adapters): labelling
    and selection give the classifier images in [0, 1] (:mod:`cdp_fast.models.ranges`)."""
    check_range_contract(classifier, UNIT_RANGE, f"classifier ({who} gives it images in [0, 1])",
                         "pass the classifier itself (an adapter's .model), not the sampler's adapter")


def check_batch_size(batch_size, name="batch_size"):
    """ValueError unless ``batch_size`` is an int >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {batch_size!r}")


def _bar(n, progress, desc="pseudo-label"):
    """A tqdm bar over ``n`` images (rank 0 only), or None."""
    from cdp_fast.utils import distributed as cdist

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a runtime dependency
        return None
    return tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress or not cdist.is_main())


def pseudo_label(classifier: nn.Module, images, *, batch_size: int = 512, device=None,
                 progress: bool = False) -> dict:
    """Pseudo-labels of ``images`` by ``classifier`` (eval mode; modes restored).

    Args:
        classifier: (B, C, H, W) in [0, 1] -> logits (B, K).
        images: float NCHW tensor in [0, 1] (checked: values outside are a ValueError), uint8
            NHWC array/tensor, a :class:`cdp_fast.Samples` (uint8 images, or float images in
            [-1, 1]) or a path / list of paths (read by :func:`cdp_fast.data.open_images`).
        batch_size: images per forward pass.
        device: where the classifier runs (default: its own device).
        progress: tqdm bar over the images (shown by rank 0 only under torchrun).
    Returns:
        {"label": int64 (N,), "confidence": float32 (N,) = max softmax,
         "entropy": float32 (N,) = −Σ p log p in nats}, numpy arrays.

    A classifier that returns probabilities instead of logits (every row of a batch >= 0 and
    summing to 1 within 1e-2, :func:`cdp_fast.utils.checks.looks_like_probabilities`) is
    detected: its outputs are used as the probabilities (not
    softmaxed again), with one UserWarning. :func:`pseudo_label_to_npz` writes the same
    labels to a file as it goes, in memory flat in N.
    """
    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    check_unit_classifier(classifier, "pseudo_label")
    check_batch_size(batch_size)
    imgs = open_images(images)
    bar = _bar(len(imgs), progress)
    try:
        out = classify(classifier, imgs, batch_size, model_device(classifier, device), bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return {k: out[k] for k in ("label", "confidence", "entropy")}


def pseudo_label_to_npz(classifier: nn.Module, samples, out, *, batch_size: int = 512,
                        device=None, progress: bool = False) -> dict:
    """Pseudo-label ``samples`` and write them, labelled, to the npz ``out`` as they go: keys
    ``image`` (as stored: uint8 NHWC, or float model space), ``label`` (int64, the classifier's
    argmax) and ``confidence`` (float32, max softmax), what :func:`pseudo_label` returns and
    :meth:`cdp_fast.Samples.save_npz` would write, without holding the set in memory: images
    are read ``batch_size`` at a time and written straight on, labels go through temporary
    files beside ``out`` (:func:`cdp_fast.data.npz.stream_npz`); atomic.

    Args:
        classifier: (B, C, H, W) in [0, 1] -> logits (B, K).
        samples: a :class:`cdp_fast.Samples` or a path / list of paths (:meth:`Samples.load`:
            npz, npz parts, out directory, folder of ``{k}.npy``); uint8 NHWC images are read
            as value / 255, float ones as model space [-1, 1].
        out: the npz to write (its folder must exist).
    Returns:
        {"n": N, "class_counts": int64 (K,)}, K the classifier's outputs.
    """
    from cdp_fast.data.npz import stream_npz
    from cdp_fast.data.sources import is_path_list, is_samples

    if not isinstance(classifier, nn.Module):
        raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    check_unit_classifier(classifier, "pseudo_label")
    check_batch_size(batch_size)
    if not (is_samples(samples) or is_path_list(samples) or isinstance(samples, (str, os.PathLike))):
        raise ValueError("samples must be a Samples or a path (list of paths); wrap image arrays as "
                         f"cdp_fast.Samples(uint8 NHWC images), got {type(samples).__name__}")
    imgs = open_images(samples, "samples")
    dev = model_device(classifier, device)
    counts = []

    def stored(lo, hi):                 # rows as stored, as numpy (a Samples may hold a tensor)
        r = imgs.rows(lo, hi)
        return r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)

    def chunks():
        raws = []

        def batches():
            for i in range(0, len(imgs), batch_size):
                raws.append(stored(i, min(len(imgs), i + batch_size)))
                yield i, imgs.convert(raws[-1]).float()
        for _, b in classify_batches(classifier, batches(), dev, bar=bar):
            counts.append(np.bincount(b["label"], minlength=b["num_classes"]))
            yield raws.pop(), {"label": b["label"], "confidence": b["confidence"]}

    bar = _bar(len(imgs), progress)
    try:
        n = stream_npz(out, "image", stored(0, 1).dtype, tuple(imgs.images.shape), chunks(),
                       {"label": np.int64, "confidence": np.float32})
    finally:
        if bar is not None:
            bar.close()
    return {"n": n, "class_counts": np.sum(counts, axis=0).astype(np.int64)}


def classify_batches(classifier, batches, dev, *, labels=None, bar=None):
    """Run ``classifier`` over ``batches`` ((start, float32 NCHW in [0, 1]) pairs) in eval mode
    without gradients; yields (start, {"label", "confidence" (max p), "entropy", "num_classes"
    and, with ``labels`` (int64 (N,)), "p_label" = p of the given label}) as numpy per batch.

    A classifier that returns probabilities (every row of a batch >= 0 and summing to 1) is
    read as such, not softmaxed a second time (which would squash the confidences towards
    1/K), with one UserWarning."""
    import warnings

    from cdp_fast.utils.runtime import eval_mode

    warned = False
    with torch.no_grad(), eval_mode(classifier):
        for i, xb in batches:
            out = torch.as_tensor(classifier(xb.to(dev))).float()
            if looks_like_probabilities(out):
                if not warned:
                    warnings.warn("the classifier returns probabilities (rows >= 0 summing to 1), "
                                  "not logits: they are used as probabilities as they are",
                                  UserWarning, stacklevel=4)
                    warned = True
                logp, p = out.clamp_min(1e-45).log(), out
            else:
                logp = F.log_softmax(out, dim=1)
                p = logp.exp()
            c, lab = p.max(dim=1)
            b = {"label": lab.cpu().numpy().astype(np.int64), "confidence": c.cpu().numpy(),
                 "entropy": (-(p * logp).sum(dim=1)).cpu().numpy(), "num_classes": int(p.shape[1])}
            if labels is not None:
                yb = torch.from_numpy(labels[i:i + len(xb)]).to(p.device)
                if len(yb) and int(yb.max()) >= p.shape[1]:
                    raise ValueError(f"labels go up to {int(yb.max())} but the classifier has "
                                     f"{p.shape[1]} outputs")
                b["p_label"] = p.gather(1, yb[:, None])[:, 0].cpu().numpy()
            if bar is not None:
                bar.update(len(xb))
            yield i, b


def classify(classifier, imgs, batch_size, dev, *, labels=None, bar=None) -> dict:
    """:func:`classify_batches` over an ImageSource, concatenated: label, confidence, entropy
    (float32), num_classes and, with ``labels``, p_label."""
    parts = [b for _, b in classify_batches(classifier, imgs.batches(batch_size), dev,
                                             labels=labels, bar=bar)]
    out = {k: np.concatenate([b[k] for b in parts]).astype(np.int64 if k == "label" else np.float32)
           for k in parts[0] if k != "num_classes"}
    out["num_classes"] = parts[0]["num_classes"]
    return out

