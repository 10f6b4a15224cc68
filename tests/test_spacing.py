"""Timestep spacings (cdp_fast.timesteps): the log-SNR grid, each solver's default spacing, and
what a run records of both so that a resume never mixes grids or DPM-Solver++ rules."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdp_fast
from cdp_fast.diffusion.schedule import SKIPS, make_alphas_cumprod, timesteps


def _lam(abar):
    return 0.5 * (abar.log() - torch.log1p(-abar))


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(2, 120), kind=st.sampled_from(["linear", "cosine"]), T=st.sampled_from([200, 1000]))
def test_logsnr_grid_is_even_in_lambda_distinct_and_spans_the_table(steps, kind, T):
    """From T − 1 to 0, descending, distinct; each point the table entry nearest its λ target
    (so within half a table step in λ of it), unless a collision moved it up by one."""
    abar = make_alphas_cumprod(kind, T)
    ts = timesteps(T, steps, "logsnr", alphas_cumprod=abar)
    assert ts.dtype == torch.long and ts.shape == (steps,)
    assert int(ts[0]) == T - 1 and int(ts[-1]) == 0
    assert (ts[:-1] > ts[1:]).all()
    lam = _lam(abar)
    targets = torch.linspace(float(lam[0]), float(lam[-1]), steps, dtype=torch.float64)   # λ falls as t rises
    nears = [int((lam - want).abs().argmin()) for want in targets.tolist()]
    # each point is the table entry nearest its λ target, moved by at most the number of targets
    # that share an entry (each collision shifts a point by one)
    shared = steps - len(set(nears))
    assert all(abs(t - near) <= shared for t, near in zip(ts.flip(0).tolist(), nears)), (shared, nears)
    if shared == 0:
        assert ts.flip(0).tolist() == nears


def test_logsnr_grid_is_diffusers_lu_lambdas_grid():
    """The same timesteps as diffusers' DPMSolverMultistepScheduler(use_lu_lambdas=True), whose
    grid is uniform in λ (Lu et al.'s recommendation), at 10 and 20 steps."""
    diffusers = pytest.importorskip("diffusers")
    abar = make_alphas_cumprod("linear", 1000)
    for n in (10, 20):
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      use_lu_lambdas=True)
        sched.set_timesteps(n)
        assert timesteps(1000, n, "logsnr", alphas_cumprod=abar).tolist() == sched.timesteps.tolist()


def test_logsnr_needs_a_table_and_refuses_bad_ones():
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        timesteps(1000, 10, "logsnr")
    with pytest.raises(ValueError, match="entries, T is"):
        timesteps(100, 10, "logsnr", alphas_cumprod=make_alphas_cumprod("linear", 1000))
    with pytest.raises(ValueError, match="skip must be one of"):
        timesteps(1000, 10, "log-snr")
    abar = make_alphas_cumprod("linear", 10)
    one = torch.cat([torch.ones(3, dtype=torch.float64), abar[3:]])     # a table starting at ᾱ = 1
    ts = timesteps(10, 5, "logsnr", alphas_cumprod=one)
    assert int(ts[-1]) == 3                                               # σ = 0 entries are no grid point
    with pytest.raises(ValueError, match="σ > 0"):
        timesteps(10, 8, "logsnr", alphas_cumprod=one)
    assert SKIPS == ("uniform", "quadratic", "logsnr", "linspace")


def _eps():
    from cdp_fast.models.unet import UNet

    torch.manual_seed(0)
    return UNet(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1).eval()


def test_each_solver_gets_its_default_spacing_and_every_spacing_changes_the_samples(tmp_path):
    """skip=None: log-SNR for DPM-Solver++, quadratic (the paper's) for DDIM and DDPM — the
    DDIM default is unchanged bit for bit; every spacing gives other samples; the manifest
    records the spacing used."""
    eps = _eps()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss=None, steps=6)
    ddim = cdp_fast.sample(eps, 4, **kw)
    np.testing.assert_array_equal(ddim.images, cdp_fast.sample(eps, 4, skip="quadratic", **kw).images)
    dpm = cdp_fast.sample(eps, 4, solver="dpmpp_2m", **kw)
    np.testing.assert_array_equal(dpm.images, cdp_fast.sample(eps, 4, solver="dpmpp_2m", skip="logsnr", **kw).images)
    for solver in ("ddim", "ddpm", "dpmpp_2m"):
        outs = [cdp_fast.sample(eps, 4, solver=solver, skip=skip, **kw).images for skip in SKIPS]
        for i in range(len(SKIPS)):
            for j in range(i):
                assert not np.array_equal(outs[i], outs[j]), (solver, SKIPS[i], SKIPS[j])
    cdp_fast.sample(eps, 4, solver="dpmpp_2m", out=str(tmp_path / "g"), **kw)
    args = json.loads((tmp_path / "g" / "manifest.json").read_text())["args"]
    assert args["skip"] == "logsnr" and args["dpmpp_min_step_ratio"] == 0.5
    with pytest.raises(ValueError, match="skip must be one of"):
        cdp_fast.sample(eps, 4, skip="cosine", **kw)


def test_a_dpmpp_run_of_0_1_does_not_resume_under_the_step_ratio_rule(tmp_path):
    """A DPM-Solver++ out dir written before the rule (its manifest has no dpmpp_min_step_ratio)
    refuses to resume, naming it, instead of mixing shards of two rules; a DDIM one resumes."""
    eps = _eps()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss=None, steps=6,
              shard_size=4)
    for solver, refuses in (("dpmpp_2m", True), ("ddim", False)):
        out = tmp_path / solver
        first = cdp_fast.sample(eps, 8, solver=solver, skip="uniform", out=str(out), **kw)
        kept = np.asarray(first.images).copy()
        man = json.loads((out / "manifest.json").read_text())
        del man["args"]["dpmpp_min_step_ratio"]                           # as 0.1 wrote it
        (out / "manifest.json").write_text(json.dumps(man))
        (out / "shard-000001.npz").unlink()
        if refuses:
            with pytest.raises(ValueError, match="dpmpp_min_step_ratio"):
                cdp_fast.sample(eps, 8, solver=solver, skip="uniform", out=str(out), **kw)
        else:
            again = cdp_fast.sample(eps, 8, solver=solver, skip="uniform", out=str(out), **kw)
            np.testing.assert_array_equal(np.asarray(again.images), kept)


def test_cli_offers_every_spacing(capsys):
    from cdp_fast import cli

    assert cli.main(["sample", "--help"]) == 0
    assert "logsnr" in capsys.readouterr().out
    assert math.isclose(cdp_fast.sampling.options.authors_window(1000)[0], 400)


def test_the_weak_start_warning_is_about_the_spacing_not_the_table():
    """A cosine table with the default quadratic spacing starts at 0.8 T, where √ᾱ = 0.31: no
    warning (the table's own choice); 2 uniform steps start at t = 500 of the linear table: warned."""
    import warnings

    eps = _eps()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdp_fast.sample(eps, 4, betas="cosine", steps=10, **kw)
        cdp_fast.sample(eps, 4, steps=10, **kw)
    with pytest.warns(UserWarning, match="starts at t=500"):
        cdp_fast.sample(eps, 4, steps=2, skip="uniform", **kw)


def test_cli_dpmpp_gets_its_own_default_spacing_not_the_presets(tmp_path):
    """`--solver dpmpp_2m` without --skip runs log-SNR (the digits preset's "uniform" is a DDIM setting)."""
    from cdp_fast import cli

    out = tmp_path / "g"
    assert cli.main(["sample", "--model", "digits", "-n", "8", "--batch-size", "8", "--solver", "dpmpp_2m",
                     "--nfe", "5", "--loss", "none", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["args"]["skip"] == "logsnr"
    out2 = tmp_path / "h"
    assert cli.main(["sample", "--model", "digits", "-n", "8", "--batch-size", "8", "--steps", "5",
                     "--loss", "none", "--out", str(out2), "--no-progress"]) == 0
    assert json.loads((out2 / "manifest.json").read_text())["args"]["skip"] == "uniform"     # DDIM: the preset


def test_a_manifest_that_recorded_a_list_by_type_name_says_why_it_cannot_resume(tmp_path):
    eps = _eps()
    kw = dict(image_shape=(1, 8, 8), progress=False, output="float", batch_size=4, loss=None, steps=4, shard_size=4,
              class_labels=[0, 1] * 4, num_classes=None)
    out = tmp_path / "g"
    cdp_fast.sample(eps, 8, out=str(out), **kw)
    man = json.loads((out / "manifest.json").read_text())
    man["args"]["class_labels"] = ".list"                                  # as cdp_fast 0.1 recorded it
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="bare type name.*start a new directory"):
        cdp_fast.sample(eps, 8, out=str(out), **kw)
