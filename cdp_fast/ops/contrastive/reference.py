"""The dense reference of the contrastive losses (§4.2 of the paper): InfoNCE and HNM.

Plain, upcast PyTorch that mirrors docs/design.md §4 line by line, computed in log space
(log-sum-exp) so that τ = 0.05 with d = 2048 neither overflows nor underflows. It materialises
the m×N similarity matrix: it is what the streaming paths (:mod:`.chunked`, the Triton kernels)
are tested against, not what runs.

Notation (docs/design.md §4; Robinson et al. 2021 "Contrastive learning with hard negative
samples", eq. (3) and their public code; the paper's ℓ_HNM):
    a_i, p_i, k_j   L2-normalised anchor, positive, candidate embeddings
    s_ij = a_i·k_j
    pos_i  = exp(a_i·p_i / τ)
    neg_ij = exp(s_ij / τ),   j ∈ N(i)  (N(i): candidates ≠ i, of another class if labels)
    N_i    = |N(i)|
HNM:
    imp_ij      = neg_ij^β
    reweight_i  = Σ_j imp_ij·neg_ij / mean_j imp_ij
                = N_i · exp(LSE_j((1+β)s_ij/τ) − LSE_j(β s_ij/τ))
    Ng_i        = max((−τ⁺ N_i pos_i + reweight_i) / (1 − τ⁺), N_i·e^{−1/τ})
    ℓ_i         = −log(pos_i / (pos_i + Ng_i)) = softplus(log Ng_i − log pos_i)
InfoNCE (HNM with β = 0, τ⁺ = 0 and no clamp):
    ℓ_i = −log(pos_i / (pos_i + Σ_j neg_ij)) = softplus(LSE_j(s_ij/τ) − log pos_i)
The loss is the mean of ℓ_i over the m anchors; an anchor with N_i = 0 (no valid negative)
contributes ℓ_i = 0 (its denominator is pos_i alone).

Gradients flow to the anchors and to the candidates (when the candidates are the anchors
themselves, i.e. ``candidates=None``, both paths reach the same tensor); the positives are
detached by default, as in Algorithm 1 (x_p is a fixed target for x_t), and carry gradients
with ``detach_positive=False`` (the authors' symmetric and keys forms, below).

Shapes: anchor (m, d), positive (m, d), candidates (N, d) or None, anchor_labels (m,),
candidate_labels (N,); returns a 0-dim tensor in the anchors' dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "NORM_EPS", "hnm_loss_ref", "infonce_loss_ref", "hnm_rows_ref", "infonce_rows_ref",
    "hnm_symmetric_ref", "infonce_keys_ref", "check_loss_args", "negative_mask",
]

#: F.normalize's eps: every path normalises the rows as x / max(‖x‖, NORM_EPS).
NORM_EPS = 1e-12


def check_loss_args(anchor, positive, candidates, tau, tau_plus=0.0, beta=0.0,
                    anchor_labels=None, candidate_labels=None):
    """Validate shapes and hyper-parameters; raise ValueError naming the argument."""
    if not isinstance(anchor, torch.Tensor) or anchor.dim() != 2:
        raise ValueError(f"anchor must be a (m, d) tensor, got {getattr(anchor, 'shape', type(anchor))}")
    m, d = anchor.shape
    if m < 1 or d < 1:
        raise ValueError(f"anchor must be non-empty, got shape {tuple(anchor.shape)}")
    if not isinstance(positive, torch.Tensor) or positive.shape != anchor.shape:
        raise ValueError(
            f"positive must have the anchor's shape {tuple(anchor.shape)}, got "
            f"{tuple(getattr(positive, 'shape', ()))}")
    if candidates is not None:
        if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2 or candidates.shape[1] != d:
            raise ValueError(f"candidates must be a (N, {d}) tensor, got {tuple(getattr(candidates, 'shape', ()))}")
        if candidates.shape[0] < 1:
            raise ValueError("candidates must hold at least one row")
    elif m < 2:
        raise ValueError("in-batch negatives need at least 2 anchors (batch_size >= 2)")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    if not (isinstance(tau_plus, (int, float)) and 0.0 <= tau_plus < 1.0):
        raise ValueError(f"tau_plus must lie in [0, 1), got {tau_plus!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if (anchor_labels is None) != (candidate_labels is None) and candidates is not None:
        raise ValueError("anchor_labels and candidate_labels must be given together when candidates are given")
    if anchor_labels is not None and (anchor_labels.dim() != 1 or anchor_labels.shape[0] != m):
        raise ValueError(f"anchor_labels must have shape ({m},), got {tuple(anchor_labels.shape)}")
    if candidate_labels is not None:
        n = m if candidates is None else candidates.shape[0]
        if candidate_labels.dim() != 1 or candidate_labels.shape[0] != n:
            raise ValueError(f"candidate_labels must have shape ({n},), got {tuple(candidate_labels.shape)}")


def negative_mask(m, n, *, in_batch, anchor_labels=None, candidate_labels=None, device=None):
    """Boolean (m, n) mask of valid negatives: not self (in-batch), and of another class
    when labels are given."""
    mask = torch.ones(m, n, dtype=torch.bool, device=device)
    if in_batch:
        mask.fill_diagonal_(False)
    if anchor_labels is not None:
        cl = anchor_labels if candidate_labels is None else candidate_labels
        mask &= anchor_labels.view(-1, 1).to(device) != cl.view(1, -1).to(device)
    return mask


def _masked_lse(x, mask):
    """Row-wise log-sum-exp over the masked entries. An empty row gives a large negative but
    finite value (no inf − inf = NaN downstream, hence no NaN gradient); callers zero such
    rows through ``mask.any(1)``."""
    return torch.logsumexp(x.masked_fill(~mask, torch.finfo(x.dtype).min), dim=1)


def _prepare(anchor, positive, candidates, anchor_labels, candidate_labels, detach_positive=True):
    """Upcast to fp32 (at least), normalise, detach the positive (unless asked not to); build
    the negative mask."""
    work = torch.promote_types(anchor.dtype, torch.float32)
    a = F.normalize(anchor.to(work), dim=1, eps=NORM_EPS)
    p = F.normalize((positive.detach() if detach_positive else positive).to(work), dim=1, eps=NORM_EPS)
    in_batch = candidates is None
    k = a if in_batch else F.normalize(candidates.to(work), dim=1, eps=NORM_EPS)
    mask = negative_mask(a.shape[0], k.shape[0], in_batch=in_batch, anchor_labels=anchor_labels,
                         candidate_labels=candidate_labels, device=a.device)
    return a, p, k, mask


def hnm_rows_ref(anchor, positive, candidates=None, *, tau, tau_plus, beta,
                 anchor_labels=None, candidate_labels=None, detach_positive=True, neg_floor=0.0,
                 ratio_floor=0.0):
    """Per-anchor HNM losses ℓ_i, shape (m,), in the working dtype (fp32 or fp64).

    With ``beta=0, tau_plus=0`` and the clamp removed this is InfoNCE; the clamp is kept here
    (it is part of ℓ_HNM), so use :func:`infonce_rows_ref` for InfoNCE. ``neg_floor`` /
    ``ratio_floor`` are the clamps of the authors' code (``hard_negative_sample.py``: neg_ij ≥
    1e-4, pos/(pos + Ng) ≥ 1e-4; 0 = none): neg_ij = max(exp(s_ij/τ), floor) is
    s_ij ≥ τ·ln(floor) in log space, and ℓ_i = −log max(ratio, floor) is ℓ_i ≤ −ln(floor).
    """
    a, p, k, mask = _prepare(anchor, positive, candidates, anchor_labels, candidate_labels, detach_positive)
    s = a @ k.T
    if neg_floor > 0:
        s = torch.clamp(s, min=tau * math.log(neg_floor))
    s = s / tau                                           # s_ij/τ, (m, N)
    log_pos = (a * p).sum(1) / tau                        # log pos_i
    n_i = mask.sum(1).to(s.dtype)                         # N_i
    log_n = torch.log(n_i.clamp(min=1))
    # log reweight_i = log N_i + LSE((1+β)s/τ) − LSE(β s/τ)
    log_rw = log_n + _masked_lse((1 + beta) * s, mask) - _masked_lse(beta * s, mask)
    # log(τ⁺ N_i pos_i); -inf when τ⁺ = 0
    log_sub = (math.log(tau_plus) if tau_plus > 0 else -math.inf) + log_n + log_pos
    # log(reweight − τ⁺N pos) where positive, else -inf (the clamp below then wins)
    diff = log_sub - log_rw
    ok = diff < 0
    safe = torch.where(ok, diff, torch.full_like(diff, -1.0))
    log_num = torch.where(ok, log_rw + torch.log1p(-torch.exp(safe)), torch.full_like(diff, -math.inf))
    log_ng = log_num - math.log1p(-tau_plus)
    log_clamp = log_n - 1.0 / tau                         # log(N_i e^{−1/τ})
    log_ng = torch.maximum(log_ng, log_clamp)
    has_neg = mask.any(1)
    rows = F.softplus(log_ng - log_pos)
    if ratio_floor > 0:
        rows = torch.clamp(rows, max=-math.log(ratio_floor))
    return torch.where(has_neg, rows, torch.zeros_like(rows))


def infonce_rows_ref(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                     candidate_labels=None, detach_positive=True):
    """Per-anchor InfoNCE losses ℓ_i = softplus(LSE_j(s_ij/τ) − log pos_i), shape (m,)."""
    a, p, k, mask = _prepare(anchor, positive, candidates, anchor_labels, candidate_labels, detach_positive)
    s = (a @ k.T) / tau
    log_pos = (a * p).sum(1) / tau
    lse = _masked_lse(s, mask)
    rows = F.softplus(lse - log_pos)
    return torch.where(mask.any(1), rows, torch.zeros_like(rows))


def hnm_loss_ref(anchor, positive, candidates=None, *, tau, tau_plus=0.1, beta=1.0,
                 anchor_labels=None, candidate_labels=None, detach_positive=True, neg_floor=0.0,
                 ratio_floor=0.0):
    """Dense reference of the HNM loss (mean over anchors). See the module docstring and
    :func:`hnm_rows_ref` for the clamps."""
    check_loss_args(anchor, positive, candidates, tau, tau_plus, beta, anchor_labels, candidate_labels)
    rows = hnm_rows_ref(anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta,
                        anchor_labels=anchor_labels, candidate_labels=candidate_labels,
                        detach_positive=detach_positive, neg_floor=neg_floor, ratio_floor=ratio_floor)
    return rows.mean().to(anchor.dtype)


def infonce_loss_ref(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                     candidate_labels=None, detach_positive=True):
    """Dense reference of the InfoNCE loss (mean over anchors). See the module docstring."""
    check_loss_args(anchor, positive, candidates, tau, 0.0, 0.0, anchor_labels, candidate_labels)
    rows = infonce_rows_ref(anchor, positive, candidates, tau=tau, anchor_labels=anchor_labels,
                            candidate_labels=candidate_labels, detach_positive=detach_positive)
    return rows.mean().to(anchor.dtype)


# --------------------------------------------------------------------------------------------
# the authors' forms, transcribed from their formulas (not log space; fp64 in the tests)
# --------------------------------------------------------------------------------------------
def hnm_symmetric_ref(z, w, *, tau, tau_plus=0.1, beta=1.0, labels=None):
    """The authors' HNM guidance loss, written from the formula of
    ``adv_training/hard_negative_sample.py::criterion`` (YiDongOuYang/Contrastive-Guided-
    Diffusion-Process; called from ``contrast_loss.py`` with τ⁺ = 0.1, β = 1, τ = 10), with
    plain ``exp`` and the code's three clamps:

        rows r = 1..2B: out = [ẑ_1..ẑ_B, ŵ_1..ŵ_B] (L2-normalised), partner of r: r ± B
        P_r     = exp(out_r·out_partner / τ)
        n_rj    = max(exp(out_r·out_j / τ), 1e-4),  j ≠ r, j ≠ partner(r)   (N = 2B − 2)
        Ng_r    = max((N Σ_j n_rj^{β+1} / Σ_j n_rj^β − τ⁺ N P_r) / (1 − τ⁺), N e^{−1/τ})
        L       = −(1/2B) Σ_r log max(P_r / (P_r + Ng_r), 1e-4)

    z: (B, d) embeddings of x_t, w: (B, d) of x_{t+1} (both may carry gradients). ``labels``
    (B,) restricts each row's negatives further to other-class rows (our generalisation for
    negatives="class"; N then varies per row). Returns a 0-dim tensor.
    """
    B = z.shape[0]
    out = F.normalize(torch.cat([z, w]), dim=1, eps=NORM_EPS)
    ids = torch.arange(B, device=z.device) if labels is None else labels.to(z.device)
    ids = torch.cat([ids, ids])
    mask = ids.view(-1, 1) != ids.view(1, -1)             # drops self and partner (same id)
    if labels is not None:
        mask &= ~torch.eye(2 * B, dtype=torch.bool, device=z.device)
    partner = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    pos = torch.exp((out * out[partner]).sum(1) / tau)
    neg = torch.clamp(torch.exp(out @ out.T / tau), min=1e-4)
    n_r = mask.sum(1).to(out.dtype)
    imp = torch.where(mask, neg ** beta, torch.zeros_like(neg))
    has = n_r > 0                                          # a row with no negative: ℓ = 0
    reweight = n_r * (imp * neg).sum(1) / torch.where(has, imp.sum(1), torch.ones_like(n_r))
    ng = (-tau_plus * n_r * pos + reweight) / (1 - tau_plus)
    ng = torch.maximum(ng, n_r * math.exp(-1.0 / tau))
    ratio = torch.clamp(pos / (pos + ng), min=1e-4)
    return torch.where(has, -torch.log(ratio), torch.zeros_like(ratio)).mean()


def infonce_keys_ref(z, w, *, tau, labels=None):
    """The authors' InfoNCE (``adv_training/infonce.py``, RElbers/info-nce-pytorch with
    ``negative_keys=None``): a cross-entropy over the B×B cosine matrix of queries ẑ_k (x_t)
    against keys ŵ_j (x_{t+1}), the positive on the diagonal:

        L = (1/B) Σ_k −log( exp(ẑ_k·ŵ_k/τ) / Σ_j exp(ẑ_k·ŵ_j/τ) )

    (the other samples' positives are the negatives; the denominator includes the positive).
    ``labels`` (B,) drops other keys of the same class (our generalisation). z, w: (B, d).
    """
    zq = F.normalize(z, dim=1, eps=NORM_EPS)
    wk = F.normalize(w, dim=1, eps=NORM_EPS)
    logits = zq @ wk.T / tau
    if labels is not None:
        same = labels.view(-1, 1) == labels.view(1, -1)
        logits = logits.masked_fill(same & ~torch.eye(len(z), dtype=torch.bool, device=z.device),
                                    -math.inf)
    return F.cross_entropy(logits, torch.arange(len(z), device=z.device))
