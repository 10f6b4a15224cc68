"""guided_ddim and sample(): diffusers equivalence, per-sample randomness, guidance effects,
model adapters, validation."""
import math

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.utils.seeding import sample_seed
from tiny_models import TinyEps, small_diffusers_unet




def _kw(**over):
    # guided calls here guide on the pixels unless they pass features= (an explicit choice: issue 23, F7)
    kw = dict(image_shape=(1, 5, 5), steps=8, skip="uniform", progress=False, output="float", features="pixels")
    kw.update(over)
    return kw


def test_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    unet = small_diffusers_unet()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="leading")
    steps = 20
    sched.set_timesteps(steps)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    ts = cdp_fast.timesteps(1000, steps, "uniform")
    assert ts.tolist() == sched.timesteps.tolist()
    ours = cdp_fast.guided_ddim(unet, x_T, alphas_cumprod=cdp_fast.make_alphas_cumprod("linear", 1000),
                                timesteps=ts)
    assert (ours - x).abs().max().item() < 5e-4
    # the scheduler's own table gives the same trajectory too
    ours2 = cdp_fast.guided_ddim(unet, x_T, alphas_cumprod=sched.alphas_cumprod, timesteps=ts)
    assert (ours2 - x).abs().max().item() < 5e-4




@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_diffusers_ddpm_scheduler(clip):
    """solver="ddpm" at λ = 0 is diffusers' DDPMScheduler (fixed_small variance, leading
    spacing, x̂_0 clipping or not) on the same noise draws, to float rounding."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    unet = small_diffusers_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                          variance_type="fixed_small", timestep_spacing="leading")
    steps = 12
    sched.set_timesteps(steps)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(11)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    ts = cdp_fast.timesteps(1000, steps, "uniform")
    assert ts.tolist() == sched.timesteps.tolist()
    ours = cdp_fast.guided_ddpm(unet, x_T, alphas_cumprod=sched.alphas_cumprod, timesteps=ts, clip_x0=clip,
                                generator=torch.Generator().manual_seed(11))
    assert (ours - x).abs().max().item() < 5e-4


def test_ddpm_without_clipping_is_ddim_with_eta_one():
    """Without x̂_0 clipping the DDPM posterior step equals DDIM with η = 1 (same variance, the
    mean rewritten), and both draw one noise per step but the last: same samples."""
    m = TinyEps()
    kw = _kw(loss=None, batch_size=4)
    a = cdp_fast.sample(m, 4, solver="ddpm", clip_x0=False, **kw).images
    b = cdp_fast.sample(m, 4, eta=1.0, **kw).images
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    c = cdp_fast.sample(m, 4, solver="ddpm", **kw).images        # clipped by default
    # the last step (ᾱ_prev = 1) returns x̂_0 itself: clipped, it lies in [-1, 1]
    assert np.abs(c).max() <= 1 + 1e-6 < np.abs(a).max(), (np.abs(c).max(), np.abs(a).max())


def test_guided_ddpm_runs_with_the_authors_mnist_window():
    """The authors' MNIST/GTSRB route: DDPM, guidance for 50 < t < 150 (guide_window=(51, 149))."""
    m = TinyEps()
    kw = _kw(loss="hnm", lam=30.0, tau=0.5, batch_size=4, steps=50, solver="ddpm")
    plain = cdp_fast.sample(m, 4, **dict(kw, loss=None)).images
    guided = cdp_fast.sample(m, 4, guide_window=(51, 149), **kw).images
    again = cdp_fast.sample(m, 4, guide_window=(51, 149), **kw).images
    np.testing.assert_array_equal(guided, again)
    assert np.abs(guided - plain).max() > 1e-3
    with pytest.raises(ValueError, match="eta"):
        cdp_fast.sample(m, 4, eta=0.5, **kw)
    with pytest.raises(ValueError, match="clip_x0"):
        cdp_fast.sample(m, 4, clip_x0=True, **_kw(loss=None, batch_size=4))
    with pytest.raises(ValueError, match="solver"):
        cdp_fast.sample(m, 4, solver="euler", **_kw(loss=None, batch_size=4))
    # Heun calls ε-models at fractional t; TinyEps indexes a table by t: one clear line
    with pytest.raises(ValueError, match="fractional timesteps"):
        cdp_fast.sample(m, 4, solver="heun", **_kw(loss=None, batch_size=4))


def test_uniform_and_quadratic_timesteps():
    assert cdp_fast.timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    q = cdp_fast.timesteps(1000, 200, "quadratic")
    ref = [int(s) for s in np.linspace(0, np.sqrt(0.8 * 1000), 200) ** 2][::-1]
    assert q.tolist() == ref


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_unguided_samples_do_not_depend_on_batch_size(eta):
    m = TinyEps()
    a = cdp_fast.sample(m, 7, loss=None, batch_size=7, eta=eta, **_kw())
    b = cdp_fast.sample(m, 7, loss=None, batch_size=2, eta=eta, **_kw())
    c = cdp_fast.sample(m, 3, loss=None, batch_size=3, eta=eta, **_kw())  # a prefix of the run
    # same function of (seed, i); only fp32 rounding differs (conv kernels vary with batch size)
    torch.testing.assert_close(torch.tensor(a.images), torch.tensor(b.images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(a.images[:3]), torch.tensor(c.images), rtol=1e-5, atol=1e-5)


def test_sample_i_depends_on_seed_and_index():
    m = TinyEps()
    a = cdp_fast.sample(m, 4, loss=None, batch_size=4, seed=0, **_kw())
    b = cdp_fast.sample(m, 4, loss=None, batch_size=4, seed=1, **_kw())
    assert not np.allclose(a.images, b.images)
    # x_T of sample i is torch.randn from Generator(sample_seed(seed, i))
    x_T = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(sample_seed(0, 2)))
    one = cdp_fast.guided_ddim(m, x_T[None], alphas_cumprod=cdp_fast.make_alphas_cumprod(),
                               timesteps=cdp_fast.timesteps(1000, 8))
    np.testing.assert_allclose(a.images[2], one[0].numpy(), rtol=1e-5, atol=1e-5)


def test_guided_groups_are_fixed_batches():
    """With guidance, sample i depends on (seed, i) and its batch [kB, (k+1)B) only: a longer
    run with the same batch size reproduces the shorter run's samples."""
    m = TinyEps()
    kw = _kw(loss="hnm", lam=30.0, tau=0.5, batch_size=4)
    a = cdp_fast.sample(m, 6, **kw)
    b = cdp_fast.sample(m, 11, **kw)
    np.testing.assert_allclose(a.images, b.images[:6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["infonce", "hnm"])
def test_lambda_zero_is_plain_ddim(loss):
    m = TinyEps()
    a = cdp_fast.sample(m, 6, loss=loss, lam=0.0, batch_size=3, **_kw())
    b = cdp_fast.sample(m, 6, loss=None, batch_size=3, **_kw())
    np.testing.assert_array_equal(a.images, b.images)


class GaussEps(torch.nn.Module):
    """Exact ε-predictor for data ~ N(0, s² I): x_t ~ N(0, (ᾱ s² + 1 − ᾱ) I), so
    ε(x_t, t) = √(1−ᾱ_t) x_t / (ᾱ_t s² + 1 − ᾱ_t). Unguided DDIM returns ≈ N(0, s² I)."""

    def __init__(self, s=0.3):
        super().__init__()
        self.s = s
        self.register_buffer("abar", cdp_fast.make_alphas_cumprod("linear", 1000).float())

    def forward(self, x, t):
        a = self.abar[t].view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * x / (a * self.s ** 2 + 1 - a)


def _nearest_neighbour_angle(x):
    """Mean distance from each (L2-normalised) sample to its nearest neighbour: what the
    contrastive loss on normalised pixel embeddings pushes up."""
    x = torch.as_tensor(np.asarray(x)).flatten(1).double()
    x = x / x.norm(dim=1, keepdim=True)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.min(1).values.mean().item()


@pytest.mark.parametrize("form", ["anchors", "authors"])
@pytest.mark.parametrize("loss", ["infonce", "hnm"])
def test_pixel_guidance_spreads_samples(loss, form):
    """Every step, no head: measured once 1.18 unguided -> anchors 1.35 (InfoNCE) / 1.45 (HNM),
    authors' form 1.31 / 1.43."""
    m = GaussEps()
    kw = _kw(batch_size=16, steps=10)
    base = _nearest_neighbour_angle(cdp_fast.sample(m, 16, loss=None, **kw).images)
    guided = _nearest_neighbour_angle(cdp_fast.sample(m, 16, loss=loss, lam=30.0, tau=0.5, form=form,
                                                      guide_window=None, embedding=None, **kw).images)
    assert guided > 1.1 * base, (guided, base)


def test_default_guidance_is_the_authors_and_acts():
    """The defaults (authors' form, window t >= 0.4·T, the head for HNM) change the samples
    and spread them (measured 1.18 -> 1.22 with the head on pixels, 10 quadratic steps of
    which the authors' window guides one or two)."""
    m = GaussEps()
    kw = _kw(batch_size=16, steps=10)
    base = cdp_fast.sample(m, 16, loss=None, **kw).images
    guided = cdp_fast.sample(m, 16, loss="hnm", lam=30.0, tau=0.5, **kw).images
    assert np.abs(guided - base).max() > 1e-2
    assert _nearest_neighbour_angle(guided) > 1.02 * _nearest_neighbour_angle(base)


@pytest.mark.parametrize("opts", [
    dict(positive="real"), dict(negatives="real"), dict(negatives="class"),
    dict(embedding="mlp"), dict(guide_window=(300, 700)), dict(eta=0.5),
])
def test_guidance_options_run_and_are_reproducible(opts):
    m = TinyEps()
    real = torch.rand(9, 1, 5, 5) * 2 - 1
    labeler = lambda x: torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)  # noqa: E731
    kw = _kw(loss="hnm", lam=20.0, tau=0.5, batch_size=4, real=real, labeler=labeler)
    kw.update(opts)
    a = cdp_fast.sample(m, 8, **kw)
    b = cdp_fast.sample(m, 8, **kw)
    np.testing.assert_array_equal(a.images, b.images)
    plain = cdp_fast.sample(m, 8, **{**kw, "loss": None})
    assert not np.allclose(a.images, plain.images)
    assert a.labels.dtype == np.int64 and a.confidence.shape == (8,)


def test_guide_window_outside_all_steps_is_plain_ddim():
    m = TinyEps()
    a = cdp_fast.sample(m, 4, loss="hnm", lam=50.0, tau=0.5, batch_size=4, guide_window=(2000, 3000), **_kw())
    b = cdp_fast.sample(m, 4, loss=None, batch_size=4, **_kw())
    np.testing.assert_array_equal(a.images, b.images)


def test_class_conditional_model_and_labels():
    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(3, 1)

        def forward(self, x, t, y):
            return 0.1 * x + self.emb(y).view(-1, 1, 1, 1)

    m = Cond()
    s = cdp_fast.sample(m, 6, loss="hnm", lam=5.0, tau=0.5, num_classes=3, negatives="class", batch_size=3, **_kw())
    assert s.labels.dtype == np.int64 and set(s.labels.tolist()) <= {0, 1, 2}
    given = np.array([0, 1, 2, 0, 1, 2])
    s2 = cdp_fast.sample(m, 6, loss=None, num_classes=3, class_labels=given, batch_size=3, **_kw())
    np.testing.assert_array_equal(s2.labels, given)


def test_diffusers_style_output_is_unwrapped():
    class Out:
        def __init__(self, s):
            self.sample = s

    m = TinyEps()
    wrapped = lambda x, t: Out(m(x, t))  # noqa: E731
    a = cdp_fast.sample(wrapped, 3, loss=None, batch_size=3, **_kw())
    b = cdp_fast.sample(m, 3, loss=None, batch_size=3, **_kw())
    np.testing.assert_array_equal(a.images, b.images)


def test_wrong_shape_and_non_finite_outputs_name_the_step():
    bad_shape = lambda x, t: x[:, :, :-1]  # noqa: E731
    with pytest.raises(ValueError, match=r"model returns \(2, 1, 4, 5\).*image_shape"):
        cdp_fast.sample(bad_shape, 2, loss=None, batch_size=2, **_kw())    # the probe, before sampling
    late_shape = lambda x, t: x[:, :, :-1] if int(t[0]) == 750 else x  # noqa: E731
    with pytest.raises(ValueError, match=r"step 1 \(t=750\).*shape"):
        cdp_fast.sample(late_shape, 2, loss=None, batch_size=2, **_kw())

    def nan_late(x, t):
        return torch.full_like(x, float("nan")) if int(t[0]) <= 400 else 0.1 * x

    with pytest.raises(ValueError, match=r"step 4 \(t=375\).*not finite"):
        cdp_fast.sample(nan_late, 2, loss=None, batch_size=2, **_kw())


def test_uint8_output_layout():
    m = TinyEps(c=3)
    s = cdp_fast.sample(m, 2, loss=None, batch_size=2, **_kw(image_shape=(3, 4, 6), output="uint8"))
    f = cdp_fast.sample(m, 2, loss=None, batch_size=2, **_kw(image_shape=(3, 4, 6)))
    assert s.images.dtype == np.uint8 and s.images.shape == (2, 4, 6, 3)
    expect = np.clip(np.asarray(f.images) * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(s.images, expect)


def test_float_output_any_shape():
    two_d = lambda x, t: 0.5 * x  # noqa: E731
    s = cdp_fast.sample(two_d, 5, loss="infonce", lam=1.0, tau=0.5, features="pixels", batch_size=5, image_shape=(2,),
                        output="float", steps=5, progress=False)
    assert s.images.shape == (5, 2) and s.images.dtype == np.float32


BAD = [
    (dict(n=0), "n"), (dict(n=2.5), "n"), (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"),
    (dict(tau_plus=1.0), "tau_plus"), (dict(tau_plus=-0.1), "tau_plus"), (dict(beta=-1.0), "beta"),
    (dict(batch_size=1), "batch_size"), (dict(loss="nce"), "loss"), (dict(positive="next"), "positive"),
    (dict(negatives="all"), "negatives"), (dict(negatives="class"), "negatives"),
    (dict(positive="real"), "real"), (dict(negatives="real"), "real"), (dict(output="png"), "output"),
    (dict(eta=-1.0), "eta"), (dict(steps=0), "steps"), (dict(embedding="linear"), "embedding"),
    (dict(guide_window=(5, 1)), "guide_window"), (dict(lam=-1.0), "lam"), (dict(skip="cubic"), "skip"),
    (dict(compile="yes"), "compile"), (dict(image_shape=(0, 3)), "image_shape"),
    (dict(shard_size=3, batch_size=2, out="OUT"), "shard_size"),
]


@pytest.mark.parametrize("over,name", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_them(over, name, tmp_path):
    kw = dict(loss="hnm", lam=1.0, tau=0.5, batch_size=4, **_kw())
    n = over.pop("n", 4)
    if over.get("out") == "OUT":
        over["out"] = str(tmp_path / "o")
    kw.update(over)
    with pytest.raises(ValueError, match=name):
        cdp_fast.sample(TinyEps(), n, **kw)


def test_batch_of_one_is_fine_without_guidance():
    s = cdp_fast.sample(TinyEps(), 2, loss=None, batch_size=1, **_kw())
    assert len(s) == 2


def test_schedules():
    lin = cdp_fast.diffusion.schedule.make_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = cdp_fast.diffusion.schedule.make_betas("cosine", 1000)
    assert (cos > 0).all() and (cos <= 0.999).all()
    abar = cdp_fast.make_alphas_cumprod("cosine", 1000)
    assert (abar[1:] <= abar[:-1]).all() and abar[0] > 0.999
    # Nichol & Dhariwal (2021) eq. (17): ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    with pytest.raises(ValueError, match="betas"):
        cdp_fast.diffusion.schedule.make_betas("sigmoid", 10)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        cdp_fast.diffusion.schedule.as_alphas_cumprod(torch.tensor([0.5, 0.9]))


def test_foreign_alphas_cumprod_and_defaults():
    m = TinyEps()
    abar = cdp_fast.make_alphas_cumprod("cosine", 500)
    a = cdp_fast.sample(m, 4, loss=None, batch_size=4, alphas_cumprod=abar, **_kw())
    b = cdp_fast.sample(m, 4, loss=None, batch_size=4, betas="cosine", T=500, **_kw())
    np.testing.assert_array_equal(a.images, b.images)
    # lam=None / tau=None take the paper's defaults for the loss (App. D.1) with a feature map;
    # pixels (features="pixels") have no λ default: refused without lam
    kw = _kw(batch_size=4, steps=3, features=lambda x: x.flatten(1))
    with pytest.raises(ValueError, match="lam: features='pixels' needs an explicit lam"):
        cdp_fast.sample(GaussEps(), 4, loss="hnm", **dict(kw, features="pixels"))
    for loss, d in cdp_fast.guidance.PAPER_DEFAULTS.items():
        implicit = cdp_fast.sample(GaussEps(), 4, loss=loss, **kw)
        explicit = cdp_fast.sample(GaussEps(), 4, loss=loss, lam=d["lam"], tau=d["tau"], **kw)
        np.testing.assert_array_equal(implicit.images, explicit.images)
    assert cdp_fast.guidance.PAPER_DEFAULTS == {"infonce": {"tau": 0.1, "lam": 20_000.0},
                                         "hnm": {"tau": 10.0, "lam": 100_000.0, "tau_plus": 0.1, "beta": 1.0}}


def test_init_std_scales_the_starting_noise():
    ident = lambda x, t: torch.zeros_like(x)  # noqa: E731  ε = 0: x_0 = x_T / √ᾱ_T
    a = cdp_fast.sample(ident, 3, loss=None, batch_size=3, **_kw())
    b = cdp_fast.sample(ident, 3, loss=None, batch_size=3, init_std=2.0, **_kw())
    np.testing.assert_allclose(b.images, 2 * a.images, rtol=1e-6)


@pytest.mark.slow
def test_compile_true_on_cpu_matches_eager():
    feats = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 8))
    kw = _kw(loss="hnm", lam=20.0, tau=0.5, batch_size=4, features=feats)
    eager = cdp_fast.sample(TinyEps(), 4, compile=False, **kw)
    m = TinyEps()
    compiled = cdp_fast.sample(m, 4, compile=True, **kw)
    assert m.conv.weight.is_contiguous()  # CPU: the caller's module keeps its layout
    np.testing.assert_allclose(compiled.images, eager.images, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_true_on_cpu_follows_weight_changes():
    """CPU compile freezes the weights into the graph; changing them must not give stale samples."""
    kw = _kw(loss=None, batch_size=4)
    m = TinyEps()
    first = cdp_fast.sample(m, 4, compile=True, **kw)
    np.testing.assert_allclose(first.images, cdp_fast.sample(m, 4, compile=False, **kw).images,
                               rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        m.conv.weight.mul_(0.5)                 # in place: bumps the version counter
    second = cdp_fast.sample(m, 4, compile=True, **kw)
    assert np.abs(second.images - first.images).max() > 1e-2
    np.testing.assert_allclose(second.images, cdp_fast.sample(m, 4, compile=False, **kw).images,
                               rtol=1e-4, atol=1e-4)
    m.conv.weight.data[0].add_(0.25)            # through .data: no version bump, caught by the sums
    third = cdp_fast.sample(m, 4, compile=True, **kw)
    np.testing.assert_allclose(third.images, cdp_fast.sample(m, 4, compile=False, **kw).images,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss", [None, "hnm"])
@pytest.mark.parametrize("step_graph", ["auto", "0"])
def test_cuda_compile_with_cuda_graphs_matches_eager(loss, step_graph, monkeypatch):
    """compile="auto" on CUDA (channels_last + torch.compile; the whole step in a CUDA graph,
    cdp_fast.sampling.graphs — or with CDP_FAST_STEP_GRAPH=0 the ε-model alone with CUDA graphs of its
    own) gives the eager samples, on repeated calls (graph replays) and with a smaller last
    batch (a second graph)."""
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", step_graph)
    feats = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 8)).cuda()
    kw = _kw(loss=loss, batch_size=4, device="cuda")
    if loss is not None:
        kw.update(lam=20.0, tau=0.5, features=feats)
    eager = cdp_fast.sample(TinyEps().cuda(), 7 if loss is None else 8, compile=False, **kw)
    m = TinyEps().cuda()
    for _ in range(2):
        compiled = cdp_fast.sample(m, 7 if loss is None else 8, compile="auto", **kw)
        np.testing.assert_allclose(compiled.images, eager.images, rtol=1e-3, atol=1e-3)
        graphed = compiled.meta.get("step_graph")
        assert (graphed is None) == (step_graph == "0")
        assert graphed is None or (graphed["disabled"] is None and graphed["replayed"] > 0)


@pytest.mark.slow
def test_cuda_graph_wrapper_logic_on_cpu():
    """The CUDA-graph wrapper's own logic (step marking, unwrapping, copying out) on CPU, where
    torch skips the graphs and runs the compiled model: same values as the module."""
    from cdp_fast.diffusion.adapters import EpsModel
    from cdp_fast.utils.runtime import compile_cuda_graphs

    class Wrapped(torch.nn.Module):  # diffusers-style output object
        def __init__(self):
            super().__init__()
            self.inner = TinyEps()

        def forward(self, x, t):
            return type("Out", (), {"sample": self.inner(x, t)})()

    x, t = torch.randn(3, 1, 5, 5), torch.tensor([5, 5, 5])
    for m in (TinyEps(), Wrapped()):
        eps = EpsModel(m)
        run = eps.with_runner(compile_cuda_graphs(eps.forward))
        ref = m(x, t)
        ref = getattr(ref, "sample", ref)
        with torch.no_grad():
            a, b = run(x, t), run(x, t)
        assert a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["hnm", "infonce"])
def test_public_guided_ddim_with_contrastive_guidance(loss):
    """docs/design.md's pairing, used as written: guided_ddim(..., guidance=ContrastiveGuidance(...))
    with no hidden set-up call; it equals what sample() makes from the same x_T, and a
    reset() makes the same guidance object reusable for the next trajectory."""
    m = TinyEps()
    kw = _kw(loss=loss, lam=5.0, tau=0.5, batch_size=4, output="float", steps=4, guide_window=None)
    ref = cdp_fast.sample(m, 4, **kw)
    abar = cdp_fast.make_alphas_cumprod("linear", 1000)
    ts = cdp_fast.timesteps(1000, 4, "uniform")
    x_T = torch.stack([torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(sample_seed(0, i)))
                       for i in range(4)])
    g = cdp_fast.ContrastiveGuidance(loss=loss, lam=5.0, tau=0.5)
    first = cdp_fast.guided_ddim(m, x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)
    torch.testing.assert_close(first, torch.as_tensor(ref.images), rtol=1e-5, atol=1e-5)
    g.reset()
    again = cdp_fast.guided_ddim(m, x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)
    torch.testing.assert_close(again, first)
    plain = cdp_fast.guided_ddim(m, x_T, alphas_cumprod=abar, timesteps=ts)
    assert (first - plain).abs().max() > 1e-4   # the guidance did something


def test_sample_does_not_modify_the_callers_model():
    """sample() leaves the module's training flags, device and layout as they were."""
    m = TinyEps().train()
    m.conv.eval()                       # a deliberately mixed state must come back as it was
    cdp_fast.sample(m, 2, loss=None, batch_size=2, **_kw())
    assert m.training and not m.conv.training
    assert m.conv.weight.device.type == "cpu" and m.conv.weight.is_contiguous()


def test_contrastive_guidance_checks_its_arguments():
    for kw, name in ((dict(loss="nce"), "loss"), (dict(tau=0.0), "tau"), (dict(lam=-1.0), "lam"),
                     (dict(tau_plus=1.0), "tau_plus"), (dict(positive="real"), "real"),
                     (dict(guide_window=(3, 1)), "guide_window")):
        args = dict(loss="hnm", lam=1.0, tau=1.0)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            cdp_fast.ContrastiveGuidance(**args)


def test_model_plan_copies_instead_of_mutating():
    """Where the caller's module would have to move or change layout, sample() works on a copy
    (CUDA decisions checked with device objects; nothing runs on a GPU here)."""
    from cdp_fast.sampling.prepare import model_plan as _model_plan

    m = TinyEps()
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _model_plan(m, cpu, "auto", (1, 5, 5)) == (False, False, False)
    assert _model_plan(m, cpu, True, (1, 5, 5)) == (True, False, False)
    assert _model_plan(m, cuda, "auto", (3, 8, 8)) == (True, True, True)      # move + NHWC copy
    assert _model_plan(m, cuda, "auto", (2,)) == (True, True, False)          # no NHWC for vectors
    assert _model_plan(m, cuda, False, (3, 8, 8)) == (False, True, False)     # move only
    plain = lambda x, t: x  # noqa: E731
    assert _model_plan(plain, cuda, "auto", (3, 8, 8)) == (True, False, False)  # callables: as given


class _SlowEps(torch.nn.Module):
    """An ε-model whose forward takes ``per_sample`` seconds per sample (a clock, not a guess)."""

    def __init__(self, per_sample):
        super().__init__()
        self.per_sample, self.lin = per_sample, torch.nn.Linear(1, 1)

    def forward(self, x, t):
        import time
        time.sleep(self.per_sample * len(x))
        return torch.zeros_like(x)


def test_compile_auto_on_cpu_weighs_the_timed_eager_work_against_the_threshold(monkeypatch):
    """compile="auto" on CPU: compile iff (timed forward) × (forwards) ≥ CPU_AUTO_COMPILE_S. The
    model sleeps 1 ms per sample, so 64 samples × 100 forwards ≈ 6.4 s of eager model time."""
    from cdp_fast.sampling import prepare as sampler

    cpu = torch.device("cpu")
    m = _SlowEps(1e-3)
    est = sampler.eager_seconds(m, (1, 2, 2), 64, 100, cpu)
    assert 6.4 <= est < 6.4 * 4          # sleep granularity and call overhead only add
    monkeypatch.setattr(sampler, "CPU_AUTO_COMPILE_S", 5.0)
    assert sampler.model_plan(m, cpu, "auto", (1, 2, 2), (64, 100))[0] is True
    assert sampler.model_plan(m, cpu, "auto", (1, 2, 2), (64, 10))[0] is False   # ~0.64 s
    assert sampler.model_plan(m, cpu, False, (1, 2, 2), (64, 100))[0] is False   # asked: never
    plain = lambda x, t: x  # noqa: E731   (no module to freeze: "auto" leaves callables eager)
    assert sampler.model_plan(plain, cpu, "auto", (1, 2, 2), (64, 100))[0] is False


def test_sample_compiles_on_cpu_when_auto_and_the_run_is_long_enough(monkeypatch):
    """sample() hands the call's work to the decision: with the threshold at 0 it compiles (the
    spy stands in for inductor), with the threshold out of reach it does not."""
    from cdp_fast.utils import runtime
    from cdp_fast.sampling import prepare as sampler

    calls = []

    def spy(fn, module=None):
        calls.append(module)
        return fn
    monkeypatch.setattr(runtime, "compile_frozen", spy)
    kw = dict(n=6, loss=None, steps=3, image_shape=(1, 5, 5), batch_size=4, progress=False)
    monkeypatch.setattr(sampler, "CPU_AUTO_COMPILE_S", 0.0)
    a = cdp_fast.sample(TinyEps(), compile="auto", **kw)
    assert len(calls) == 1
    monkeypatch.setattr(sampler, "CPU_AUTO_COMPILE_S", 1e9)
    b = cdp_fast.sample(TinyEps(), compile="auto", **kw)
    assert len(calls) == 1
    np.testing.assert_array_equal(a.images, b.images)


def test_resume_of_a_run_written_before_the_new_arguments(tmp_path):
    """A manifest without form/solver/clip_x0 (written before they existed) resumes when the
    call means what it meant: plain DDIM here."""
    import json

    kw = _kw(loss=None, batch_size=2)
    out = tmp_path / "o"
    first = cdp_fast.sample(TinyEps(), 4, out=str(out), shard_size=2, **kw)
    man = json.loads((out / "manifest.json").read_text())
    for k in ("form", "solver", "clip_x0"):
        man["args"].pop(k)
    (out / "manifest.json").write_text(json.dumps(man))
    again = cdp_fast.sample(TinyEps(), 4, out=str(out), shard_size=2, **kw)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
    with pytest.raises(ValueError, match="solver"):
        cdp_fast.sample(TinyEps(), 4, out=str(out), shard_size=2, solver="ddpm", **kw)


class _BNFeatures(torch.nn.Module):
    """A conv feature net with BatchNorm and max-pooling (what inductor handles differently),
    (B, 3, 8, 8) -> (B, 6)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).mean((2, 3))


def test_features_run_as_a_frozen_eval_copy_and_the_callers_module_is_untouched():
    """sample() guides through a copy of the feature module in eval mode with frozen weights:
    the caller's module keeps its training flag, its BatchNorm statistics, its requires_grad
    and gets no .grad; the samples equal those of the same module given in eval mode."""
    from cdp_fast.sampling import prepare as sampler

    feats = _BNFeatures().train()
    before = {k: v.clone() for k, v in feats.state_dict().items()}
    kw = _kw(loss="hnm", lam=20.0, tau=0.5, batch_size=4, features=feats, image_shape=(3, 8, 8), steps=4,
             guide_window=None)
    a = cdp_fast.sample(TinyEps(3), 4, **kw)
    assert feats.training and all(p.requires_grad and p.grad is None for p in feats.parameters())
    for k, v in feats.state_dict().items():
        assert torch.equal(v, before[k]), k
    b = cdp_fast.sample(TinyEps(3), 4, **dict(kw, features=_eval_copy(feats)))
    np.testing.assert_array_equal(a.images, b.images)
    prepared = sampler.prepare_features(feats, torch.device("cpu"), compile=False)
    assert not prepared.module.training and not any(p.requires_grad for p in prepared.module.parameters())
    assert prepared is sampler.prepare_features(feats, torch.device("cpu"), compile=False)   # cached
    with torch.no_grad():
        feats.conv.bias.add_(0.1)                     # new weights: a new copy
    assert prepared is not sampler.prepare_features(feats, torch.device("cpu"), compile=False)


def _eval_copy(m):
    import copy
    return copy.deepcopy(m).eval()


@pytest.mark.slow
def test_compiled_channels_last_features_give_the_eager_gradient():
    """The CUDA preparation (channels_last + torch.compile of forward and input-gradient, weights
    frozen), run here on CPU: features and the gradient with respect to the images equal the
    eager module's (fp32, different kernels and summation order: 1e-5)."""
    from cdp_fast.sampling import prepare as sampler

    torch._dynamo.reset()
    feats = _BNFeatures().eval()
    prepared = sampler.prepare_features(feats, torch.device("cpu"), compile=True)
    assert prepared.compiled is not None and prepared.channels_last
    g = torch.Generator().manual_seed(0)
    for b in (5, 5, 7):                                  # a repeated shape reuses the graph
        x = torch.randn(b, 3, 8, 8, generator=g)
        w = torch.randn(b, 6, generator=g)
        grads = []
        for f in (prepared, feats):
            xi = x.clone().requires_grad_(True)
            z = f(xi)
            grads.append((z, torch.autograd.grad((z * w).sum(), xi)[0]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in feats.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_guided_compile_with_conv_features_in_channels_last_matches_eager():
    """3-channel images, a conv/BatchNorm/max-pool feature net: on CUDA compile="auto" runs the
    ε-model and the features in channels_last, compiled; the guided samples equal the eager ones
    (fp32 with TF32 off, chaotic only at far larger λ: 1e-3)."""
    kw = _kw(loss="hnm", lam=20.0, tau=0.5, batch_size=4, device="cuda", image_shape=(3, 8, 8),
             features=_BNFeatures().cuda().eval(), guide_window=None)
    eager = cdp_fast.sample(TinyEps(3).cuda(), 8, compile=False, **kw)
    for _ in range(2):
        compiled = cdp_fast.sample(TinyEps(3).cuda(), 8, compile="auto", **kw)
        np.testing.assert_allclose(compiled.images, eager.images, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("solver,skip,steps", [("ddim", "quadratic", 300), ("ddpm", "quadratic", 300),
                                               ("dpmpp_2m", None, 7), ("heun", None, 7), ("ddim", "uniform", 7)])
def test_progress_bar_ends_exactly_at_n_and_never_overshoots(monkeypatch, solver, skip, steps):
    """The bar moves count/steps rows per step (a float) and is clamped to the group's rows; the
    per-group top-up makes each group add exactly its rows, so n ends at the total and never
    passes it. Quadratic spacing at 300 of 1000 steps repeats timesteps (272 distinct), whose
    steps are skipped: the bar used to stop at 272/300 of the run."""
    import tqdm.auto

    seen = []

    class Bar:
        def __init__(self, total=None, initial=0, **kw):
            self.total, self.n = total, initial

        def update(self, k):
            self.n += k
            seen.append((self.n, self.total))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    eps = lambda x, t: 0.1 * x  # noqa: E731
    cdp_fast.sample(eps, 13, loss=None, steps=steps, skip=skip, image_shape=(1, 3, 3), batch_size=5,
                    solver=solver, output="float", progress=True, compile=False)
    assert seen and all(n <= total + 1e-9 for n, total in seen)
    assert seen[-1][0] == pytest.approx(13, abs=1e-9)
