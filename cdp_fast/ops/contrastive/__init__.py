"""The contrastive-statistics op behind ℓ_HNM and InfoNCE: reference, CPU path, the one
``torch.library`` registration and the one autograd glue.

Homes of this op (one stem each): kernels ``kernels/contrastive.py`` (Triton, a leaf); here the
dense reference (:mod:`.reference`, the paper's formulas line by line), the chunked PyTorch
path (:mod:`.chunked`) and the registration; tests ``tests/ops/test_contrastive.py``;
benchmark ``benchmarks/ops/contrastive.py``. The public face with argument checks is
:mod:`cdp_fast.guidance.losses`; :func:`cdp_fast.ops.backend.choose` picks the implementation.

A call: ``losses.hnm_loss`` -> :func:`contrastive_loss` -> ``backend.choose("contrastive", a)``
-> the op ``cdp_fast::contrastive_stats(a, k, labels, 1/τ, β, in_batch, s_min, impl)`` -> per-row
statistics (L1, L0, N) from the kernels (``impl`` "triton" / "interpret") or :mod:`.chunked`
("torch") -> :func:`rows_from_stats`, the O(m) epilogue in PyTorch, differentiated by autograd.
The op's backward (``cdp_fast::contrastive_stats_backward``) recomputes the similarity tiles
and returns (dA, dK) through the normalisation Jacobian. The op is a
``torch.library.triton_op``, so torch.compile sees the Triton kernels on CUDA; its fake
implementation gives the shapes.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from cdp_fast.ops import backend
from cdp_fast.ops.contrastive import chunked
from cdp_fast.ops.contrastive.chunked import normalize_backward
from cdp_fast.ops.contrastive.reference import NORM_EPS

__all__ = ["contrastive_stats", "contrastive_stats_backward", "contrastive_loss", "rows_from_stats", "IMPLS"]

#: Values of the op's ``impl`` argument (what :func:`cdp_fast.ops.backend.choose` answers).
IMPLS = ("triton", "interpret", "torch")


def _inv_norms(x):
    """1/max(‖x_i‖, eps) per row, fp32 (the kernels' normalisation, folded into s)."""
    return 1.0 / torch.linalg.vector_norm(x.float(), dim=1).clamp(min=NORM_EPS)


def _autocast_off(fn):
    """Run an op body with autocast off for its first tensor's device: fp32 GEMMs for fp32
    inputs inside any autocast region. Autograd runs the backward under the caller's autocast
    state (the sampler's bf16 region spans the guidance's ``autograd.grad``), so both bodies."""
    @functools.wraps(fn)
    def run(a, *args):
        with backend.autocast_off(a.device):
            return fn(a, *args)
    return run


@_autocast_off
def _forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch, s_min, impl):
    if impl == "torch":
        return chunked.lse_stats_forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch, s_min)
    kernels = backend.kernels_module("contrastive")
    return kernels.stats_forward(a, k, _inv_norms(a), _inv_norms(k), a_labels, k_labels, inv_tau, beta,
                                 in_batch, s_min)


@_autocast_off
def _backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch, s_min, impl):
    if impl == "torch":
        return chunked.lse_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta,
                                          in_batch, s_min)
    kernels = backend.kernels_module("contrastive")
    ra, rk = _inv_norms(a), _inv_norms(k)
    dah, dkh = kernels.stats_backward(a, k, ra, rk, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau,
                                      beta, in_batch, s_min)
    da = normalize_backward(a.float() * ra.unsqueeze(1), 1.0 / ra, dah)
    dk = normalize_backward(k.float() * rk.unsqueeze(1), 1.0 / rk, dkh)
    return da.to(a.dtype), dk.to(k.dtype)


# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------
@triton_op("cdp_fast::contrastive_stats", mutates_args=())
def contrastive_stats(a: torch.Tensor, k: torch.Tensor, a_labels: Optional[torch.Tensor],
                      k_labels: Optional[torch.Tensor], inv_tau: float, beta: float, in_batch: bool,
                      s_min: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a (m, d), k (N, d) raw rows, labels (m,)/(N,) or None) -> (L1, L0, N), each (m,) float.

    L1_i = LSE_{j∈N(i)} ((1+β)·s_ij/τ), L0_i = LSE_{j∈N(i)} (β·s_ij/τ) (= log N_i when β = 0),
    N_i = |N(i)| with s the cosine similarities floored at ``s_min`` (−inf: none); empty rows
    give −inf, −inf, 0. ``impl``: "triton" / "interpret" (the Triton kernels; fp32 results) or
    "torch" (the chunked path; fp64 results for fp64 inputs).

    Precision: the body (and the backward's) runs with autocast off, so a bf16/fp16 autocast
    region around the call (or around the ``autograd.grad`` that reaches the backward) changes
    nothing: fp32 inputs give fp32 GEMMs, 16-bit inputs the kernels' 16-bit operands with fp32
    accumulation. NaN: a row with a NaN similarity among its valid negatives (a NaN or
    infinite feature row on either side) gets NaN statistics, as the dense reference's
    logsumexp does; every implementation follows this rule (the kernels decide it explicitly,
    not through ``max``, whose NaN handling differs between GPUs and the interpreter).
    """
    return _forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch, s_min, impl)


@triton_op("cdp_fast::contrastive_stats_backward", mutates_args=())
def contrastive_stats_backward(a: torch.Tensor, k: torch.Tensor, a_labels: Optional[torch.Tensor],
                               k_labels: Optional[torch.Tensor], L1: torch.Tensor, L0: torch.Tensor,
                               dL1: torch.Tensor, dL0: torch.Tensor, inv_tau: float, beta: float,
                               in_batch: bool, s_min: float, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``contrastive_stats``: (dA (m, d), dK (N, d)) in the dtypes of a and k."""
    return _backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch, s_min, impl)


@contrastive_stats.register_fake
def _stats_fake(a, k, a_labels, k_labels, inv_tau, beta, in_batch, s_min, impl):
    # fp32 statistics, fp64 for fp64 inputs (only the chunked path accepts them)
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    m = a.shape[0]
    return a.new_empty(m, dtype=dt), a.new_empty(m, dtype=dt), a.new_empty(m, dtype=dt)


@contrastive_stats_backward.register_fake
def _stats_bwd_fake(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch, s_min, impl):
    return torch.empty_like(a), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    a, k, a_labels, k_labels, inv_tau, beta, in_batch, s_min, impl = inputs
    L1, L0, cnt = output
    ctx.save_for_backward(a, k, a_labels, k_labels, L1, L0)
    ctx.args = (inv_tau, beta, in_batch, s_min, impl)
    ctx.mark_non_differentiable(cnt)


def _autograd_backward(ctx, dL1, dL0, _dcnt):
    a, k, a_labels, k_labels, L1, L0 = ctx.saved_tensors
    inv_tau, beta, in_batch, s_min, impl = ctx.args
    dL1 = torch.zeros_like(L1) if dL1 is None else dL1
    dL0 = torch.zeros_like(L0) if dL0 is None else dL0
    da, dk = contrastive_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta,
                                        in_batch, s_min, impl)
    return da, dk, None, None, None, None, None, None, None


contrastive_stats.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the losses on top of the op
# --------------------------------------------------------------------------------------------
def rows_from_stats(L1, L0, cnt, log_pos, *, tau: float, tau_plus: float, clamp: bool,
                    ratio_floor: float = 0.0):
    """Per-anchor losses ℓ_i (m,) from the statistics; the reference's formulas in log space.

    HNM: clamp=True (with τ⁺ and β folded into L0/L1). InfoNCE: tau_plus=0, clamp=False,
    β = 0 (then L0 = log N_i and log_rw = L1). ``ratio_floor`` > 0: ℓ_i = −log max(pos/(pos +
    Ng), floor), i.e. ℓ_i ≤ −ln floor (the authors' clamp). Rows with N_i = 0 give 0.
    """
    has = cnt > 0
    zero = torch.zeros_like(L1)
    L1 = torch.where(has, L1, zero)                    # finite stand-ins: no inf·0 in backward
    L0 = torch.where(has, L0, zero)
    log_n = torch.log(cnt.clamp(min=1))
    log_rw = log_n + L1 - L0
    if tau_plus > 0:
        diff = math.log(tau_plus) + log_n + log_pos - log_rw
        ok = diff < 0
        safe = torch.where(ok, diff, torch.full_like(diff, -1.0))
        log_num = torch.where(ok, log_rw + torch.log1p(-torch.exp(safe)),
                              torch.full_like(diff, -math.inf))
        log_ng = log_num - math.log1p(-tau_plus)
    else:
        log_ng = log_rw
    if clamp:
        log_ng = torch.maximum(log_ng, log_n - 1.0 / tau)
    rows = F.softplus(log_ng - log_pos)
    if ratio_floor > 0:
        rows = torch.clamp(rows, max=-math.log(ratio_floor))
    return torch.where(has, rows, torch.zeros_like(rows))


def contrastive_loss(anchor, positive, candidates=None, *, tau, tau_plus=0.0, beta=0.0, clamp=True,
                     anchor_labels=None, candidate_labels=None, detach_positive=True, neg_floor=0.0,
                     ratio_floor=0.0, impl=None):
    """Mean loss over the anchors through the statistics op (no argument checks: see
    :mod:`cdp_fast.guidance.losses`). ``impl`` None = :func:`cdp_fast.ops.backend.choose`'s answer.

    HNM: ``clamp=True``; InfoNCE: ``tau_plus=0, beta=0, clamp=False``. ``detach_positive``:
    Algorithm 1's fixed target (True), or gradients through the positives too (the authors'
    symmetric form, where each x_t row is also a positive). ``neg_floor`` / ``ratio_floor``:
    the authors' clamps (:func:`.reference.hnm_rows_ref`). Shapes as
    :func:`cdp_fast.guidance.losses.hnm_loss`; returns a 0-dim tensor in the anchors' dtype.
    """
    if impl is None:
        impl = backend.choose("contrastive", anchor)
    elif impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    work = torch.promote_types(anchor.dtype, torch.float32)
    in_batch = candidates is None
    k = anchor if in_batch else candidates
    # negative_mask's rule: labels apply only when anchor_labels is given; the candidates'
    # labels default to the anchors' (in-batch).
    k_labels = None
    if anchor_labels is not None:
        k_labels = candidate_labels if candidate_labels is not None else anchor_labels
    s_min = tau * math.log(neg_floor) if neg_floor > 0 else -math.inf
    L1, L0, cnt = contrastive_stats(anchor, k, anchor_labels, k_labels, 1.0 / tau, float(beta), in_batch,
                                    s_min, impl)
    an = F.normalize(anchor.to(work), dim=1, eps=NORM_EPS)
    pn = F.normalize((positive.detach() if detach_positive else positive).to(work), dim=1, eps=NORM_EPS)
    log_pos = (an * pn).sum(1) / tau
    rows = rows_from_stats(L1.to(work), L0.to(work), cnt.to(work), log_pos, tau=tau,
                           tau_plus=tau_plus, clamp=clamp, ratio_floor=ratio_floor)
    return rows.mean().to(anchor.dtype)
