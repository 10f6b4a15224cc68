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
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from cdp_fast.data.samples import integer_labels
from cdp_fast.diffusion.adapters import SigmaDenoiser
from cdp_fast.diffusion.schedule import SKIPS, karras_sigmas, sigma_to_t, sigmas_of
from cdp_fast.diffusion.schedule import timesteps as make_timesteps
from cdp_fast.diffusion.solvers import SOLVERS, nfe_of
from cdp_fast.guidance.options import LOSSES, PAPER_DEFAULTS, check_options
from cdp_fast.models.ranges import SAMPLER_RANGE, check_range_contract
from cdp_fast.sampling.fingerprints import fingerprint
from cdp_fast.utils import runtime
from cdp_fast.utils.checks import check_number, is_int

__all__ = ["GuidanceOptions", "SolverOptions", "RunOptions", "checked", "default_skip", "authors_window", "steps_for",
           "denoiser_settings", "manifest_args", "check_model", "check_schedule", "heun_sigmas", "check_window",
           "START_SIGNAL_WARN", "check_networks"]


@dataclass(frozen=True, eq=False)
class GuidanceOptions:
    """The guidance arguments of :func:`cdp_fast.sample` (see its docstring); ``loss`` None
    means no guidance ("none" is turned into None by :func:`checked`). ``features`` is a
    callable on [-1, 1] images or "pixels" (the explicit choice of flattened pixels, which
    :func:`checked` turns into None, the guidance's pixel space); None is refused when guided
    (:func:`check_networks`)."""

    loss: Optional[str] = "hnm"
    features: Any = None
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
    if r.class_labels is not None:
        _check_class_labels(r.class_labels, n, r.num_classes)
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


def _check_class_labels(class_labels, n, num_classes) -> None:
    """n integer classes, in [0, num_classes) when the model is class-conditional (D19: a label
    out of range would be fed to the model and written as the sample's label, or fail mid-run)."""
    cl = class_labels
    a = integer_labels(cl.detach().cpu().numpy() if isinstance(cl, torch.Tensor) else cl, "class_labels")
    if len(a) != n:
        raise ValueError(f"class_labels must hold n={n} labels, got {len(a)}")
    if num_classes is not None and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"class_labels must lie in [0, num_classes) = [0, {num_classes}) for a class-conditional "
                         f"model; got values in [{a.min():g}, {a.max():g}]")


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
    check_networks(g, r)
    if isinstance(g.features, str):      # "pixels": the guidance's pixel space, no feature network
        g = dataclasses.replace(g, features=None)
    return g, s, r


def check_networks(g: GuidanceOptions, r: RunOptions) -> None:
    """The feature map and the labeller against the sampler's image range (issue 23, F1, F7).

    - Guided (``loss`` set): ``features`` must be given — a callable on x_t (about [-1, 1]) or
      ``"pixels"`` — because the paper's λ (1e5 HNM, 2e4 InfoNCE) is tuned for WRN-28-10
      features and would silently apply to raw pixels otherwise; ``"pixels"`` needs an
      explicit ``lam`` for the same reason (no λ default exists for pixel space; τ keeps its
      default, as it acts on cosine similarities, which do not depend on the space's scale).
    - ``features`` and ``labeler`` are called on images in [-1, 1]: a network that declares
      another range (the package's [0, 1] classifiers, or an ``accepts_range`` attribute) is a
      ValueError naming the adapter; an ``nn.Module`` that declares none is warned about
      (:func:`cdp_fast.models.ranges.check_range_contract` states the rule and its limits).
      Plain functions are taken as written for [-1, 1]."""
    f = g.features
    if g.loss is not None:
        lam_default = PAPER_DEFAULTS[g.loss]["lam"]
        if f is None:
            raise ValueError(f"features: loss={g.loss!r} guides on a feature map, but features=None; pass "
                             "features=cdp_fast.models.as_feature_extractor(classifier) (a classifier's features "
                             f"on x in [-1, 1]; the default lam={lam_default:g} is tuned for WRN-28-10 features), "
                             "features='pixels' with lam= to guide on the raw pixels, or loss=None")
        if isinstance(f, str) and f == "pixels" and g.lam is None:
            raise ValueError(f"lam: features='pixels' needs an explicit lam; the default lam={lam_default:g} is "
                             "tuned for WRN-28-10 features, not pixels (the guidance gradient's scale depends "
                             "on the space)")
    if isinstance(f, str) and f != "pixels" or not (f is None or isinstance(f, str) or callable(f)):
        raise ValueError(f"features must be a callable x (B, ...) in [-1, 1] -> (B, d), 'pixels' or None (no "
                         f"guidance), got {f!r}")
    # warnings point at sample()'s caller: check_range_contract <- check_networks <- checked <- sample
    if g.loss is not None and callable(f):
        check_range_contract(f, SAMPLER_RANGE, "features (called on x_t, about [-1, 1])",
                             "pass cdp_fast.models.as_feature_extractor(model, input_range=...) (or layer=...)",
                             warn_undeclared=True, stacklevel=4)
    check_range_contract(r.labeler, SAMPLER_RANGE, "labeler (called on x̂_0 in [-1, 1])",
                         "pass cdp_fast.models.as_labeler(model, input_range=(0, 1)) for a [0, 1] classifier",
                         warn_undeclared=True, stacklevel=4)


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


def check_model(model, num_classes) -> None:
    """A one-hot :class:`SigmaDenoiser` needs num_classes, and a slot for each class (D16, D17,
    D20): without num_classes it would never get a label (a silently unconditional run)."""
    k = model.one_hot_classes if isinstance(model, SigmaDenoiser) else None
    if k is None:
        return
    if num_classes is None:
        raise ValueError(f"SigmaDenoiser(one_hot_classes={k}) is a class-conditional network, but num_classes is "
                         "None: it would never receive class labels; pass num_classes (and class_labels to "
                         "choose the classes)")
    if k < num_classes:
        raise ValueError(f"SigmaDenoiser(one_hot_classes={k}) has fewer one-hot slots than num_classes="
                         f"{num_classes}; set one_hot_classes >= num_classes")


#: a run whose first timestep keeps more than this much of the image (√ᾱ) is warned about
START_SIGNAL_WARN = 0.2


def check_schedule(solver, abar, ts, nfe, skip) -> None:
    """The timesteps a DDIM/DDPM/DPM-Solver++ run walks, before any work: ValueError when the
    run would start with no noise (ᾱ = 1: A7), from t = 0 alone (x_T returned as it is: S4), or
    step DDPM through ᾱ = 1 (its variance divides by 1 − ᾱ_t: A6); a warning when the first
    timestep keeps more than :data:`START_SIGNAL_WARN` of the image (x_T ~ N(0, I) is then not
    what the model expects there: e.g. nfe=2 with skip="uniform" starts at t = T/2)."""
    if solver == "heun":
        return
    first, a0 = int(ts[0]), float(abar[int(ts[0])])
    if a0 >= 1:
        every = " (every entry is 1)" if bool((abar >= 1).all()) else ""
        raise ValueError(f"alphas_cumprod: ᾱ = 1 at t={first}, the run's first timestep{every}: σ = 0, no noise "
                         "level to start from; give a table with ᾱ < 1")
    if first == 0 and abar.numel() > 1:
        what = f"nfe={nfe}" if nfe is not None else f"steps={len(ts)}"
        raise ValueError(f"{what} with solver={solver!r}, skip={skip!r} gives the single timestep t=0: the noise "
                         f"x_T would be taken as an almost clean image (ᾱ_0 = {a0:.4g}) and returned as it is; "
                         "use nfe (or steps) >= 2, or skip='logsnr'")
    if solver == "ddpm":
        ones = [int(t) for t in ts if float(abar[int(t)]) >= 1]
        if ones:
            raise ValueError(f"alphas_cumprod: ᾱ = 1 at t={ones[0]}, a timestep solver='ddpm' samples: the DDPM "
                             "posterior divides by 1 − ᾱ_t; give a table with ᾱ < 1 there, or use solver='ddim'")
    # only where the spacing is the cause: quadratic starts at 0.8 T and log-SNR at T − 1 whatever
    # the table (a cosine table keeps √ᾱ = 0.31 at 0.8 T: its own choice, not worth a warning)
    if a0 ** 0.5 > START_SIGNAL_WARN and first < 0.8 * (abar.numel() - 1):
        warnings.warn(f"the run starts at t={first} (ᾱ = {a0:.3g}, skip={skip!r}): x_T ~ N(0, I) is taken as x_t "
                      f"there although {a0 ** 0.5:.2f} of x_t should still be the image; use more steps, or "
                      "skip='logsnr' (which starts at t = T − 1)", stacklevel=4)   # sample()'s caller


def heun_sigmas(steps, abar, den=None) -> torch.Tensor:
    """Heun's ``steps`` Karras noise levels: the denoiser's σ range, or the ᾱ table's noisy part
    (a table may start at ᾱ = 1, σ = 0); ValueError naming the source when they do not descend
    (A16: a range too wide for float64 collapses the small levels to 0)."""
    if den is not None:
        sigmas, src = karras_sigmas(steps, den.sigma_min, den.sigma_max, den.rho), "SigmaDenoiser's sigma_min/max"
    else:
        table = sigmas_of(abar)
        noisy = table[table > 0]
        if noisy.numel() == 0:
            raise ValueError("solver='heun': the ᾱ table has no entry below 1 (no noise level to start from)")
        sigmas, src = karras_sigmas(steps, float(noisy[0]), float(table[-1])), "alphas_cumprod"
    body = sigmas[:-1]
    if not (bool(torch.isfinite(body).all()) and bool((body > 0).all()) and bool((body[1:] < body[:-1]).all())):
        raise ValueError(f"{src}: solver='heun' cannot place {steps} distinct Karras noise levels in σ ∈ "
                         f"[{float(body.min()):.3g}, {float(body.max()):.3g}] in float64 (they collapse or repeat); "
                         "narrow the σ range (e.g. clip the table's smallest ᾱ at 1e-8) or use fewer steps")
    return sigmas


def check_window(window, solver, abar, ts, sigmas) -> None:
    """Warn (once per call) when ``window`` holds none of the timesteps the run evaluates: the
    run would be unguided under a guided manifest (W1–W3; legitimate in a sweep, so not refused)."""
    if window is None:
        return
    if solver == "heun":
        t_values = sorted({int(round(t)) for t in sigma_to_t(sigmas[:-1], abar).tolist()})
    else:
        t_values = sorted({int(t) for t in ts})
    lo, hi = window
    if not any(lo <= t <= hi for t in t_values):
        span = f"t in [{t_values[0]}, {t_values[-1]}]"
        warnings.warn(f"guide_window={tuple(window)} holds none of the run's {len(t_values)} timesteps ({span}): "
                      "no step is guided, the samples are unguided", stacklevel=3)


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
