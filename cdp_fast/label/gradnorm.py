"""Per-sample gradient norms of a classifier's loss (the "grad_norm" and "robust_grad_norm"
selection criteria of :mod:`cdp_fast.label.selection`), with ``torch.func``, and the seeded
generator of the TRADES attack those scores use."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["per_sample_grad_norm", "attack_generator"]


def per_sample_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         x_adv: Optional[torch.Tensor] = None, beta: float = 6.0,
                         chunk_size: Optional[int] = 16) -> torch.Tensor:
    """‖∇_θ ℓ_i‖₂ for every sample, with ``torch.func`` (vmap of grad of functional_call).

    ℓ_i = CE(f_θ(x_i), y_i), or with ``x_adv`` the per-sample TRADES loss
    CE(f_θ(x_i), y_i) + β·KL(p_θ(x_i) ‖ p_θ(x_adv_i)) (x_adv held fixed). The model is
    called with its current mode (use eval mode so BatchNorm uses running statistics).
    The gradient is over the parameters with ``requires_grad``; a model with none (a frozen
    classifier, e.g. the bundled digits one) is taken over all its parameters.
    Shapes: x (B, C, H, W), y (B,), x_adv like x -> (B,) float32.
    """
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    if not named:
        raise ValueError("per_sample_grad_norm: the model has no parameters")
    trainable = {k for k, v in named.items() if v.requires_grad}
    wrt = trainable or set(named)        # a frozen classifier: all its parameters
    params = {k: v.detach() for k, v in named.items() if k in wrt}
    frozen = {k: v.detach() for k, v in named.items() if k not in wrt}
    buffers = {k: v for k, v in model.named_buffers()}

    def logits_of(p, xi):
        return functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),)).float()

    def ce(p, xi, yi):
        return F.cross_entropy(logits_of(p, xi), yi.unsqueeze(0))

    def trades(p, xi, yi, xai):
        ln = logits_of(p, xi)
        la = logits_of(p, xai)
        kl = F.kl_div(F.log_softmax(la, dim=1), F.softmax(ln, dim=1), reduction="sum")
        return F.cross_entropy(ln, yi.unsqueeze(0)) + beta * kl

    if x_adv is None:
        g = vmap(grad(ce), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    else:
        g = vmap(grad(trades), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, x, y, x_adv)
    sq = sum(v.reshape(v.shape[0], -1).float().pow(2).sum(1) for v in g.values())
    return sq.sqrt()



def attack_generator(seed: int, batch_index: int, device) -> torch.Generator:
    """Generator of the TRADES attack start for batch ``batch_index`` of "robust_grad_norm"
    (seeded by (seed, batch_index); the start is x + 0.001·N(0, I), so the batch size only
    moves the scores at that scale)."""
    s = int(np.random.SeedSequence([int(seed), 11, int(batch_index)]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(s)
