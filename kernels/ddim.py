"""Fused DDIM update: one elementwise pass over x_t, ε, g (and z) per sampling step.

Formula (Song et al. 2021, DDIM eq. (12), with Δ = ε + λ·g in place of ε as in Algorithm 1,
line 7, of the Contrastive-DP paper; the reference is :func:`cdp_fast.backend.ddim_update_ref`):

    Δ       = ε + λ·g
    x̂_0     = (x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t
    x_{t−1} = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·Δ + σ·z

The PyTorch reference reads/writes the (B, C, H, W) arrays ~8 times (Δ, x̂_0, the products and
sums are separate kernels); the fused pass reads x_t, ε, g, z once and writes x_{t−1} (and
x̂_0 when asked): the memory-bound minimum. Arithmetic in fp32 (inputs fp32/bf16/fp16), in
the reference's operation order so the interpreted kernel matches it to fp32 rounding.

Registered as the ``torch.library.triton_op`` ``cdp_fast::ddim_update`` with
``register_kernel("cpu")`` = the reference, ``register_fake`` and ``register_autograd`` (the
update is affine in x_t, ε, g, z, so the backward is three scalings).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["ddim_update_triton", "ddim_update_op", "coefficients"]

_BLOCK = 1024


def coefficients(lam: float, abar_t: float, abar_prev: float, sigma: float):
    """(√(1−ᾱ_t), √ᾱ_t, √ᾱ_prev, √max(1−ᾱ_prev−σ², 0), σ) as Python floats."""
    return ((1.0 - abar_t) ** 0.5, abar_t ** 0.5, abar_prev ** 0.5,
            max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5, float(sigma))


@triton.jit
def _ddim_kernel(X, E, G, Z, XP, X0, n, lam, b, sa, sp, dirc, sigma,
                 HAS_G: tl.constexpr, HAS_Z: tl.constexpr, WRITE_X0: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    delta = tl.load(E + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_G:
        delta = delta + lam * tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    x0 = (x - b * delta) / sa
    xp = sp * x0 + dirc * delta
    if HAS_Z:
        xp = xp + sigma * tl.load(Z + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(XP + offs, xp.to(XP.dtype.element_ty), mask=ok)
    if WRITE_X0:
        tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=ok)


def _check(x_t, eps, g, noise):
    for name, t in (("eps", eps), ("g", g), ("noise", noise)):
        if t is not None and t.shape != x_t.shape:
            raise ValueError(f"{name} must have x_t's shape {tuple(x_t.shape)}, got {tuple(t.shape)}")


def ddim_update_triton(x_t, eps, g, lam: float, abar_t: float, abar_prev: float, sigma: float,
                       noise=None, return_x0: bool = False):
    """Launch the fused kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    Returns (x_prev, x0) with x0 an empty tensor when ``return_x0`` is False.
    """
    _check(x_t, eps, g, noise)
    has_g = g is not None and lam != 0
    has_z = noise is not None and sigma > 0
    b, sa, sp, dirc, sig = coefficients(lam, abar_t, abar_prev, sigma)
    x = x_t.contiguous()
    e = eps.contiguous()
    gg = g.contiguous() if has_g else x
    z = noise.contiguous() if has_z else x
    xp = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x.new_empty(0)
    n = x.numel()
    wrap_triton(_ddim_kernel)[(triton.cdiv(n, _BLOCK),)](
        x, e, gg, z, xp, x0 if return_x0 else xp, n, float(lam), b, sa, sp, dirc, sig,
        HAS_G=has_g, HAS_Z=has_z, WRITE_X0=return_x0, BLOCK=_BLOCK)
    return xp, x0


@triton_op("cdp_fast::ddim_update", mutates_args=())
def ddim_update_op(x_t: torch.Tensor, eps: torch.Tensor, g: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], lam: float, abar_t: float, abar_prev: float,
                   sigma: float, return_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x0 or an empty tensor). CUDA: the fused kernel; other devices: the reference."""
    if x_t.device.type == "cuda" and x_t.dtype != torch.float64:
        return ddim_update_triton(x_t, eps, g, lam, abar_t, abar_prev, sigma, noise, return_x0)
    return _ddim_cpu(x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0)


def _ddim_cpu(x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0):
    from cdp_fast.backend import ddim_update_ref

    xp, x0 = ddim_update_ref(x_t, eps, g, lam=lam, abar_t=abar_t, abar_prev=abar_prev,
                             sigma=sigma, noise=noise, return_x0=return_x0)
    # both outputs are fresh tensors (results of arithmetic), never views of the inputs, as
    # custom ops require
    return xp, (x0 if return_x0 else x_t.new_empty(0))


ddim_update_op.register_kernel("cpu")(_ddim_cpu)


@ddim_update_op.register_fake
def _ddim_fake(x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0):
    return torch.empty_like(x_t), (torch.empty_like(x_t) if return_x0 else x_t.new_empty(0))


def _ddim_setup(ctx, inputs, output):
    x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0 = inputs
    ctx.coef = coefficients(lam, abar_t, abar_prev, sigma)
    ctx.lam = lam
    ctx.flags = (g is not None, noise is not None, return_x0)


def _ddim_backward(ctx, dxp, dx0):
    # x0 = (x − bΔ)/sa; xp = sp·x0 + dir·Δ + σz; Δ = ε + λg
    b, sa, sp, dirc, sig = ctx.coef
    has_g, has_z, ret_x0 = ctx.flags
    dxp = torch.zeros(()) if dxp is None else dxp
    d_x0 = sp * dxp
    if ret_x0 and dx0 is not None and dx0.numel():
        d_x0 = d_x0 + dx0
    d_x = d_x0 / sa
    d_delta = dirc * dxp - (b / sa) * d_x0
    d_g = ctx.lam * d_delta if has_g else None
    d_z = (sig * dxp if sig > 0 else torch.zeros_like(dxp)) if has_z else None
    return d_x, d_delta, d_g, d_z, None, None, None, None, None


ddim_update_op.register_autograd(_ddim_backward, setup_context=_ddim_setup)
