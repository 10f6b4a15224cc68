"""Contrastive-guided sampling: the driver :func:`sample`. The pure loops (``guided_ddim``,
``guided_ddpm``, ``guided_dpmpp_2m``, ``guided_heun``) live in :mod:`cdp_fast.diffusion.solvers`;
the arguments in :mod:`.options`, the networks' preparation in :mod:`.prepare`, the batch loop
in :mod:`.run`, the shards in :mod:`.stream`.

Implements Algorithm 1 of Ouyang, Xie & Cheng, "Improving Adversarial Robustness by
Contrastive Guided Diffusion Process" (Contrastive-DP): at every DDIM step

    Δ       = ε_θ(x_t, t) + λ ∇_{x_t} ℓ_contra(x_t, x_p; τ)        (Algorithm 1, line 6)
    x̂_0     = (x_t − √(1−ᾱ_t) Δ) / √ᾱ_t
    x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1−ᾱ_{t-1}−σ_t²) Δ + σ_t z           (DDIM eq. (12); line 7 at η=0)

with σ_t = η √((1−ᾱ_{t-1})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t-1}) (Song et al. 2021, eq. (16)) and ℓ the
mean of the InfoNCE or HNM loss over the batch's anchors.

A call, top-down: :func:`sample` builds and checks its options (:mod:`.options`), resolves the
paper's defaults and builds a frozen :class:`cdp_fast.sampling.run.RunPlan` (the ε-model adapter,
possibly compiled — :mod:`cdp_fast.utils.runtime`;
the schedule; a :class:`cdp_fast.guidance.ContrastiveGuidance`); :func:`cdp_fast.sampling.run.batches` yields the
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

import math
from pathlib import Path

import numpy as np

from cdp_fast.data import Samples
from cdp_fast.diffusion.adapters import SigmaDenoiser
from cdp_fast.diffusion.schedule import as_alphas_cumprod, make_alphas_cumprod
from cdp_fast.diffusion.schedule import timesteps as make_timesteps
from cdp_fast.diffusion.solvers import MIN_STEP_RATIO, nfe_of
from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.guidance.options import PAPER_DEFAULTS
from cdp_fast.sampling import graphs
from cdp_fast.sampling.options import (GuidanceOptions, RunOptions, SolverOptions, authors_window, check_model,
                                       check_schedule, check_window, checked, denoiser_settings, heun_sigmas,
                                       manifest_args, steps_for)
from cdp_fast.sampling.prepare import compiled, cpu_auto_compiles, prepare_features, prepare_model, probe
from cdp_fast.sampling.run import RunPlan, Strength, batches
from cdp_fast.sampling.stream import ShardPlan, write_shards
from cdp_fast.utils import distributed, runtime

__all__ = ["sample"]


def sample(model, n, *, loss="hnm", features=None, embedding="auto", guide_window="auto", lam=None,
           tau=None, tau_plus=0.1, beta=1.0, positive="previous", negatives="batch", real=None,
           num_classes=None, class_labels=None, labeler=None, steps=200, skip=None, eta=0.0,
           T=1000, betas="linear", alphas_cumprod=None, image_shape=(3, 32, 32), batch_size=512,
           out=None, shard_size=None, output="uint8", seed=0, device=None, dtype=None,
           compile="auto", progress=True, init_std=1.0, form=None, solver="ddim", clip_x0=None, nfe=None):
    """Generate ``n`` Contrastive-DP samples (Algorithm 1), optionally streamed to disk.

    Args (docs/design.md §3; shapes in brackets):
        model: ε-model ``model(x, t)`` [(B, *image_shape), (B,) long] -> ε, or
            ``model(x, t, y)`` when ``num_classes`` is set (class-conditional); outputs with
            ``.sample`` (diffusers) are unwrapped; or a σ-space denoiser wrapped as
            ``cdp_fast.SigmaDenoiser(net)`` (EDM / k-diffusion ``D(x, σ[, class_labels])``),
            which every solver runs (as ε = (x_σ − D)/σ on this call's ᾱ table).
        n: number of samples (>= 1).
        loss: None/"none" (plain DDIM), "infonce" or "hnm".
        features: f: x_t [(B, *image_shape) in [-1, 1]] -> (B, d), or "pixels" (flattened
            pixels, an explicit choice that needs ``lam``); required when guided (None with a
            ``loss`` is a ValueError: the paper's λ would silently apply to pixels). For a
            classifier use :func:`cdp_fast.models.as_feature_extractor` (x mapped to its
            [0, 1]; ``layer=`` hooks a named module; ``feature_input="raw"``: x_t as it is,
            the authors' setting). A network declaring another range is refused, an
            undeclared nn.Module warned about (:mod:`cdp_fast.models.ranges`).
            An nn.Module runs as a copy on the sampling device in eval mode with its weights
            frozen (no weight gradients), compiled in channels_last on CUDA (never on CPU,
            where it measured slower); the caller's module is left as it was.
        embedding: "auto" (default: the online 2-layer head for HNM — the authors' code and the
            paper's better variant, Table 5 "with embedding" — and none for InfoNCE), None,
            "mlp" (d -> 128 -> 128, their CIFAR-10 head) or a positive int h (d -> h -> h; their
            MNIST head is 64; 128 is "mlp" and is recorded so). The head lives for one shard
            (``shard_size`` rows, also without ``out``):
            with it, sample i also depends on the earlier batches of its shard (the authors
            keep one head for a whole run; a shard keeps resume exact and the output
            independent of the process count).
        guide_window: "auto" (default: the authors' CIFAR-10 window t >= 0.4·T,
            :func:`authors_window`; their MNIST/GTSRB code used (51, 149)), None (every step,
            as the paper's Algorithm 1), or (t_lo, t_hi): guide only when t_lo <= t <= t_hi (a
            window that holds none of the run's timesteps is warned about: the run is unguided).
            The first step of a trajectory is never guided in the authors' form (no x_{t+1}).
        form: None (the authors' loss form; the anchor form with negatives="real"),
            "authors" or "anchors": see :mod:`cdp_fast.guidance` (the paper's λ values mean
            the authors' form; the anchor form's gradient is ~2× as large at the same λ).
        lam, tau, tau_plus, beta: λ, τ, τ⁺, β. ``lam``/``tau`` None = the paper's default for
            ``loss`` (:data:`cdp_fast.guidance.PAPER_DEFAULTS`: InfoNCE τ=0.1, λ=2e4; HNM τ=10, τ⁺=0.1, β=1, λ=1e5 —
            tuned for CIFAR-10 WRN-28-10 features; other features need other values;
            ``features="pixels"`` has no λ default). λ=0 is plain DDIM.
        positive: "previous" (x_{t+1} of the same sample) or "real" (a real image per sample).
        negatives: "batch", "real" (the real bank) or "class" (other-class batch samples).
        real: (N, *image_shape) real images in [-1, 1] for the "real" modes.
        num_classes: class-conditional model: y_i ~ U{0..K-1} from (seed, i) unless
            ``class_labels`` gives them; the outputs are labelled y_i (unless ``labeler``).
        class_labels: (n,) per-sample int classes (conditioning and/or "class" negatives), in
            [0, num_classes) when ``num_classes`` is set.
        labeler: classifier x [(B, *image_shape) in [-1, 1]] -> logits (B, K) — a [0, 1]
            classifier through :func:`cdp_fast.models.as_labeler` — K >= 2 (K =
            ``num_classes`` for a class-conditional model: checked on the probe batch); gives
            ``labels`` (argmax) and ``confidence`` (max softmax), and the classes of
            negatives="class" when no class_labels are given. A labeler that returns
            probabilities (rows >= 0 summing to 1 within 1e-2) is warned about once and its rows
            are used as the probabilities (not softmaxed a second time).
        steps, skip, eta, T, betas: sub-sequence (:func:`cdp_fast.timesteps`: ``skip`` "uniform",
            "quadratic", "logsnr" or "linspace" — the authors' MNIST grid, linspace(0, T − 1,
            steps) floored, 250 steps there, for every timestep solver; None = the solver's
            default, "logsnr" for "dpmpp_2m" and "quadratic" for the others), η (DDIM), schedule.
        solver: "ddim" (default, the paper's), "ddpm" (ancestral; the revised paper's DDPM
            rows and the authors' MNIST/GTSRB sampler: :func:`guided_ddpm`), "dpmpp_2m"
            (DPM-Solver++(2M) on the same timesteps: :func:`guided_dpmpp_2m`) or "heun" (EDM's
            Heun on ``steps`` Karras noise levels, ρ = 7, 2·steps − 1 evaluations; ``skip`` does
            not apply: :func:`guided_heun`). The guidance enters each as ε̃ = ε + λ∇ℓ, so λ
            keeps its meaning (README "Fast solvers").
        nfe: network evaluations per sample; sets ``steps`` (and takes precedence): DDIM, DDPM,
            DPM-Solver++ evaluate once per distinct timestep, Heun 2·steps − 1 (odd nfe only).
            A timestep run that would start at t = 0 alone (nfe=1 with "uniform" or "quadratic")
            is refused; one whose first timestep keeps √ᾱ > 0.2 of the image (nfe=2 "uniform":
            t = T/2) is warned about (:func:`cdp_fast.sampling.options.check_schedule`).
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
            be captured); the first steps of a trajectory run uncaptured; the captures are
            kept for the process, so a later call with the same networks, shapes and settings
            replays them (:func:`cdp_fast.sampling.graphs.clear_cache` releases them); the call's
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
        >>> s = cdp_fast.sample(eps_model, 1000, loss="hnm", features=f, labeler=as_labeler(clf),
        ...                     out="gen/", batch_size=256)
        >>> s.save_npz("synthetic.npz")
    """
    g, s, r = checked(
        GuidanceOptions(loss=loss, features=features, embedding=embedding, guide_window=guide_window, lam=lam,
                        tau=tau, tau_plus=tau_plus, beta=beta, positive=positive, negatives=negatives, real=real,
                        form=form),
        SolverOptions(solver=solver, steps=steps, skip=skip, eta=eta, T=T, betas=betas,
                      alphas_cumprod=alphas_cumprod, nfe=nfe, clip_x0=clip_x0, init_std=init_std),
        RunOptions(n=n, num_classes=num_classes, class_labels=class_labels, labeler=labeler,
                   image_shape=image_shape, batch_size=batch_size, out=out, shard_size=shard_size, output=output,
                   seed=seed, device=device, dtype=dtype, compile=compile, progress=progress))
    check_model(model, r.num_classes)
    plan = _schedule(model, s)
    model = plan["model"]
    guidance = _guidance(g, plan, r)
    guided = guidance is not None and guidance.lam != 0
    if guided:
        check_window(guidance.guide_window, s.solver, plan["abar"], plan["timesteps"], plan["sigmas"])
    shard_size = r.shard_size
    if shard_size is None:
        shard_size = r.batch_size * max(1, 10_000 // r.batch_size)
    if guided and shard_size % r.batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({r.batch_size}) "
                         "when guiding, so contrastive batches do not straddle shards")
    # under torchrun (a streamed run), one GPU per rank: cuda:LOCAL_RANK
    dev = runtime.rank_device(r.device, model) if r.out is not None else runtime.model_device(model, r.device)
    run = _make_run(model, g, s, r, plan, guidance if guided else None, shard_size, dev)
    with runtime.eval_mode(run.eps_model.module):
        if r.out is None:
            return _in_memory(run, r, plan["nfe"])
        return _streamed(run, g, s, r, plan, guidance, shard_size, dev)


def _schedule(model, s: SolverOptions) -> dict:
    """The run's ᾱ table, timesteps, Heun's noise levels and NFE (and the model as an ε-model
    on that table when it is a σ-denoiser): {"abar", "T", "steps", "timesteps", "sigmas",
    "nfe", "model", "denoiser"}."""
    T = s.T
    if s.alphas_cumprod is not None:
        abar = as_alphas_cumprod(s.alphas_cumprod)
        T = abar.numel()
    else:
        abar = make_alphas_cumprod(s.betas, T)
    steps = steps_for(s.solver, s.nfe, s.steps, T, s.skip, alphas_cumprod=abar)
    # Heun walks its own noise levels (any number of them); its table timesteps are unused
    ts = make_timesteps(T, min(steps, T) if s.solver == "heun" else steps, s.skip, alphas_cumprod=abar)
    check_schedule(s.solver, abar, ts, s.nfe, s.skip)
    sigmas = None
    if s.solver == "heun":
        sigmas = heun_sigmas(steps, abar, model if isinstance(model, SigmaDenoiser) else None)
    plan = {"abar": abar, "T": T, "steps": steps, "timesteps": ts, "sigmas": sigmas,
            "nfe": nfe_of(s.solver, ts, sigmas), "model": model}
    if isinstance(model, SigmaDenoiser):
        plan["model"] = model.on_table(abar)    # the same network as an ε-model on this table
    plan["denoiser"] = denoiser_settings(plan["model"], s.solver)
    return plan


def _guidance(g: GuidanceOptions, plan: dict, r: RunOptions):
    """The run's :class:`ContrastiveGuidance` (None without a loss), with the paper's λ and τ
    where the caller gave none and the authors' window for ``guide_window="auto"``. Built even
    for λ = 0, so its arguments are checked; λ = 0 then samples plain DDIM."""
    if g.loss is None:
        return None
    d = PAPER_DEFAULTS[g.loss]
    window = authors_window(plan["T"]) if g.guide_window == "auto" else g.guide_window
    return ContrastiveGuidance(
        loss=g.loss, lam=d["lam"] if g.lam is None else g.lam, tau=d["tau"] if g.tau is None else g.tau,
        tau_plus=g.tau_plus, beta=g.beta, features=g.features, embedding=g.embedding, positive=g.positive,
        negatives=g.negatives, real=g.real, labeler=r.labeler, guide_window=window, alphas_cumprod=plan["abar"],
        seed=r.seed, form=g.form)


def _make_run(model, g, s, r, plan, guidance, shard_size, dev) -> RunPlan:
    """The networks prepared (probed, copied, compiled as ``compile`` says) and the frozen
    :class:`RunPlan`; ``guidance`` is None unless the run is guided (λ ≠ 0)."""
    # the ε-model forwards of this process (an upper bound on a resumed run): compile="auto"
    # on CPU weighs them against the compile's cost
    world = distributed.world_info()[1] if r.out is not None else 1
    work = (min(r.batch_size, r.n), math.ceil(math.ceil(r.n / world) / r.batch_size) * plan["nfe"])
    use_step_graph = graphs.wanted(dev, r.compile, s.solver, guidance)
    eps_model, channels_last = prepare_model(model, dev, r.compile, r.image_shape, step_graph=use_step_graph)
    # the probe runs the eager adapter (its fingerprint does not depend on compile), then
    # compile="auto" on CPU times the same adapter
    behaviour = probe(eps_model, g.features if guidance is not None else None, r.labeler, r.image_shape, plan["T"],
                      r.num_classes, dev, fractional_t=s.solver == "heun")
    if guidance is not None:
        guidance.features = prepare_features(
            g.features, dev, compile=dev.type == "cuda" and (r.compile is True or r.compile == "auto"))
    if r.compile == "auto" and dev.type == "cpu" and cpu_auto_compiles(eps_model.model, r.image_shape, work, dev,
                                                                         r.num_classes):
        eps_model = compiled(eps_model, dev, step_graph=use_step_graph)
    return RunPlan(eps_model=eps_model, guidance=guidance, solver=s.solver, sigmas=plan["sigmas"],
               clip_x0=(s.solver == "ddpm") if s.clip_x0 is None else bool(s.clip_x0), head_scope=shard_size,
               alphas_cumprod=plan["abar"], timesteps=plan["timesteps"], eta=float(s.eta), batch_size=r.batch_size,
               seed=r.seed, image_shape=tuple(r.image_shape), init_std=float(s.init_std), device=dev,
               channels_last=channels_last, class_labels=r.class_labels, num_classes=r.num_classes,
               labeler=r.labeler, output=r.output, autocast=runtime.autocast(dev, r.dtype), strength=Strength(),
               step_graph=graphs.StepGraph(shared=True) if use_step_graph else None, behaviour=behaviour)


def _in_memory(run: RunPlan, r: RunOptions, nfe: int) -> Samples:
    """All rows of the run in memory, as one :class:`Samples`."""
    from tqdm.auto import tqdm

    with tqdm(total=r.n, disable=not r.progress, desc="cdp_fast.sample", unit="img",
              bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]") as bar:
        chunks = list(batches(run, 0, r.n, bar.update))
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    meta = {"seed": r.seed, "n": r.n, "nfe": nfe}
    if run.guidance is not None:
        meta["guidance_strength"] = run.strength.summary()
    if run.step_graph is not None:
        meta["step_graph"] = dict(run.step_graph.counts, disabled=run.step_graph.disabled)
    return Samples(cat["image"], cat.get("label"), cat.get("confidence"), meta=meta)


def _streamed(run: RunPlan, g, s, r, plan, guidance, shard_size, dev) -> Samples:
    """The run streamed to ``r.out``'s shards (resumed when the manifest's arguments match)."""
    lam, tau = g.lam, g.tau
    if guidance is not None:
        lam, tau = guidance.lam, guidance.tau
    guided = run.guidance is not None
    kw = dict(loss=g.loss, features=g.features, embedding=None if guidance is None else guidance.embedding,
              form=None if guidance is None else guidance.form, solver=s.solver, clip_x0=run.clip_x0,
              guide_window=guidance.guide_window if guidance is not None else None, lam=lam,
              tau=tau, tau_plus=g.tau_plus, beta=g.beta, positive=g.positive, negatives=g.negatives, real=g.real,
              num_classes=r.num_classes, class_labels=r.class_labels, labeler=r.labeler, steps=plan["steps"],
              skip=None if s.solver == "heun" else s.skip, eta=s.eta, T=plan["T"], betas=s.betas,
              alphas_cumprod=s.alphas_cumprod, sigma_range=plan["denoiser"],
              image_shape=r.image_shape, batch_size=r.batch_size, shard_size=shard_size, output=r.output,
              seed=r.seed, dtype=str(r.dtype), init_std=float(s.init_std),
              dpmpp_min_step_ratio=MIN_STEP_RATIO if s.solver == "dpmpp_2m" else None)
    # runs written before form/solver/clip_x0 existed used the anchor form and plain DDIM; DPM++
    # runs before 0.2.0 took every step second order (no step-ratio rule): they do not resume
    legacy = {"form": "anchors" if g.loss is not None else None, "solver": "ddim", "clip_x0": False,
              "sigma_range": None, "dpmpp_min_step_ratio": None}
    shard_plan = ShardPlan(Path(r.out), r.n, shard_size, manifest_args(plan["model"], r.n, kw, run.behaviour),
                           legacy=legacy)

    def merge(parts):
        # the guidance strength of this call's batches (a resumed call measures what it made)
        entries = {"nfe": plan["nfe"]}
        if guided and any(parts):
            entries["guidance_strength"] = Strength().merge(parts).summary()
        return entries

    stats = write_shards(shard_plan, lambda start, count, advance: batches(run, start, count, advance),
                         device=dev, progress=r.progress, extras=lambda: run.strength.by_t, merge=merge)
    result = Samples.load(r.out, verify=False)        # every shard was just written or verified
    result.meta["throughput"] = stats
    result.meta["nfe"] = plan["nfe"]
    return result
