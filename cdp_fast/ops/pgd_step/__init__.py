"""The fused L∞ PGD step op: the public :func:`pgd_step`, its reference :func:`pgd_step_ref`,
its argument checks, which implementation runs (:func:`resolved_impl`) and the extension's
entry point (:func:`load_extension`, with the op's ``register_fake``).

Homes: kernels ``csrc/pgd_step*.{h,cpp,cu}`` (``TORCH_LIBRARY`` schema, CPU and CUDA impls);
here the reference, the choice and ``register_fake`` (torch requires it in the module that
csrc/ names in ``m.set_python_module``); building / loading the extension
:mod:`cdp_fast.ops.pgd_step.build`; tests ``tests/ops/test_pgd_step.py``; benchmark
``benchmarks/ops/pgd_step.py``. :func:`cdp_fast.ops.backend.choose` gives the request ("auto",
"ext" or "composite": the ``impl=`` argument, else ``CDP_FAST_PGD_IMPL``, else
``CDP_FAST_BACKEND``); this module resolves it: "ext" runs the extension or raises naming why
it is unavailable, "composite" runs :func:`pgd_step_ref` (with one warning when the
environment forced it: ~10x slower), "auto" runs the extension when it loads, else warns once
and runs the composite.

One PGD step (Madry et al. 2018, eq. (2); the update of the TRADES public code,
``yaodongyu/TRADES/trades.py``), per element, with α = ``step_size`` and ε = ``eps``:

    y = clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1)        sign(0) = 0

The eager PyTorch composite of this line makes ~8 passes over memory (sign, mul, add, sub,
add, max, min, clamp, each allocating a full-size temporary); the extension reads x_adv, g,
x once and writes y once.

Autograd: the op has none. Attack steps run under ``torch.no_grad()`` (the gradient ``g`` is
an input); :func:`pgd_step` raises if asked to differentiate through it.
"""
from __future__ import annotations

import threading
import warnings

import torch

from cdp_fast.ops import backend
from cdp_fast.ops.pgd_step import build

__all__ = ["pgd_step", "pgd_step_ref", "load_extension", "extension_available", "extension_error",
           "resolved_impl", "check_scalar_or_per_sample"]

_warned = set()   # the fallback warnings already given (keys "pgd-forced", "pgd-missing")
_fake_lock = threading.Lock()
_fake = {"registered": False}


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


# --------------------------------------------------------------------------- the extension
def _register_fake() -> None:
    """The op's FakeTensor implementation (torch.compile traces the op through it); once."""
    if _fake["registered"]:
        return
    with _fake_lock:
        if _fake["registered"]:
            return

        @torch.library.register_fake(build.OP_NAME)
        def _(x_adv, grad, x_nat, step_size, eps):
            # Mirrors the kernels: the output is a new contiguous tensor like x_adv.
            return torch.empty_like(x_adv, memory_format=torch.contiguous_format)

        _fake["registered"] = True


def load_extension() -> bool:
    """Make ``torch.ops.cdp_fast.pgd_step`` available (prebuilt, else JIT:
    :func:`cdp_fast.ops.pgd_step.build.load`) with its fake. Returns success; the failure
    reason is kept for the warning. Thread-safe; tried once per process."""
    if not build.load():
        return False
    _register_fake()
    return True


def extension_available() -> bool:
    """True when the fused op can run in this process (builds it on first call)."""
    return load_extension()


def extension_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried yet)."""
    return build.load_error()


# --------------------------------------------------------------------------- the choice
def _warn_once(key: str, msg: str, stacklevel: int) -> None:
    """``msg`` as a RuntimeWarning the first time ``key`` comes, attributed ``stacklevel``
    frames above the caller of this function (1: the caller's line)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)


def _resolve(impl: str | None, stacklevel: int) -> str:
    """The implementation that runs, "ext" or "composite", for the request of ``impl`` (None:
    the environment's), loading the extension when the request allows it; the one-time warnings are attributed ``stacklevel``
    frames above the caller (1: the caller's line)."""
    request = backend.choose("pgd_step", impl=impl)
    if request == "composite":
        if impl is None:   # forced by the environment (an explicit impl= does not warn)
            _warn_once("pgd-forced", "cdp_fast.pgd_step: the environment forces the PyTorch composite "
                       "(CDP_FAST_PGD_IMPL=composite or CDP_FAST_BACKEND=torch); the fused C++/CUDA step "
                       "is ~10x faster on CPU", stacklevel + 1)
        return "composite"
    if load_extension():
        return "ext"
    if request == "ext":
        raise RuntimeError(f"cdp_fast.pgd_step: the extension was requested but is unavailable: "
                           f"{extension_error()}")
    _warn_once("pgd-missing", "cdp_fast.pgd_step: the C++/CUDA extension is unavailable "
               f"({extension_error()}); using the PyTorch composite instead", stacklevel + 1)
    return "composite"


@torch.compiler.assume_constant_result
def _env_choice() -> str:
    """The environment's choice ("ext" | "composite"); evaluated once at trace time under
    torch.compile (building the extension is not traceable). Warnings name pgd_step's caller."""
    return _resolve(None, stacklevel=3)


def resolved_impl(impl: str | None = None) -> str:
    """Which implementation :func:`pgd_step` runs for ``impl`` (None: the environment's, see
    :func:`cdp_fast.ops.backend.choose`): ``"ext"`` or ``"composite"``. Loads the extension
    when the request allows it; RuntimeError when "ext" is requested and unavailable."""
    return _resolve(impl, stacklevel=2)


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
    which = _env_choice() if impl is None else _resolve(impl, stacklevel=2)
    if which == "composite":
        # elementwise ops autocast leaves alone today; off all the same, as in every op's body
        with backend.autocast_off(x_adv.device):
            return pgd_step_ref(x_adv, grad, x_nat, step_size=step_size, eps=eps)
    return torch.ops.cdp_fast.pgd_step.default(
        x_adv, grad, x_nat, _as_op_arg(step_size, x_adv), _as_op_arg(eps, x_adv))


# torch imports this module (TORCH_LIBRARY's set_python_module) when it needs the fake
# implementation of an op that was loaded some other way (e.g. `import cdp_fast._C`).
if build.op_registered():
    _register_fake()
