"""The whole guided step in one CUDA graph: :class:`StepGraph`.

A *steady* guided step — ε_θ(x_t, t); the feature network's forward and its backward to x_t;
the contrastive loss and its backward (the Triton kernels); the online head's Adam step; the
guidance-strength ratio λ‖∇ℓ_i‖/‖ε_i‖ — does the same device work at every step of every
batch: only the values of x_t, t, y and the previous step's features change. So it is
captured once per batch shape as a ``torch.cuda.CUDAGraph`` over static buffers and replayed:
a guided step then launches one graph plus the solver's update (its coefficients change every
step, so the fused DDIM kernel — one launch — stays outside), instead of hundreds of kernels
and the Python between them (the "whole-network capture" of PyTorch's CUDA-graph notes:
forward, ``autograd.grad`` and ``optimizer.step`` inside one ``torch.cuda.graph``).

Steady (captured) means: :attr:`ContrastiveGuidance.graphable` (positive="previous",
negatives "batch" or "real"), not the first step of a trajectory, inside the guide window, the
previous step's features at hand, and the online head (if any) already made. Everything else
runs uncaptured through :func:`cdp_fast.diffusion.solvers.evaluate_step`: the first step, steps outside
the window and the first one inside it, the step that creates the head, class negatives
(per-batch labels / a labeler's argmax at this step's ᾱ_t) and real positives (per-batch
rows), plus ``warmup`` steady steps before each capture (on a side stream, as capture
requires). A capture is made per kind of step, batch shape, autocast state and — for guided
steps — online head and guidance settings: once per call of :func:`cdp_fast.sample`, or once
per shard with a head. If a capture fails (a model that syncs with the host, data-dependent
shapes, autocast with its weight cache on), a warning names the cause and the rest runs
uncaptured: same results, no graph.

Requirements the captured step meets: no host synchronisation (the guidance keeps its
statistics as tensors; the noise is counter-based, :func:`cdp_fast.utils.seeding.counter_normal`),
the head's Adam is ``capturable`` on CUDA (its step count lives on the device), and state that
outlives a step lives in static buffers (the previous features are copied into one).
Replayed outputs are overwritten by the next replay: ε is copied out (the callback may keep
it), g is consumed by the update before the next replay.

On CPU there is no graph: the same code runs each steady step eagerly through the static
buffers, and the step that would be captured is run under a check that raises on a host
synchronisation (``.item()``, ``bool(tensor)``, ``nonzero``; except inside ``torch.optim``,
whose CPU Adam reads its step count on the host where CUDA's capturable one does not) — so
the plumbing and the capturability of the step are tested without a GPU
(tests/test_graphs.py); the capture itself runs only on CUDA (a gpu-marked test compares it
with the uncaptured loop). Not yet run on a GPU.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cdp_fast.guidance.contrastive import ContrastiveGuidance
from cdp_fast.diffusion.solvers import check_eps, evaluate_step

__all__ = ["StepGraph", "HostSyncError", "wanted"]

#: batch shapes (graphs) kept per StepGraph; a run of sample() has one (guided batches are
#: always computed at full batch size)
MAX_GRAPHS = 4


def wanted(device: torch.device, compile, solver: str, guidance=None) -> bool:
    """Whether :func:`cdp_fast.sample` runs its steps through a :class:`StepGraph`, by the
    ``CDP_FAST_STEP_GRAPH`` environment variable: unset or "auto" — on CUDA when compiling
    (``compile`` True or "auto"); "0" — never (the ε-model alone is graphed, by
    ``torch.compile(mode="reduce-overhead")``); "1" — always, CPU included (uncaptured there:
    a way to test the plumbing). Heun calls the ε-model in σ-space and never uses one; a
    guidance that is not :attr:`~ContrastiveGuidance.graphable` (class negatives, real
    positives) would have no step captured, so "auto" leaves the ε-model its own graphs."""
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
    if func._overloadname not in ("Tensor", "self_Tensor"):
        return False
    pos = 1 if func._overloadname == "Tensor" else 3
    size = (kwargs or {}).get("output_size", args[pos] if len(args) > pos else None)
    return size is None


class _NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on an op that needs the data on the host (what a CUDA graph
    capture refuses), except inside ``torch.optim`` (see the module docstring). Caught:
    ``.item()`` / ``float()`` / ``bool()`` of a tensor, ``nonzero``, boolean-mask indexing,
    ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``,
    ``equal``. Not caught (no op reaches the dispatcher for them on CPU): ``.cpu()``,
    ``.tolist()``, ``.numpy()`` — on CUDA the capture itself refuses those."""

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
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/optim/" in path:
            return True
        frame = frame.f_back
    return False


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

    def fits(self, kind, eps_model, guidance, x, y) -> bool:
        if self.kind != kind or not _same_model(self.eps_model, eps_model):
            return False
        if kind == "guided" and not (self.guidance is guidance and self.head is guidance.head
                                     and self.settings == guidance.settings_key()
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


def _same_model(a, b) -> bool:
    """Two :class:`EpsModel` adapters running the same network the same way (the solvers wrap a
    bare model in a new adapter per call)."""
    def runner(e):
        return getattr(e.runner, "__func__", e.runner)
    return a is b or (a.model is b.model and runner(a) is runner(b))


class StepGraph:
    """Runs the ε-model and the guidance of a sampling step — one CUDA graph per kind of step
    and batch shape for the steady steps (see the module docstring), :func:`cdp_fast.diffusion.solvers.
    evaluate_step` for the rest. Pass it as ``step_graph=`` to :func:`cdp_fast.guided_ddim`,
    ``guided_ddpm`` or ``guided_dpmpp_2m`` (:func:`cdp_fast.sample` does on CUDA when
    compiling); one StepGraph may serve many batches and calls (the graphs are kept).

    Kinds: "guided" (a steady guided step: ε-model + guidance) and "plain" (the ε-model alone:
    no guidance, or a :class:`ContrastiveGuidance` step outside its window or with λ = 0, whose
    call then only updates its host-side state and is made as usual after the graph).

    A graph is made (``warmup`` uncaptured steps, then the capture) per kind of step, batch
    shape, autocast state and — for guided steps — online head and guidance settings: so once
    per shard of a :func:`cdp_fast.sample` run with a head (each shard starts a new head; the
    previous head's graph is released), once per call without one.

    Args:
        warmup: uncaptured steady steps before each capture (≥ 1), on a side stream as the
            CUDA-graph notes ask. The uncaptured first steps of a trajectory have already run
            (and compiled) the same networks at the same shapes, so 1 is the default.

    ``counts``: how many steps ran "eager" (neither kind), "warmup", "captured" (the capture
    step, then replayed once), "replayed"; ``disabled``: why graphs were given up, or None.
    A :class:`ContrastiveGuidance` is driven only through its capturable-guidance protocol
    (``device_step``, ``record``, ``prev_features``, ``head``, ``settings_key()``,
    ``make_capturable()``: its online head's Adam keeps its step count on the device on CUDA,
    as a captured step needs), never through its private state.
    """

    def __init__(self, warmup: int = 1):
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1):
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.warmup = warmup
        self.counts = {"eager": 0, "warmup": 0, "captured": 0, "replayed": 0}
        self.disabled = None
        self._entries: list[_Entry] = []
        self._streams = {}                    # device -> its capture stream

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
        for e in self._entries:
            if e.fits(kind, eps_model, guidance, x, y):
                return e
        if kind == "guided":
            # the same guidance with another head or settings: its old graph is dead weight
            # (one pool of activations each), release it
            self._entries = [e for e in self._entries if not (e.kind == "guided" and e.guidance is guidance)]
        if len(self._entries) >= MAX_GRAPHS:
            self._entries.pop(0)              # the oldest: its graph is released
        e = _Entry(kind, eps_model, guidance, x, y)
        self._entries.append(e)
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
                self._entries.clear()
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
            # the next replay overwrites the static outputs: ε may outlive the step (callback);
            # g is consumed by the update and r reduced below, both before the next replay
            eps = eps.clone()
        if kind == "plain":
            if guidance is not None:
                guidance(x, t, eps, step)     # host-side bookkeeping only (returns None)
            return eps, None, 0.0
        guidance.record(x, t, entry.pos, r)
        return eps, g, guidance.lam

    def _capture(self, entry, t, cuda):
        """Capture the step (CUDA) and replay it once; on CPU, run it under the host-sync check."""
        if _autocast_state(entry.x.device)[0] and torch.is_autocast_cache_enabled():
            raise RuntimeError("autocast's weight-cast cache is on (torch.autocast(..., cache_enabled=True)): "
                               "a graph would read cast copies freed when the region ends; use "
                               "cache_enabled=False (cdp_fast.sample does)")
        if not cuda:
            with _NoHostSync():
                entry.outs = entry.step(t)
            return entry.outs
        dev = entry.x.device
        with torch.cuda.device(dev):
            # a capture stream of the run's device: torch.cuda.graph's default is one stream
            # made on whichever device was current at its first use (a second GPU's capture
            # would then record nothing)
            stream = self._streams.setdefault(str(dev), torch.cuda.Stream(device=dev))
            before = torch.cuda.current_stream(dev)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: another thread's CUDA work (a user's loader) does not void it
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    outs = entry.step(t)
            except BaseException:
                # a failed capture leaves its stream current (torch.cuda.graph's exit raises
                # before restoring it): put the run's stream back
                torch.cuda.set_stream(before)
                raise
            entry.graph, entry.outs = graph, outs
            graph.replay()
        return outs


def _cause(e: BaseException) -> str:
    """The first failure behind ``e`` (a failed capture raises again on its way out, hiding
    the cause), as "Type: first line"."""
    while e.__context__ is not None and e.__context__ is not e:
        e = e.__context__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _on_side_stream(device, fn, *args):
    """``fn(*args)`` on a side stream of ``device``, as CUDA-graph warm-up must run (PyTorch's
    CUDA-graph notes: warm up on a side stream before capturing)."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn(*args)
    main.wait_stream(side)
    return out
