"""Adapters for networks written elsewhere, so every sampler and every guidance term accepts
them (as k-diffusion's ``external.py``):

- :func:`call_model` / :class:`EpsModel`: any ε-model — ``model(x, t)``, ``model(x, t, y)``
  (class-conditional), outputs with ``.sample`` (diffusers ``UNet2DOutput``) or tuples — as a
  plain ``eps(x, t, y=None) -> Tensor`` (unwrapped once, here and nowhere else);
- :class:`FeatureExtractor` / :func:`as_feature_extractor`: a classifier on [0, 1] images as the
  guidance's feature map on the sampler's [-1, 1] images;
- :func:`load_diffusers_unet`: a local diffusers ``UNet2DModel`` folder (and its scheduler's ᾱ).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["call_model", "unwrap_output", "EpsModel", "as_eps_model", "FeatureExtractor", "as_feature_extractor",
           "load_diffusers_unet"]


def unwrap_output(out):
    """The ε tensor of a model output: ``.sample`` (diffusers), the first of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def call_model(model, x, t, y=None):
    """ε-prediction of any model: ``model(x, t)`` or ``model(x, t, y)``; an output with a
    ``.sample`` attribute (diffusers ``UNet2DOutput``) or a tuple is unwrapped.

    Shapes: x (B, *shape), t (B,) long, y (B,) long or None -> (B, *shape)."""
    return unwrap_output(model(x, t) if y is None else model(x, t, y))


class EpsModel:
    """``model`` as a function ``(x, t, y=None) -> ε`` that always returns a tensor: the one
    place a model output is unwrapped (:meth:`forward`), and what the sampler compiles.

    ``module`` is the nn.Module behind it (None for plain callables). :meth:`with_runner`
    returns the same adapter running another implementation of :meth:`forward` (e.g. a
    compiled one), so a compiled call returns the unwrapped tensor and nothing unwraps twice.
    """

    def __init__(self, model, run=None):
        self.model = model
        self.module = model if isinstance(model, nn.Module) else None
        self._run = run if run is not None else self.forward

    def forward(self, x, t, y=None):
        """x (B, *shape), t (B,) long, y (B,) long or None -> ε (B, *shape)."""
        return call_model(self.model, x, t, y)

    def with_runner(self, run) -> "EpsModel":
        """This adapter, with ``run(x, t, y)`` (e.g. ``torch.compile(self.forward)``) called."""
        return EpsModel(self.model, run)

    def __call__(self, x, t, y=None):
        return self._run(x, t, y)


def as_eps_model(model) -> EpsModel:
    """``model`` as an :class:`EpsModel` (an EpsModel is returned as it is)."""
    return model if isinstance(model, EpsModel) else EpsModel(model)


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


def load_diffusers_unet(path):
    """A local diffusers ``UNet2DModel`` folder, or a pipeline folder with ``unet/`` (and
    ``scheduler/``), loaded with ``local_files_only=True``.

    Returns (model, info): info holds ``image_shape`` (C, H, W), ``alphas_cumprod`` (the
    folder's DDIM scheduler's ᾱ, or None without ``scheduler/``) and ``num_classes`` (the
    config's ``num_class_embeds``, or None)."""
    try:
        from diffusers import DDIMScheduler, UNet2DModel
    except ImportError as e:
        raise ImportError("loading a diffusers model folder needs diffusers: "
                          "pip install 'cdp_fast[diffusers]'") from e
    path = Path(path)
    sub = "unet" if (path / "unet").is_dir() else None
    model = UNet2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    info = {"image_shape": (cfg.in_channels, *hw), "alphas_cumprod": None,
            "num_classes": getattr(cfg, "num_class_embeds", None)}
    if (path / "scheduler").is_dir():
        sched = DDIMScheduler.from_pretrained(str(path), subfolder="scheduler", local_files_only=True)
        info["alphas_cumprod"] = sched.alphas_cumprod
    return model, info
