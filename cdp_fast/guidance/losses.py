"""Contrastive losses of Contrastive-DP (§4.2): InfoNCE and hard-negative-mining (HNM).

The public face: argument checks, then the streaming op :mod:`cdp_fast.ops.contrastive`
(Triton kernels on GPU, the chunked PyTorch path on CPU; :func:`cdp_fast.ops.backend.choose`
decides). The dense references (``hnm_loss_ref`` and the rest) live in
:mod:`cdp_fast.ops.contrastive.reference`: plain upcast PyTorch that mirrors docs/design.md §4
line by line.

With L2-normalised embeddings, pos_i = exp(a_i·p_i/τ), neg_ij = exp(a_i·k_j/τ) over the valid
negatives N(i) (candidates ≠ i; of another class when labels are given), N_i = |N(i)|:
HNM (Robinson et al. 2021, eq. (3); the paper's ℓ_HNM), with imp_ij = neg_ij^β,
    Ng_i = max((−τ⁺ N_i pos_i + Σ_j imp_ij·neg_ij / mean_j imp_ij) / (1 − τ⁺), N_i·e^{−1/τ}),
    ℓ_i  = −log(pos_i / (pos_i + Ng_i));
InfoNCE: ℓ_i = −log(pos_i / (pos_i + Σ_j neg_ij)). The log-space derivation is in the
reference's docstring.
The loss is the mean of ℓ_i over the m anchors; an anchor with no valid negative contributes
ℓ_i = 0. Gradients flow to the anchors and the candidates; in ``hnm_loss`` / ``infonce_loss``
the positives are detached, as in Algorithm 1 (x_p is a fixed target for x_t); the authors'
forms (``hnm_loss_symmetric``, ``infonce_loss_keys``) pass gradients through both sets.

Shapes: anchor (m, d), positive (m, d), candidates (N, d) or None, anchor_labels (m,),
candidate_labels (N,); returns a 0-dim tensor in the anchors' dtype.
"""
from __future__ import annotations

import torch

from cdp_fast.ops import contrastive as _op
from cdp_fast.ops.contrastive.reference import check_loss_args

__all__ = ["hnm_loss", "infonce_loss", "hnm_loss_symmetric", "infonce_loss_keys", "AUTHORS_FLOOR"]

#: The authors' two clamps of ``hard_negative_sample.py``: exp(s/τ) >= 1e-4 and
#: pos/(pos + Ng) >= 1e-4. With unit vectors the first binds only for τ < 0.109 and the
#: second only when ℓ_i > 9.2 (about 2B > 10^4 negatives at τ = 10), so at the paper's
#: settings they change nothing; they are kept so that every setting matches the code.
AUTHORS_FLOOR = 1e-4


def hnm_loss(anchor, positive, candidates=None, *, tau, tau_plus=0.1, beta=1.0,
             anchor_labels=None, candidate_labels=None):
    """Hard-negative-mining contrastive loss ℓ_HNM (the paper's §4.2; Robinson et al. 2021).

    Args:
        anchor: (m, d) embeddings of x_t (gradients flow back to them).
        positive: (m, d) embeddings of the positives (detached inside).
        candidates: (N, d) negative bank, or None for the other anchors of the batch.
        tau: temperature τ > 0. tau_plus: τ⁺ ∈ [0, 1). beta: concentration β >= 0.
        anchor_labels, candidate_labels: optional (m,), (N,) int labels; negatives are then
            restricted to candidates of another class (per-row N_i).
    Returns:
        0-dim tensor, mean of ℓ_i over the anchors.

    Examples:
        >>> a = torch.randn(8, 16, requires_grad=True)
        >>> hnm_loss(a, a.detach(), tau=0.5, tau_plus=0.1, beta=1.0).backward()
    """
    check_loss_args(anchor, positive, candidates, tau, tau_plus, beta, anchor_labels, candidate_labels)
    return _op.contrastive_loss(anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta, clamp=True,
                                anchor_labels=anchor_labels, candidate_labels=candidate_labels)


def infonce_loss(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                 candidate_labels=None):
    """InfoNCE loss (van den Oord et al. 2018; the paper's §4.2) with an explicit positive:
    ℓ_i = −log(pos_i / (pos_i + Σ_{j∈N(i)} neg_ij)).

    Args/returns as :func:`hnm_loss` (no τ⁺, β).
    """
    check_loss_args(anchor, positive, candidates, tau, 0.0, 0.0, anchor_labels, candidate_labels)
    return _op.contrastive_loss(anchor, positive, candidates, tau=tau, tau_plus=0.0, beta=0.0, clamp=False,
                                anchor_labels=anchor_labels, candidate_labels=candidate_labels)


def _pair_args(z, w, labels):
    if not isinstance(z, torch.Tensor) or not isinstance(w, torch.Tensor) or z.dim() != 2 or z.shape != w.shape:
        raise ValueError(f"z and w must be (B, d) tensors of one shape, got {tuple(getattr(z, 'shape', ()))} "
                         f"and {tuple(getattr(w, 'shape', ()))}")
    if z.shape[0] < 2:
        raise ValueError("the paired forms need at least 2 samples (B >= 2)")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (z.shape[0],)):
        raise ValueError(f"labels must have shape ({z.shape[0]},)")
    ids = torch.arange(z.shape[0], device=z.device) if labels is None else labels.to(z.device)
    return ids


def hnm_loss_symmetric(z, w, *, tau, tau_plus=0.1, beta=1.0, labels=None):
    """The authors' HNM guidance loss: the symmetric 2B-row HCL loss of
    ``adv_training/hard_negative_sample.py`` (YiDongOuYang/Contrastive-Guided-Diffusion-Process),
    streamed (never the 2B×2B matrix).

    Rows are [e(x_t^1)..e(x_t^B), e(x_{t+1}^1)..e(x_{t+1}^B)]; row i's positive is its partner
    (i ± B); its negatives are the other 2B − 2 rows (with ``labels``: only rows of another
    class); ℓ_HNM per row with the code's clamps (:data:`AUTHORS_FLOOR`); the mean over the 2B
    rows. Gradients flow to both z and w (every x_t row is also a positive and a negative).
    Reference, transcribed from the formula: :func:`hnm_symmetric_ref`.

    Args:
        z: (B, d) embeddings of x_t. w: (B, d) embeddings of the positives (x_{t+1}).
        tau, tau_plus, beta: τ > 0, τ⁺ ∈ [0, 1), β >= 0. labels: optional (B,) classes.
    Returns:
        0-dim tensor.

    With mean reduction each sample's gradient scales as 1/B: λ is tied to the batch size
    (the paper's λ = 1e5 is for B = 512).
    """
    ids = _pair_args(z, w, labels)
    check_loss_args(z, w, None, tau, tau_plus, beta)
    rows = torch.cat([ids, ids])
    return _op.contrastive_loss(torch.cat([z, w]), torch.cat([w, z]), None, tau=tau, tau_plus=tau_plus, beta=beta,
                                clamp=True, anchor_labels=rows, detach_positive=False, neg_floor=AUTHORS_FLOOR,
                                ratio_floor=AUTHORS_FLOOR)


def infonce_loss_keys(z, w, *, tau, labels=None):
    """The authors' InfoNCE (``adv_training/infonce.py``): queries e(x_t^k) against the keys
    e(x_{t+1}^j) of the whole batch, the positive on the diagonal,

        ℓ_k = −log( exp(ẑ_k·ŵ_k/τ) / Σ_j exp(ẑ_k·ŵ_j/τ) ),   mean over the B queries,

    i.e. the other samples' positives are the negatives and the denominator includes the
    positive (``labels``: keys of the same class are dropped). Gradients flow to z and w.
    Reference: :func:`infonce_keys_ref`. z, w: (B, d); returns a 0-dim tensor.
    """
    ids = _pair_args(z, w, labels)
    check_loss_args(z, w, w, tau, 0.0, 0.0, ids, ids)
    return _op.contrastive_loss(z, w, w, tau=tau, tau_plus=0.0, beta=0.0, clamp=False, anchor_labels=ids,
                                candidate_labels=ids, detach_positive=False)
