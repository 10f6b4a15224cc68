"""Contrastive guidance λ∇_{x_t}ℓ for guided sampling (Contrastive-DP, Algorithm 1, line 6),
with the pair strategies of App. C.1, the online embedding head ("with embedding", App. D.1)
and the paper's default hyper-parameters.

:class:`ContrastiveGuidance` is a callable ``guidance(x_t, t, eps, step) -> (g, λ) | None``,
the protocol of :func:`cdp_fast.guided_ddim`; it keeps the features of the previous step
(the "previous" positive) between calls, so one instance follows one batch trajectory:
call :meth:`ContrastiveGuidance.reset` before the next one (:func:`cdp_fast.sample` does).
"""
from __future__ import annotations

import math

import torch

from cdp_fast import losses
from cdp_fast.schedule import as_alphas_cumprod
from cdp_fast.seeding import sample_seed

__all__ = ["ContrastiveGuidance", "MLPHead", "check_options", "DEFAULTS", "LOSSES", "POSITIVES", "NEGATIVES"]

#: Paper defaults (App. D.1: CIFAR-10, WRN-28-10 features, 200 quadratic steps, batch 512).
#: λ and τ are tied to the feature extractor's scale: re-tune them for other features.
DEFAULTS = {
    "infonce": {"tau": 0.1, "lam": 20_000.0},
    "hnm": {"tau": 10.0, "lam": 100_000.0, "tau_plus": 0.1, "beta": 1.0},
}
LOSSES = ("infonce", "hnm")
POSITIVES = ("previous", "real")
NEGATIVES = ("batch", "real", "class")


class MLPHead(torch.nn.Module):
    """The paper's "with embedding" head (App. D.1): 2 layers, d -> 128 -> 128."""

    def __init__(self, d, hidden=128, out=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, out))

    def forward(self, z):
        return self.net(z)


def _number(name, v, *, lo=None, lo_open=False, hi=None, hi_open=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo))
    ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{name} must be a finite number {' and '.join(s for s in (lo_s, hi_s) if s)}, "
                         f"got {v!r}")


def check_options(*, positive="previous", negatives="batch", embedding=None, guide_window=None):
    """ValueError naming the argument unless the pair strategies, the head and the window are
    valid values (shared by :class:`ContrastiveGuidance` and :func:`cdp_fast.sample`)."""
    if positive not in POSITIVES:
        raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if embedding not in (None, "mlp"):
        raise ValueError(f"embedding must be None or 'mlp', got {embedding!r}")
    if guide_window is not None and not (
            isinstance(guide_window, (tuple, list)) and len(guide_window) == 2
            and all(isinstance(v, (int, float)) for v in guide_window)
            and guide_window[0] <= guide_window[1]):
        raise ValueError(f"guide_window must be (t_lo, t_hi) with t_lo <= t_hi, got {guide_window!r}")


class ContrastiveGuidance:
    """λ∇_{x_t}ℓ_contra for Algorithm 1, with the pair strategies of App. C.1.

    Per step: anchors a = e(x_t) with e = head∘f (f = ``features`` or flattened pixels;
    ``head`` = identity or the online MLP), positives p = e(x_{t+1}) of the same sample
    (``positive="previous"``, detached; at the first guided step the anchor itself,
    detached) or e(real image assigned to the sample) (``"real"``); negatives the other batch
    samples (``"batch"``), a real bank (``"real"``) or the other-class batch samples
    (``"class"``: classes from ``class_labels``, else the argmax of ``labeler`` on the current
    x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, clamped to [-1, 1] for images). Returns (∇_{x_t}ℓ, λ), or
    None outside ``guide_window`` (t_lo <= t <= t_hi) or when λ = 0.

    ``embedding="mlp"``: the head is initialised from ``seed`` at the first guided step of a
    trajectory and trained by one Adam step (lr 1e-2, as the authors' code) on the same loss
    per guided step. :meth:`reset` starts a new trajectory with a fresh head (keeping sample i
    a function of (seed, i) and resume exact).

    Args:
        loss: "hnm" or "infonce". lam: λ >= 0. tau: τ > 0. tau_plus: τ⁺ ∈ [0, 1) and beta:
            β >= 0 (HNM only).
        features: f: (B, *shape) in [-1, 1] -> (B, d), differentiable; None = pixels.
        embedding: None or "mlp". positive: "previous" | "real". negatives: "batch" | "real"
            | "class".
        real: (N, *shape) real images in [-1, 1] for the "real" modes.
        labeler: x -> logits (B, K), for negatives="class" without class labels.
        guide_window: (t_lo, t_hi) or None (every step).
        alphas_cumprod: the ᾱ table (needed for negatives="class" with a labeler).
        seed: head initialisation. feature_batch: rows per call of f on the real bank.

    Examples:
        >>> g = ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0)
        >>> x0 = cdp_fast.guided_ddim(model, x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)
    """

    def __init__(self, *, loss, lam, tau, tau_plus=0.1, beta=1.0, features=None, embedding=None,
                 positive="previous", negatives="batch", real=None, labeler=None,
                 guide_window=None, alphas_cumprod=None, seed=0, feature_batch=512):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        _number("lam", lam, lo=0)
        _number("tau", tau, lo=0, lo_open=True)
        _number("tau_plus", tau_plus, lo=0, hi=1, hi_open=True)
        _number("beta", beta, lo=0)
        check_options(positive=positive, negatives=negatives, embedding=embedding,
                      guide_window=guide_window)
        if (positive == "real" or negatives == "real") and not (isinstance(real, torch.Tensor) and len(real)):
            raise ValueError(f"real images are required for positive={positive!r} / negatives={negatives!r}")
        self.loss, self.lam, self.tau = loss, float(lam), float(tau)
        self.tau_plus, self.beta = float(tau_plus), float(beta)
        self.features, self.embedding = features, embedding
        self.positive, self.negatives = positive, negatives
        self.real, self.labeler, self.guide_window, self.seed = real, labeler, guide_window, seed
        self.abar = None if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
        self.feature_batch = feature_batch
        self._real_raw = None            # f(real), computed once
        self.reset()

    def reset(self, class_labels=None, real_positive_index=None):
        """Start a new batch trajectory.

        Args:
            class_labels: (B,) classes of the batch's samples for negatives="class" (else the
                labeler classifies the current x̂_0).
            real_positive_index: (B,) row of ``real`` that is each sample's positive
                (positive="real"); default: sample j's positive is real[j % N].
        """
        self.class_labels = class_labels
        self.real_positive_index = real_positive_index
        self._prev_raw = None            # f(x_{t+1}) of the last guided step
        self._prev_x = None              # x_{t+1} when the last step was not guided
        self._head = None                # the online MLP, created at the first guided step
        self._opt = None

    # f: x -> (B, d)
    def _f(self, x):
        if self.features is None:
            return x.flatten(1)
        z = self.features(x)
        if z.dim() != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(f"features must map (B, ...) to (B, d); got {tuple(z.shape)}")
        return z

    def _real_features(self, device):
        if self._real_raw is None:
            real = self.real.to(device, torch.float32)
            with torch.no_grad():
                self._real_raw = torch.cat([self._f(real[i:i + self.feature_batch]).float()
                                            for i in range(0, len(real), self.feature_batch)])
        return self._real_raw

    def _ensure_head(self, d, device):
        if self.embedding == "mlp" and self._head is None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(sample_seed(self.seed, -1))  # head init: a function of seed only
            self._head = MLPHead(d).to(device)
            torch.random.set_rng_state(gen_state)
            self._opt = torch.optim.Adam(self._head.parameters(), lr=1e-2)

    def _embed(self, raw):
        return raw if self._head is None else self._head(raw)

    def _positive_raw(self, x, raw):
        if self.positive == "real":
            idx = self.real_positive_index
            if idx is None:
                idx = torch.arange(len(x), device=x.device) % len(self.real)
            return self._real_features(x.device)[idx]
        if self._prev_raw is not None:
            return self._prev_raw
        if self._prev_x is not None:
            return self._f(self._prev_x).float()
        return raw.detach()

    def _labels(self, x, t, eps):
        if self.class_labels is not None:
            return self.class_labels
        if self.labeler is None:
            raise ValueError("negatives='class' needs class labels (reset(class_labels=...)) or a labeler")
        if self.abar is None:
            raise ValueError("negatives='class' with a labeler needs alphas_cumprod (to form x̂_0)")
        a_t = float(self.abar[t])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if x0.dim() == 4:  # images: the labeler's input range
            x0 = x0.clamp(-1, 1)
        return self.labeler(x0).argmax(1)

    def __call__(self, x, t, eps, step):
        in_window = self.guide_window is None or (self.guide_window[0] <= t <= self.guide_window[1])
        if not in_window or self.lam == 0:
            self._prev_raw = None
            self._prev_x = x.detach()
            return None
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            raw = self._f(x_in).float()
            self._ensure_head(raw.shape[1], x.device)
            anchor = self._embed(raw)
            with torch.no_grad():
                pos = self._embed(self._positive_raw(x, raw))
                cand = self._embed(self._real_features(x.device)) if self.negatives == "real" else None
                labels = self._labels(x, t, eps) if self.negatives == "class" else None
            if self.loss == "hnm":
                ell = losses.hnm_loss(anchor, pos, cand, tau=self.tau, tau_plus=self.tau_plus,
                                      beta=self.beta, anchor_labels=labels)
            else:
                ell = losses.infonce_loss(anchor, pos, cand, tau=self.tau, anchor_labels=labels)
            if self._head is not None:
                params = list(self._head.parameters())
                grads = torch.autograd.grad(ell, [x_in] + params)
                g = grads[0]
                for p_, g_ in zip(params, grads[1:]):
                    p_.grad = g_
                self._opt.step()
                self._opt.zero_grad(set_to_none=True)
            else:
                g = torch.autograd.grad(ell, x_in)[0]
        self._prev_raw = raw.detach()
        self._prev_x = x.detach()
        return g, self.lam
