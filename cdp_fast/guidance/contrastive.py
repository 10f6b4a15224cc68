"""Contrastive guidance λ∇_{x_t}ℓ for guided sampling (Contrastive-DP, Algorithm 1, line 6),
with the pair strategies of App. C.1, the online embedding head ("with embedding", App. D.1),
the authors' loss forms and the paper's default hyper-parameters.

:class:`ContrastiveGuidance` is a callable ``guidance(x_t, t, eps, step) -> (g, λ) | None``,
the protocol of :func:`cdp_fast.guided_ddim`; it keeps the features of the previous step
(the "previous" positive) between calls, so one instance follows one batch trajectory:
call :meth:`ContrastiveGuidance.reset` before the next one (:func:`cdp_fast.sample` does).

Faithful to the paper and the authors' code (YiDongOuYang/Contrastive-Guided-Diffusion-Process;
file names below are in that repository):

- λ∇ℓ is added to the ε-prediction (Algorithm 1 line 6; ``ddim-main-contrast/functions/
  denoising.py``: ``et += delta``), and the gradient is taken with respect to x_t only.
- ``form="authors"`` (the default with in-batch negatives): HNM is the symmetric 2B-row loss of
  ``adv_training/hard_negative_sample.py`` (rows e(x_t) and e(x_{t+1}); each row's negatives the
  other 2B − 2 rows; mean over 2B rows; the code's clamps) — :func:`cdp_fast.guidance.losses.
  hnm_loss_symmetric`; InfoNCE is ``adv_training/infonce.py`` (queries e(x_t) against the keys
  e(x_{t+1}) of the batch) — :func:`cdp_fast.guidance.losses.infonce_loss_keys`. The paper's λ values
  (App. D.1) mean these forms. ``form="anchors"`` is the earlier form of this package: B
  anchors e(x_t), negatives the other e(x_t), the positive detached. Its gradient has the
  same direction as the authors' HNM but about (2B−1)/B ≈ 2× the norm when the push-apart
  term dominates (the linearised gradients at τ = 10 differ by exactly that factor on the
  repulsion and by ~1 on the attraction), so the same λ guides about twice as hard: measured
  on the digits features at sampler states (B = 128, benchmarks/fidelity.py), cosine
  0.998-1.000 and norm ratio 1.99-2.06 for HNM, cosine 0.99 and ratio 1.83-1.88 for InfoNCE.
- With mean reduction the per-sample gradient scales as 1/B: λ is tied to the batch size
  (the paper's B = 512 for CIFAR-10, 128 for MNIST / GTSRB).
- The head (``embedding="mlp"``) is the code's ``EmbeddingModel``: Linear(d, 128), ReLU,
  Linear(128, 128), L2-normalised (the loss normalises), Adam lr 1e-2, one step per guided
  step after the guidance gradient is read, trained through both e(x_t) and e(x_{t+1}) in
  the authors' form. The authors create it once and keep it for the whole run; here it is
  created at the start of every *shard* of a :func:`cdp_fast.sample` run and carried through
  that shard's batches (``reset(keep_head=True)``), which keeps resume exact and the output
  independent of the number of processes. ``embedding=h`` (an int) is the same head d -> h -> h:
  their MNIST / GTSRB code uses ``EmbeddingModel(input_size=100, output_size=64)``
  (``minimal-diffusion-main/contrastive/contrastive_loss_mnist.py:34``), i.e. ``embedding=64``.
- The authors skip the first step of a trajectory (no x_{t+1} yet: ``len(xs) >= 2``) and, on
  CIFAR-10, guide only t >= 400 (``i >= 400``; their MNIST / GTSRB code guides 50 < t < 150);
  the paper's Algorithm 1 guides every step. The window is chosen by :func:`cdp_fast.sample`
  (``guide_window="auto"``); this class guides every step unless given a window.
"""
from __future__ import annotations

import math
import os

import torch

from cdp_fast.guidance import losses
from cdp_fast.guidance.options import (LOSSES, MLPHead, check_options, head_width, resolve_embedding,
                                       resolve_form)
from cdp_fast.utils.checks import check_number
from cdp_fast.diffusion.schedule import as_alphas_cumprod
from cdp_fast.utils.seeding import sample_seed

__all__ = ["ContrastiveGuidance"]


class ContrastiveGuidance:
    """λ∇_{x_t}ℓ_contra for Algorithm 1, with the pair strategies of App. C.1 (see the module
    docstring for the sources of every choice).

    Per step, with e = head∘f (f = ``features`` or flattened pixels; head = identity or the
    online MLP): z = e(x_t); the positives w = e(x_{t+1}) of the same samples
    (``positive="previous"``) or e(the real image assigned to each sample) (``"real"``);
    negatives the other batch rows (``"batch"``), a real bank (``"real"``) or the other-class
    batch rows (``"class"``: classes from ``class_labels``, else the argmax of ``labeler`` on
    the current x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, clamped to [-1, 1] for images). The loss:
    ``form="authors"``: :func:`cdp_fast.guidance.losses.hnm_loss_symmetric` /
    :func:`cdp_fast.guidance.losses.infonce_loss_keys` on (z, w); with positive="previous" the first
    step of a trajectory is not guided (no x_{t+1} yet). ``form="anchors"``:
    :func:`cdp_fast.guidance.losses.hnm_loss` / ``infonce_loss`` with anchors z, the positives detached
    (at the first step the anchor itself) and candidates the other anchors or the bank.
    Returns (∇_{x_t}ℓ, λ), or None outside ``guide_window`` (t_lo <= t <= t_hi), at an
    unguided first step, or when λ = 0.

    ``embedding="mlp"`` (or an int width): the head is initialised from ``seed`` at the first
    guided step after a :meth:`reset` that does not keep it, and trained by one Adam step
    (lr 1e-2) on the same loss per guided step.

    ``strength``: per guided step of the current trajectory, (t, mean, max) over the batch of
    λ‖∇ℓ_i‖/‖ε_i‖ (0-dim tensors), so a user sees whether λ is in a sane range; cleared by
    :meth:`reset`.

    Args:
        loss: "hnm" or "infonce". lam: λ >= 0. tau: τ > 0. tau_plus: τ⁺ ∈ [0, 1) and beta:
            β >= 0 (HNM only).
        features: f: (B, *shape) in [-1, 1] -> (B, d), differentiable; None = pixels.
        embedding: "auto" (the head for HNM, none for InfoNCE: :func:`resolve_embedding`),
            None, "mlp" (d -> 128 -> 128) or a positive int h (d -> h -> h; 128 is "mlp" and is
            kept as "mlp" in ``self.embedding``). positive: "previous" | "real". negatives:
            "batch" | "real" | "class".
        form: None (the authors', or "anchors" with a real bank: :func:`resolve_form`),
            "authors" or "anchors".
        real: (N, *shape) real images in [-1, 1] for the "real" modes.
        labeler: x -> logits (B, K), for negatives="class" without class labels.
        guide_window: (t_lo, t_hi) or None (every step).
        alphas_cumprod: the ᾱ table (needed for negatives="class" with a labeler).
        seed: head initialisation. feature_batch: rows per call of f on the real bank.

    Examples:
        >>> g = ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0)
        >>> x0 = cdp_fast.guided_ddim(model, x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)
    """

    def __init__(self, *, loss, lam, tau, tau_plus=0.1, beta=1.0, features=None, embedding="auto",
                 positive="previous", negatives="batch", real=None, labeler=None,
                 guide_window=None, alphas_cumprod=None, seed=0, feature_batch=512, form=None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        check_number("lam", lam, lo=0)
        check_number("tau", tau, lo=0, lo_open=True)
        check_number("tau_plus", tau_plus, lo=0, hi=1, hi_open=True)
        check_number("beta", beta, lo=0)
        check_options(positive=positive, negatives=negatives, embedding=embedding,
                      guide_window=guide_window, form=form)
        if (positive == "real" or negatives == "real") and not (isinstance(real, torch.Tensor) and len(real)):
            raise ValueError(f"real images are required for positive={positive!r} / negatives={negatives!r}")
        self.loss, self.lam, self.tau = loss, float(lam), float(tau)
        self.tau_plus, self.beta = float(tau_plus), float(beta)
        self.features, self.embedding = features, resolve_embedding(embedding, loss)
        self.form = resolve_form(form, negatives)
        self.positive, self.negatives = positive, negatives
        self.real, self.labeler, self.guide_window, self.seed = real, labeler, guide_window, seed
        self.abar = None if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
        self.feature_batch = feature_batch
        self.capturable_head = False     # the head's Adam made capturable (cdp_fast.sampling.graphs)
        self._real_raw = None            # f(real), computed once
        self._head = None                # the online MLP, created at the first guided step
        self._opt = None
        self.reset()

    def reset(self, class_labels=None, real_positive_index=None, keep_head=False):
        """Start a new batch trajectory.

        Args:
            class_labels: (B,) classes of the batch's samples for negatives="class" (else the
                labeler classifies the current x̂_0).
            real_positive_index: (B,) row of ``real`` that is each sample's positive
                (positive="real"); default: sample j's positive is real[j % N].
            keep_head: carry the online head (and its optimiser state) into this trajectory,
                as the authors' code carries one head through a run; False re-initialises it
                from ``seed`` at the next guided step.
        """
        self.class_labels = class_labels
        self.real_positive_index = real_positive_index
        self.strength = []               # (t, mean, max) of λ‖∇ℓ‖/‖ε‖ per guided step (tensors)
        self._prev_raw = None            # f(x_{t+1}) of the last guided step
        self._prev_x = None              # x_{t+1} when the last step was not guided
        if not keep_head:
            self._head = None
            self._opt = None

    def begin(self, x_T=None, indices=None, class_labels=None, real_positive_index=None):
        """Deprecated (the earlier hidden set-up call): use :meth:`reset`. ``x_T`` and
        ``indices`` are ignored, as they were."""
        import warnings

        warnings.warn("ContrastiveGuidance.begin() is deprecated: use reset()", DeprecationWarning,
                      stacklevel=2)
        self.reset(class_labels=class_labels, real_positive_index=real_positive_index)

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
        width = head_width(self.embedding)
        if width is not None and self._head is None:
            # head init: a function of the seed only, from a generator of its own
            gen = torch.Generator().manual_seed(sample_seed(self.seed, -1))
            self._head = MLPHead(d, hidden=width, out=width, generator=gen).to(device)
            # capturable (set by cdp_fast.sampling.graphs.StepGraph, CUDA only): the step count lives on
            # the device, so a captured guided step replays the Adam update with the right bias
            # correction; otherwise the plain Adam (its bias correction on the host, in fp64)
            capturable = self.capturable_head and torch.device(device).type == "cuda"
            self._opt = torch.optim.Adam(self._head.parameters(), lr=1e-2, capturable=capturable)
            if capturable:   # its first steps run uncaptured by design: no "impairs performance" warning
                self._opt._warned_capturable_if_run_uncaptured = True

    def _embed(self, raw):
        return raw if self._head is None else self._head(raw)

    def _positive_raw(self, x):
        """f of the positives, (B, d) detached; None when there is none yet (no x_{t+1}: the
        first guided step of a trajectory)."""
        if self.positive == "real":
            idx = self.real_positive_index
            if idx is None:
                idx = torch.arange(len(x), device=x.device) % len(self.real)
            return self._real_features(x.device)[idx]
        if self._prev_raw is not None:
            return self._prev_raw
        if self._prev_x is not None:
            return self._f(self._prev_x).float()
        return None

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

    def _loss(self, z, w, cand, labels):
        if self.form == "authors":
            if self.loss == "hnm":
                return losses.hnm_loss_symmetric(z, w, tau=self.tau, tau_plus=self.tau_plus, beta=self.beta,
                                                 labels=labels)
            return losses.infonce_loss_keys(z, w, tau=self.tau, labels=labels)
        if self.loss == "hnm":
            return losses.hnm_loss(z, w, cand, tau=self.tau, tau_plus=self.tau_plus, beta=self.beta,
                                   anchor_labels=labels)
        return losses.infonce_loss(z, w, cand, tau=self.tau, anchor_labels=labels)

    # ------------------------------------------------------------------ capturable guidance
    # The protocol :class:`cdp_fast.sampling.graphs.StepGraph` drives (and nothing else outside
    # this class reads its state): a steady step is ``device_step`` on static buffers, followed
    # by ``record``; ``prev_features``, ``head`` and ``settings_key()`` say what a capture bakes
    # in; ``make_capturable()`` asks for a head whose optimiser can be captured.

    @property
    def prev_features(self):
        """f(x_{t+1}) of the last guided step, (B, d) fp32 detached, or None: the next step's
        "previous" positives."""
        return self._prev_raw

    @property
    def head(self):
        """The online embedding head (an :class:`MLPHead`) of the current trajectory, or None
        (no head, or not made yet: it is made at the first guided step)."""
        return self._head

    def settings_key(self) -> tuple:
        """What a captured guided step bakes in from this object (a replay reads none of it
        again): the loss, its form and hyper-parameters, the pair strategy, the identity of the
        networks and the real bank, the head's learning rates and the backend environment. A
        change of any of them means a new capture."""
        lrs = None if self._opt is None else tuple(grp["lr"] for grp in self._opt.param_groups)
        return (self.loss, self.form, self.lam, self.tau, self.tau_plus, self.beta, self.negatives,
                id(self.features), id(self.real), self.embedding, lrs,
                os.environ.get("CDP_FAST_BACKEND", "auto"), os.environ.get("CDP_FAST_AUTOTUNE", ""))

    def make_capturable(self) -> None:
        """Make the online head's Adam ``capturable`` on CUDA (its step count on the device, so a
        replayed step applies the right bias correction); takes effect when the next head is
        made. Without it the plain Adam keeps its bias correction on the host, in fp64."""
        self.capturable_head = True

    @property
    def graphable(self) -> bool:
        """Whether a steady guided step (in the window, λ > 0, the previous step's features as
        positives) does the same device work every step, with no host decision on data, so
        that :class:`cdp_fast.sampling.graphs.StepGraph` can capture it: positive="previous" and
        negatives "batch" or "real" (class negatives take per-batch labels or a labeler's
        argmax on x̂_0 at this step's ᾱ_t)."""
        return self.positive == "previous" and self.negatives in ("batch", "real") and self.lam != 0

    def in_window(self, t) -> bool:
        """Whether timestep ``t`` lies in ``guide_window`` (t_lo <= t <= t_hi; None: every t)."""
        return self.guide_window is None or (self.guide_window[0] <= t <= self.guide_window[1])

    def device_step(self, x, t, eps, pos_raw):
        """The device work of one guided step: raw = f(x) (B, d) fp32; ℓ on (e(x), e(positives))
        (``pos_raw`` None: the anchor form's first step, the anchor itself, detached); g = ∇_x ℓ
        (x only: the features' weights are frozen); one Adam step of the online head; and
        r = λ‖g_i‖/‖ε_i‖ (B,). No host decision depends on the data, so a CUDA graph can capture
        it (:class:`cdp_fast.sampling.graphs.StepGraph` does, with ``pos_raw`` a static buffer).
        Returns (g (B, *shape), raw detached (B, d), r (B,))."""
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            raw = self._f(x_in).float()
            if pos_raw is None:
                pos_raw = raw.detach()
            self._ensure_head(raw.shape[1], x.device)
            z = self._embed(raw)
            # the authors' head also learns from the x_{t+1} rows; the anchor form keeps its
            # positives fixed targets (Algorithm 1)
            with torch.set_grad_enabled(self.form == "authors" and self._head is not None):
                w = self._embed(pos_raw)
            with torch.no_grad():
                cand = self._embed(self._real_features(x.device)) if self.negatives == "real" else None
                labels = self._labels(x, t, eps) if self.negatives == "class" else None
            ell = self._loss(z, w, cand, labels)
            if self._head is not None:
                params = list(self._head.parameters())
                grads = torch.autograd.grad(ell, [x_in] + params, allow_unused=True)
                g = grads[0]
                for p_, g_ in zip(params, grads[1:]):
                    p_.grad = g_
                self._opt.step()
                self._opt.zero_grad(set_to_none=True)
            else:
                g = torch.autograd.grad(ell, x_in)[0]
        with torch.no_grad():
            # how hard this step pushes, relative to the model (kept as tensors: no host sync)
            r = self.lam * g.flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1).clamp_min(1e-12)
        return g, raw.detach(), r

    def __call__(self, x, t, eps, step):
        if step == 0:
            # a new trajectory: never pair x_T with the last state of the previous one (the
            # head, the labels and the real positives stay as reset() set them)
            self._prev_raw = self._prev_x = None
            self.strength = []
        if not self.in_window(t) or self.lam == 0:
            self._prev_raw = None
            self._prev_x = x.detach()
            return None
        with torch.no_grad():
            pos_raw = self._positive_raw(x)
        if pos_raw is None and self.form == "authors":
            # the authors' `len(xs) >= 2`: no x_{t+1} yet, so this step is not guided
            with torch.enable_grad():     # as the guided steps compute f (a compiled f runs with grad)
                self._prev_raw = self._f(x.detach().requires_grad_(True)).float().detach()
            self._prev_x = x.detach()
            return None
        g, raw, r = self.device_step(x, t, eps, pos_raw)
        self.record(x, t, raw, r)
        return g, self.lam

    def record(self, x, t, raw, r):
        """After a guided step at (x_t, t): its features ``raw`` (B, d) are the next step's
        positives, and its strength ratios ``r`` (B,) are summarised (as tensors: no host sync).
        Also called by :class:`cdp_fast.sampling.graphs.StepGraph` after a replay (``raw`` its buffer)."""
        self.strength.append((t, r.mean(), r.max()))
        self._prev_raw = raw
        self._prev_x = x.detach()
