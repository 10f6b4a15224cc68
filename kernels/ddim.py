"""Triton kernel of the guided DDIM update: one elementwise pass over x_t, ε, g (and z) per
sampling step.

A leaf: imports torch and triton only. The op (reference, registration, autograd) lives in
:mod:`cdp_fast.ops.ddim`; which implementation runs is decided in :mod:`cdp_fast.ops.backend`.

Formula (Song et al. 2021, DDIM eq. (12), with Δ = ε + λ·g in place of ε as in Algorithm 1,
line 7, of the Contrastive-DP paper), with the coefficients computed by the caller:

    Δ       = ε + λ·g
    x̂_0     = (x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t
    x_{t−1} = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·Δ + σ·z

The PyTorch reference reads/writes the (B, C, H, W) arrays ~8 times (Δ, x̂_0, the products and
sums are separate kernels); the fused pass reads x_t, ε, g, z once and writes x_{t−1} (and
x̂_0 when asked): the memory-bound minimum. Arithmetic in fp32 (inputs fp32/bf16/fp16), in
the reference's operation order so the interpreted kernel matches it to fp32 rounding.
CPU tensors are valid only under ``TRITON_INTERPRET=1``. Not yet measured on a GPU.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["launch_ddim_update"]

_BLOCK = 1024


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


def launch_ddim_update(x_t, eps, g, noise, lam: float, coef: tuple, return_x0: bool):
    """Launch the fused update.

    Args:
        x_t, eps: (*shape) tensors of one dtype; g, noise: same shape, or None (then λ·g,
            σ·z are skipped).
        lam: λ. coef: (√(1−ᾱ_t), √ᾱ_t, √ᾱ_prev, √max(1−ᾱ_prev−σ², 0), σ), Python floats.
        return_x0: also write x̂_0.
    Returns:
        (x_prev, x0) in x_t's memory format (channels_last kept): x0 is an empty tensor when
        ``return_x0`` is False.
    """
    b, sa, sp, dirc, sig = coef
    has_g = g is not None and lam != 0
    has_z = noise is not None and sig > 0
    # Elementwise over the flat storage: every tensor in x_t's dense layout, and the outputs
    # in it too — a channels_last x_t stays channels_last, so the ε-model sees one layout at
    # every step (a new layout would mean a recompile and a second CUDA graph).
    fmt = (torch.channels_last if x_t.dim() == 4 and not x_t.is_contiguous()
           and x_t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    x = x_t.contiguous(memory_format=fmt)
    e = eps.contiguous(memory_format=fmt)
    gg = g.contiguous(memory_format=fmt) if has_g else x
    z = noise.contiguous(memory_format=fmt) if has_z else x
    xp = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x.new_empty(0)
    n = x.numel()
    # the tensors' device current: Triton launches on the current device's current stream
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        wrap_triton(_ddim_kernel)[(triton.cdiv(n, _BLOCK),)](
            x, e, gg, z, xp, x0 if return_x0 else xp, n, float(lam), b, sa, sp, dirc, sig,
            HAS_G=has_g, HAS_Z=has_z, WRITE_X0=return_x0, BLOCK=_BLOCK)
    return xp, x0
