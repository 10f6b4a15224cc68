"""Contrastive-guided sampling: the driver :func:`sample` (the pure loops — :func:`guided_ddim`,
``guided_ddpm``, ``guided_dpmpp_2m``, ``guided_heun`` — live in :mod:`cdp_fast.diffusion.solvers` and are
importable from here too). Over 400 lines because :func:`sample` documents and validates every
one of its ~30 arguments and prepares the networks; the jobs around it live in guidance,
solvers, stream, seeding, runtime and models.external.

Implements Algorithm 1 of Ouyang, Xie & Cheng, "Improving Adversarial Robustness by
Contrastive Guided Diffusion Process" (Contrastive-DP): at every DDIM step

    Δ       = ε_θ(x_t, t) + λ ∇_{x_t} ℓ_contra(x_t, x_p; τ)        (Algorithm 1, line 6)
    x̂_0     = (x_t − √(1−ᾱ_t) Δ) / √ᾱ_t
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1−ᾱ_{t-1}−σ_t²) Δ + σ_t z           (DDIM eq. (12); line 7 at η=0)

with σ_t = η √((1−ᾱ_{t-1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t-1}) (Song et al. 2021, eq. (16)) and ℓ the
mean of the InfoNCE or HNM loss over the batch's anchors.

A call, top-down: :func:`sample` validates its arguments, resolves the paper's defaults and
builds a frozen :class:`_Run` (the ε-model adapter, possibly compiled — :mod:`cdp_fast.utils.runtime`;
the schedule; a :class:`cdp_fast.guidance.ContrastiveGuidance`); :func:`_batches` yields the
run's rows batch by batch (per-sample seeding — :mod:`cdp_fast.utils.seeding`), either collected in
memory or streamed to shards by :func:`cdp_fast.sampling.stream.write_shards` (resume, ranks). Each
batch is one trajectory of the chosen solver (:mod:`cdp_fast.diffusion.solvers`; the paper's is
:func:`guided_ddim`): the ε-model (:mod:`cdp_fast.diffusion.adapters`),
the guidance (:mod:`cdp_fast.guidance.losses` -> :mod:`cdp_fast.ops.contrastive`) and the update
(:mod:`cdp_fast.ops.ddim`).

Randomness: sample i draws its x_T and its "real" positive from a generator seeded by
(seed, i) alone, and its per-step noise (η > 0, DDPM) from a counter-based generator keyed by
(seed, i) on the device (:mod:`cdp_fast.utils.seeding`). Without guidance, sample i is therefore the same for any
batch_size; with guidance, the contrastive batch is part of the method (the paper's m), so
samples are grouped into fixed batches [kB, (k+1)B) — the last one padded to B and cut — and
are identical for any process count, n ≥ i or interruption; with the online head
(``embedding``), sample i also depends on the earlier batches of its shard (the head is
carried through a shard), so on ``shard_size`` too — still not on the process count, n or an
interruption (shards are the unit of work and of resume).
"""
from __future__ import annotations

import copy
import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cdp_fast.utils import distributed
from cdp_fast.sampling import graphs
from cdp_fast.utils import runtime
from cdp_fast.utils.checks import check_number, is_int
from cdp_fast.guidance.contrastive import DEFAULTS, LOSSES, ContrastiveGuidance, check_options
from cdp_fast.diffusion.adapters import EpsModel, SigmaDenoiser, as_eps_model, call_model
from cdp_fast.diffusion.schedule import as_alphas_cumprod, karras_sigmas, make_alphas_cumprod, sigmas_of
from cdp_fast.diffusion.schedule import timesteps as make_timesteps
from cdp_fast.utils.seeding import generators, per_sample_randn, sample_seed, sample_seeds
# the pure loops live in cdp_fast.diffusion.solvers; their public names stay importable from here
from cdp_fast.diffusion.solvers import SOLVERS, guided_ddim, guided_ddpm, guided_dpmpp_2m, guided_heun, nfe_of
from cdp_fast.sampling.stream import ShardPlan, fingerprint, write_shards

__all__ = ["sample", "guided_ddim", "guided_ddpm", "guided_dpmpp_2m", "guided_heun", "ContrastiveGuidance",
           "DEFAULTS", "call_model", "sample_seed", "SOLVERS", "authors_window", "SigmaDenoiser"]


# ----------------------------------------------------------------------------- validation
def authors_window(T: int) -> tuple[int, int]:
    """The authors' CIFAR-10 guidance window scaled to T steps: t >= 0.4·T (their
    ``ddim-main-contrast/functions/denoising.py``: ``i >= 400`` at T = 1000)."""
    return (math.ceil(0.4 * T), T - 1)


def _validate(n, loss, positive, negatives, embedding, guide_window, form, solver, clip_x0, real,
              class_labels, labeler, num_classes, batch_size, steps, eta, output, image_shape, compile,
              shard_size, init_std):
    """The sampling arguments (the loss's own are checked by ContrastiveGuidance)."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if loss not in (None,) + LOSSES:
        raise ValueError(f"loss must be one of None, 'none', 'infonce', 'hnm'; got {loss!r}")
    check_options(positive=positive, negatives=negatives, embedding=embedding,
                  guide_window=None if guide_window == "auto" else guide_window, form=form)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if clip_x0 not in (None, True, False):
        raise ValueError(f"clip_x0 must be None, True or False, got {clip_x0!r}")
    if solver != "ddpm" and clip_x0:
        raise ValueError(f"clip_x0=True needs solver='ddpm' (solver={solver!r} does not clip x̂_0)")
    if solver != "ddim" and eta not in (0, 0.0):
        raise ValueError(f"eta is a DDIM option; solver={solver!r} has no η (got eta={eta!r})")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    if not (isinstance(image_shape, (tuple, list)) and len(image_shape) >= 1
            and all(is_int(s) and s >= 1 for s in image_shape)):
        raise ValueError(f"image_shape must be a tuple of positive ints, got {image_shape!r}")
    if compile not in ("auto", True, False):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if shard_size is not None and (not is_int(shard_size) or shard_size < 1):
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if num_classes is not None and (not is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if class_labels is not None and len(class_labels) != n:
        raise ValueError(f"class_labels must hold n={n} labels, got {len(class_labels)}")
    if loss is None:
        return
    if batch_size < 2 and negatives in ("batch", "class"):
        raise ValueError("batch_size must be >= 2 for a contrastive loss with in-batch negatives "
                         f"(negatives={negatives!r}); got batch_size={batch_size}")
    if positive == "real" or negatives == "real":
        if real is None:
            raise ValueError(f"real images are required for positive={positive!r} / negatives={negatives!r}")
        if not isinstance(real, torch.Tensor) or tuple(real.shape[1:]) != tuple(image_shape) or len(real) < 1:
            raise ValueError(f"real must be a tensor of shape (N, {', '.join(map(str, image_shape))}) "
                             f"in [-1, 1], got {tuple(getattr(real, 'shape', ()))}")
    if negatives == "class" and class_labels is None and labeler is None and num_classes is None:
        raise ValueError("negatives='class' needs class_labels, num_classes (a class-conditional "
                         "model) or a labeler to classify the current x0-prediction")


def _denoiser_settings(model, solver):
    """What of a SigmaDenoiser's settings the run depends on (manifest): the σ range and ρ only
    for Heun (the other solvers see the ε-view on the table), the label format always."""
    if not isinstance(model, SigmaDenoiser):
        return None
    st = model.settings()
    return st if solver == "heun" else {"one_hot_classes": st["one_hot_classes"]}


def _steps_for(solver, nfe, steps, T, skip) -> int:
    """``steps`` for a requested NFE: Heun (nfe + 1)/2 levels; the timestep solvers the fewest
    steps whose distinct timesteps number ``nfe`` (a quadratic sequence repeats small t)."""
    if nfe is None:
        return steps
    if not is_int(nfe) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    if solver == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"nfe: solver='heun' makes 2·steps − 1 evaluations; give an odd nfe, got {nfe}")
        return (nfe + 1) // 2
    for s in range(nfe, T + 1):
        got = nfe_of(solver, make_timesteps(T, s, skip))
        if got == nfe:
            return s
        if got > nfe:
            break
    raise ValueError(f"nfe: no number of {skip!r} steps of T={T} gives exactly {nfe} distinct timesteps")


# ----------------------------------------------------------------------------- one run
class _Strength:
    """Per-timestep summary of the guidance strength λ‖∇ℓ_i‖/‖ε_i‖ over the batches of a call:
    the mean of the batch means and the max, as {"t", "ratio_mean", "ratio_max", "batches"}
    (over each batch as computed: the last batch's padding rows are part of its contrastive
    batch and count too)."""

    def __init__(self):
        self.by_t = {}

    def add(self, records):
        if not records:
            return
        # one host sync per batch for all its steps
        values = torch.stack([torch.stack([mean, mx]) for _, mean, mx in records]).tolist()
        for (t, _, _), (mean, mx) in zip(records, values):
            s, m, c = self.by_t.get(t, (0.0, 0.0, 0))
            self.by_t[t] = (s + mean, max(m, mx), c + 1)

    def merge(self, others):
        for other in others:
            for t, (s, m, c) in other.items():
                s0, m0, c0 = self.by_t.get(t, (0.0, 0.0, 0))
                self.by_t[t] = (s0 + s, max(m0, m), c0 + c)
        return self

    def summary(self):
        return [{"t": int(t), "ratio_mean": s / c, "ratio_max": m, "batches": c}
                for t, (s, m, c) in sorted(self.by_t.items(), reverse=True)]


@dataclass(frozen=True)
class _Run:
    """Everything a batch of a :func:`sample` run needs, fixed for the run."""

    eps_model: EpsModel
    guidance: Optional[ContrastiveGuidance]   # None: no guidance (also for λ = 0)
    solver: str                               # one of SOLVERS
    sigmas: Optional[torch.Tensor]            # heun: (n + 1,) noise levels, else None
    clip_x0: bool                             # DDPM only
    head_scope: int                           # rows per online-head lifetime (the shard size)
    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    eta: float
    batch_size: int
    seed: int
    image_shape: tuple
    init_std: float
    device: torch.device
    channels_last: bool
    class_labels: Any                         # (n,) or None
    num_classes: Optional[int]
    labeler: Optional[Callable]
    output: str
    autocast: Callable
    strength: _Strength
    step_graph: Optional[graphs.StepGraph]    # the steps' graphs (cdp_fast.sampling.graphs), or None


def _labels_from(labeler, x):
    with torch.no_grad():
        logits = labeler(x.clamp(-1, 1) if x.dim() == 4 else x)
    _check_logits(logits, len(x), "labeler")
    prob = torch.softmax(logits.float(), dim=1)
    conf, lab = prob.max(dim=1)
    return lab.to(torch.int64), conf


def _generate_group(run: _Run, start: int, count: int, advance=None):
    """Samples [start, start + count): (images (count, ...) on CPU, labels or None, confidence
    or None). ``count`` may be < the batch size only for the last group; guided groups are
    always computed at full batch size and cut. ``advance(k)``: progress, ``count`` rows in
    total spread over the steps."""
    full = run.batch_size if run.guidance is not None else count
    idx = list(range(start, start + full))
    gens = generators(run.seed, idx)
    x_T = per_sample_randn(gens, run.image_shape, run.device)
    if run.init_std != 1.0:
        x_T = x_T * run.init_std
    if run.channels_last:
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    cls = None
    if run.class_labels is not None:
        cl = run.class_labels
        # padded rows (beyond n) reuse labels cyclically: they are discarded
        cls = torch.as_tensor(np.asarray([cl[i % len(cl)] for i in idx]), dtype=torch.long, device=run.device)
    elif run.num_classes is not None:
        cls = torch.tensor([int(torch.randint(run.num_classes, (1,), generator=g)) for g in gens],
                           dtype=torch.long, device=run.device)
    y = cls if run.num_classes is not None else None
    guidance = run.guidance
    if guidance is not None:
        real_pos = None
        if guidance.positive == "real":
            real_pos = torch.tensor([int(torch.randint(len(guidance.real), (1,), generator=g)) for g in gens],
                                    dtype=torch.long, device=run.device)
        # the head lives for a shard (the authors': a run), so resume stays exact
        guidance.reset(class_labels=cls if guidance.negatives == "class" else None,
                       real_positive_index=real_pos, keep_head=start % run.head_scope != 0)
    on_step = None
    if advance is not None:
        per_step = count / (len(run.sigmas) - 1 if run.solver == "heun" else len(run.timesteps))
        on_step = lambda step: advance(per_step)  # noqa: E731  (skipped repeats: a bar just short of a step)
    with run.autocast():
        # per-step noise keyed by (seed, i) and drawn on the device: no host round trip per step
        keys = sample_seeds(run.seed, idx, run.device) if (run.solver == "ddpm" or run.eta > 0) else None
        if run.solver == "heun":
            x0 = guided_heun(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, sigmas=run.sigmas,
                             guidance=guidance, y=y, on_step=on_step)
        elif run.solver == "dpmpp_2m":
            x0 = guided_dpmpp_2m(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                                 guidance=guidance, y=y, on_step=on_step,
                                 step_graph=run.step_graph)
        elif run.solver == "ddpm":
            x0 = guided_ddpm(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                             guidance=guidance, clip_x0=run.clip_x0, generator=keys, y=y, on_step=on_step,
                             step_graph=run.step_graph)
        else:
            x0 = guided_ddim(run.eps_model, x_T, alphas_cumprod=run.alphas_cumprod, timesteps=run.timesteps,
                             guidance=guidance, eta=run.eta, generator=keys, y=y, on_step=on_step,
                             step_graph=run.step_graph)
    if guidance is not None:
        run.strength.add(guidance.strength)
    x0 = x0[:count].float()
    labels = conf = None
    if run.labeler is not None:
        labels, conf = _labels_from(run.labeler, x0)
        labels, conf = labels.cpu(), conf.cpu()
    elif cls is not None and run.num_classes is not None:
        labels = cls[:count].cpu()
    if run.output == "uint8":
        from cdp_fast.data import to_uint8_nhwc
        img = to_uint8_nhwc(x0).cpu()
    else:
        img = x0.cpu()
    return img, labels, conf


def _batches(run: _Run, start: int, count: int, advance=None):
    """Rows [start, start + count) of the run, one dict of numpy arrays (``image``, and
    ``label`` / ``confidence`` when there are labels) per batch of ``run.batch_size``;
    ``advance(k)`` moves a progress bar by k rows, step by step."""
    for s in range(start, start + count, run.batch_size):
        img, lab, conf = _generate_group(run, s, min(run.batch_size, start + count - s), advance)
        arrays = {"image": img.numpy()}
        if lab is not None:
            arrays["label"] = lab.numpy().astype(np.int64)
        if conf is not None:
            arrays["confidence"] = conf.numpy().astype(np.float32)
        yield arrays


#: compile="auto" on CPU compiles the ε-model when the call's estimated eager ε-model time is at
#: least this many seconds. Measured on the 2-core CPU (torch 2.13, 20 steps, interleaved runs):
#: the frozen compile costs 11-22 s per process on the digits UNet (1.0M params; eager 31 ms →
#: 19 ms per batch-128 forward, so it pays off after ~30-60 s of eager model time) and ~27 s
#: on a small diffusers UNet (1.1M params, 16×16; 60 → 44 ms per batch-64 forward: ~95 s).
#: Frozen graphs cannot use inductor's persistent caches (their prepacked oneDNN weights do
#: not pickle: fxgraph_cache_bypass; AOTAutograd refuses freezing), so every process pays it.
CPU_AUTO_COMPILE_S = 120.0


def _eager_seconds(model, image_shape, batch: int, forwards: int, dev: torch.device,
                   threshold: float = math.inf, num_classes=None) -> float:
    """Estimated eager ε-model time of ``forwards`` calls at ``batch``.

    One forward at ≤ 16 samples is timed (the second of two: the first builds oneDNN
    primitives) and scaled linearly; small batches cost more per sample (digits UNet: ~2× at
    batch 128), so that over-estimates. When it reaches ``threshold``, two forwards at the
    full batch (a negligible part of so long a call) give the estimate instead. A
    class-conditional model (``num_classes`` set) is called with labels, as sampling calls it."""
    import time

    eps_model = as_eps_model(model)

    def once(b):
        x = torch.zeros((b, *image_shape), device=dev)
        t = torch.full((b,), 500, dtype=torch.long, device=dev)
        y = torch.zeros(b, dtype=torch.long, device=dev) if num_classes is not None else None
        eps_model.forward(x, t, y)
        start = time.perf_counter()
        eps_model.forward(x, t, y)
        return time.perf_counter() - start

    with torch.no_grad(), runtime.eval_mode(eps_model.module):
        small = min(batch, 16)
        est = once(small) * (batch / small) * forwards
        if batch > small and est >= threshold:
            est = once(batch) * forwards
    return est


def _cpu_auto_compiles(model, image_shape, work, dev: torch.device, num_classes=None) -> bool:
    """compile="auto" on CPU: whether the call's timed eager ε-model work, ``work`` = (batch,
    forwards), reaches :data:`CPU_AUTO_COMPILE_S` (only an nn.Module can be frozen and compiled)."""
    if work is None or as_eps_model(model).module is None:
        return False
    batch, forwards = work
    return _eager_seconds(model, image_shape, batch, forwards, dev, CPU_AUTO_COMPILE_S,
                          num_classes) >= CPU_AUTO_COMPILE_S


def _model_plan(model, dev: torch.device, compile, image_shape, work=None,
                num_classes=None) -> tuple[bool, bool, bool]:
    """(compile, copy, channels_last) for running ``model`` on ``dev``: channels_last only for
    an nn.Module compiled on CUDA with (C, H, W) images (cuDNN convolutions and bf16 tensor
    cores prefer NHWC); a copy whenever the caller's module would have to move or change
    layout, so it never does.

    ``compile="auto"``: always on CUDA; on CPU for an nn.Module when ``work`` = (batch,
    forwards) puts the eager ε-model time at ≥ :data:`CPU_AUTO_COMPILE_S` (timed, not assumed;
    see :func:`_cpu_auto_compiles`)."""
    is_module = isinstance(model, torch.nn.Module)
    use_compile = compile is True or (compile == "auto" and dev.type == "cuda")
    if compile == "auto" and dev.type == "cpu":
        use_compile = _cpu_auto_compiles(model, image_shape, work, dev, num_classes)
    channels_last = use_compile and dev.type == "cuda" and len(image_shape) == 3 and is_module
    must_copy = is_module and (channels_last or not runtime.same_device(runtime.model_device(model), dev))
    return use_compile, must_copy, channels_last


# caller's module -> ((device, layout, weights fingerprint), its prepared copy): one copy per
# module and weights, so repeated calls reuse the copy (and its compiled graphs) instead of
# doubling the memory and recompiling every call
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _prepare_model(model, dev: torch.device, compile, image_shape, step_graph=False) -> tuple[EpsModel, bool]:
    """(the ε-model adapter to run, whether x_T goes in channels_last); see :func:`_model_plan`.
    Without the call's work, ``compile="auto"`` stays eager on CPU here: :func:`sample` probes
    the eager adapter and only then lets :func:`_cpu_auto_compiles` time it, so a wrong
    ``image_shape`` or model signature is reported by the probe rather than by the timing."""
    use_compile, must_copy, channels_last = _model_plan(model, dev, compile, image_shape)
    if must_copy:
        key = (str(dev), channels_last, runtime.weights_fingerprint(model))
        hit = _PREPARED.get(model)
        if hit is not None and hit[0] == key:
            module = hit[1]
        else:
            module = copy.deepcopy(model).to(dev)
            if channels_last:
                module = module.to(memory_format=torch.channels_last)   # values unchanged
            _PREPARED[model] = (key, module)
        model = module
    eps_model = EpsModel(model)
    return (_compiled(eps_model, dev, step_graph) if use_compile else eps_model), channels_last


def _compiled(eps_model: EpsModel, dev: torch.device, step_graph=False) -> EpsModel:
    """The adapter running a compiled forward: on CUDA inside the step's graph (``step_graph``:
    :class:`cdp_fast.sampling.graphs.StepGraph` captures it with the guidance, so it is compiled without
    graphs of its own — a capture cannot nest) or with CUDA graphs of its own, a frozen inductor
    graph on CPU (the feature network is prepared apart: :func:`_prepare_features`)."""
    den = eps_model.model if isinstance(eps_model.model, SigmaDenoiser) else None
    if den is not None:
        den.table_on(dev)                        # the device copy exists before tracing
        # Heun calls a denoiser in σ-space, not through forward(): compile that path too
        den.sigma_runner = (torch.compile(den.eps_at_sigma) if dev.type == "cuda"
                            else runtime.compile_frozen(den.eps_at_sigma, den))
    if dev.type == "cuda":
        return eps_model.with_runner(torch.compile(eps_model.forward) if step_graph
                                     else runtime.compile_cuda_graphs(eps_model.forward))
    return eps_model.with_runner(runtime.compile_frozen(eps_model.forward, eps_model.module))


# caller's feature module -> ((device, compiled, weights fingerprint), its prepared copy)
_PREPARED_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Features:
    """A feature network as guided sampling runs it (see :func:`_prepare_features`):
    x (B, *shape) -> (B, d). With gradients on and a compiled graph it runs the graph (in
    channels_last when prepared so); without gradients (the real-data features, computed once
    at other batch sizes) it runs the module eagerly rather than compiling another graph."""

    def __init__(self, module: torch.nn.Module, compiled=None, channels_last: bool = False):
        self.module, self.compiled, self.channels_last = module, compiled, channels_last

    def __call__(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and torch.is_grad_enabled():
            return self.compiled(x)
        return self.module(x)


def _prepare_features(features, dev: torch.device, compile: bool):
    """The guidance's feature network as sampling runs it. An nn.Module becomes a copy (the
    caller's is never changed) on ``dev``, in eval mode, whose parameters do not require grad:
    the guidance differentiates only with respect to the images, so the backward computes no
    weight gradient (digits features, batch 128, CPU, fwd + input-grad: 8.9 -> 7.5 ms; WRN-16-4,
    batch 64: 439 -> 421 ms). With ``compile`` (sample() asks for it on CUDA) the copy is also
    put in channels_last and ``torch.compile``d: forward and the backward to the input as one
    AOT graph pair. On CPU it stays eager: compiled fwd + input-grad measured slower on the
    digits CNN (10.8–12.9 vs 7.5 ms: inductor's generated max-pool-with-indices and its
    scatter backward replace two aten kernels) and only ~10% faster on WRN-16-4 in
    channels_last (379 vs 421 ms) after a 20+ s compile. Plain callables are returned as given.

    Shapes: x (B, *shape) -> (B, d). Cached per caller's module and weights fingerprint."""
    if not isinstance(features, torch.nn.Module):
        return features
    key = (str(dev), bool(compile), runtime.weights_fingerprint(features))
    hit = _PREPARED_FEATURES.get(features)
    if hit is not None and hit[0] == key:
        return hit[1]
    module = copy.deepcopy(features).to(dev).eval().requires_grad_(False)
    if compile:
        module = module.to(memory_format=torch.channels_last)      # values unchanged
    prepared = _Features(module, torch.compile(module) if compile else None, channels_last=bool(compile))
    _PREPARED_FEATURES[features] = (key, prepared)
    return prepared


def _check_logits(logits, batch, what):
    """(B, K) finite logits, or a ValueError naming ``what`` — before anything is written."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"{what} must return logits of shape ({batch}, K) for {batch} images, got "
                         f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{what} returned non-finite logits")


_PROBE_SEED = 0x5EED


def _probe(eps_model: EpsModel, features, labeler, image_shape, T, num_classes, dev, fractional_t=False):
    """Run each network once on a fixed probe batch (2 images from a fixed seed, t = T // 2),
    as sampling will run it (the prepared ε-model on ``dev``; every module in eval mode for
    the probe, so no BatchNorm statistic moves): a wrong ``image_shape`` or a network that
    returns the wrong shape or non-finite values fails here, before any file is written, with
    a message naming it. Returns the behaviour fingerprints of the networks that are plain
    callables (a module is fingerprinted by its state dict): 8 fixed random projections of
    their probe outputs, compared on resume with a tolerance (rtol 1e-3) — so a different
    network behind the same function name is noticed, float noise across devices is not."""
    x = torch.randn((2,) + tuple(image_shape), generator=torch.Generator().manual_seed(_PROBE_SEED)).to(dev)
    t = torch.full((2,), T // 2, dtype=torch.long, device=dev)
    y = torch.zeros(2, dtype=torch.long, device=dev) if num_classes is not None else None

    def run(what, fn, *args):
        try:
            with torch.no_grad(), runtime.eval_mode(fn):
                return fn(*args)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"running the {what} on a probe batch of shape {tuple(x.shape)} failed ({msg}); is "
                             f"image_shape {tuple(image_shape)} right?") from None

    with runtime.eval_mode(eps_model.module):
        eps = run("model", eps_model.forward, x, t, y)
        if fractional_t and not isinstance(eps_model.model, SigmaDenoiser):
            try:
                with torch.no_grad():
                    eps_model.forward(x, t.float() + 0.5, y)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError("solver='heun' calls the ε-model at fractional timesteps t(σ) (as diffusers and "
                                 f"k-diffusion); this model failed on t = {T // 2 + 0.5} ({msg}); use a model "
                                 "that accepts float timesteps, or solver='dpmpp_2m'") from None
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        raise ValueError(f"model returns {tuple(getattr(eps, 'shape', ())) or type(eps).__name__} for images of "
                         f"shape {tuple(x.shape)} (checked on a probe batch before sampling); is image_shape "
                         f"{tuple(image_shape)} the model's?")
    outs = {"model": eps}
    if features is not None:
        z = run("features", features, x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != 2:
            raise ValueError(f"features must map (B, ...) to (B, d); got {tuple(getattr(z, 'shape', ()))}")
        outs["features"] = z
    if labeler is not None:
        logits = run("labeler", labeler, x.clamp(-1, 1) if x.dim() == 4 else x)
        _check_logits(logits, 2, "labeler")
        outs["labeler"] = logits
    prints = {}
    for name, fn in (("model", eps_model.model), ("features", features), ("labeler", labeler)):
        # a module is fingerprinted by its weights; a plain callable (also one inside a
        # SigmaDenoiser, which has no weights of its own) by what it computes
        plain = not isinstance(fn, torch.nn.Module) or (
            isinstance(fn, SigmaDenoiser) and not isinstance(fn.net, torch.nn.Module))
        if name in outs and plain:
            v = torch.as_tensor(outs[name].detach().double().cpu().flatten())
            r = torch.randn((8, v.numel()), generator=torch.Generator().manual_seed(_PROBE_SEED + 1),
                            dtype=torch.float64)
            prints[name] = {"behaviour": [round(float(p), 6) for p in (r @ v) / v.numel() ** 0.5]}
    return prints


def _jsonable(v):
    """numpy scalars and arrays as Python values (an np.int64 is the int it holds)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _manifest_args(model, n, kw, behaviour=None):
    """The arguments a resumed run must repeat, JSON-serialisable."""
    args = dict(kw)
    args["n"] = int(n)
    args["model"] = fingerprint(model)
    for k in ("features", "labeler", "real", "class_labels", "alphas_cumprod"):
        args[k] = fingerprint(args.get(k))
    args.update(behaviour or {})          # plain callables: what they compute, not their name
    args["image_shape"] = list(args["image_shape"])
    if args.get("guide_window") is not None:
        args["guide_window"] = list(args["guide_window"])
    if isinstance(args.get("betas"), torch.Tensor):
        args["betas"] = fingerprint(args["betas"])
    return json.loads(json.dumps(args, default=_jsonable))


# ----------------------------------------------------------------------------- driver
def sample(model, n, *, loss="hnm", features=None, embedding="auto", guide_window="auto", lam=None,
           tau=None, tau_plus=0.1, beta=1.0, positive="previous", negatives="batch", real=None,
           num_classes=None, class_labels=None, labeler=None, steps=200, skip="quadratic", eta=0.0,
           T=1000, betas="linear", alphas_cumprod=None, image_shape=(3, 32, 32), batch_size=512,
           out=None, shard_size=None, output="uint8", seed=0, device=None, dtype=None,
           compile="auto", progress=True, init_std=1.0, form=None, solver="ddim", clip_x0=None, nfe=None):
    """Generate ``n`` Contrastive-DP samples (Algorithm 1), optionally streamed to disk.

    Args (DESIGN.md §3; shapes in brackets):
        model: ε-model ``model(x, t)`` [(B, *image_shape), (B,) long] -> ε, or
            ``model(x, t, y)`` when ``num_classes`` is set (class-conditional); outputs with
            ``.sample`` (diffusers) are unwrapped; or a σ-space denoiser wrapped as
            ``cdp_fast.SigmaDenoiser(net)`` (EDM / k-diffusion ``D(x, σ[, class_labels])``),
            which every solver runs (as ε = (x_σ − D)/σ on this call's ᾱ table).
        n: number of samples (>= 1).
        loss: None/"none" (plain DDIM), "infonce" or "hnm".
        features: f: x_t [(B, *image_shape) in [-1, 1]] -> (B, d); None = flattened pixels.
            An nn.Module runs as a copy on the sampling device in eval mode with its weights
            frozen (no weight gradients), compiled in channels_last on CUDA (never on CPU,
            where it measured slower); the caller's module is left as it was.
        embedding: "auto" (default: the online 2-layer head for HNM — the authors' code and the
            paper's better variant, Table 5 "with embedding" — and none for InfoNCE), None or
            "mlp". The head lives for one shard (``shard_size`` rows, also without ``out``):
            with it, sample i also depends on the earlier batches of its shard (the authors
            keep one head for a whole run; a shard keeps resume exact and the output
            independent of the process count).
        guide_window: "auto" (default: the authors' CIFAR-10 window t >= 0.4·T,
            :func:`authors_window`; their MNIST/GTSRB code used (51, 149)), None (every step,
            as the paper's Algorithm 1), or (t_lo, t_hi): guide only when t_lo <= t <= t_hi.
            The first step of a trajectory is never guided in the authors' form (no x_{t+1}).
        form: None (the authors' loss form; the anchor form with negatives="real"),
            "authors" or "anchors": see :mod:`cdp_fast.guidance` (the paper's λ values mean
            the authors' form; the anchor form's gradient is ~2× as large at the same λ).
        lam, tau, tau_plus, beta: λ, τ, τ⁺, β. ``lam``/``tau`` None = the paper's default for
            ``loss`` (:data:`cdp_fast.guidance.DEFAULTS`: InfoNCE τ=0.1, λ=2e4; HNM τ=10, τ⁺=0.1, β=1, λ=1e5 —
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
        steps, skip, eta, T, betas: sub-sequence (cdp_fast.timesteps), η (DDIM), schedule.
        solver: "ddim" (default, the paper's), "ddpm" (ancestral; the revised paper's DDPM
            rows and the authors' MNIST/GTSRB sampler: :func:`guided_ddpm`), "dpmpp_2m"
            (DPM-Solver++(2M) on the same timesteps: :func:`guided_dpmpp_2m`) or "heun" (EDM's
            Heun on ``steps`` Karras noise levels, ρ = 7, 2·steps − 1 evaluations; ``skip`` does
            not apply: :func:`guided_heun`). The guidance enters each as ε̃ = ε + λ∇ℓ, so λ
            keeps its meaning (README "Fast solvers").
        nfe: network evaluations per sample; sets ``steps`` (and takes precedence): DDIM, DDPM,
            DPM-Solver++ evaluate once per distinct timestep, Heun 2·steps − 1 (odd nfe only).
            The run's NFE is recorded (``Samples.meta["nfe"]``, the manifest).
        clip_x0: clip x̂_0 to [-1, 1] in the DDPM step (None: True for "ddpm"; "ddim" does not
            clip, as the official DDIM code).
        alphas_cumprod: a foreign ᾱ table (e.g. a diffusers scheduler's) instead of betas/T.
        image_shape: per-sample shape, e.g. (3, 32, 32) or (2,).
        batch_size: samples per model call and the contrastive batch m.
        out: directory for shards + manifest.json (resumes if present); memory then does not
            grow with n and the returned Samples is lazy.
        shard_size: samples per shard (a multiple of batch_size; default ~10k).
        output: "uint8" (NHWC for 3-D images) or "float" (model space).
        seed: run seed; sample i depends only on (seed, i) (and its batch, when guided; and the
            earlier batches of its shard, with the head).
        device, dtype: device (default: the model's); dtype bf16/fp16 runs the networks under
            autocast (the sampler state stays fp32). Under torchrun with CUDA and no
            ``device``, each rank uses cuda:LOCAL_RANK.
        compile: "auto", True, or False. On CUDA the ε-model is compiled in channels_last and
            the whole step (ε-model, features, contrastive loss and its gradient, the head's
            Adam step) is captured in one CUDA graph (:class:`cdp_fast.sampling.graphs.StepGraph`;
            ``CDP_FAST_STEP_GRAPH=0``: the ε-model alone with ``mode="reduce-overhead"``, as
            also for Heun and for class negatives / real positives, whose guided steps cannot
            be captured); the first steps of a trajectory run uncaptured; the call's
            ``meta["step_graph"]`` counts the steps eager / warm-up / captured / replayed. On CPU it is compiled with inductor
            freezing, left in its layout, and recompiled if its weights changed since the last
            call (:mod:`cdp_fast.utils.runtime`). The feature extractor stays eager. "auto" compiles
            on CUDA always and on CPU only when the call is long enough to repay the compile:
            one eager forward is timed and the call's eager ε-model time estimated; at ≥
            ``CPU_AUTO_COMPILE_S`` (120 s) it compiles. Measured here (2 cores): the compile
            costs 11-27 s in every new process (frozen graphs skip inductor's persistent
            caches) and saves 27-38% of the ε-model time, so it breaks even after ~30-95 s of
            eager model time (digits UNet, batch 128, 200 steps: break-even ~1,000 samples;
            "auto" compiles from ~2,800).
        progress: tqdm progress bar.
        init_std: x_T ~ N(0, init_std² I) (1 = the diffusion prior; App. C.2 also uses 2).
    Returns:
        :class:`cdp_fast.Samples`.

    The caller's model is not modified: it runs in eval mode during the call (each
    submodule's own mode is restored afterwards); when it must be on another device (a rank's
    GPU) or in channels_last (CUDA compile), a copy is used.

    Examples:
        >>> s = cdp_fast.sample(eps_model, 1000, loss="hnm", features=f, labeler=clf,
        ...                     out="gen/", batch_size=256)
        >>> s.save_npz("synthetic.npz")
    """
    if loss == "none":
        loss = None
    _validate(n, loss, positive, negatives, embedding, guide_window, form, solver, clip_x0, real,
              class_labels, labeler, num_classes, batch_size, steps, eta, output, image_shape, compile,
              shard_size, init_std)
    if out is not None and not str(out).strip():
        raise ValueError("out: an empty path; give a directory (or out=None to keep the samples in memory)")
    # numpy scalars are the numbers they hold (the manifest compares them on resume); the
    # checks above and below see the same values
    n, batch_size, steps, T, seed, shard_size, num_classes, lam, tau, tau_plus, beta, eta, init_std = (
        v.item() if isinstance(v, np.generic) else v
        for v in (n, batch_size, steps, T, seed, shard_size, num_classes, lam, tau, tau_plus, beta, eta, init_std))
    image_shape = tuple(v.item() if isinstance(v, np.generic) else v for v in image_shape)
    check_number("seed", seed, integer=True)
    runtime.check_dtype(dtype)
    if alphas_cumprod is not None:
        abar = as_alphas_cumprod(alphas_cumprod)
        T = abar.numel()
    else:
        abar = make_alphas_cumprod(betas, T)
    steps = _steps_for(solver, nfe, steps, T, skip)
    ts = make_timesteps(T, steps, skip)
    sigmas = None
    if solver == "heun":
        den = model if isinstance(model, SigmaDenoiser) else None
        table = sigmas_of(abar)
        noisy = table[table > 0]                    # a table may start at ᾱ = 1 (σ = 0)
        if den is None and noisy.numel() == 0:
            raise ValueError("solver='heun': the ᾱ table has no entry below 1 (no noise level to start from)")
        sigmas = (karras_sigmas(steps, den.sigma_min, den.sigma_max, den.rho) if den is not None
                  else karras_sigmas(steps, float(noisy[0]), float(table[-1])))
    run_nfe = nfe_of(solver, ts, sigmas)
    if isinstance(model, SigmaDenoiser):
        model = model.on_table(abar)            # the same network as an ε-model on this table
    window = authors_window(T) if guide_window == "auto" else guide_window
    guidance = None
    if loss is not None:
        d = DEFAULTS[loss]
        lam = d["lam"] if lam is None else lam
        tau = d["tau"] if tau is None else tau
        # built even for λ = 0, so its arguments are checked; λ = 0 then samples plain DDIM
        guidance = ContrastiveGuidance(
            loss=loss, lam=lam, tau=tau, tau_plus=tau_plus, beta=beta, features=features,
            embedding=embedding, positive=positive, negatives=negatives, real=real, labeler=labeler,
            guide_window=window, alphas_cumprod=abar, seed=seed, form=form)
        lam, tau = float(lam), float(tau)
    guided = guidance is not None and guidance.lam != 0
    if shard_size is None:
        shard_size = batch_size * max(1, 10_000 // batch_size)
    if guided and shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size}) "
                         "when guiding, so contrastive batches do not straddle shards")
    # under torchrun (a streamed run), one GPU per rank: cuda:LOCAL_RANK
    dev = runtime.rank_device(device, model) if out is not None else runtime.model_device(model, device)
    # the ε-model forwards of this process (an upper bound on a resumed run): compile="auto"
    # on CPU weighs them against the compile's cost
    world = distributed.world_info()[1] if out is not None else 1
    work = (min(batch_size, n), math.ceil(math.ceil(n / world) / batch_size) * run_nfe)
    use_step_graph = graphs.wanted(dev, compile, solver, guidance if guided else None)
    eps_model, channels_last = _prepare_model(model, dev, compile, image_shape, step_graph=use_step_graph)
    # the probe runs the eager adapter (its fingerprint does not depend on compile), then
    # compile="auto" on CPU times the same adapter
    behaviour = _probe(eps_model, features if guided else None, labeler, image_shape, T, num_classes, dev,
                       fractional_t=solver == "heun")
    if guided:
        guidance.features = _prepare_features(
            features, dev, compile=dev.type == "cuda" and (compile is True or compile == "auto"))
    if compile == "auto" and dev.type == "cpu" and _cpu_auto_compiles(eps_model.model, image_shape, work, dev,
                                                                       num_classes):
        eps_model = _compiled(eps_model, dev, step_graph=use_step_graph)
    run = _Run(eps_model=eps_model, guidance=guidance if guided else None, solver=solver, sigmas=sigmas,
               clip_x0=(solver == "ddpm") if clip_x0 is None else bool(clip_x0), head_scope=shard_size,
               alphas_cumprod=abar,
               timesteps=ts, eta=float(eta), batch_size=batch_size, seed=seed, image_shape=tuple(image_shape),
               init_std=float(init_std), device=dev, channels_last=channels_last,
               class_labels=class_labels, num_classes=num_classes, labeler=labeler, output=output,
               autocast=runtime.autocast(dev, dtype), strength=_Strength(),
               step_graph=graphs.StepGraph() if use_step_graph else None)
    from tqdm.auto import tqdm

    from cdp_fast.data import Samples

    with runtime.eval_mode(eps_model.module):
        if out is None:
            with tqdm(total=n, disable=not progress, desc="cdp_fast.sample", unit="img",
                      bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]") as bar:
                chunks = list(_batches(run, 0, n, bar.update))
            cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            meta = {"seed": seed, "n": n, "nfe": run_nfe}
            if guided:
                meta["guidance_strength"] = run.strength.summary()
            if run.step_graph is not None:
                meta["step_graph"] = dict(run.step_graph.counts, disabled=run.step_graph.disabled)
            return Samples(cat["image"], cat.get("label"), cat.get("confidence"), meta=meta)
        kw = dict(loss=loss, features=features, embedding=None if guidance is None else guidance.embedding,
                  form=None if guidance is None else guidance.form, solver=solver, clip_x0=run.clip_x0,
                  guide_window=window if guidance is not None else None, lam=lam,
                  tau=tau, tau_plus=tau_plus, beta=beta, positive=positive, negatives=negatives, real=real,
                  num_classes=num_classes, class_labels=class_labels, labeler=labeler, steps=steps,
                  skip=None if solver == "heun" else skip, eta=eta, T=T, betas=betas, alphas_cumprod=alphas_cumprod,
                  sigma_range=_denoiser_settings(model, solver),
                  image_shape=image_shape, batch_size=batch_size, shard_size=shard_size, output=output,
                  seed=seed, dtype=str(dtype), init_std=float(init_std))
        # runs written before form/solver/clip_x0 existed used the anchor form and plain DDIM
        legacy = {"form": "anchors" if loss is not None else None, "solver": "ddim", "clip_x0": False,
                  "sigma_range": None}
        plan = ShardPlan(Path(out), n, shard_size, _manifest_args(model, n, kw, behaviour), legacy=legacy)
        # the guidance strength of this call's batches (a resumed call measures what it made)
        def merge(parts):
            entries = {"nfe": run_nfe}
            if guided and any(parts):
                entries["guidance_strength"] = _Strength().merge(parts).summary()
            return entries
        stats = write_shards(plan, lambda s, c, advance: _batches(run, s, c, advance), device=dev,
                             progress=progress, extras=lambda: run.strength.by_t, merge=merge)
    result = Samples.load(out, verify=False)        # every shard was just written or verified
    result.meta["throughput"] = stats
    result.meta["nfe"] = run_nfe
    return result
