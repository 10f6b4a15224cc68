"""What the `cdp-fast` command's model, network and data arguments name, turned into objects.

The CLI (:mod:`cdp_fast.cli`) parses flags; this module resolves their values and raises
``ValueError`` with a one-line message (the CLI's exit status 2) when a value names nothing:

- models (``--model``): :func:`load_model_spec` — a bundled name (``digits``), a local
  diffusers folder (:func:`cdp_fast.diffusion.adapters.load_diffusers_unet`), or
  ``module:factory`` (:func:`load_callable_spec`; ``module:attr`` may name a ready nn.Module);
- networks (``--features``, ``--labeler``, ``--classifier``, ``--arch``): :func:`load_network`,
  :func:`load_features`, :func:`load_labeler`, :func:`load_classifier`, :func:`classifier_for_arch`;
  :func:`check_features` (a module:factory feature map must depend on x, finitely);
  ``robustbench:NAME[:dataset[:threat]]`` in ``--features`` / ``--labeler`` / ``--classifier``:
  :func:`cdp_fast.cli.zoo.load_robustbench` (the optional extra ``cdp_fast[robustbench]``);
- data (``--data``, ``--real``, ``--class-labels``, samples, ``--image-shape``):
  :func:`load_train_data`, :func:`load_real_images`, :func:`load_class_labels`,
  :func:`load_samples`, :func:`parse_shape`;
- `cdp-fast inspect` (``--real``, ``--features``, ``--classifier``): :func:`load_real_splits`,
  :func:`load_inspect_features`, :func:`load_independent_classifier`;
- ``--device`` of every subcommand: :func:`check_device`.

Heavy imports (torch, numpy, the models) happen inside the functions, so ``cdp-fast --help``
stays fast.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import cdp_fast.cli.zoo as zoo

__all__ = [
    "import_attr", "load_callable_spec", "load_model_spec", "load_network", "load_features", "load_labeler",
    "load_classifier", "classifier_for_arch", "load_samples", "load_train_data", "load_real_images",
    "load_class_labels", "check_features", "parse_shape", "load_real_splits", "load_inspect_features",
    "load_independent_classifier", "check_device",
]


# ----------------------------------------------------------------------------- devices
def check_device(spec):
    """--device: None (each command's default) or a torch device string that this machine has;
    returned unchanged. ValueError otherwise: a string torch does not parse ("device: 'bogus'
    is not a torch device"), or a CUDA / MPS device without that backend or beyond the CUDA
    device count (torch would fail later, deep in a model's ``.to``, with a traceback)."""
    if spec is None:
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device: {spec!r} is not a torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec!r} requested but torch.cuda.device_count() is "
                             f"{torch.cuda.device_count()}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: mps requested but torch.backends.mps.is_available() is False")
    return spec


# ----------------------------------------------------------------------------- models
def import_attr(spec: str, what: str):
    """The object ``module:attr`` names (``attr`` may be dotted); ``what`` prefixes the errors."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"{what}: {spec!r} is not of the form module:factory")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_callable_spec(spec: str, what: str):
    """``module:factory`` -> factory() (or the attribute itself when it is an nn.Module)."""
    import torch

    obj = import_attr(spec, what)
    if isinstance(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise ValueError(f"{what}: {spec!r} is not callable")
    out = obj()
    if not callable(out):
        raise ValueError(f"{what}: {spec!r} returned {type(out).__name__}, which is not callable")
    return out


def load_model_spec(spec: str, device=None):
    """An ε-model from ``digits`` / a diffusers folder / ``module:factory``.

    Returns (model, info): info holds ``image_shape`` (or None), ``alphas_cumprod`` (or None)
    and, for bundled models, default ``features``, ``labeler``, ``guidance`` and ``sampling``.
    """
    if spec == "digits":
        from cdp_fast.models import digits

        model = digits.load_digits_eps_model(device)
        return model, {"image_shape": digits.IMAGE_SHAPE, "alphas_cumprod": None, "bundled": "digits",
                       "guidance": digits.DIGITS_GUIDANCE, "sampling": digits.DIGITS_SAMPLING}
    p = Path(spec)
    if p.is_dir():
        from cdp_fast.diffusion.adapters import load_diffusers_unet

        model, info = load_diffusers_unet(p)
        return (model.to(device) if device else model), info
    if ":" in spec and not p.exists():
        model = load_callable_spec(spec, "model")
        return (model.to(device) if device and hasattr(model, "to") else model), {"image_shape": None,
                                                                                  "alphas_cumprod": None}
    raise ValueError(f"model: {spec!r} is not a bundled name (digits), an existing diffusers model "
                     "folder, or module:factory")


# ----------------------------------------------------------------------------- networks
def load_network(spec, model_info, device, what, off):
    """A --features / --labeler value: "auto" (the bundled model's, else ``off``), ``off``
    (None), a bundled name (digits) or module:factory."""
    if spec in (None, "auto"):
        spec = model_info.get("bundled") or off
    if spec == off:
        return None
    if spec == "digits":
        from cdp_fast.models import digits

        return getattr(digits, f"digits_{what}")(device)
    if spec.startswith(zoo.ROBUSTBENCH):
        return zoo.load_robustbench(spec, what, device)
    if ":" in spec:
        return load_callable_spec(spec, what)
    raise ValueError(f"{what}: {spec!r} is not auto, {off}, digits, robustbench:NAME or module:factory")


def load_features(spec, model_info, device, feature_input="unit"):
    """--features: the guidance's feature map on [-1, 1] images, or None for pixels.
    --feature-input "raw" rebuilds it with :func:`cdp_fast.models.as_feature_extractor`
    (x_t given to the classifier as it is, the authors' setting): the bundled digits
    classifier, or a module:factory's ``as_feature_extractor(...)``, its ``layer=`` / ``capture=``
    kept (refused for an ``input_range`` other than (0, 1)); any other map is refused."""
    f = load_network(spec, model_info, device, "features", "pixels")
    if feature_input == "unit":
        return f
    from cdp_fast.models import FeatureExtractor, as_feature_extractor

    name = spec if spec not in (None, "auto") else (model_info.get("bundled") or "pixels")
    if f is None:
        raise ValueError(f"feature-input: {feature_input!r} needs a classifier's features; --features {name} "
                         "guides on the pixels")
    if name == "digits":      # digits_features: the bundled classifier behind (x + 1)/2
        return as_feature_extractor(f.classifier, feature_input=feature_input)
    if isinstance(f, FeatureExtractor):
        if f.feature_input == feature_input:
            return f
        if f.input_range != (0.0, 1.0):
            raise ValueError(f"feature-input: {feature_input!r} gives x_t to a [0, 1] classifier as it is (the "
                             f"authors' setting); {name} returned an extractor for a classifier that takes "
                             f"input_range={f.input_range}, to which it does not apply (use --feature-input unit)")
        return as_feature_extractor(f.model, feature_input=feature_input, layer=f.layer, capture=f.capture)
    raise ValueError(f"feature-input: {feature_input!r} needs a classifier wrapped by cdp_fast.models."
                     f"as_feature_extractor; {name} returned {type(f).__name__}, a feature map whose input the CLI "
                     f"cannot change (return as_feature_extractor(clf, feature_input={feature_input!r}) from it)")


def load_labeler(spec, model_info, device):
    """--labeler: a pseudo-labeller on [-1, 1] images, or None."""
    return load_network(spec, model_info, device, "labeler", "none")


def load_classifier(spec, device):
    """A classifier on [0, 1] images (the convention of cdp_fast.label / train / evaluate)."""
    if spec == "digits":
        from cdp_fast.models import digits

        return digits.load_digits_classifier(device)
    if spec and spec.startswith(zoo.ROBUSTBENCH):
        return zoo.load_robustbench(spec, "classifier", device)
    if spec and ":" in spec:
        return load_callable_spec(spec, "classifier")
    raise ValueError(f"classifier: {spec!r} is not digits, robustbench:NAME or module:factory")


def classifier_for_arch(arch, num_classes, trained_digits=False):
    """--arch: a cdp_fast.models name, ``digits`` (the bundled architecture; its shipped
    weights when ``trained_digits``) or module:factory."""
    if arch == "digits":
        from cdp_fast.models import digits

        return digits.load_digits_classifier() if trained_digits else digits.build_classifier()
    if ":" in arch:
        return load_callable_spec(arch, "arch")
    from cdp_fast.models import get_model

    return get_model(arch, num_classes=num_classes)


# ----------------------------------------------------------------------------- data
def load_samples(path):
    """An out folder of `cdp-fast sample` or an npz, as :class:`cdp_fast.data.Samples`."""
    from cdp_fast.data import Samples

    import warnings

    p = Path(path)
    if not p.exists():
        raise ValueError(f"samples: {path} does not exist")
    # a warning (an incomplete run: the finished shards are loaded) is shown only when the load
    # succeeds: a failed load is the error's one line, not a warning + its source line + the error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = Samples.load(p)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    return s


def load_train_data(spec, split):
    """--data: ``digits`` (the bundled split), ``cifar10:FOLDER`` or an npz / out folder.

    Returns (x, y) tensors, except an npz / out folder for ``split="train"``, which is
    returned as its path (train_trades streams it)."""
    if spec == "digits":
        from cdp_fast.models import digits

        return digits.load_digits_data(split)
    if spec.startswith("cifar10:"):
        from cdp_fast.data import load_cifar10

        return load_cifar10(spec[len("cifar10:"):], train=split == "train")
    p = Path(spec)
    if not p.exists():
        raise ValueError(f"data: {spec} is neither 'digits', 'cifar10:FOLDER' nor an existing npz / out folder")
    if split == "test":
        s = load_samples(p)
        if s.labels is None:
            raise ValueError(f"data: {spec} has no labels")
        import torch

        return s.to_tensor(), torch.as_tensor(s.labels, dtype=torch.int64)
    return str(p)


def load_real_images(spec, image_shape):
    """Real images in [-1, 1] for positive/negatives="real": ``digits`` or an npz / out folder."""
    if spec is None:
        return None
    if spec == "digits":
        from cdp_fast.models import digits

        x, _ = digits.load_digits_data("train")
        return digits.to_model_space(x)
    from cdp_fast.data import Samples

    return Samples.load(spec).to_tensor() * 2 - 1


def load_class_labels(spec, num_classes=None):
    """--class-labels: a .npy / labelled .npz file or a comma list of ints -> int64 array (or None).

    Refused (ValueError naming the file or list): labels that are not integers (float labels
    such as 0.9 are never truncated), negative labels, and labels >= ``num_classes`` when the
    model's number of classes is known (before sampling, not an IndexError mid-run)."""
    if spec is None:
        return None
    import numpy as np

    p = Path(spec)
    if p.is_file():
        from cdp_fast.data.samples import integer_labels

        if p.suffix == ".npy":
            labels = integer_labels(np.load(p, allow_pickle=False), f"class-labels: {spec}")
        else:
            from cdp_fast.data import Samples
            from cdp_fast.data.npz import npz_keys, read_member

            key = "label" if "label" in npz_keys(p) else "arr_1"
            if key in npz_keys(p):
                integer_labels(read_member(p, key), f"class-labels: {spec}")   # named by the file, not the member
            s = Samples.load(p)
            if s.labels is None:
                raise ValueError(f"class-labels: {spec} holds no labels")
            labels = np.asarray(s.labels, dtype=np.int64)
    else:
        try:
            labels = np.asarray([int(v) for v in spec.split(",")], dtype=np.int64)
        except ValueError:
            raise ValueError(f"class-labels: {spec!r} is neither a file (.npy / .npz) nor a comma list of "
                             "ints") from None
    if labels.size and labels.min() < 0:
        raise ValueError(f"class-labels: {spec} holds a negative label ({labels.min()}); class labels are >= 0")
    if labels.size and num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"class-labels: {spec} holds label {labels.max()}, out of range for {num_classes} classes "
                         f"(--num-classes / the model's): labels lie in [0, {num_classes})")
    return labels




def check_features(features, image_shape, spec):
    """--features module:factory: one probe forward on 2 random images that require grad (in eval
    mode, no BatchNorm statistic moves); a ValueError naming ``spec`` when the output does not
    depend on the images (the guidance differentiates it with respect to x) or is not finite.
    A probe that raises is left to the library's own probe, which names the cause."""
    import torch

    from cdp_fast.utils.runtime import eval_mode, model_device

    x = torch.randn((2,) + tuple(image_shape), generator=torch.Generator().manual_seed(0))
    x = x.to(model_device(features)).requires_grad_(True)
    try:
        with torch.enable_grad(), eval_mode(features):
            z = features(x)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return
    if not isinstance(z, torch.Tensor):
        return
    if not z.requires_grad:
        raise ValueError(f"features: {spec} returns values that do not depend on the images x (no gradient "
                         "to guide with)")
    if not bool(torch.isfinite(z.detach()).all()):
        raise ValueError(f"features: {spec} returns non-finite values (NaN or inf) on a probe batch")


def parse_shape(text):
    """--image-shape "3,32,32" (or "3x32x32") -> (3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"image-shape: {text!r} is not a comma-separated list of ints, e.g. 3,32,32") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"image-shape: {text!r} must hold positive ints")
    return shape


# ----------------------------------------------------------------------------- cdp-fast inspect
def load_real_splits(spec):
    """inspect --real: ``digits`` (the bundled train / test splits), ``cifar10:FOLDER`` (its
    training batches / test batch) or a labelled npz / out folder (training set only).

    Returns ((x, y) train, (x, y) test or None): x float32 NCHW in [0, 1], y int64."""
    import torch

    if spec == "digits" or spec.startswith("cifar10:"):
        return load_train_data(spec, "train"), load_train_data(spec, "test")
    p = Path(spec)
    if not p.exists():
        raise ValueError(f"real: {spec} is neither 'digits', 'cifar10:FOLDER' nor an existing npz / out folder")
    s = load_samples(p)
    if s.labels is None:
        raise ValueError(f"real: {spec} has no labels")
    return (s.to_tensor(), torch.as_tensor(s.labels, dtype=torch.int64)), None


def load_inspect_features(spec, device=None):
    """inspect --features: ``pca`` (None: the metrics' default, PCA of the real images),
    ``digits`` (the bundled classifier's penultimate layer on [0, 1] images — the guidance's own
    feature space, so not independent of it) or ``module:factory`` (a callable on [0, 1] images
    returning (B, d)). Returns (features or None, description)."""
    if spec in (None, "pca"):
        return None, None
    if spec == "digits":
        from cdp_fast.models import digits

        return (digits.load_digits_classifier(device).features,
                "digits: the bundled classifier's penultimate features (the guidance's own: NOT independent)")
    if spec.startswith(zoo.ROBUSTBENCH):
        return zoo.load_robustbench(spec, "inspect", device), f"{spec} (its penultimate features on [0, 1] images)"
    if ":" in spec:
        return load_callable_spec(spec, "features"), f"{spec} (user features on [0, 1] images)"
    raise ValueError(f"features: {spec!r} is not pca, digits, robustbench:NAME or module:factory")


def load_independent_classifier(spec, real_train, device=None):
    """inspect --classifier: ``auto`` = a multinomial logistic regression on the pixels fitted on
    the real training split (:func:`cdp_fast.demo.digits.fit_independent_classifier`, the demo's
    judge: independent of the guidance's classifier and features), ``none``, ``digits`` (the
    bundled classifier, which labels the bundled model's samples: not independent) or
    ``module:factory`` (on [0, 1] images). Returns (classifier or None, description)."""
    if spec in (None, "auto"):
        from cdp_fast.demo.digits import fit_independent_classifier

        return fit_independent_classifier(real_train)
    if spec == "none":
        return None, None
    if spec == "digits":
        return (load_classifier(spec, device),
                "digits: the bundled classifier (labels the bundled model's samples: NOT independent)")
    if ":" in spec:
        return load_classifier(spec, device), f"{spec} (user classifier on [0, 1] images)"
    raise ValueError(f"classifier: {spec!r} is not auto, none, digits or module:factory")
