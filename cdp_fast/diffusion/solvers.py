"""The pure sampling loops: model, x_T, schedule, guidance, callback in; x_0 out. No files,
no seeding policy, no devices (the driver, :func:`cdp_fast.sample`, owns those).

- :func:`guided_ddim` — Algorithm 1 of Contrastive-DP (DDIM, eq. (12) of Song et al. 2021,
  with Δ = ε + λ∇ℓ); η > 0 adds DDIM's ancestral noise.
- :func:`guided_ddpm` — ancestral DDPM with the same guided Δ (the revised paper's DDPM rows).
- :func:`guided_dpmpp_2m` — DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2;
  data prediction, multistep, midpoint form as diffusers' ``DPMSolverMultistepScheduler``)
  with the guided noise prediction ε̃ = ε + λ∇ℓ converted to x̂_0.
- :func:`guided_heun` — EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022,
  Algorithm 1, S_churn = 0) in σ-space on the σ schedule of eq. (5) (ρ = 7), the guidance
  evaluated at every one of its 2n − 1 function evaluations.

All four use the same guided noise prediction ε̃ = ε_θ(x_t, t) + λ∇_{x_t}ℓ (ℓ on the VP-space
images x_t, as the paper), so λ means the same in each: it is a velocity term of the
probability-flow ODE (dx_σ/dσ = ε̃ in σ-space), integrated by each solver.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from cdp_fast.diffusion.adapters import EpsModel, SigmaDenoiser, as_eps_model
from cdp_fast.ops.ddim import ddim_update, ddpm_update
from cdp_fast.diffusion.schedule import as_alphas_cumprod, sigma_to_t
from cdp_fast.utils.seeding import counter_normal, per_sample_randn

__all__ = ["guided_ddim", "guided_ddpm", "guided_dpmpp_2m", "guided_heun", "SOLVERS", "nfe_of", "evaluate_step",
           "check_eps", "StepAt"]

#: the solvers of :func:`cdp_fast.sample` (``solver=``)
SOLVERS = ("ddim", "ddpm", "dpmpp_2m", "heun")


def check_eps(eps, x, step, t):
    if not isinstance(eps, torch.Tensor):
        raise ValueError(f"model returned {type(eps).__name__} at step {step} (t={t}); expected a tensor")
    if eps.shape != x.shape:
        raise ValueError(
            f"model output at step {step} (t={t}) has shape {tuple(eps.shape)}, expected "
            f"{tuple(x.shape)} (the input's shape)")


def _check_timesteps(alphas_cumprod, timesteps):
    abar = as_alphas_cumprod(alphas_cumprod)
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
    if ts.numel() < 1:
        raise ValueError("timesteps is empty")
    if (ts < 0).any() or (ts >= abar.numel()).any():
        raise ValueError(f"timesteps must lie in [0, {abar.numel() - 1}]")
    if (ts[1:] > ts[:-1]).any():
        raise ValueError("timesteps must be descending")
    return abar, ts.tolist()


def _noise_source(generator, x):
    """A function drawing one (B, *shape) standard normal tensor per call: from B per-sample
    int64 keys (a LongTensor: counter-based noise on the device, :func:`cdp_fast.utils.seeding.
    counter_normal`, no host sync), B per-sample torch.Generators (drawn on CPU per sample),
    one torch.Generator (on CPU), or the device RNG (None)."""
    keys = isinstance(generator, torch.Tensor)
    per_sample = generator is not None and not keys and not isinstance(generator, torch.Generator)
    if (keys or per_sample) and len(generator) != x.shape[0]:
        raise ValueError(f"generator: got {len(generator)} per-sample generators/keys for a batch of {x.shape[0]}")
    if keys:
        keys_dev = generator.to(device=x.device, dtype=torch.int64)
    count = [0]

    def draw():
        if keys:
            count[0] += 1
            return counter_normal(keys_dev, count[0] - 1, x.shape[1:], x.dtype)
        if per_sample:
            return per_sample_randn(generator, x.shape[1:], x.device, x.dtype)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype,
                           device="cpu" if generator is not None else x.device).to(x.device)
    return draw


def evaluate_step(eps_model, guidance, x, t, step, y):
    """(ε, g or None, λ) at (x_t, t): the ε-model (``eps_model``: an :class:`EpsModel`), then
    the guidance (``guidance(x_t, t, eps, step) -> (g, λ) | None``). Shapes: x (B, *shape);
    ε, g (B, *shape). What a :class:`cdp_fast.sampling.graphs.StepGraph` replaces at steady steps."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    with torch.no_grad():
        eps = eps_model(x, t_batch, y)
    check_eps(eps, x, step, t)
    eps = eps.to(x.dtype)
    g, lam = None, 0.0
    if guidance is not None:
        res = guidance(x, t, eps, step)
        if res is not None:
            g, lam = res
    return eps, g, lam


class StepAt(NamedTuple):
    """Where a solver's update is: timestep ``t`` to ``t_prev`` (−1: the end), their ᾱ
    ``a_t`` and ``a_prev`` (1 after t = 0), the noise source ``draw()`` and whether the
    caller wants x̂_0 (``want_x0``)."""

    t: int
    t_prev: int
    a_t: float
    a_prev: float
    draw: Optional[Callable]
    want_x0: bool


#: DPM-Solver++(2M) steps second order only when h_prev >= MIN_STEP_RATIO · h (guided_dpmpp_2m)
MIN_STEP_RATIO = 0.5


def _guided_loop(model, x_T, abar, t_list, update, *, guidance, draw, callback, y, on_step=None,
                 step_graph=None):
    """The loop shared by the solvers: ε-model and guidance (:func:`evaluate_step`, or
    ``step_graph.evaluate``: the same work, captured in a CUDA graph where it can be), then
    ``update(x, eps, g, lam, at) -> (x_prev, x0)`` with ``at`` a :class:`StepAt`;
    repeated timesteps are skipped; non-finite values are reported with their step after the
    loop (no host sync inside it)."""
    eps_model = as_eps_model(model)
    run = evaluate_step if step_graph is None else step_graph.evaluate
    x = x_T
    bad = torch.zeros((), dtype=torch.long, device=x.device)  # first non-finite step + 1 (no host sync)
    for step, t in enumerate(t_list):
        t_prev = t_list[step + 1] if step + 1 < len(t_list) else -1
        if t_prev == t:  # repeated t (quadratic skip): ᾱ_prev = ᾱ_t makes the update the identity
            continue
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        eps, g, lam = run(eps_model, guidance, x, t, step, y)
        finite = torch.isfinite(eps).all()
        if g is not None:
            finite = finite & torch.isfinite(g).all()
        bad = torch.where((bad == 0) & ~finite, torch.full_like(bad, step + 1), bad)
        with torch.no_grad():
            x_new, x0 = update(x, eps, g, float(lam), StepAt(t, t_prev, a_t, a_prev, draw, callback is not None))
        if callback is not None:
            callback({"step": step, "t": t, "x": x_new, "x0": x0, "eps": eps})
        if on_step is not None:
            on_step(step)
        x = x_new
    bad_step = int(bad)  # the loop's only host sync
    if bad_step:
        s = bad_step - 1
        raise ValueError(f"model output or guidance gradient at step {s} (t={t_list[s]}) is not finite")
    return x


def guided_ddim(model, x_T, *, alphas_cumprod, timesteps, guidance=None, eta=0.0,
                generator=None, callback=None, y=None, on_step=None, step_graph=None):
    """Guided DDIM (Algorithm 1 of Contrastive-DP; DDIM eq. (12) with Δ = ε + λ∇ℓ).

    Args:
        model: ε-model, ``model(x, t)`` (or ``model(x, t, y)`` when ``y`` is given); outputs
            with ``.sample`` (diffusers) or tuples are unwrapped (:class:`EpsModel`).
        x_T: (B, *shape) starting noise.
        alphas_cumprod: (T,) ᾱ table (float; see cdp_fast.diffusion.schedule).
        timesteps: (S,) descending LongTensor (cdp_fast.timesteps); after the last entry
            ᾱ_prev = 1; a repeated entry is skipped (its update is the identity).
        guidance: None, or a callable ``guidance(x_t, t, eps, step) -> (g, lam) | None``
            returning ∇_{x_t}ℓ and λ (e.g. :class:`cdp_fast.ContrastiveGuidance`, used for one
            trajectory at a time).
        eta: η ≥ 0; 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
        generator: for η > 0: a torch.Generator, a sequence of B generators (one per sample:
            per-sample noise, drawn on CPU), or a (B,) int64 tensor of per-sample keys
            (counter-based noise drawn on x_T's device: :func:`cdp_fast.utils.seeding.counter_normal`;
            what :func:`sample` uses).
        callback: called as ``callback({"step", "t", "x", "x0", "eps"})`` after each step.
        y: optional (B,) class labels for class-conditional models.
        on_step: called as ``on_step(step)`` after each step (progress; lighter than
            ``callback``: no x̂_0 is kept).
        step_graph: None, or a :class:`cdp_fast.sampling.graphs.StepGraph` that runs the ε-model and
            the guidance of the steady guided steps as one captured CUDA graph (what
            :func:`cdp_fast.sample` passes on CUDA when compiling); same results.
    Returns:
        x_0, (B, *shape) float, model space (≈ [-1, 1]; not clipped).
    """
    abar, t_list = _check_timesteps(alphas_cumprod, timesteps)
    if not (isinstance(eta, (int, float)) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")

    def update(x, eps, g, lam, at: StepAt):
        t, t_prev, a_t, a_prev, draw, want_x0 = at
        sigma, noise = 0.0, None
        if eta > 0 and t_prev >= 0:
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
            noise = draw()
        return ddim_update(x, eps, g, lam=lam, abar_t=a_t, abar_prev=a_prev, sigma=sigma, noise=noise,
                           return_x0=want_x0)

    return _guided_loop(model, x_T, abar, t_list, update, guidance=guidance,
                        draw=_noise_source(generator, x_T), callback=callback, y=y, on_step=on_step,
                        step_graph=step_graph)


def guided_ddpm(model, x_T, *, alphas_cumprod, timesteps, guidance=None, clip_x0=True,
                generator=None, callback=None, y=None, on_step=None, step_graph=None):
    """Guided DDPM ancestral sampling (Ho et al. 2020; the revised paper's DDPM rows and the
    authors' MNIST / GTSRB sampler, ``minimal-diffusion-main/main_nonddp.py``): at each step
    Δ = ε + λ∇ℓ, x̂_0 from Δ (clipped to [-1, 1] when ``clip_x0``), then the posterior mean
    plus √β̃·z (:func:`cdp_fast.ops.ddim.ddpm_update`; noise at every step with t > 0, as
    diffusers' ``DDPMScheduler``).

    Args: as :func:`guided_ddim` (no η: the variance is the posterior's); ``generator``: a
    torch.Generator or B per-sample generators for z.
    Returns:
        x_0, (B, *shape) float, model space.
    """
    abar, t_list = _check_timesteps(alphas_cumprod, timesteps)

    def update(x, eps, g, lam, at: StepAt):
        t, t_prev, a_t, a_prev, draw, want_x0 = at
        return ddpm_update(x, eps, g, lam=lam, abar_t=a_t, abar_prev=a_prev, noise=draw() if t > 0 else None,
                           clip_x0=clip_x0, return_x0=want_x0)

    return _guided_loop(model, x_T, abar, t_list, update, guidance=guidance,
                        draw=_noise_source(generator, x_T), callback=callback, y=y, on_step=on_step,
                        step_graph=step_graph)




def guided_dpmpp_2m(model, x_T, *, alphas_cumprod, timesteps, guidance=None, callback=None, y=None,
                    on_step=None, step_graph=None):
    """Guided DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models", Algorithm 2 — multistep, data prediction).

    With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_next − λ_t, each step converts the guided
    noise prediction ε̃ = ε + λ_g∇ℓ (λ_g the guidance scale) into x̂_0 = (x_t − σ_t ε̃)/α_t and

        first order (first step, and the last step, to σ = 0):
            x_next = (σ_next/σ_t)·x_t − α_next·(e^{−h} − 1)·x̂_0
        second order (midpoint; r = h_prev/h, D1 = (x̂_0 − x̂_0,prev)/r):
            x_next = (σ_next/σ_t)·x_t − α_next·(e^{−h} − 1)·(x̂_0 + D1/2)

    — diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero")`` on the same timesteps (a test).

    Args: as :func:`guided_ddim` (deterministic: no η, no generator). One model evaluation per
    distinct timestep; a repeated timestep is skipped (as are two timesteps with equal ᾱ). A
    step where the guidance switches on or off (a ``guide_window`` edge) is first order: the
    multistep correction would otherwise read the guidance itself as curvature.

    A step over twice as long in λ as the previous one (r = h_prev/h < :data:`MIN_STEP_RATIO`)
    is first order too: the correction's weight 1/(2r) on the difference of two x̂_0 estimates
    grows without bound as r → 0. Uniform grids meet this onto t = 0 (σ_0 = √β_0 ≈ 0.01 puts λ_0
    far out: r = 0.23 at 20 steps); second order there made exact-Gaussian samples 23% too wide
    at 20 NFE and 39% at 10 (diffusers drops t = 0 from its grids; tests/test_solvers.py).
    Returns:
        x_0, (B, *shape), model space.
    """
    abar, t_list = _check_timesteps(alphas_cumprod, timesteps)
    state = {"x0": None, "h": None, "guided": None}

    def update(x, eps, g, lam, at: StepAt):
        t, t_prev, a_t, a_prev, draw, want_x0 = at
        guided = g is not None and lam != 0
        d = eps if not guided else eps + lam * g
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        x0 = (x - sigma_t * d) / alpha_t
        if t_prev < 0 or a_prev >= 1.0:          # to σ = 0: first order gives x̂_0 itself
            x_new, h = x0, None
        elif a_prev == a_t:                      # two timesteps with one ᾱ: h = 0, the identity
            return x, (x0 if want_x0 else None)
        else:
            alpha_s, sigma_s = math.sqrt(a_prev), math.sqrt(1.0 - a_prev)
            h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
            phi = math.expm1(-h)                 # e^{−h} − 1
            target = x0
            # second order from the previous x̂_0 — unless the guidance switched on or off
            # between the two (a window edge): their difference would then be the guidance
            # itself, not the curvature of one ODE, so that step is first order; and unless
            # the step is more than twice the previous one in λ (r < 1/2: see the docstring)
            if (state["x0"] is not None and state["h"] is not None and state["guided"] == guided
                    and state["h"] >= MIN_STEP_RATIO * h):
                r = state["h"] / h
                target = x0 + (x0 - state["x0"]) * (0.5 / r)
            x_new = (sigma_s / sigma_t) * x - (alpha_s * phi) * target
        state["x0"], state["h"], state["guided"] = x0, h, guided
        return x_new, (x0 if want_x0 else None)

    return _guided_loop(model, x_T, abar, t_list, update, guidance=guidance, draw=None, callback=callback, y=y,
                        on_step=on_step, step_graph=step_graph)


def _denoiser_of(model):
    """The :class:`SigmaDenoiser` behind ``model`` (itself or an :class:`EpsModel`'s), or None."""
    inner = model.model if isinstance(model, EpsModel) else model
    return inner if isinstance(inner, SigmaDenoiser) else None


def guided_heun(model, x_T, *, alphas_cumprod, sigmas, guidance=None, callback=None, y=None, on_step=None):
    """Guided EDM Heun sampler (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 1 with S_churn = 0), in σ-space.

    x_σ = x_t/√ᾱ starts at x_T·√(1 + σ_0²) (x_T ~ N(0, I) is the VP-space start every solver
    shares, so solvers compare from the same x_T). With the guided velocity
    d(x_σ, σ) = ε̃ = ε + λ_g∇_{x_t}ℓ(x_t), x_t = x_σ/√(1+σ²) (dx_σ/dσ = ε: the probability-flow
    ODE in σ-space; EDM's d = (x − D)/σ with D̃ = x − σ·ε̃):

        x̃ = x_i + (σ_{i+1} − σ_i)·d(x_i, σ_i)
        x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d(x_i, σ_i) + d(x̃, σ_{i+1}))/2     if σ_{i+1} > 0, else x̃

    — 2n − 1 function evaluations for n noise levels, diffusers' ``HeunDiscreteScheduler``
    (``use_karras_sigmas=True``) on the same σ's (a test). The guidance runs at every
    evaluation (its ``step`` counts evaluations; its t is the table timestep nearest σ). For a
    stateful guidance that means: with ``positive="previous"`` the positive of an evaluation is
    the previous *evaluation's* features (a corrector is paired with its own predictor, the next
    step's predictor with the corrector's Euler point x̃), and an online head takes one step per
    evaluation (2n − 1 in all).

    Args:
        model: an ε-model, called at x_t with the fractional timestep t(σ) (log-linear in the
            table, as diffusers and k-diffusion: the model must accept float timesteps), or a
            :class:`SigmaDenoiser`, called as D(x_σ, σ).
        x_T: (B, *shape) VP-space start. sigmas: (n + 1,) descending, last 0
            (:func:`cdp_fast.diffusion.schedule.karras_sigmas`). alphas_cumprod: (T,) ᾱ table (the
            ε-model's timesteps; for a denoiser only the guidance's t).
        guidance, callback, y, on_step: as :func:`guided_ddim`; the callback gets
            {"step", "t", "sigma", "x" (VP space at σ_{i+1}), "x0" (guided x̂_0), "eps"}.
    Returns:
        x_0, (B, *shape), model space.
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    if len(sig) < 2 or sig[-1] != 0.0 or any(s <= 0 for s in sig[:-1]) or any(
            b >= a for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError("sigmas must be descending, positive, and end in 0 (cdp_fast.diffusion.schedule.karras_sigmas)")
    eps_model = as_eps_model(model)
    den = _denoiser_of(model)
    B = x_T.shape[0]
    bad = torch.zeros((), dtype=torch.long, device=x_T.device)
    nfe = [0]
    where = []

    # the table timestep of every noise level, once (each level is evaluated once or twice)
    t_of = dict(zip(sig, sigma_to_t(torch.tensor(sig, dtype=torch.float64), abar).tolist()))

    def velocity(x, s):
        """(ε̃, ε, t) at (x_σ, σ); ``bad`` records the first evaluation that is not finite."""
        nonlocal bad
        n = nfe[0]
        nfe[0] += 1
        t = t_of[s]
        x_t = x / math.sqrt(1.0 + s * s)
        with torch.no_grad():
            if den is not None:
                # the compiled σ-space forward when sample() compiled the model; σ as a (B,)
                # tensor made on the device (no host copy, no recompile per σ)
                run = den.sigma_runner if den.sigma_runner is not None else den.eps_at_sigma
                eps = run(x, x.new_full((B,), s), y)
            else:
                eps = eps_model(x_t, torch.full((B,), t, dtype=torch.float32, device=x.device), y)
        check_eps(eps, x, n, t)
        eps = eps.to(x.dtype)
        d = eps
        finite = torch.isfinite(eps).all()
        if guidance is not None:
            res = guidance(x_t, int(round(t)), eps, n)
            if res is not None:
                g, lam = res
                d = eps + float(lam) * g
                finite = finite & torch.isfinite(g).all()
        bad = torch.where((bad == 0) & ~finite, torch.full_like(bad, n + 1), bad)
        where.append(t)
        return d, eps, t

    x = x_T * math.sqrt(1.0 + sig[0] ** 2)
    for i, (s, s_next) in enumerate(zip(sig[:-1], sig[1:])):
        d, eps, t = velocity(x, s)
        with torch.no_grad():
            x_new = x + (s_next - s) * d
        if s_next > 0:
            d2, _, _ = velocity(x_new, s_next)
            with torch.no_grad():
                x_new = x + (s_next - s) * 0.5 * (d + d2)
        if callback is not None:
            callback({"step": i, "t": t, "sigma": s, "x": x_new / math.sqrt(1.0 + s_next ** 2), "x0": x - s * d,
                      "eps": eps})
        if on_step is not None:
            on_step(i)
        x = x_new
    bad_n = int(bad)  # the loop's only host sync
    if bad_n:
        raise ValueError(f"model output or guidance gradient at evaluation {bad_n - 1} (t={where[bad_n - 1]:.1f}) "
                         "is not finite")
    return x


def nfe_of(solver: str, timesteps=None, sigmas=None) -> int:
    """Network evaluations per sample: one per distinct timestep (DDIM, DDPM, DPM-Solver++;
    a repeated timestep is skipped), 2n − 1 for Heun on n noise levels."""
    if solver == "heun":
        return 2 * (len(sigmas) - 1) - 1
    ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
    return sum(1 for i, t in enumerate(ts) if i + 1 >= len(ts) or ts[i + 1] != t)
