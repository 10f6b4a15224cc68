"""The three faithfulness options that make the authors' MNIST setting runnable
(YiDongOuYang/Contrastive-Guided-Diffusion-Process, ``minimal-diffusion-main/``):

- ``skip="linspace"``: their sampler grid ``np.linspace(0, T - 1, num=steps, endpoint=True,
  dtype=int)`` (``main_nonddp.py:130-132``), checked against closed forms written from that
  line and against a transcription of their DDPM loop;
- ``embedding=h``: the online head d -> h -> h (their MNIST head is ``EmbeddingModel(100 -> 64
  -> 64)``, ``contrastive/contrastive_loss_mnist.py:34``); "mlp" is h = 128 bit for bit;
- ``as_feature_extractor(clf, feature_input="raw")``: x_t given to the classifier as it is
  (their ``model(x+delta)``), beside the default "unit" ((x + 1)/2, the classifier's range).

The defaults are unchanged: tests/test_bitwise.py pins them; here, "unit" is checked equal to
the formula it always computed and "mlp" equal to 128.
"""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cdp_fast
from cdp_fast import cli
from cdp_fast.diffusion.schedule import SKIPS, make_alphas_cumprod, timesteps
from cdp_fast.guidance.options import MLPHead
from cdp_fast.models import FeatureExtractor, as_feature_extractor
from cdp_fast.sampling.fingerprints import fingerprint
from tiny_models import TinyEps




class TinyClassifier(torch.nn.Module):
    """A cdp_fast.models-style classifier: images in [0, 1], a ``.features`` method (B, 7)."""

    def __init__(self, d_in=25, d=7):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, d))
        self.head = torch.nn.Linear(d, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def features(self, x):
        # an input normalisation as the package's classifiers have: "raw" inputs shift it
        return self.body((x - 0.5) / 0.25)

    def forward(self, x):
        return self.head(self.features(x))


def fe_factory():
    """--features module:factory returning an as_feature_extractor (the CLI can re-wrap it); on
    the digits model's 8x8 images."""
    return as_feature_extractor(TinyClassifier(d_in=64))


def plain_factory():
    """--features module:factory returning a plain feature map (the CLI cannot re-wrap it)."""
    return lambda x: x.flatten(1)


KW = dict(image_shape=(1, 5, 5), progress=False, output="float", batch_size=4)
GUIDED = dict(KW, loss="hnm", lam=30.0, tau=0.5, guide_window=None, steps=6, skip="uniform")


# ============================================================================ skip="linspace"
def test_linspace_grid_at_the_authors_setting_is_their_closed_form():
    """T = 1000, 250 steps (their --diffusion-steps / --sampling-steps defaults): the points
    i·999/249 floored, i = 0..249 (exact integer arithmetic agrees with numpy's float64 here),
    walked from 999 down to 0: 0, 4, 8, ..., 248, 252 (62·999/249 = 248.75, 63·999/249 = 252.76),
    ..., 994, 999 — 250 distinct timesteps."""
    ts = timesteps(1000, 250, "linspace")
    assert ts.dtype == torch.long and ts.shape == (250,)
    ascending = ts.flip(0).tolist()
    assert ascending == [i * 999 // 249 for i in range(250)]
    assert ascending[:5] == [0, 4, 8, 12, 16] and ascending[61:64] == [244, 248, 252]
    assert ascending[-2:] == [994, 999] and len(set(ascending)) == 250
    assert "linspace" in SKIPS


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 2000), data=st.data())
def test_linspace_grid_is_numpys_integer_linspace_for_any_T_and_steps(T, data):
    """For any T and 1 <= steps <= T: point i is floor(i·((T − 1)/(steps − 1))) in float64 (numpy's
    integer linspace: the float point, floored), the last exactly T − 1; so it is within one of
    the exact i·(T − 1)//(steps − 1) (float rounding can put an integer point just below, where
    numpy — and so the authors — floor it one lower); descending, from T − 1 to 0, distinct."""
    steps = data.draw(st.integers(1, T))
    got = timesteps(T, steps, "linspace").flip(0).tolist()
    if steps == 1:
        assert got == [0]                        # np.linspace(0, T - 1, 1) = [0]
        return
    step = (T - 1) / (steps - 1)
    want = [math.floor(i * step) for i in range(steps - 1)] + [T - 1]
    assert got == want
    assert all(abs(g - i * (T - 1) // (steps - 1)) <= 1 for i, g in enumerate(got))
    assert got[0] == 0 and got[-1] == T - 1 and all(b > a for a, b in zip(got, got[1:]))


def test_linspace_follows_numpy_where_float_rounding_differs_from_exact_division():
    """T = 31, 23 steps: 11·30/22 = 15 exactly, but 11·(30/22) is 14.999… in float64; numpy's
    integer linspace (the authors' call) gives 14 there, and so does the grid."""
    got = timesteps(31, 23, "linspace").flip(0).tolist()
    assert got[11] == 14 and 11 * 30 // 22 == 15
    assert got == np.linspace(0, 30, num=23, endpoint=True, dtype=int).tolist()


def _authors_ddpm(model, x_T, alpha_bar_full, steps, seed):
    """``GuassianDiffusion.sample_from_reverse_process`` of minimal-diffusion-main/main_nonddp.py
    (lines 128-190; no guidance, ddim=False), transcribed: the sub-chain's betas from ᾱ of the
    linspace grid (ᾱ = 1 before its first entry), its posterior mean from the clamped x̂_0 and
    √β̃ noise, all scalars float32 as their ``get_all_scalars`` leaves them."""
    T = alpha_bar_full.numel()
    new_t = np.linspace(0, T - 1, num=steps, endpoint=True, dtype=int)
    ab = alpha_bar_full.float()[torch.from_numpy(new_t)]
    beta = (1 - ab / torch.nn.functional.pad(ab, [1, 0], value=1.0)[:-1]).double()
    alpha = 1 - beta
    abar = torch.cumprod(alpha, 0)
    bt = beta[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    beta_tilde = torch.cat([bt[0:1], bt])
    beta, alpha, abar, beta_tilde = (v.float() for v in (beta, alpha, abar, beta_tilde))
    torch.manual_seed(seed)
    final = x_T
    for i, t in zip(np.arange(steps)[::-1], new_t[::-1]):
        eps = model(final, torch.tensor([int(t)] * len(final)))
        x0 = ((final - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()).clamp(-1, 1)
        mean = (abar[i].sqrt() * beta[i] / ((1 - abar[i]) * alpha[i].sqrt())) * x0 + \
            ((alpha[i] - abar[i]) / ((1 - abar[i]) * alpha[i].sqrt())) * final
        final = mean if i == 0 else mean + beta_tilde[i].sqrt() * torch.randn_like(final)
    return final


@torch.no_grad()
def test_ddpm_on_the_linspace_grid_is_the_authors_sampler():
    """guided_ddpm on timesteps(1000, 250, "linspace") with the same ᾱ table (their cosine
    schedule) and the same noise stream equals the transcription of their loop: the
    sub-sampled chain's posterior variance, as with every grid. Tolerance: they keep the
    scalars in float32, the solver computes its coefficients in float64 — 250 steps of fp32
    rounding of O(1) values: atol 1e-4 (measured 4.5e-6; the uniform grid of
    250 steps is 0.13 away)."""
    model = TinyEps().eval()
    abar = make_alphas_cumprod("cosine", 1000)
    x_T = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    ref = _authors_ddpm(model, x_T, abar, 250, seed=11)
    got = cdp_fast.guided_ddpm(model, x_T, alphas_cumprod=abar.float().double(),
                               timesteps=timesteps(1000, 250, "linspace"), clip_x0=True,
                               generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    # the comparison can tell the variances apart: mid-grid (t = 497 -> 493) the sub-chain's
    # β̃ is ~4× the one-step posterior variance of the full chain
    t, t_prev = timesteps(1000, 250, "linspace")[125:127].tolist()
    a_t, a_prev, a_one = float(abar[t]), float(abar[t_prev]), float(abar[t - 1])
    sub = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    full = (1 - a_one) / (1 - a_t) * (1 - a_t / a_one)
    assert (t, t_prev) == (497, 493) and sub > 3 * full


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp_2m"])
def test_every_timestep_solver_runs_linspace_and_it_changes_the_samples(solver):
    """ddim, ddpm and dpmpp_2m sample on the grid (finite, one evaluation per timestep), and it
    is another grid than "uniform" at the same steps (6 of T = 1000: 999, 799, … vs 830, 664, …)."""
    lin = cdp_fast.sample(TinyEps(), 4, loss=None, steps=6, skip="linspace", solver=solver, **KW)
    uni = cdp_fast.sample(TinyEps(), 4, loss=None, steps=6, skip="uniform", solver=solver, **KW)
    assert np.isfinite(lin.images).all() and lin.meta["nfe"] == 6
    assert not np.array_equal(lin.images, uni.images)
    by_nfe = cdp_fast.sample(TinyEps(), 4, loss=None, nfe=6, skip="linspace", solver=solver, **KW)
    np.testing.assert_array_equal(by_nfe.images, lin.images)


def test_linspace_bad_combinations_are_refused_naming_the_cause(tmp_path):
    with pytest.raises(ValueError, match=r"steps \(11\) must be <= T \(10\)"):
        timesteps(10, 11, "linspace")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        timesteps(10, 0, "linspace")
    with pytest.raises(ValueError, match="single timestep t=0"):      # steps=1: the grid is [0]
        cdp_fast.sample(TinyEps(), 4, loss=None, steps=1, skip="linspace", **KW)
    with pytest.raises(ValueError, match="skip must be one of .*'linspace'"):
        cdp_fast.sample(TinyEps(), 4, loss=None, steps=6, skip="lin-space", **KW)
    with pytest.raises(ValueError, match=r"steps \(2000\) must be <= T \(1000\)"):
        cdp_fast.sample(TinyEps(), 4, loss=None, steps=2000, skip="linspace", **KW)
    # a run on the grid records it; resuming it on another grid is refused, naming skip
    out = str(tmp_path / "g")
    cdp_fast.sample(TinyEps(), 4, loss=None, steps=6, skip="linspace", out=out, **KW)
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["args"]["skip"] == "linspace"
    with pytest.raises(ValueError, match="skip: 'linspace' -> 'uniform'"):
        cdp_fast.sample(TinyEps(), 4, loss=None, steps=6, skip="uniform", out=out, **KW)


# ============================================================================ embedding=h
@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 200), d=st.integers(1, 40))
def test_head_of_width_h_is_d_h_h(h, d):
    """MLPHead(d, h, h) and the guidance's online head for embedding=h: weights (h, d), (h, h)."""
    head = MLPHead(d, hidden=h, out=h, generator=torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in head.parameters()] == [(h, d), (h,), (h, h), (h,)]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, d))
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, features=net, embedding=h)
    x = torch.randn(3, 6)
    eps = torch.zeros_like(x)
    g(x, 10, eps, 0)
    g(x + 0.1, 9, eps, 1)                   # the first guided step makes the head
    w = [tuple(p.shape) for p in g.head.parameters()]
    assert w == [(h, d), (h,), (h, h), (h,)]


def test_mlp_is_width_128_bit_for_bit_and_64_is_another_head(tmp_path):
    """embedding=128 samples bitwise as "mlp" (same head, same init) and is recorded as "mlp",
    so either spelling resumes the other; 64 (the authors' MNIST head) gives other samples and
    refuses to resume an "mlp" run, naming embedding."""
    feats = TinyClassifier().body
    mlp = cdp_fast.sample(TinyEps(), 4, features=feats, embedding="mlp", **GUIDED)
    w128 = cdp_fast.sample(TinyEps(), 4, features=feats, embedding=128, **GUIDED)
    w64 = cdp_fast.sample(TinyEps(), 4, features=feats, embedding=64, **GUIDED)
    np.testing.assert_array_equal(mlp.images, w128.images)
    assert np.abs(mlp.images - w64.images).max() > 1e-4
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, embedding=np.int64(128))
    assert g.embedding == "mlp"
    g64 = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, embedding=np.int64(64))
    assert g64.embedding == 64 and type(g64.embedding) is int and g64.settings_key() != g.settings_key()
    out = str(tmp_path / "g")
    cdp_fast.sample(TinyEps(), 4, features=feats, embedding="mlp", out=out, **GUIDED)
    cdp_fast.sample(TinyEps(), 4, features=feats, embedding=128, out=out, **GUIDED)      # resumes
    with pytest.raises(ValueError, match="embedding: 'mlp' -> 64"):
        cdp_fast.sample(TinyEps(), 4, features=feats, embedding=64, out=out, **GUIDED)
    out64 = str(tmp_path / "g64")
    cdp_fast.sample(TinyEps(), 4, features=feats, embedding=64, out=out64, **GUIDED)
    assert json.loads((tmp_path / "g64" / "manifest.json").read_text())["args"]["embedding"] == 64
    with pytest.raises(ValueError, match="embedding: 64 -> 32"):
        cdp_fast.sample(TinyEps(), 4, features=feats, embedding=32, out=out64, **GUIDED)


@pytest.mark.parametrize("bad", [0, -1, True, False, "64x", 64.0, "64"])
def test_bad_head_widths_are_refused_naming_embedding(bad):
    with pytest.raises(ValueError, match="embedding must be 'auto', None, 'mlp' .* or a positive int"):
        cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, embedding=bad)
    with pytest.raises(ValueError, match="embedding must be"):
        cdp_fast.sample(TinyEps(), 4, embedding=bad, **GUIDED)


# ============================================================================ feature_input
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), scale=st.floats(0.1, 3.0), seed=st.integers(0, 2 ** 16))
def test_feature_input_unit_is_the_old_formula_and_raw_is_x_itself(b, scale, seed):
    """"unit" (the default) computes exactly what the adapter always did, model.features((x + 1)
    · 0.5); "raw" is model.features(x); they differ (same ops on the same values: compared
    bitwise)."""
    clf = TinyClassifier().eval()
    x = torch.randn(b, 1, 5, 5, generator=torch.Generator().manual_seed(seed)) * scale
    unit, raw = as_feature_extractor(clf), as_feature_extractor(clf, feature_input="raw")
    assert unit.feature_input == "unit" and FeatureExtractor(clf).feature_input == "unit"
    with torch.no_grad():
        assert torch.equal(unit(x), clf.features((x + 1.0) * 0.5))
        assert torch.equal(raw(x), clf.features(x))
        assert not torch.equal(unit(x), raw(x))


@pytest.mark.parametrize("bad", ["Unit", "clip", None, 1, ("raw",)])
def test_bad_feature_input_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="feature_input must be 'unit' .* or 'raw'"):
        as_feature_extractor(TinyClassifier(), feature_input=bad)


def test_raw_features_change_the_samples_and_the_run_fingerprint(tmp_path):
    """Guided samples differ between "raw" and "unit"; the unit fingerprint is the one recorded
    before the option existed (class name + state dict), so old out dirs resume, and a resume
    with the other feature input is refused, naming features."""
    clf = TinyClassifier()
    unit, raw = as_feature_extractor(clf), as_feature_extractor(clf, feature_input="raw")
    a = cdp_fast.sample(TinyEps(), 4, features=unit, embedding=None, **GUIDED)
    b = cdp_fast.sample(TinyEps(), 4, features=raw, embedding=None, **GUIDED)
    assert np.abs(a.images - b.images).max() > 1e-4
    h = hashlib.sha256(b"FeatureExtractor")
    for k, v in unit.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert fingerprint(unit) == h.hexdigest()[:16] != fingerprint(raw)
    out = str(tmp_path / "g")
    cdp_fast.sample(TinyEps(), 4, features=unit, embedding=None, out=out, **GUIDED)
    with pytest.raises(ValueError, match="different arguments .*features"):
        cdp_fast.sample(TinyEps(), 4, features=raw, embedding=None, out=out, **GUIDED)


# ============================================================================ the CLI
@pytest.fixture
def calls(monkeypatch):
    got = []

    def fake(model, n, **kw):
        got.append(kw)
        return cdp_fast.Samples(np.zeros((n, 8, 8, 1), np.uint8))

    monkeypatch.setattr(cdp_fast, "sample", fake)
    return got


BASE = ["sample", "-n", "2", "--no-progress"]


def test_cli_skip_and_embedding_flags(calls, capsys):
    assert cli.main(BASE + ["--skip", "linspace", "--embedding", "64"]) == 0
    assert (calls[-1]["skip"], calls[-1]["embedding"]) == ("linspace", 64)
    assert cli.main(BASE + ["--embedding", "mlp"]) == 0 and calls[-1]["embedding"] == "mlp"
    assert cli.main(BASE + ["--embedding", "none"]) == 0 and calls[-1]["embedding"] is None
    assert cli.main(BASE) == 0 and calls[-1]["embedding"] is None       # the digits preset's: no head
    capsys.readouterr()
    for bad in ("64x", "0", "-1", "True"):
        assert cli.main(BASE + ["--embedding", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "embedding" in err, err
    assert cli.main(BASE + ["--skip", "linear"]) == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_feature_input(calls, capsys):
    """Default: the bundled digits features as before; raw: the same classifier through
    as_feature_extractor(..., feature_input="raw"); a module:factory's as_feature_extractor is
    re-wrapped; pixels or a plain feature map are refused with one line naming feature-input."""
    assert cli.main(BASE) == 0
    assert type(calls[-1]["features"]).__name__ == "DigitsFeatures"
    assert cli.main(BASE + ["--feature-input", "unit"]) == 0
    assert type(calls[-1]["features"]).__name__ == "DigitsFeatures"
    assert cli.main(BASE + ["--feature-input", "raw"]) == 0
    f = calls[-1]["features"]
    assert isinstance(f, FeatureExtractor) and f.feature_input == "raw"
    assert type(f.model).__name__ == "DigitsClassifier"
    assert cli.main(BASE + ["--features", "test_faithful_options:fe_factory", "--feature-input", "raw"]) == 0
    f = calls[-1]["features"]
    assert isinstance(f, FeatureExtractor) and f.feature_input == "raw" and isinstance(f.model, TinyClassifier)
    capsys.readouterr()
    for extra in (["--features", "pixels"], ["--features", "test_faithful_options:plain_factory"]):
        assert cli.main(BASE + extra + ["--feature-input", "raw"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "feature-input" in err, err
    assert cli.main(BASE + ["--feature-input", "clip"]) == 2 and "invalid choice" in capsys.readouterr().err
