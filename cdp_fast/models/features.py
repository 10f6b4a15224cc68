"""A classifier as the guidance's feature map: :func:`as_feature_extractor` takes a
:mod:`cdp_fast.models` classifier (images in [0, 1], a ``.features`` method) and gives
f(x) (B, d) on the sampler's [-1, 1] images."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureExtractor", "as_feature_extractor"]


class FeatureExtractor(nn.Module):
    """Wraps a classifier for contrastive guidance: images in **[-1, 1]** (the sampler's
    space) -> the classifier's penultimate features.

    ``forward(x)``: x (B, C, H, W) in [-1, 1] is mapped to [0, 1] by ``(x + 1) / 2`` and passed
    to ``model.features`` (which applies the model's own mean/std normalisation), giving
    (B, d). No clamping: during sampling x_t (or the x0-prediction) can leave [-1, 1] and a
    clamp would zero the guidance gradient there. Differentiable w.r.t. x.

    The authors' public code instead fed raw x_t in [-1, 1] to a model that normalises as if
    its input were in [0, 1]; the adapter fixes that (docs/design.md §3).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "features") or not callable(model.features):
            raise ValueError("model must have a callable .features(x) method "
                             "(a cdp_fast.models classifier)")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features((x + 1.0) * 0.5)


def as_feature_extractor(model: nn.Module) -> FeatureExtractor:
    """Feature extractor for guidance: takes images in [-1, 1] (sampler space), converts them
    to [0, 1] and returns ``model.features`` of them, shape (B, d). See :class:`FeatureExtractor`.
    """
    return FeatureExtractor(model)
