"""ContrastiveGuidance against references written from the authors' formulas (issue: "the
paper's Contrastive-DP, exactly"): the symmetric 2B-row HNM and the keys InfoNCE as guidance
gradients w.r.t. x_t through a feature network, the online head trained through both rows and
carried through a shard, the first step of a trajectory unguided, and the authors' window.

References: ``cdp_fast.ops.contrastive.reference.hnm_symmetric_ref`` / ``infonce_keys_ref`` transcribe
``adv_training/hard_negative_sample.py`` / ``adv_training/infonce.py`` of
YiDongOuYang/Contrastive-Guided-Diffusion-Process with plain exp (fp64 here). Tolerances: the
guidance runs in fp32 (features are cast to float) while the references run in fp64, so
gradients agree to fp32 rounding of O(1) features: rtol 1e-4.
"""
import math

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.guidance import losses
from cdp_fast.ops.contrastive import reference
from cdp_fast.guidance.contrastive import MLPHead
from cdp_fast.utils.seeding import sample_seed


def _features(d_in=12, d=7):
    g = torch.Generator().manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, d))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def _ref_grad(features, x_t, x_prev, loss, tau, head=None, labels=None):
    """∇_{x_t} of the authors' loss on (f(x_t), f(x_{t+1})) in fp64, the head (if any) too."""
    f64 = lambda x: features(x.double())  # noqa: E731
    x = x_t.detach().double().requires_grad_(True)
    z, w = f64(x), f64(x_prev.detach())
    if head is not None:
        z, w = head(z), head(w)
    if loss == "hnm":
        ell = reference.hnm_symmetric_ref(z, w, tau=tau, tau_plus=0.1, beta=1.0, labels=labels)
    else:
        ell = reference.infonce_keys_ref(z, w, tau=tau, labels=labels)
    params = [] if head is None else list(head.parameters())
    grads = torch.autograd.grad(ell, [x] + params)
    return grads[0], grads[1:]


@pytest.mark.parametrize("tau", [10.0, 0.5])
@pytest.mark.parametrize("loss", ["hnm", "infonce"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_authors_form_gradient_through_a_feature_network(loss, tau, with_labels):
    """Step 1 of a trajectory is not guided (no x_{t+1}: the authors' ``len(xs) >= 2``); step 2
    returns λ·∇_{x_t} of the authors' loss on (f(x_t), f(x_1)), with f a network."""
    feats = _features().double()
    torch.manual_seed(0)
    x1, x2 = torch.randn(6, 1, 3, 4, dtype=torch.float64), torch.randn(6, 1, 3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 2]) if with_labels else None
    g = cdp_fast.ContrastiveGuidance(loss=loss, lam=3.0, tau=tau, features=feats, embedding=None,
                                     negatives="class" if with_labels else "batch")
    g.reset(class_labels=labels)
    assert g(x1, 900, torch.zeros_like(x1), 0) is None
    grad, lam = g(x2, 800, torch.zeros_like(x2), 1)
    ref, _ = _ref_grad(feats, x2, x1, loss, tau, labels=labels)
    assert lam == 3.0
    torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-7)


def test_authors_head_learns_through_both_rows_and_is_carried():
    """The head: initialised from the seed at the first guided step, the guidance gradient read
    before its Adam step (lr 1e-2), the step taken on gradients through e(x_t) AND e(x_{t+1});
    reset(keep_head=True) carries it (and Adam's state) into the next trajectory."""
    feats = _features().double()
    torch.manual_seed(1)
    xs = [torch.randn(5, 1, 3, 4, dtype=torch.float64) for _ in range(4)]
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=0.5, features=feats, embedding="mlp", seed=7)
    # the authors' procedure, by hand, on a copy of the same initial head
    head = MLPHead(7, generator=torch.Generator().manual_seed(sample_seed(7, -1))).double()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    def authors_step(x_t, x_prev):
        ref, pgrads = _ref_grad(feats, x_t, x_prev, "hnm", 0.5, head=head)
        for p, gp in zip(head.parameters(), pgrads):
            p.grad = gp
        opt.step()
        opt.zero_grad()
        return ref

    g(xs[0], 900, xs[0], 0)                                  # unguided first step
    for i in (1, 2):
        grad, _ = g(xs[i], 900 - 100 * i, xs[i], i)
        torch.testing.assert_close(grad.double(), authors_step(xs[i], xs[i - 1]), rtol=2e-4, atol=1e-7)
    g.reset(keep_head=True)
    g(xs[2], 900, xs[2], 0)
    grad, _ = g(xs[3], 800, xs[3], 1)
    torch.testing.assert_close(grad.double(), authors_step(xs[3], xs[2]), rtol=2e-4, atol=1e-7)
    g.reset()                                                # a fresh head again
    assert g._head is None


def test_anchor_form_is_about_twice_the_authors_gradient():
    """Derived (linearising exp(s/τ) around 1 at τ = 10): the anchor form's push-apart term is
    (2B − 1)/B times the authors' and its pull ~1×; with e(x_{t+1}) close to e(x_t) and
    embeddings sharing a mean direction the push dominates. Measured here: cosine > 0.99 and
    a norm ratio within 10% of (2B − 1)/B."""
    torch.manual_seed(3)
    B, d = 64, 32
    base = torch.randn(d)
    z = (base + torch.randn(B, d)).requires_grad_(True)
    w = z.detach() + 0.05 * torch.randn(B, d)
    g_auth = torch.autograd.grad(losses.hnm_loss_symmetric(z, w, tau=10.0), z)[0]
    g_anch = torch.autograd.grad(losses.hnm_loss(z, w, tau=10.0), z)[0]
    cos = torch.nn.functional.cosine_similarity(g_auth.flatten(), g_anch.flatten(), dim=0)
    ratio = g_anch.norm() / g_auth.norm()
    assert cos > 0.99, cos
    assert abs(ratio / ((2 * B - 1) / B) - 1) < 0.1, ratio


def test_hnm_at_tau_10_is_infonce_up_to_a_factor():
    """At τ = 10 the logits s/τ lie in [-0.1, 0.1]: HNM's importance weights are ~uniform and
    its gradient is InfoNCE's (β = 0, τ⁺ = 0) up to a factor (the documented fact beside the
    defaults): cosine > 0.999."""
    torch.manual_seed(4)
    z = torch.randn(32, 16).requires_grad_(True)
    w = z.detach() + 0.3 * torch.randn(32, 16)
    g_h = torch.autograd.grad(losses.hnm_loss_symmetric(z, w, tau=10.0, tau_plus=0.1, beta=1.0), z)[0]
    g_0 = torch.autograd.grad(losses.hnm_loss_symmetric(z, w, tau=10.0, tau_plus=0.0, beta=0.0), z)[0]
    cos = torch.nn.functional.cosine_similarity(g_h.flatten(), g_0.flatten(), dim=0)
    assert cos > 0.999, cos


def test_authors_clamps_bind_only_where_the_code_would():
    """neg >= 1e-4 binds when τ·ln(1e-4) > -1 (τ < 0.109): at τ = 0.05 the streamed loss equals
    the literal reference (which clamps) and differs from the unclamped formula."""
    torch.manual_seed(5)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = -z.detach() + 0.1 * torch.randn(6, 4, dtype=torch.float64)
    a = losses.hnm_loss_symmetric(z, w, tau=0.05)
    ref = reference.hnm_symmetric_ref(z, w, tau=0.05)
    torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-12)
    rows = torch.arange(6).repeat(2)
    unclamped = losses.hnm_loss(torch.cat([z, w]), torch.cat([w, z]), tau=0.05, anchor_labels=rows)
    assert abs(float(unclamped - a)) > 1e-6


def _tiny():
    from test_sampler import TinyEps

    return TinyEps()


def test_head_lives_for_a_shard():
    """With the head, the second batch of a shard is guided by the head the first trained; the
    first batch of the next shard starts from a fresh head: run A (shard 4 rows) and run B
    (shard 2 rows = one batch) agree on rows 0-1 and 4-5 and differ on rows 2-3."""
    kw = dict(loss="hnm", lam=30.0, tau=0.5, features="pixels", embedding="mlp", guide_window=None,
              image_shape=(1, 5, 5), steps=6, skip="uniform", batch_size=2, output="float", progress=False)
    a = cdp_fast.sample(_tiny(), 6, shard_size=4, **kw).images
    b = cdp_fast.sample(_tiny(), 6, shard_size=2, **kw).images
    np.testing.assert_array_equal(a[:2], b[:2])
    np.testing.assert_array_equal(a[4:], b[4:])
    assert np.abs(a[2:4] - b[2:4]).max() > 1e-6


def test_default_window_is_the_authors():
    """guide_window="auto": t >= 0.4·T (their i >= 400 at T = 1000); the guidance sees only those
    steps, and the first of them is unguided (no x_{t+1} yet)."""
    from cdp_fast.sampling.options import authors_window

    assert authors_window(1000) == (400, 999) and authors_window(500) == (200, 499)
    seen = []

    class Spy(cdp_fast.ContrastiveGuidance):
        def __call__(self, x, t, eps, step):
            out = super().__call__(x, t, eps, step)
            seen.append((t, out is not None))
            return out

    import cdp_fast.sampling.driver as sampler_mod

    orig = sampler_mod.ContrastiveGuidance
    sampler_mod.ContrastiveGuidance = Spy
    try:
        cdp_fast.sample(_tiny(), 2, loss="hnm", lam=1.0, tau=0.5, features="pixels", image_shape=(1, 5, 5), steps=10,
                        skip="uniform", batch_size=2, output="float", progress=False)
    finally:
        sampler_mod.ContrastiveGuidance = orig
    guided = [t for t, on in seen if on]
    assert guided == [t for t in range(800, 399, -100)], seen     # 900 is the first step
    assert all(not on for t, on in seen if t < 400 or t == 900)


def test_form_and_embedding_defaults_and_errors():
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0)
    assert (g.form, g.embedding) == ("authors", "mlp")
    g = cdp_fast.ContrastiveGuidance(loss="infonce", lam=1.0, tau=1.0)
    assert (g.form, g.embedding) == ("authors", None)
    real = torch.randn(4, 3)
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, negatives="real", real=real)
    assert g.form == "anchors"
    with pytest.raises(ValueError, match="form"):
        cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, negatives="real", real=real, form="authors")
    with pytest.raises(ValueError, match="form"):
        cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=1.0, form="symmetric")


def test_head_init_leaves_the_global_rng_alone():
    """The head is drawn from a generator of its own: the global RNG state is untouched and
    the head is the same whatever state it was in."""
    feats = _features()
    x = torch.randn(4, 1, 3, 4)
    heads = []
    for s in (0, 1):
        torch.manual_seed(s)
        before = torch.random.get_rng_state()
        g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=0.5, features=feats, seed=3)
        g(x, 900, x, 0)
        g(x, 800, x, 1)
        assert torch.equal(torch.random.get_rng_state(), before)
        heads.append(g._head.net[0].weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_reuse_without_reset_starts_a_new_trajectory_and_begin_is_a_shim():
    """guided_ddim twice with one guidance object and no reset: the second run equals a fresh
    object's (step 0 clears the previous trajectory's x_{t+1}); begin() warns and resets."""
    from test_sampler import TinyEps

    abar = cdp_fast.make_alphas_cumprod("linear", 1000)
    ts = cdp_fast.timesteps(1000, 5, "uniform")
    x_T = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    kw = dict(loss="hnm", lam=5.0, tau=0.5, embedding=None)
    g = cdp_fast.ContrastiveGuidance(**kw)
    cdp_fast.guided_ddim(TinyEps(), x_T + 1.0, alphas_cumprod=abar, timesteps=ts, guidance=g)
    again = cdp_fast.guided_ddim(TinyEps(), x_T, alphas_cumprod=abar, timesteps=ts, guidance=g)
    fresh = cdp_fast.guided_ddim(TinyEps(), x_T, alphas_cumprod=abar, timesteps=ts,
                                 guidance=cdp_fast.ContrastiveGuidance(**kw))
    torch.testing.assert_close(again, fresh)
    with pytest.warns(DeprecationWarning, match="reset"):
        g.begin(x_T, [0, 1, 2])


def test_guidance_strength_is_recorded_per_step(tmp_path):
    """λ‖∇ℓ_i‖/‖ε_i‖ per guided step: in Samples.meta (in memory) and in the manifest (out dir),
    for exactly the guided timesteps (the authors' window t >= 400, not the first step), and
    equal to a hand computation from the step's gradient and ε."""
    kw = dict(loss="hnm", lam=30.0, tau=0.5, features="pixels", embedding=None, image_shape=(1, 5, 5), steps=6,
              skip="uniform", batch_size=2, output="float", progress=False)
    mem = cdp_fast.sample(_tiny(), 4, **kw).meta["guidance_strength"]
    disk = cdp_fast.sample(_tiny(), 4, out=str(tmp_path / "o"), shard_size=2, **kw).meta["guidance_strength"]
    assert [r["t"] for r in mem] == [664, 498] and all(r["batches"] == 2 for r in mem)   # 830: first step
    assert mem == disk
    assert all(0 < r["ratio_mean"] <= r["ratio_max"] for r in mem)
    assert cdp_fast.sample(_tiny(), 2, **dict(kw, loss=None)).meta.get("guidance_strength") is None

    class Capture(cdp_fast.ContrastiveGuidance):
        def __call__(self, x, t, eps, step):
            out = super().__call__(x, t, eps, step)
            if out is not None:
                self.seen.append((out[0], eps))
            return out

    g = Capture(loss="hnm", lam=30.0, tau=0.5, embedding=None)
    g.seen = []
    x_T = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    cdp_fast.guided_ddim(_tiny(), x_T, alphas_cumprod=cdp_fast.make_alphas_cumprod("linear", 1000),
                         timesteps=cdp_fast.timesteps(1000, 6, "uniform"), guidance=g)
    grad, eps = g.seen[0]
    hand = 30.0 * grad.flatten(1).norm(dim=1) / eps.flatten(1).norm(dim=1)
    t, mean, mx = g.strength[0]
    assert t == 664
    torch.testing.assert_close(mean, hand.mean())
    torch.testing.assert_close(mx, hand.max())


def test_symmetric_rows_without_negatives():
    """Labels that leave a row no negative: ℓ_row = 0 in the reference and the streamed form
    alike (no 0/0), and a batch of one class has loss 0 and zero gradient."""
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])          # every row has negatives of the other class
    a = losses.hnm_loss_symmetric(z, w, tau=0.5, labels=labels)
    r = reference.hnm_symmetric_ref(z, w, tau=0.5, labels=labels)
    assert torch.isfinite(r)
    torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    same = torch.zeros(4, dtype=torch.long)
    a = losses.hnm_loss_symmetric(z, w, tau=0.5, labels=same)
    r = reference.hnm_symmetric_ref(z, w, tau=0.5, labels=same)
    assert float(a) == float(r) == 0.0
    assert float(torch.autograd.grad(a, z)[0].abs().max()) == 0.0
