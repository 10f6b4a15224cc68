"""Published WideResNet checkpoints as they are, into :class:`cdp_fast.models.WideResNet`.

The layouts (read from the anchors' code; module names and shapes match ``WideResNet``):

- **DM-Improves-AT** (``train-wa.py``; ``core/utils/train.py`` ``save_model``):
  ``torch.save({"model_state_dict": model.state_dict()})`` of ``DataParallel(Sequential(wrn))``
  (``core/models/__init__.py`` ``create_model``, ``--normalize False``, the default): keys
  ``module.0.init_conv.weight`` ...; the WRN-Swish normalises inside with CIFAR mean/std held
  as plain attributes, so the state dict has no mean/std. With ``--normalize True`` the model is
  ``Sequential(Normalization, wrn)`` (keys ``module.1.``), which normalises twice: refused.
- **RobustBench** (``robustbench.utils.load_model``; ``DMWideResNet`` of
  ``model_zoo/architectures/dm_wide_resnet.py``): ``{"state_dict": ...}`` or a bare state dict,
  keys maybe prefixed ``module.``; ``DMWideResNet`` registers ``mean`` and ``std`` (C, 1, 1) as
  buffers — persistent in older releases (keys ``mean`` / ``std`` in its state dict), not
  persistent since RobustBench commit d2d996d (no such keys): both load; activation Swish /
  ``nn.SiLU``; no input padding in the published CIFAR models (``padding=0``).
- The same Gowal et al. architecture in both: pre-activation blocks, TF "SAME" padding,
  ``avg_pool2d(8)`` = the global mean at 32×32, BatchNorm eps 1e-5 (momentum differs: a training
  setting only).

:func:`load_wrn_checkpoint` (a new WideResNet) and :func:`load_checkpoint_into` (any model)
read ``.pt`` / ``.pth`` with ``torch.load(weights_only=True)`` and ``.safetensors`` with
safetensors (:func:`cdp_fast.utils.checkpoint.read_weights`); nothing is unpickled. Depth, width, classes and input channels are read from the tensor shapes; the
activation is not in a state dict (``activation=``, Swish by default, as both anchors).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cdp_fast.models._common import Normalize
from cdp_fast.models.wrn import WideResNet

__all__ = ["published_state_dict", "wrn_config", "load_checkpoint_into", "load_wrn_checkpoint", "wrn_from_dm"]

#: the keys under which the anchors store a state dict (DM-Improves-AT, RobustBench)
STATE_KEYS = ("model_state_dict", "state_dict")
#: DM-Improves-AT's CIFAR-100 normalisation (``core/models/wideresnetwithswish.py``), not in its checkpoints
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def published_state_dict(obj, what: str = "checkpoint") -> dict:
    """The bare state dict of a published checkpoint: ``obj["model_state_dict"]`` (DM-Improves-AT),
    ``obj["state_dict"]`` (RobustBench) or ``obj`` itself, with the ``module.`` prefix of
    ``DataParallel`` and then the ``0.`` of a ``Sequential(model)`` wrapper stripped (each only
    when every key carries it). ValueError naming ``what`` for anything else."""
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a state dict (or a dict holding one), got {type(obj).__name__}")
    for key in STATE_KEYS:
        if key in obj:
            obj = obj[key]
            if not isinstance(obj, dict):
                raise ValueError(f"{what}: its {key!r} is a {type(obj).__name__}, not a state dict")
            break
    if not obj:
        raise ValueError(f"{what}: the state dict is empty")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what}: not a state dict of tensors (entries {bad[:3]!r}; a training checkpoint? "
                         f"published checkpoints keep the weights under {' or '.join(STATE_KEYS)})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    index = {m.group(1) for m in (re.match(r"(\d+)\.", k) for k in state) if m}
    if len(index) == 1 and all(re.match(r"\d+\.", k) for k in state):
        (i,) = index
        if i != "0":
            raise ValueError(f"{what}: the network is entry {i} of a Sequential (keys '{i}.'...): DM-Improves-AT's "
                             "--normalize True layout, Sequential(Normalization, WRN), normalises the input twice; "
                             "only Sequential(WRN) ('module.0.') is supported")
        state = {k[len("0."):]: v for k, v in state.items()}
    return state


def wrn_config(state: dict) -> dict:
    """``depth``, ``width``, ``num_classes``, ``in_channels`` of a WRN state dict, from shapes:
    width = out channels of the first block / 16, depth = 6·(blocks per group) + 4."""
    try:
        w0 = state["layer.0.block.0.conv_0.weight"]
        logits = state["logits.weight"]
        init = state["init_conv.weight"]
    except KeyError as e:
        raise ValueError(f"not a WideResNet state dict: no {e.args[0]!r} (keys {sorted(state)[:4]}...)") from None
    blocks = {int(m.group(1)) for m in (re.match(r"layer\.0\.block\.(\d+)\.", k) for k in state) if m}
    if w0.shape[0] % 16:
        raise ValueError(f"not a WideResNet state dict: the first block has {w0.shape[0]} channels, not 16·width")
    return {"depth": 6 * len(blocks) + 4, "width": w0.shape[0] // 16, "num_classes": logits.shape[0],
            "in_channels": init.shape[1]}


def _read(source, what):
    if isinstance(source, dict):
        return source
    from cdp_fast.utils.checkpoint import read_weights

    p = Path(source)
    if p.is_dir() or not p.is_file():
        raise ValueError(f"{what}: {source} is not a file")
    return read_weights(p, what, "a state dict (DM-Improves-AT / RobustBench / cdp-fast weights)")


def _describe(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_checkpoint_into(model: nn.Module, source, *, mean=None, std=None, what: str = "checkpoint") -> nn.Module:
    """A published (or cdp-fast) checkpoint loaded into ``model`` with its own strict
    ``load_state_dict``, after :func:`published_state_dict` unwrapped it.

    Args:
        model: the network to fill (any nn.Module; mean/std apply to one with a
            :class:`cdp_fast.models.Normalize` at ``.normalize``, as every cdp_fast.models classifier).
        source: a path (``.pt`` / ``.pth``: ``torch.load(weights_only=True)``; ``.safetensors``)
            or a dict already loaded, in any layout :func:`published_state_dict` takes.
        mean, std: per-channel input statistics for the model's normalisation (e.g.
            DM-Improves-AT's CIFAR-100 ``(0.5071, 0.4865, 0.4409)`` / ``(0.2673, 0.2564, 0.2762)``:
            its checkpoints do not store them).
        what: names the source in errors.
    Returns:
        the model, in eval mode. Its input normalisation is ``mean`` / ``std`` when given, else
        the checkpoint's ``mean`` / ``std`` buffers (older RobustBench), else the model's own.
    Raises ValueError naming the missing / unexpected keys (or the shapes) when the checkpoint
    does not fit, and what could not be read. BatchNorm ``num_batches_tracked`` counters missing
    from a checkpoint are not required (they do not change what the network computes).
    """
    state = published_state_dict(_read(source, what), what)
    own = model.state_dict()
    norm = getattr(model, "normalize", None)
    stats = {}
    for k, given in (("mean", mean), ("std", std)):
        if k in state and k not in own and isinstance(norm, Normalize):
            stats[k] = state.pop(k)
        if given is not None:
            if not isinstance(norm, Normalize):
                raise ValueError(f"{k}= needs a model with a cdp_fast.models.Normalize at .normalize")
            stats[k] = torch.as_tensor(given, dtype=torch.float32)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        parts = ([f"missing keys: {_describe(missing)}"] if missing else []) + (
            [f"unexpected keys: {_describe(unexpected)}"] if unexpected else [])
        raise ValueError(f"{what}: does not fit {type(model).__name__} ({'; '.join(parts)})")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"{what}: shapes differ from {type(model).__name__}'s ({'; '.join(shapes[:3])})")
    for k, v in stats.items():
        buf = getattr(norm, k)
        if v.numel() != buf.numel():
            raise ValueError(f"{what}: its {k} has {v.numel()} entries, the model {buf.numel()} input channels")
        if k == "std" and not bool((v > 0).all()):
            raise ValueError(f"{what}: its std must be positive, got {v.flatten().tolist()}")
    model.load_state_dict(state)
    with torch.no_grad():
        for k, v in stats.items():
            buf = getattr(norm, k)
            buf.copy_(v.reshape(buf.shape).to(buf.dtype))
    return model.eval()


def load_wrn_checkpoint(source, *, activation: str = "swish", mean=None, std=None,
                        what: str = "checkpoint") -> WideResNet:
    """A published WRN checkpoint (DM-Improves-AT, RobustBench, cdp-fast; module docstring) as a
    :class:`WideResNet` of its depth, width, classes and input channels (:func:`wrn_config`),
    with ``activation`` ("swish": DM-Improves-AT ``wrn-*-swish``, RobustBench ``DMWideResNet``
    with Swish / SiLU; or "relu" — a state dict does not record it); loaded by
    :func:`load_checkpoint_into` (``mean`` / ``std``, errors: there). In eval mode.

    The normalisation is not in a DM-Improves-AT checkpoint, and a WideResNet's default is
    CIFAR-10's: a checkpoint of other than 10 classes whose ``mean`` / ``std`` are neither
    given nor stored (older RobustBench) is a ValueError asking for them (DM-Improves-AT's
    CIFAR-100 values: :data:`CIFAR100_MEAN` / :data:`CIFAR100_STD`) rather than a network
    that silently normalises with CIFAR-10's. (A 10-class checkpoint gets CIFAR-10's; for
    DM-Improves-AT's SVHN models pass ``mean=(0.5,) * 3, std=(0.5,) * 3``.)"""
    state = published_state_dict(_read(source, what), what)
    config = wrn_config(state)
    model = load_checkpoint_into(WideResNet(activation=activation, **config), state, mean=mean, std=std, what=what)
    unknown = [k for k, given in (("mean", mean), ("std", std)) if given is None and k not in state]
    if config["num_classes"] != 10 and unknown:
        raise ValueError(f"{what}: a {config['num_classes']}-class checkpoint without its input {' / '.join(unknown)} "
                         "(DM-Improves-AT's do not store them): pass mean= and std= — DM-Improves-AT's CIFAR-100 "
                         f"models use mean={CIFAR100_MEAN}, std={CIFAR100_STD}; a cdp_fast WideResNet trained at its "
                         "defaults cdp_fast.models.CIFAR10_MEAN / CIFAR10_STD")
    return model


def wrn_from_dm(net: nn.Module) -> WideResNet:
    """RobustBench's ``DMWideResNet`` (or DeepMind's / DM-Improves-AT's WRN module of the same
    names) as a :class:`WideResNet` with the same weights, mean/std and activation, so it has
    ``.features`` (the 64·width pooled vector). ValueError for input padding ≠ 0 or an
    activation other than Swish / SiLU / ReLU."""
    if getattr(net, "padding", 0):
        raise ValueError(f"{type(net).__name__} pads its input by {net.padding}; WideResNet does not")
    act = type(getattr(net, "relu", None)).__name__.lower()
    activation = {"swish": "swish", "silu": "swish", "relu": "relu"}.get(act)
    if activation is None:
        raise ValueError(f"{type(net).__name__}'s activation {act!r} is not Swish, SiLU or ReLU")
    state = dict(net.state_dict())
    for k in ("mean", "std"):     # DM-Improves-AT's WRN keeps them as plain attributes
        v = getattr(net, k, None)
        if k not in state and isinstance(v, torch.Tensor):
            state[k] = v
    model = load_wrn_checkpoint(state, activation=activation, what=type(net).__name__)
    return model.to(next(net.parameters()).device)
