"""Fingerprints of a run's arguments, so a resumed run can tell whether they changed
(:func:`cdp_fast.sampling.options.manifest_args` records them; :mod:`.stream` compares them).

Every argument type :func:`cdp_fast.sample` accepts is fingerprinted by its value: tensors and
ndarrays by their bytes (the hashes recorded since 0.1, unchanged, so old out directories
resume), lists, tuples, ranges, dicts, sets, Python and numpy scalars — and any nesting of them
and of tensors/ndarrays — by what they hold (a list and a tuple of equal values, or an
``np.int64(3)`` and a ``3``, give the same fingerprint); other array-likes through
``np.asarray``; modules by class and state dict (and the ``fingerprint_settings()`` of any
submodule that has one and returns non-None, e.g. a ``FeatureExtractor(feature_input="raw")``:
settings that change what a module computes without being weights); other callables by
qualified name (their behaviour is recorded by :func:`cdp_fast.sampling.prepare.probe`)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["fingerprint"]

_SCALARS = (bool, int, float, complex, str, bytes, np.generic)
_CONTAINERS = (list, tuple, range, dict, set, frozenset)


def _tensor_bytes(obj: torch.Tensor) -> bytes:
    return (obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            if obj.dtype != torch.bool else obj.cpu().numpy().tobytes())


def _feed(h, v) -> None:
    """Feed ``v``'s value into the hash ``h``, tagged by kind so different kinds never collide."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        h.update(b"N;")
    elif isinstance(v, (bool, int, float, complex)):
        h.update(f"{type(v).__name__}:{v!r};".encode())
    elif isinstance(v, (str, bytes)):
        raw = v.encode() if isinstance(v, str) else v
        h.update(f"{type(v).__name__}{len(raw)}:".encode() + raw)
    elif isinstance(v, torch.Tensor):
        h.update(f"tensor{tuple(v.shape)}{v.dtype}:".encode() + _tensor_bytes(v))
    elif isinstance(v, np.ndarray):
        if v.dtype == object:
            h.update(f"objarray{v.shape}:".encode())
            _feed(h, v.tolist())
        else:
            h.update(f"ndarray{v.shape}{v.dtype.str}:".encode() + np.ascontiguousarray(v).tobytes())
    elif isinstance(v, dict):
        h.update(f"dict{len(v)}(".encode())
        for key in sorted(v, key=repr):
            _feed(h, key)
            _feed(h, v[key])
        h.update(b")")
    elif isinstance(v, (set, frozenset)):
        h.update(f"set{len(v)}(".encode() + b"".join(sorted(_digest(e).encode() for e in v)) + b")")
    elif isinstance(v, (list, tuple, range)):
        h.update(f"seq{len(v)}(".encode())
        for e in v:
            _feed(h, e)
        h.update(b")")
    else:
        h.update(f"{type(v).__module__}.{type(v).__qualname__}:".encode())
        _feed(h, _as_array(v))


def _digest(v) -> str:
    h = hashlib.sha256()
    _feed(h, v)
    return h.hexdigest()


def _as_array(v):
    """An array-like (a jax or pandas array, an object with ``__array__``) as an ndarray; an
    object without a value (numpy makes it a 0-d object array) as its repr."""
    try:
        a = np.asarray(v)
    except (TypeError, ValueError, RuntimeError):
        return repr(v)
    return repr(v) if a.dtype == object and a.ndim == 0 else a


def fingerprint(obj) -> str | None:
    """A content hash of a model, callable, tensor, array or value (16 hex digits), so a
    resumed run can tell it changed; a plain callable gives its qualified name (its behaviour
    is fingerprinted by the probe). None stays None."""
    if obj is None:
        return None
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str((tuple(obj.shape), str(obj.dtype))).encode())
        h.update(_tensor_bytes(obj))
        return h.hexdigest()[:16]
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        h.update(np.ascontiguousarray(obj).tobytes())         # the 0.1 hash: old manifests resume
        return h.hexdigest()[:16]
    if isinstance(obj, torch.nn.Module):
        h.update(type(obj).__qualname__.encode())
        for k, v in obj.state_dict().items():
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, m in obj.named_modules():
            # None (a default) feeds nothing: fingerprints recorded before a setting existed hold
            settings = getattr(m, "fingerprint_settings", None)
            settings = settings() if callable(settings) else None
            if settings is not None:
                h.update(f"settings:{name}:".encode())
                _feed(h, settings)
        return h.hexdigest()[:16]
    if isinstance(obj, _SCALARS + _CONTAINERS + (np.ndarray,)) or not callable(obj):
        h.update(b"value:")
        _feed(h, obj)
        return h.hexdigest()[:16]
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    mod = getattr(obj, "__module__", "")
    return f"{mod}.{name}"
