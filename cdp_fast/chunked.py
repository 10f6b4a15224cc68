"""Deprecated home of the chunked contrastive op: kept so code written against cdp_fast ≤ 0.1's
layout keeps importing. The op lives in :mod:`cdp_fast.ops.contrastive` (the streamed CPU path in
:mod:`cdp_fast.ops.contrastive.chunked`); the names below keep their old signatures and values.

``chunk`` (candidates per block) is still honoured where the old signature had it: it changes
memory and speed, never the value.
"""
import math
import warnings

from .ops import contrastive as _op
from .ops.contrastive import chunked as _chunked
from .ops.contrastive import rows_from_stats  # noqa: F401  (same signature; new keywords optional)
from .ops.contrastive.chunked import default_chunk  # noqa: F401

warnings.warn("cdp_fast.chunked is deprecated: import from cdp_fast.ops.contrastive",
              DeprecationWarning, stacklevel=2)

__all__ = ["lse_stats_forward", "lse_stats_backward", "rows_from_stats", "contrastive_loss_chunked",
           "hnm_loss_chunked", "infonce_loss_chunked", "default_chunk"]


def lse_stats_forward(a, k, a_labels, k_labels, inv_tau: float, beta: float, in_batch: bool,
                      chunk=None):
    """The old signature of :func:`cdp_fast.ops.contrastive.chunked.lse_stats_forward` (no floor)."""
    return _chunked.lse_stats_forward(a, k, a_labels, k_labels, inv_tau, beta, in_batch,
                                      -math.inf, chunk)


def lse_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau: float, beta: float,
                       in_batch: bool, chunk=None):
    """The old signature of :func:`cdp_fast.ops.contrastive.chunked.lse_stats_backward`."""
    return _chunked.lse_stats_backward(a, k, a_labels, k_labels, L1, L0, dL1, dL0, inv_tau, beta,
                                       in_batch, -math.inf, chunk)


def contrastive_loss_chunked(anchor, positive, candidates=None, *, tau, tau_plus=0.0, beta=0.0,
                             clamp=True, anchor_labels=None, candidate_labels=None, chunk=None):
    """:func:`cdp_fast.ops.contrastive.contrastive_loss` on the streamed CPU path (``impl="torch"``);
    ``chunk`` is accepted for the old signature (the block size is :func:`default_chunk`'s)."""
    return _op.contrastive_loss(anchor, positive, candidates, tau=tau, tau_plus=tau_plus, beta=beta,
                                clamp=clamp, anchor_labels=anchor_labels,
                                candidate_labels=candidate_labels, impl="torch")


def hnm_loss_chunked(anchor, positive, candidates=None, *, tau, tau_plus=0.1, beta=1.0,
                     anchor_labels=None, candidate_labels=None, chunk=None):
    """ℓ_HNM of Algorithm 1 (:func:`cdp_fast.losses.hnm_loss_ref`'s value), streamed."""
    return contrastive_loss_chunked(anchor, positive, candidates, tau=tau, tau_plus=tau_plus,
                                    beta=beta, clamp=True, anchor_labels=anchor_labels,
                                    candidate_labels=candidate_labels)


def infonce_loss_chunked(anchor, positive, candidates=None, *, tau, anchor_labels=None,
                         candidate_labels=None, chunk=None):
    """InfoNCE of Algorithm 1 (:func:`cdp_fast.losses.infonce_loss_ref`'s value), streamed."""
    return contrastive_loss_chunked(anchor, positive, candidates, tau=tau, tau_plus=0.0, beta=0.0,
                                    clamp=False, anchor_labels=anchor_labels,
                                    candidate_labels=candidate_labels)
