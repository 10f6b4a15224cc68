"""Classifiers as the sampler's networks, with the input range stated (docs: :mod:`.ranges`).

``cdp_fast.sample`` calls its ``features`` on x_t and its ``labeler`` on x̂₀, both in the
diffusion model's **[-1, 1]**; classifiers take their own range, usually [0, 1]. The two
adapters map one to the other and declare ``accepts_range = (-1, 1)``:

- :func:`as_labeler` (``model, input_range=(0, 1)``): x in [-1, 1] -> ``model`` of x mapped
  to ``input_range`` -> logits (B, K);
- :func:`as_feature_extractor` (``model, layer=None``): x in [-1, 1] -> (B, d), the model's
  ``.features`` (this package's classifiers), or the output (or input) of a named submodule
  through a forward hook — for networks without ``.features`` (RobustBench's
  ``DMWideResNet``: ``layer="logits", capture="input"``; timm: ``"head.fc"`` / ``"fc"``).

Both run the rule of :mod:`.ranges` on the model they wrap: one that declares a range
(``accepts_range``, or one of the package's networks) other than ``input_range`` is a
ValueError naming both — ``as_labeler(digits_labeler())`` (it takes [-1, 1]) or
``as_labeler(small_cnn(), input_range=(-1, 1))`` (it takes [0, 1]). ``feature_input="raw"``
calls the model on x_t itself: allowed for a model declaring [-1, 1] or [0, 1] (the authors'
deviation it exists for), refused for any other declared range.
"""
from __future__ import annotations

import torch
from torch import nn

from cdp_fast.models.ranges import SAMPLER_RANGE, UNIT_RANGE, accepted_range, check_range

__all__ = ["FeatureExtractor", "Labeler", "as_feature_extractor", "as_labeler", "FEATURE_INPUTS", "CAPTURES"]

#: what :class:`FeatureExtractor` gives the classifier: "unit" x mapped to ``input_range``, "raw" x itself
FEATURE_INPUTS = ("unit", "raw")
#: what a ``layer=`` hook returns: the named module's output, or its first positional input
CAPTURES = ("output", "input")


def to_range(x: torch.Tensor, input_range) -> torch.Tensor:
    """x in [-1, 1] mapped affinely onto ``input_range`` = (lo, hi): lo + (x + 1)(hi − lo)/2.
    (0, 1) is ``(x + 1) * 0.5`` and (-1, 1) x itself, bit for bit. No clamping: x_t leaves
    [-1, 1] during sampling, and a clamp would zero the guidance gradient there."""
    lo, hi = input_range
    if (lo, hi) == SAMPLER_RANGE:
        return x
    if (lo, hi) == UNIT_RANGE:
        return (x + 1.0) * 0.5
    return lo + (x + 1.0) * (0.5 * (hi - lo))


class _Capture:
    """The forward hook of a ``layer=`` extractor: records the module's output (or first input)
    only while its own extractor runs (``active``), so the hooked model behaves as before
    everywhere else (also when it is the labeller or is evaluated)."""

    def __init__(self, capture: str):
        self.capture, self.active, self.value = capture, False, None

    def __call__(self, module, args, output):
        if self.active:
            self.value = (args[0] if args else None) if self.capture == "input" else output


def _check_declared(model, fed, adapter: str, fix: str | None = None) -> None:
    """The rule of :mod:`.ranges` inside an adapter: a ValueError when ``model`` declares
    (:func:`~cdp_fast.models.ranges.accepted_range`) a range other than ``fed``, the range the
    adapter will call it on, naming both ranges and the fix."""
    got = accepted_range(model)
    if got is None or got == fed:
        return
    fix = fix or f"pass input_range=({got[0]:g}, {got[1]:g}), the range it declares"
    if got == SAMPLER_RANGE:
        fix += (" (a network that already takes the sampler's [-1, 1], e.g. digits_labeler() / digits_features(), "
                "can also be given to cdp_fast.sample as it is)")
    raise ValueError(f"{adapter}: {type(model).__name__} takes images in [{got[0]:g}, {got[1]:g}] (it declares so), "
                     f"but would be called on images in [{fed[0]:g}, {fed[1]:g}]; {fix}")


def _module_named(model: nn.Module, layer: str) -> nn.Module:
    """``model``'s submodule ``layer``, or a ValueError listing the names there are."""
    modules = dict(model.named_modules())
    if isinstance(layer, str) and layer and layer in modules:
        return modules[layer]
    names = [n for n in modules if n]
    top = [n for n, _ in model.named_children()]
    shown = names if len(names) <= 40 else top + ["..."] + names[-8:]
    raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}; its modules ({len(names)} in "
                     f"all, model.named_modules()): {', '.join(shown)}. For the penultimate features name the "
                     "final linear layer with capture='input' (e.g. 'logits' for a DM/RobustBench WRN, 'fc' or "
                     "'head.fc' for torchvision / timm)")


class FeatureExtractor(nn.Module):
    """A classifier as contrastive guidance's feature map: images in **[-1, 1]** (the
    sampler's space) -> (B, d). Declares ``accepts_range = (-1, 1)``.

    ``forward(x)``: x (B, C, H, W) in [-1, 1] is mapped onto ``input_range`` (default (0, 1):
    ``(x + 1) / 2``; :func:`to_range`) — ``feature_input="unit"``, the default — and given to
    ``model.features`` (``layer=None``), or to ``model`` itself with the output (``capture=
    "output"``) or first input (``"input"``) of ``model``'s submodule ``layer`` recorded by a
    forward hook and flattened to (B, d). The hook is registered on ``model`` once and records
    only during this extractor's forward; the rest of ``model`` still runs (its cost is paid).
    No clamping: during sampling x_t can leave [-1, 1] and a clamp would zero the guidance
    gradient there. Differentiable w.r.t. x.

    ``feature_input="raw"`` passes x_t as it is: the authors' setting (their MNIST code calls
    ``model(x+delta)`` on the sampler's x_t, ``minimal-diffusion-main/contrastive/
    contrastive_loss_mnist.py:41``; the CIFAR-10 code does the same), a deviation from the
    classifier's [0, 1] input range — its normalisation then sees values it was not trained
    on. Offered to reproduce their runs; "unit" is what the classifier expects (docs/design.md §3).

    A ``model`` that declares its range (:func:`cdp_fast.models.ranges.accepted_range`) must
    declare ``input_range`` ("unit"), or [-1, 1] / [0, 1] ("raw"): otherwise a ValueError.
    """

    accepts_range = SAMPLER_RANGE

    def __init__(self, model: nn.Module, *, feature_input: str = "unit", layer=None, capture: str = "output",
                 input_range=UNIT_RANGE):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(feature_input, str) or feature_input not in FEATURE_INPUTS:
            raise ValueError(f"feature_input must be 'unit' (x in [-1, 1] mapped to input_range) or 'raw' (x as "
                             f"it is, the authors' setting), got {feature_input!r}")
        self._input_range = check_range(input_range)
        if feature_input == "raw" and self._input_range != UNIT_RANGE:
            raise ValueError("input_range: feature_input='raw' passes x as it is; input_range does not apply")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
        # the range the model will be called on: input_range ("unit"), or x_t itself ("raw"; made for
        # the authors' [0, 1] classifiers, so a declared [0, 1] is the deviation asked for, not an error)
        if feature_input == "unit":
            _check_declared(model, self._input_range, "as_feature_extractor")
        elif accepted_range(model) not in (None, UNIT_RANGE, SAMPLER_RANGE):
            r = accepted_range(model)
            _check_declared(model, SAMPLER_RANGE, "as_feature_extractor(feature_input='raw')",
                            f"'raw' exists for [0, 1] classifiers (the authors' setting); use feature_input='unit', "
                            f"input_range=({r[0]:g}, {r[1]:g})")
        self.model, self._feature_input, self._layer, self._capture = model, feature_input, layer, None
        if layer is None:
            if not callable(getattr(model, "features", None)):
                raise ValueError(f"{type(model).__name__} has no .features(x) method: name the layer whose output "
                                 "(or input) is the feature vector, as_feature_extractor(model, layer='logits', "
                                 "capture='input') for a DM/RobustBench WRN")
            if capture != "output":
                raise ValueError("capture: applies to a layer= hook only")
        else:
            self._capture = _Capture(capture)
            _module_named(model, layer).register_forward_hook(self._capture)

    @property
    def feature_input(self) -> str:
        """"unit" or "raw"; read-only (a prepared copy of this module is cached by its weights)."""
        return self._feature_input

    @property
    def input_range(self) -> tuple:
        """The (lo, hi) range the wrapped classifier takes (read-only)."""
        return self._input_range

    @property
    def layer(self):
        """The hooked submodule's name, or None for ``model.features`` (read-only)."""
        return self._layer

    @property
    def capture(self) -> str:
        """What the ``layer=`` hook records, "output" or "input" ("output" without a layer; read-only)."""
        return "output" if self._capture is None else self._capture.capture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x if self.feature_input == "raw" else to_range(x, self._input_range)
        if self._capture is None:
            return self.model.features(xin)
        cap = self._capture
        cap.active, cap.value = True, None
        try:
            self.model(xin)
        finally:
            cap.active = False
        z, cap.value = cap.value, None
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"layer {self._layer!r} of {type(self.model).__name__} "
                             + ("did not run in its forward" if z is None else
                                f"gave a {type(z).__name__}, not a tensor") + " (as_feature_extractor(layer=...))")
        return z.flatten(1)

    def extra_repr(self) -> str:
        return f"feature_input={self.feature_input!r}, layer={self._layer!r}, input_range={self._input_range}"

    def fingerprint_settings(self):
        """What the run depends on beyond the weights (a resumed ``sample(out=...)`` compares it,
        :func:`cdp_fast.sampling.fingerprints.fingerprint`): None at the defaults, so the
        fingerprints recorded before the options existed are unchanged."""
        s = {}
        if self.feature_input != "unit":
            s["feature_input"] = self.feature_input
        if self._layer is not None:
            s.update(layer=self._layer, capture=self._capture.capture)
        if self._input_range != UNIT_RANGE:
            s["input_range"] = list(self._input_range)
        return s or None


class Labeler(nn.Module):
    """A classifier as the sampler's labeller: x (B, C, H, W) in **[-1, 1]** (the x̂₀ that
    ``cdp_fast.sample`` labels) -> ``model(to_range(x, input_range))``, logits (B, K).
    Declares ``accepts_range = (-1, 1)``; the wrapped model's range is ``input_range`` — a
    model that declares another (:func:`cdp_fast.models.ranges.accepted_range`) is a ValueError."""

    accepts_range = SAMPLER_RANGE

    def __init__(self, model: nn.Module, *, input_range=UNIT_RANGE):
        super().__init__()
        if not isinstance(model, nn.Module) and not callable(model):
            raise ValueError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
        self.model, self._input_range = model, check_range(input_range)
        _check_declared(model, self._input_range, "as_labeler")

    @property
    def input_range(self) -> tuple:
        """The (lo, hi) range the wrapped classifier takes (read-only)."""
        return self._input_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(to_range(x, self._input_range))

    def extra_repr(self) -> str:
        return f"input_range={self._input_range}"

    def fingerprint_settings(self):
        """The wrapped model's range (it changes what the labeller computes)."""
        return {"input_range": list(self._input_range)}


def as_labeler(model, input_range=UNIT_RANGE) -> Labeler:
    """A classifier taking images in ``input_range`` (default (0, 1): this package's,
    RobustBench's and DM-Improves-AT's models; (-1, 1) for one trained on [-1, 1]) as
    ``cdp_fast.sample``'s ``labeler``, which is called on x̂₀ in [-1, 1]: x (B, C, H, W) in
    [-1, 1] -> logits (B, K) of ``model`` on x mapped onto ``input_range``. See :class:`Labeler`.

    Example::

        clf = cdp_fast.models.get_model("wrn-28-10")       # takes [0, 1]
        s = cdp_fast.sample(unet, n, features=..., labeler=as_labeler(clf, input_range=(0, 1)))
    """
    return Labeler(model, input_range=input_range)


def as_feature_extractor(model: nn.Module, *, feature_input: str = "unit", layer=None, capture: str = "output",
                         input_range=UNIT_RANGE) -> FeatureExtractor:
    """Feature extractor for guidance: takes images in [-1, 1] (sampler space), maps them onto
    the classifier's ``input_range`` (default (0, 1); ``feature_input="raw"``: as they are,
    the authors' setting) and returns (B, d): ``model.features`` of them, or with ``layer=``
    the output (``capture="output"``) or input (``"input"``) of that named submodule,
    flattened. A wrong ``layer`` is a ValueError listing the module names. See
    :class:`FeatureExtractor`.

    Example (RobustBench's ``DMWideResNet`` has no ``.features``; its 640-d penultimate
    vector is the input of ``logits``)::

        f = as_feature_extractor(dm_wrn, layer="logits", capture="input")   # (B, 640)
    """
    return FeatureExtractor(model, feature_input=feature_input, layer=layer, capture=capture,
                            input_range=input_range)
