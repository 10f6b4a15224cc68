"""The options of contrastive guidance and their paper defaults: the loss names, the pair
strategies of App. C.1, the loss forms, the online embedding head (App. D.1), and the checks
that name a bad option (shared by :class:`cdp_fast.guidance.ContrastiveGuidance` and
:func:`cdp_fast.sample`)."""
from __future__ import annotations

import math

import torch

from cdp_fast.utils.checks import is_int

__all__ = ["PAPER_DEFAULTS", "LOSSES", "POSITIVES", "NEGATIVES", "FORMS", "EMBEDDINGS", "MLPHead",
           "MLP_WIDTH", "check_options", "resolve_form", "resolve_embedding", "head_width"]

#: Paper defaults (App. D.1: CIFAR-10, WRN-28-10 features, 200 quadratic steps, batch 512;
#: the authors' code: hard_negative_sample.py ``temperature = 10``, ``criterion(..., 0.1, 512,
#: 1.0)``, ``delta.grad*100000``). λ and τ are tied to the feature extractor's scale and the
#: batch size: re-tune them for other features. The authors' InfoNCE code multiplies by 1000
#: where the paper says λ = 2e4; the paper's value is kept.
#:
#: What HNM does at τ = 10: cosine similarities in [−1, 1] give logits s/τ in [−0.1, 0.1], so
#: every exp(s/τ) is within 10% of 1 and the importance weights neg^β are nearly uniform. The
#: HNM gradient is then InfoNCE's (β = 0, τ⁺ = 0) up to the factor 1/(1 − τ⁺): measured on
#: the digits features at sampler states (benchmarks/fidelity.py), cosine 1.0000 and norm
#: ratio 1.10-1.11 for β = 1, τ⁺ = 0.1. Hard-negative mining only reweights once τ is small
#: enough for the similarities to spread the weights (τ ≲ 1).
PAPER_DEFAULTS = {
    "infonce": {"tau": 0.1, "lam": 20_000.0},
    "hnm": {"tau": 10.0, "lam": 100_000.0, "tau_plus": 0.1, "beta": 1.0},
}
LOSSES = ("infonce", "hnm")
POSITIVES = ("previous", "real")
NEGATIVES = ("batch", "real", "class")
FORMS = ("authors", "anchors")
#: the named ``embedding`` values; a positive int h is also one (the head d -> h -> h)
EMBEDDINGS = ("auto", None, "mlp")
#: the width of ``embedding="mlp"``: the authors' CIFAR-10 head, ``EmbeddingModel(640 -> 128 -> 128)``
MLP_WIDTH = 128


def resolve_form(form, negatives):
    """``form=None``: the authors' form, except with a real negative bank (they have none), where
    the anchor form is used. An explicit "authors" with negatives="real" is an error."""
    if form is None:
        return "anchors" if negatives == "real" else "authors"
    if form not in FORMS:
        raise ValueError(f"form must be None, 'authors' or 'anchors', got {form!r}")
    if form == "authors" and negatives == "real":
        raise ValueError("form='authors' has no real-bank variant (the authors' negatives are the batch); "
                         "use form='anchors' with negatives='real'")
    return form


def resolve_embedding(embedding, loss):
    """``embedding="auto"``: the head for HNM (the authors' code trains one for HNM, and Table 5
    has HNM "with embedding" ahead of "without" at 50K and 200K images), none for InfoNCE (the
    authors' InfoNCE code uses the raw features; the paper reports no InfoNCE head)."""
    if embedding == "auto":
        return "mlp" if loss == "hnm" else None
    if is_int(embedding):
        # 128 is the "mlp" head itself: recorded as "mlp", so either spelling resumes the other
        return "mlp" if int(embedding) == MLP_WIDTH else int(embedding)
    return embedding


def head_width(embedding):
    """The online head's width h (d -> h -> h) for a checked ``embedding``: None for no head,
    :data:`MLP_WIDTH` for "mlp", h for an int (the authors' MNIST head: 64,
    ``minimal-diffusion-main/contrastive/contrastive_loss_mnist.py:34``,
    ``EmbeddingModel(input_size=100, output_size=64)``). "auto" must be resolved first."""
    if embedding is None:
        return None
    return MLP_WIDTH if embedding == "mlp" else int(embedding)


class MLPHead(torch.nn.Module):
    """The paper's "with embedding" head (App. D.1; the authors' ``EmbeddingModel``): 2 layers,
    d -> hidden -> out, 128 -> 128 by default (their CIFAR-10 head; their MNIST head is
    64 -> 64); the loss L2-normalises the output, as their head's last line does.

    ``generator``: initialise from it with PyTorch's default Linear rule (weights
    kaiming_uniform(a = √5), i.e. U(±1/√fan_in), biases U(±1/√fan_in)) instead of the global
    RNG, so creating a head neither reads nor disturbs anyone else's random state."""

    def __init__(self, d, hidden=128, out=128, generator=None):
        super().__init__()
        # with a generator the layers are built uninitialised (skip_init), so that the global
        # RNG is not consumed, then initialised from the generator below
        linear = torch.nn.Linear if generator is None else (
            lambda i, o: torch.nn.utils.skip_init(torch.nn.Linear, i, o))
        self.net = torch.nn.Sequential(linear(d, hidden), torch.nn.ReLU(), linear(hidden, out))
        if generator is not None:
            with torch.no_grad():
                for layer in (self.net[0], self.net[2]):
                    torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, z):
        return self.net(z)


def check_options(*, positive="previous", negatives="batch", embedding=None, guide_window=None, form=None):
    """ValueError naming the argument unless the pair strategies, the head and the window are
    valid values (shared by :class:`ContrastiveGuidance` and :func:`cdp_fast.sample`)."""
    if positive not in POSITIVES:
        raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if not ((is_int(embedding) and embedding >= 1) or (not is_int(embedding) and embedding in EMBEDDINGS)):
        raise ValueError("embedding must be 'auto', None, 'mlp' (the 128-wide head) or a positive int h (the "
                         f"head d -> h -> h), got {embedding!r}")
    resolve_form(form, negatives)
    if guide_window is not None and not (
            isinstance(guide_window, (tuple, list)) and len(guide_window) == 2
            and all(isinstance(v, (int, float)) for v in guide_window)
            and guide_window[0] <= guide_window[1]):
        raise ValueError(f"guide_window must be (t_lo, t_hi) with t_lo <= t_hi, got {guide_window!r}")
