"""The ops under autocast: their bodies run with autocast off (cdp_fast.ops: "precision as
documented"), so the sampler's bf16 region (``sample(dtype=torch.bfloat16)`` wraps the whole
trajectory, guidance backward included) does not turn the fp32 GEMMs of the contrastive op's
forward or backward into bf16 GEMMs.

Why a CPU test shows it: autocast state is thread-local and the autograd engine copies it into
the threads that run a custom op's backward, so ``torch.autocast("cpu", bfloat16)`` reaches
the op's registered backward exactly as CUDA autocast does on the GPU.

Tolerance: fp32 inputs must give the fp32 path's results up to fp32 rounding of a different
kernel choice (none here: the same calls run) — we allow 1e-6 relative; a bf16 GEMM (8-bit
mantissa, 2^-9 relative per product) moves the gradients by ~1e-3 relative, so the bound tells
the two apart by three orders of magnitude.
"""
import math
import os

import pytest
import torch

from cdp_fast.ops import contrastive as op
from cdp_fast.ops.ddim import ddim_update

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", "interpret"] if INTERP else ["torch"]


def _stats_and_grads(a, k, la, lk, impl, autocast: bool):
    a = a.clone().requires_grad_()
    k = k.clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        L1, L0, cnt = op.contrastive_stats(a, k, la, lk, 1 / 0.3, 1.0, False, -math.inf, impl)
        loss = (L1 * torch.linspace(0.5, 1.5, len(L1))).sum() + 0.25 * L0.sum()
        ga, gk = torch.autograd.grad(loss, (a, k))
    return (L1, L0, cnt), (ga, gk)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_op_is_fp32_under_bf16_autocast(impl):
    """fp32 inputs under ``torch.autocast("cpu", bfloat16)``: statistics and gradients are fp32
    and equal the autocast-free results to fp32 rounding (odd shapes, labels)."""
    g = torch.Generator().manual_seed(5)
    a, k = torch.randn(23, 37, generator=g), torch.randn(41, 37, generator=g)
    la, lk = torch.randint(0, 3, (23,), generator=g), torch.randint(0, 3, (41,), generator=g)
    ref_stats, ref_grads = _stats_and_grads(a, k, la, lk, impl, autocast=False)
    stats, grads = _stats_and_grads(a, k, la, lk, impl, autocast=True)
    for got, want in zip(stats + grads, ref_stats + ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_contrastive_loss_is_fp32_under_bf16_autocast(impl):
    """The public loss on fp32 features (the sampler's guidance without a head) inside a bf16
    autocast region: the anchors' gradient is the fp32 one."""
    g = torch.Generator().manual_seed(9)
    z, w = torch.randn(19, 33, generator=g), torch.randn(19, 33, generator=g)

    def run(autocast):
        a = z.clone().requires_grad_()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = op.contrastive_loss(a, w, tau=0.1, tau_plus=0.1, beta=1.0, clamp=True, impl=impl)
            return loss, torch.autograd.grad(loss, a)[0]

    (l0, g0), (l1, g1) = run(False), run(True)
    assert l1.dtype == g1.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_ddim_op_keeps_its_dtype_under_autocast(impl):
    """The DDIM update of fp32 tensors inside a bf16 region: fp32, equal to the plain call."""
    g = torch.Generator().manual_seed(2)
    x, e, gg = (torch.randn(3, 5, 7, generator=g) for _ in range(3))
    kw = dict(lam=2.0, abar_t=0.3, abar_prev=0.6, sigma=0.1, noise=torch.randn(3, 5, 7, generator=g), impl=impl)
    want, _ = ddim_update(x, e, gg, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = ddim_update(x, e, gg, **kw)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_pgd_step_composite_keeps_its_dtype_under_autocast():
    """The PGD step's composite inside a bf16 region: x_adv's dtype, bitwise the plain call
    (the extension is C++ with no autocast-listed op; the composite runs with autocast off)."""
    from cdp_fast.ops.pgd_step import pgd_step

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 5, 5, generator=g)
    grad = torch.randn(2, 3, 5, 5, generator=g)
    want = pgd_step(x, grad, x, step_size=2 / 255, eps=8 / 255, impl="composite")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pgd_step(x, grad, x, step_size=2 / 255, eps=8 / 255, impl="composite")
    assert got.dtype == torch.float32 and torch.equal(got, want)
