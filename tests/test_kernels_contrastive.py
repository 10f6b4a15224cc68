"""Fused contrastive kernels (Triton, interpreted on CPU) and the chunked PyTorch path against
the dense references of cdp_fast.losses: values and gradients, odd shapes, masks.

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

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_fast import chunked, losses

kc = pytest.importorskip("cdp_fast.kernels.contrastive")
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
    return dict(a=a, p=p, k=k, la=la, lk=lk, beta=beta, tau=tau, tau_plus=tau_plus, loss=loss)


def _run(fn_hnm, fn_inf, pr, dtype, **extra):
    """Loss and grads (anchor[, candidates]) of one implementation in ``dtype``."""
    a = pr["a"].to(dtype).requires_grad_()
    k = None if pr["k"] is None else pr["k"].to(dtype).requires_grad_()
    kw = dict(anchor_labels=pr["la"], candidate_labels=pr["lk"], tau=pr["tau"], **extra)
    if pr["loss"] == "hnm":
        out = fn_hnm(a, pr["p"].to(dtype), k, tau_plus=pr["tau_plus"], beta=pr["beta"], **kw)
    else:
        out = fn_inf(a, pr["p"].to(dtype), k, **kw)
    ins = [a] + ([k] if k is not None else [])
    grads = torch.autograd.grad(out, ins)
    return out.detach().double(), [g.double() for g in grads], ins


def _ref(pr):
    return _run(losses.hnm_loss_ref, losses.infonce_loss_ref, pr, torch.float64)


def _logit_scale(pr):
    return (1.0 + (pr["beta"] if pr["loss"] == "hnm" else 0.0)) / pr["tau"]


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@settings(max_examples=30)
@given(pr=problems())
def test_triton_interpreted_matches_reference(pr):
    ref, gref, ins = _ref(pr)
    tri, gtri, _ = _run(kc.hnm_loss_fused, kc.infonce_loss_fused, pr, torch.float32, interpret=True)
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
    out, gout, _ = _run(chunked.hnm_loss_chunked, chunked.infonce_loss_chunked, pr, torch.float64,
                        chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    for go, gr in zip(gout, gref):
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["chunked", "op"] + (["triton"] if INTERP else []))
def test_rows_without_negatives_contribute_zero(impl):
    """All candidates share anchor 0's class: ℓ_0 = 0 and no NaN anywhere (per-row N_i)."""
    a = torch.randn(5, 7, requires_grad=True)
    k = torch.randn(9, 7, requires_grad=True)
    la = torch.tensor([0, 1, 1, 2, 0])
    lk = torch.zeros(9, dtype=torch.long)
    lk[4:] = 1
    ref = losses.hnm_loss_ref(a, a.detach(), k, tau=0.3, anchor_labels=la, candidate_labels=lk)
    if impl == "chunked":
        out = chunked.hnm_loss_chunked(a, a.detach(), k, tau=0.3, anchor_labels=la, candidate_labels=lk, chunk=4)
    else:
        out = kc.hnm_loss_fused(a, a.detach(), k, tau=0.3, anchor_labels=la, candidate_labels=lk,
                                interpret=impl == "triton")
    ga = torch.autograd.grad(ref, (a, k))
    go = torch.autograd.grad(out, (a, k))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for x, y in zip(go, ga):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_opcheck_contrastive_stats():
    """Schema, fake kernel, autograd registration and CPU kernel agree (torch.library.opcheck)."""
    a = torch.randn(9, 6, requires_grad=True)
    k = torch.randn(13, 6, requires_grad=True)
    la, lk = torch.randint(0, 3, (9,)), torch.randint(0, 3, (13,))
    for args in [(a, k, None, None, 2.0, 1.0, False), (a, k, la, lk, 2.0, 0.0, False),
                 (a, a, la, la, 0.5, 2.0, True)]:
        torch.library.opcheck(torch.ops.cdp_fast.contrastive_stats.default, args)
    L1, L0, _ = torch.ops.cdp_fast.contrastive_stats(a, k, None, None, 2.0, 1.0, False)
    args = (a.detach(), k.detach(), None, None, L1.detach(), L0.detach(), torch.randn(9), torch.randn(9),
            2.0, 1.0, False)
    torch.library.opcheck(torch.ops.cdp_fast.contrastive_stats_backward.default, args)


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
    ref = losses.hnm_loss_ref(a, p, k, tau=0.5, tau_plus=0.1, beta=1.0)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d", [(37, None, 29), (100, 1000, 128), (257, 3001, 640)])
def test_triton_cuda_matches_reference(dtype, m, n, d):
    """CUDA kernels vs the fp64 reference. fp32 (tf32x3 dots): as the interpreter tolerance.
    bf16/fp16: |tri − ref| <= 2·|ref computed in the same dtype − ref| + atol (flash-attention's
    rule), since rounding the inputs alone moves the loss by that much."""
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

    ref = run(losses.hnm_loss_ref, torch.float64)
    tri = run(kc.hnm_loss_fused, dtype)
    same = run(losses.hnm_loss_ref, dtype)
    for t, r, s in zip(tri, ref, same):
        if dtype == torch.float32:
            assert float((t - r).abs().max()) <= 2e-5 * 10 * max(1.0, float(r.abs().max()))
        else:
            assert float((t - r).abs().max()) <= 2 * float((s - r).abs().max()) + 1e-3 * float(r.abs().max())
