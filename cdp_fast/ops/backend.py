"""The one place that decides which implementation of an op runs (docs/style.md habit 4).

:func:`choose` ``(op, tensor) -> "triton" | "interpret" | "torch" | "ext" | "composite"``; the
ops in :mod:`cdp_fast.ops` execute the answer and never branch on the device themselves.

``CDP_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``, read at every call (a test
or a user can switch it at run time):

=========  ===============================  ==================================  ===================
value      contrastive, ddim: CUDA tensors   contrastive, ddim: CPU tensors      pgd_step (any device)
=========  ===============================  ==================================  ===================
auto       "triton" (fp32/bf16/fp16); else   "torch" (chunked streaming losses,  "auto": the C++/CUDA
           "torch" (fp64, no Triton)         reference DDIM update)              extension, else one
                                                                                  warning, composite
triton     "triton"; RuntimeError if Triton  "interpret" with TRITON_INTERPRET=1 "ext": the extension
           cannot be imported or the dtype   (fp32 only), else RuntimeError      or RuntimeError
           is not fp32/bf16/fp16             (nothing can run it)                naming why not
torch      "torch"                           "torch"                             "composite" (warns
                                                                                  once: ~10x slower)
=========  ===============================  ==================================  ===================

For the PGD step this module gives the *request* only ("auto" | "ext" | "composite"); whether
the extension can run, and the warnings of the last column, are decided by
:mod:`cdp_fast.ops.pgd_step`, which loads the extension (this module imports no op).

``triton`` means "the fused kernels or an error": for the PGD step that is the compiled
extension. ``CDP_FAST_PGD_IMPL`` = ``auto`` | ``ext`` | ``composite`` is kept as an alias that
applies to the PGD step alone and wins over ``CDP_FAST_BACKEND`` there (``ext`` = triton,
``composite`` = torch); the ``impl=`` argument of :func:`cdp_fast.pgd_step` wins over both,
without a warning.

Why ``auto`` does not use the interpreter for CPU tensors even when ``TRITON_INTERPRET=1``:
the interpreter executes every kernel instance in NumPy, 100–1000× slower than the PyTorch
path, and exists to *test* the kernels. ``tests/conftest.py`` sets TRITON_INTERPRET=1 on every
GPU-less machine, so an interpreter-on-auto rule would silently turn every CPU sampler run and
test into an interpreter run. The interpreted kernels are reached by asking for them
(``CDP_FAST_BACKEND=triton``), which the kernel and sampler-equivalence tests do.
An explicitly requested backend that cannot run raises; the automatic choice falls back
quietly (the PGD step warns once, since its fallback costs ~10x). A bad value raises
ValueError.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

__all__ = ["OPS", "choose", "requested_backend", "triton_interpreting", "kernels_module", "autocast_off"]

OPS = ("contrastive", "ddim", "pgd_step")
_ENV = "CDP_FAST_BACKEND"
_PGD_ENV = "CDP_FAST_PGD_IMPL"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autocast_off(device):
    """A context with autocast disabled for ``device``'s type: the ops' bodies run in it, so
    their precision is the one they document whatever region calls them. Autocast state is
    thread-local and the autograd engine carries it into the threads that run a custom op's
    backward, so without this the sampler's bf16 region (which spans the guidance's
    ``autograd.grad``) would turn the fp32 GEMMs of the contrastive backward into bf16 GEMMs.
    Inputs keep their dtypes; each op casts them as it documents."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def requested_backend() -> str:
    """The value of CDP_FAST_BACKEND (auto|triton|torch); ValueError for anything else."""
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"{_ENV} must be auto, triton or torch, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- Triton kernels
def _load_kernels_package():
    """Import ``cdp_fast.kernels``; from a source checkout that is not installed (the folder is
    ``<repo>/kernels``, mapped by [tool.setuptools.package-dir]) load it from there."""
    if "cdp_fast.kernels" in sys.modules:
        return sys.modules["cdp_fast.kernels"]
    root = Path(__file__).resolve().parents[2] / "kernels"
    init = root / "__init__.py"
    if not init.exists():
        raise ModuleNotFoundError("cdp_fast.kernels is not installed and no kernels/ folder was found",
                                  name="cdp_fast.kernels")
    spec = importlib.util.spec_from_file_location("cdp_fast.kernels", init,
                                                  submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cdp_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def _import_kernels(name: str):
    # Plain import statements (not importlib): torch.compile traces them without a graph break.
    if name == "contrastive":
        from cdp_fast.kernels import contrastive as mod
    elif name == "ddim":
        from cdp_fast.kernels import ddim as mod
    else:
        raise ValueError(f"unknown kernel module {name!r}")
    return mod


def _kernels_or_error(name: str):
    """(module, None), or (None, the ImportError) when Triton/the kernels cannot be imported."""
    try:
        return _import_kernels(name), None
    except ModuleNotFoundError as err:
        if err.name not in ("cdp_fast.kernels", f"cdp_fast.kernels.{name}"):
            return None, err  # triton itself is missing
    try:  # a source checkout that is not installed: load <repo>/kernels as cdp_fast.kernels
        _load_kernels_package()
        return _import_kernels(name), None
    except ImportError as err:
        return None, err


def kernels_module(name: str):
    """``cdp_fast.kernels.<name>`` (imports triton), or RuntimeError saying why not."""
    mod, err = _kernels_or_error(name)
    if mod is None:
        raise RuntimeError(f"{_ENV}=triton requested but the Triton kernels cannot be "
                           f"imported ({err}); install triton (Linux) or use {_ENV}=torch")
    return mod


def _choose_triton_op(op: str, tensor: torch.Tensor) -> str:
    backend = requested_backend()
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if tensor.is_cuda and tensor.dtype in _TRITON_DTYPES and _kernels_or_error(op)[0] is not None:
            return "triton"
        return "torch"
    kernels_module(op)  # triton requested: raise now if it cannot be imported at all
    if tensor.is_cuda:
        if tensor.dtype not in _TRITON_DTYPES:
            raise RuntimeError(f"the Triton {op} kernels support fp32/bf16/fp16, got {tensor.dtype}")
        return "triton"
    if triton_interpreting():
        if tensor.dtype != torch.float32:
            raise RuntimeError(f"the Triton interpreter runs the {op} kernels in fp32 only; got {tensor.dtype}")
        return "interpret"
    raise RuntimeError(
        f"{_ENV}=triton requested for the {op} op on a {tensor.device} tensor, but Triton can only "
        f"run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before triton is "
        f"imported; use {_ENV}=torch or auto")


# ----------------------------------------------------------------------------- PGD step
def _pgd_request(impl: str | None) -> str:
    """auto | ext | composite: the ``impl`` argument, else CDP_FAST_PGD_IMPL, else
    CDP_FAST_BACKEND mapped (triton -> ext, torch -> composite)."""
    if impl is not None:
        if impl not in ("auto", "ext", "composite"):
            raise ValueError(f"impl must be one of ('auto', 'ext', 'composite'), got {impl!r}")
        return impl
    alias = os.environ.get(_PGD_ENV, "").strip().lower()
    if alias:
        if alias not in ("auto", "ext", "composite"):
            raise ValueError(f"{_PGD_ENV} must be auto, ext or composite, got {alias!r}")
        if alias != "auto":
            return alias
    return {"auto": "auto", "triton": "ext", "torch": "composite"}[requested_backend()]


# ----------------------------------------------------------------------------- the choice
def choose(op: str, tensor: torch.Tensor | None = None, *, impl: str | None = None) -> str:
    """Which implementation of ``op`` runs for ``tensor`` under the current environment.

    Args:
        op: "contrastive" | "ddim" | "pgd_step".
        tensor: the op's leading input (its device and dtype decide); unused for "pgd_step".
        impl: "pgd_step" only: a per-call request ("auto" | "ext" | "composite") that wins over
            the environment.
    Returns:
        "triton" (CUDA kernels), "interpret" (the kernels on CPU tensors in Triton's
        interpreter) or "torch" (the PyTorch path); for "pgd_step" the request "auto", "ext"
        (the compiled extension) or "composite" (the PyTorch composite), which
        :func:`cdp_fast.ops.pgd_step.resolved_impl` turns into what runs. See the module table.
    Raises:
        ValueError for an unknown op or environment value; RuntimeError when an explicitly
        requested Triton implementation cannot run, naming why.
    """
    if op == "pgd_step":
        return _pgd_request(impl)
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return _choose_triton_op(op, tensor)
