"""Classifiers and feature extractors for Contrastive-DP.

- :class:`WideResNet` / :func:`wrn_28_10`: WRN-28-10 with Swish (Gowal et al. 2020/2021;
  the paper's classifier and contrastive feature extractor, App. D); ``features`` is 640-d.
- :class:`PreActResNet` / :func:`preact_resnet18`: PreAct-ResNet-18; ``features`` is 512-d.
- :class:`SmallCNN` / :func:`small_cnn`: a small CNN for 8x8 / 28x28 digits.

All take images in [0, 1] (NCHW) and normalise inside. :func:`as_feature_extractor` adapts a
classifier to the sampler's guidance, whose images are in [-1, 1].

Example::

    from cdp_fast.models import get_model, as_feature_extractor
    clf = get_model("wrn-28-10-swish")            # logits = clf(x01)
    f = as_feature_extractor(clf)                 # f(x_t in [-1, 1]) -> (B, 640)
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ._common import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .preact import PreActResNet, preact_resnet18
from .small_cnn import SmallCNN, small_cnn
from .wrn import WideResNet, wrn_28_10

__all__ = [
    "WideResNet", "wrn_28_10", "PreActResNet", "preact_resnet18", "SmallCNN", "small_cnn",
    "Normalize", "CIFAR10_MEAN", "CIFAR10_STD", "get_model", "as_feature_extractor",
    "FeatureExtractor", "MODEL_NAMES",
]

MODEL_NAMES = ("wrn-28-10-swish", "wrn-<depth>-<width>[-swish|-relu]", "preact-resnet18",
               "small-cnn")


def get_model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a classifier by name.

    Names (case-insensitive, "_" = "-"):
      ``wrn-28-10-swish`` (also ``wrn-28-10``, ``wrn``): WRN-28-10, Swish;
      ``wrn-<depth>-<width>[-swish|-relu]``: any WideResNet (Swish when not given);
      ``preact-resnet18`` (also ``preact-resnet-18``, ``preact18``);
      ``small-cnn`` (also ``smallcnn``, ``cnn``).
    Extra keyword arguments go to the constructor (``mean``, ``std``, ``in_channels`` ...).
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key == "wrn":
        key = "wrn-28-10-swish"
    m = re.fullmatch(r"wrn-(\d+)-(\d+)(?:-(swish|silu|relu))?", key)
    if m:
        return WideResNet(num_classes=num_classes, depth=int(m.group(1)), width=int(m.group(2)),
                          activation=kw.pop("activation", m.group(3) or "swish"), **kw)
    if key in ("preact-resnet18", "preact-resnet-18", "preact18", "preactresnet18"):
        return preact_resnet18(num_classes=num_classes, **kw)
    if key in ("small-cnn", "smallcnn", "cnn"):
        return small_cnn(num_classes=num_classes, **kw)
    raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")


class FeatureExtractor(nn.Module):
    """Wraps a classifier for contrastive guidance: images in **[-1, 1]** (the sampler's
    space) -> the classifier's penultimate features.

    ``forward(x)``: x (B, C, H, W) in [-1, 1] is mapped to [0, 1] by ``(x + 1) / 2`` and passed
    to ``model.features`` (which applies the model's own mean/std normalisation), giving
    (B, d). No clamping: during sampling x_t (or the x0-prediction) can leave [-1, 1] and a
    clamp would zero the guidance gradient there. Differentiable w.r.t. x.

    The authors' public code instead fed raw x_t in [-1, 1] to a model that normalises as if
    its input were in [0, 1]; the adapter fixes that (DESIGN.md §3).
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
