"""Triton kernels of the contrastive losses (ℓ_HNM, InfoNCE): per-row log-sum-exp statistics
of the m×N cosine similarities, forward and backward, without ever writing the m×N matrix.

A leaf: imports torch and triton only. The op these kernels implement — its plain-PyTorch
reference, the CPU path, the ``torch.library`` registration and the autograd glue — lives in
:mod:`cdp_fast.ops.contrastive`; which implementation runs is decided in :mod:`cdp_fast.backend`.

Formula (DESIGN.md §4; derivation of the gradients: :mod:`cdp_fast.ops.contrastive.chunked`).
With â_i, k̂_j the L2-normalised anchor and candidate rows, s_ij = â_i·k̂_j and N(i) the valid
negatives of anchor i (not itself when the candidates are the anchors; another class when
labels are given), the losses depend on s only through

    L1_i = LSE_{j∈N(i)} ((1+β)·s_ij/τ),   L0_i = LSE_{j∈N(i)} (β·s_ij/τ),   N_i = |N(i)|.

* forward ``_stats_fwd_kernel``: one program per block of BLOCK_M anchors and range of
  candidates (the split keeps small-m/large-bank problems busy, see ``_splits``) streams the
  candidates in BLOCK_N tiles, computes the tile of s with ``tl.dot`` (fp32 accumulation;
  the d axis is looped in BLOCK_K slices, so any d works), applies the masks and updates two
  online log-sum-exps (running max + rescaled sum, as in flash-attention) and the count N_i.
  Memory O((m + N)·d); nothing of size m×N is ever written.
* backward: the tiles are recomputed. With D_ij = g1_i·P1_ij + g0_i·P0_ij (P = the masked row
  softmaxes, g = (1+β)/τ·dL1, β/τ·dL0): ``_stats_bwd_da_kernel`` (grid: anchor blocks × d
  blocks × candidate splits) accumulates dÂ_i = Σ_j D_ij k̂_j (per-split slabs summed
  afterwards); ``_stats_bwd_dk_kernel`` (grid: candidate blocks × d blocks) is the transposed
  pass dK̂_j = Σ_i D_ij â_i. Each output element is owned by one program: no atomics.
* L2 normalisation is folded in: the launchers take the raw rows plus their inverse norms
  r = 1/max(‖x‖, eps) (computed by the caller) and scale s by r_a,i·r_k,j; they return the
  gradients with respect to the *normalised* rows (dÂ, dK̂), to which the caller applies the
  normalisation Jacobian.

Dtypes: fp32 / bf16 / fp16 inputs on GPU with fp32 accumulation; fp32 dots use
``input_precision="tf32x3"`` (≈fp32 accuracy on tensor cores: plain tf32's 10-bit mantissa
would put ~1e-3 error into s and ×1/τ = ×20 into the loss at τ = 0.05). CPU tensors are only
valid under ``TRITON_INTERPRET=1`` (Triton's NumPy interpreter, fp32 only); the launchers then
use the smallest legal tiles and IEEE dots.

Not yet measured on a GPU: the tile sizes below are first choices, not tuned numbers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["stats_forward", "stats_backward"]


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
def _stats_fwd_kernel(A, K, RA, RK, LA, LK, L1, L0, CNT, M, N, D, stride_a, stride_k, c1, c0, s_min, N_SPLIT,
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
        s = tl.maximum(s * ra[:, None] * rk[None, :], s_min)
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
                         stride_da, c1, c0, s_min, N_SPLIT,
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
        # entries below the floor s_min were clamped in the forward: no gradient (clamp's rule)
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS) & (s >= s_min)
        dd = _d_tile(tl.maximum(s, s_min), valid, l1, l0, g1, g0, c1, c0, HAS_BETA) * rk[None, :]   # D_ij·r_k,j
        kv = tl.load(K + rn[:, None].to(tl.int64) * stride_k + rd[None, :],
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(dd.to(kv.dtype), kv, input_precision=PRECISION)
    slab = DA + pid_s.to(tl.int64) * M * stride_da
    tl.store(slab + rm[:, None].to(tl.int64) * stride_da + rd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _stats_bwd_dk_kernel(A, K, RA, RK, LA, LK, L1, L0, G1, G0, DK, M, N, D, stride_a, stride_k,
                         stride_dk, c1, c0, s_min,
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
        # entries below the floor s_min were clamped in the forward: no gradient (clamp's rule)
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS) & (s >= s_min)
        dd = _d_tile(tl.maximum(s, s_min), valid, l1, l0, g1, g0, c1, c0, HAS_BETA) * ra[:, None]   # D_ij·r_a,i
        av = tl.load(A + rm[:, None].to(tl.int64) * stride_a + rd[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(dd.to(av.dtype)), av, input_precision=PRECISION)
    tl.store(DK + rn[:, None].to(tl.int64) * stride_dk + rd[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------
def _blocks(d: int, dtype: torch.dtype, device: torch.device):
    """Tile sizes. CPU tensors (the interpreter): the smallest legal dot tiles (16) keep the
    tests fast; on GPU 64×64 tiles with 32..64-wide d slices (fp32 halves BLOCK_K to fit
    shared memory)."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_DO=16)
    bk = 32 if dtype == torch.float32 else 64
    bdo = min(128, max(16, triton.next_power_of_2(d)))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, BLOCK_DO=bdo)


def _splits(m: int, n: int, bl: dict, device: torch.device) -> tuple[int, int]:
    """(S, candidates per split). One program per BLOCK_M anchors alone leaves an H100 idle
    when m is small and the bank is large (m = 512: 8 programs for 132 SMs), so the forward and
    the dA pass also split the candidates into S ranges (partial LSEs / partial dÂ slabs,
    combined in PyTorch: O(S·m) and O(S·m·d) memory, no atomics). Target: ~2 programs per SM.
    Under the interpreter S = 2 whenever there are >= 2 candidate tiles, so the tests exercise
    the combine."""
    n_tiles = triton.cdiv(n, bl["BLOCK_N"])
    if device.type != "cuda":
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(m, bl["BLOCK_M"]))
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, want))) * bl["BLOCK_N"]
    return triton.cdiv(n, per), per


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _prepare(a, k, a_labels, k_labels):
    """Contiguous rows in a's dtype, int64 labels (a 1-element dummy when there are none)."""
    a = a.contiguous()
    k = k.contiguous()
    if k.dtype != a.dtype:
        k = k.to(a.dtype)
    has_labels = a_labels is not None
    la = a_labels.contiguous().to(torch.int64) if has_labels else a.new_zeros(1, dtype=torch.int64)
    lk = k_labels.contiguous().to(torch.int64) if has_labels else a.new_zeros(1, dtype=torch.int64)
    return a, k, la, lk, has_labels


def stats_forward(a, k, ra, rk, a_labels, k_labels, inv_tau: float, beta: float, in_batch: bool,
                  s_min: float = float("-inf")):
    """Forward statistics.

    Args:
        a: (m, d) raw anchors; k: (N, d) raw candidates (fp32/bf16/fp16).
        ra, rk: (m,), (N,) fp32 inverse norms 1/max(‖x‖, eps).
        a_labels, k_labels: (m,), (N,) int labels, or None.
        inv_tau: 1/τ. beta: β >= 0. in_batch: the candidates are the anchors (mask i = j).
        s_min: floor of the similarities, s ← max(s, s_min) (−inf: none).
    Returns:
        (L1, L0, N), each (m,) fp32; L0 = log N when β = 0; empty rows give L1 = L0 = −inf.
    """
    a, k, la, lk, has_labels = _prepare(a, k, a_labels, k_labels)
    m, d = a.shape
    n = k.shape[0]
    bl = _blocks(d, a.dtype, a.device)
    n_split, per = _splits(m, n, bl, a.device)
    L1p = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    L0p = torch.empty(n_split, m, dtype=torch.float32, device=a.device) if beta != 0 else L1p
    cntp = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, bl["BLOCK_M"]), n_split)
    wrap_triton(_stats_fwd_kernel)[grid](
        a, k, ra, rk, la, lk, L1p, L0p, cntp, m, n, d, a.stride(0), k.stride(0),
        (1.0 + beta) * inv_tau, beta * inv_tau, float(s_min), per,
        IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0,
        PRECISION=_precision(a.dtype, a.device),
        BLOCK_M=bl["BLOCK_M"], BLOCK_N=bl["BLOCK_N"], BLOCK_K=bl["BLOCK_K"])
    # combine the splits: LSE over splits of the partial LSEs (all -inf stays -inf)
    L1 = torch.logsumexp(L1p, 0)
    cnt = cntp.sum(0)
    L0 = torch.logsumexp(L0p, 0) if beta != 0 else torch.log(cnt)
    return L1, L0, cnt


def stats_backward(a, k, ra, rk, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau: float, beta: float,
                   in_batch: bool, s_min: float = float("-inf")):
    """Backward statistics: the gradients with respect to the normalised rows.

    Args: as :func:`stats_forward`, plus the forward's L1, L0 (m,) and their incoming
    gradients dL1, dL0 (m,).
    Returns:
        (dÂ (m, d), dK̂ (N, d)), fp32: dÂ_i = Σ_j D_ij k̂_j, dK̂_j = Σ_i D_ij â_i with
        D_ij = (1+β)/τ·dL1_i·P1_ij + β/τ·dL0_i·P0_ij.
    """
    a, k, la, lk, has_labels = _prepare(a, k, a_labels, k_labels)
    m, d = a.shape
    n = k.shape[0]
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
    bl = _blocks(d, a.dtype, a.device)
    n_split, per = _splits(m, n, bl, a.device)
    da_part = torch.empty(n_split, m, d, dtype=torch.float32, device=a.device)
    dk = torch.empty(n, d, dtype=torch.float32, device=a.device)
    flags = dict(IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0,
                 PRECISION=_precision(a.dtype, a.device), BLOCK_M=bl["BLOCK_M"], BLOCK_N=bl["BLOCK_N"],
                 BLOCK_K=bl["BLOCK_K"], BLOCK_DO=bl["BLOCK_DO"])
    nd = triton.cdiv(d, bl["BLOCK_DO"])
    wrap_triton(_stats_bwd_da_kernel)[(triton.cdiv(m, bl["BLOCK_M"]), nd, n_split)](
        a, k, ra, rk, la, lk, l1, l0, g1, g0, da_part, m, n, d, a.stride(0), k.stride(0), d,
        c1, c0, float(s_min), per, **flags)
    da = da_part[0] if n_split == 1 else da_part.sum(0)
    wrap_triton(_stats_bwd_dk_kernel)[(triton.cdiv(n, bl["BLOCK_N"]), nd)](
        a, k, ra, rk, la, lk, l1, l0, g1, g0, dk, m, n, d, a.stride(0), k.stride(0), dk.stride(0),
        c1, c0, float(s_min), **flags)
    return da.mul_(gscale), dk.mul_(gscale)
