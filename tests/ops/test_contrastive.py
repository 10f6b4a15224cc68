"""The contrastive-statistics op (cdp_fast.ops.contrastive): the Triton kernels (interpreted on
CPU, ``impl="interpret"``; CUDA, gpu-marked) and the chunked PyTorch path (``impl="torch"``)
against the dense references (cdp_fast.ops.contrastive.reference): values and gradients, odd
shapes, masks; the registration (opcheck, torch.compile); the memory bound.

Tolerances (why):
* Triton (interpreter, fp32) vs the fp64 reference: the logits are c·s with |s| <= 1 and
  c = (1+β)/τ up to 60; fp32 rounding of s (≈ 1e-7 relative, accumulated over d <= 40) moves
  each logit by ≲ 1e-6·c, and the loss is 1-Lipschitz in the logits, so |Δloss| <= 2e-5·c
  (measured worst over 80 random draws: 2e-6·c). Gradients scale like c/‖x‖ (normalisation
  Jacobian); we allow 2e-5·c/min‖x_i‖ (measured worst: 1.3e-7·c/min‖x_i‖, the margin covers
  the τ⁺ log1p amplification 1/(1 − e^Δ) near the clamp).
* chunked (fp64) vs the fp64 reference: same formulas in the same precision, different
  summation order: 1e-9 relative.
"""
import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_fast.guidance import losses

from cdp_fast.ops.contrastive import reference
from cdp_fast.ops import contrastive as op
from cdp_fast.ops.contrastive import chunked


def op_hnm_loss(anchor, positive, candidates=None, *, tau, tau_plus=0.1, beta=1.0, **kw):
    """ℓ_HNM straight through the op (no argument checks), any ``impl``."""
    return op.contrastive_loss(anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta, clamp=True, **kw)


def op_infonce_loss(anchor, positive, candidates=None, *, tau, **kw):
    """InfoNCE straight through the op (no argument checks), any ``impl``."""
    return op.contrastive_loss(anchor, positive, candidates, tau=tau, tau_plus=0.0, beta=0.0, clamp=False, **kw)

pytest.importorskip("cdp_fast.kernels.contrastive")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def problems(draw, max_size=40):
    """Odd sizes (the interpreter tiles are 16: most draws are not multiples), masks, β, τ."""
    m = draw(st.integers(2, max_size))
    in_batch = draw(st.booleans())
    n = m if in_batch else draw(st.integers(1, max_size))
    d = draw(st.integers(1, max_size))
    labels = draw(st.booleans())
    beta = draw(st.sampled_from([0.0, 1.0, 2.0]))
    tau = math.exp(draw(st.floats(math.log(0.05), math.log(10.0))))
    tau_plus = draw(st.sampled_from([0.0, 0.1, 0.5]))
    loss = draw(st.sampled_from(["hnm", "infonce"]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    a = torch.randn(m, d, dtype=torch.float64, generator=g) * scale
    p = torch.randn(m, d, dtype=torch.float64, generator=g)
    k = None if in_batch else torch.randn(n, d, dtype=torch.float64, generator=g)
    la = lk = None
    if labels:
        la = torch.randint(0, 3, (m,), generator=g)
        lk = None if in_batch else torch.randint(0, 3, (n,), generator=g)
    # the authors' clamps (0 = off; 1e-4 = theirs, binding only for τ < 0.11; 0.5 / 0.3 bind
    # often) and gradients through the positive (their symmetric form)
    neg_floor = draw(st.sampled_from([0.0, 1e-4, 0.5]))
    ratio_floor = draw(st.sampled_from([0.0, 1e-4, 0.3]))
    detach = draw(st.booleans())
    return dict(a=a, p=p, k=k, la=la, lk=lk, beta=beta, tau=tau, tau_plus=tau_plus, loss=loss,
                neg_floor=neg_floor, ratio_floor=ratio_floor, detach=detach)


def _run(fn_hnm, fn_inf, pr, dtype, **extra):
    """Loss and grads (anchor[, candidates][, positive]) of one implementation in ``dtype``."""
    a = pr["a"].to(dtype).requires_grad_()
    k = None if pr["k"] is None else pr["k"].to(dtype).requires_grad_()
    p = pr["p"].to(dtype).requires_grad_(not pr["detach"])
    kw = dict(anchor_labels=pr["la"], candidate_labels=pr["lk"], tau=pr["tau"], detach_positive=pr["detach"],
              **extra)
    if pr["loss"] == "hnm":
        out = fn_hnm(a, p, k, tau_plus=pr["tau_plus"], beta=pr["beta"], neg_floor=pr["neg_floor"],
                     ratio_floor=pr["ratio_floor"], **kw)
    else:
        out = fn_inf(a, p, k, **kw)
    ins = [a] + ([k] if k is not None else []) + ([p] if not pr["detach"] else [])
    grads = torch.autograd.grad(out, ins)
    return out.detach().double(), [g.double() for g in grads], ins


def _ref(pr):
    return _run(reference.hnm_loss_ref, reference.infonce_loss_ref, pr, torch.float64)


def _logit_scale(pr):
    return (1.0 + (pr["beta"] if pr["loss"] == "hnm" else 0.0)) / pr["tau"]


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@settings(max_examples=30)
@given(pr=problems())
def test_triton_interpreted_matches_reference(pr):
    ref, gref, ins = _ref(pr)
    tri, gtri, _ = _run(op_hnm_loss, op_infonce_loss, pr, torch.float32, impl="interpret")
    c = _logit_scale(pr)
    assert abs(tri.item() - ref.item()) <= 2e-5 * c + 1e-6, (tri.item(), ref.item())
    for gt, gr, x in zip(gtri, gref, ins):
        assert torch.isfinite(gt).all()
        tol = 2e-5 * c / float(x.detach().norm(dim=1).min().clamp(min=1e-6)) + 1e-7
        assert float((gt - gr).abs().max()) <= tol


@settings(max_examples=25)
@given(pr=problems(), chunk=st.integers(1, 17))
def test_chunked_matches_reference_fp64(pr, chunk):
    ref, gref, _ = _ref(pr)
    # the chunk size is the torch path's only knob: every size from 1 candidate per block up
    with mock.patch.object(chunked, "default_chunk", lambda m, n: chunk):
        out, gout, _ = _run(op_hnm_loss, op_infonce_loss, pr, torch.float64, impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    for go, gr in zip(gout, gref):
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "interpret"] if INTERP else ["torch"])
def test_rows_without_negatives_contribute_zero(impl):
    """All candidates share anchor 0's class: ℓ_0 = 0 and no NaN anywhere (per-row N_i)."""
    a = torch.randn(5, 7, requires_grad=True)
    k = torch.randn(9, 7, requires_grad=True)
    la = torch.tensor([0, 1, 1, 2, 0])
    lk = torch.zeros(9, dtype=torch.long)
    lk[4:] = 1
    ref = reference.hnm_loss_ref(a, a.detach(), k, tau=0.3, anchor_labels=la, candidate_labels=lk)
    with mock.patch.object(chunked, "default_chunk", lambda m, n: 4):
        out = op_hnm_loss(a, a.detach(), k, tau=0.3, anchor_labels=la, candidate_labels=lk, impl=impl)
    ga = torch.autograd.grad(ref, (a, k))
    go = torch.autograd.grad(out, (a, k))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(go, ga):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_opcheck_contrastive_stats():
    """Schema, fake kernel, autograd registration and the torch implementation agree
    (torch.library.opcheck)."""
    a = torch.randn(9, 6, requires_grad=True)
    k = torch.randn(13, 6, requires_grad=True)
    la, lk = torch.randint(0, 3, (9,)), torch.randint(0, 3, (13,))
    for args in [(a, k, None, None, 2.0, 1.0, False, -math.inf, "torch"), (a, k, la, lk, 2.0, 0.0, False, -0.5, "torch"),
                 (a, a, la, la, 0.5, 2.0, True, -math.inf, "torch")]:
        torch.library.opcheck(torch.ops.cdp_fast.contrastive_stats.default, args)
    L1, L0, _ = torch.ops.cdp_fast.contrastive_stats(a, k, None, None, 2.0, 1.0, False, -math.inf, "torch")
    args = (a.detach(), k.detach(), None, None, L1.detach(), L0.detach(), torch.randn(9), torch.randn(9),
            2.0, 1.0, False, -math.inf, "torch")
    torch.library.opcheck(torch.ops.cdp_fast.contrastive_stats_backward.default, args)


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
def test_interpreted_op_matches_torch_op_statistics():
    """The op's two implementations give the same per-row statistics and gradients, through
    the one registration (forward op, autograd glue, backward op)."""
    a = torch.randn(21, 9, requires_grad=True)
    k = torch.randn(35, 9, requires_grad=True)
    la, lk = torch.randint(0, 3, (21,)), torch.randint(0, 3, (35,))
    outs = {}
    for impl in ("torch", "interpret"):
        L1, L0, cnt = op.contrastive_stats(a, k, la, lk, 3.0, 1.0, False, -0.3, impl)
        grads = torch.autograd.grad(L1.sum() + 0.5 * L0.sum(), (a, k))
        outs[impl] = (L1, L0, cnt) + grads
    for x, y in zip(outs["interpret"], outs["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@settings(max_examples=8)
@given(m=st.integers(1, 40), n=st.integers(1, 40), d=st.integers(1, 24), rows=st.integers(1, 7),
       in_batch=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_backward_row_blocks_change_nothing(m, n, d, rows, in_batch, seed):
    """The backward materialises D for blocks of anchor rows (``block_bytes``): any block size
    gives the single-block gradients (same formulas, fp32 GEMMs summed in another grouping:
    1e-6 relative), and a rerun is bitwise identical (no atomics)."""
    from cdp_fast.kernels import contrastive as kc

    g = torch.Generator().manual_seed(seed)
    n = m if in_batch else n
    a, k = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g)
    ra, rk = op._inv_norms(a), op._inv_norms(k)
    la, lk = torch.randint(0, 3, (m,), generator=g), torch.randint(0, 3, (n,), generator=g)
    L1, L0, _ = kc.stats_forward(a, k, ra, rk, la, lk, 2.0, 1.0, in_batch, -0.5)
    dL1, dL0 = torch.rand(m, generator=g), torch.rand(m, generator=g)
    args = (a, k, ra, rk, la, lk, L1, L0, dL1, dL0, 2.0, 1.0, in_batch, -0.5)
    whole = kc.stats_backward(*args)
    blocked = kc.stats_backward(*args, block_bytes=4 * n * rows)
    again = kc.stats_backward(*args, block_bytes=4 * n * rows)
    for w, b, r in zip(whole, blocked, again):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(b, w, rtol=1e-6, atol=1e-6)
        assert torch.equal(b, r)


def test_torch_compile_fullgraph(monkeypatch):
    """The public loss (dispatch + op + epilogue) traces without graph breaks."""
    monkeypatch.setenv("CDP_FAST_BACKEND", "auto")
    torch._dynamo.reset()
    a = torch.randn(11, 5, requires_grad=True)
    p = torch.randn(11, 5)
    k = torch.randn(17, 5, requires_grad=True)

    def f(a, p, k):
        return losses.hnm_loss(a, p, k, tau=0.5, tau_plus=0.1, beta=1.0)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(a, p, k)
    ref = reference.hnm_loss_ref(a, p, k, tau=0.5, tau_plus=0.1, beta=1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(out, (a, k))
    g2 = torch.autograd.grad(ref, (a, k))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


_MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from cdp_fast import losses
    torch.manual_seed(0)
    m, n, d = 512, 400_000, 64
    a = torch.randn(m, d, requires_grad=True)
    p = torch.randn(m, d)
    k = torch.randn(n, d, requires_grad=True)
    # warm-up on a tiny problem: imports (triton, torch.library, inductor: ~150 MB of code)
    # and one-time allocations are not what this test measures
    w = torch.randn(4, d, requires_grad=True)
    losses.hnm_loss(w, w.detach(), w.detach()[:3].clone().requires_grad_(), tau=0.5).backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    loss = losses.hnm_loss(a, p, k, tau=0.5, tau_plus=0.1, beta=1.0)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert k.grad.shape == (n, d) and torch.isfinite(k.grad).all()
    print((after - before) / 1024.0)
""")


@pytest.mark.slow
def test_chunked_memory_400k_bank():
    """512 anchors × 400k candidates, d = 64, forward + backward: peak RSS growth < 400 MB
    (one dense 512×400k fp32 matrix alone is 820 MB; dK itself is 102 MB)."""
    env = dict(os.environ, CDP_FAST_BACKEND="torch", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    growth_mb = float(res.stdout.strip().splitlines()[-1])
    assert growth_mb < 400, f"peak RSS grew by {growth_mb:.0f} MB"


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d", [(37, None, 29), (100, 1000, 128), (257, 3001, 640)])
def test_triton_cuda_matches_reference(dtype, m, n, d, autotune, monkeypatch):
    """CUDA kernels (autotuned tiles, and the fixed ones of CDP_FAST_AUTOTUNE=0) vs the fp64
    reference. fp32 (tf32x3 dots): as the interpreter tolerance. bf16/fp16: |tri − ref| <=
    2·|ref computed in the same dtype − ref| + atol (flash-attention's rule), since rounding
    the inputs alone moves the loss by that much."""
    monkeypatch.setenv("CDP_FAST_AUTOTUNE", autotune)
    torch.manual_seed(0)
    dev = "cuda"
    a64 = torch.randn(m, d, dtype=torch.float64, device=dev)
    p64 = torch.randn(m, d, dtype=torch.float64, device=dev)
    k64 = None if n is None else torch.randn(n, d, dtype=torch.float64, device=dev)
    la = torch.randint(0, 4, (m,), device=dev)
    lk = None if n is None else torch.randint(0, 4, (n,), device=dev)
    kw = dict(tau=0.2, tau_plus=0.1, beta=1.0, anchor_labels=la, candidate_labels=lk)

    def run(fn, dt):
        a = a64.to(dt).requires_grad_()
        k = None if k64 is None else k64.to(dt).requires_grad_()
        out = fn(a, p64.to(dt), k, **kw)
        ins = [a] + ([k] if k is not None else [])
        return [out.double()] + [g.double() for g in torch.autograd.grad(out, ins)]

    ref = run(reference.hnm_loss_ref, torch.float64)
    tri = run(lambda *a, **k: op_hnm_loss(*a, impl="triton", **k), dtype)
    same = run(reference.hnm_loss_ref, dtype)
    for t, r, s in zip(tri, ref, same):
        if dtype == torch.float32:
            assert float((t - r).abs().max()) <= 2e-5 * 10 * max(1.0, float(r.abs().max()))
        else:
            assert float((t - r).abs().max()) <= 2 * float((s - r).abs().max()) + 1e-3 * float(r.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_autotune_candidate_agrees_with_the_fixed_tiles(dtype, monkeypatch):
    """Each tile candidate of CDP_FAST_AUTOTUNE=1 (launched directly, not left to the timing)
    gives the fixed tiles' statistics and gradients within rounding (BLOCK_N and BLOCK_K are
    fixed; the in-tile reductions' layout follows the warps, so the last bits may move):
    1e-6 relative for fp32 statistics, 1e-5 for gradients (bf16/fp16: 1e-3)."""
    from torch.library import wrap_triton

    from cdp_fast.kernels import contrastive as kc

    torch.manual_seed(0)
    a = torch.randn(300, 640, device="cuda", dtype=dtype)
    k = torch.randn(2000, 640, device="cuda", dtype=dtype)
    la, lk = torch.randint(0, 10, (300,), device="cuda"), torch.randint(0, 10, (2000,), device="cuda")
    ra, rk = op._inv_norms(a), op._inv_norms(k)

    def run():
        L1, L0, cnt = kc.stats_forward(a, k, ra, rk, la, lk, 5.0, 1.0, False)
        d = kc.stats_backward(a, k, ra, rk, la, lk, L1, L0, torch.ones_like(L1), torch.ones_like(L0), 5.0, 1.0,
                              False)
        return (L1, L0, cnt) + tuple(d)

    monkeypatch.setenv("CDP_FAST_AUTOTUNE", "0")
    fixed = run()
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for cfg in kc._gpu_configs():
        def with_cfg(plain, cfg=cfg):
            inner = wrap_triton(plain)

            class Launch:
                def __getitem__(self, grid):
                    def call(*args, **kw):
                        kw.update(cfg.kwargs)
                        return inner[grid](*args, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)
                    return call
            return Launch()
        monkeypatch.setattr(kc, "_kernel", lambda plain, tuned, autotuned: with_cfg(plain))
        monkeypatch.setattr(kc, "_blocks", lambda d, dt, dev: (dict(BLOCK_N=64, BLOCK_K=32 if dt == torch.float32
                                                                     else 64), True))
        for x, y in zip(run(), fixed):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * float(y.abs().max().clamp(min=1)), msg=str(cfg))


# --------------------------------------------------------------------------------------------
# GPU-path risks settled in code: the backward's grid y limit, NaN semantics
# --------------------------------------------------------------------------------------------
def test_column_chunks_cover_the_candidates_within_the_grid_limit(monkeypatch):
    """The backward's candidate tiles are split into launches of at most GRID_Y_MAX tiles
    (CUDA's gridDim.y ≤ 65535): one launch up to 65535·64 = 4,194,240 candidates, two above;
    the chunks tile 0..N exactly, each starting on a tile boundary."""
    from cdp_fast.kernels import contrastive as kc

    assert kc.GRID_Y_MAX == 65535
    assert kc.column_chunks(4_194_240, 64) == [(0, 65535)]
    assert kc.column_chunks(4_194_241, 64) == [(0, 65535), (4_194_240, 1)]
    for limit in (1, 2, 3, 7):
        monkeypatch.setattr(kc, "GRID_Y_MAX", limit)
        for n in (1, 15, 16, 17, 63, 64, 65, 200):
            for block_n in (16, 64):
                chunks = kc.column_chunks(n, block_n)
                covered = [c0 + i * block_n for c0, t in chunks for i in range(t)]
                assert covered == list(range(0, n, block_n))
                assert all(1 <= t <= limit and c0 % block_n == 0 for c0, t in chunks)


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("in_batch", [False, True])
def test_backward_split_into_column_launches_changes_nothing(in_batch, monkeypatch):
    """With the grid limit lowered to 2 tiles (interpreter tiles: 16 candidates), a 71-candidate
    backward takes 3 launches per row block (a 37-candidate in-batch one 2), none wider than 2 tiles on y, and gives the
    one-launch gradients bit for bit (each D tile is written by one program either way; the
    diagonal mask of in-batch negatives sees absolute column indices)."""
    from cdp_fast.kernels import contrastive as kc

    g = torch.Generator().manual_seed(3)
    m, n, d = 37, 71, 19
    n = m if in_batch else n
    a, k = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g)
    ra, rk = op._inv_norms(a), op._inv_norms(k)
    la, lk = torch.randint(0, 3, (m,), generator=g), torch.randint(0, 3, (n,), generator=g)
    L1, L0, _ = kc.stats_forward(a, k, ra, rk, la, lk, 2.0, 1.0, in_batch, -0.5)
    args = (a, k, ra, rk, la, lk, L1, L0, torch.rand(m, generator=g), torch.rand(m, generator=g), 2.0, 1.0,
            in_batch, -0.5)
    whole = kc.stats_backward(*args, block_bytes=4 * n * 20)
    grids = []
    real_kernel = kc._kernel

    def recording(plain, tuned, autotuned):
        launch = real_kernel(plain, tuned, autotuned)

        class Rec:
            def __getitem__(self, grid):
                if plain is kc._stats_bwd_d_kernel:
                    grids.append(grid(dict(BLOCK_M=16)))
                return launch[grid]
        return Rec()

    monkeypatch.setattr(kc, "_kernel", recording)
    monkeypatch.setattr(kc, "GRID_Y_MAX", 2)
    split = kc.stats_backward(*args, block_bytes=4 * n * 20)
    launches = math.ceil(math.ceil(n / 16) / 2)                        # 3 (n = 71), 2 (n = 37)
    assert len(grids) == 2 * launches and max(y for _, y in grids) == 2  # 2 row blocks of 20
    for w, s in zip(whole, split):
        assert torch.isfinite(w).all() and torch.equal(w, s)


class _NumpyKeepingNaN:
    """numpy, except that the NaN-dropping max/min the Triton interpreter uses for ``tl.maximum``
    and ``tl.max`` (``fmax``, ``nanmax``: what NVIDIA GPUs do) propagate NaN instead (what
    older interpreters did): the kernels must give the same statistics under both rules."""

    import numpy as _np

    fmax, fmin = staticmethod(_np.maximum), staticmethod(_np.minimum)
    nanmax, nanmin = staticmethod(_np.max), staticmethod(_np.min)

    def __getattr__(self, name):
        return getattr(self._np, name)


def _nan_problem(in_batch):
    g = torch.Generator().manual_seed(11)
    m, n, d = 21, 45, 13
    a = torch.randn(m, d, generator=g)
    k = a if in_batch else torch.randn(n, d, generator=g)
    a[4, 2] = float("nan")                       # a NaN anchor row ...
    if not in_batch:
        k[30, 0] = float("nan")                  # ... and a NaN candidate row (class 0, as 33)
        k[33, 5] = float("inf")                  # an infinite one: its normalised row is NaN
    la = torch.tensor([i % 3 for i in range(m)])
    lk = la if in_batch else torch.tensor([i % 3 for i in range(k.shape[0])])
    return a, k, la, lk


def _dense_l1(a, k, la, lk, in_batch, c1):
    """LSE over the valid negatives of c1·s in fp64 (torch.logsumexp: NaN in, NaN out)."""
    an = torch.nn.functional.normalize(a.double(), dim=1)
    kn = torch.nn.functional.normalize(k.double(), dim=1)
    s = an @ kn.T
    valid = la[:, None] != lk[None, :]
    if in_batch:
        valid &= ~torch.eye(len(a), dtype=torch.bool)
    return torch.where(valid, c1 * s, torch.full_like(s, -math.inf)).logsumexp(1)


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("in_batch", [False, True])
def test_nan_rule_is_the_same_whatever_max_does_with_nan(in_batch, monkeypatch):
    """The op's NaN rule (a row with a NaN similarity among its valid negatives gets NaN
    statistics, the dense logsumexp's answer) holds for the kernels under NaN-dropping max
    (the GPU's) and NaN-keeping max alike, and for the chunked path; the other rows are
    unaffected (labels keep some rows away from the NaN rows)."""
    import triton.runtime.interpreter as interp

    a, k, la, lk = _nan_problem(in_batch)
    c1 = 2.0 * 3.0
    want = _dense_l1(a, k, la, lk, in_batch, c1)
    assert want.isnan().any() and (~want.isnan()).any()
    outs = {"torch": op.contrastive_stats(a, k, la, lk, 3.0, 1.0, in_batch, -math.inf, "torch"),
            "gpu-max": op.contrastive_stats(a, k, la, lk, 3.0, 1.0, in_batch, -math.inf, "interpret")}
    monkeypatch.setattr(interp, "np", _NumpyKeepingNaN())
    outs["numpy-max"] = op.contrastive_stats(a, k, la, lk, 3.0, 1.0, in_batch, -math.inf, "interpret")
    for name, (L1, L0, cnt) in outs.items():
        assert torch.equal(L1.isnan(), want.isnan()), name
        assert torch.equal(L0.isnan(), want.isnan()), name
        ok = ~want.isnan()
        torch.testing.assert_close(L1[ok].double(), want[ok], rtol=1e-5, atol=1e-5, msg=name)
    for x, y in zip(outs["gpu-max"], outs["numpy-max"]):
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
