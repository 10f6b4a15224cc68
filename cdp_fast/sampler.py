"""Contrastive-guided DDIM sampling: the pure loop, the guidance, and the streaming driver.

Implements Algorithm 1 of Ouyang, Xie & Cheng, "Improving Adversarial Robustness by
Contrastive Guided Diffusion Process" (Contrastive-DP): at every DDIM step

    Δ       = ε_θ(x_t, t) + λ ∇_{x_t} ℓ_contra(x_t, x_p; τ)        (Algorithm 1, line 6)
    x̂_0     = (x_t − √(1−ᾱ_t) Δ) / √ᾱ_t
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1−ᾱ_{t-1}−σ_t²) Δ + σ_t z           (DDIM eq. (12); line 7 at η=0)

with σ_t = η √((1−ᾱ_{t-1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t-1}) (Song et al. 2021, eq. (16)) and ℓ the
mean of the InfoNCE or HNM loss (cdp_fast.losses) over the batch's anchors.

Layout (STYLE.md habit 5): :func:`guided_ddim` is a pure function of (model, x_T, schedule,
guidance); :class:`ContrastiveGuidance` computes λ∇ℓ; :func:`sample` is the driver
(per-sample seeding, batching, labels, shards, resume) and never leaks into the loop.

Randomness: sample i draws its x_T, its η-noise and its "real" positive from a generator
seeded by (seed, i) alone. Without guidance, sample i is therefore the same for any
batch_size; with guidance, the contrastive batch is part of the method (the paper's m), so
samples are grouped into fixed batches [kB, (k+1)B) — the last one padded to B and cut — and
are identical for any shard size, process count, n ≥ i or interruption.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from cdp_fast import backend, losses
from cdp_fast.schedule import as_alphas_cumprod, make_alphas_cumprod, timesteps as make_timesteps

__all__ = ["sample", "guided_ddim", "ContrastiveGuidance", "DEFAULTS", "call_model", "sample_seed"]

#: Paper defaults (App. D.1: CIFAR-10, WRN-28-10 features, 200 quadratic steps, batch 512).
#: λ and τ are tied to the feature extractor's scale: re-tune them for other features.
DEFAULTS = {
    "infonce": {"tau": 0.1, "lam": 20_000.0},
    "hnm": {"tau": 10.0, "lam": 100_000.0, "tau_plus": 0.1, "beta": 1.0},
}
_LOSSES = (None, "none", "infonce", "hnm")
_POSITIVES = ("previous", "real")
_NEGATIVES = ("batch", "real", "class")
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- seeding
def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (splitmix64 mixing):
    a function of (seed, index) only."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _generators(seed, indices):
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def _per_sample_randn(gens, shape, device, dtype=torch.float32):
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]).to(device)


# ----------------------------------------------------------------------------- model adapter
def call_model(model, x, t, y=None):
    """ε-prediction of any model: ``model(x, t)`` or ``model(x, t, y)``; an output with a
    ``.sample`` attribute (diffusers ``UNet2DOutput``) or a tuple is unwrapped."""
    return _unwrap(model(x, t) if y is None else model(x, t, y))


def _unwrap(out):
    """The ε tensor of a model output: ``.sample`` (diffusers), the first of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _check_eps(eps, x, step, t):
    if not isinstance(eps, torch.Tensor):
        raise ValueError(f"model returned {type(eps).__name__} at step {step} (t={t}); expected a tensor")
    if eps.shape != x.shape:
        raise ValueError(
            f"model output at step {step} (t={t}) has shape {tuple(eps.shape)}, expected "
            f"{tuple(x.shape)} (the input's shape)")


# ----------------------------------------------------------------------------- pure loop
def guided_ddim(model, x_T, *, alphas_cumprod, timesteps, guidance=None, eta=0.0,
                generator=None, callback=None, y=None):
    """Guided DDIM (Algorithm 1 of Contrastive-DP; DDIM eq. (12) with Δ = ε + λ∇ℓ).

    Args:
        model: ε-model, ``model(x, t)`` (or ``model(x, t, y)`` when ``y`` is given).
        x_T: (B, *shape) starting noise.
        alphas_cumprod: (T,) ᾱ table (float; see cdp_fast.schedule).
        timesteps: (S,) descending LongTensor (cdp_fast.timesteps); after the last entry
            ᾱ_prev = 1; a repeated entry is skipped (its update is the identity).
        guidance: None, or a callable ``guidance(x_t, t, eps, step) -> (g, lam) | None``
            returning ∇_{x_t}ℓ and λ (e.g. :class:`ContrastiveGuidance`).
        eta: η ≥ 0; 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
        generator: for η > 0: a torch.Generator, or a sequence of B generators (one per
            sample: per-sample noise, drawn on CPU).
        callback: called as ``callback({"step", "t", "x", "x0", "eps"})`` after each step.
        y: optional (B,) class labels for class-conditional models.
    Returns:
        x_0, (B, *shape) float, model space (≈ [-1, 1]; not clipped).
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
    if ts.numel() < 1:
        raise ValueError("timesteps is empty")
    if (ts < 0).any() or (ts >= abar.numel()).any():
        raise ValueError(f"timesteps must lie in [0, {abar.numel() - 1}]")
    if (ts[1:] > ts[:-1]).any():
        raise ValueError("timesteps must be descending")
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    x = x_T
    B = x.shape[0]
    per_sample = generator is not None and not isinstance(generator, torch.Generator)
    if per_sample and len(generator) != B:
        raise ValueError(f"generator: got {len(generator)} generators for a batch of {B}")
    t_list = ts.tolist()
    bad = torch.zeros((), dtype=torch.long, device=x.device)  # first non-finite step + 1 (no host sync)
    for step, t in enumerate(t_list):
        t_prev = t_list[step + 1] if step + 1 < len(t_list) else -1
        if t_prev == t:  # repeated t (quadratic skip): ᾱ_prev = ᾱ_t makes the update the identity
            continue
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
        with torch.no_grad():
            eps = call_model(model, x, t_batch, y)
        _check_eps(eps, x, step, t)
        eps = eps.to(x.dtype)
        g, lam = None, 0.0
        if guidance is not None:
            res = guidance(x, t, eps, step)
            if res is not None:
                g, lam = res
        sigma = 0.0
        noise = None
        if eta > 0 and t_prev >= 0:
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
            if per_sample:
                noise = _per_sample_randn(generator, x.shape[1:], x.device, x.dtype)
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                    device="cpu" if generator is not None else x.device).to(x.device)
        finite = torch.isfinite(eps).all()
        if g is not None:
            finite = finite & torch.isfinite(g).all()
        bad = torch.where((bad == 0) & ~finite, torch.full_like(bad, step + 1), bad)
        with torch.no_grad():
            x_new, x0 = backend.ddim_update(x, eps, g, lam=float(lam), abar_t=a_t, abar_prev=a_prev,
                                            sigma=sigma, noise=noise, return_x0=callback is not None)
        if callback is not None:
            callback({"step": step, "t": t, "x": x_new, "x0": x0, "eps": eps})
        x = x_new
    bad_step = int(bad)  # the loop's only host sync
    if bad_step:
        s = bad_step - 1
        raise ValueError(f"model output or guidance gradient at step {s} (t={t_list[s]}) is not finite")
    return x


# ----------------------------------------------------------------------------- guidance
class _MLPHead(torch.nn.Module):
    """The paper's "with embedding" head (App. D.1): 2 layers, d -> 128 -> 128."""

    def __init__(self, d, hidden=128, out=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, out))

    def forward(self, z):
        return self.net(z)


class ContrastiveGuidance:
    """λ∇_{x_t}ℓ_contra for Algorithm 1, with the pair strategies of App. C.1.

    Per step: anchors a = e(x_t) with e = head∘f (f = ``features`` or flattened pixels;
    ``head`` = identity or the online MLP), positives p = e(x_{t+1}) of the same sample
    (``positive="previous"``, detached; at the first guided step the anchor itself,
    detached) or e(real image assigned to the sample) (``"real"``); negatives the other batch
    samples (``"batch"``), a real bank (``"real"``) or the other-class batch samples
    (``"class"``: classes from ``class_labels``, else the argmax of ``labeler`` on the current
    x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, clamped to [-1, 1]). Returns (∇_{x_t}ℓ, λ), or None outside
    ``guide_window``.

    ``embedding="mlp"``: the head is re-initialised from ``seed`` at the start of every batch
    trajectory (:meth:`begin`) and trained by one Adam step (lr 1e-2, as the authors' code)
    on the same loss per guided step. Re-initialising per batch (rather than carrying it
    across batches) keeps sample i a function of (seed, i) and makes resume exact.
    """

    def __init__(self, *, loss, lam, tau, tau_plus=0.1, beta=1.0, features=None, embedding=None,
                 positive="previous", negatives="batch", real=None, labeler=None,
                 guide_window=None, alphas_cumprod=None, seed=0, feature_batch=512):
        self.loss, self.lam, self.tau, self.tau_plus, self.beta = loss, float(lam), float(tau), float(tau_plus), float(beta)
        self.features, self.embedding = features, embedding
        self.positive, self.negatives = positive, negatives
        self.labeler, self.guide_window, self.seed = labeler, guide_window, seed
        self.abar = None if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
        self.real = real
        self.feature_batch = feature_batch
        self._real_raw = None
        self._head = None
        self._opt = None
        self.class_labels = None
        self._real_pos_idx = None

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
            real = self.real.to(device)
            with torch.no_grad():
                self._real_raw = torch.cat([self._f(real[i:i + self.feature_batch]).float()
                                            for i in range(0, len(real), self.feature_batch)])
        return self._real_raw

    def begin(self, x_T, indices, class_labels=None, real_positive_index=None):
        """Reset the per-trajectory state for a new batch (sample indices ``indices``)."""
        self._prev_raw = None
        self._prev_x = None
        self.class_labels = class_labels
        self._real_pos_idx = real_positive_index
        if self.embedding == "mlp":
            with torch.no_grad():
                d = self._f(x_T[:1]).shape[1]
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(sample_seed(self.seed, -1))  # head init: a function of seed only
            self._head = _MLPHead(d).to(x_T.device)
            torch.random.set_rng_state(gen_state)
            self._opt = torch.optim.Adam(self._head.parameters(), lr=1e-2)

    def _embed(self, raw):
        return raw if self._head is None else self._head(raw)

    def __call__(self, x, t, eps, step):
        in_window = self.guide_window is None or (self.guide_window[0] <= t <= self.guide_window[1])
        if not in_window or self.lam == 0:
            self._prev_raw = None
            self._prev_x = x.detach()
            return None
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            raw = self._f(x_in).float()
            anchor = self._embed(raw)
            with torch.no_grad():
                if self.positive == "real":
                    pos_raw = self._real_features(x.device)[self._real_pos_idx]
                elif self._prev_raw is not None:
                    pos_raw = self._prev_raw
                elif getattr(self, "_prev_x", None) is not None:
                    pos_raw = self._f(self._prev_x).float()
                else:
                    pos_raw = raw.detach()
                pos = self._embed(pos_raw)
                cand = None
                if self.negatives == "real":
                    cand = self._embed(self._real_features(x.device))
                labels = None
                if self.negatives == "class":
                    if self.class_labels is not None:
                        labels = self.class_labels
                    else:
                        a_t = float(self.abar[t])
                        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                        if x0.dim() == 4:  # images: the labeler's input range
                            x0 = x0.clamp(-1, 1)
                        labels = self.labeler(x0).argmax(1)
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


# ----------------------------------------------------------------------------- compile
_FROZEN_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_fingerprint(model: torch.nn.Module):
    """(storage, version, Σw, Σw²) of every parameter and buffer: changes when a weight does.

    The version counter catches in-place updates (optimizer steps, ``load_state_dict``); the
    sums catch writes through ``.data``, which bypass it.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors:
        return ()
    with torch.no_grad():
        sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors
                            if t.is_floating_point()] or [torch.zeros(2, dtype=torch.float64)])
    return (tuple((t.data_ptr(), t._version) for t in tensors), tuple(sums.flatten().tolist()))


def _compile_frozen(model):
    """``torch.compile`` for CPU inference with inductor "freezing" on.

    Freezing folds the weights into the graph as constants and prepacks the convolutions for
    oneDNN with fused pointwise epilogues. Digits UNet, batch 128, 1 thread, forward
    (interleaved runs): 51-66 ms eager, ~55 ms compiled, 38-45 ms compiled + frozen, with or
    without channels_last (so the caller's module is left in its own layout). Compiling takes ~16 s instead of ~4 s (frozen
    graphs skip inductor's cache); it is paid once per process and shape.

    Frozen constants do not follow later in-place weight changes, and dynamo's guards would
    reuse the stale graph. So the weights' fingerprint is kept per module: if it changed since
    the module was last compiled here, the compile caches are reset (``torch.compiler.reset``)
    and the module is compiled afresh. Callables that are not modules compile without freezing.
    """
    if not isinstance(model, torch.nn.Module):
        return torch.compile(model)
    fp = _weights_fingerprint(model)
    prev = _FROZEN_WEIGHTS.get(model)
    if prev is not None and prev != fp:
        torch.compiler.reset()
    _FROZEN_WEIGHTS[model] = fp
    compiled = torch.compile(model)
    from torch._inductor import config as inductor_config

    def run(*args):
        # The global option, scoped to this call: torch.compile(options={"freezing": True})
        # does not reach the freezing pass (checked on torch 2.13: convolutions stay unfused).
        with inductor_config.patch(freezing=True):
            return compiled(*args)
    return run


def _compile_cuda_graphs(model):
    """``torch.compile(mode="reduce-overhead")`` for CUDA: the fixed-shape ε-model call is
    captured once per batch shape as a CUDA graph and replayed every step, so a step launches
    one graph instead of hundreds of kernels.

    CUDA-graph outputs live in a static pool that the next replay overwrites; the loop keeps ε
    past that point only through the callback, so the output is copied out (one (B, C, H, W)
    copy per step) and each call is marked as a new step. A model that cannot be captured
    (CPU tensors, data-dependent shapes) runs compiled without graphs: torch falls back with a
    warning. Written for the GPU path and not yet run on a GPU (tests/test_sampler.py has a
    gpu-marked check against ``compile=False``).
    """
    compiled = torch.compile(model, mode="reduce-overhead")

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = _unwrap(compiled(*args))
        return out.clone() if isinstance(out, torch.Tensor) else out
    return run


# ----------------------------------------------------------------------------- validation
def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _validate(n, loss, lam, tau, tau_plus, beta, positive, negatives, real, class_labels, labeler,
              num_classes, batch_size, steps, eta, output, image_shape, embedding, guide_window,
              compile, shard_size, init_std=1.0):
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of None, 'none', 'infonce', 'hnm'; got {loss!r}")
    if positive not in _POSITIVES:
        raise ValueError(f"positive must be one of {_POSITIVES}, got {positive!r}")
    if negatives not in _NEGATIVES:
        raise ValueError(f"negatives must be one of {_NEGATIVES}, got {negatives!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if not (isinstance(image_shape, (tuple, list)) and len(image_shape) >= 1
            and all(_is_int(s) and s >= 1 for s in image_shape)):
        raise ValueError(f"image_shape must be a tuple of positive ints, got {image_shape!r}")
    if embedding not in (None, "mlp"):
        raise ValueError(f"embedding must be None or 'mlp', got {embedding!r}")
    if compile not in ("auto", True, False):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if shard_size is not None and (not _is_int(shard_size) or shard_size < 1):
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if class_labels is not None and len(class_labels) != n:
        raise ValueError(f"class_labels must hold n={n} labels, got {len(class_labels)}")
    if guide_window is not None:
        if not (isinstance(guide_window, (tuple, list)) and len(guide_window) == 2
                and all(isinstance(v, (int, float)) for v in guide_window)
                and guide_window[0] <= guide_window[1]):
            raise ValueError(f"guide_window must be (t_lo, t_hi) with t_lo <= t_hi, got {guide_window!r}")
    guided = loss in ("infonce", "hnm")
    if not guided:
        return
    if lam is not None and not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not (isinstance(tau_plus, (int, float)) and 0 <= tau_plus < 1):
        raise ValueError(f"tau_plus must lie in [0, 1), got {tau_plus!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if batch_size < 2 and negatives in ("batch", "class"):
        raise ValueError("batch_size must be >= 2 for a contrastive loss with in-batch negatives "
                         f"(negatives={negatives!r}); got batch_size={batch_size}")
    if (positive == "real" or negatives == "real"):
        if real is None:
            raise ValueError(f"real images are required for positive={positive!r} / negatives={negatives!r}")
        if not isinstance(real, torch.Tensor) or tuple(real.shape[1:]) != tuple(image_shape) or len(real) < 1:
            raise ValueError(f"real must be a tensor of shape (N, {', '.join(map(str, image_shape))}) "
                             f"in [-1, 1], got {tuple(getattr(real, 'shape', ()))}")
    if negatives == "class" and class_labels is None and labeler is None and num_classes is None:
        raise ValueError("negatives='class' needs class_labels, num_classes (a class-conditional "
                         "model) or a labeler to classify the current x0-prediction")


# ----------------------------------------------------------------------------- fingerprints
def _fingerprint(obj) -> str | None:
    """A content hash of a model/callable/tensor, so a resumed run can tell it changed."""
    if obj is None:
        return None
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str((tuple(obj.shape), str(obj.dtype))).encode())
        h.update(obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                 if obj.dtype != torch.bool else obj.cpu().numpy().tobytes())
        return h.hexdigest()[:16]
    if isinstance(obj, np.ndarray):
        h.update(np.ascontiguousarray(obj).tobytes())
        return h.hexdigest()[:16]
    if isinstance(obj, torch.nn.Module):
        h.update(type(obj).__qualname__.encode())
        for k, v in obj.state_dict().items():
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    mod = getattr(obj, "__module__", "")
    return f"{mod}.{name}"


# ----------------------------------------------------------------------------- driver
def _resolve_device(model, device):
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def _labels_from(labeler, x):
    with torch.no_grad():
        logits = labeler(x.clamp(-1, 1) if x.dim() == 4 else x).float()
    prob = torch.softmax(logits, dim=1)
    conf, lab = prob.max(dim=1)
    return lab.to(torch.int64), conf


def _generate_group(ctx, start, count):
    """Generate samples [start, start + count): returns (images (count, ...) tensor on CPU,
    labels or None, confidence or None). ``count`` may be < group size only for the last
    group; guided groups are always computed at full batch size and cut."""
    B = ctx["batch_size"]
    full = B if ctx["guided"] else count
    idx = list(range(start, start + full))
    gens = _generators(ctx["seed"], idx)
    shape = tuple(ctx["image_shape"])
    x_T = _per_sample_randn(gens, shape, ctx["device"])
    if ctx["init_std"] != 1.0:
        x_T = x_T * ctx["init_std"]
    if ctx.get("channels_last"):
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    y = None
    cls = None
    if ctx["class_labels"] is not None:
        cl = ctx["class_labels"]
        # padded rows (beyond n) reuse labels cyclically: they are discarded
        cls = torch.as_tensor(np.asarray([cl[i % len(cl)] for i in idx]), dtype=torch.long, device=ctx["device"])
    elif ctx["num_classes"] is not None:
        cls = torch.tensor([int(torch.randint(ctx["num_classes"], (1,), generator=g)) for g in gens],
                           dtype=torch.long, device=ctx["device"])
    if ctx["num_classes"] is not None:
        y = cls
    guidance = ctx["guidance"]
    if guidance is not None:
        real_pos = None
        if guidance.positive == "real":
            real_pos = torch.tensor([int(torch.randint(len(guidance.real), (1,), generator=g)) for g in gens],
                                    dtype=torch.long, device=ctx["device"])
        guidance.begin(x_T, idx, class_labels=cls if guidance.negatives == "class" else None,
                       real_positive_index=real_pos)
    autocast = ctx["autocast"]
    with autocast():
        x0 = guided_ddim(ctx["model"], x_T, alphas_cumprod=ctx["abar"], timesteps=ctx["ts"],
                         guidance=guidance, eta=ctx["eta"], generator=gens if ctx["eta"] > 0 else None,
                         y=y)
    x0 = x0[:count].float()
    labels = conf = None
    if ctx["labeler"] is not None:
        labels, conf = _labels_from(ctx["labeler"], x0)
        labels, conf = labels.cpu(), conf.cpu()
    elif cls is not None and ctx["num_classes"] is not None:
        labels = cls[:count].cpu()
    if ctx["output"] == "uint8":
        from cdp_fast.data import to_uint8_nhwc
        img = to_uint8_nhwc(x0).cpu()
    else:
        img = x0.cpu()
    return img, labels, conf


def _manifest_args(model, n, kw):
    """The arguments a resumed run must repeat, JSON-serialisable."""
    args = dict(kw)
    args["n"] = int(n)
    args["model"] = _fingerprint(model)
    for k in ("features", "labeler", "real", "class_labels", "alphas_cumprod"):
        args[k] = _fingerprint(args.get(k))
    args["image_shape"] = list(args["image_shape"])
    if args.get("guide_window") is not None:
        args["guide_window"] = list(args["guide_window"])
    if isinstance(args.get("betas"), torch.Tensor):
        args["betas"] = _fingerprint(args["betas"])
    return json.loads(json.dumps(args, default=str))


def sample(model, n, *, loss="hnm", features=None, embedding=None, guide_window=None, lam=None,
           tau=None, tau_plus=0.1, beta=1.0, positive="previous", negatives="batch", real=None,
           num_classes=None, class_labels=None, labeler=None, steps=200, skip="quadratic", eta=0.0,
           T=1000, betas="linear", alphas_cumprod=None, image_shape=(3, 32, 32), batch_size=512,
           out=None, shard_size=None, output="uint8", seed=0, device=None, dtype=None,
           compile="auto", progress=True, init_std=1.0):
    """Generate ``n`` Contrastive-DP samples (Algorithm 1), optionally streamed to disk.

    Args (DESIGN.md §3; shapes in brackets):
        model: ε-model ``model(x, t)`` [(B, *image_shape), (B,) long] -> ε, or
            ``model(x, t, y)`` when ``num_classes`` is set (class-conditional); outputs with
            ``.sample`` (diffusers) are unwrapped.
        n: number of samples (>= 1).
        loss: None/"none" (plain DDIM), "infonce" or "hnm".
        features: f: x_t [(B, *image_shape) in [-1, 1]] -> (B, d); None = flattened pixels.
        embedding: None or "mlp" (online 2-layer head, see :class:`ContrastiveGuidance`).
        guide_window: (t_lo, t_hi): guide only when t_lo <= t <= t_hi.
        lam, tau, tau_plus, beta: λ, τ, τ⁺, β. ``lam``/``tau`` None = the paper's default for
            ``loss`` (:data:`DEFAULTS`: InfoNCE τ=0.1, λ=2e4; HNM τ=10, τ⁺=0.1, β=1, λ=1e5 —
            tuned for CIFAR-10 WRN-28-10 features; other features need other values). λ=0 is
            plain DDIM.
        positive: "previous" (x_{t+1} of the same sample) or "real" (a real image per sample).
        negatives: "batch", "real" (the real bank) or "class" (other-class batch samples).
        real: (N, *image_shape) real images in [-1, 1] for the "real" modes.
        num_classes: class-conditional model: y_i ~ U{0..K-1} from (seed, i) unless
            ``class_labels`` gives them; the outputs are labelled y_i (unless ``labeler``).
        class_labels: (n,) per-sample classes (conditioning and/or "class" negatives).
        labeler: classifier x [(B, *image_shape) in [-1, 1]] -> logits (B, K); gives
            ``labels`` (argmax) and ``confidence`` (max softmax), and the classes of
            negatives="class" when no class_labels are given.
        steps, skip, eta, T, betas: DDIM sub-sequence (cdp_fast.timesteps), η, schedule.
        alphas_cumprod: a foreign ᾱ table (e.g. a diffusers scheduler's) instead of betas/T.
        image_shape: per-sample shape, e.g. (3, 32, 32) or (2,).
        batch_size: samples per model call and the contrastive batch m.
        out: directory for shards + manifest.json (resumes if present); memory then does not
            grow with n and the returned Samples is lazy.
        shard_size: samples per shard (a multiple of batch_size; default ~10k).
        output: "uint8" (NHWC for 3-D images) or "float" (model space).
        seed: run seed; sample i depends only on (seed, i) (and its batch, when guided).
        device, dtype: device (default: the model's); dtype bf16/fp16 runs the networks under
            autocast (the sampler state stays fp32).
        compile: "auto" (torch.compile on CUDA), True, or False. On CUDA the ε-model is
            compiled in channels_last (the caller's module is converted) with CUDA graphs
            (``mode="reduce-overhead"``); on CPU (``compile=True``) it is compiled with
            inductor freezing, left in its layout, and recompiled if its weights changed
            since the last call. The feature extractor stays eager. The first call pays the
            compile (~16 s for the digits UNet on CPU).
        progress: tqdm progress bar.
        init_std: x_T ~ N(0, init_std² I) (1 = the diffusion prior; App. C.2 also uses 2).
    Returns:
        :class:`cdp_fast.Samples`.

    Examples:
        >>> s = cdp_fast.sample(eps_model, 1000, loss="hnm", features=f, labeler=clf,
        ...                     out="gen/", batch_size=256)
        >>> s.save_npz("synthetic.npz")
    """
    if loss == "none":
        loss = None
    _validate(n, loss, lam, tau, tau_plus, beta, positive, negatives, real, class_labels, labeler,
              num_classes, batch_size, steps, eta, output, image_shape, embedding, guide_window,
              compile, shard_size, init_std)
    guided = loss is not None
    if guided:
        d = DEFAULTS[loss]
        lam = d["lam"] if lam is None else float(lam)
        tau = d["tau"] if tau is None else float(tau)
        guided = lam != 0
    if alphas_cumprod is not None:
        abar = as_alphas_cumprod(alphas_cumprod)
        T = abar.numel()
    else:
        abar = make_alphas_cumprod(betas, T)
    ts = make_timesteps(T, steps, skip)
    dev = _resolve_device(model, device)
    if out is not None:
        from cdp_fast import distributed

        if distributed.world_info()[1] > 1 and device is None and dev.type == "cuda":
            dev = distributed.local_device()  # one GPU per rank (LOCAL_RANK)
            model = model.to(dev) if isinstance(model, torch.nn.Module) else model
    if isinstance(model, torch.nn.Module):
        model.eval()
    run_model = model
    channels_last = False
    if compile is True or (compile == "auto" and dev.type == "cuda"):
        if dev.type == "cuda":
            # cuDNN convolutions (and bf16 tensor cores) prefer NHWC. Values are unchanged;
            # only the layout of the (caller's) module parameters changes.
            if isinstance(model, torch.nn.Module) and len(image_shape) == 3:
                model.to(memory_format=torch.channels_last)
                channels_last = True
            run_model = _compile_cuda_graphs(model)
        else:
            run_model = _compile_frozen(model)
        # The feature extractor is left eager: compiled forward+backward through it was slower
        # on the digits guidance (59 vs 71 img/s, CPU, 1 thread).
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype!r}")
    if dtype in (torch.bfloat16, torch.float16):
        def autocast():
            return torch.autocast(dev.type, dtype=dtype)
    else:
        import contextlib
        autocast = contextlib.nullcontext
    if shard_size is None:
        shard_size = batch_size * max(1, 10_000 // batch_size)
    if guided and shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size}) "
                         "when guiding, so contrastive batches do not straddle shards")
    guidance = None
    if guided:
        guidance = ContrastiveGuidance(
            loss=loss, lam=lam, tau=tau, tau_plus=tau_plus, beta=beta, features=features,
            embedding=embedding, positive=positive, negatives=negatives,
            real=None if real is None else real.to(dev, torch.float32), labeler=labeler,
            guide_window=guide_window, alphas_cumprod=abar, seed=seed)
    ctx = dict(model=run_model, batch_size=batch_size, guided=guided, seed=seed,
               image_shape=tuple(image_shape), device=dev, class_labels=class_labels,
               num_classes=num_classes, guidance=guidance, abar=abar, ts=ts, eta=float(eta),
               labeler=labeler, output=output, autocast=autocast, init_std=float(init_std),
               channels_last=channels_last)
    from tqdm.auto import tqdm

    from cdp_fast.data import Samples

    if out is None:
        imgs, labs, confs = [], [], []
        bar = tqdm(total=n, disable=not progress, desc="cdp_fast.sample", unit="img")
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            img, lab, conf = _generate_group(ctx, start, count)
            imgs.append(img)
            labs.append(lab)
            confs.append(conf)
            bar.update(count)
        bar.close()
        images = torch.cat(imgs).numpy()
        labels = None if labs[0] is None else torch.cat(labs).numpy().astype(np.int64)
        conf = None if confs[0] is None else torch.cat(confs).numpy().astype(np.float32)
        return Samples(images, labels, conf, meta={"seed": seed, "n": n})

    kw = dict(loss=loss, features=features, embedding=embedding, guide_window=guide_window, lam=lam,
              tau=tau, tau_plus=tau_plus, beta=beta, positive=positive, negatives=negatives, real=real,
              num_classes=num_classes, class_labels=class_labels, labeler=labeler, steps=steps,
              skip=skip, eta=eta, T=T, betas=betas, alphas_cumprod=alphas_cumprod,
              image_shape=image_shape, batch_size=batch_size, shard_size=shard_size, output=output,
              seed=seed, dtype=str(dtype), init_std=float(init_std))
    stats = write_shards(ctx, out, n, shard_size, _manifest_args(model, n, kw), progress=progress)
    result = Samples.load(out)
    result.meta["throughput"] = stats
    return result


# ----------------------------------------------------------------------------- shards
def _shard_name(k):
    return f"shard-{k:06d}.npz"


def _shard_plan(n, shard_size):
    return [(k, s, min(shard_size, n - s)) for k, s in enumerate(range(0, n, shard_size))]


def _load_or_start_manifest(out: Path, args, n, shard_size):
    from cdp_fast.data import atomic_write_json

    path = out / "manifest.json"
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"out: {path} is not valid JSON ({e}); remove it to start afresh") from None
        old = manifest.get("args", {})
        changed = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {args.get(k)!r}" for k in changed)
            raise ValueError(f"out: {out} holds a run with different arguments ({detail}); "
                             "use another directory or the original arguments to resume")
        return manifest
    manifest = {
        "format": "cdp_fast.samples", "version": 1, "args": args, "n": n, "shard_size": shard_size,
        "num_shards": len(_shard_plan(n, shard_size)),
        "seeding": "sample i draws x_T, eta-noise and its real positive from torch.Generator "
                   "seeded with cdp_fast.sampler.sample_seed(seed, i)",
        "shards": {}, "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)
    return manifest


def _shard_ok(out: Path, name, info) -> bool:
    from cdp_fast.data import sha256_file

    f = out / name
    return f.exists() and f.stat().st_size == info.get("bytes") and sha256_file(f) == info.get("sha256")


def _verify_shards(out: Path, manifest, plan):
    """Keep in the manifest only the shards whose file is intact, then absorb the records
    left by a multi-process run (:func:`_absorb_records`). Missing, truncated or corrupted
    shards are dropped (and so regenerated)."""
    good = {}
    for name, info in manifest.get("shards", {}).items():
        if _shard_ok(out, name, info):
            good[name] = info
        else:
            warnings.warn(f"{out / name} is missing, truncated or corrupted (sha256 mismatch); "
                          "it will be regenerated")
    manifest["shards"] = good
    _absorb_records(out, manifest, plan)


def _absorb_records(out: Path, manifest, plan):
    """Add to the manifest the shards that ranks of a multi-process run recorded beside
    themselves (``shard-*.json``), each checked against its file; shards already in the
    manifest are not read again."""
    expected = {_shard_name(k): (s, c) for k, s, c in plan}
    good = manifest["shards"]
    for rec in sorted(out.glob("shard-*.json")):
        name = rec.stem + ".npz"
        try:
            info = json.loads(rec.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if name in good or name not in expected or (info.get("start"), info.get("count")) != expected[name]:
            continue
        if _shard_ok(out, name, info):
            good[name] = info


def _finish_manifest(out: Path, manifest, plan):
    from cdp_fast.data import atomic_write_json

    manifest["complete"] = all(_shard_name(k) in manifest["shards"] for k, _, _ in plan)
    atomic_write_json(out / "manifest.json", manifest)
    for rec in out.glob("shard-*.json"):
        if rec.stem + ".npz" in manifest["shards"]:
            rec.unlink(missing_ok=True)


def write_shards(ctx, out, n, shard_size, args, *, progress=True):
    """Generate every missing shard of a run into ``out`` (the resumable part of
    :func:`sample`), in this process or, under torchrun, shared among the ranks
    (shard k on rank k % world_size). Returns per-rank throughput figures."""
    import time

    from tqdm.auto import tqdm

    from cdp_fast import distributed
    from cdp_fast.data import atomic_write_bytes, atomic_write_json, npz_bytes

    out = Path(out)
    rank, world = distributed.maybe_init(ctx["device"])
    plan = _shard_plan(n, shard_size)
    if rank == 0:
        manifest = _load_or_start_manifest(out, args, n, shard_size)
        for stray in out.glob(".shard-*.tmp"):
            stray.unlink(missing_ok=True)
    distributed.barrier()
    if rank != 0:
        manifest = _load_or_start_manifest(out, args, n, shard_size)
    _verify_shards(out, manifest, plan)
    distributed.barrier()
    todo = [p for p in plan if _shard_name(p[0]) not in manifest["shards"] and p[0] % world == rank]
    total = n if world == 1 else sum(c for _, _, c in todo)
    bar = tqdm(total=total, initial=total - sum(c for _, _, c in todo), disable=not progress or rank != 0,
               desc="cdp_fast.sample" + (f" [rank 0 of {world}]" if world > 1 else ""), unit="img")
    B = ctx["batch_size"]
    made, t0 = 0, time.perf_counter()

    def persist(k, start, count, arrays):
        # runs on the writer thread: serialise, write atomically, then record the shard
        data = npz_bytes(arrays)
        name = _shard_name(k)
        atomic_write_bytes(out / name, data)
        info = {"start": start, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["shards"][name] = info
        if world == 1:
            manifest["complete"] = len(manifest["shards"]) == len(plan)
            atomic_write_json(out / "manifest.json", manifest)
        else:  # one small record per shard; rank 0 folds them into the manifest at the end
            atomic_write_json(out / f"shard-{k:06d}.json", info)

    # Shard k is written by one background thread while shard k+1 is generated: at most one
    # shard waits in memory, and shards are recorded in order.
    from concurrent.futures import ThreadPoolExecutor

    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp_fast-shard-writer") as writer:
        for k, start, count in todo:
            imgs, labs, confs = [], [], []
            for s in range(start, start + count, B):
                c = min(B, start + count - s)
                img, lab, conf = _generate_group(ctx, s, c)
                imgs.append(img.numpy())
                labs.append(None if lab is None else lab.numpy())
                confs.append(None if conf is None else conf.numpy())
                bar.update(c)
            arrays = {"image": np.concatenate(imgs), "index": np.arange(start, start + count, dtype=np.int64)}
            if labs[0] is not None:
                arrays["label"] = np.concatenate(labs).astype(np.int64)
            if confs[0] is not None:
                arrays["confidence"] = np.concatenate(confs).astype(np.float32)
            if pending is not None:
                pending.result()  # re-raises a failed write
            pending = writer.submit(persist, k, start, count, arrays)
            made += count
        if pending is not None:
            pending.result()
    bar.close()
    elapsed = time.perf_counter() - t0
    stats = distributed.all_gather_object({"rank": rank, "images": made, "seconds": elapsed,
                                           "images_per_s": made / elapsed if elapsed > 0 else 0.0})
    distributed.barrier()
    if rank == 0:  # its manifest was verified at the start and holds its own shards since
        _absorb_records(out, manifest, plan)
        _finish_manifest(out, manifest, plan)
    distributed.barrier()
    return stats
