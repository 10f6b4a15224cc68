"""A classifier as the guidance's feature map: :func:`as_feature_extractor` takes a
:mod:`cdp_fast.models` classifier (images in [0, 1], a ``.features`` method) and gives
f(x) (B, d) on the sampler's [-1, 1] images — mapped to [0, 1] first (``feature_input="unit"``,
the default) or passed as they are (``"raw"``, what the authors' code did)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureExtractor", "as_feature_extractor", "FEATURE_INPUTS"]

#: what :class:`FeatureExtractor` gives ``model.features``: "unit" (x + 1)/2, "raw" x itself
FEATURE_INPUTS = ("unit", "raw")


class FeatureExtractor(nn.Module):
    """Wraps a classifier for contrastive guidance: images in **[-1, 1]** (the sampler's
    space) -> the classifier's penultimate features.

    ``forward(x)``: x (B, C, H, W) in [-1, 1] is mapped to [0, 1] by ``(x + 1) / 2``
    (``feature_input="unit"``, the default) and passed to ``model.features`` (which applies
    the model's own mean/std normalisation), giving (B, d). No clamping: during sampling x_t
    (or the x0-prediction) can leave [-1, 1] and a clamp would zero the guidance gradient
    there. Differentiable w.r.t. x.

    ``feature_input="raw"`` passes x_t as it is: the authors' setting (their MNIST code calls
    ``model(x+delta)`` on the sampler's x_t, ``minimal-diffusion-main/contrastive/
    contrastive_loss_mnist.py:41``; the CIFAR-10 code does the same), a deviation from the
    classifier's [0, 1] input range — its normalisation then sees values it was not trained
    on. Offered to reproduce their runs; "unit" is what the classifier expects (docs/design.md §3).
    """

    def __init__(self, model: nn.Module, *, feature_input: str = "unit"):
        super().__init__()
        if not hasattr(model, "features") or not callable(model.features):
            raise ValueError("model must have a callable .features(x) method "
                             "(a cdp_fast.models classifier)")
        if not isinstance(feature_input, str) or feature_input not in FEATURE_INPUTS:
            raise ValueError(f"feature_input must be 'unit' (x in [-1, 1] mapped to [0, 1]) or 'raw' (x as it is, "
                             f"the authors' setting), got {feature_input!r}")
        self.model = model
        self._feature_input = feature_input

    @property
    def feature_input(self) -> str:
        """"unit" or "raw"; read-only (a prepared copy of this module is cached by its weights)."""
        return self._feature_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_input == "raw":
            return self.model.features(x)
        return self.model.features((x + 1.0) * 0.5)

    def extra_repr(self) -> str:
        return f"feature_input={self.feature_input!r}"

    def fingerprint_settings(self):
        """What the run depends on beyond the weights (a resumed ``sample(out=...)`` compares it,
        :func:`cdp_fast.sampling.fingerprints.fingerprint`): None for "unit", so the
        fingerprints recorded before the option existed are unchanged."""
        return None if self.feature_input == "unit" else {"feature_input": self.feature_input}


def as_feature_extractor(model: nn.Module, *, feature_input: str = "unit") -> FeatureExtractor:
    """Feature extractor for guidance: takes images in [-1, 1] (sampler space), converts them
    to [0, 1] (``feature_input="unit"``; ``"raw"``: as they are, the authors' setting) and
    returns ``model.features`` of them, shape (B, d). See :class:`FeatureExtractor`.
    """
    return FeatureExtractor(model, feature_input=feature_input)
