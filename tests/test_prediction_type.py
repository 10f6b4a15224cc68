"""diffusers' ``prediction_type`` (issue 23, F3): a "v_prediction" or "sample" UNet loaded from a
folder is converted exactly to ε (cdp_fast.diffusion.adapters.EpsFromPrediction) for every
solver, checked against diffusers' own schedulers set to the same prediction_type on the same
UNet, x_T, timesteps and noise; an unknown prediction_type is a clear error."""
import math

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler)  # noqa: E402

import cdp_fast  # noqa: E402
from cdp_fast.diffusion import solvers  # noqa: E402
from cdp_fast.diffusion.adapters import EpsFromPrediction, call_model, load_diffusers_unet  # noqa: E402
from cdp_fast.diffusion.schedule import karras_sigmas, sigmas_of  # noqa: E402
from tiny_models import small_diffusers_unet  # noqa: E402

TYPES = ("epsilon", "v_prediction", "sample")
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One pipeline-style folder (unet/ + scheduler/) per prediction_type, same UNet weights."""
    unet = small_diffusers_unet()
    out = {}
    for p in TYPES:
        root = tmp_path_factory.mktemp(p)
        unet.save_pretrained(root / "unet")
        DDIMScheduler(**BETAS, prediction_type=p).save_pretrained(root / "scheduler")
        out[p] = root
    return unet, out


def _close(ours, ref):
    # an untrained UNet drives x far from [-1, 1] (a v- or x0-output read as such is not the
    # data's either): float32 rounding relative to that scale, as tests/test_solvers.py
    return float((ours - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))


def _run_diffusers(sched, unet, x, timesteps, **step_kw):
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("pred", TYPES)
def test_loader_reads_the_prediction_type_of_the_scheduler_config(folders, pred):
    _, roots = folders
    model, info = load_diffusers_unet(roots[pred])
    assert info["prediction_type"] == pred
    assert isinstance(model, EpsFromPrediction) == (pred != "epsilon")
    torch.testing.assert_close(torch.as_tensor(info["alphas_cumprod"]).double(),
                               DDIMScheduler(**BETAS).alphas_cumprod.double())


@pytest.mark.parametrize("pred", TYPES)
def test_ddim_matches_diffusers_for_every_prediction_type(folders, pred):
    unet, roots = folders
    model, info = load_diffusers_unet(roots[pred])
    sched = DDIMScheduler(**BETAS, prediction_type=pred, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="leading")
    sched.set_timesteps(10)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _run_diffusers(sched, unet, x_T.clone(), sched.timesteps, eta=0.0)
    ts = cdp_fast.timesteps(1000, 10, "uniform")
    assert ts.tolist() == sched.timesteps.tolist()
    with torch.no_grad():
        ours = cdp_fast.guided_ddim(model, x_T, alphas_cumprod=info["alphas_cumprod"], timesteps=ts)
    assert _close(ours, ref), float((ours - ref).abs().max())


@pytest.mark.parametrize("pred", TYPES)
def test_one_step_x0_matches_diffusers(folders, pred):
    """The converted ε gives diffusers' pred_original_sample at single steps (large, middle and
    small t, where "sample" divides by √(1−ᾱ) ≈ 0.01)."""
    unet, roots = folders
    model, _ = load_diffusers_unet(roots[pred])
    sched = DDIMScheduler(**BETAS, prediction_type=pred, clip_sample=False)
    sched.set_timesteps(1000)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for t in (999, 500, 3, 0):
        with torch.no_grad():
            ref = sched.step(unet(x, t).sample, t, x).pred_original_sample
            eps = call_model(model, x, torch.full((2,), t, dtype=torch.long))
        a = sched.alphas_cumprod[t].double()
        x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
        torch.testing.assert_close(x0.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pred", TYPES)
def test_ddpm_matches_diffusers_for_every_prediction_type(folders, pred):
    unet, roots = folders
    model, info = load_diffusers_unet(roots[pred])
    sched = DDPMScheduler(**BETAS, prediction_type=pred, clip_sample=True, variance_type="fixed_small",
                          timestep_spacing="leading")
    sched.set_timesteps(8)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _run_diffusers(sched, unet, x_T.clone(), sched.timesteps, generator=torch.Generator().manual_seed(11))
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    with torch.no_grad():
        ours = cdp_fast.guided_ddpm(model, x_T, alphas_cumprod=info["alphas_cumprod"], timesteps=ts, clip_x0=True,
                                    generator=torch.Generator().manual_seed(11))
    assert _close(ours, ref), float((ours - ref).abs().max())


@pytest.mark.parametrize("pred", TYPES)
def test_dpmpp_2m_matches_diffusers_for_every_prediction_type(folders, pred, monkeypatch):
    # diffusers takes the last step of a uniform grid second order; ours first order
    # (MIN_STEP_RATIO, tests/test_solvers.py): compared with the rule off
    monkeypatch.setattr(solvers, "MIN_STEP_RATIO", 0.0)
    unet, roots = folders
    model, info = load_diffusers_unet(roots[pred])
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    sched = DPMSolverMultistepScheduler(**BETAS, prediction_type=pred, algorithm_type="dpmsolver++",
                                        solver_order=2, solver_type="midpoint", final_sigmas_type="zero")
    sched.set_timesteps(timesteps=ts.tolist())
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _run_diffusers(sched, unet, x_T.clone(), sched.timesteps)
    with torch.no_grad():
        ours = cdp_fast.guided_dpmpp_2m(model, x_T, alphas_cumprod=info["alphas_cumprod"], timesteps=ts)
    assert _close(ours, ref), float((ours - ref).abs().max())


@pytest.mark.parametrize("pred", TYPES)
def test_heun_matches_diffusers_for_every_prediction_type(folders, pred):
    """Heun calls the ε-model at fractional t(σ): the conversion uses ᾱ = 1/(1+σ²) of that σ,
    as diffusers' HeunDiscreteScheduler converts with the step's σ."""
    unet, roots = folders
    model, info = load_diffusers_unet(roots[pred])
    abar = torch.as_tensor(info["alphas_cumprod"]).double()
    table = sigmas_of(abar)
    n = 4
    sig = karras_sigmas(n, float(table[0]), float(table[-1]))
    sched = HeunDiscreteScheduler(**BETAS, prediction_type=pred, use_karras_sigmas=True)
    sched.set_timesteps(n)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _run_diffusers(sched, unet, x_T * math.sqrt(1 + float(sig[0]) ** 2), sched.timesteps)
    with torch.no_grad():
        ours = cdp_fast.guided_heun(model, x_T, alphas_cumprod=abar, sigmas=sig)
    assert _close(ours, ref), float((ours - ref).abs().max())


def test_sample_runs_a_v_prediction_folder_with_every_solver(folders):
    """The driver (probe, fingerprints, Heun's fractional-t probe) runs the converted model; a
    v-model read as ε (the old loader) samples something else."""
    unet, roots = folders
    model, info = load_diffusers_unet(roots["v_prediction"])
    kw = dict(image_shape=(3, 8, 8), steps=6, loss=None, batch_size=2, progress=False, output="float",
              alphas_cumprod=info["alphas_cumprod"], compile=False)
    for solver in ("ddim", "ddpm", "dpmpp_2m", "heun"):
        a = cdp_fast.sample(model, 2, solver=solver, **kw).images
        b = cdp_fast.sample(unet, 2, solver=solver, **kw).images
        assert torch.isfinite(torch.as_tensor(a)).all()
        assert float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max()) > 1e-2, solver


def test_explicit_prediction_type_and_table_override_the_folder(folders, tmp_path):
    unet, roots = folders
    model, info = load_diffusers_unet(roots["epsilon"], prediction_type="sample")
    assert info["prediction_type"] == "sample" and model.prediction_type == "sample"
    # a bare UNet folder (no scheduler config): epsilon by default; another type needs the table
    unet.save_pretrained(tmp_path / "bare")
    model, info = load_diffusers_unet(tmp_path / "bare")
    assert info["prediction_type"] == "epsilon" and info["alphas_cumprod"] is None
    with pytest.raises(ValueError, match="needs the ᾱ table .* pass alphas_cumprod"):
        load_diffusers_unet(tmp_path / "bare", prediction_type="v_prediction")
    abar = cdp_fast.make_alphas_cumprod("linear", 1000)
    model, info = load_diffusers_unet(tmp_path / "bare", prediction_type="v_prediction", alphas_cumprod=abar)
    assert isinstance(model, EpsFromPrediction) and info["alphas_cumprod"] is abar


def test_unknown_prediction_type_is_a_clear_error(folders, tmp_path):
    unet, _ = folders
    unet.save_pretrained(tmp_path / "unet")
    sched = DDIMScheduler(**BETAS)
    sched.register_to_config(prediction_type="flow")          # a config diffusers' DDIM would refuse at step()
    sched.save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match=r"prediction_type 'flow' \(from .*scheduler_config.json\) is not one of"):
        load_diffusers_unet(tmp_path)
    with pytest.raises(ValueError, match="prediction_type 'x0' .*argument"):
        load_diffusers_unet(tmp_path, prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        EpsFromPrediction(unet, "v", cdp_fast.make_alphas_cumprod("linear", 1000))


def test_fingerprint_depends_on_the_prediction_type(folders):
    """A resumed run notices a changed prediction_type (same weights, another function)."""
    from cdp_fast.sampling.fingerprints import fingerprint

    unet, _ = folders
    abar = cdp_fast.make_alphas_cumprod("linear", 1000)
    prints = {fingerprint(EpsFromPrediction(unet, p, abar)) for p in TYPES}
    assert len(prints) == 3
