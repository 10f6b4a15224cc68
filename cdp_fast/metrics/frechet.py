"""FID, KID and IS in a standard feature space (project issue 24, item 1): the numbers the field
puts beside a generator (EDM's ``fid.py``, torchmetrics, torch-fidelity, clean-fid).

- :class:`FeatureStats`: features (N, d) streamed chunk by chunk into float64 running sums —
  the sum and the sum of outer products, both shifted by the first row so that the
  covariance keeps its digits when the mean is large — so memory is O(d²) whatever N (1M
  Inception features: 2 × 32 MiB), plus a uniform subset of at most ``keep`` rows for KID
  (bottom-``keep`` by a hash of the row's index: the same rows for any chunking) and the
  per-split sums the Inception Score needs (image i is in split ``i % splits``).
- :func:`frechet_distance`: ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) [H17], in float64, with
  Tr (Σ₁Σ₂)^½ = Tr (Σ₁^½ Σ₂ Σ₁^½)^½ from two symmetric eigendecompositions (no complex
  round-off, unlike eigvals of the non-symmetric product).
- :func:`kernel_distance`: KID [B18], torchmetrics' unbiased polynomial-kernel MMD
  (``torchmetrics.image.kid.poly_mmd``: (xᵀy / d + 1)³) on ``subsets`` random subsets.
- :func:`inception_score`: IS [S16], exp E_x KL(p(y|x) ‖ p(y)) per split, mean and std.
- :func:`fid`: all three for a generated set against a reference set or a reference
  statistics file (EDM's ``cifar10-32x32.npz``: keys ``mu``, ``sigma``), through a feature
  extractor: Inception-v3 (:func:`cdp_fast.metrics.inception.inception_v3`) unless another is
  injected (the tests inject a small network: the same code path).

Images are read by :func:`cdp_fast.data.open_images` (uint8 NHWC, float model space of a
Samples, or float NCHW [0, 1]) and reach the extractor as float32 (B, C, H, W) in [0, 1] at
their own size; the Inception wrapper quantises to uint8 and resizes to 299 × 299.

[H17] Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017. [B18] Bińkowski et al., "Demystifying MMD GANs", ICLR 2018.
[S16] Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch

from cdp_fast.data.npz import npz_keys, write_npz
from cdp_fast.data.sources import open_images
from cdp_fast.metrics.inputs import as_features, check_positive_int

__all__ = ["FeatureStats", "frechet_distance", "kernel_distance", "inception_score", "feature_stats", "fid",
           "load_reference_stats", "FID_DEFAULTS"]

#: KID: torchmetrics' / torch-fidelity's subsets × subset size, degree 3, γ = 1/d, coef 1;
#: keep: rows kept per set for KID; splits: IS splits (10, as both libraries).
FID_DEFAULTS = {"batch_size": 200, "keep": 10_000, "kid_subsets": 100, "kid_subset_size": 1000, "splits": 10,
                "seed": 0}

_EXTRA = "pip install 'cdp_fast[fid]'"


def _row_keys(idx: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (index, seed): a pseudo-random uint64 per row, the same in any chunking."""
    z = idx.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeatureStats:
    """Streamed statistics of features (N, d): mean, covariance, a KID subset, IS sums.

    Args:
        keep: at most this many rows are kept for KID (a uniform random subset, chosen by a
            hash of the row index and ``seed``: the same rows whatever the chunking).
        splits: IS splits (image i in split ``i % splits``).
        seed: the KID subset's seed.
    Attributes: ``n`` (rows seen), ``dim`` (d, None before the first update).

    Examples:
        >>> st = FeatureStats()
        >>> for f in chunks: st.update(f)          # f: (B, d)
        >>> frechet_distance(st.mu, st.sigma, mu_ref, sigma_ref)
    """

    def __init__(self, keep: int = FID_DEFAULTS["keep"], splits: int = FID_DEFAULTS["splits"],
                 seed: int = FID_DEFAULTS["seed"]):
        self.keep = check_positive_int(keep, "keep")
        self.splits = check_positive_int(splits, "splits")
        self.seed = seed
        self.n, self.dim = 0, None
        self._shift = self._sum = self._outer = None
        self._kf = self._kk = self._ki = None          # kept features (float32), keys, indices
        self._p_sum = self._plogp = None               # IS: per split Σ p, Σ Σ_k p log p
        self._counts = np.zeros(self.splits, np.int64)

    def update(self, features, logits=None) -> "FeatureStats":
        """Add features (B, d) (any float dtype; flattened per row) and, for IS, the
        classifier's logits (B, K). ValueError for NaN / inf or a dimension change."""
        f = as_features(features, "features")
        b = len(f)
        if b == 0:
            return self
        if self.dim is None:
            self.dim = f.shape[1]
            self._shift = f[0].clone()
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        elif f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dimensions, earlier ones {self.dim}")
        g = f - self._shift
        self._sum += g.sum(0)
        self._outer.addmm_(g.T, g)
        idx = np.arange(self.n, self.n + b, dtype=np.int64)
        self._keep_rows(f.to(torch.float32), idx)
        if logits is not None:
            self._add_logits(logits, idx)
        self.n += b
        return self

    def _keep_rows(self, f: torch.Tensor, idx: np.ndarray) -> None:
        keys = _row_keys(idx, self.seed)
        if self._kf is None:              # preallocated: filling never copies what is kept
            self._kf, self._kk, self._ki = f.new_empty((self.keep, f.shape[1])), keys[:0], idx[:0]
        have = len(self._kk)
        if have < self.keep:              # not full: take the first rows as they come
            take = min(self.keep - have, len(idx))
            self._kf[have:have + take] = f[:take]
            self._kk, self._ki = np.concatenate([self._kk, keys[:take]]), np.concatenate([self._ki, idx[:take]])
            f, keys, idx = f[take:], keys[take:], idx[take:]
        cand = keys < self._kk.max() if len(keys) else np.zeros(0, bool)
        if not cand.any():                # full: only rows with a smaller key than the largest kept enter
            return
        f, keys, idx = f[torch.from_numpy(np.flatnonzero(cand))], keys[cand], idx[cand]
        allk = np.concatenate([self._kk, keys])
        chosen = np.argsort(allk, kind="stable")[:self.keep]
        new = chosen[chosen >= self.keep] - self.keep
        slots = np.setdiff1d(np.arange(self.keep), chosen[chosen < self.keep])
        self._kf[torch.from_numpy(slots)] = f[torch.from_numpy(new)]
        self._kk[slots], self._ki[slots] = keys[new], idx[new]

    def _add_logits(self, logits, idx: np.ndarray) -> None:
        lg = as_features(logits, "logits")
        if len(lg) != len(idx):
            raise ValueError(f"logits have {len(lg)} rows for {len(idx)} feature rows")
        if self._p_sum is None:
            self._p_sum = torch.zeros(self.splits, lg.shape[1], dtype=torch.float64)
            self._plogp = torch.zeros(self.splits, dtype=torch.float64)
        logp = torch.log_softmax(lg, 1)
        p = logp.exp()
        split = torch.from_numpy(idx % self.splits)
        self._p_sum.index_add_(0, split, p)
        self._plogp.index_add_(0, split, (p * logp).sum(1))
        self._counts += np.bincount(idx % self.splits, minlength=self.splits)

    @property
    def mu(self) -> torch.Tensor:
        """Mean (d,), float64."""
        self._need(1)
        return self._shift + self._sum / self.n

    @property
    def sigma(self) -> torch.Tensor:
        """Unbiased covariance (d, d), float64 (divides by n − 1, as EDM, torchmetrics and
        torch-fidelity)."""
        self._need(2)
        m = self._sum / self.n
        return (self._outer - self.n * torch.outer(m, m)) / (self.n - 1)

    def kept(self) -> torch.Tensor:
        """The rows kept for KID, float32 (min(n, keep), d), in index order."""
        self._need(1)
        return self._kf[:len(self._ki)][torch.from_numpy(np.argsort(self._ki, kind="stable"))]

    def inception_score(self) -> Optional[tuple]:
        """(mean, std over splits) of the IS, or None when no logits were given."""
        return None if self._p_sum is None else inception_score(self._p_sum, self._plogp, self._counts)

    def save(self, path) -> None:
        """Write ``mu`` (d,) and ``sigma`` (d, d) float64 (and ``n``) to an npz, atomically: the
        keys of EDM's reference statistics (``fid.py ref``), read by :func:`load_reference_stats`."""
        write_npz(path, {"mu": self.mu.numpy(), "sigma": self.sigma.numpy(), "n": np.asarray(self.n, np.int64)})

    def _need(self, k):
        if self.n < k:
            raise ValueError(f"feature statistics need at least {k} rows, got {self.n}")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID of two Gaussians: ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁^½ Σ₂ Σ₁^½)^½, float64.

    Args: mu1, mu2: (d,); sigma1, sigma2: (d, d) symmetric PSD (tensors or arrays). Negative
    eigenvalues from round-off are clamped to 0. ValueError on shape mismatch or NaN / inf."""
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    d = m1.numel()
    if m2.numel() != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"FID statistics disagree in shape: mu {tuple(m1.shape)} / {tuple(m2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in (m1, m2, s1, s2)):
        raise ValueError("FID statistics hold NaN or inf")
    e, v = torch.linalg.eigh((s1 + s1.T) / 2)
    r = (v * e.clamp(min=0).sqrt()) @ v.T                    # Σ₁^½
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def kernel_distance(f_real, f_fake, subsets: int = FID_DEFAULTS["kid_subsets"],
                    subset_size: int = FID_DEFAULTS["kid_subset_size"], seed: int = FID_DEFAULTS["seed"],
                    device=None) -> tuple:
    """KID: (mean, std) over ``subsets`` of torchmetrics' unbiased MMD² with the cubic kernel
    (xᵀy / d + 1)³ between random subsets of ``subset_size`` rows of f_real (N₁, d) (the
    reference) and f_fake (N₂, d) (the generated set), in float64. The subsets are drawn as
    torchmetrics' KernelInceptionDistance draws them (``randperm`` of the real rows, then of
    the fake rows, per subset) from a generator seeded with ``seed``; ``subset_size`` is cut to
    min(N₁, N₂) (torchmetrics refuses instead), and must be >= 2. The kernels are computed on
    ``device`` (default: CPU; 100 subsets of 1,000 × 2,048 take about a minute on one core)."""
    try:
        from torchmetrics.image.kid import poly_mmd
    except ImportError as e:
        raise ImportError(f"KID needs torchmetrics: {_EXTRA}") from e
    f1, f2 = as_features(f_real, "KID reference features"), as_features(f_fake, "KID features")
    size = min(check_positive_int(subset_size, "subset_size"), len(f1), len(f2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 rows per set, got {len(f1)} and {len(f2)}")
    g = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(check_positive_int(subsets, "subsets")):
        a = f1[torch.randperm(len(f1), generator=g)[:size]]
        b = f2[torch.randperm(len(f2), generator=g)[:size]]
        vals.append(poly_mmd(a.to(device), b.to(device)).cpu() if device is not None else poly_mmd(a, b))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))


def inception_score(p_sum, plogp, counts) -> tuple:
    """IS from per-split sums: split s has ``counts[s]`` images, Σ p(y|x) = ``p_sum[s]`` (K,) and
    Σ_x Σ_y p log p = ``plogp[s]``; IS_s = exp(plogp_s / n_s − Σ_y p̄_y log p̄_y), p̄ = p_sum_s / n_s.
    Returns (mean, std) over the non-empty splits (std unbiased, as torchmetrics; 0 for one)."""
    vals = []
    for s, n in enumerate(np.asarray(counts)):
        if n == 0:
            continue
        pbar = p_sum[s] / int(n)
        ent = (pbar * pbar.clamp(min=1e-300).log()).sum()
        vals.append(torch.exp(plogp[s] / int(n) - ent))
    v = torch.stack(vals)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def feature_stats(images, extractor: Callable, *, batch_size: int = FID_DEFAULTS["batch_size"], device=None,
                  max_samples: Optional[int] = None, keep: int = FID_DEFAULTS["keep"],
                  splits: int = FID_DEFAULTS["splits"], progress: Optional[Callable] = None,
                  name: str = "images") -> FeatureStats:
    """Stream ``images`` (anything :func:`cdp_fast.data.open_images` opens) through
    ``extractor`` ``batch_size`` images at a time: the extractor takes float32 (B, C, H, W) in
    [0, 1] on ``device`` and returns features (B, d), or (features, logits (B, K)) for IS.
    ``progress(done, total)`` is called after each batch. Memory: one batch plus O(d²)."""
    src = open_images(images, name)
    n = len(src) if max_samples is None else min(len(src), check_positive_int(max_samples, "max_samples"))
    st = FeatureStats(keep=keep, splits=splits)
    bs = check_positive_int(batch_size, "batch_size")
    with torch.no_grad():
        for lo in range(0, n, bs):
            x = src.read(slice(lo, min(n, lo + bs))).float()
            out = extractor(x.to(device) if device is not None else x)
            feats, logits = out if isinstance(out, (tuple, list)) else (out, None)
            st.update(feats, logits)
            if progress is not None:
                progress(min(n, lo + bs), n)
    return st


def load_reference_stats(path):
    """(mu (d,), sigma (d, d)) float64 from an npz with keys ``mu`` and ``sigma`` (EDM's
    ``cifar10-32x32.npz``, :meth:`FeatureStats.save`), or None when ``path`` is not such a file."""
    p = os.fspath(path)
    if not (os.path.isfile(p) and p.endswith(".npz")):
        return None
    try:
        keys = npz_keys(p)
    except Exception:   # not a zip: not a statistics file (the image loaders will say why)
        return None
    if not {"mu", "sigma"} <= set(keys):
        return None
    with np.load(p, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{p}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    return mu, sigma


def fid(samples, ref, *, extractor: Optional[Callable] = None, weights=None, device=None,
        batch_size: int = FID_DEFAULTS["batch_size"], max_samples: Optional[int] = None,
        kid_subsets: int = FID_DEFAULTS["kid_subsets"], kid_subset_size: int = FID_DEFAULTS["kid_subset_size"],
        progress: Optional[Callable] = None) -> dict:
    """FID, KID and IS of ``samples`` against ``ref``.

    Args:
        samples: the generated set (anything :func:`cdp_fast.data.open_images` opens: an out
            folder, an npz, Samples, uint8 NHWC or float NCHW [0, 1] images).
        ref: the reference: a statistics npz (keys ``mu``, ``sigma``: FID only, no KID), a
            :class:`FeatureStats`, or a real image set (as ``samples``).
        extractor: features (and logits) from float32 (B, C, H, W) [0, 1] images; None =
            Inception-v3 pool3 (2048) and logits (:func:`~cdp_fast.metrics.inception.inception_v3`,
            loaded from ``weights``: a path, None for $CDP_FAST_FID_WEIGHTS or the torch hub
            cache, ``"download"`` to fetch it).
        max_samples: first N of each image set only. kid_*: see :func:`kernel_distance`.
        progress: ``progress(what, done, total)`` after each batch (what: "samples" / "ref").
    Returns: {"fid", "kid_mean", "kid_std" (None against a statistics file), "is_mean", "is_std"
        (None without logits), "n_samples", "n_ref", "features": the extractor's description}.
    Raises: FileNotFoundError (one line, how to get them) for missing Inception weights;
        ImportError naming the ``[fid]`` extra; ValueError for images the adapter refuses or
        statistics of another dimension.
    """
    if extractor is None:
        from cdp_fast.metrics.inception import inception_v3

        extractor = inception_v3(weights, device=device)
    kw = dict(batch_size=batch_size, device=device, max_samples=max_samples)

    def prog(what):
        return None if progress is None else (lambda done, total: progress(what, done, total))

    stats = load_reference_stats(ref) if isinstance(ref, (str, os.PathLike)) else None
    ref_st = ref if isinstance(ref, FeatureStats) else None
    if stats is None and ref_st is None:
        ref_st = feature_stats(ref, extractor, progress=prog("ref"), name="ref", **kw)
    st = feature_stats(samples, extractor, progress=prog("samples"), name="samples", **kw)
    mu_r, sig_r = stats if stats is not None else (ref_st.mu, ref_st.sigma)
    if len(mu_r) != st.dim:
        raise ValueError(f"ref: statistics of {len(mu_r)} features, the extractor gives {st.dim}")
    out = {"fid": frechet_distance(st.mu, st.sigma, mu_r, sig_r), "kid_mean": None, "kid_std": None,
           "is_mean": None, "is_std": None, "n_samples": st.n, "n_ref": None if ref_st is None else ref_st.n,
           "features": getattr(extractor, "description", None) or type(extractor).__name__}
    if ref_st is not None:
        out["kid_mean"], out["kid_std"] = kernel_distance(ref_st.kept(), st.kept(), kid_subsets, kid_subset_size,
                                                           device=device)
    if st.inception_score() is not None:
        out["is_mean"], out["is_std"] = st.inception_score()
    return out
