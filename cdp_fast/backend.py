"""The one place that decides which implementation runs (STYLE.md habit 4).

``CDP_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch`` (read at every call, so a
test or a user can switch it at run time):

=========  ====================================  =========================================
value      CUDA tensors                          CPU tensors
=========  ====================================  =========================================
auto       Triton kernels (fp32/bf16/fp16;       PyTorch: chunked streaming losses
           PyTorch if Triton is missing or       (:mod:`cdp_fast.chunked`), reference DDIM
           the dtype is fp64)                    update
triton     Triton kernels; raises RuntimeError   Triton *interpreter* when TRITON_INTERPRET=1,
           if Triton cannot be imported          else RuntimeError (nothing can run it)
torch      PyTorch (chunked losses, reference    same
           DDIM update)
=========  ====================================  =========================================

Why ``auto`` does not use the interpreter for CPU tensors even when ``TRITON_INTERPRET=1``:
the interpreter executes every kernel instance in NumPy, 100–1000× slower than the PyTorch
path, and exists to *test* the kernels. ``tests/conftest.py`` sets TRITON_INTERPRET=1 on every
GPU-less machine, so an interpreter-on-auto rule would silently turn every CPU sampler run and
test into an interpreter run. The interpreted kernels are reached by asking for them
(``CDP_FAST_BACKEND=triton``), which the kernel and sampler-equivalence tests do.
An explicitly requested backend that cannot run raises; the automatic choice falls back
quietly. A bad value raises ValueError.

Contract used by the rest of the package (kept stable):
  contrastive_impl(name) -> callable | None      name in {"hnm", "infonce"}; None = dense reference
  ddim_update(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False)
      -> (x_prev, x0_pred | None)
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

__all__ = ["requested_backend", "contrastive_impl", "ddim_update", "ddim_update_ref",
           "kernels_module", "triton_interpreting"]


def requested_backend() -> str:
    """The value of CDP_FAST_BACKEND (auto|triton|torch); ValueError for anything else."""
    value = os.environ.get("CDP_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"CDP_FAST_BACKEND must be auto, triton or torch, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_kernels_package():
    """Import ``cdp_fast.kernels``; from a source checkout that is not installed (the folder is
    ``<repo>/kernels``, mapped by [tool.setuptools.package-dir]) load it from there."""
    if "cdp_fast.kernels" in sys.modules:
        return sys.modules["cdp_fast.kernels"]
    root = Path(__file__).resolve().parent.parent / "kernels"
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
    """``cdp_fast.kernels.<name>`` (imports triton), or raise RuntimeError saying why not."""
    mod, err = _kernels_or_error(name)
    if mod is None:
        raise RuntimeError(f"CDP_FAST_BACKEND=triton requested but the Triton kernels cannot be "
                           f"imported ({err}); install triton (Linux) or use CDP_FAST_BACKEND=torch")
    return mod


def _cannot_run(what: str, device) -> RuntimeError:
    return RuntimeError(
        f"CDP_FAST_BACKEND=triton requested for {what} on a {device} tensor, but Triton can only run "
        f"on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported; "
        f"use CDP_FAST_BACKEND=torch or auto")


def _torch_contrastive(name: str, anchor):
    """The PyTorch streaming path: through the registered op on CPU (opaque to torch.compile,
    its CPU kernel is the chunked code), the chunked autograd.Function elsewhere."""
    from cdp_fast import chunked

    mod, _ = _kernels_or_error("contrastive")
    if mod is not None and anchor.device.type == "cpu":
        return mod.hnm_loss_fused if name == "hnm" else mod.infonce_loss_fused
    return chunked.hnm_loss_chunked if name == "hnm" else chunked.infonce_loss_chunked


def contrastive_impl(name: str):
    """The streaming implementation of loss ``name`` ("hnm" | "infonce") for the current
    CDP_FAST_BACKEND: a callable with the loss's signature that picks Triton or PyTorch from
    the tensors' device at call time (see the table in the module docstring)."""
    if name not in ("hnm", "infonce"):
        raise ValueError(f"unknown contrastive loss {name!r}")
    backend = requested_backend()
    if backend == "triton":
        kernels_module("contrastive")  # raise now if Triton cannot be imported at all

    def impl(anchor, positive, candidates=None, **kwargs):
        choice = requested_backend()
        if choice == "triton":
            mod = kernels_module("contrastive")
            fn = mod.hnm_loss_fused if name == "hnm" else mod.infonce_loss_fused
            if anchor.is_cuda:
                if anchor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise RuntimeError(f"the Triton contrastive kernels support fp32/bf16/fp16, got {anchor.dtype}")
                return fn(anchor, positive, candidates, **kwargs)
            if triton_interpreting():
                if anchor.dtype != torch.float32:
                    raise RuntimeError("the Triton interpreter runs the contrastive kernels in fp32 only; "
                                       f"got {anchor.dtype}")
                return fn(anchor, positive, candidates, interpret=True, **kwargs)
            raise _cannot_run(f"the {name} loss", anchor.device)
        if choice == "auto" and anchor.is_cuda and anchor.dtype != torch.float64:
            mod, _ = _kernels_or_error("contrastive")
            if mod is not None:
                fn = mod.hnm_loss_fused if name == "hnm" else mod.infonce_loss_fused
                return fn(anchor, positive, candidates, **kwargs)
        return _torch_contrastive(name, anchor)(anchor, positive, candidates, **kwargs)

    impl.__name__ = f"{name}_loss_{backend}"
    return impl


def ddim_update_ref(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False):
    """DDIM eq. (12) of Song et al. 2021 with Δ = ε + λg in place of ε (Algorithm 1, line 7):

        x̂_0     = (x_t − √(1−ᾱ_t)·Δ) / √ᾱ_t
        x_{t-1} = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ²)·Δ + σ·z

    x_t, eps, g, noise: same shape; lam, abar_t, abar_prev, sigma: Python floats.
    """
    delta = eps if (g is None or lam == 0) else eps + lam * g
    x0 = (x_t - (1.0 - abar_t) ** 0.5 * delta) / abar_t ** 0.5
    dir_coef = max(1.0 - abar_prev - sigma ** 2, 0.0) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + dir_coef * delta
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, (x0 if return_x0 else None)


def ddim_update(x_t, eps, g, *, lam, abar_t, abar_prev, sigma, noise=None, return_x0=False):
    """Dispatching DDIM update (formula: :func:`ddim_update_ref`; kernel: cdp_fast.kernels.ddim).

    Returns (x_prev, x0_pred | None), x_prev in x_t's dtype and shape.
    """
    backend = requested_backend()
    kw = dict(lam=lam, abar_t=abar_t, abar_prev=abar_prev, sigma=sigma, noise=noise, return_x0=return_x0)
    if backend == "torch":
        return ddim_update_ref(x_t, eps, g, **kw)
    if backend == "triton":
        mod = kernels_module("ddim")
        if x_t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError(f"the Triton DDIM kernel supports fp32/bf16/fp16, got {x_t.dtype}")
        if x_t.is_cuda:
            xp, x0 = mod.ddim_update_op(x_t, eps, g, noise, float(lam), float(abar_t),
                                        float(abar_prev), float(sigma), bool(return_x0))
        elif triton_interpreting():
            xp, x0 = mod.ddim_update_triton(x_t, eps, g, float(lam), float(abar_t), float(abar_prev),
                                            float(sigma), noise, bool(return_x0))
        else:
            raise _cannot_run("the DDIM update", x_t.device)
        return xp, (x0 if return_x0 else None)
    if x_t.is_cuda and x_t.dtype != torch.float64:
        mod, _ = _kernels_or_error("ddim")
        if mod is not None:
            xp, x0 = mod.ddim_update_op(x_t, eps, g, noise, float(lam), float(abar_t),
                                        float(abar_prev), float(sigma), bool(return_x0))
            return xp, (x0 if return_x0 else None)
    return ddim_update_ref(x_t, eps, g, **kw)
