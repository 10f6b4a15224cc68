"""The networks as a :func:`cdp_fast.sample` run executes them: the ε-model adapter (a copy on
the run's device or layout when needed, compiled when it repays: :func:`model_plan`), the
feature network (a frozen eval copy: :func:`prepare_features`), and the probe that runs each
once before any file is written (:func:`probe`)."""
from __future__ import annotations

import copy
import math
import warnings
import weakref

import torch

from cdp_fast.diffusion.adapters import EpsModel, SigmaDenoiser, as_eps_model
from cdp_fast.utils import runtime
from cdp_fast.utils.checks import looks_like_probabilities

__all__ = ["CPU_AUTO_COMPILE_S", "eager_seconds", "cpu_auto_compiles", "model_plan", "prepare_model", "compiled",
           "Features", "prepare_features", "check_logits", "check_labeler", "probe", "PROBE_SEED"]


#: compile="auto" on CPU compiles the ε-model when the call's estimated eager ε-model time is at
#: least this many seconds. Measured on the 2-core CPU (torch 2.13, 20 steps, interleaved runs):
#: the frozen compile costs 11-22 s per process on the digits UNet (1.0M params; eager 31 ms →
#: 19 ms per batch-128 forward, so it pays off after ~30-60 s of eager model time) and ~27 s
#: on a small diffusers UNet (1.1M params, 16×16; 60 → 44 ms per batch-64 forward: ~95 s).
#: Frozen graphs cannot use inductor's persistent caches (their prepacked oneDNN weights do
#: not pickle: fxgraph_cache_bypass; AOTAutograd refuses freezing), so every process pays it.
CPU_AUTO_COMPILE_S = 120.0


def eager_seconds(model, image_shape, batch: int, forwards: int, dev: torch.device,
                   threshold: float = math.inf, num_classes=None) -> float:
    """Estimated eager ε-model time of ``forwards`` calls at ``batch``.

    One forward at ≤ 16 samples is timed (the second of two: the first builds oneDNN
    primitives) and scaled linearly; small batches cost more per sample (digits UNet: ~2× at
    batch 128), so that over-estimates. When it reaches ``threshold``, two forwards at the
    full batch (a negligible part of so long a call) give the estimate instead. A
    class-conditional model (``num_classes`` set) is called with labels, as sampling calls it."""
    import time

    eps_model = as_eps_model(model)

    def once(b):
        x = torch.zeros((b, *image_shape), device=dev)
        t = torch.full((b,), 500, dtype=torch.long, device=dev)
        y = torch.zeros(b, dtype=torch.long, device=dev) if num_classes is not None else None
        eps_model.forward(x, t, y)
        start = time.perf_counter()
        eps_model.forward(x, t, y)
        return time.perf_counter() - start

    with torch.no_grad(), runtime.eval_mode(eps_model.module):
        small = min(batch, 16)
        est = once(small) * (batch / small) * forwards
        if batch > small and est >= threshold:
            est = once(batch) * forwards
    return est


def cpu_auto_compiles(model, image_shape, work, dev: torch.device, num_classes=None) -> bool:
    """compile="auto" on CPU: whether the call's timed eager ε-model work, ``work`` = (batch,
    forwards), reaches :data:`CPU_AUTO_COMPILE_S` (only an nn.Module can be frozen and compiled)."""
    if work is None or as_eps_model(model).module is None:
        return False
    batch, forwards = work
    return eager_seconds(model, image_shape, batch, forwards, dev, CPU_AUTO_COMPILE_S,
                          num_classes) >= CPU_AUTO_COMPILE_S


def model_plan(model, dev: torch.device, compile, image_shape, work=None,
                num_classes=None) -> tuple[bool, bool, bool]:
    """(compile, copy, channels_last) for running ``model`` on ``dev``: channels_last only for
    an nn.Module compiled on CUDA with (C, H, W) images (cuDNN convolutions and bf16 tensor
    cores prefer NHWC); a copy whenever the caller's module would have to move or change
    layout, so it never does.

    ``compile="auto"``: always on CUDA; on CPU for an nn.Module when ``work`` = (batch,
    forwards) puts the eager ε-model time at ≥ :data:`CPU_AUTO_COMPILE_S` (timed, not assumed;
    see :func:`cpu_auto_compiles`)."""
    is_module = isinstance(model, torch.nn.Module)
    use_compile = compile is True or (compile == "auto" and dev.type == "cuda")
    if compile == "auto" and dev.type == "cpu":
        use_compile = cpu_auto_compiles(model, image_shape, work, dev, num_classes)
    channels_last = use_compile and dev.type == "cuda" and len(image_shape) == 3 and is_module
    must_copy = is_module and (channels_last or not runtime.same_device(runtime.model_device(model), dev))
    return use_compile, must_copy, channels_last


# caller's module -> ((device, layout, weights fingerprint), its prepared copy): one copy per
# module and weights, so repeated calls reuse the copy (and its compiled graphs) instead of
# doubling the memory and recompiling every call
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepare_model(model, dev: torch.device, compile, image_shape, step_graph=False) -> tuple[EpsModel, bool]:
    """(the ε-model adapter to run, whether x_T goes in channels_last); see :func:`model_plan`.
    Without the call's work, ``compile="auto"`` stays eager on CPU here: :func:`sample` probes
    the eager adapter and only then lets :func:`cpu_auto_compiles` time it, so a wrong
    ``image_shape`` or model signature is reported by the probe rather than by the timing."""
    use_compile, must_copy, channels_last = model_plan(model, dev, compile, image_shape)
    if must_copy:
        key = (str(dev), channels_last, runtime.weights_fingerprint(model))
        hit = _PREPARED.get(model)
        if hit is not None and hit[0] == key:
            module = hit[1]
        else:
            module = copy.deepcopy(model).to(dev)
            if channels_last:
                module = module.to(memory_format=torch.channels_last)   # values unchanged
            _PREPARED[model] = (key, module)
        model = module
    eps_model = EpsModel(model)
    return (compiled(eps_model, dev, step_graph) if use_compile else eps_model), channels_last


def compiled(eps_model: EpsModel, dev: torch.device, step_graph=False) -> EpsModel:
    """The adapter running a compiled forward: on CUDA inside the step's graph (``step_graph``:
    :class:`cdp_fast.sampling.graphs.StepGraph` captures it with the guidance, so it is compiled without
    graphs of its own — a capture cannot nest) or with CUDA graphs of its own, a frozen inductor
    graph on CPU (the feature network is prepared apart: :func:`prepare_features`)."""
    den = eps_model.model if isinstance(eps_model.model, SigmaDenoiser) else None
    if den is not None:
        den.table_on(dev)                        # the device copy exists before tracing
        # Heun calls a denoiser in σ-space, not through forward(): compile that path too
        den.sigma_runner = (torch.compile(den.eps_at_sigma) if dev.type == "cuda"
                            else runtime.compile_frozen(den.eps_at_sigma, den))
    if dev.type == "cuda":
        return eps_model.with_runner(torch.compile(eps_model.forward) if step_graph
                                     else runtime.compile_cuda_graphs(eps_model.forward))
    return eps_model.with_runner(runtime.compile_frozen(eps_model.forward, eps_model.module))


# caller's feature module -> ((device, compiled, weights fingerprint), its prepared copy)
_PREPARED_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Features:
    """A feature network as guided sampling runs it (see :func:`prepare_features`):
    x (B, *shape) -> (B, d). With gradients on and a compiled graph it runs the graph (in
    channels_last when prepared so); without gradients (the real-data features, computed once
    at other batch sizes) it runs the module eagerly rather than compiling another graph."""

    def __init__(self, module: torch.nn.Module, compiled=None, channels_last: bool = False):
        self.module, self.compiled, self.channels_last = module, compiled, channels_last

    def __call__(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and torch.is_grad_enabled():
            return self.compiled(x)
        return self.module(x)


def prepare_features(features, dev: torch.device, compile: bool):
    """The guidance's feature network as sampling runs it. An nn.Module becomes a copy (the
    caller's is never changed) on ``dev``, in eval mode, whose parameters do not require grad:
    the guidance differentiates only with respect to the images, so the backward computes no
    weight gradient (digits features, batch 128, CPU, fwd + input-grad: 8.9 -> 7.5 ms; WRN-16-4,
    batch 64: 439 -> 421 ms). With ``compile`` (sample() asks for it on CUDA) the copy is also
    put in channels_last and ``torch.compile``d: forward and the backward to the input as one
    AOT graph pair. On CPU it stays eager: compiled fwd + input-grad measured slower on the
    digits CNN (10.8–12.9 vs 7.5 ms: inductor's generated max-pool-with-indices and its
    scatter backward replace two aten kernels) and only ~10% faster on WRN-16-4 in
    channels_last (379 vs 421 ms) after a 20+ s compile. Plain callables are returned as given.

    Shapes: x (B, *shape) -> (B, d). Cached per caller's module and weights fingerprint."""
    if not isinstance(features, torch.nn.Module):
        return features
    key = (str(dev), bool(compile), runtime.weights_fingerprint(features))
    hit = _PREPARED_FEATURES.get(features)
    if hit is not None and hit[0] == key:
        return hit[1]
    module = copy.deepcopy(features).to(dev).eval().requires_grad_(False)
    if compile:
        module = module.to(memory_format=torch.channels_last)      # values unchanged
    prepared = Features(module, torch.compile(module) if compile else None, channels_last=bool(compile))
    _PREPARED_FEATURES[features] = (key, prepared)
    return prepared


def check_logits(logits, batch, what):
    """(B, K) finite logits, or a ValueError naming ``what`` — before anything is written."""
    if not isinstance(logits, torch.Tensor):          # a numpy array of the right shape (probe.md P8)
        raise ValueError(f"{what} must return a torch.Tensor of logits (B, K), got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"{what} must return logits of shape ({batch}, K) for {batch} images, got "
                         f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{what} returned non-finite logits")


def check_labeler(logits, num_classes) -> None:
    """The labeler's classes on the probe batch: K ≥ 2, K = ``num_classes`` for a
    class-conditional run (P3, P4: its labels replace the conditioning classes); a warning for
    probabilities instead of logits (P1)."""
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"labeler returns logits of shape (B, {k}): with one class its argmax is always 0 and its "
                         "confidence always 1; it must return (B, K) logits over K >= 2 classes")
    if num_classes is not None and k != num_classes:
        raise ValueError(f"labeler returns logits over {k} classes but num_classes={num_classes}: its labels would "
                         f"replace the {num_classes}-class conditioning of the samples; use a labeler over the "
                         "model's classes, or labeler=None (each sample is labelled by its conditioning class)")
    if looks_like_probabilities(logits):
        warnings.warn("labeler returns probabilities (rows >= 0 summing to 1), not logits: its rows are used as the "
                      "probabilities (confidence = the row's max), not softmaxed again", stacklevel=5)


PROBE_SEED = 0x5EED


def probe(eps_model: EpsModel, features, labeler, image_shape, T, num_classes, dev, fractional_t=False):
    """Run each network once on a fixed probe batch (2 images from a fixed seed, t = T // 2),
    as sampling will run it (the prepared ε-model on ``dev``; every module in eval mode for
    the probe, so no BatchNorm statistic moves): a wrong ``image_shape`` or a network that
    returns the wrong shape or non-finite values fails here, before any file is written, with
    a message naming it. Returns the behaviour fingerprints of the networks that are plain
    callables (a module is fingerprinted by its state dict): 8 fixed random projections of
    their probe outputs, compared on resume with a tolerance (rtol 1e-3) — so a different
    network behind the same function name is noticed, float noise across devices is not.

    Ranges, as in sampling: the features get x (about [-1, 1], x_t is not clamped), the
    labeller x clamped to [-1, 1] (images); what they declare was checked before
    (:func:`cdp_fast.sampling.options.check_networks`)."""
    x = torch.randn((2,) + tuple(image_shape), generator=torch.Generator().manual_seed(PROBE_SEED)).to(dev)
    t = torch.full((2,), T // 2, dtype=torch.long, device=dev)
    y = torch.zeros(2, dtype=torch.long, device=dev) if num_classes is not None else None

    def run(what, fn, *args):
        try:
            with torch.no_grad(), runtime.eval_mode(fn):
                return fn(*args)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"running the {what} on a probe batch of shape {tuple(x.shape)} failed ({msg}); is "
                             f"image_shape {tuple(image_shape)} right?") from None

    with runtime.eval_mode(eps_model.module):
        eps = run("model", eps_model.forward, x, t, y)
        if fractional_t and not isinstance(eps_model.model, SigmaDenoiser):
            try:
                with torch.no_grad():
                    eps_model.forward(x, t.float() + 0.5, y)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError("solver='heun' calls the ε-model at fractional timesteps t(σ) (as diffusers and "
                                 f"k-diffusion); this model failed on t = {T // 2 + 0.5} ({msg}); use a model "
                                 "that accepts float timesteps, or solver='dpmpp_2m'") from None
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        raise ValueError(f"model returns {tuple(getattr(eps, 'shape', ())) or type(eps).__name__} for images of "
                         f"shape {tuple(x.shape)} (checked on a probe batch before sampling); is image_shape "
                         f"{tuple(image_shape)} the model's?")
    outs = {"model": eps}
    if features is not None:
        z = run("features", features, x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != 2:
            raise ValueError(f"features must map (B, ...) to (B, d); got {tuple(getattr(z, 'shape', ()))}")
        outs["features"] = z
    if labeler is not None:
        logits = run("labeler", labeler, x.clamp(-1, 1) if x.dim() == 4 else x)
        check_logits(logits, 2, "labeler")
        check_labeler(logits, num_classes)
        outs["labeler"] = logits
    prints = {}
    for name, fn in (("model", eps_model.model), ("features", features), ("labeler", labeler)):
        # a module is fingerprinted by its weights; a plain callable (also one inside a
        # SigmaDenoiser, which has no weights of its own) by what it computes
        plain = not isinstance(fn, torch.nn.Module) or (
            isinstance(fn, SigmaDenoiser) and not isinstance(fn.net, torch.nn.Module))
        if name in outs and plain:
            v = torch.as_tensor(outs[name].detach().double().cpu().flatten())
            r = torch.randn((8, v.numel()), generator=torch.Generator().manual_seed(PROBE_SEED + 1),
                            dtype=torch.float64)
            prints[name] = {"behaviour": [round(float(p), 6) for p in (r @ v) / v.numel() ** 0.5]}
    return prints
