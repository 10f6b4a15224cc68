"""The whole guided step in one CUDA graph: :class:`StepGraph`.

A *steady* guided step — ε_θ(x_t, t); the feature network's forward and its backward to x_t;
the contrastive loss and its backward (the Triton kernels); the online head's Adam step; the
ratio λ‖∇ℓ_i‖/‖ε_i‖ — does the same device work at every step of every batch: only the values
of x_t, t, y and the previous step's features change. So it is captured as a
``torch.cuda.CUDAGraph`` over static buffers and replayed: one graph launch plus the solver's
update (its coefficients change every step: the fused DDIM kernel stays outside) instead of
hundreds of kernels and the Python between them (the "whole-network capture" of PyTorch's
CUDA-graph notes: forward, ``autograd.grad`` and ``optimizer.step`` in one ``torch.cuda.graph``).

Steady (captured): :attr:`ContrastiveGuidance.graphable` (positive="previous", negatives
"batch" or "real"), not a trajectory's first step, inside the guide window, the previous
step's features at hand, the online head (if any) made. The rest runs uncaptured through
:func:`cdp_fast.diffusion.solvers.evaluate_step` (first steps, steps outside the window and
the first inside it, the step that makes the head, class negatives, real positives), plus
``warmup`` steady steps before each capture (on a side stream, as capture requires). A capture
is made per kind of step, batch shape, autocast state, process-wide GEMM settings and — for
guided steps — online head and guidance settings. :func:`cdp_fast.sample` keeps its captures
for the process (``StepGraph(shared=True)``, at most :data:`MAX_SHARED`, :func:`clear_cache`):
a later call with the same networks (module, weight storages, kind of runner), shapes and
settings replays them with no warm-up, capture, ``synchronize`` or ``empty_cache``; a guided
step with an online head is captured once per head (each shard starts one). A failed capture
(a host sync, data-dependent shapes, autocast's weight cache on) warns with the cause and the
rest runs uncaptured: same results, no graph.

The captured step meets the requirements: no host synchronisation (statistics kept as tensors;
counter-based noise, :func:`cdp_fast.utils.seeding.counter_normal`), the head's Adam
``capturable`` on CUDA (step count on the device), state that outlives a step in static
buffers. Replayed outputs are overwritten by the next replay: ε is copied out (the callback
may keep it), g is consumed by the update before the next replay.

On CPU there is no graph: each steady step runs eagerly through the static buffers, and the
step that would be captured runs under a check that raises on a host synchronisation
(``.item()``, ``bool(tensor)``, ``nonzero``; not inside ``torch.optim``, whose CPU Adam reads
its step count on the host where CUDA's capturable one does not): plumbing and capturability
are tested without a GPU (tests/test_graphs.py); the capture itself only on CUDA (gpu-marked).
Not yet run on a GPU.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.diffusion.solvers import check_eps, evaluate_step

__all__ = ["StepGraph", "HostSyncError", "wanted", "clear_cache", "MAX_SHARED"]

MAX_GRAPHS = 4   #: graphs kept per StepGraph (sample() needs one per kind: full-size batches)
#: graphs kept for the process by StepGraph(shared=True) (sample()), least recently used
#: dropped first: each holds a memory pool with the step's activations
MAX_SHARED = 4
_SHARED: list = []


def clear_cache() -> None:
    """Release the graphs sample() keeps (buffers, memory pools, the networks they read)."""
    _SHARED.clear()


def wanted(device: torch.device, compile, solver: str, guidance=None) -> bool:
    """Whether :func:`cdp_fast.sample` runs its steps through a :class:`StepGraph`, by
    ``CDP_FAST_STEP_GRAPH``: unset or "auto" — on CUDA when compiling (``compile`` True or
    "auto"); "0" — never (the ε-model alone is graphed, ``mode="reduce-overhead"``); "1" —
    always, CPU included (uncaptured there: tests the plumbing). Heun never uses one; a guidance
    that is not :attr:`~ContrastiveGuidance.graphable` has no step captured, so "auto" skips it."""
    setting = os.environ.get("CDP_FAST_STEP_GRAPH", "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"CDP_FAST_STEP_GRAPH must be auto, 0 or 1, got {setting!r}")
    if solver == "heun" or setting == "0":
        return False
    return setting == "1" or (torch.device(device).type == "cuda" and compile in (True, "auto")
                              and (guidance is None or guidance.graphable))


class HostSyncError(RuntimeError):
    """A step meant for capture synchronised with the host (CPU check of capturability)."""


_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "equal", "is_nonzero", "bincount"}
# indexing with a boolean mask: the result's size is data (a sync, as nonzero)
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_mask(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (idx or ()))


def _sized_by_data(func, args, kwargs) -> bool:
    """repeat_interleave with tensor repeats and no output_size: the output size is data."""
    pos = {"Tensor": 1, "self_Tensor": 3}.get(func._overloadname)
    return pos is not None and (kwargs or {}).get("output_size", args[pos] if len(args) > pos else None) is None


class _NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on an op that needs the data on the host (what a capture
    refuses), except inside ``torch.optim``: ``.item()``/``float()``/``bool()``, ``nonzero``,
    boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``, ``equal``,
    ``repeat_interleave`` without ``output_size``. Not ``.cpu()``/``.tolist()``/``.numpy()``
    (no op reaches the dispatcher on CPU; on CUDA the capture refuses them)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (name in _SYNC_OPS or (name in _INDEX_OPS and _has_mask(args))
                or (name == "repeat_interleave" and _sized_by_data(func, args, kwargs))) \
                and not _inside_optimizer():
            raise HostSyncError(f"aten.{name} needs the data on the host (a host synchronisation; "
                                "a CUDA graph cannot capture it)")
        return func(*args, **(kwargs or {}))


def _inside_optimizer() -> bool:
    frame = sys._getframe(2)
    while frame is not None and "/torch/optim/" not in frame.f_code.co_filename.replace("\\", "/"):
        frame = frame.f_back
    return frame is not None


class _Entry:
    """Static buffers, the step function and (CUDA) the graph of one kind of step ("guided":
    ε-model and guidance; "plain": the ε-model alone) for one batch shape."""

    def __init__(self, kind, eps_model, guidance, x, y):
        self.kind, self.eps_model = kind, eps_model
        self.guidance = guidance if kind == "guided" else None
        self.head = guidance.head if kind == "guided" else None
        self.settings = guidance.settings_key() if kind == "guided" else None
        self.autocast = _autocast_state(x.device)
        self.x = torch.empty_like(x)                                   # keeps x's memory format
        self.t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.y = None if y is None else y.detach().clone()
        self.pos = torch.empty_like(guidance.prev_features) if kind == "guided" else None   # (B, d) fp32
        self.runs, self.graph, self.outs = 0, None, None
        # what another call must match (shared); held eps_model/guidance keep these ids unique
        self.thread, self.model, self.glob = threading.get_ident(), _model_key(eps_model), _global_state()
        self.real = _real_state(guidance) if kind == "guided" else None

    def fits(self, kind, eps_model, guidance, x, y, model_key=None) -> bool:
        """Whether this capture does the step's work; ``model_key`` given (shared): another
        call's new adapter and guidance may match (same module, storages, kind of runner)."""
        shared = model_key is not None
        if self.kind != kind or (shared and (self.thread != threading.get_ident() or self.model != model_key
                                             or self.glob != _global_state())):
            return False
        if not shared and not _same_model(self.eps_model, eps_model):
            return False
        if kind == "guided":
            same = self.guidance is guidance and self.head is guidance.head
            if shared and not same:   # no head (new state per trajectory), same networks and rows
                same = (self.head is None and guidance.head is None and self.real == _real_state(guidance)
                        and self.guidance.features is guidance.features)
            if not (same and self.settings == guidance.settings_key()
                    and self.pos.shape == guidance.prev_features.shape):
                return False
        return (self.autocast == _autocast_state(x.device)
                and self.x.shape == x.shape and self.x.dtype == x.dtype and self.x.device == x.device
                and self.x.stride() == x.stride() and (self.y is None) == (y is None)
                and (y is None or self.y.shape == y.shape))

    def load(self, x, t, y, prev_raw):
        self.x.copy_(x)
        self.t.fill_(t)
        if y is not None:
            self.y.copy_(y)
        if self.kind == "guided" and prev_raw is not self.pos:
            self.pos.copy_(prev_raw)

    def step(self, t):
        """(ε, g, r) from the static buffers ("plain": g, r None); a guided step's features
        become the next positives."""
        with torch.no_grad():
            eps = self.eps_model(self.x, self.t, self.y)
        eps = eps.to(self.x.dtype)
        if self.kind == "plain":
            return eps, None, None
        g, raw, r = self.guidance.device_step(self.x, t, eps, self.pos)
        self.pos.copy_(raw)                   # after the loss read the old positives (stream order)
        return eps, g, r


def _autocast_state(device):
    """(enabled, dtype, cache) of autocast for ``device``'s type: baked into a capture."""
    kind = torch.device(device).type
    return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled())


def _model_key(e) -> tuple:
    """(network, kind of runner: its forward or what compiled it, weight storages: a graph reads
    them where they are, so in-place updates are seen and replaced tensors are not)."""
    run = e.runner
    kind = "forward" if getattr(run, "__self__", None) is e else (
        getattr(run, "__module__", None), getattr(run, "__qualname__", type(run).__qualname__),
        hasattr(run, "_torchdynamo_orig_callable"))
    mod = e.module
    ptrs = () if mod is None else tuple(t.data_ptr() for t in itertools.chain(mod.parameters(), mod.buffers()))
    return id(e.model), kind, ptrs


def _real_state(guidance):
    """The real bank (negatives="real") by identity and version: f(real) is baked in."""
    real = guidance.real
    return (id(real), real._version) if isinstance(real, torch.Tensor) else id(real)


def _global_state() -> tuple:
    """Process-wide settings a capture bakes in (GEMM precision and algorithm choices)."""
    b = torch.backends
    return (torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32,
            b.cuda.matmul.allow_bf16_reduced_precision_reduction, b.cuda.matmul.allow_fp16_reduced_precision_reduction,
            b.cudnn.benchmark, b.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())


def _same_model(a, b) -> bool:
    """Two :class:`EpsModel` adapters running the same network the same way (the solvers wrap a
    bare model in a new adapter per call)."""
    def runner(e):
        return getattr(e.runner, "__func__", e.runner)
    return a is b or (a.model is b.model and runner(a) is runner(b))


class StepGraph:
    """Runs the ε-model and the guidance of a sampling step: one CUDA graph per kind of step
    and batch shape for the steady steps (module docstring), :func:`cdp_fast.diffusion.solvers.
    evaluate_step` for the rest. Pass it as ``step_graph=`` to :func:`cdp_fast.guided_ddim`,
    ``guided_ddpm`` or ``guided_dpmpp_2m``; one StepGraph may serve many batches and calls.
    Kinds: "guided" (ε-model + guidance) and "plain" (the ε-model alone: no guidance, or a
    step outside the window or with λ = 0, whose guidance call then only updates host state).
    A graph (``warmup`` uncaptured steps, then the capture) is made once per head with one, else
    once per kind, shape and settings (module docstring).

    Args:
        warmup: uncaptured steady steps before each capture (≥ 1), on a side stream as the
            CUDA-graph notes ask (the trajectory's first, uncaptured steps compiled already).
        shared: keep the graphs for the process, not this object (:func:`cdp_fast.sample`).

    ``counts``: steps run "eager" (neither kind), "warmup", "captured" (then replayed once),
    "replayed"; ``disabled``: why graphs were given up, or None. A :class:`ContrastiveGuidance`
    is driven only through its capturable-guidance protocol (``device_step``, ``record``,
    ``prev_features``, ``head``, ``settings_key()``, ``make_capturable()``, ``features``,
    ``real``), never through its private state.
    """

    def __init__(self, warmup: int = 1, shared: bool = False):
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1):
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.warmup, self.shared = warmup, bool(shared)
        self.counts = {"eager": 0, "warmup": 0, "captured": 0, "replayed": 0}
        self.disabled = None
        self._own: list[_Entry] = []
        self._streams, self._memo = {}, None  # device -> its capture stream; (adapter, its key)

    @property
    def _entries(self) -> list:
        """This object's entries, or the process's (``shared``; this thread's first)."""
        return _SHARED if self.shared else self._own

    def kind(self, guidance, x, t, step):
        """"guided", "plain" or None (run uncaptured) for this step: host state only, no data
        is read (see the module docstring for what is steady)."""
        if self.disabled is not None:
            return None
        if guidance is None:
            return "plain"
        if not isinstance(guidance, ContrastiveGuidance):
            return None
        if guidance.lam == 0 or not guidance.in_window(t):
            return "plain"
        prev = guidance.prev_features
        if (guidance.graphable and step > 0 and prev is not None and prev.shape[0] == x.shape[0]
                and (guidance.embedding is None or guidance.head is not None)):
            return "guided"
        return None

    def _entry(self, kind, eps_model, guidance, x, y):
        entries = self._entries
        if self.shared and (self._memo is None or self._memo[0] is not eps_model):
            self._memo = (eps_model, _model_key(eps_model))      # once per adapter, not per step
        key = self._memo[1] if self.shared else None
        for e in entries:
            if e.fits(kind, eps_model, guidance, x, y, key):
                if self.shared:               # most recently used last
                    entries.append(entries.pop(entries.index(e)))
                return e
        if kind == "guided":   # this guidance's older graphs, another call's head's: dead weight
            me = threading.get_ident()
            entries[:] = [e for e in entries if not (e.kind == "guided" and e.thread == me and (
                e.guidance is guidance or (self.shared and e.head is not None)))]
        while entries and len(entries) >= (MAX_SHARED if self.shared else MAX_GRAPHS):
            entries.pop(0)                    # the least recently used: its graph is released
        e = _Entry(kind, eps_model, guidance, x, y)
        entries.append(e)
        return e

    def evaluate(self, eps_model, guidance, x, t, step, y):
        """(ε, g or None, λ) at (x_t, t), as :func:`cdp_fast.diffusion.solvers.evaluate_step`."""
        if isinstance(guidance, ContrastiveGuidance):
            guidance.make_capturable()
        kind = self.kind(guidance, x, t, step)
        if kind is None:
            self.counts["eager"] += 1
            return evaluate_step(eps_model, guidance, x, t, step, y)
        entry = self._entry(kind, eps_model, guidance, x, y)
        entry.load(x, t, y, guidance.prev_features if kind == "guided" else None)
        cuda = x.device.type == "cuda"
        if entry.runs < self.warmup:
            outs = _on_side_stream(entry.x.device, entry.step, t) if cuda else entry.step(t)
            self.counts["warmup"] += 1
        elif entry.outs is None:
            try:
                outs = self._capture(entry, t, cuda)
            except Exception as e:        # noqa: BLE001 — any capture failure: run uncaptured
                self.disabled = _cause(e)
                warnings.warn(f"cdp_fast: capturing the sampling step in a CUDA graph failed ({self.disabled}); "
                              "running it uncaptured (same results, no graph)", RuntimeWarning, stacklevel=3)
                me = threading.get_ident()    # (shared: this thread's entries only)
                self._entries[:] = [e for e in self._entries if self.shared and e.thread != me]
                self.counts["eager"] += 1
                return evaluate_step(eps_model, guidance, x, t, step, y)
            self.counts["captured"] += 1
        else:
            if cuda:
                with torch.cuda.device(entry.x.device):
                    entry.graph.replay()
            else:                             # CPU: run the step, write the static outputs as a replay does
                for static, new in zip(entry.outs, entry.step(t)):
                    if static is not None:
                        static.copy_(new)
            outs = entry.outs
            self.counts["replayed"] += 1
        entry.runs += 1
        eps, g, r = outs
        check_eps(eps, x, step, t)
        if outs is entry.outs:
            eps = eps.clone()     # the next replay overwrites it (g, r are used before that)
        if kind == "plain":
            if guidance is not None:
                guidance(x, t, eps, step)     # host-side bookkeeping only (returns None)
            return eps, None, 0.0
        guidance.record(x, t, entry.pos, r)
        return eps, g, guidance.lam

    def _capture(self, entry, t, cuda):
        """Capture the step (CUDA) and replay it once; on CPU, run it under the host-sync check."""
        if _autocast_state(entry.x.device)[0] and torch.is_autocast_cache_enabled():
            raise RuntimeError("autocast's weight-cast cache is on (torch.autocast(..., cache_enabled=True)): a graph "
                               "would read cast copies freed when the region ends; use cache_enabled=False")
        if not cuda:
            with _NoHostSync():
                entry.outs = entry.step(t)
            return entry.outs
        dev = entry.x.device
        with torch.cuda.device(dev):
            # a capture stream of the run's device (torch.cuda.graph's default is made on the
            # device current at its first use: a second GPU's capture would record nothing)
            stream = self._streams.setdefault(str(dev), torch.cuda.Stream(device=dev))
            before = torch.cuda.current_stream(dev)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: another thread's CUDA work (a user's loader) does not void it
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    outs = entry.step(t)
            except BaseException:
                # a failed capture leaves its stream current: put the run's stream back
                torch.cuda.set_stream(before)
                raise
            entry.graph, entry.outs = graph, outs
            graph.replay()
        return outs


def _cause(e: BaseException) -> str:
    """The first failure behind ``e`` (a failed capture raises again, hiding it): "Type: line"."""
    while e.__context__ is not None and e.__context__ is not e:
        e = e.__context__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _on_side_stream(device, fn, *args):
    """``fn(*args)`` on a side stream of ``device``, as CUDA-graph warm-up must run."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn(*args)
    main.wait_stream(side)
    for t in out:   # made on the side stream, used on the main one: not reused before main is done
        if isinstance(t, torch.Tensor):
            t.record_stream(main)
    return out
