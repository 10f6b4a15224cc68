"""The fast solvers (cdp_fast.diffusion.solvers): DPM-Solver++(2M) and EDM Heun against diffusers'
schedulers (oracles no one here wrote), the σ-space parameterisation against exact answers
(a Gaussian mixture whose denoiser is known in closed form), the guidance at every
evaluation, and sample()'s solver / nfe wiring.

Tolerances: the diffusers comparisons run the same fp32 UNet on the same inputs; the schedulers
keep σ's in fp32 where we use fp64, so per-step coefficients differ by ~1e-7 relative, which 10-40
steps of a contracting ODE leave below 1e-4 (measured: < 2e-5); we allow 1e-3 (issue 16). The
closed-form tests are fp64: rounding only (1e-10), or the solver's own discretisation error where
a convergence order is claimed.
"""
import math

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.diffusion.adapters import SigmaDenoiser
from cdp_fast.diffusion.schedule import karras_sigmas, make_alphas_cumprod, sigma_to_t, sigmas_of, t_to_sigma
from cdp_fast.diffusion.solvers import guided_ddim, guided_dpmpp_2m, guided_heun, nfe_of


def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("steps,skip", [(10, "uniform"), (20, "quadratic"), (7, "uniform"), (20, "logsnr")])
def test_dpmpp_2m_matches_diffusers(steps, skip, monkeypatch):
    """λ = 0: guided_dpmpp_2m == DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint,
    final σ = 0) on the same timesteps, same x_T, same UNet. diffusers takes the step onto t = 0
    of a uniform grid second order (r = h_prev/h ≈ 0.2); ours takes it first order
    (solvers.MIN_STEP_RATIO, the exact-Gaussian tests below show why), so on those grids the
    formulas are compared with the rule off; the quadratic and log-SNR grids keep r ≥ 1/2."""
    from diffusers import DPMSolverMultistepScheduler

    from cdp_fast.diffusion import solvers

    if skip == "uniform":
        monkeypatch.setattr(solvers, "MIN_STEP_RATIO", 0.0)
    unet = _unet()
    abar = make_alphas_cumprod("linear", 1000)
    ts = cdp_fast.timesteps(1000, steps, skip, alphas_cumprod=abar)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = guided_dpmpp_2m(unet, x_T, alphas_cumprod=abar, timesteps=ts)
        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear",
                                            algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", final_sigmas_type="zero")
        sched.set_timesteps(timesteps=ts.tolist())
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert float((ours - x).abs().max()) <= 1e-3
    assert nfe_of("dpmpp_2m", ts) == len(sched.timesteps)


# ----------------------------------------------------------------------------- exact-score oracles
# Gaussian data N(μ, s²I) in 16 dims (μ = linspace(−0.5, 0.5), s = 0.5) and a two-Gaussian
# mixture, whose ε(x_t, t) is closed-form, so every sampler error is the solver's: the samples'
# std and mean against the data's, beside diffusers' DPMSolverMultistepScheduler (dpmsolver++,
# order 2) on the same model and x_T: with use_lu_lambdas (uniform in log-SNR: the very grid of
# ours) for logsnr, and at its default "linspace" spacing for uniform and quadratic, whose grids
# it lacks (its "leading" drops t = 0, so it is not our uniform grid either: at 10 NFE its
# error is 15.9% against 18.8% trailing and 19.0% linspace; ours, uniform, 17.9%). 4,096
# samples: the std estimate's own noise is ~0.002 and shared (paired x_T), so 2% of the target
# is a real margin.
_DIFFUSERS_SPACING = {"uniform": dict(timestep_spacing="linspace"), "quadratic": dict(timestep_spacing="linspace"),
                      "logsnr": dict(use_lu_lambdas=True)}
_G_MU, _G_S = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64), 0.5


def _gaussian_eps(abar):
    def eps(x, t):
        a = abar[t].view(-1, 1)
        return (x - a.sqrt() * _G_MU) * (1 - a).sqrt() / (a * _G_S ** 2 + 1 - a)
    return eps


def _diffusers_dpmpp(eps, x_T, nfe, skip):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="zero", **_DIFFUSERS_SPACING[skip])
    sched.set_timesteps(nfe)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(eps(x, torch.full((len(x),), int(t))), t, x).prev_sample
    return x


def _ours(eps, x_T, nfe, skip, abar):
    steps = cdp_fast.sampling.options.steps_for("dpmpp_2m", nfe, nfe, 1000, skip, alphas_cumprod=abar)
    ts = cdp_fast.timesteps(1000, steps, skip, alphas_cumprod=abar)
    assert nfe_of("dpmpp_2m", ts) == nfe
    return guided_dpmpp_2m(eps, x_T, alphas_cumprod=abar, timesteps=ts)


@pytest.mark.parametrize("nfe", [10, 20, 50])
@pytest.mark.parametrize("skip", ["uniform", "quadratic", "logsnr"])
def test_dpmpp_2m_on_an_exact_gaussian_is_within_diffusers_error(skip, nfe):
    """Every spacing the sampler offers, NFE 10 / 20 / 50: the std error is at most diffusers'
    at the same NFE plus 2% of the target (uniform before the step-ratio rule: 39% / 23% / 5.8%
    too wide, against diffusers' 19% / 4.4% / 0.2%), the mean error at most diffusers' plus
    0.01; and within 4% at 20 NFE and more."""
    pytest.importorskip("diffusers")
    abar = make_alphas_cumprod("linear", 1000)
    eps = _gaussian_eps(abar)
    x_T = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = _ours(eps, x_T, nfe, skip, abar)
    ref = _diffusers_dpmpp(eps, x_T, nfe, skip)
    std_err = abs(float(ours.std(0).mean()) / _G_S - 1)
    ref_err = abs(float(ref.std(0).mean()) / _G_S - 1)
    assert std_err <= ref_err + 0.02, (std_err, ref_err)
    assert float((ours.mean(0) - _G_MU).abs().max()) <= float((ref.mean(0) - _G_MU).abs().max()) + 0.01
    if nfe >= 20:
        assert std_err <= 0.04, std_err


@pytest.mark.parametrize("nfe", [10, 20])
@pytest.mark.parametrize("skip", ["uniform", "quadratic", "logsnr"])
def test_dpmpp_2m_on_an_exact_mixture_is_within_diffusers_error(skip, nfe):
    """The same on ½N(μ, s₀²I) + ½N(−μ, s₀²I) (theory.mixture.MixtureEps: closed-form ε):
    per-dimension std √(s₀² + μ²), and the share of samples on μ's side ½."""
    pytest.importorskip("diffusers")
    from cdp_fast.theory.mixture import MixtureEps

    abar = make_alphas_cumprod("linear", 1000)
    mix = MixtureEps(mu=(1.0, 1.0), s0=0.5, alphas_cumprod=abar)
    target = math.sqrt(0.25 + 1.0)
    x_T = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = _ours(mix, x_T, nfe, skip, abar)
        ref = _diffusers_dpmpp(mix, x_T, nfe, skip)
    std_err = abs(float(ours.std(0).mean()) / target - 1)
    ref_err = abs(float(ref.std(0).mean()) / target - 1)
    assert std_err <= ref_err + 0.02, (std_err, ref_err)
    assert abs(float((ours.sum(1) > 0).double().mean()) - 0.5) <= 0.03


@pytest.mark.parametrize("n", [5, 10, 20])
def test_heun_on_an_exact_gaussian_is_diffusers_heun_and_its_low_nfe_error_is_the_methods(n):
    """Heun's low-NFE failure on digits (9 NFE: precision 0.25) is the method on that σ grid,
    not the code: on the exact Gaussian at the same Karras σ's (ρ = 7, σ from the table's 157 to
    0.01) guided_heun equals diffusers' HeunDiscreteScheduler to 2e-4, and both come out too wide
    by the same factor — 2.75 at 9 NFE (5 levels: the trapezoid step from σ 5.9 to 0.49
    overshoots), 1.26 at 19, 1.05 at 39."""
    from diffusers import HeunDiscreteScheduler

    from cdp_fast.diffusion.schedule import t_to_sigma

    abar = make_alphas_cumprod("linear", 1000)

    def eps(x, t):                                 # exact ε at fractional t (σ by log-σ interpolation)
        a = (1 / (1 + t_to_sigma(torch.as_tensor(t, dtype=torch.float64), abar) ** 2)).view(-1, 1)
        return (x - a.sqrt() * _G_MU) * (1 - a).sqrt() / (a * _G_S ** 2 + 1 - a)

    table = sigmas_of(abar)
    sig = karras_sigmas(n, float(table[0]), float(table[-1]))
    x_T = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = guided_heun(eps, x_T, alphas_cumprod=abar, sigmas=sig)
    sched = HeunDiscreteScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  use_karras_sigmas=True)
    sched.set_timesteps(n)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(eps(sched.scale_model_input(x, t), t.double().expand(len(x))), t, x).prev_sample
    assert float((ours - x).abs().max()) <= 2e-4 * float(x.abs().max())
    ratio = float(ours.std(0).mean()) / _G_S
    assert ratio == pytest.approx({5: 2.75, 10: 1.26, 20: 1.05}[n], abs=0.01)


@pytest.mark.parametrize("n", [3, 10])
def test_heun_matches_diffusers(n):
    """λ = 0: guided_heun on an ε-model == HeunDiscreteScheduler(use_karras_sigmas=True) with
    the same n noise levels (2n − 1 evaluations, fractional timesteps), same start."""
    from diffusers import HeunDiscreteScheduler

    unet = _unet()
    abar = make_alphas_cumprod("linear", 1000)
    table = sigmas_of(abar)
    sig = karras_sigmas(n, float(table[0]), float(table[-1]))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = guided_heun(unet, x_T, alphas_cumprod=abar, sigmas=sig)
        sched = HeunDiscreteScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", use_karras_sigmas=True)
        sched.set_timesteps(n)
        torch.testing.assert_close(sched.sigmas.double(), torch.cat([sig[:1], sig[1:-1].repeat_interleave(2),
                                                                     sig[-1:]]), rtol=1e-5, atol=0)
        x = x_T * math.sqrt(1 + float(sig[0]) ** 2)           # the same x_σ start
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert len(sched.timesteps) == 2 * n - 1 == nfe_of("heun", sigmas=sig)
    # an untrained UNet's ε is not the data's, so x_0 ends far from [-1, 1] (|x| ~ 300 here,
    # where one fp32 ulp is 3e-5): 1e-3 relative to that scale (measured 3.7e-5 · max|x|)
    assert float((ours - x).abs().max()) <= 1e-3 * max(1.0, float(x.abs().max()))


def test_sigma_t_conversions_round_trip():
    """σ(t) and t(σ) are inverse on the table's range; integer t gives the table's σ_t; the
    ε-view of a SigmaDenoiser built from an ε-model returns that ε-model (fp64, rounding only)."""
    abar = make_alphas_cumprod("linear", 1000).double()
    t = torch.tensor([0.0, 0.3, 17.0, 499.5, 998.25, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, abar), abar), t, rtol=0, atol=1e-7)
    ti = torch.arange(0, 1000, 37)
    torch.testing.assert_close(t_to_sigma(ti, abar), sigmas_of(abar)[ti], rtol=1e-12, atol=0)
    assert float(sigma_to_t(1e6, abar)) == 999 and float(sigma_to_t(1e-9, abar)) == 0   # clamped

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def eps_model(x, t):
        return torch.tanh(x @ w) + 1e-3 * t.double()[:, None]

    def denoiser(x_sigma, sigma):      # D built from the ε-model: x̂0 = x_σ − σ·ε(x_σ/√(1+σ²), t(σ))
        s = sigma.double()
        tt = sigma_to_t(s, abar)
        return x_sigma - s[:, None] * eps_model(x_sigma / (1 + s[:, None] ** 2).sqrt(), tt)

    view = SigmaDenoiser(denoiser, sigma_min=0.01, sigma_max=150).on_table(abar)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    for tv in (0, 400, 999):
        tb = torch.full((5,), tv)
        torch.testing.assert_close(view(x, tb), eps_model(x, tb), rtol=1e-7, atol=1e-7)


class _GaussianMixture:
    """1-D data p(x0) = Σ_k w_k N(μ_k, s_k²): the exact denoiser D*(x_σ, σ) = E[x0 | x_σ] and,
    for one component, the exact probability-flow ODE solution (Karras et al. 2022, eq. (3):
    x_σ = μ + (x_{σ0} − μ)·√(s² + σ²)/√(s² + σ0²))."""

    def __init__(self, w, mu, s):
        self.w, self.mu, self.s = (torch.tensor(v, dtype=torch.float64) for v in (w, mu, s))

    def __call__(self, x, sigma):
        x, sigma = x.double(), sigma.double().reshape(-1, *([1] * (x.dim() - 1)))
        var = self.s ** 2 + sigma[..., None] ** 2                         # (..., K)
        logp = torch.log(self.w) - 0.5 * (x[..., None] - self.mu) ** 2 / var - 0.5 * var.log()
        r = torch.softmax(logp, dim=-1)
        post = self.mu + self.s ** 2 / var * (x[..., None] - self.mu)   # E[x0 | x_σ, k]
        return (r * post).sum(-1)


def test_heun_on_an_exact_denoiser_converges_at_second_order():
    """One Gaussian N(μ, s²): Heun's endpoint error against the exact ODE solution falls ~4×
    per doubling of the levels (2nd order; measured 5.5, 4.6, 4.3; Euler would halve it), and
    is < 5e-3 at 64 levels (from a start of magnitude ~80: 4e-5 relative; measured 2.8e-3)."""
    mu, s = 0.7, 0.3
    den = SigmaDenoiser(_GaussianMixture([1.0], [mu], [s]), sigma_min=0.002, sigma_max=80.0)
    abar = make_alphas_cumprod("linear", 1000).double()
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errs = []
    for n in (8, 16, 32, 64):
        sig = karras_sigmas(n, 0.002, 80.0)
        x0 = guided_heun(den, x_T, alphas_cumprod=abar, sigmas=sig)
        start = x_T * math.sqrt(1 + 80.0 ** 2)
        exact = mu + (start - mu) * s / math.sqrt(s ** 2 + 80.0 ** 2)      # ODE to σ = 0
        errs.append(float((x0 - exact).abs().max()))
    assert errs[-1] < 5e-3, errs
    assert all(b < a / 3.5 for a, b in zip(errs, errs[1:])), errs


def test_denoiser_and_eps_model_give_the_same_ddim_and_dpmpp_samples():
    """A two-component mixture: the SigmaDenoiser of its exact D* and the exact ε-model of the
    same data on the VP table (ε* = (x_t − √ᾱ·E[x0|x_t])/√(1−ᾱ)) give the same DDIM and
    DPM-Solver++ trajectories (fp64: the parameterisation changes nothing)."""
    gm = _GaussianMixture([0.3, 0.7], [-1.0, 0.8], [0.2, 0.4])
    abar = make_alphas_cumprod("linear", 1000).double()

    def eps_star(x_t, t):
        a = abar[t].double()[:, None]
        sigma = ((1 - a) / a).sqrt()
        return (x_t - a.sqrt() * gm(x_t / a.sqrt(), sigma[:, 0])) / (1 - a).sqrt()

    den = SigmaDenoiser(gm, sigma_min=0.01, sigma_max=150.0)
    x_T = torch.randn(32, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = cdp_fast.timesteps(1000, 25, "quadratic")
    for solver in (guided_ddim, guided_dpmpp_2m):
        a = solver(den.on_table(abar), x_T, alphas_cumprod=abar, timesteps=ts)
        b = solver(eps_star, x_T, alphas_cumprod=abar, timesteps=ts)
        # the ε-view interpolates log σ in fp64 (exp/log rounding ~1e-9 at the ends of the table)
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    # and the samples land on the mixture: both modes, in the right proportion
    x0 = guided_dpmpp_2m(eps_star, torch.randn(4000, 1, generator=torch.Generator().manual_seed(5),
                                                dtype=torch.float64), alphas_cumprod=abar, timesteps=ts)
    frac = float((x0 > -0.1).double().mean())
    assert abs(frac - 0.7) < 0.03, frac


def test_heun_runs_the_guidance_at_every_evaluation():
    """2n − 1 guidance calls, the first with step 0 (a new trajectory), at the table timestep
    nearest each σ; λ∇ℓ moves the samples."""
    calls = []

    def guidance(x_t, t, eps, step):
        calls.append((step, t))
        return torch.ones_like(x_t), 0.05

    den = SigmaDenoiser(_GaussianMixture([1.0], [0.0], [0.5]))
    abar = make_alphas_cumprod("linear", 1000).double()
    x_T = torch.randn(4, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sig = karras_sigmas(5, 0.002, 80.0)
    guided = guided_heun(den, x_T, alphas_cumprod=abar, sigmas=sig, guidance=guidance)
    plain = guided_heun(den, x_T, alphas_cumprod=abar, sigmas=sig)
    assert [c[0] for c in calls] == list(range(9))
    assert calls[0][1] == round(float(sigma_to_t(80.0, abar))) == 930       # EDM's σ_max on the VP table
    assert calls[-1][1] == round(float(sigma_to_t(sig[-2], abar)))
    assert float((guided - plain).abs().min()) > 1e-3


class _CondDenoiser(torch.nn.Module):
    """An EDM-style class-conditional denoiser taking one-hot labels (B, K)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(3, 4, bias=False)

    def forward(self, x, sigma, class_labels):
        assert class_labels.shape == (x.shape[0], 3) and sigma.shape == (x.shape[0],)
        c = self.emb(class_labels).view(-1, 1, 2, 2)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + 0.1 * c


def test_sample_with_solvers_and_nfe():
    """sample(): every solver runs an ε-model or a class-conditional EDM-style denoiser; nfe sets
    the steps and is recorded; bad nfe values fail in one line."""
    from cdp_fast.models.unet import UNet

    eps = UNet(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1).eval()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss=None)
    for solver, nfe in (("ddim", 10), ("dpmpp_2m", 10), ("heun", 9), ("ddpm", 10), ("dpmpp_2m", 40)):
        s = cdp_fast.sample(eps, 4, solver=solver, nfe=nfe, skip="quadratic", **kw)
        assert s.meta["nfe"] == nfe and np.isfinite(s.images).all()
    den = SigmaDenoiser(_CondDenoiser(), one_hot_classes=3)
    kw.update(image_shape=(1, 2, 2), num_classes=3)
    for solver in ("heun", "dpmpp_2m", "ddim"):
        s = cdp_fast.sample(den, 4, solver=solver, nfe=5, **kw)
        assert s.meta["nfe"] == 5 and s.labels is not None and np.isfinite(s.images).all()
    with pytest.raises(ValueError, match="odd nfe"):
        cdp_fast.sample(den, 4, solver="heun", nfe=6, **kw)
    with pytest.raises(ValueError, match="eta"):
        cdp_fast.sample(den, 4, solver="dpmpp_2m", eta=0.5, **kw)


def test_guided_solvers_stream_resume_and_record_nfe(tmp_path):
    """A guided Heun run streamed to shards records its NFE in the manifest and resumes to the
    same images (deterministic solver, per-sample x_T)."""
    from cdp_fast.models.unet import UNet

    eps = UNet(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1).eval()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss="hnm", lam=5.0, tau=0.5,
              features="pixels", solver="heun", nfe=7, shard_size=4, guide_window=None)
    first = cdp_fast.sample(eps, 8, out=str(tmp_path / "a"), **kw)
    assert first.meta["nfe"] == 7
    import json
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["nfe"] == 7 and man["args"]["skip"] is None          # Heun has no timestep spacing
    kept = np.asarray(first.images).copy()
    (tmp_path / "a" / "shard-000001.npz").unlink()                   # an interrupted run: resume it
    again = cdp_fast.sample(eps, 8, out=str(tmp_path / "a"), **kw)
    np.testing.assert_array_equal(np.asarray(again.images), kept)
    with pytest.raises(ValueError, match="solver"):                  # another solver refuses to resume
        cdp_fast.sample(eps, 8, out=str(tmp_path / "a"), **dict(kw, solver="dpmpp_2m"))
    mem = cdp_fast.sample(eps, 8, **kw)
    np.testing.assert_array_equal(np.asarray(mem.images), kept)


def test_lambda_rule_guidance_displacement_does_not_depend_on_the_solver_or_nfe():
    """The λ rule (README "Fast solvers"): the guidance enters every solver as the velocity term
    of one ODE, ε̃ = ε + λ·g, so its effect on x_0 is an integral over σ, not a per-step kick:
    at the same λ, DDIM at 200 / 50 / 10 steps, DPM-Solver++(2M) at 10 / 20 / 40 and Heun at
    19 / 39 evaluations move the samples by the same amount (same σ range, 1-D Gaussian data,
    exact ε, a constant push g in x_t space), up to the solvers' discretisation error, which
    shrinks with NFE: measured (shift relative to DDIM-200) 1.01 / 1.09 DDIM-50 / 10; 0.89 /
    1.13 / 1.06 DPM-Solver++ 10 / 20 / 40; 0.74 / 0.97 Heun 19 / 39. Allowed: 8% at ≥ 39 NFE,
    35% below. A per-step rule (λ ∝ 1/NFE or ∝ NFE) would change it 20× between 10 and 200
    steps. Heun at 9 evaluations (5 levels from σ = 157) is outside its accurate range here (its
    push even changes sign), as on the digits (README "Fast solvers")."""
    gm = _GaussianMixture([1.0], [0.2], [0.5])
    abar = make_alphas_cumprod("linear", 1000).double()

    def eps_star(x_t, t):
        a = abar[t.round().long()].double()[:, None] if t.is_floating_point() else abar[t].double()[:, None]
        sigma = ((1 - a) / a).sqrt()
        return (x_t - a.sqrt() * gm(x_t / a.sqrt(), sigma[:, 0])) / (1 - a).sqrt()

    den = SigmaDenoiser(gm, sigma_min=float(sigmas_of(abar)[0]), sigma_max=float(sigmas_of(abar)[-1]))
    x_T = torch.randn(256, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def push(x_t, t, eps, step):
        return torch.full_like(x_t, 1.0), 0.02

    shifts = {}
    for name, nfe in (("ddim", 200), ("ddim", 50), ("ddim", 10), ("dpmpp_2m", 10), ("dpmpp_2m", 20),
                      ("dpmpp_2m", 40), ("heun", 19), ("heun", 39)):
        if name == "heun":
            sig = karras_sigmas((nfe + 1) // 2, den.sigma_min, den.sigma_max)
            run = lambda g: guided_heun(den, x_T, alphas_cumprod=abar, sigmas=sig, guidance=g)  # noqa: E731
        else:
            ts = torch.linspace(999, 0, nfe).round().long()
            solver = guided_ddim if name == "ddim" else guided_dpmpp_2m
            run = lambda g: solver(eps_star, x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)  # noqa: E731
        shifts[(name, nfe)] = float((run(push) - run(None)).mean())
    ref = shifts[("ddim", 200)]
    assert ref < -1e-2, shifts                        # the push moves the samples
    msg = " ".join(f"{k[0]}{k[1]}:{v / ref:.3f}" for k, v in shifts.items())
    for (name, nfe), v in shifts.items():
        assert abs(v / ref - 1) < (0.08 if nfe >= 39 else 0.35), msg


def _bench(name):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_solver_benchmark_intervals_and_quality_matched_choice():
    """benchmarks/solvers.py: the t-interval is right (3 values: mean ± 4.303·sd/√3), paired
    differences are per seed, and the quality-matched setting is the fewest-NFE guided one
    whose precision and recall means lie inside guided DDIM-200's interval."""
    sb = _bench("solvers")
    c = sb.ci([1.0, 2.0, 3.0])
    assert c["mean"] == 2.0 and abs(c["hi"] - (2.0 + 4.303 / math.sqrt(3))) < 1e-9

    def rows(solver, nfe, spacing, prec, rec, shift=0.0):
        return [dict(seed=s, solver=solver, nfe=nfe, spacing=spacing, guided=g, seconds=1.0,
                     fisher_ratio=0.8 + 0.01 * s - (0.05 if g else 0.0), precision=prec + 0.002 * s + shift,
                     recall=rec + 0.002 * s, balance=0.98, agreement=0.9) for s in (0, 1, 2) for g in (True, False)]
    data = (rows("ddim", 200, "uniform", 0.85, 0.97) + rows("ddim", 10, "uniform", 0.95, 0.90)
            + rows("dpmpp_2m", 10, "quadratic", 0.851, 0.971) + rows("heun", 9, "karras", 0.30, 0.99)
            + rows("heun", 19, "karras", 0.85, 0.97))
    summ = sb.summarise(data)
    assert summ["quality_matched"] == {"solver": "dpmpp_2m", "nfe": 10, "skip": "quadratic"}
    (e,) = [e for e in summ["conditions"] if e["solver"] == "ddim" and e["nfe"] == 10 and e["guided"]]
    assert not e["inside_ddim200_interval"]
    assert abs(e["fisher_ratio_guidance_effect"]["mean"] + 0.05) < 1e-12          # paired, per seed
    assert abs(e["precision_minus_ddim200"]["mean"] - 0.10) < 1e-12
    assert "| dpmpp_2m | quadratic | 10 |" in sb.table(summ)


@pytest.mark.slow
def test_solver_benchmark_runs_end_to_end(tmp_path):
    """A tiny run of benchmarks/solvers.py (16 samples, one seed, two conditions): rows for
    guided and unguided, finite metrics, NFE as asked; table and plot are written; throughput.py
    --quality-matched reads the setting back, and refuses a file without one (exit 2)."""
    sb = _bench("solvers")
    res = sb.run(32, [0], conditions=[("ddim", 4, "uniform"), ("heun", 3, "karras")], progress=lambda *_: None)
    assert {(r["solver"], r["nfe"], r["guided"]) for r in res["rows"]} == {
        ("ddim", 4, True), ("ddim", 4, False), ("heun", 3, True), ("heun", 3, False)}
    assert all(np.isfinite([r[k] for k in sb.METRICS]).all() for r in res["rows"])
    sb.plot(res["summary"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    tp = _bench("throughput")
    import json
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"summary": {"quality_matched": {"solver": "heun", "nfe": 19, "skip": "uniform"},
                                            "no_worse_than_ddim200": {"solver": "dpmpp_2m", "nfe": 10,
                                                                      "skip": "quadratic"}}}))
    args = tp.parse_args(["--quality-matched", str(good), "--methods", "hnm"])
    assert args.matched == ("heun", 19, "uniform") and args.methods == ["hnm", "hnm-ddim200", "hnm-matched"]
    args = tp.parse_args(["--quality-matched", str(good), "--match-rule", "no-worse"])
    assert args.matched == ("dpmpp_2m", 10, "quadratic")
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"summary": {"quality_matched": None}}))
    with pytest.raises(SystemExit) as e:
        tp.parse_args(["--quality-matched", str(bad)])
    assert e.value.code == 2


def test_dpmpp_edge_cases_equal_alphas_and_window_edges():
    """Two distinct timesteps with one ᾱ are the identity (h = 0), not a division by zero; at a
    guidance-window edge the step is first order (the history would otherwise read the guidance
    itself as curvature), so guiding only the first step equals a run whose first step's
    history is reset."""
    abar = make_alphas_cumprod("linear", 1000).double().clone()
    abar[500] = abar[499]
    gm = _GaussianMixture([1.0], [0.1], [0.4])

    def eps_star(x_t, t):
        a = abar[t].double()[:, None]
        return (x_t - a.sqrt() * gm(x_t / a.sqrt(), ((1 - a) / a).sqrt()[:, 0])) / (1 - a).sqrt()

    x_T = torch.randn(8, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a = guided_dpmpp_2m(eps_star, x_T, alphas_cumprod=abar, timesteps=torch.tensor([700, 500, 499, 300, 0]))
    b = guided_dpmpp_2m(eps_star, x_T, alphas_cumprod=abar, timesteps=torch.tensor([700, 500, 300, 0]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = []

    def first_only(x_t, t, eps, step):          # a window covering the first step only
        steps.append(step)
        return (torch.ones_like(x_t), 0.5) if step == 0 else None

    ts = torch.tensor([900, 700, 500, 300, 100, 0])
    guided = guided_dpmpp_2m(eps_star, x_T, alphas_cumprod=abar, timesteps=ts, guidance=first_only)
    plain = guided_dpmpp_2m(eps_star, x_T, alphas_cumprod=abar, timesteps=ts)
    assert steps == list(range(6)) and float((guided - plain).abs().max()) > 1e-3
    # the second step (guidance off, history guided) is first order: reproduce it by hand
    states = []
    guided_dpmpp_2m(eps_star, x_T, alphas_cumprod=abar, timesteps=ts, guidance=first_only,
                    callback=lambda d: states.append(d["x"]))
    rest = guided_dpmpp_2m(eps_star, states[0], alphas_cumprod=abar, timesteps=ts[1:])   # fresh history
    torch.testing.assert_close(guided, rest, rtol=1e-12, atol=1e-12)


def test_heun_on_a_table_that_starts_at_alpha_bar_one_and_denoiser_settings_are_recorded(tmp_path):
    """ᾱ_0 = 1 (σ_0 = 0) is allowed: Heun starts from the first positive σ. A SigmaDenoiser's σ
    range is part of the run: resuming with another refuses; a plain-callable denoiser is
    fingerprinted by its behaviour (another function behind the same wrapper refuses)."""
    from cdp_fast.models.unet import UNet

    abar = make_alphas_cumprod("linear", 1000).double().clone()
    abar[0] = 1.0
    eps = UNet(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1).eval()
    s = cdp_fast.sample(eps, 2, loss=None, solver="heun", nfe=5, alphas_cumprod=abar, image_shape=(1, 8, 8),
                        progress=False, output="float", batch_size=2)
    assert np.isfinite(s.images).all()

    def d1(x, sigma):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    def d2(x, sigma):
        return 0.5 * x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    kw = dict(loss=None, solver="heun", nfe=5, image_shape=(1, 2, 2), progress=False, output="float",
              batch_size=2, shard_size=2)
    out = str(tmp_path / "o")
    cdp_fast.sample(SigmaDenoiser(d1), 4, out=out, **kw)
    with pytest.raises(ValueError, match="sigma_range"):
        cdp_fast.sample(SigmaDenoiser(d1, sigma_max=50.0), 4, out=out, **kw)
    with pytest.raises(ValueError, match="model"):
        cdp_fast.sample(SigmaDenoiser(d2), 4, out=out, **kw)


@pytest.mark.slow
def test_compiled_denoiser_runs_heun_through_the_compiled_sigma_path():
    """compile=True on a SigmaDenoiser compiles its σ-space forward too, and Heun uses it:
    the same samples as eager (fp32: 1e-5)."""
    torch._dynamo.reset()
    den = SigmaDenoiser(_CondDenoiser(), one_hot_classes=3)
    kw = dict(loss=None, solver="heun", nfe=5, image_shape=(1, 2, 2), progress=False, output="float",
              batch_size=4, num_classes=3)
    eager = cdp_fast.sample(den, 4, compile=False, **kw)
    calls, runs = [], []
    from cdp_fast.utils import runtime
    real = runtime.compile_frozen

    def spy(fn, module=None):
        name = getattr(fn, "__name__", "")
        calls.append(name)
        compiled = real(fn, module)

        def counted(*a):
            runs.append(name)
            return compiled(*a)
        return counted
    import unittest.mock as um
    with um.patch.object(runtime, "compile_frozen", spy):
        compiled = cdp_fast.sample(den, 4, compile=True, **kw)
    assert "eps_at_sigma" in calls
    assert runs.count("eps_at_sigma") == 5          # every Heun evaluation went through the compiled path
    np.testing.assert_allclose(compiled.images, eager.images, rtol=1e-5, atol=1e-5)
