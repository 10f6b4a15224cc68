"""The guided DDIM update op (cdp_fast.ops.ddim): the Triton kernel (interpreted on CPU; CUDA,
gpu-marked) against the reference ``ddim_update_ref``, and the registration (opcheck,
gradcheck, torch.compile).

Tolerance: the kernel evaluates the reference's expression in the same order in fp32, so the
only differences are fp32 rounding (the interpreter computes in NumPy float32; a GPU may fuse
multiply-adds): a few ulps of the largest term, 1e-6 relative with an absolute floor of
1e-6·(1 + |λ|) for λ·g.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_fast.ops.ddim import ddim_update, ddim_update_ref

pytest.importorskip("cdp_fast.kernels.ddim")
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def updates(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    abar_t = draw(st.floats(1e-4, 0.9999))
    abar_prev = draw(st.one_of(st.just(1.0), st.floats(abar_t, 1.0)))
    sigma = draw(st.sampled_from([0.0, 0.05, 0.3]))
    lam = draw(st.sampled_from([0.0, 0.5, -3.0, 100.0]))
    with_g = draw(st.booleans())
    with_noise = draw(st.booleans())
    return_x0 = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return shape, abar_t, abar_prev, sigma, lam, with_g, with_noise, return_x0, seed


def _tensors(shape, seed, with_g, with_noise):
    g = torch.Generator().manual_seed(seed)
    x, e, gg, z = (torch.randn(shape, generator=g) for _ in range(4))
    return x, e, (gg if with_g else None), (z if with_noise else None)


@pytest.mark.skipif(not INTERP, reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")
@settings(max_examples=25)
@given(u=updates())
def test_triton_ddim_matches_reference(u):
    shape, abar_t, abar_prev, sigma, lam, with_g, with_noise, return_x0, seed = u
    x, e, g, z = _tensors(shape, seed, with_g, with_noise)
    ref_xp, ref_x0 = ddim_update_ref(x, e, g, lam=lam, abar_t=abar_t, abar_prev=abar_prev, sigma=sigma,
                                     noise=z, return_x0=return_x0)
    xp, x0 = ddim_update(x, e, g, lam=lam, abar_t=abar_t, abar_prev=abar_prev, sigma=sigma, noise=z,
                         return_x0=return_x0, impl="interpret")
    atol = 1e-6 * (1 + abs(lam)) / abar_t ** 0.5
    torch.testing.assert_close(xp, ref_xp, rtol=1e-6, atol=atol)
    if return_x0:
        torch.testing.assert_close(x0, ref_x0, rtol=1e-6, atol=atol)
    else:
        assert x0 is None


def test_triton_ddim_large_odd_size():
    """More than one program (n = 3·1024 + 5) with a ragged last block."""
    if not INTERP:
        pytest.skip("needs TRITON_INTERPRET=1")
    x, e, g, z = _tensors((3 * 1024 + 5,), 1, True, True)
    kw = dict(lam=2.0, abar_t=0.3, abar_prev=0.6, sigma=0.1, noise=z, return_x0=True)
    ref = ddim_update_ref(x, e, g, **kw)
    out = ddim_update(x, e, g, impl="interpret", **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-5)


def test_ddim_op_opcheck_and_gradcheck():
    """Registration (schema/fake/autograd/CPU kernel) and the affine backward formula."""
    x, e, g, z = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(4))
    op = torch.ops.cdp_fast.ddim_update.default
    for args in [(x, e, g, z, 0.7, 0.4, 0.8, 0.2, True, "torch"),
                 (x, e, None, None, 0.0, 0.4, 1.0, 0.0, False, "torch")]:
        torch.library.opcheck(op, args)

    def f(x, e, g, z):
        xp, x0 = op(x, e, g, z, 0.7, 0.4, 0.8, 0.2, True, "torch")
        return xp, x0
    assert torch.autograd.gradcheck(f, (x, e, g, z))


def test_ddim_op_compiles_fullgraph(monkeypatch):
    torch._dynamo.reset()
    x, e, g = (torch.randn(2, 3, 5, 5) for _ in range(3))

    def f(x, e, g):
        return ddim_update(x, e, g, lam=1.5, abar_t=0.3, abar_prev=0.5, sigma=0.0, return_x0=True)

    xp, x0 = torch.compile(f, fullgraph=True, backend="aot_eager")(x, e, g)
    rxp, rx0 = ddim_update_ref(x, e, g, lam=1.5, abar_t=0.3, abar_prev=0.5, sigma=0.0, return_x0=True)
    torch.testing.assert_close(xp, rxp)
    torch.testing.assert_close(x0, rx0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ddim_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    x, e, gg, z = (torch.randn(3, 3, 17, 19, generator=g).to("cuda", dtype) for _ in range(4))
    kw = dict(lam=2.0, abar_t=0.3, abar_prev=0.6, sigma=0.1, noise=z, return_x0=True)
    ref = ddim_update_ref(x.float(), e.float(), gg.float(), **{**kw, "noise": z.float()})
    out = ddim_update(x, e, gg, impl="triton", **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for o, r in zip(out, ref):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["torch", "interpret"])
def test_channels_last_is_kept(impl):
    """A 3-channel channels_last x_t gives channels_last outputs (the ε-model then sees one
    layout at every step), whatever layout ε, g and z come in, with the reference's values."""
    if impl == "interpret" and not INTERP:
        pytest.skip("needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    x, e, gg, z = (torch.randn(2, 3, 5, 7, generator=g) for _ in range(4))
    xl = x.contiguous(memory_format=torch.channels_last)
    el = e.contiguous(memory_format=torch.channels_last)
    kw = dict(lam=2.0, abar_t=0.3, abar_prev=0.6, sigma=0.1, noise=z, return_x0=True)
    ref = ddim_update_ref(x, e, gg, **kw)
    for eps in (el, e):                      # ε channels_last (a channels_last UNet) or not
        out = ddim_update(xl, eps, gg, impl=impl, **kw)
        for o, r in zip(out, ref):
            assert o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()
            torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-5)
    out = ddim_update(x, e, gg, impl=impl, **kw)                  # NCHW stays NCHW
    assert all(o.is_contiguous() for o in out)
