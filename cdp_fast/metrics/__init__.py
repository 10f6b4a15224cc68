"""Is a set of generated (images, labels) better training data? Measurements to run *before*
spending GPU-days training on it (`cdp-fast inspect`; project issue 13).
(Long on purpose: each metric is a small function with its source and shapes beside the
others it shares the chunked distances and the independent feature space with; `report`
and `figure` put them together.)

Every function takes images as float NCHW tensors in [0, 1] (or anything
:func:`as_image_set` converts: a :class:`cdp_fast.Samples`, an npz path / out folder, uint8
NHWC arrays) and integer labels (N,). Everything is deterministic (fixed seeds, no sampling
unless seeded) and chunked: no N×N matrix is ever built beyond ``chunk`` rows.

Feature space. Class separation, precision/recall/density/coverage and the feature-space
memorisation distances are computed in a feature space that the guidance did *not* use: by
default the PCA of the real training images (:func:`fit_pca`, 20 components, fitted on the
real set only, unwhitened so that distances are pixel distances within the subspace), or a
user callable ``features(x01) -> (B, d)``. Using the guidance's own features would measure
what the guidance optimised, not whether the data got better.

==========================  =========================================================  =======
function                    what                                                       source
==========================  =========================================================  =======
:func:`class_separation`    Fisher ratio tr S_B / tr S_W; per-pair mean distance over   Fisher
                            the within-class std (the paper's ‖2μ‖/σ)                   1936; §3
:func:`effective_c`         the paper's c: synthetic over real separation              §3
:func:`prdc`                precision / recall, density / coverage on k-NN balls       [K19],[N20]
:func:`class_balance`       histogram, entropy (nats, / log K), largest / smallest     —
:func:`label_agreement`     stored labels vs an independent classifier's argmax        —
:func:`confidence_summary`  mean and quantiles of the stored confidences               —
:func:`linear_probe`        logistic regression on the synthetic set, real test acc.,   [A16]
                            robust acc. under L∞ PGD on the probe                      [M18]
:func:`memorisation`        NN distance to the training set, fraction closer than the  [W21]
                            real set's own 5th-percentile NN distance
:func:`paired`              same x_T, two samplers: label-flip rate, ‖Δx‖                —
:func:`report`              all of the above that apply, as a JSON-serialisable dict    —
==========================  =========================================================  =======

[K19] Kynkäänniemi, Karras, Laine, Lehtinen, Aila, "Improved Precision and Recall Metric for
Assessing Generative Models", NeurIPS 2019. [N20] Naeem, Oh, Uh, Choi, Yoo, "Reliable
Fidelity and Diversity Metrics for Generative Models", ICML 2020 (reference code
``clovaai/generative-evaluation-prdc``, whose strict ``<`` and k-th-neighbour-excluding-self
radii are followed here). [A16] Alain, Bengio, "Understanding intermediate layers using linear
classifier probes", 2016. [M18] Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018. [W21] the nearest-neighbour memorisation check of generated
images against the training set (e.g. Webster et al., "This Person (Probably) Exists", 2021;
Carlini et al., "Extracting Training Data from Diffusion Models", 2023). §3: Section 3 of the
paper (``contrastive-dp-iclr2023``): real x | y ~ N(yμ, σ²I), synthetic
0.5 N(μ̃, σ²I) + 0.5 N(−μ̃, σ²I) with μ̃ = cμ; "the bigger the c, the smaller the error".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cdp_fast.data import images_to_float01

__all__ = [
    "ImageSet", "as_image_set", "PCAFeatures", "fit_pca", "extract_features", "class_separation",
    "effective_c", "knn_radii", "prdc", "class_balance", "label_agreement", "confidence_summary",
    "fit_logistic_regression", "linear_probe", "nn_distances", "memorisation", "paired", "report",
    "table_rows", "figure", "DEFAULTS",
]

#: Defaults of :func:`report` (and `cdp-fast inspect`).
DEFAULTS = {
    "pca_components": 20,      # PCA of the real images: the default independent feature space
    "k": 5,                    # k-NN radii of precision/recall/density/coverage ([N20] uses 5)
    "probe_steps": 100,        # LBFGS iterations of the linear probe (full batch, one .step)
    "probe_l2": 1e-3,          # ridge on the probe's weights (keeps separable data bounded)
    "probe_eps": 8 / 255,      # L∞ PGD radius on [0, 1] pixels against the probe (CIFAR-10 standard)
    "probe_pgd_steps": 10,     # PGD steps, step size 2.5·eps/steps
    "memorisation_quantile": 0.05,
    "chunk": 1024,             # rows per distance block: at most chunk × N distances in memory
    "seed": 0,
}

_DIRECT_MAX_DIM = 128   # up to this dimension distances are computed pair by pair (exact, chunk-independent)


# ----------------------------------------------------------------------------- inputs
@dataclass
class ImageSet:
    """A set of images in the metrics' convention.

    x: float32 (N, C, H, W) in [0, 1], CPU; y: int64 (N,) or None; confidence: float (N,)
    numpy or None; meta: the manifest of an out folder (or {}); name: for messages.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    confidence: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)
    name: str = "images"

    def __len__(self):
        return len(self.x)


def _convert_images(images, name, model_space, chunk=4096):
    """Any image container -> float32 NCHW [0, 1] CPU tensor, converted chunk by chunk with
    :func:`cdp_fast.data.images_to_float01` (a lazy shard view is read piece by piece)."""
    n = len(images)
    if n == 0:
        raise ValueError(f"{name} is empty")
    first = images_to_float01(images[:1], name, model_space=model_space)
    if first.dim() != 4:
        raise ValueError(f"{name} must be a batch of images (N, C, H, W), got shape {tuple(first.shape)}")
    out = torch.empty((n,) + tuple(first.shape[1:]), dtype=torch.float32)
    for s in range(0, n, chunk):
        part = images[s:s + chunk]
        if not isinstance(part, torch.Tensor):
            part = np.asarray(part)
        out[s:s + len(part)] = images_to_float01(part, name, model_space=model_space).float().cpu()
    return out


def as_image_set(data, name: str = "samples", *, max_samples: Optional[int] = None) -> ImageSet:
    """Convert what the package produces into an :class:`ImageSet`.

    Args:
        data: a :class:`cdp_fast.Samples`; a path (npz or out folder, via ``Samples.load``);
            an ``(x, y)`` pair (x uint8 NHWC / grey NHW or float NCHW in [0, 1], tensor or array;
            y integers or None); an image batch alone; or an :class:`ImageSet` (returned as is,
            cut to ``max_samples``).
        name: used in error messages.
        max_samples: keep the first N images only (None: all).
    Returns:
        ImageSet with x float32 (N, C, H, W) in [0, 1]. Float images of a ``Samples`` are model
        space [-1, 1] (``output="float"``) and are mapped by ``images_to_float01(model_space=True)``.
    Raises:
        ValueError naming ``name`` for anything else, labels of the wrong length, or float
        images outside [0, 1].
    """
    from cdp_fast.data import Samples

    if isinstance(data, ImageSet):
        s = data
    else:
        if isinstance(data, (str, os.PathLike)):
            if not os.path.exists(data):
                raise ValueError(f"{name}: {data} does not exist")
            data = Samples.load(data)
        meta, conf, model_space = {}, None, False
        if hasattr(data, "images") and hasattr(data, "labels"):   # Samples (duck-typed)
            images, labels = data.images, data.labels
            conf = None if getattr(data, "confidence", None) is None else np.asarray(data.confidence, np.float64)
            meta = dict(getattr(data, "meta", {}) or {})
            dtype = np.dtype(getattr(images, "dtype", np.uint8)) if not isinstance(images, torch.Tensor) else None
            model_space = dtype is not None and np.issubdtype(dtype, np.floating)
        elif isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise ValueError(f"{name} must be an (x, y) pair, got {len(data)} items")
            images, labels = data
        elif isinstance(data, (torch.Tensor, np.ndarray)):
            images, labels = data, None
        else:
            raise ValueError(f"{name} must be a Samples, a path, an (x, y) pair or an image batch; "
                             f"got {type(data).__name__}")
        n = len(images) if max_samples is None else min(len(images), int(max_samples))
        x = _convert_images(images[:n] if n < len(images) else images, name, model_space)
        if not model_space:
            lo, hi = float(x.min()), float(x.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{name} images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        y = None
        if labels is not None:
            y_arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
            if not np.issubdtype(y_arr.dtype, np.integer):
                raise ValueError(f"{name} labels must be integers, got {y_arr.dtype}")
            if len(y_arr) < n:
                raise ValueError(f"{name}: {len(y_arr)} labels for {len(images)} images")
            y = torch.from_numpy(y_arr[:n].astype(np.int64))
            if len(y) and int(y.min()) < 0:
                raise ValueError(f"{name} labels must be >= 0")
        return ImageSet(x, y, None if conf is None else conf[:n], meta, name)
    if max_samples is not None and len(s) > max_samples:
        m = int(max_samples)
        s = ImageSet(s.x[:m], None if s.y is None else s.y[:m],
                     None if s.confidence is None else s.confidence[:m], s.meta, s.name)
    return s


def _x01(x, name="x") -> torch.Tensor:
    """float NCHW [0, 1] from anything :func:`as_image_set` accepts as images."""
    if isinstance(x, ImageSet):
        return x.x
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return as_image_set((x, None), name).x


def _labels(y, n, name="y") -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().cpu().flatten()
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels for {n} items")
    return y


# ----------------------------------------------------------------------------- feature spaces
class PCAFeatures:
    """x (B, C, H, W) in [0, 1] -> (B, k) float64: the projection of the flattened pixels,
    centred on the fitted mean, onto the top-k principal axes (unwhitened). Each axis' sign is
    fixed so that its largest-magnitude loading is positive (deterministic across runs).

    Attributes: mean (D,), components (k, D) orthonormal rows, explained_variance (k,)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, explained_variance: torch.Tensor):
        self.mean, self.components, self.explained_variance = mean, components, explained_variance

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1).to(torch.float64)
        return (flat - self.mean) @ self.components.T

    def __repr__(self):
        return f"PCAFeatures(k={self.dim}, D={self.components.shape[1]})"


def fit_pca(x, n_components: int = 20) -> PCAFeatures:
    """PCA of images (the default independent feature space; fit it on the *real* set).

    Args:
        x: (N, C, H, W) images in [0, 1] (anything :func:`as_image_set` takes as images), or
            any float (N, ...) tensor (e.g. features, to project them to 2-D).
        n_components: k; capped at min(D, N − 1).
    Returns:
        :class:`PCAFeatures`. Computed in float64 from the D × D covariance (eigh), so the cost
        is O(N D² + D³) and N may be large; for D ≫ 10⁴ pass your own extractor.
    """
    xf = x if isinstance(x, torch.Tensor) and x.is_floating_point() else _x01(x, "pca data")
    xf = xf.reshape(len(xf), -1).to(torch.float64)
    n, d = xf.shape
    if n < 2:
        raise ValueError("fit_pca needs at least 2 images")
    k = max(1, min(int(n_components), d, n - 1))
    mean = xf.mean(0)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, 8192):
        c = xf[s:s + 8192] - mean
        cov += c.T @ c
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True, stable=True)[:k]
    comps = evecs[:, order].T.contiguous()
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return PCAFeatures(mean, comps, evals[order].clamp_min(0))


def extract_features(features: Callable, x, *, batch_size: int = 1024, device=None) -> torch.Tensor:
    """``features`` over ``x`` in batches, under no_grad (eval mode for an nn.Module).

    Args:
        features: callable (B, C, H, W) in [0, 1] -> (B, d) (or (B, ...), flattened).
        x: images (anything :func:`as_image_set` takes as images).
    Returns:
        float64 (N, d) CPU tensor.
    """
    from cdp_fast.utils.runtime import eval_mode, model_device

    x = _x01(x)
    dev = model_device(features, device)
    ctx = eval_mode(features)          # a plain callable: nothing to switch
    out = []
    with torch.no_grad(), ctx:
        for s in range(0, len(x), batch_size):
            f = features(x[s:s + batch_size].to(dev))
            out.append(torch.as_tensor(f).reshape(min(batch_size, len(x) - s), -1).to("cpu", torch.float64))
    return torch.cat(out)


# ----------------------------------------------------------------------------- class separation
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
    y = _labels(y, len(f))
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
    ss = {c: s for c, s in _class_stats(fs, _labels(y_syn, len(fs))).items() if s[0] >= 2}
    sr = {c: s for c, s in _class_stats(fr, _labels(y_real, len(fr))).items() if s[0] >= 2}
    common = {c for c in ss if c in sr}
    ps = _pair_separations({c: ss[c] for c in common}, fs.shape[1])
    pr = _pair_separations({c: sr[c] for c in common}, fr.shape[1])
    ratios = [ps[p] / pr[p] for p in ps if pr[p] > 0 and math.isfinite(pr[p])]
    if not ratios:
        return {"effective_c": None, "effective_c_min": None, "pairs": 0}
    return {"effective_c": float(np.mean(ratios)), "effective_c_min": float(np.min(ratios)),
            "pairs": len(ratios)}


# ----------------------------------------------------------------------------- distances
def _cdist(a, b):
    """Euclidean distances (len(a), len(b)) in float64; pair by pair (exact, the same value for a
    pair whatever the chunk) up to 128 dimensions, else by the Gram expansion."""
    mode = "donot_use_mm_for_euclid_dist" if a.shape[1] <= _DIRECT_MAX_DIM else "use_mm_for_euclid_dist"
    return torch.cdist(a, b, compute_mode=mode)


def _flat64(f):
    f = torch.as_tensor(f)
    return f.reshape(len(f), -1).to(torch.float64)


def knn_radii(f, k: int = 5, *, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of f (N, d) to its k-th nearest *other* row (self excluded by
    index), chunked (chunk × N distances at a time). float64 (N,). Needs N > k."""
    f = _flat64(f)
    n = len(f)
    if n <= k:
        raise ValueError(f"k-NN radii need more than k = {k} points, got {n}")
    out = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        d = _cdist(f[s:s + chunk], f)
        rows = torch.arange(len(d))
        d[rows, rows + s] = math.inf
        out[s:s + len(d)] = d.topk(k, dim=1, largest=False).values[:, -1]
    return out


def prdc(real_f, fake_f, *, k: int = 5, chunk: int = 1024) -> dict:
    """Precision / recall [K19] and density / coverage [N20] of fake features against real ones.

    With r_i the distance of real point X_i to its k-th nearest other real point and s_j the
    same for the fakes Y_j (:func:`knn_radii`), and strict inequalities as in the reference code:
        precision = (1/M) Σ_j 1[∃ i: ‖Y_j − X_i‖ < r_i]
        recall    = (1/N) Σ_i 1[∃ j: ‖X_i − Y_j‖ < s_j]
        density   = (1/(kM)) Σ_j Σ_i 1[‖Y_j − X_i‖ < r_i]
        coverage  = (1/N) Σ_i 1[min_j ‖X_i − Y_j‖ < r_i]
    Identical sets (no ties) give precision = recall = coverage = 1 and density = 1 (each real
    ball holds its own copy and k − 1 neighbours); i.i.d. draws from one distribution give
    density ≈ 1 in expectation.

    Args:
        real_f: (N, d), fake_f: (M, d) features (both > k rows).
        k: neighbours of the radii (5 as in [N20]).
        chunk: rows per distance block (memory chunk × max(N, M) float64).
    Returns: {"precision", "recall", "density", "coverage", "k"}.
    """
    xr, xf = _flat64(real_f), _flat64(fake_f)
    if xr.shape[1] != xf.shape[1]:
        raise ValueError(f"feature dims differ: real {xr.shape[1]}, fake {xf.shape[1]}")
    r = knn_radii(xr, k, chunk=chunk)
    s = knn_radii(xf, k, chunk=chunk)
    in_real = 0
    dens = 0.0
    for a in range(0, len(xf), chunk):
        inside = _cdist(xf[a:a + chunk], xr) < r[None, :]
        in_real += int(inside.any(1).sum())
        dens += float(inside.sum())
    rec = 0
    cov = 0
    for a in range(0, len(xr), chunk):
        d = _cdist(xr[a:a + chunk], xf)
        rec += int((d < s[None, :]).any(1).sum())
        cov += int((d.min(1).values < r[a:a + chunk]).sum())
    m, n = len(xf), len(xr)
    return {"precision": in_real / m, "recall": rec / n, "density": dens / (k * m), "coverage": cov / n,
            "k": int(k)}


def nn_distances(a, b, *, exclude_self: bool = False, chunk: int = 1024):
    """Nearest neighbour in b of every row of a: (distance float64 (len(a),), index int64).

    Rows are flattened. Above 128 dimensions the candidate is found by a float32 Gram expansion
    and its distance recomputed exactly in float64 from the difference (so an exact copy has
    distance 0). ``exclude_self``: a and b are the same set; row i never matches itself."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"dims differ: {a.shape[1]} vs {b.shape[1]}")
    direct = a.shape[1] <= _DIRECT_MAX_DIM
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    b32 = b.to(torch.float32)
    b_sq = (b32 ** 2).sum(1) if not direct else None
    dist = torch.empty(len(a), dtype=torch.float64)
    idx = torch.empty(len(a), dtype=torch.int64)
    for s in range(0, len(a), chunk):
        if direct:
            d = _cdist(a64[s:s + chunk], b64)
        else:
            q = a[s:s + chunk].to(torch.float32)
            d = (q ** 2).sum(1, keepdim=True) + b_sq[None, :] - 2 * q @ b32.T
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + s] = math.inf
        j = d.argmin(1)
        idx[s:s + len(d)] = j
        dist[s:s + len(d)] = (d[torch.arange(len(d)), j] if direct
                              else torch.linalg.vector_norm(a64[s:s + chunk] - b64[j], dim=1))
    return dist, idx


def _summary(v: torch.Tensor, qs=(0.05, 0.5)) -> dict:
    v = v.to(torch.float64)
    out = {"min": float(v.min()), "mean": float(v.mean())}
    for q in qs:
        out[f"q{int(round(q * 100)):02d}"] = float(torch.quantile(v, q))
    out["max"] = float(v.max())
    return out


def memorisation(x_syn, x_train, *, f_syn=None, f_train=None, quantile: float = 0.05,
                 chunk: int = 1024) -> dict:
    """How close generated images come to the training images (copies = memorisation).

    For each synthetic image, its Euclidean distance to the nearest training image, in pixel
    space (flattened images in [0, 1]) and, when features are given, in that feature space.
    The yardstick is the training set's own spacing: τ = the ``quantile`` (5%) quantile of the
    distances from each training image to its nearest *other* training image; ``fraction_below``
    = the share of synthetic images strictly closer than τ to the training set. Exact copies of
    training images have distance 0 and count (when τ > 0).

    Args:
        x_syn: (M, C, H, W), x_train: (N, C, H, W) images in [0, 1].
        f_syn, f_train: optional features (M, d), (N, d).
    Returns:
        {"pixel": {min, mean, q05, q50, max, "real_nn_q": τ, "fraction_below"}, "features": same
        (if features given), "quantile"}.
    """
    xs, xt = _x01(x_syn, "x_syn"), _x01(x_train, "x_train")

    def one(a, b):
        d, _ = nn_distances(a, b, chunk=chunk)
        own, _ = nn_distances(b, b, exclude_self=True, chunk=chunk)
        tau = float(torch.quantile(own, quantile))
        out = _summary(d)
        out["real_nn_q"] = tau
        out["fraction_below"] = float((d < tau).double().mean())
        return out

    res = {"quantile": quantile, "pixel": one(xs, xt)}
    if f_syn is not None and f_train is not None:
        res["features"] = one(_flat64(f_syn), _flat64(f_train))
    return res


# ----------------------------------------------------------------------------- labels
def class_balance(y, num_classes: Optional[int] = None) -> dict:
    """Label histogram of y (N,) over K classes (K = num_classes, else max(y) + 1).

    Returns {"histogram": [n_0 .. n_{K-1}], "entropy_nats": H = −Σ p_c log p_c (0 log 0 = 0),
    "entropy_normalised": H / log K (1 = perfectly balanced; None for K = 1), "max_count",
    "min_count" (over all K classes, so an empty class gives 0), "num_classes": K}."""
    y = _labels(y, len(y) if hasattr(y, "__len__") else 0)
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


def _predict(classifier, x, batch_size=1024, device=None):
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
    x = _x01(x)
    y = _labels(y, len(x))
    pred = _predict(classifier, x, batch_size, device)
    ok = (pred == y).double()
    per = {int(c): float(ok[y == c].mean()) for c in torch.unique(y).tolist()}
    return {"agreement": float(ok.mean()), "per_class": per}


def confidence_summary(conf) -> dict:
    """Summary of stored pseudo-label confidences (max softmax), (N,):
    {"mean", "q05", "q25", "q50", "q75", "q95", "fraction_above_0.8"}."""
    c = torch.as_tensor(np.asarray(conf, dtype=np.float64))
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
    x = _x01(x).reshape(len(x), -1).float()
    y = _labels(y, len(x))
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
                 eps: float = DEFAULTS["probe_eps"], pgd_steps: int = DEFAULTS["probe_pgd_steps"],
                 steps: int = DEFAULTS["probe_steps"], l2: float = DEFAULTS["probe_l2"],
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

    xtr, xte = _x01(x_train, "x_train"), _x01(x_test, "x_test")
    ytr, yte = _labels(y_train, len(xtr)), _labels(y_test, len(xte))
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


# ----------------------------------------------------------------------------- paired
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
           num_classes: Optional[int] = None, k: int = DEFAULTS["k"],
           pca_components: int = DEFAULTS["pca_components"], probe_eps: float = DEFAULTS["probe_eps"],
           max_samples: Optional[int] = None, seed: int = DEFAULTS["seed"],
           chunk: int = DEFAULTS["chunk"]) -> dict:
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
        num_classes: K (default: max label + 1 over the labelled sets).
        k, probe_eps, seed, chunk: see :data:`DEFAULTS`.
        max_samples: first N of each generated set only.
    Returns:
        {"setup": {...}, "real": reference values on the real set, "samples": per-set metrics,
         "against": per-set metrics (with ``against``), "paired": :func:`paired` (with
         ``against``)}. Per-set keys: n, labels_from, class_balance, separation (Fisher ratio,
         separation mean/min, effective_c), fidelity (precision, recall, density, coverage),
         agreement, confidence, probe, memorisation, guidance_strength (the manifest's, if any).
    """
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
            sets[key] = ImageSet(s.x, _predict(classifier, s.x), s.confidence, s.meta, s.name)
            labels_from[key] = "classifier"
        else:
            labels_from[key] = None
    ys = [r.y] + [s.y for s in sets.values() if s.y is not None] + ([t.y] if t is not None and t.y is not None
                                                                     else [])
    K = int(num_classes) if num_classes is not None else max(int(y.max()) for y in ys) + 1

    setup = {"features": feat_desc, "feature_dim": int(f_real.shape[1]), "k": int(k), "num_classes": K,
             "real_train_n": len(r), "real_test_n": None if t is None else len(t),
             "classifier": None if classifier is None else _describe(classifier), "seed": seed,
             "probe": {"model": "multinomial logistic regression on pixels, full-batch LBFGS",
                       "steps": DEFAULTS["probe_steps"], "l2": DEFAULTS["probe_l2"], "eps": probe_eps,
                       "pgd_steps": DEFAULTS["probe_pgd_steps"]} if t is not None else None}

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


# ----------------------------------------------------------------------------- figure
def figure(path, rep: dict, samples, *, real, against=None, features=None,
           pca_components: int = DEFAULTS["pca_components"], max_points: int = 3000, seed: int = 0,
           max_samples=None) -> None:
    """Write a PNG summary of a :func:`report`: class histograms (each set and the real one, as
    fractions), a 2-D projection of each set (the top two principal axes of the *independent
    features* of the real set) coloured by label over the real set in grey, and — when a set's
    manifest recorded it — the guidance-strength curve ratio_mean (‖λ∇ℓ‖/‖ε‖) against t.

    Args: as :func:`report` (the same ``features``: None = PCA of the real images; the same
    ``max_samples``, so the figure shows the sets the report measured); at most ``max_points``
    points per scatter, a seeded subset. Needs matplotlib (the demo extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the inspect figure needs matplotlib: pip install 'cdp_fast[demo]'") from e
    from cdp_fast.data import atomic_write

    r = as_image_set(real, "real")
    sets = {"samples": as_image_set(samples, "samples", max_samples=max_samples)}
    if against is not None:
        sets["against"] = as_image_set(against, "against", max_samples=max_samples)
    if features is None:
        features = fit_pca(r.x, pca_components)
    f_real = extract_features(features, r.x)
    proj = fit_pca(f_real, 2)   # the top two principal axes of the real set's features
    strength = {k: rep[k]["guidance_strength"] for k in sets if rep.get(k, {}).get("guidance_strength")}
    ncols = 1 + len(sets) + (1 if strength else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.8))
    axes = np.atleast_1d(axes)

    ax = axes[0]
    K = rep["setup"]["num_classes"]
    hists = [("real", rep["real"]["class_balance"]["histogram"])]
    hists += [(k, rep[k]["class_balance"]["histogram"]) for k in sets if "class_balance" in rep.get(k, {})]
    w = 0.8 / len(hists)
    for j, (name, h) in enumerate(hists):
        tot = max(1, sum(h))
        ax.bar(np.arange(K) + (j - (len(hists) - 1) / 2) * w, [v / tot for v in h], width=w, label=name)
    ax.axhline(1.0 / K, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(K))
    ax.set_xlabel("label")
    ax.set_ylabel("fraction")
    ax.set_title("class histogram")
    ax.legend(fontsize=7)

    g = np.random.default_rng(seed)
    pr = proj(f_real).numpy()
    for j, (name, s) in enumerate(sets.items()):
        ax = axes[1 + j]
        ax.scatter(pr[:, 0], pr[:, 1], s=3, c="0.8", label="real")
        ps = proj(extract_features(features, s.x)).numpy()
        idx = np.sort(g.permutation(len(ps))[:max_points])
        if s.y is not None:
            sc = ax.scatter(ps[idx, 0], ps[idx, 1], s=4, c=s.y.numpy()[idx], cmap="tab10", vmin=0,
                            vmax=max(9, K - 1))
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        else:
            ax.scatter(ps[idx, 0], ps[idx, 1], s=4, c="C0")
        ax.set_title(f"{name}: 2-D PCA of the features")
        ax.set_xticks([])
        ax.set_yticks([])
    if strength:
        ax = axes[-1]
        for name, curve in strength.items():
            ts = [c["t"] for c in curve]
            ax.plot(ts, [c["ratio_mean"] for c in curve], marker=".", label=name)
        ax.set_xlabel("t")
        ax.set_ylabel("mean |lambda grad l| / |eps|")
        ax.set_title("guidance strength")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

