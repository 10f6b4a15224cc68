"""Which image range a network takes, and the check every caller runs before it calls one.

Two conventions meet in this package: the sampler's networks (``cdp_fast.sample``'s
``features`` and ``labeler``) are called on images in **[-1, 1]** (the diffusion model's
space), while classifiers — this package's, RobustBench's, DM-Improves-AT's, torchvision's —
and everything that feeds them (``evaluate``, ``train_trades`` / ``train_pgd_at``,
``pseudo_label``, ``select``) work on **[0, 1]**. A network given to the wrong side computes
on the wrong values without any error (issue 23, F1).

The rule (:func:`check_range_contract`), which decides from what a network *declares*, never
from what it outputs:

1. A network **declares** the range it takes with an ``accepts_range = (lo, hi)`` attribute
   (:func:`cdp_fast.models.as_labeler` and :func:`cdp_fast.models.as_feature_extractor`
   declare (-1, 1)); the package's own networks are known by class (:func:`accepted_range`:
   the classifiers (0, 1), ``digits_features()`` / ``digits_labeler()`` (-1, 1)). A declared
   range other than the one the caller passes is a ValueError naming the adapter to use. The
   adapters run it too, on the model they wrap against their ``input_range``.
2. The sampler also **warns** about an ``nn.Module`` that declares nothing: most published
   classifiers take [0, 1], and nothing in a module says which range it was trained on. The
   warning is a reminder, not a finding: it fires for a module that is right, and it cannot
   fire for a plain function (which is taken as written for the sampler's [-1, 1]). Wrap the
   module with ``as_labeler(m, input_range=...)`` / ``as_feature_extractor(m, ...)`` (with
   ``input_range=(-1, 1)`` for a network that does take [-1, 1]) to state the range and
   silence it. The [0, 1] side does not warn: [0, 1] is the classifiers' common convention.

No probe of outputs is used: a classifier's outputs on [0, 1] and [-1, 1] versions of the same
batch can differ a lot or hardly at all whether or not the range is right, so such a test
proves nothing either way.
"""
from __future__ import annotations

import math
import warnings

from torch import nn

__all__ = ["SAMPLER_RANGE", "UNIT_RANGE", "accepted_range", "check_range", "check_range_contract"]

#: the images ``cdp_fast.sample`` gives its ``features`` and ``labeler``
SAMPLER_RANGE = (-1.0, 1.0)
#: the images ``evaluate`` / ``train_*`` / ``pseudo_label`` / ``select`` give a classifier
UNIT_RANGE = (0.0, 1.0)


def check_range(input_range, name: str = "input_range") -> tuple:
    """``input_range`` as a (lo, hi) tuple of floats, lo < hi finite, or a ValueError naming ``name``."""
    try:
        if isinstance(input_range, (str, bytes)):
            raise TypeError
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) such as (0, 1) or (-1, 1), got {input_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be a pair (lo, hi) of finite numbers with lo < hi, got {input_range!r}")
    return (lo, hi)


def _known():
    """The package's networks whose range their docstrings state (imported when first needed)."""
    from cdp_fast.models.digits import DigitsClassifier, DigitsFeatures, DigitsLabeler
    from cdp_fast.models.mnist_net import MnistNet
    from cdp_fast.models.preact import PreActResNet
    from cdp_fast.models.small_cnn import SmallCNN
    from cdp_fast.models.wrn import WideResNet

    return (((WideResNet, PreActResNet, SmallCNN, MnistNet, DigitsClassifier), UNIT_RANGE),
            ((DigitsFeatures, DigitsLabeler), SAMPLER_RANGE))


def accepted_range(fn):
    """The (lo, hi) range of images ``fn`` declares it takes (its ``accepts_range``
    attribute; for the package's own networks, their documented range), or None when it
    declares none."""
    declared = getattr(fn, "accepts_range", None)
    if declared is not None:
        return check_range(declared, f"{type(fn).__name__}.accepts_range")
    if isinstance(fn, nn.Module):
        for classes, rng in _known():
            if isinstance(fn, classes):
                return rng
    return None


def _fmt(r) -> str:
    return f"[{r[0]:g}, {r[1]:g}]"


def check_range_contract(fn, passes, what: str, fix: str, *, warn_undeclared: bool = False,
                         stacklevel: int = 2) -> None:
    """The rule of this module for a network ``fn`` that a caller will call on images in the
    range ``passes``: a ValueError when ``fn`` declares another range (naming ``what``, the
    two ranges and ``fix``); with ``warn_undeclared``, a UserWarning for an ``nn.Module``
    that declares none. ``fn`` None is allowed (nothing to call)."""
    if fn is None:
        return
    passes = check_range(passes, "passes")
    got = accepted_range(fn)
    if got is not None and got != passes:
        raise ValueError(f"{what}: {type(fn).__name__} takes images in {_fmt(got)}, but is called on images in "
                         f"{_fmt(passes)}; {fix}")
    if got is None and warn_undeclared and isinstance(fn, nn.Module):
        warnings.warn(f"{what}: {type(fn).__name__} does not declare the range of images it takes; it will be "
                      f"called on images in {_fmt(passes)}. A classifier trained on [0, 1] images (RobustBench, "
                      f"DM-Improves-AT, torchvision) gives wrong outputs there: {fix}. (This warning cannot tell "
                      "what the module expects; a module that does take these images can say so with an "
                      "accepts_range attribute.)", UserWarning, stacklevel=stacklevel + 1)
