"""The guided DDIM update op: reference, the one ``torch.library`` registration and autograd;
and the guided DDPM ancestral update (:func:`ddpm_update`, plain PyTorch: no fused kernel yet).

Homes: kernel ``kernels/ddim.py`` (Triton, a leaf); here the reference and the registration;
tests ``tests/ops/test_ddim.py``; benchmark ``benchmarks/ops/ddim.py``.
:func:`cdp_fast.ops.backend.choose` picks "triton" (CUDA), "interpret" (the kernel on CPU tensors
under TRITON_INTERPRET=1) or "torch" (the reference); the op executes that choice.

Formula: DDIM eq. (12) of Song et al. 2021 with Δ = ε + λg in place of ε (Contrastive-DP,
Algorithm 1, line 7); see :func:`ddim_update_ref`. The op ``cdp_fast::ddim_update`` is a
``torch.library.triton_op`` (torch.compile sees the kernel on CUDA and fuses the reference
elsewhere) with a fake implementation and an autograd formula (the update is affine in x_t,
ε, g, z, so the backward is three scalings).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from cdp_fast.ops import backend

__all__ = ["ddim_update", "ddim_update_ref", "ddim_update_op", "ddpm_update", "coefficients", "IMPLS"]

#: Values of the op's ``impl`` argument (what :func:`cdp_fast.ops.backend.choose` answers).
IMPLS = ("triton", "interpret", "torch")


def ddim_update_ref(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False):
    """DDIM eq. (12) of Song et al. 2021 with Δ = ε + λg in place of ε (Algorithm 1, line 7):

        x̂_0     = (x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t
        x_{t-1} = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·Δ + σ·z

    x_t, eps, g, noise: same shape (g, noise may be None); lam, abar_t, abar_prev, sigma:
    Python floats. Returns (x_prev, x̂_0 or None).
    """
    delta = eps if (g is None or lam == 0) else eps + lam * g
    x0 = (x_t - (1.0 - abar_t) ** 0.5 * delta) / abar_t ** 0.5
    dir_coef = max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + dir_coef * delta
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, (x0 if return_x0 else None)


def coefficients(abar_t: float, abar_prev: float, sigma: float):
    """(√(1−ᾱ_t), √ᾱ_t, √ᾱ_prev, √max(1−ᾱ_prev−σ², 0), σ) as Python floats: the kernel's
    arguments and the backward's scalings."""
    return ((1.0 - abar_t) ** 0.5, abar_t ** 0.5, abar_prev ** 0.5,
            max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5, float(sigma))


def _memory_format(x):
    """channels_last for a 4-D tensor stored that way, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check(x_t, eps, g, noise):
    for name, t in (("eps", eps), ("g", g), ("noise", noise)):
        if t is not None and t.shape != x_t.shape:
            raise ValueError(f"{name} must have x_t's shape {tuple(x_t.shape)}, got {tuple(t.shape)}")


@triton_op("cdp_fast::ddim_update", mutates_args=())
def ddim_update_op(x_t: torch.Tensor, eps: torch.Tensor, g: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], lam: float, abar_t: float, abar_prev: float,
                   sigma: float, return_x0: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, x̂_0 or an empty tensor), by ``impl``: "triton" / "interpret" (the fused
    kernel) or "torch" (:func:`ddim_update_ref`). Runs with autocast off (elementwise in the
    inputs' dtype, fp32 arithmetic in the kernel), whatever region calls it."""
    with backend.autocast_off(x_t.device):
        if impl == "torch":
            xp, x0 = ddim_update_ref(x_t, eps, g, lam=lam, abar_t=abar_t, abar_prev=abar_prev,
                                     sigma=sigma, noise=noise, return_x0=return_x0)
            # both outputs are fresh tensors (results of arithmetic), never views of the inputs,
            # as custom ops require; in x_t's memory format whatever layout ε and g came in
            fmt = _memory_format(x_t)
            return xp.contiguous(memory_format=fmt), (x0.contiguous(memory_format=fmt) if return_x0
                                                      else x_t.new_empty(0))
        kernels = backend.kernels_module("ddim")
        return kernels.launch_ddim_update(x_t, eps, g, noise, float(lam), coefficients(abar_t, abar_prev, sigma),
                                          bool(return_x0))


@ddim_update_op.register_fake
def _ddim_fake(x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0, impl):
    fmt = _memory_format(x_t)
    return (torch.empty_like(x_t, memory_format=fmt),
            torch.empty_like(x_t, memory_format=fmt) if return_x0 else x_t.new_empty(0))


def _ddim_setup(ctx, inputs, output):
    x_t, eps, g, noise, lam, abar_t, abar_prev, sigma, return_x0, impl = inputs
    ctx.coef = coefficients(abar_t, abar_prev, sigma)
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
    return d_x, d_delta, d_g, d_z, None, None, None, None, None, None


ddim_update_op.register_autograd(_ddim_backward, setup_context=_ddim_setup)


def ddim_update(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False, impl=None):
    """One guided DDIM step (formula: :func:`ddim_update_ref`) by the implementation
    :func:`cdp_fast.ops.backend.choose` picks (``impl`` None), or by ``impl``.

    Args:
        x_t, eps: (*shape) current sample and ε-prediction; g: ∇ℓ of that shape or None.
        lam, abar_t, abar_prev, sigma: λ, ᾱ_t, ᾱ_prev, σ_t as Python floats.
        noise: z of x_t's shape (used when σ > 0) or None. return_x0: also return x̂_0.
    Returns:
        (x_prev, x̂_0 | None), in x_t's dtype, shape and memory format (channels_last kept).
    """
    _check(x_t, eps, g, noise)
    if impl is None:
        impl = backend.choose("ddim", x_t)
    elif impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    xp, x0 = ddim_update_op(x_t, eps, g, noise, float(lam), float(abar_t), float(abar_prev), float(sigma),
                            bool(return_x0), impl)
    return xp, (x0 if return_x0 else None)


def ddpm_update(x_t, eps, g, *, lam, abar_t, abar_prev, noise=None, clip_x0=True, return_x0=False):
    """One guided DDPM ancestral step (Ho et al. 2020, eqs. (6)-(7); the posterior-mean form of
    diffusers' ``DDPMScheduler.step`` with ``variance_type="fixed_small"`` and of the authors'
    ``minimal-diffusion-main/main_nonddp.py``), with Δ = ε + λg in place of ε:

        x̂_0     = clip((x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t, −1, 1)            (clip when ``clip_x0``)
        α_t     = ᾱ_t/ᾱ_prev,  β_t = 1 − α_t
        μ       = √ᾱ_prev·β_t/(1−ᾱ_t)·x̂_0 + √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t
        x_{t-1} = μ + √β̃_t·z,  β̃_t = max((1−ᾱ_prev)/(1−ᾱ_t)·β_t, 1e-20)   (z given: noise)

    On a sub-sequence of timesteps ᾱ_prev is the ᾱ of the next timestep (1 after the last), as
    in diffusers' ``previous_timestep``. Without clipping this equals DDIM with η = 1.

    Shapes: x_t, eps, g, noise (*shape) (g, noise may be None); the rest Python floats.
    Returns (x_prev, x̂_0 or None).
    """
    delta = eps if (g is None or lam == 0) else eps + lam * g
    x0 = (x_t - (1.0 - abar_t) ** 0.5 * delta) / abar_t ** 0.5
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    alpha_t = abar_t / abar_prev
    beta_t = 1.0 - alpha_t
    x_prev = (abar_prev ** 0.5 * beta_t / (1.0 - abar_t)) * x0 + (alpha_t ** 0.5 * (1.0 - abar_prev) / (1.0 - abar_t)) * x_t
    if noise is not None:
        var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
        x_prev = x_prev + var ** 0.5 * noise
    return x_prev, (x0 if return_x0 else None)
