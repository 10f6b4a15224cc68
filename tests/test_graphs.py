"""The whole-step graph (cdp_fast.sampling.graphs.StepGraph), on CPU: the same numbers as the plain loop
(bitwise: on CPU the steady steps run the same ops through static buffers), the right steps
steady / warm-up / captured / replayed, the state carried between steps and batches through
the static buffers, and the capture refusing a step that synchronises with the host (what a
CUDA graph cannot capture) with a fallback that changes nothing. The CUDA capture itself:
the gpu-marked test at the end (compile on vs off, on a GPU)."""
import warnings

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.sampling.graphs import HostSyncError, StepGraph, _NoHostSync
from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.diffusion.schedule import make_alphas_cumprod
from cdp_fast.diffusion.solvers import guided_ddim, guided_ddpm, guided_dpmpp_2m

ABAR = make_alphas_cumprod("linear", 1000)


class Eps(torch.nn.Module):
    """A small conv ε-model (3 channels, odd size), class-conditional when ``classes``."""

    def __init__(self, classes=None):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(classes, 8) if classes else None

    def forward(self, x, t, y=None):
        h = torch.relu(self.c1(x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        if self.emb is not None:
            h = h + self.emb(y).view(-1, 8, 1, 1)
        return self.c2(h)


class Feat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.l = torch.nn.Linear(6 * 9 * 9, 10)

    def forward(self, x):
        return self.l(torch.tanh(self.c(x)).flatten(1))


def _nets(classes=None):
    torch.manual_seed(0)
    return Eps(classes).eval().requires_grad_(False), Feat().eval().requires_grad_(False)


def _guidance(feat, **kw):
    args = dict(loss="hnm", lam=50.0, tau=1.0, features=feat, seed=3)
    args.update(kw)
    return ContrastiveGuidance(**args)


def _x_T(B=6, seed=1):
    return torch.randn(B, 3, 9, 9, generator=torch.Generator().manual_seed(seed))


def _same_strength(a, b):
    assert len(a) == len(b)
    for (t1, m1, x1), (t2, m2, x2) in zip(a, b):
        assert t1 == t2 and torch.equal(m1, m2) and torch.equal(x1, x2)


CASES = {
    "hnm-authors-head": dict(),
    "infonce-no-head": dict(loss="infonce", lam=20.0, tau=0.5),
    "hnm-anchors": dict(form="anchors", embedding=None),
    "hnm-window": dict(guide_window=(300, 800)),
    "infonce-real-bank": dict(loss="infonce", lam=20.0, tau=0.5, negatives="real", real="REAL"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver", ["ddim", "ddim-eta", "ddpm", "dpmpp_2m"])
def test_step_graph_gives_the_plain_loops_numbers(case, solver):
    """Two batches (the head kept between them, as sample() does within a shard) through the
    plain loop and through one StepGraph: the same x_0 and guidance strengths bit for bit; the
    steady steps were warmed up, captured once per kind and then replayed."""
    eps, feat = _nets()
    kw = dict(CASES[case])
    if kw.get("real") == "REAL":
        kw["real"] = torch.rand(5, 3, 9, 9) * 2 - 1
    ts = cdp_fast.timesteps(1000, 12, "uniform")
    run = {"ddim": lambda **a: guided_ddim(eps, alphas_cumprod=ABAR, timesteps=ts, **a),
           "ddim-eta": lambda **a: guided_ddim(eps, alphas_cumprod=ABAR, timesteps=ts, eta=1.0,
                                               generator=torch.tensor([11, 12, 13, 14, 15, 16]), **a),
           "ddpm": lambda **a: guided_ddpm(eps, alphas_cumprod=ABAR, timesteps=ts,
                                           generator=torch.tensor([11, 12, 13, 14, 15, 16]), **a),
           "dpmpp_2m": lambda **a: guided_dpmpp_2m(eps, alphas_cumprod=ABAR, timesteps=ts, **a)}[solver]
    outs = {}
    for graphed in (False, True):
        g = _guidance(feat, **kw)
        sg = StepGraph(warmup=2) if graphed else None
        xs, strengths = [], []
        for b in range(2):
            g.reset(keep_head=b > 0)
            with warnings.catch_warnings():
                warnings.simplefilter("error")        # no capture failure
                xs.append(run(x_T=_x_T(seed=b), guidance=g, step_graph=sg))
            strengths.append(list(g.strength))
        outs[graphed] = (xs, strengths, sg)
    (x_a, s_a, _), (x_b, s_b, sg) = outs[False], outs[True]
    for a, b in zip(x_a, x_b):
        assert torch.equal(a, b)
    for a, b in zip(s_a, s_b):
        _same_strength(a, b)
    assert sg.disabled is None
    c = sg.counts
    assert c["eager"] + c["warmup"] + c["captured"] + c["replayed"] == 2 * len(ts)
    assert c["captured"] >= 1 and c["replayed"] >= 1
    assert c["warmup"] <= 2 * c["captured"]           # warm-up happens once per kind and shape
    kinds = {e.kind for e in sg._entries}
    assert "guided" in kinds


def test_which_steps_are_steady():
    """Authors' HNM with the head: step 0 (no x_{t+1}) and step 1 (creates the head) run
    uncaptured; from step 2 the guided steps are steady: 2 warm-up, 1 capture, then replays;
    the second batch (head kept) is steady from step 1. Outside the window: "plain"."""
    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 10, "uniform")          # 999, 899, ..., 99
    g, sg = _guidance(feat), StepGraph(warmup=2)
    guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert sg.counts == {"eager": 2, "warmup": 2, "captured": 1, "replayed": 5}
    g.reset(keep_head=True)
    guided_ddim(eps, _x_T(seed=2), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert sg.counts == {"eager": 3, "warmup": 2, "captured": 1, "replayed": 14}
    # a new head (a new shard) is new state: warm-up and capture again
    g.reset(keep_head=False)
    guided_ddim(eps, _x_T(seed=3), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert sg.counts == {"eager": 5, "warmup": 4, "captured": 2, "replayed": 19}
    # a window: the steps outside it are "plain" (ε-model only), captured apart
    g2, sg2 = _guidance(feat, embedding=None, guide_window=(400, 1000)), StepGraph(warmup=1)
    guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g2, step_graph=sg2)
    # 999 (first: eager), 899..499 guided (1 warm-up, 1 capture, 3 replays), 399..99 plain
    # (1 warm-up, 1 capture, 2 replays)
    assert sg2.counts == {"eager": 1, "warmup": 2, "captured": 2, "replayed": 5}
    assert sorted(e.kind for e in sg2._entries) == ["guided", "plain"]


def test_unguided_and_class_conditional():
    """No guidance: every step is "plain"; a class-conditional model gets its labels through
    the static buffer (two batches with different labels, bitwise equal to the plain loop)."""
    eps, _ = _nets(classes=4)
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    sg = StepGraph(warmup=1)
    for b in range(2):
        y = torch.tensor([0, 1, 2, 3, 0, 1]).roll(b)
        ref = guided_ddim(eps, _x_T(seed=b), alphas_cumprod=ABAR, timesteps=ts, y=y)
        got = guided_ddim(eps, _x_T(seed=b), alphas_cumprod=ABAR, timesteps=ts, y=y, step_graph=sg)
        assert torch.equal(ref, got)
    assert sg.counts == {"eager": 0, "warmup": 1, "captured": 1, "replayed": 14}


def test_class_negatives_are_not_captured():
    """negatives="class" reads per-batch labels (or a labeler's argmax at this step's ᾱ_t):
    not graphable, so its guided steps run uncaptured, with the plain loop's numbers."""
    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 6, "uniform")
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    xs = []
    for sg in (None, StepGraph(warmup=1)):
        g = _guidance(feat, negatives="class", embedding=None)
        g.reset(class_labels=labels)
        xs.append(guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg))
    assert torch.equal(xs[0], xs[1])
    assert sg.counts["eager"] == len(ts) and sg.counts["replayed"] == 0


class SyncingEps(Eps):
    """Reads a value on the host every call (as `if t[0] > 500:` would): not capturable."""

    def forward(self, x, t, y=None):
        scale = 1.0 if float(t[0]) > 500 else 0.5
        return super().forward(x, t, y) * scale


def test_a_step_that_syncs_with_the_host_is_refused_and_run_uncaptured():
    """The capture step runs under the host-sync check: a model calling float(t[0]) is caught
    (on CUDA the capture itself would fail), one warning names the cause, and every later step
    runs uncaptured — with the same numbers as the plain loop."""
    torch.manual_seed(0)
    eps = SyncingEps().eval().requires_grad_(False)
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    ref = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts)
    sg = StepGraph(warmup=1)
    with pytest.warns(RuntimeWarning, match="_local_scalar_dense"):
        got = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, step_graph=sg)
    assert torch.equal(ref, got)
    assert sg.disabled and "host" in sg.disabled
    assert sg.counts == {"eager": 7, "warmup": 1, "captured": 0, "replayed": 0}


class SyncingFeat(Feat):
    def forward(self, x):
        z = super().forward(x)
        return z * (2.0 if float(z.detach().abs().max()) > 1e6 else 1.0)


def test_a_guided_step_that_syncs_falls_back_with_the_same_numbers():
    """The same for the guided kind: features that read a value on the host are refused at the
    capture step; the head, positives and strengths carry on uncaptured, bit for bit."""
    eps, _ = _nets()
    torch.manual_seed(0)
    feat = SyncingFeat().eval().requires_grad_(False)
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    g_ref, g = _guidance(feat), _guidance(feat)
    ref = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g_ref)
    sg = StepGraph(warmup=1)
    with pytest.warns(RuntimeWarning, match="HostSyncError"):
        got = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert torch.equal(ref, got)
    _same_strength(g_ref.strength, g.strength)
    assert sg.counts["captured"] == 0 and sg.counts["warmup"] == 1


def test_a_new_head_releases_the_old_heads_graph():
    """Each shard starts a new head (a new graph); the previous head's graph is released, so a
    long run keeps one guided graph, not one per shard."""
    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 6, "uniform")
    g, sg = _guidance(feat), StepGraph()
    for shard in range(3):
        g.reset(keep_head=False)
        guided_ddim(eps, _x_T(seed=shard), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert sg.counts["captured"] == 3
    assert [e.kind for e in sg._entries] == ["guided"] and sg._entries[0].head is g._head


def test_autocast_with_its_cache_is_refused_and_without_is_captured():
    """torch.autocast's weight-cast cache would leave a graph reading casts freed at the region's
    end: refused (warning, uncaptured, same numbers); sample()'s autocast (no cache) captures."""
    from cdp_fast.utils import runtime

    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 6, "uniform")
    outs = []
    for ctx, refused in ((torch.autocast("cpu", dtype=torch.bfloat16), True),
                         (runtime.autocast(torch.device("cpu"), torch.bfloat16)(), False)):
        sg = StepGraph()
        with ctx, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            outs.append(guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts,
                                    guidance=_guidance(feat, embedding=None), step_graph=sg))
        assert any("weight-cast cache" in str(m.message) for m in w) == refused
        assert (sg.counts["captured"] == 0) == refused


def test_when_sample_uses_a_step_graph(monkeypatch):
    """CDP_FAST_STEP_GRAPH: auto = CUDA + compile + a graphable guidance (or none); 0 never;
    1 always (CPU too); never for Heun."""
    from cdp_fast.sampling.graphs import wanted

    eps, feat = _nets()
    plain, cls = _guidance(feat), _guidance(feat, negatives="class")
    monkeypatch.delenv("CDP_FAST_STEP_GRAPH", raising=False)
    assert wanted("cuda", "auto", "ddim") and wanted("cuda", True, "dpmpp_2m", plain)
    assert not wanted("cuda", False, "ddim") and not wanted("cpu", "auto", "ddim")
    assert not wanted("cuda", "auto", "ddim", cls) and not wanted("cuda", "auto", "heun")
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "1")
    assert wanted("cpu", False, "ddpm") and not wanted("cpu", False, "heun")
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "0")
    assert not wanted("cuda", True, "ddim")


def test_host_sync_check_catches_what_capture_refuses():
    x = torch.randn(5)
    counts = torch.tensor([1, 0, 2])
    for fn in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.nonzero(),
               lambda: x[x > 0], lambda: torch.bincount(counts), lambda: torch.repeat_interleave(counts),
               lambda: x[:3].repeat_interleave(counts, dim=0)):
        with pytest.raises(HostSyncError), _NoHostSync():
            fn()
    with _NoHostSync():                       # device-side equivalents pass
        torch.where(x > 0, x, 0.0).sum()
        torch.isfinite(x).all()
        x[:3].repeat_interleave(counts, dim=0, output_size=3)


def test_warmup_must_be_positive():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            StepGraph(warmup=bad)


def test_sample_with_the_step_graph_forced_on_cpu(monkeypatch, tmp_path):
    """CDP_FAST_STEP_GRAPH=1 puts sample() on the step graph on CPU too (uncaptured there): the
    images and the manifest's guidance strengths are those of the plain path, in memory and
    streamed to shards (heads per shard, several batches)."""
    eps, feat = _nets()
    kw = dict(loss="hnm", features=feat, steps=6, skip="uniform", image_shape=(3, 9, 9), batch_size=4,
              seed=5, compile=False, progress=False, output="float", lam=50.0, tau=1.0)
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "0")
    ref = cdp_fast.sample(eps, 12, **kw)
    ref_dir = cdp_fast.sample(eps, 12, out=tmp_path / "a", shard_size=8, **kw)
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "1")
    got = cdp_fast.sample(eps, 12, **kw)
    got_dir = cdp_fast.sample(eps, 12, out=tmp_path / "b", shard_size=8, **kw)
    assert np.array_equal(ref.images, got.images)
    assert np.array_equal(ref_dir.images[:12], got_dir.images[:12]) and len(got_dir.images) == 12
    assert ref.meta["guidance_strength"] == got.meta["guidance_strength"]
    assert ref.meta.get("step_graph") is None and got.meta["step_graph"]["replayed"] > 0


@pytest.fixture
def fresh_graph_cache():
    from cdp_fast.sampling import graphs

    graphs.clear_cache()
    yield graphs
    graphs.clear_cache()


def _count_captures(monkeypatch, graphs):
    """Count StepGraph._capture calls (the CPU stand-in of a CUDA capture)."""
    calls = []
    real = graphs.StepGraph._capture

    def counting(self, entry, t, cuda):
        calls.append(entry.kind)
        return real(self, entry, t, cuda)
    monkeypatch.setattr(graphs.StepGraph, "_capture", counting)
    return calls


SAMPLE_KW = dict(loss="hnm", embedding=None, steps=6, skip="uniform", image_shape=(3, 9, 9), batch_size=4,
                 compile=False, progress=False, output="float", lam=50.0, tau=1.0, guide_window=None)


def test_sample_captures_once_per_process_not_per_call(monkeypatch, fresh_graph_cache):
    """Three sample() calls with the same networks, shapes and settings (other seeds): one
    capture in all (the later calls replay it with no warm-up), the images bit for bit those of
    the uncaptured path, and one graph kept."""
    graphs = fresh_graph_cache
    eps, feat = _nets()
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "0")
    refs = [cdp_fast.sample(eps, 4, features=feat, seed=s, **SAMPLE_KW) for s in (1, 2, 3)]
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "1")
    calls = _count_captures(monkeypatch, graphs)
    got = [cdp_fast.sample(eps, 4, features=feat, seed=s, **SAMPLE_KW) for s in (1, 2, 3)]
    assert calls == ["guided"]
    counts = [r.meta["step_graph"] for r in got]
    assert [c["captured"] for c in counts] == [1, 0, 0] and [c["warmup"] for c in counts] == [1, 0, 0]
    assert all(c["replayed"] > 0 and c["disabled"] is None for c in counts)
    for r, g in zip(refs, got):
        assert np.array_equal(r.images, g.images)
        assert r.meta["guidance_strength"] == g.meta["guidance_strength"]
    assert len(graphs._SHARED) == 1


def test_a_changed_setting_captures_again(monkeypatch, fresh_graph_cache):
    """What the capture bakes in is its key: another τ, batch size or float32 GEMM precision
    captures anew (same numbers as uncaptured); going back to the first settings replays the
    first graph; at most MAX_SHARED graphs are kept (least recently used dropped)."""
    graphs = fresh_graph_cache
    eps, feat = _nets()
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "1")
    calls = _count_captures(monkeypatch, graphs)

    def run(**kw):
        return cdp_fast.sample(eps, 4, features=feat, seed=7, **dict(SAMPLE_KW, **kw))

    first = run()
    run(tau=0.5)
    run(batch_size=2)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "highest")
        run()
    finally:
        torch.set_float32_matmul_precision(precision)
    assert len(calls) == 4
    again = run()                              # the first settings: replayed, not captured
    assert len(calls) == 4 and again.meta["step_graph"]["captured"] == 0
    assert np.array_equal(first.images, again.images)
    monkeypatch.setattr(graphs, "MAX_SHARED", 2)
    run(tau=0.25)
    assert len(calls) == 5 and len(graphs._SHARED) == 2


def test_a_head_is_captured_per_call_and_its_graph_released(monkeypatch, fresh_graph_cache):
    """With the online head (new state per call) each call captures, and the previous call's
    head graph is released: one guided graph kept, not one per call; same numbers."""
    graphs = fresh_graph_cache
    eps, feat = _nets()
    kw = dict(SAMPLE_KW, embedding="auto", features=feat, seed=4)
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "0")
    ref = cdp_fast.sample(eps, 4, **kw)
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "1")
    calls = _count_captures(monkeypatch, graphs)
    outs = [cdp_fast.sample(eps, 4, **kw) for _ in range(2)]
    assert calls == ["guided", "guided"] and len(graphs._SHARED) == 1
    assert all(np.array_equal(ref.images, o.images) for o in outs)


def test_step_graph_setting_is_checked(monkeypatch):
    eps, feat = _nets()
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "sometimes")
    with pytest.raises(ValueError, match="CDP_FAST_STEP_GRAPH"):
        cdp_fast.sample(eps, 2, loss=None, steps=2, image_shape=(3, 9, 9), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_step_graph_matches_the_uncaptured_loop(dtype):
    """On CUDA: the captured steps (forward, input-gradient, Triton contrastive kernels, the
    capturable Adam), replayed over two batches with one head, give the uncaptured loop's x_0
    and guidance strengths (both run the same kernels: fp32 to reduction-order noise over 12
    steps, 1e-4; bf16 autocast without the weight cache, as sample() runs it, 2e-2), and the
    replays really ran (a graph that recorded nothing would repeat the capture step's output)."""
    from cdp_fast.utils import runtime

    eps, feat = _nets()
    eps, feat = eps.cuda(), feat.cuda()
    ts = cdp_fast.timesteps(1000, 12, "uniform")
    outs, strengths = [], []
    for sg in (None, StepGraph()):
        g = _guidance(feat)
        xs = []
        with runtime.autocast(torch.device("cuda"), dtype)():
            for b in range(2):
                g.reset(keep_head=b > 0)
                xs.append(guided_ddim(eps, _x_T(seed=b).cuda(), alphas_cumprod=ABAR, timesteps=ts, guidance=g,
                                      step_graph=sg))
        outs.append(torch.stack(xs))
        strengths.append(torch.stack([torch.stack([m, x]) for _, m, x in g.strength]))
    assert sg.disabled is None and sg.counts["replayed"] > 0
    tol = 1e-4 if dtype is None else 2e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(strengths[1], strengths[0], rtol=tol, atol=tol)
    assert len(set(strengths[1][:, 0].tolist())) > 1      # the strengths move from step to step


def test_sampler_autocast_does_not_cache_weight_casts():
    """The sampler's autocast region spans a trajectory: a weight updated in place inside it
    (the online head's Adam step) must be seen by the next forward, and a captured graph must
    not read a cast copy that the region's end frees. torch.autocast's default cache fails the
    first (checked here, as the regression it guards against)."""
    from cdp_fast.utils import runtime

    lin, x = torch.nn.Linear(4, 4), torch.randn(2, 4)

    def changes(ctx):
        with ctx:
            a = lin(x)
            with torch.no_grad():
                lin.weight.add_(1.0)
            return not torch.equal(a, lin(x))
    assert not changes(torch.autocast("cpu", dtype=torch.bfloat16))       # the default caches
    assert changes(runtime.autocast(torch.device("cpu"), torch.bfloat16)())


def test_bf16_head_learns_within_a_trajectory():
    """Under bf16 autocast (sample(dtype=torch.bfloat16)) the head's Adam updates reach its
    forward within the trajectory: the guided x_0 differs from a run whose head never moves
    (lr 0 from its creation) — with autocast's cache the two were equal."""
    from cdp_fast.utils import runtime

    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 6, "uniform")
    outs = []
    for freeze in (False, True):
        g = _guidance(feat, lam=5000.0)
        if freeze:
            orig = g._ensure_head

            def ensure(d, device, orig=orig, g=g):
                orig(d, device)
                g._opt.param_groups[0]["lr"] = 0.0
            g._ensure_head = ensure
        with runtime.autocast(torch.device("cpu"), torch.bfloat16)():
            outs.append(guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g))
    assert not torch.equal(outs[0], outs[1])


def test_changed_guidance_settings_mean_a_new_capture():
    """A replay reads nothing from the guidance object: changing λ or τ between calls on the
    same StepGraph captures afresh, and the numbers follow the new setting."""
    eps, feat = _nets()
    ts = cdp_fast.timesteps(1000, 8, "uniform")
    g, sg = _guidance(feat, embedding=None), StepGraph(warmup=1)
    guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    g.tau, g.lam = 0.5, 80.0
    g.reset()
    got = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts, guidance=g, step_graph=sg)
    assert sg.counts["captured"] == 2
    ref = guided_ddim(eps, _x_T(), alphas_cumprod=ABAR, timesteps=ts,
                      guidance=_guidance(feat, embedding=None, tau=0.5, lam=80.0))
    assert torch.equal(ref, got)
