"""RobustBench's model zoo in the CLI's network flags: ``robustbench:NAME[:dataset[:threat]]`` in
``--features`` / ``--labeler`` / ``--classifier`` (:mod:`cdp_fast.cli.specs` dispatches here).

RobustBench (the optional extra ``cdp_fast[robustbench]``) is imported only when such a spec
is given; without it the spec is a one-line error naming the extra (exit status 2).
"""
from __future__ import annotations

__all__ = ["ROBUSTBENCH", "ROBUSTBENCH_DIR_ENV", "parse_robustbench_spec", "load_robustbench"]

ROBUSTBENCH = "robustbench:"
#: RobustBench's model folder (``load_model(model_dir=...)``, its default ``./models``)
ROBUSTBENCH_DIR_ENV = "CDP_FAST_ROBUSTBENCH_DIR"


def parse_robustbench_spec(spec):
    """``robustbench:NAME[:dataset[:threat]]`` -> (NAME, dataset, threat), with RobustBench's
    defaults ``cifar10`` and ``Linf``; ValueError for an empty part or more than three."""
    parts = spec[len(ROBUSTBENCH):].split(":")
    if len(parts) > 3 or any(not p.strip() for p in parts):
        raise ValueError(f"{spec!r} is not robustbench:NAME[:dataset[:threat]] (e.g. "
                         "robustbench:Wang2023Better_WRN-28-10:cifar10:Linf)")
    name, dataset, threat = (parts + ["cifar10", "Linf"][len(parts) - 1:])[:3]
    return name.strip(), dataset.strip(), threat.strip()


def load_robustbench(spec, role, device=None):
    """A RobustBench model zoo entry, ``robustbench.utils.load_model(NAME, model_dir, dataset,
    threat_model)`` (its checkpoint is downloaded into ``$CDP_FAST_ROBUSTBENCH_DIR``, default
    ``./models`` as RobustBench, the first time; torch >= 2.6 loads it weights-only), for the
    flag it serves (``role``): "classifier" (``--classifier`` of label / inspect) and "inspect"
    (inspect ``--features``: ``.features`` itself) take [0, 1] images as the model does;
    "labeler" (sample ``--labeler``) is wrapped by :func:`cdp_fast.models.as_labeler` (the
    sampler's [-1, 1] mapped to the model's [0, 1]); "features" (sample ``--features``) by
    :func:`cdp_fast.models.as_feature_extractor`. A
    ``DMWideResNet`` (the WRNs of the CIFAR leaderboards, DM-Improves-AT's included) becomes
    a :class:`cdp_fast.models.WideResNet` with the same weights (:func:`cdp_fast.models.
    checkpoints.wrn_from_dm`), whose ``.features`` is the pooled 64·width vector; for other
    architectures ``features`` needs a module:factory with ``as_feature_extractor(model,
    layer=...)``. ValueError (exit 2, one line) when ``robustbench`` is not installed."""
    import os

    what = "features" if role == "inspect" else role
    name, dataset, threat = parse_robustbench_spec(spec)
    try:
        from robustbench.utils import load_model
    except ImportError as e:
        raise ValueError(f"{what}: {spec} needs RobustBench, which is not importable ({e}): pip install "
                         "'cdp_fast[robustbench]'") from None
    try:
        net = load_model(model_name=name, model_dir=os.environ.get(ROBUSTBENCH_DIR_ENV, "models"),
                         dataset=dataset, threat_model=threat)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{what}: {spec}: RobustBench has no such model ({type(e).__name__}: {e})") from None
    if type(net).__name__ == "DMWideResNet":
        from cdp_fast.models.checkpoints import wrn_from_dm

        net = wrn_from_dm(net)
    net = net.to(device or "cpu").eval()
    if role == "labeler":
        from cdp_fast.models import as_labeler

        return as_labeler(net, input_range=(0, 1))
    if role in ("features", "inspect"):
        if not callable(getattr(net, "features", None)):
            raise ValueError(f"{what}: {spec} is a {type(net).__name__}, which has no .features; pass a "
                             "module:factory returning cdp_fast.models.as_feature_extractor(model, layer=...)")
        if role == "inspect":
            return net.features
        from cdp_fast.models import as_feature_extractor

        return as_feature_extractor(net)
    return net
