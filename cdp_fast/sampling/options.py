"""The arguments of :func:`cdp_fast.sample`, one frozen object per concern, built and checked
once and passed down: :class:`GuidanceOptions` (what to guide with: Algorithm 1's loss and its
pairs), :class:`SolverOptions` (the schedule and the solver) and :class:`RunOptions` (how many,
in which batches, where to). :func:`checked` raises a ValueError naming the first bad argument
and returns the objects with numpy scalars turned into the Python numbers they hold (the
manifest compares them on resume).

Also here: the authors' guidance window, the steps for a requested NFE, and the arguments a
resumed run must repeat (:func:`manifest_args`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from cdp_fast.diffusion.adapters import SigmaDenoiser
from cdp_fast.diffusion.schedule import SKIPS
from cdp_fast.diffusion.schedule import timesteps as make_timesteps
from cdp_fast.diffusion.solvers import SOLVERS, nfe_of
from cdp_fast.guidance.options import LOSSES, check_options
from cdp_fast.sampling.stream import fingerprint
from cdp_fast.utils import runtime
from cdp_fast.utils.checks import check_number, is_int

__all__ = ["GuidanceOptions", "SolverOptions", "RunOptions", "checked", "default_skip", "authors_window", "steps_for",
           "denoiser_settings", "manifest_args"]


@dataclass(frozen=True, eq=False)
class GuidanceOptions:
    """The guidance arguments of :func:`cdp_fast.sample` (see its docstring); ``loss`` None
    means no guidance ("none" is turned into None by :func:`checked`)."""

    loss: Optional[str] = "hnm"
    features: Optional[Callable] = None
    embedding: Any = "auto"
    guide_window: Any = "auto"
    lam: Optional[float] = None
    tau: Optional[float] = None
    tau_plus: float = 0.1
    beta: float = 1.0
    positive: str = "previous"
    negatives: str = "batch"
    real: Optional[torch.Tensor] = None
    form: Optional[str] = None


@dataclass(frozen=True, eq=False)
class SolverOptions:
    """The schedule and the solver: ``steps`` of ``skip`` spacing on a T-step ᾱ table (from
    ``betas`` or a foreign ``alphas_cumprod``), or ``nfe`` network evaluations."""

    solver: str = "ddim"
    steps: int = 200
    skip: Optional[str] = None
    eta: float = 0.0
    T: int = 1000
    betas: Any = "linear"
    alphas_cumprod: Any = None
    nfe: Optional[int] = None
    clip_x0: Optional[bool] = None
    init_std: float = 1.0


@dataclass(frozen=True, eq=False)
class RunOptions:
    """A run: ``n`` samples of ``image_shape`` in batches of ``batch_size``, their classes and
    labeller, and where they go (memory, or ``out``'s shards)."""

    n: int
    num_classes: Optional[int] = None
    class_labels: Any = None
    labeler: Optional[Callable] = None
    image_shape: tuple = (3, 32, 32)
    batch_size: int = 512
    out: Any = None
    shard_size: Optional[int] = None
    output: str = "uint8"
    seed: int = 0
    device: Any = None
    dtype: Any = None
    compile: Any = "auto"
    progress: bool = True


def authors_window(T: int) -> tuple[int, int]:
    """The authors' CIFAR-10 guidance window scaled to T steps: t >= 0.4·T (their
    ``ddim-main-contrast/functions/denoising.py``: ``i >= 400`` at T = 1000)."""
    return (math.ceil(0.4 * T), T - 1)


def _check(g: GuidanceOptions, s: SolverOptions, r: RunOptions) -> None:
    """The sampling arguments (the loss's own are checked by ContrastiveGuidance)."""
    n, loss, batch_size, eta = r.n, g.loss, r.batch_size, s.eta
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if loss not in (None,) + LOSSES:
        raise ValueError(f"loss must be one of None, 'none', 'infonce', 'hnm'; got {loss!r}")
    check_options(positive=g.positive, negatives=g.negatives, embedding=g.embedding,
                  guide_window=None if g.guide_window == "auto" else g.guide_window, form=g.form)
    if s.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {s.solver!r}")
    if s.skip not in SKIPS:
        raise ValueError(f"skip must be one of {SKIPS} (or None: the solver's default), got {s.skip!r}")
    if s.clip_x0 not in (None, True, False):
        raise ValueError(f"clip_x0 must be None, True or False, got {s.clip_x0!r}")
    if s.solver != "ddpm" and s.clip_x0:
        raise ValueError(f"clip_x0=True needs solver='ddpm' (solver={s.solver!r} does not clip x̂_0)")
    if s.solver != "ddim" and eta not in (0, 0.0):
        raise ValueError(f"eta is a DDIM option; solver={s.solver!r} has no η (got eta={eta!r})")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not is_int(s.steps) or s.steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {s.steps!r}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if r.output not in ("uint8", "float"):
        raise ValueError(f"output must be 'uint8' or 'float', got {r.output!r}")
    shape = r.image_shape
    if not (isinstance(shape, (tuple, list)) and len(shape) >= 1 and all(is_int(v) and v >= 1 for v in shape)):
        raise ValueError(f"image_shape must be a tuple of positive ints, got {shape!r}")
    if r.compile not in ("auto", True, False):
        raise ValueError(f"compile must be 'auto', True or False, got {r.compile!r}")
    if not (isinstance(s.init_std, (int, float)) and math.isfinite(s.init_std) and s.init_std > 0):
        raise ValueError(f"init_std must be > 0, got {s.init_std!r}")
    if r.shard_size is not None and (not is_int(r.shard_size) or r.shard_size < 1):
        raise ValueError(f"shard_size must be an int >= 1, got {r.shard_size!r}")
    if r.num_classes is not None and (not is_int(r.num_classes) or r.num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {r.num_classes!r}")
    if r.class_labels is not None and len(r.class_labels) != n:
        raise ValueError(f"class_labels must hold n={n} labels, got {len(r.class_labels)}")
    if loss is None:
        return
    if batch_size < 2 and g.negatives in ("batch", "class"):
        raise ValueError("batch_size must be >= 2 for a contrastive loss with in-batch negatives "
                         f"(negatives={g.negatives!r}); got batch_size={batch_size}")
    if g.positive == "real" or g.negatives == "real":
        real = g.real
        if real is None:
            raise ValueError(f"real images are required for positive={g.positive!r} / negatives={g.negatives!r}")
        if not isinstance(real, torch.Tensor) or tuple(real.shape[1:]) != tuple(shape) or len(real) < 1:
            raise ValueError(f"real must be a tensor of shape (N, {', '.join(map(str, shape))}) "
                             f"in [-1, 1], got {tuple(getattr(real, 'shape', ()))}")
    if g.negatives == "class" and r.class_labels is None and r.labeler is None and r.num_classes is None:
        raise ValueError("negatives='class' needs class_labels, num_classes (a class-conditional "
                         "model) or a labeler to classify the current x0-prediction")


def _plain(v):
    """A numpy scalar as the Python number it holds; anything else as given."""
    return v.item() if isinstance(v, np.generic) else v


def default_skip(solver) -> str:
    """The spacing a solver gets when the caller names none: log-SNR for DPM-Solver++ (its
    authors' recommendation, and the most accurate of the three on an exact-score Gaussian:
    std error 3.6 / 1.8 / 0.6% at 10 / 20 / 50 NFE, against 9–18% / 2–4% / 0.6% for quadratic /
    uniform — README "Fast solvers"), quadratic for DDIM and DDPM (the paper's)."""
    return "logsnr" if solver == "dpmpp_2m" else "quadratic"


def checked(g: GuidanceOptions, s: SolverOptions, r: RunOptions):
    """(g, s, r) checked (ValueError naming the first bad argument) and normalised: loss "none"
    is None, ``skip`` None is the solver's default (:func:`default_skip`), numpy scalars are
    Python numbers, ``image_shape`` is a tuple."""
    if g.loss == "none":
        g = dataclasses.replace(g, loss=None)
    if s.skip is None:
        s = dataclasses.replace(s, skip=default_skip(s.solver))
    _check(g, s, r)
    if r.out is not None and not str(r.out).strip():
        raise ValueError("out: an empty path; give a directory (or out=None to keep the samples in memory)")
    g = dataclasses.replace(g, **{k: _plain(getattr(g, k)) for k in ("lam", "tau", "tau_plus", "beta")})
    s = dataclasses.replace(s, **{k: _plain(getattr(s, k)) for k in ("steps", "T", "eta", "init_std")})
    r = dataclasses.replace(r, image_shape=tuple(_plain(v) for v in r.image_shape),
                            **{k: _plain(getattr(r, k)) for k in ("n", "batch_size", "seed", "shard_size",
                                                                  "num_classes")})
    check_number("seed", r.seed, integer=True)
    runtime.check_dtype(r.dtype)
    return g, s, r


def denoiser_settings(model, solver):
    """What of a SigmaDenoiser's settings the run depends on (manifest): the σ range and ρ only
    for Heun (the other solvers see the ε-view on the table), the label format always."""
    if not isinstance(model, SigmaDenoiser):
        return None
    st = model.settings()
    return st if solver == "heun" else {"one_hot_classes": st["one_hot_classes"]}


def steps_for(solver, nfe, steps, T, skip, alphas_cumprod=None) -> int:
    """``steps`` for a requested NFE: Heun (nfe + 1)/2 levels; the timestep solvers the fewest
    steps whose distinct timesteps number ``nfe`` (a quadratic sequence repeats small t).
    ``alphas_cumprod``: the run's ᾱ table (``skip="logsnr"`` needs it)."""
    if nfe is None:
        return steps
    if not is_int(nfe) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    if solver == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"nfe: solver='heun' makes 2·steps − 1 evaluations; give an odd nfe, got {nfe}")
        return (nfe + 1) // 2
    for k in range(nfe, T + 1):
        got = nfe_of(solver, make_timesteps(T, k, skip, alphas_cumprod=alphas_cumprod))
        if got == nfe:
            return k
        if got > nfe:
            break
    raise ValueError(f"nfe: no number of {skip!r} steps of T={T} gives exactly {nfe} distinct timesteps")


def _jsonable(v):
    """numpy scalars and arrays as Python values (an np.int64 is the int it holds)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def manifest_args(model, n, kw, behaviour=None):
    """The arguments a resumed run must repeat, JSON-serialisable."""
    import json

    args = dict(kw)
    args["n"] = int(n)
    args["model"] = fingerprint(model)
    for k in ("features", "labeler", "real", "class_labels", "alphas_cumprod"):
        args[k] = fingerprint(args.get(k))
    args.update(behaviour or {})          # plain callables: what they compute, not their name
    if args.get("guide_window") is not None:
        args["guide_window"] = list(args["guide_window"])
    if isinstance(args.get("betas"), torch.Tensor):
        args["betas"] = fingerprint(args["betas"])
    return json.loads(json.dumps(args, default=_jsonable))
