"""Contrastive losses of Contrastive-DP (§4.2): InfoNCE and hard-negative-mining (HNM).

The public face: argument checks, then the streaming op :mod:`cdp_fast.ops.contrastive`
(Triton kernels on GPU, the chunked PyTorch path on CPU; :func:`cdp_fast.backend.choose`
decides). ``*_ref`` are the dense references (:mod:`cdp_fast.ops.contrastive.reference`),
plain upcast PyTorch that mirrors DESIGN.md §4 line by line.

With L2-normalised embeddings, pos_i = exp(a_i·p_i/τ), neg_ij = exp(a_i·k_j/τ) over the valid
negatives N(i) (candidates ≠ i; of another class when labels are given), N_i = |N(i)|:
HNM (Robinson et al. 2021, eq. (3); the paper's ℓ_HNM), with imp_ij = neg_ij^β,
    Ng_i = max((−τ⁺ N_i pos_i + Σ_j imp_ij·neg_ij / mean_j imp_ij) / (1 − τ⁺), N_i·e^{−1/τ}),
    ℓ_i  = −log(pos_i / (pos_i + Ng_i));
InfoNCE: ℓ_i = −log(pos_i / (pos_i + Σ_j neg_ij)). The log-space derivation is in the
reference's docstring.
The loss is the mean of ℓ_i over the m anchors; an anchor with no valid negative contributes
ℓ_i = 0. Gradients flow to the anchors and the candidates; the positives are detached, as in
Algorithm 1 (x_p is a fixed target for x_t).

Shapes: anchor (m, d), positive (m, d), candidates (N, d) or None, anchor_labels (m,),
candidate_labels (N,); returns a 0-dim tensor in the anchors' dtype.
"""
from __future__ import annotations

from cdp_fast.ops import contrastive as _op
from cdp_fast.ops.contrastive.reference import (check_loss_args, hnm_loss_ref, hnm_rows_ref,
                                                infonce_loss_ref, infonce_rows_ref, negative_mask)

__all__ = [
    "hnm_loss", "infonce_loss", "hnm_loss_ref", "infonce_loss_ref", "hnm_rows_ref", "infonce_rows_ref",
    "check_loss_args", "negative_mask",
]


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
    return _op.hnm_loss(anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta,
                        anchor_labels=anchor_labels, candidate_labels=candidate_labels)


def infonce_loss(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                 candidate_labels=None):
    """InfoNCE loss (van den Oord et al. 2018; the paper's §4.2) with an explicit positive:
    ℓ_i = −log(pos_i / (pos_i + Σ_{j∈N(i)} neg_ij)).

    Args/returns as :func:`hnm_loss` (no τ⁺, β).
    """
    check_loss_args(anchor, positive, candidates, tau, 0.0, 0.0, anchor_labels, candidate_labels)
    return _op.infonce_loss(anchor, positive, candidates, tau=tau, anchor_labels=anchor_labels,
                            candidate_labels=candidate_labels)
