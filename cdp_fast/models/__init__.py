"""Classifiers and feature extractors for Contrastive-DP.

- :class:`WideResNet` / :func:`wrn_28_10`: WRN-28-10 with Swish (Gowal et al. 2020/2021;
  the paper's classifier and contrastive feature extractor, App. D); ``features`` is 640-d.
- :class:`PreActResNet` / :func:`preact_resnet18`: PreAct-ResNet-18; ``features`` is 512-d.
- :class:`SmallCNN` / :func:`small_cnn`: a small CNN for 8x8 / 28x28 digits.
- :class:`MnistNet` / :func:`mnist_net`: the authors' four-layer MNIST CNN (28x28; ``features`` is 100-d).
- :func:`load_wrn_checkpoint` / :func:`load_checkpoint_into`: DM-Improves-AT / RobustBench
  checkpoints as published (``model_state_dict``, ``module.0.`` prefixes, ``.safetensors``).

All take images in [0, 1] (NCHW) and normalise inside. The sampler calls its networks on
images in [-1, 1]: :func:`as_feature_extractor` (``.features`` or a named layer's hook) and
:func:`as_labeler` adapt a classifier to it and declare the range; :mod:`.ranges` states the
rule that checks it.

Example::

    from cdp_fast.models import get_model, as_feature_extractor, as_labeler
    clf = get_model("wrn-28-10-swish")            # logits = clf(x01)
    f = as_feature_extractor(clf)                 # f(x_t in [-1, 1]) -> (B, 640)
    lab = as_labeler(clf, input_range=(0, 1))     # lab(x0 in [-1, 1]) -> logits (B, 10)
"""
from __future__ import annotations

import re

from torch import nn

from cdp_fast.models._common import CIFAR10_MEAN, CIFAR10_STD, Normalize
from cdp_fast.models.checkpoints import load_checkpoint_into, load_wrn_checkpoint, published_state_dict
from cdp_fast.models.features import FeatureExtractor, Labeler, as_feature_extractor, as_labeler
from cdp_fast.models.mnist_net import MnistNet, mnist_net
from cdp_fast.models.preact import PreActResNet, preact_resnet18
from cdp_fast.models.small_cnn import SmallCNN, small_cnn
from cdp_fast.models.wrn import WideResNet, wrn_28_10

__all__ = [
    "WideResNet", "wrn_28_10", "PreActResNet", "preact_resnet18", "SmallCNN", "small_cnn", "MnistNet", "mnist_net",
    "Normalize", "CIFAR10_MEAN", "CIFAR10_STD", "get_model", "as_feature_extractor",
    "FeatureExtractor", "MODEL_NAMES", "as_labeler", "Labeler", "load_wrn_checkpoint", "load_checkpoint_into",
    "published_state_dict",
]

MODEL_NAMES = ("wrn-28-10-swish", "wrn-<depth>-<width>[-swish|-relu]", "preact-resnet18",
               "small-cnn", "mnist-net")


def get_model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a classifier by name.

    Names (case-insensitive, "_" = "-"):
      ``wrn-28-10-swish`` (also ``wrn-28-10``, ``wrn``): WRN-28-10, Swish;
      ``wrn-<depth>-<width>[-swish|-relu]``: any WideResNet (Swish when not given);
      ``preact-resnet18`` (also ``preact-resnet-18``, ``preact18``);
      ``small-cnn`` (also ``smallcnn``, ``cnn``);
      ``mnist-net`` (also ``mnistnet``): the authors' four-layer MNIST CNN (28x28 only).
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
    if key in ("mnist-net", "mnistnet"):
        return mnist_net(num_classes=num_classes, **kw)
    raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
