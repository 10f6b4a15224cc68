"""Fused Triton kernels of the contrastive losses (ℓ_HNM, InfoNCE): O(N) memory, no m×N matrix.

What is fused (DESIGN.md §5): the loss depends on the m×N cosine similarities s_ij = â_i·k̂_j
only through three per-row statistics (derivation and gradients: :mod:`cdp_fast.chunked`)

    L1_i = LSE_{j∈N(i)} ((1+β)·s_ij/τ),   L0_i = LSE_{j∈N(i)} (β·s_ij/τ),   N_i = |N(i)|.

* forward  ``_stats_fwd_kernel``: one program per block of BLOCK_M anchors and range of
  candidates (the split keeps small-m/large-bank problems busy, see ``_splits``) streams the
  candidates in BLOCK_N tiles, computes the tile of s with ``tl.dot`` (fp32 accumulation;
  the d axis is looped in BLOCK_K slices, so any d works), applies the masks (self-exclusion
  when the candidates are the anchors; other-class restriction with labels; padding) and
  updates two online log-sum-exps (running max + rescaled sum, as in flash-attention) and the
  count N_i. Nothing of size m×N is ever written: memory O((m + N)·d).
* backward: the tiles are recomputed. With D_ij = g1_i·P1_ij + g0_i·P0_ij
  (P = masked row softmaxes, g = (1+β)/τ·dL1, β/τ·dL0):
  ``_stats_bwd_da_kernel`` (grid over anchor blocks × d blocks × candidate splits) accumulates
  dÂ_i = Σ_j D_ij k̂_j (per-split slabs summed afterwards);
  ``_stats_bwd_dk_kernel`` (grid over candidate blocks × d blocks) is the transposed pass,
  dK̂_j = Σ_i D_ij â_i. Each output element is owned by one program: no atomics.
* L2 normalisation is folded in: the kernels take the raw rows plus 1/max(‖x‖, 1e-12)
  (an O(m + N) vector computed in PyTorch) and scale s by r_a,i·r_k,j; the normalisation
  Jacobian dx = r·(dx̂ − x̂(x̂·dx̂)) is applied in place afterwards (``addcmul_``: no N×d
  temporaries). The O(m) epilogue (τ⁺ subtraction, clamp, softplus, mean, positive term) is
  shared PyTorch code (:func:`cdp_fast.chunked.rows_from_stats`), differentiated by autograd.

Dtypes: fp32 / bf16 / fp16 inputs on GPU with fp32 accumulation; fp32 dots use
``input_precision="tf32x3"`` (≈fp32 accuracy on tensor cores: plain tf32's 10-bit mantissa
would put ~1e-3 error into s and ×1/τ = ×20 into the loss at τ = 0.05). Under
``TRITON_INTERPRET=1`` (CPU) fp32 only.

Registration: ``cdp_fast::contrastive_stats`` and ``cdp_fast::contrastive_stats_backward`` are
``torch.library.triton_op`` s (so torch.compile sees the kernels), with
``register_kernel("cpu")`` = the chunked PyTorch path, ``register_fake`` and
``register_autograd``. Inside the op body the device decides (CUDA → Triton, anything else →
chunked PyTorch), so a compiled CPU graph never contains a Triton kernel. The interpreter path
used by the tests (CPU tensors, ``TRITON_INTERPRET=1``) calls the same launchers through
:class:`_InterpretedStats`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from cdp_fast import chunked

__all__ = [
    "contrastive_stats", "hnm_loss_fused", "infonce_loss_fused", "stats_triton", "stats_triton_backward",
    "interpreting",
]

_NORM_EPS = 1e-12


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1 at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """Raw dot products a_i·k_j of a BLOCK_M×BLOCK_N tile (fp32 accumulation over d)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kk = rk < D
        a = tl.load(A + rm[:, None].to(tl.int64) * stride_a + rk[None, :],
                    mask=row_ok[:, None] & kk[None, :], other=0.0)
        kt = tl.load(K + rn[None, :].to(tl.int64) * stride_k + rk[:, None],
                     mask=kk[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, kt, input_precision=PRECISION)
    return acc


@triton.jit
def _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH: tl.constexpr, HAS_LABELS: tl.constexpr):
    valid = row_ok[:, None] & col_ok[None, :]
    if IN_BATCH:
        valid = valid & (rm[:, None] != rn[None, :])
    if HAS_LABELS:
        lk = tl.load(LK + rn, mask=col_ok, other=0)
        valid = valid & (la[:, None] != lk[None, :])
    return valid


@triton.jit
def _row_labels(LA, rm, row_ok, BLOCK_M: tl.constexpr, HAS_LABELS: tl.constexpr):
    """The anchor rows' labels (zeros when there are none: _valid_tile then ignores them)."""
    la = tl.zeros((BLOCK_M,), dtype=tl.int64)
    if HAS_LABELS:
        la = tl.load(LA + rm, mask=row_ok, other=0)
    return la


@triton.jit
def _row_bwd_state(RA, L1, L0, G1, G0, rm, row_ok):
    """The anchor rows' inverse norms, forward LSEs and their incoming gradients."""
    ra = tl.load(RA + rm, mask=row_ok, other=0.0)
    l1 = tl.load(L1 + rm, mask=row_ok, other=0.0)
    l0 = tl.load(L0 + rm, mask=row_ok, other=0.0)
    g1 = tl.load(G1 + rm, mask=row_ok, other=0.0)
    g0 = tl.load(G0 + rm, mask=row_ok, other=0.0)
    return ra, l1, l0, g1, g0


@triton.jit
def _stats_fwd_kernel(A, K, RA, RK, LA, LK, L1, L0, CNT, M, N, D, stride_a, stride_k, c1, c0, N_SPLIT,
                      IN_BATCH: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BETA: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)                 # candidate split: [pid_s·N_SPLIT, (pid_s+1)·N_SPLIT)
    n_lo = pid_s * N_SPLIT
    n_hi = tl.minimum(N, n_lo + N_SPLIT)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    ra = tl.load(RA + rm, mask=row_ok, other=0.0)
    la = _row_labels(LA, rm, row_ok, BLOCK_M, HAS_LABELS)
    m1 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m0 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        col_ok = rn < n_hi
        s = _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        rk = tl.load(RK + rn, mask=col_ok, other=0.0)
        s = s * ra[:, None] * rk[None, :]
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS)
        cnt += tl.sum(valid.to(tl.float32), axis=1)
        # online LSE of c1·s: running max m1, sum s1 of exp(x − m1)
        x = tl.where(valid, s * c1, float("-inf"))
        new = tl.maximum(m1, tl.max(x, axis=1))
        safe = tl.where(new == float("-inf"), 0.0, new)
        s1 = s1 * tl.exp(m1 - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
        m1 = new
        if HAS_BETA:
            x = tl.where(valid, s * c0, float("-inf"))
            new = tl.maximum(m0, tl.max(x, axis=1))
            safe = tl.where(new == float("-inf"), 0.0, new)
            s0 = s0 * tl.exp(m0 - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
            m0 = new
    # this split's partial LSEs (combined by a logsumexp over splits in the launcher);
    # empty row: s1 = 0 -> -inf (the epilogue zeroes the row)
    out = pid_s * M + rm
    tl.store(L1 + out, tl.where(s1 > 0, m1 + tl.log(tl.where(s1 > 0, s1, 1.0)), float("-inf")), mask=row_ok)
    if HAS_BETA:
        tl.store(L0 + out, tl.where(s0 > 0, m0 + tl.log(tl.where(s0 > 0, s0, 1.0)), float("-inf")),
                 mask=row_ok)
    tl.store(CNT + out, cnt, mask=row_ok)


@triton.jit
def _d_tile(s, valid, l1, l0, g1, g0, c1, c0, HAS_BETA: tl.constexpr):
    """D_ij = g1_i·exp(c1 s_ij − L1_i) + g0_i·exp(c0 s_ij − L0_i) on valid entries, else 0."""
    dd = g1[:, None] * tl.exp(s * c1 - l1[:, None])
    if HAS_BETA:
        dd += g0[:, None] * tl.exp(s * c0 - l0[:, None])
    return tl.where(valid, dd, 0.0)


@triton.jit
def _stats_bwd_da_kernel(A, K, RA, RK, LA, LK, L1, L0, G1, G0, DA, M, N, D, stride_a, stride_k,
                         stride_da, c1, c0, N_SPLIT,
                         IN_BATCH: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BETA: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """dÂ[rows, dblock] = Σ_j D_ij·k̂_j over all candidate tiles (one program owns its outputs)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)                 # candidate split; partial dÂ slab pid_s
    n_lo = pid_s * N_SPLIT
    n_hi = tl.minimum(N, n_lo + N_SPLIT)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = rd < D
    ra, l1, l0, g1, g0 = _row_bwd_state(RA, L1, L0, G1, G0, rm, row_ok)
    la = _row_labels(LA, rm, row_ok, BLOCK_M, HAS_LABELS)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        col_ok = rn < n_hi
        s = _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        rk = tl.load(RK + rn, mask=col_ok, other=0.0)
        s = s * ra[:, None] * rk[None, :]
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS)
        dd = _d_tile(s, valid, l1, l0, g1, g0, c1, c0, HAS_BETA) * rk[None, :]   # D_ij·r_k,j
        kv = tl.load(K + rn[:, None].to(tl.int64) * stride_k + rd[None, :],
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(dd.to(kv.dtype), kv, input_precision=PRECISION)
    slab = DA + pid_s.to(tl.int64) * M * stride_da
    tl.store(slab + rm[:, None].to(tl.int64) * stride_da + rd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _stats_bwd_dk_kernel(A, K, RA, RK, LA, LK, L1, L0, G1, G0, DK, M, N, D, stride_a, stride_k,
                         stride_dk, c1, c0,
                         IN_BATCH: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BETA: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Transposed pass: dK̂[cols, dblock] = Σ_i D_ij·â_i over all anchor tiles."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    rd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_ok = rd < D
    rk = tl.load(RK + rn, mask=col_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < M
        ra, l1, l0, g1, g0 = _row_bwd_state(RA, L1, L0, G1, G0, rm, row_ok)
        la = _row_labels(LA, rm, row_ok, BLOCK_M, HAS_LABELS)
        s = _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        s = s * ra[:, None] * rk[None, :]
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS)
        dd = _d_tile(s, valid, l1, l0, g1, g0, c1, c0, HAS_BETA) * ra[:, None]   # D_ij·r_a,i
        av = tl.load(A + rm[:, None].to(tl.int64) * stride_a + rd[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(dd.to(av.dtype)), av, input_precision=PRECISION)
    tl.store(DK + rn[:, None].to(tl.int64) * stride_dk + rd[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _blocks(d: int, dtype: torch.dtype):
    """Tile sizes. Under the interpreter the smallest legal dot tiles (16) keep tests fast;
    on GPU 64×64 tiles with 32..64-wide d slices (fp32 halves BLOCK_K to fit shared memory)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=16)
    bk = 32 if dtype == torch.float32 else 64
    bdo = min(128, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, BLOCK_DO=bdo)


def _splits(m: int, n: int, bl: dict, device) -> tuple[int, int]:
    """(S, candidates per split). One program per BLOCK_M anchors alone leaves an H100 idle
    when m is small and the bank is large (m = 512: 8 programs for 132 SMs), so the forward and
    the dA pass also split the candidates into S ranges (partial LSEs / partial dÂ slabs,
    combined in PyTorch: O(S·m) and O(S·m·d) memory, no atomics). Target: ~2 programs per SM.
    Under the interpreter S = 2 whenever there are >= 2 candidate tiles, so the tests exercise
    the combine."""
    n_tiles = triton.cdiv(n, bl["BLOCK_N"])
    if interpreting() or torch.device(device).type != "cuda":
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(m, bl["BLOCK_M"]))
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, want))) * bl["BLOCK_N"]
    return triton.cdiv(n, per), per


def _precision(dtype):
    if interpreting():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _inv_norm(x):
    return 1.0 / torch.linalg.vector_norm(x.float(), dim=1).clamp(min=_NORM_EPS)


def _common(a, k, a_labels, k_labels):
    a = a.contiguous()
    k = k.contiguous()
    if k.dtype != a.dtype:
        k = k.to(a.dtype)
    has_labels = a_labels is not None
    la = a_labels.contiguous().to(torch.int64) if has_labels else a.new_zeros(1, dtype=torch.int64)
    lk = k_labels.contiguous().to(torch.int64) if has_labels else a.new_zeros(1, dtype=torch.int64)
    return a, k, la, lk, has_labels


def stats_triton(a, k, a_labels, k_labels, inv_tau: float, beta: float, in_batch: bool):
    """Forward statistics (L1, L0, N) (m,) fp32 with the Triton kernel (CUDA or interpreter)."""
    a, k, la, lk, has_labels = _common(a, k, a_labels, k_labels)
    m, d = a.shape
    n = k.shape[0]
    ra, rk = _inv_norm(a), _inv_norm(k)
    bl = _blocks(d, a.dtype)
    n_split, per = _splits(m, n, bl, a.device)
    L1p = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    L0p = torch.empty(n_split, m, dtype=torch.float32, device=a.device) if beta != 0 else L1p
    cntp = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, bl["BLOCK_M"]), n_split)
    wrap_triton(_stats_fwd_kernel)[grid](
        a, k, ra, rk, la, lk, L1p, L0p, cntp, m, n, d, a.stride(0), k.stride(0),
        (1.0 + beta) * inv_tau, beta * inv_tau, per,
        IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0, PRECISION=_precision(a.dtype),
        BLOCK_M=bl["BLOCK_M"], BLOCK_N=bl["BLOCK_N"], BLOCK_K=bl["BLOCK_K"])
    # combine the splits: LSE over splits of the partial LSEs (all -inf stays -inf)
    L1 = torch.logsumexp(L1p, 0)
    cnt = cntp.sum(0)
    L0 = torch.logsumexp(L0p, 0) if beta != 0 else torch.log(cnt)
    return L1, L0, cnt


def _apply_norm_jacobian_(dxh, x, r):
    """In place: dx = r·(dx̂ − x̂(x̂·dx̂)) with x̂ = r·x (F.normalize backward, ‖x‖ > eps)."""
    xf = x.float()
    # x̂(x̂·dx̂) = x·r²(x·dx̂); zero where ‖x‖ <= eps (the clamp makes the scale constant)
    proj = (xf * dxh).sum(1) * r * r * (r < 1.0 / _NORM_EPS)
    dxh.addcmul_(xf, proj.unsqueeze(1), value=-1.0)
    dxh.mul_(r.unsqueeze(1))
    return dxh


def stats_triton_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau: float, beta: float,
                          in_batch: bool):
    """Backward of :func:`stats_triton`: (dA, dK) in the dtypes of a and k."""
    a_dtype, k_dtype = a.dtype, k.dtype
    a, k, la, lk, has_labels = _common(a, k, a_labels, k_labels)
    m, d = a.shape
    n = k.shape[0]
    ra, rk = _inv_norm(a), _inv_norm(k)
    c1, c0 = (1.0 + beta) * inv_tau, beta * inv_tau
    has = torch.isfinite(L1)
    zero = torch.zeros_like(L1, dtype=torch.float32)
    l1 = torch.where(has, L1.float(), zero).contiguous()
    l0 = torch.where(has, L0.float(), zero).contiguous()
    g1 = torch.where(has, dL1.float() * c1, zero)
    g0 = torch.where(has, dL0.float() * c0, zero)
    # D_ij is cast to the input dtype for the tensor-core dot; with g ~ c/m (the mean over m
    # anchors) it would underflow fp16 (m = 65536: ~1e-5·P). Scale the row coefficients so
    # max|g| = 1 and unscale the fp32 results (a tensor, no host sync).
    gscale = torch.maximum(g1.abs().max(), g0.abs().max()).clamp(min=1e-30)
    g1 = (g1 / gscale).contiguous()
    g0 = (g0 / gscale).contiguous()
    bl = _blocks(d, a.dtype)
    n_split, per = _splits(m, n, bl, a.device)
    da_part = torch.empty(n_split, m, d, dtype=torch.float32, device=a.device)
    dk = torch.empty(n, d, dtype=torch.float32, device=a.device)
    flags = dict(IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0, PRECISION=_precision(a.dtype),
                 BLOCK_M=bl["BLOCK_M"], BLOCK_N=bl["BLOCK_N"], BLOCK_K=bl["BLOCK_K"], BLOCK_DO=bl["BLOCK_DO"])
    nd = triton.cdiv(d, bl["BLOCK_DO"])
    wrap_triton(_stats_bwd_da_kernel)[(triton.cdiv(m, bl["BLOCK_M"]), nd, n_split)](
        a, k, ra, rk, la, lk, l1, l0, g1, g0, da_part, m, n, d, a.stride(0), k.stride(0), d,
        c1, c0, per, **flags)
    da = da_part[0] if n_split == 1 else da_part.sum(0)
    wrap_triton(_stats_bwd_dk_kernel)[(triton.cdiv(n, bl["BLOCK_N"]), nd)](
        a, k, ra, rk, la, lk, l1, l0, g1, g0, dk, m, n, d, a.stride(0), k.stride(0), dk.stride(0),
        c1, c0, **flags)
    da = _apply_norm_jacobian_(da.mul_(gscale), a, ra).to(a_dtype)
    dk = _apply_norm_jacobian_(dk.mul_(gscale), k, rk).to(k_dtype)
    return da, dk


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@triton_op("cdp_fast::contrastive_stats", mutates_args=())
def contrastive_stats(a: torch.Tensor, k: torch.Tensor, a_labels: Optional[torch.Tensor],
                      k_labels: Optional[torch.Tensor], inv_tau: float, beta: float,
                      in_batch: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a (m,d), k (N,d), labels (m,)/(N,) or None) -> (L1, L0, N), each (m,) float.

    CUDA tensors (fp32/bf16/fp16) run the Triton kernels; fp64 and other devices the chunked
    PyTorch path.
    """
    if a.device.type == "cuda" and a.dtype != torch.float64:
        return stats_triton(a, k, a_labels, k_labels, inv_tau, beta, in_batch)
    L1, L0, cnt = chunked.lse_stats_forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch)
    return L1, L0, cnt


@triton_op("cdp_fast::contrastive_stats_backward", mutates_args=())
def contrastive_stats_backward(a: torch.Tensor, k: torch.Tensor, a_labels: Optional[torch.Tensor],
                               k_labels: Optional[torch.Tensor], L1: torch.Tensor, L0: torch.Tensor,
                               dL1: torch.Tensor, dL0: torch.Tensor, inv_tau: float, beta: float,
                               in_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``contrastive_stats``: (dA (m,d), dK (N,d))."""
    if a.device.type == "cuda" and a.dtype != torch.float64:
        return stats_triton_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch)
    return chunked.lse_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch)


def _stats_cpu(a, k, a_labels, k_labels, inv_tau, beta, in_batch):
    return chunked.lse_stats_forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch)


def _stats_bwd_cpu(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch):
    return chunked.lse_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch)


contrastive_stats.register_kernel("cpu")(_stats_cpu)
contrastive_stats_backward.register_kernel("cpu")(_stats_bwd_cpu)


def _stats_dtype(a):
    return torch.float64 if a.dtype == torch.float64 else torch.float32


@contrastive_stats.register_fake
def _stats_fake(a, k, a_labels, k_labels, inv_tau, beta, in_batch):
    m = a.shape[0]
    dt = _stats_dtype(a)  # fp32, or fp64 for fp64 inputs (chunked path on every device)
    return a.new_empty(m, dtype=dt), a.new_empty(m, dtype=dt), a.new_empty(m, dtype=dt)


@contrastive_stats_backward.register_fake
def _stats_bwd_fake(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch):
    return torch.empty_like(a), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    a, k, a_labels, k_labels, inv_tau, beta, in_batch = inputs
    L1, L0, cnt = output
    ctx.save_for_backward(a, k, a_labels, k_labels, L1, L0)
    ctx.args = (inv_tau, beta, in_batch)
    ctx.mark_non_differentiable(cnt)


def _backward(ctx, dL1, dL0, _dcnt):
    a, k, a_labels, k_labels, L1, L0 = ctx.saved_tensors
    inv_tau, beta, in_batch = ctx.args
    dL1 = torch.zeros_like(L1) if dL1 is None else dL1
    dL0 = torch.zeros_like(L0) if dL0 is None else dL0
    da, dk = contrastive_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta, in_batch)
    return da, dk, None, None, None, None, None


contrastive_stats.register_autograd(_backward, setup_context=_setup_context)


class _InterpretedStats(torch.autograd.Function):
    """The Triton launchers on CPU tensors (TRITON_INTERPRET=1 only): tests and debugging."""

    @staticmethod
    def forward(ctx, a, k, a_labels, k_labels, inv_tau, beta, in_batch):
        L1, L0, cnt = stats_triton(a, k, a_labels, k_labels, inv_tau, beta, in_batch)
        ctx.save_for_backward(a, k, a_labels, k_labels, L1, L0)
        ctx.args = (inv_tau, beta, in_batch)
        ctx.mark_non_differentiable(cnt)
        return L1, L0, cnt

    @staticmethod
    def backward(ctx, dL1, dL0, _dcnt):
        a, k, la, lk, L1, L0 = ctx.saved_tensors
        inv_tau, beta, in_batch = ctx.args
        dL1 = torch.zeros_like(L1) if dL1 is None else dL1
        dL0 = torch.zeros_like(L0) if dL0 is None else dL0
        da, dk = stats_triton_backward(a, k, la, lk, L1, L0, dL1, dL0, inv_tau, beta, in_batch)
        return da, dk, None, None, None, None, None


def _stats_fn(interpret: bool):
    if interpret:
        if not interpreting():
            raise RuntimeError("the interpreted Triton path needs TRITON_INTERPRET=1 before triton is imported")
        return _InterpretedStats.apply
    return contrastive_stats


def hnm_loss_fused(anchor, positive, candidates=None, *, tau, tau_plus=0.1, beta=1.0,
                   anchor_labels=None, candidate_labels=None, interpret=False):
    """ℓ_HNM through ``cdp_fast::contrastive_stats`` (Triton on CUDA); same signature/value as
    :func:`cdp_fast.losses.hnm_loss_ref`. ``interpret=True`` runs the Triton kernels on CPU
    tensors under TRITON_INTERPRET=1."""
    return chunked.contrastive_loss_chunked(
        anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta, clamp=True,
        anchor_labels=anchor_labels, candidate_labels=candidate_labels, stats_fn=_stats_fn(interpret))


def infonce_loss_fused(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                       candidate_labels=None, interpret=False):
    """InfoNCE through ``cdp_fast::contrastive_stats``; see :func:`hnm_loss_fused`."""
    return chunked.contrastive_loss_chunked(
        anchor, positive, candidates, tau=tau, tau_plus=0.0, beta=0.0, clamp=False,
        anchor_labels=anchor_labels, candidate_labels=candidate_labels, stats_fn=_stats_fn(interpret))
