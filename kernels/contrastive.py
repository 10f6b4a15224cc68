"""Triton kernels of the contrastive losses (ℓ_HNM, InfoNCE): per-row log-sum-exp statistics
of the m×N cosine similarities, forward (never writing the m×N matrix) and backward (writing
its gradient weights D in row blocks of at most 256 MiB, then two GEMMs).

A leaf: imports torch and triton only. The op these kernels implement — its plain-PyTorch
reference, the CPU path, the ``torch.library`` registration and the autograd glue — lives in
:mod:`cdp_fast.ops.contrastive`; which implementation runs is decided in :mod:`cdp_fast.ops.backend`.

Formula (docs/design.md §4; derivation of the gradients: :mod:`cdp_fast.ops.contrastive.chunked`).
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
* backward: with D_ij = g1_i·P1_ij + g0_i·P0_ij (P = the masked row softmaxes, g =
  (1+β)/τ·dL1, β/τ·dL0), ``_stats_bwd_d_kernel`` recomputes each similarity tile once and
  writes D for a block of anchor rows (fp32, bounded by ``D_BLOCK_BYTES``: the whole m×N when
  it fits 256 MiB); two GEMMs give dÂ = D·K̂ and dK̂ = Dᵀ·Â. Executed FLOPs 6·m·N·d (forward
  2·m·N·d more); each D tile is owned by one program and the GEMMs run in a fixed order: no
  atomics, deterministic.
* L2 normalisation is folded in: the launchers take the raw rows plus their inverse norms
  r = 1/max(‖x‖, eps) (computed by the caller) and scale s by r_a,i·r_k,j; they return the
  gradients with respect to the *normalised* rows (dÂ, dK̂), to which the caller applies the
  normalisation Jacobian.

Dtypes: fp32 / bf16 / fp16 inputs on GPU with fp32 accumulation; fp32 dots use
``input_precision="tf32x3"`` (≈fp32 accuracy on tensor cores: plain tf32's 10-bit mantissa
would put ~1e-3 error into s and ×1/τ = ×20 into the loss at τ = 0.05). CPU tensors are only
valid under ``TRITON_INTERPRET=1`` (Triton's NumPy interpreter, fp32 only); the launchers then
use the smallest legal tiles and IEEE dots. On CUDA the tiles are autotuned per shape
(``_gpu_configs``) with ``CDP_FAST_AUTOTUNE=1``, else fixed 64×64 tiles (the default: bitwise
reproducible across processes). Not yet measured on a GPU.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["stats_forward", "stats_backward", "column_chunks", "GRID_Y_MAX", "D_BLOCK_BYTES"]


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
    nans = tl.zeros((BLOCK_M,), dtype=tl.float32)    # NaN similarities among the valid negatives
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        col_ok = rn < n_hi
        s = _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        rk = tl.load(RK + rn, mask=col_ok, other=0.0)
        s = s * ra[:, None] * rk[None, :]
        valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS)
        # NaN rule, decided here and not by max: GPUs' max/maximum drop NaN, NumPy's (an older
        # interpreter's) keep it. A NaN entry is counted and replaced by 0 before any max; the
        # row's statistics become NaN at the end (the dense reference's logsumexp gives NaN).
        bad = s != s
        nans += tl.sum((valid & bad).to(tl.float32), axis=1)
        s = tl.maximum(tl.where(bad, 0.0, s), s_min)
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
    l1 = tl.where(s1 > 0, m1 + tl.log(tl.where(s1 > 0, s1, 1.0)), float("-inf"))
    tl.store(L1 + out, tl.where(nans > 0, float("nan"), l1), mask=row_ok)
    if HAS_BETA:
        l0 = tl.where(s0 > 0, m0 + tl.log(tl.where(s0 > 0, s0, 1.0)), float("-inf"))
        tl.store(L0 + out, tl.where(nans > 0, float("nan"), l0), mask=row_ok)
    tl.store(CNT + out, cnt, mask=row_ok)


@triton.jit
def _d_tile(s, valid, l1, l0, g1, g0, c1, c0, HAS_BETA: tl.constexpr):
    """D_ij = g1_i·exp(c1 s_ij − L1_i) + g0_i·exp(c0 s_ij − L0_i) on valid entries, else 0."""
    dd = g1[:, None] * tl.exp(s * c1 - l1[:, None])
    if HAS_BETA:
        dd += g0[:, None] * tl.exp(s * c0 - l0[:, None])
    return tl.where(valid, dd, 0.0)


@triton.jit
def _stats_bwd_d_kernel(A, K, RA, RK, LA, LK, L1, L0, G1, G0, DM, M, N, D, stride_a, stride_k, stride_dm,
                        c1, c0, s_min, row0, col0,
                        IN_BATCH: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BETA: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """DM[i − row0, j] = D_ij for the anchors row0 ≤ i < M and the candidates col0 ≤ j < N
    covered by the grid's second axis (a launch covers at most GRID_Y_MAX tiles of them): one
    program per BLOCK_M×BLOCK_N tile, s recomputed once (2·BLOCK_M·BLOCK_N·d FLOPs), masked,
    floored, exponentiated and written (fp32). Each tile is owned by one program: no atomics.
    NaN similarities fail ``s >= s_min`` (an ordered compare, the same on every backend): no
    gradient through them; ``max`` only ever sees valid, non-NaN entries."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rn = col0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    ra, l1, l0, g1, g0 = _row_bwd_state(RA, L1, L0, G1, G0, rm, row_ok)
    la = _row_labels(LA, rm, row_ok, BLOCK_M, HAS_LABELS)
    s = _sim_tile(A, K, rm, rn, row_ok, col_ok, D, stride_a, stride_k, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    rk = tl.load(RK + rn, mask=col_ok, other=0.0)
    s = s * ra[:, None] * rk[None, :]
    # entries below the floor s_min were clamped in the forward: no gradient (clamp's rule)
    valid = _valid_tile(rm, rn, row_ok, col_ok, la, LK, IN_BATCH, HAS_LABELS) & (s >= s_min)
    dd = _d_tile(tl.maximum(tl.where(valid, s, 0.0), s_min), valid, l1, l0, g1, g0, c1, c0, HAS_BETA)
    tl.store(DM + (rm - row0)[:, None].to(tl.int64) * stride_dm + rn[None, :], dd,
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------
def _autotune_on() -> bool:
    """Autotuning on CUDA only with ``CDP_FAST_AUTOTUNE=1`` (the benchmarks set it). Off by
    default: the tuner chooses by timing, so two processes may choose differently, and a row's
    log-sum-exp over a tile is reduced in a layout that depends on the warps — the last bits of
    the statistics could then differ between the ranks or the resumed parts of one run."""
    return os.environ.get("CDP_FAST_AUTOTUNE", "0") == "1"


def _gpu_configs():
    """Candidates autotuned on CUDA (``CDP_FAST_AUTOTUNE=1``): rows per program, warps and
    pipeline stages. BLOCK_N (the order candidates enter each row's log-sum-exp) and BLOCK_K (the
    d-slices of each dot) stay fixed per dtype (:func:`_blocks`), which keeps the tuned results
    within rounding of the fixed tiles' (a gpu test), though not necessarily bitwise: the
    in-tile reductions' layout follows the warps."""
    return [triton.Config(dict(BLOCK_M=bm), num_warps=w, num_stages=st)
            for bm, w, st in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 2), (128, 8, 4),
                              (64, 4, 4), (32, 2, 3))]


_FLAGS = ["IN_BATCH", "HAS_LABELS", "HAS_BETA", "PRECISION"]
# the forward's best tiles depend on the anchor count too (its grid); the D kernel runs per row
# block, so it is keyed on the candidates and d only (one tuning for every block of a call)
_fwd_tuned = triton.autotune(_gpu_configs(), key=["M", "N", "D"] + _FLAGS)(_stats_fwd_kernel)
_bwd_d_tuned = triton.autotune(_gpu_configs(), key=["N", "D"] + _FLAGS)(_stats_bwd_d_kernel)


def _blocks(d: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, bool]:
    """(tile kwargs passed at launch, whether the autotuner chooses BLOCK_M and the launch
    parameters). CPU tensors (the interpreter): the smallest legal dot tiles (16) keep the tests
    fast. CUDA: BLOCK_N 64 and BLOCK_K 64 (32 for fp32, whose tiles take twice the shared
    memory); BLOCK_M 64 unless ``CDP_FAST_AUTOTUNE=1``."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), False
    fixed = dict(BLOCK_N=64, BLOCK_K=32 if dtype == torch.float32 else 64)
    if _autotune_on():
        return fixed, True
    return dict(fixed, BLOCK_M=64), False


def _kernel(plain, tuned, autotuned: bool):
    """The kernel to launch: the autotuned one, or the plain one with every tile given."""
    return wrap_triton(tuned if autotuned else plain)


def _splits(m: int, n: int, device: torch.device, block_m: int = 64, block_n: int = 64) -> tuple[int, int]:
    """(S, candidates per split). One program per BLOCK_M anchors alone leaves an H100 idle
    when m is small and the bank is large (m = 512: 8 programs for 132 SMs), so the forward
    also splits the candidates into S ranges (partial LSEs combined in PyTorch: O(S·m) memory,
    no atomics). Target: ~2 programs per SM at the nominal 64×64 tiles (a split need not be a
    multiple of the tile actually chosen: its last tile is masked). Under the interpreter S = 2
    whenever there are >= 2 candidate tiles, so the tests exercise the combine."""
    n_tiles = triton.cdiv(n, block_n)
    if device.type != "cuda":
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(m, block_m))
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, want))) * block_n
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


def _on_device(fn):
    """Run a launcher with its first tensor's CUDA device current: Triton launches on the
    current device's current stream, so a tensor on cuda:k with another device current would
    fail ("Pointer argument cannot be accessed from Triton") or run on the wrong stream."""
    @functools.wraps(fn)
    def run(a, *args, **kwargs):
        if a.device.type != "cuda":
            return fn(a, *args, **kwargs)
        with torch.cuda.device(a.device):
            return fn(a, *args, **kwargs)
    return run


@_on_device
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
    Executed FLOPs: 2·m·N·d (the similarity tiles, computed once).
    """
    a, k, la, lk, has_labels = _prepare(a, k, a_labels, k_labels)
    m, d = a.shape
    n = k.shape[0]
    tiles, tuned = _blocks(d, a.dtype, a.device)
    n_split, per = _splits(m, n, a.device, tiles.get("BLOCK_M", 64), tiles["BLOCK_N"])
    L1p = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    L0p = torch.empty(n_split, m, dtype=torch.float32, device=a.device) if beta != 0 else L1p
    cntp = torch.empty(n_split, m, dtype=torch.float32, device=a.device)
    kernel = _kernel(_stats_fwd_kernel, _fwd_tuned, tuned)
    kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), n_split)](
        a, k, ra, rk, la, lk, L1p, L0p, cntp, m, n, d, a.stride(0), k.stride(0),
        (1.0 + beta) * inv_tau, beta * inv_tau, float(s_min), per,
        IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0,
        PRECISION=_precision(a.dtype, a.device), **tiles)
    # combine the splits: LSE over splits of the partial LSEs (all -inf stays -inf)
    L1 = torch.logsumexp(L1p, 0)
    cnt = cntp.sum(0)
    L0 = torch.logsumexp(L0p, 0) if beta != 0 else torch.log(cnt)
    return L1, L0, cnt


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _mm_fp32_out(device) -> bool:
    """Whether 16-bit GEMMs with fp32 outputs exist here (``aten::mm.dtype``, CUDA, torch ≥ 2.8);
    otherwise 16-bit inputs take the fp32 GEMMs (slower, never less exact). Only ``mm`` with
    ``out_dtype`` is used: ``addmm``'s ``out_dtype`` with an fp32 ``self`` and 16-bit factors is
    refused by torch < 2.10 ("self and mat2 must have the same dtype")."""
    return device.type == "cuda" and _torch_at_least(2, 8) and hasattr(torch.ops.aten.mm, "dtype")


#: bytes of the fp32 D block the backward materialises at a time (rows of the m×N matrix)
D_BLOCK_BYTES = 256 * 2**20

#: most programs a launch puts on the grid's y axis (CUDA's gridDim.y limit); a module constant
#: so the tests can lower it and exercise the split on CPU
GRID_Y_MAX = 65535


def column_chunks(n: int, block_n: int) -> list[tuple[int, int]]:
    """[(first candidate, tiles of ``block_n`` candidates)] covering 0 ≤ j < n with at most
    :data:`GRID_Y_MAX` tiles per launch (the backward's y axis; one chunk below ~4.19M
    candidates at BLOCK_N = 64). Chunks start at multiples of ``block_n``: a tile never
    straddles two launches, so D is written exactly as one launch would write it."""
    tiles = triton.cdiv(n, block_n)
    return [(t0 * block_n, min(GRID_Y_MAX, tiles - t0)) for t0 in range(0, tiles, GRID_Y_MAX)]


@_on_device
def stats_backward(a, k, ra, rk, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau: float, beta: float,
                   in_batch: bool, s_min: float = float("-inf"), block_bytes: int | None = None):
    """Backward statistics: the gradients with respect to the normalised rows.

    Args: as :func:`stats_forward`, plus the forward's L1, L0 (m,) and their incoming
    gradients dL1, dL0 (m,); ``block_bytes`` (default :data:`D_BLOCK_BYTES`) bounds the D
    block held at once.
    Returns:
        (dÂ (m, d), dK̂ (N, d)), fp32: dÂ_i = Σ_j D_ij k̂_j, dK̂_j = Σ_i D_ij â_i with
        D_ij = (1+β)/τ·dL1_i·P1_ij + β/τ·dL0_i·P0_ij.

    Structure: for each block of anchor rows (as many as fit ``block_bytes`` of fp32 D: all of
    them unless m·N > 64M), ``_stats_bwd_d_kernel`` recomputes the similarity tiles once and
    writes D (fp32); two GEMMs give dÂ = D·K̂ and accumulate dK̂ += Dᵀ·Â in a fixed order
    (deterministic), with fp32 outputs: fp32 GEMMs for fp32 inputs (true fp32 unless the caller
    enabled TF32 matmuls); for bf16/fp16 inputs on CUDA, 16-bit operands on tensor cores
    (``out_dtype=torch.float32``), D scaled by a power of two so fp16 does not underflow.
    Executed FLOPs: 6·m·N·d (s once, then the two products), where the two passes (dÂ, then
    dK̂ transposed) that recomputed s per 128-wide slice of d cost 2·m·N·d·(2·⌈d/128⌉ + 2)
    (24·m·N·d at d = 640; 26 with the forward). Memory: O((m + N)·d) plus the D block.
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
    low = a.dtype in (torch.float16, torch.bfloat16) and _mm_fp32_out(a.device)
    gscale = None
    if low:
        # 16-bit inputs: D and the rows enter the GEMMs in the input dtype (tensor cores) with
        # fp32 accumulation and fp32 outputs. With g ~ c/m (the mean over m anchors) D would
        # underflow fp16 (m = 65536: ~1e-5·P): scale the row coefficients by a power of two
        # (exact) so max|g| <= 1, and unscale the fp32 results. NaNs do not set the scale.
        top = torch.maximum(g1.abs().nan_to_num(0.0).max(), g0.abs().nan_to_num(0.0).max()).clamp(min=1e-30)
        gscale = torch.exp2(torch.ceil(torch.log2(top)))
        g1, g0 = g1 / gscale, g0 / gscale
    g1, g0 = g1.contiguous(), g0.contiguous()
    tiles, tuned = _blocks(d, a.dtype, a.device)
    kernel = _kernel(_stats_bwd_d_kernel, _bwd_d_tuned, tuned)
    flags = dict(IN_BATCH=in_batch, HAS_LABELS=has_labels, HAS_BETA=beta != 0,
                 PRECISION=_precision(a.dtype, a.device), **tiles)
    # the normalised rows (the similarities were computed from these rows × these norms)
    ah = a.float() * ra[:, None]
    kh = k.float() * rk[:, None]
    if low:
        ah, kh = ah.to(a.dtype), kh.to(a.dtype)
    budget = D_BLOCK_BYTES if block_bytes is None else block_bytes
    rows = max(1, min(m, budget // (4 * max(n, 1))))
    da_parts = []
    dk = torch.zeros(n, d, dtype=torch.float32, device=a.device)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        block = torch.empty(r1 - r0, n, dtype=torch.float32, device=a.device)
        # the candidates' tiles go on the grid's y axis, at most GRID_Y_MAX per launch (CUDA's
        # limit: 65535·64 ≈ 4.19M candidates); larger banks take several launches by column
        for col0, tiles_n in column_chunks(n, tiles["BLOCK_N"]):
            kernel[lambda meta, c=r1 - r0, t=tiles_n: (triton.cdiv(c, meta["BLOCK_M"]), t)](
                a, k, ra, rk, la, lk, l1, l0, g1, g0, block, r1, n, d, a.stride(0), k.stride(0), block.stride(0),
                c1, c0, float(s_min), r0, col0, **flags)
        if low:
            block = block.to(a.dtype)
            da_parts.append(torch.mm(block, kh, out_dtype=torch.float32))
            dk += torch.mm(block.t(), ah[r0:r1], out_dtype=torch.float32)
        else:
            da_parts.append(block @ kh)
            dk.addmm_(block.t(), ah[r0:r1])
    da = da_parts[0] if len(da_parts) == 1 else torch.cat(da_parts)
    if gscale is not None:
        da, dk = da * gscale, dk * gscale
    return da, dk
