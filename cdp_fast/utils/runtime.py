"""Where and how networks run: device, autocast and torch.compile choices, shared by the
sampler, training and evaluation.

- :func:`model_device` / :func:`rank_device`: the device a call works on (under torchrun with
  CUDA, one GPU per process: ``cuda:LOCAL_RANK``).
- :func:`autocast`: a context factory for bf16/fp16 autocast, or a no-op for fp32;
  :func:`eval_mode`: eval mode for the duration of a call, each submodule's mode restored.
- :func:`compile_frozen` (CPU) and :func:`compile_cuda_graphs` (CUDA): the sampler's two
  compile strategies for a fixed-shape inference network, with the measurements that chose
  them.

Nothing here mutates a caller's module: a layout or device change is the caller's decision
(see :func:`cdp_fast.sample`'s docstring for what it does with the model).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

__all__ = ["model_device", "same_device", "rank_device", "autocast", "check_dtype", "eval_mode", "compile_frozen",
           "compile_cuda_graphs", "weights_fingerprint"]


def model_device(model, device=None) -> torch.device:
    """``device`` if given, else the device of the first parameter / buffer of an nn.Module,
    else the CPU (plain callables)."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def same_device(a, b) -> bool:
    """Whether two devices are the same one ("cuda" means the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None) and torch.cuda.is_available():
        cur = torch.cuda.current_device()
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a.index == b.index


def rank_device(device, model) -> torch.device:
    """``device``, else the model's device; under torchrun (WORLD_SIZE > 1) with CUDA, an
    unindexed or absent CUDA device means ``cuda:LOCAL_RANK`` (one GPU per process)."""
    from cdp_fast.utils import distributed as cdist

    dev = model_device(model, device)
    if cdist.world_info()[1] > 1 and torch.cuda.is_available() and (
            device is None or (dev.type == "cuda" and dev.index is None)):
        dev = cdist.local_device()
    return dev


def check_dtype(dtype) -> None:
    """ValueError unless ``dtype`` is None, float32, bfloat16 or float16."""
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype!r}")


def autocast(device: torch.device, dtype=None):
    """A zero-argument context factory: ``torch.autocast(device.type, dtype)`` for bf16/fp16,
    else ``contextlib.nullcontext`` (fp32: nothing to do).

    Without autocast's weight-cast cache (``cache_enabled=False``): the sampler's region spans
    a whole trajectory, and the cache keeps the first 16-bit copy of every leaf weight that
    requires grad until the region ends — so the online head, updated in place by Adam at each
    guided step, would run its first weights all trajectory long, and a CUDA graph captured
    on a cache hit would read cast copies freed when the region closes."""
    check_dtype(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext


@contextlib.contextmanager
def eval_mode(model):
    """Put every submodule of ``model`` in eval mode (BatchNorm statistics frozen, dropout off)
    and restore each submodule's own previous ``training`` flag afterwards, even on error
    (``model.train(was_training)`` would flip submodules that were deliberately frozen).
    ``model`` may be None or a plain callable: then nothing is done."""
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


# ----------------------------------------------------------------------------- compile
_FROZEN_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module):
    """(storage, version, Σw, Σw²) of every parameter and buffer: changes when a weight does.

    The version counter catches in-place updates (optimizer steps, ``load_state_dict``); the
    sums catch writes through ``.data``, which bypass it.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors:
        return ()
    with torch.no_grad():
        sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors
                            if t.is_floating_point()] or [torch.zeros(2, dtype=torch.float64)])
    return (tuple((t.data_ptr(), t._version) for t in tensors), tuple(sums.flatten().tolist()))


def compile_frozen(fn, module=None):
    """``torch.compile`` of ``fn`` for CPU inference with inductor "freezing" on.

    Freezing folds the weights into the graph as constants and prepacks the convolutions for
    oneDNN with fused pointwise epilogues. Digits UNet, batch 128, 1 thread, forward
    (interleaved runs): 51-66 ms eager, ~55 ms compiled, 38-45 ms compiled + frozen, with or
    without channels_last (so the caller's module is left in its own layout). Compiling takes
    ~16 s instead of ~4 s (frozen graphs skip inductor's cache); it is paid once per process
    and shape.

    Frozen constants do not follow later in-place weight changes, and dynamo's guards would
    reuse the stale graph. So the weights' fingerprint of ``module`` (the nn.Module behind
    ``fn``; None for plain callables, which compile without freezing) is kept: if it changed
    since the module was last compiled here, the compile caches are reset
    (``torch.compiler.reset``) and ``fn`` is compiled afresh.
    """
    if not isinstance(module, torch.nn.Module):
        return torch.compile(fn)
    fp = weights_fingerprint(module)
    prev = _FROZEN_WEIGHTS.get(module)
    if prev is not None and prev != fp:
        torch.compiler.reset()
    _FROZEN_WEIGHTS[module] = fp
    compiled = torch.compile(fn)
    from torch._inductor import config as inductor_config

    def run(*args):
        # The global option, scoped to this call: torch.compile(options={"freezing": True})
        # does not reach the freezing pass (checked on torch 2.13: convolutions stay unfused).
        with inductor_config.patch(freezing=True):
            return compiled(*args)
    return run


def compile_cuda_graphs(fn):
    """``torch.compile(mode="reduce-overhead")`` of a tensor-returning ``fn`` for CUDA: the
    fixed-shape call is captured once per input shape as a CUDA graph and replayed every step,
    so a step launches one graph instead of hundreds of kernels.

    CUDA-graph outputs live in a static pool that the next replay overwrites; the sampling
    loop keeps ε past that point only through the callback, so the output is copied out (one
    (B, C, H, W) copy per step) and each call is marked as a new step. A function that cannot
    be captured (CPU tensors, data-dependent shapes) runs compiled without graphs: torch falls
    back with a warning. Written for the GPU path and not yet run on a GPU
    (tests/test_sampler.py has a gpu-marked check against ``compile=False``).
    """
    compiled = torch.compile(fn, mode="reduce-overhead")

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args)
        return out.clone() if isinstance(out, torch.Tensor) else out
    return run
