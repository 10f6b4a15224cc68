"""The fused L∞ PGD step op: its reference, building/loading the C++/CUDA extension
``cdp_fast::pgd_step`` (csrc/), and the public :func:`pgd_step`.

Homes: kernels ``csrc/pgd_step*.{h,cpp,cu}`` (``TORCH_LIBRARY`` schema, CPU and CUDA impls);
here the reference, the loader and ``register_fake``; tests ``tests/ops/test_pgd_step.py``;
benchmark ``benchmarks/ops/pgd_step.py``. :func:`cdp_fast.ops.backend.choose` picks "ext" or
"composite" (``CDP_FAST_BACKEND``, with ``CDP_FAST_PGD_IMPL`` as an alias for this op).

One PGD step (Madry et al. 2018, eq. (2); the update of the TRADES public code,
``yaodongyu/TRADES/trades.py``), per element, with α = ``step_size`` and ε = ``eps``:

    y = clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1)        sign(0) = 0

The eager PyTorch composite of this line makes ~8 passes over memory (sign, mul, add, sub,
add, max, min, clamp, each allocating a full-size temporary); the extension reads x_adv, g,
x once and writes y once.

Where the extension comes from (first that works, tried once per process):
  1. ``cdp_fast._C``: built ahead of time by ``setup.py`` (``pip install --no-build-isolation``),
     skipped when a source in csrc/ is newer than it (an editable install edited since);
  2. a JIT build of ``csrc/`` with ninja (``torch.utils.cpp_extension.load``), cached in
     ``$TORCH_EXTENSIONS_DIR/cdp_fast/<key>`` or ``~/.cache/cdp_fast/ext/<key>``, where the key
     hashes the sources, the torch/CUDA/Python versions and the machine architecture (first
     use ~30-45 s on 2 cores, then a library load; concurrent processes wait on torch's lock
     file in that directory instead of building twice);
  3. otherwise :mod:`cdp_fast.ops.backend` warns once and :func:`pgd_step_ref` (the composite) runs.

Autograd: the op has none. Attack steps run under ``torch.no_grad()`` (the gradient ``g`` is
an input); :func:`pgd_step` raises if asked to differentiate through it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from cdp_fast.ops import backend

__all__ = ["pgd_step", "pgd_step_ref", "load_extension", "extension_available", "extension_error",
           "resolved_impl", "check_scalar_or_per_sample"]

_OP_NAME = "cdp_fast::pgd_step"

_lock = threading.Lock()
_state = {"op": None, "error": None, "tried": False, "fake": False}


# --------------------------------------------------------------------------- reference
def _as_per_sample(v, x: torch.Tensor, name: str, dtype: torch.dtype):
    """Python float -> float; tensor of shape () / (B,) -> broadcastable over x (B, ...)."""
    if isinstance(v, torch.Tensor):
        v = v.to(device=x.device, dtype=dtype)
        if v.dim() == 1:
            v = v.reshape((-1,) + (1,) * (x.dim() - 1))
        return v
    return float(v)


def pgd_step_ref(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, *,
                 step_size, eps) -> torch.Tensor:
    """The plain-PyTorch composite of one L∞ PGD step (the formula, line by line).

        y = clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1)

    Args:
        x_adv, grad, x_nat: tensors of one shape (B, ...), floating.
        step_size (α), eps (ε): Python floats, or tensors of shape () or (B,) (per sample,
            broadcast over the non-batch dims).
    Returns:
        y, shape and dtype of ``x_adv``.

    Precision: float32/float64 compute in their own dtype with α, ε rounded to it;
    float16/bfloat16 compute in float32 and round once at the end (the op's opmath), so the
    fused op is bitwise equal to this function for every dtype.
    """
    out_dtype = x_adv.dtype
    cdt = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    xa, g, x = x_adv.to(cdt), grad.to(cdt), x_nat.to(cdt)
    a = _as_per_sample(step_size, x, "step_size", cdt)
    e = _as_per_sample(eps, x, "eps", cdt)
    y = xa + a * torch.sign(g)
    y = torch.minimum(torch.maximum(y, x - e), x + e)
    return torch.clamp(y, 0.0, 1.0).to(out_dtype)


# --------------------------------------------------------------------------- validation
def check_scalar_or_per_sample(v, name: str, x: torch.Tensor) -> None:
    """α or ε: a float >= 0, or a floating tensor of shape () or (B,) with entries >= 0;
    ValueError naming ``name`` otherwise."""
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise ValueError(f"{name} must be a float or a floating tensor, got dtype {v.dtype}")
        if not (v.dim() == 0 or (v.dim() == 1 and x.dim() >= 1 and v.shape[0] == x.shape[0])):
            raise ValueError(
                f"{name} must be a Python float or a tensor of shape () or (B,) = "
                f"({x.shape[0] if x.dim() else '?'},), got shape {tuple(v.shape)}")
        # A value check needs the data; skipped while tracing (it would break the graph).
        if not torch.compiler.is_compiling() and bool((v < 0).any() | torch.isnan(v).any()):
            raise ValueError(f"{name} must be >= 0 (every entry)")
    else:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a float or a tensor, got {type(v).__name__}") from None
        if not f >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {f}")
        if name == "step_size" and f == float("inf"):
            raise ValueError("step_size must be finite (inf * sign(0) is NaN)")


def _validate(x_adv, grad, x_nat, step_size, eps) -> None:
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if grad.shape != x_adv.shape:
        raise ValueError(f"grad must have the shape of x_adv {tuple(x_adv.shape)}, got {tuple(grad.shape)}")
    if x_nat.shape != x_adv.shape:
        raise ValueError(f"x_nat must have the shape of x_adv {tuple(x_adv.shape)}, got {tuple(x_nat.shape)}")
    if grad.dtype != x_adv.dtype or x_nat.dtype != x_adv.dtype:
        raise ValueError(f"grad and x_nat must have the dtype of x_adv ({x_adv.dtype}), "
                         f"got {grad.dtype} and {x_nat.dtype}")
    if grad.device != x_adv.device or x_nat.device != x_adv.device:
        raise ValueError("x_adv, grad and x_nat must be on one device")
    check_scalar_or_per_sample(step_size, "step_size", x_adv)
    check_scalar_or_per_sample(eps, "eps", x_adv)


# --------------------------------------------------------------------------- loading
def _csrc_dir() -> Path | None:
    pkg = Path(__file__).resolve().parents[2]   # cdp_fast/
    for cand in (pkg / "csrc", pkg.parent / "csrc"):  # installed package data / repo checkout
        if (cand / "pgd_step.cpp").is_file():
            return cand
    return None


def _with_cuda() -> bool:
    if not getattr(torch.version, "cuda", None):
        return False
    from torch.utils import cpp_extension as ce
    return ce.CUDA_HOME is not None


def _jit_sources(csrc: Path) -> list[str]:
    srcs = sorted(str(p) for p in csrc.glob("*.cpp"))
    if _with_cuda():
        srcs += sorted(str(p) for p in csrc.glob("*.cu"))
    return srcs


def _cache_key(sources: list[str]) -> str:
    h = hashlib.sha256()
    for s in sources + sorted(str(p) for p in Path(sources[0]).parent.glob("*.h")):
        h.update(Path(s).name.encode())
        h.update(Path(s).read_bytes())
    # Anything that makes a built library unusable elsewhere: torch ABI, CUDA, Python, arch.
    for part in (torch.__version__, str(torch.version.cuda), sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build_dir(key: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) / "cdp_fast" if root else Path.home() / ".cache" / "cdp_fast" / "ext"
    d = base / key
    d.mkdir(parents=True, exist_ok=True)
    return d


def _prebuilt_stale() -> str | None:
    """In an editable install the prebuilt ``cdp_fast/_C*.so`` sits next to the sources it was
    built from; once a source is newer (edited after ``pip install -e``), loading it would run
    old code, and loading both it and a JIT build would register the op twice. Returns the
    reason to skip it, else None."""
    import importlib.util

    spec = importlib.util.find_spec("cdp_fast._C")
    if spec is None or not spec.origin:
        return None
    csrc = _csrc_dir()
    if csrc is None:
        return None
    so_mtime = Path(spec.origin).stat().st_mtime
    newer = [p.name for p in sorted(csrc.iterdir())
             if p.suffix in (".h", ".cpp", ".cu") and p.stat().st_mtime > so_mtime]
    return f"older than {', '.join(newer)} (rebuild with pip install -e .)" if newer else None


def _op_registered() -> bool:
    try:
        torch.ops.cdp_fast.pgd_step.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _jit_build() -> None:
    csrc = _csrc_dir()
    if csrc is None:
        raise RuntimeError("the csrc/ sources are not shipped with this installation")
    from torch.utils import cpp_extension as ce

    sources = _jit_sources(csrc)
    key = _cache_key(sources)
    flags = ["-O3"]  # torch's own -std (C++17 or C++20 by version) is kept
    cuda = any(s.endswith(".cu") for s in sources)
    if cuda:
        flags.append("-DCDP_FAST_WITH_CUDA")
    ce.load(name=f"cdp_fast_C_{key}", sources=sources, build_directory=str(_build_dir(key)),
            extra_cflags=flags, extra_cuda_cflags=["-O3"] if cuda else None,
            is_python_module=False, verbose=False)


def _register_fake() -> None:
    if _state["fake"]:
        return

    @torch.library.register_fake(_OP_NAME)
    def _(x_adv, grad, x_nat, step_size, eps):
        # Mirrors the kernels: the output is a new contiguous tensor like x_adv.
        return torch.empty_like(x_adv, memory_format=torch.contiguous_format)

    _state["fake"] = True


def load_extension() -> bool:
    """Make ``torch.ops.cdp_fast.pgd_step`` available (prebuilt, else JIT). Returns success;
    the failure reason is kept for the warning. Thread-safe; tried once per process."""
    with _lock:
        if _state["tried"]:
            return _state["op"] is not None
        _state["tried"] = True
        errors = []
        if not _op_registered():
            stale = _prebuilt_stale()
            if stale:
                errors.append(f"prebuilt cdp_fast._C skipped: {stale}")
            else:
                try:
                    import cdp_fast._C  # noqa: F401  (registers the op at load)
                except ImportError as exc:
                    errors.append(f"prebuilt cdp_fast._C: {exc}")
        if not _op_registered():
            try:
                _jit_build()
            except Exception as exc:  # no compiler, no ninja, no headers, read-only cache...
                errors.append(f"JIT build: {type(exc).__name__}: {exc}")
        if _op_registered():
            _register_fake()
            _state["op"] = torch.ops.cdp_fast.pgd_step.default
        else:
            _state["error"] = "; ".join(errors) or "unknown reason"
        return _state["op"] is not None


def extension_available() -> bool:
    """True when the fused op can run in this process (builds it on first call)."""
    return load_extension()


def extension_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried yet)."""
    return _state["error"]


@torch.compiler.assume_constant_result
def _env_choice() -> str:
    """The environment's choice ("ext" | "composite"); evaluated once at trace time under
    torch.compile (building the extension is not traceable)."""
    return backend.choose("pgd_step")


def resolved_impl(impl: str | None = None) -> str:
    """Which implementation :func:`pgd_step` runs: ``"ext"`` or ``"composite"``
    (:func:`cdp_fast.ops.backend.choose`)."""
    return backend.choose("pgd_step", impl=impl)


def _as_op_arg(v, x: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.tensor(float(v), dtype=torch.float64)  # 0-dim CPU scalar: no device sync


# --------------------------------------------------------------------------- public op
def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, *,
             step_size, eps, impl: str | None = None) -> torch.Tensor:
    """One fused L∞ PGD step, ``clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1)``.

    Args:
        x_adv: current adversarial example, (B, ...) floating (float32/64, bfloat16, float16).
        grad: the loss gradient at ``x_adv``, same shape/dtype/device; sign(0) = 0.
        x_nat: the clean input the ε-ball is centred on, same shape/dtype/device.
        step_size: α >= 0, a Python float or a tensor of shape () or (B,) (per sample).
        eps: ε >= 0, a Python float or a tensor of shape () or (B,) (per sample).
        impl: None (the environment: :mod:`cdp_fast.ops.backend`) | ``"auto"`` | ``"ext"`` |
            ``"composite"`` (wins over the environment, no warning).
    Returns:
        A new contiguous tensor of ``x_adv``'s shape and dtype. Bitwise equal to
        :func:`pgd_step_ref` (elementwise sign/min/max/add in the same precision).

    Raises:
        ValueError naming the argument (shapes, dtypes, negative α or ε); RuntimeError when
        gradients are requested through it (it has no autograd formula: run it under
        ``torch.no_grad()``).

    Examples:
        >>> x = torch.rand(4, 3, 8, 8); g = torch.randn_like(x)
        >>> y = pgd_step(x, g, x, step_size=2 / 255, eps=8 / 255)
    """
    _validate(x_adv, grad, x_nat, step_size, eps)
    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (x_adv, grad, x_nat, step_size, eps)):
        raise RuntimeError("cdp_fast.pgd_step has no autograd formula; call it under "
                           "torch.no_grad() (PGD steps take the gradient as an input)")
    which = _env_choice() if impl is None else resolved_impl(impl)
    if which == "composite":
        return pgd_step_ref(x_adv, grad, x_nat, step_size=step_size, eps=eps)
    return torch.ops.cdp_fast.pgd_step.default(
        x_adv, grad, x_nat, _as_op_arg(step_size, x_adv), _as_op_arg(eps, x_adv))


# torch imports this module (TORCH_LIBRARY's set_python_module) when it needs the fake
# implementation of an op that was loaded some other way (e.g. `import cdp_fast._C`).
if _op_registered():
    _register_fake()
