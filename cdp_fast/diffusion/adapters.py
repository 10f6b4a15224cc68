"""Adapters for networks written elsewhere, so every sampler and every guidance term accepts
them (as k-diffusion's ``external.py``):

- :func:`call_model` / :class:`EpsModel`: any ε-model — ``model(x, t)``, ``model(x, t, y)``
  (class-conditional), outputs with ``.sample`` (diffusers ``UNet2DOutput``) or tuples — as a
  plain ``eps(x, t, y=None) -> Tensor`` (unwrapped once, here and nowhere else);
- :class:`SigmaDenoiser`: a σ-space denoiser ``D(x, σ[, class_labels]) -> x̂_0`` (EDM /
  k-diffusion convention) as an ε-model on any ᾱ table, and as itself for the Heun solver;
- :class:`EpsFromPrediction`: a network that predicts v (``"v_prediction"``) or x̂_0
  (``"sample"``), diffusers' ``prediction_type``, as the ε-model every solver runs;
- :func:`load_diffusers_unet`: a local diffusers ``UNet2DModel`` folder (its scheduler's ᾱ and
  ``prediction_type``), returned as an ε-model.
"""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import nn

__all__ = ["call_model", "unwrap_output", "EpsModel", "as_eps_model", "SigmaDenoiser", "EpsFromPrediction",
           "PREDICTION_TYPES", "load_diffusers_unet"]

#: diffusers' ``prediction_type`` values: what the network outputs (:class:`EpsFromPrediction`)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def unwrap_output(out):
    """The ε tensor of a model output: ``.sample`` (diffusers), the first of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def call_model(model, x, t, y=None):
    """ε-prediction of any model: ``model(x, t)`` or ``model(x, t, y)``; an output with a
    ``.sample`` attribute (diffusers ``UNet2DOutput``) or a tuple is unwrapped.

    Shapes: x (B, *shape), t (B,) long, y (B,) long or None -> (B, *shape)."""
    return unwrap_output(model(x, t) if y is None else model(x, t, y))


class EpsModel:
    """``model`` as a function ``(x, t, y=None) -> ε`` that always returns a tensor: the one
    place a model output is unwrapped (:meth:`forward`), and what the sampler compiles.

    ``module`` is the nn.Module behind it (None for plain callables). :meth:`with_runner`
    returns the same adapter running another implementation of :meth:`forward` (e.g. a
    compiled one), so a compiled call returns the unwrapped tensor and nothing unwraps twice.
    """

    def __init__(self, model, run=None):
        self.model = model
        self.module = model if isinstance(model, nn.Module) else None
        self._run = run if run is not None else self.forward

    def forward(self, x, t, y=None):
        """x (B, *shape), t (B,) long, y (B,) long or None -> ε (B, *shape)."""
        return call_model(self.model, x, t, y)

    @property
    def runner(self):
        """The callable that computes ε: :meth:`forward` itself, or what :meth:`with_runner` gave."""
        return self._run

    def with_runner(self, run) -> "EpsModel":
        """This adapter, with ``run(x, t, y)`` (e.g. ``torch.compile(self.forward)``) called."""
        return EpsModel(self.model, run)

    def __call__(self, x, t, y=None):
        return self._run(x, t, y)


def as_eps_model(model) -> EpsModel:
    """``model`` as an :class:`EpsModel` (an EpsModel is returned as it is)."""
    return model if isinstance(model, EpsModel) else EpsModel(model)


class SigmaDenoiser(nn.Module):
    """A σ-space denoiser ``net(x_σ, σ[, class_labels]) -> x̂_0`` (EDM's ``EDMPrecond``,
    k-diffusion's denoisers; Karras et al. 2022) as a model :func:`cdp_fast.sample` accepts.

    The parameterisations (Karras et al. 2022, Table 1; VP: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε):

        σ = √((1−ᾱ)/ᾱ),   x_σ = x_t/√ᾱ = x_0 + σ·ε,   x̂_0 = D(x_σ, σ),   ε = (x_σ − D)/σ.

    :meth:`denoise` is D itself (what ``solver="heun"`` integrates, at σ ∈ [sigma_min,
    sigma_max], EDM's defaults 0.002 and 80); :meth:`forward` ``(x_t, t, y=None) -> ε`` is the
    same network as an ε-model on the ᾱ table it is bound to (:meth:`on_table`; sample() binds
    its own), so DDIM, DDPM and DPM-Solver++ run it too. Fractional t (Heun on an ε-model, not
    needed here) maps to σ by log-linear interpolation of the table.

    Args:
        net: the denoiser (an nn.Module: its weights are the fingerprint a resumed run checks).
            Built by the caller and loaded from a state dict — never unpickled here.
        sigma_min, sigma_max, rho: the σ range and schedule exponent of ``solver="heun"``
            (EDM: 0.002, 80, 7).
        one_hot_classes: K for networks that take one-hot class labels (B, K) (EDM's
            ``class_labels``); None passes the (B,) int labels as they are.
    Shapes: x (B, *shape); σ a float or (B,); y (B,) long or None.
    """

    def __init__(self, net: nn.Module, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 one_hot_classes: int | None = None, alphas_cumprod=None):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
            if isinstance(v, (bool, str, bytes)) or not isinstance(v, (numbers.Real, torch.Tensor)):
                raise ValueError(f"SigmaDenoiser: {name} must be a number, got {v!r}")
        if not (0 < sigma_min < sigma_max < float("inf")):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, {sigma_max!r}")
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        if one_hot_classes is not None and (isinstance(one_hot_classes, bool) or not isinstance(one_hot_classes, int)
                                            or one_hot_classes < 1):
            raise ValueError(f"one_hot_classes must be None or an int >= 1, got {one_hot_classes!r}")
        self.net = net
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.one_hot_classes = one_hot_classes
        # plain attributes, not buffers: the fingerprint of a run is the network's weights. The
        # table is validated once here; forward() is then tensor arithmetic only (no checks,
        # no host round trip: one copy of log σ per device)
        self.alphas_cumprod = None
        self._log_sigma, self._log_sigma_on = None, {}
        if alphas_cumprod is not None:
            from cdp_fast.diffusion.schedule import as_alphas_cumprod, log_sigmas
            self.alphas_cumprod = as_alphas_cumprod(alphas_cumprod).double().cpu()
            self._log_sigma = log_sigmas(self.alphas_cumprod)
        #: a compiled :meth:`eps_at_sigma` that the Heun solver calls when set (cdp_fast.sample
        #: sets it when it compiles the model)
        self.sigma_runner = None

    def on_table(self, alphas_cumprod) -> "SigmaDenoiser":
        """The same network (shared, not copied) as an ε-model on this ᾱ table."""
        return SigmaDenoiser(self.net, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                             one_hot_classes=self.one_hot_classes, alphas_cumprod=alphas_cumprod)

    def table_on(self, device) -> torch.Tensor:
        """log σ_t of the bound table on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._log_sigma_on:
            self._log_sigma_on[key] = self._log_sigma.to(device)
        return self._log_sigma_on[key]

    def settings(self) -> dict:
        """What a resumed run must repeat besides the weights (recorded in the manifest)."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "one_hot_classes": self.one_hot_classes}

    def _labels(self, y):
        if y is None or self.one_hot_classes is None:
            return y
        return nn.functional.one_hot(y.long(), self.one_hot_classes).float()

    def _sigmas(self, x, sigma):
        """σ as a (B,) tensor on x's device (a float becomes one without a host copy)."""
        if isinstance(sigma, torch.Tensor):
            return sigma.to(x.device).expand(x.shape[0])
        return x.new_full((x.shape[0],), float(sigma), dtype=torch.float32)

    def denoise(self, x, sigma, y=None):
        """x̂_0 = D(x_σ, σ): x (B, *shape), σ a float or (B,) -> (B, *shape)."""
        s = self._sigmas(x, sigma).to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
        y = self._labels(y)
        d = unwrap_output(self.net(x, s) if y is None else self.net(x, s, y))
        # D of another shape would broadcast through ε = (x − D)/σ (a shape check: no host sync)
        if not isinstance(d, torch.Tensor) or d.shape != x.shape:
            raise ValueError(f"SigmaDenoiser: the network {type(self.net).__name__} returned "
                             f"{tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__} for x of "
                             f"shape {tuple(x.shape)}; a denoiser must return x̂_0 of x's shape")
        return d

    def eps_at_sigma(self, x, sigma, y=None):
        """ε = (x_σ − D(x_σ, σ))/σ, for σ > 0: x (B, *shape), σ a float or (B,) -> (B, *shape)."""
        s = self._sigmas(x, sigma)
        view = (-1,) + (1,) * (x.dim() - 1)
        return (x - self.denoise(x, s, y)) / s.to(x.dtype).reshape(view)

    def forward(self, x, t, y=None):
        """ε(x_t, t) on the bound ᾱ table: σ_t (log-linear between entries for fractional t),
        x_σ = x_t·√(1+σ_t²), ε = (x_σ − D(x_σ, σ_t))/σ_t."""
        if self._log_sigma is None:
            raise ValueError("SigmaDenoiser: no ᾱ table bound; use .on_table(alphas_cumprod) "
                             "(cdp_fast.sample binds its own)")
        from cdp_fast.diffusion.schedule import sigma_at
        sigma = sigma_at(torch.as_tensor(t, device=x.device), self.table_on(x.device))
        view = (-1,) + (1,) * (x.dim() - 1)
        scale = (1 + sigma.square()).sqrt().to(x.dtype).reshape(view)
        return self.eps_at_sigma(x * scale, sigma, y)


class EpsFromPrediction(nn.Module):
    """A network that predicts v or x̂_0 (diffusers' ``prediction_type``) as an ε-model
    ``(x_t, t, y=None) -> ε``, which every solver of :func:`cdp_fast.sample` runs (DDIM, DDPM and
    DPM-Solver++ call it at integer t, Heun at fractional t(σ)). Exact conversions, with
    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε and v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022; diffusers'
    ``DDIMScheduler.step``):

        "epsilon":       ε = out
        "v_prediction":  ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t
        "sample":        ε = (x_t − √ᾱ_t·x̂_0) / √(1−ᾱ_t)

    ᾱ_t is the network's own table (``alphas_cumprod``: the one it was trained with, its
    scheduler's): at integer t the table entry (float64, as diffusers indexes its table), at
    fractional t the ᾱ = 1/(1+σ²) of σ(t) log-linear between entries — the σ at which Heun
    evaluates (:func:`cdp_fast.diffusion.schedule.sigma_at`). "sample" divides by √(1−ᾱ_t): a
    table entry ᾱ = 1 gives a non-finite ε there, as in diffusers (the solvers report it).

    Args:
        model: the network, ``model(x, t[, y])`` (outputs with ``.sample`` are unwrapped).
        prediction_type: one of :data:`PREDICTION_TYPES`.
        alphas_cumprod: (T,) ᾱ table in (0, 1] (e.g. ``scheduler.alphas_cumprod``).
    Shapes: x (B, *shape); t (B,) long or float; y (B,) long or None -> ε (B, *shape), x's dtype.
    """

    def __init__(self, model, prediction_type: str, alphas_cumprod):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (diffusers' names), got "
                             f"{prediction_type!r}")
        from cdp_fast.diffusion.schedule import as_alphas_cumprod, log_sigmas
        self.model = model
        self.prediction_type = prediction_type
        # plain attributes, not buffers: .half() must not round the table, and the state dict
        # stays the network's (fingerprint_settings() records the table and the type)
        self.alphas_cumprod = as_alphas_cumprod(alphas_cumprod).double().cpu()
        self._tables = (self.alphas_cumprod, log_sigmas(self.alphas_cumprod))
        self._tables_on = {}

    def tables_on(self, device):
        """(ᾱ, log σ) of the table on ``device`` (copied once per device)."""
        key = str(device)
        if key not in self._tables_on:
            self._tables_on[key] = tuple(v.to(device) for v in self._tables)
        return self._tables_on[key]

    def fingerprint_settings(self) -> dict:
        """What a resumed :func:`cdp_fast.sample` run depends on besides the weights."""
        return {"prediction_type": self.prediction_type, "alphas_cumprod": self.alphas_cumprod}

    def extra_repr(self) -> str:
        return f"prediction_type={self.prediction_type!r}, T={self.alphas_cumprod.numel()}"

    def forward(self, x, t, y=None):
        out = call_model(self.model, x, t, y)
        if self.prediction_type == "epsilon":
            return out
        abar_table, log_sigma = self.tables_on(x.device)
        t = torch.as_tensor(t, device=x.device)
        if t.is_floating_point():       # Heun's t(σ): ᾱ of the interpolated σ
            from cdp_fast.diffusion.schedule import sigma_at
            abar = 1.0 / (1.0 + sigma_at(t, log_sigma).square())
        else:
            abar = abar_table[t.long()]
        view = (-1,) + (1,) * (x.dim() - 1)
        abar = abar.expand(x.shape[0]).reshape(view)
        dtype = torch.promote_types(x.dtype, torch.float32)
        a, s = abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)
        xt, out = x.to(dtype), out.to(dtype)
        eps = a * out + s * xt if self.prediction_type == "v_prediction" else (xt - a * out) / s
        return eps.to(x.dtype)


def _scheduler_config(path: Path):
    """The folder's scheduler config file (``scheduler/scheduler_config.json`` of a pipeline,
    or ``scheduler_config.json`` beside the UNet's ``config.json``), or None."""
    for f in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if f.is_file():
            return f
    return None


def load_diffusers_unet(path, *, prediction_type=None, alphas_cumprod=None):
    """A local diffusers ``UNet2DModel`` folder, or a pipeline folder with ``unet/`` (and
    ``scheduler/``), loaded with ``local_files_only=True``, as an ε-model.

    ``prediction_type`` (what the UNet outputs: ``"epsilon"``, ``"v_prediction"`` or
    ``"sample"``) is, in this order: the argument; the ``prediction_type`` of the folder's
    scheduler config (``scheduler/scheduler_config.json`` of a pipeline folder, else a
    ``scheduler_config.json`` beside the UNet's ``config.json``); ``"epsilon"`` (diffusers'
    default) when the folder has no scheduler config. A UNet's own ``config.json`` does not
    record it. Anything else is a ValueError naming the value and where it came from. A
    ``"v_prediction"`` / ``"sample"`` UNet is returned wrapped in :class:`EpsFromPrediction`
    (exact conversion to ε on its scheduler's ᾱ table), so every solver samples it right.

    ``alphas_cumprod`` overrides the scheduler's ᾱ table (needed for a non-ε UNet without a
    scheduler config: the conversion needs the table the UNet was trained with).

    Returns (model, info): info holds ``image_shape`` (C, H, W), ``alphas_cumprod`` (the
    table used: the argument, the folder's scheduler's ᾱ, or None), ``num_classes`` (the
    config's ``num_class_embeds``, or None) and ``prediction_type``."""
    try:
        from diffusers import DDIMScheduler, UNet2DModel
    except ImportError as e:
        raise ImportError("loading a diffusers model folder needs diffusers: "
                          "pip install 'cdp_fast[diffusers]'") from e
    path = Path(path)
    sub = "unet" if (path / "unet").is_dir() else None
    model = UNet2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    info = {"image_shape": (cfg.in_channels, *hw), "alphas_cumprod": None,
            "num_classes": getattr(cfg, "num_class_embeds", None)}
    sched_file = _scheduler_config(path)
    where = "the prediction_type argument"
    if sched_file is not None:
        sched = DDIMScheduler.from_pretrained(str(sched_file.parent), local_files_only=True)
        info["alphas_cumprod"] = sched.alphas_cumprod
        if prediction_type is None:
            prediction_type, where = sched.config.prediction_type, f"{sched_file}"
    if prediction_type is None:
        prediction_type, where = "epsilon", "diffusers' default (no scheduler config)"
    if alphas_cumprod is not None:
        info["alphas_cumprod"] = alphas_cumprod
    if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusers model {path}: prediction_type {prediction_type!r} (from {where}) is not one of "
                         f"{PREDICTION_TYPES}")
    info["prediction_type"] = prediction_type
    if prediction_type != "epsilon":
        if info["alphas_cumprod"] is None:
            raise ValueError(f"diffusers model {path}: a {prediction_type!r} UNet needs the ᾱ table it was trained "
                             "with to be converted to ε; the folder has no scheduler config: pass alphas_cumprod")
        model = EpsFromPrediction(model, prediction_type, info["alphas_cumprod"])
    return model, info
