"""cdp_fast: the Contrastive-Guided Diffusion Process (Ouyang, Xie, Cheng, ICLR 2023 submission)
for generating adversarial-training data, fast and resumable.

Public API (see DESIGN.md §3): ``sample``, ``Samples``, ``guided_ddim``, ``timesteps``,
``losses.hnm_loss`` / ``losses.infonce_loss``, ``pgd_step``, ``train_trades``,
``train_pgd_at``, ``evaluate``, ``label``, ``theory``.

Heavy submodules are imported lazily so ``import cdp_fast`` stays cheap (no Triton, no
compiler, no optional extras until used).
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "sample": ("cdp_fast.sampling.driver", "sample"),
    "guided_ddim": ("cdp_fast.sampling.driver", "guided_ddim"),
    "guided_ddpm": ("cdp_fast.sampling.driver", "guided_ddpm"),
    "guided_dpmpp_2m": ("cdp_fast.diffusion.solvers", "guided_dpmpp_2m"),
    "guided_heun": ("cdp_fast.diffusion.solvers", "guided_heun"),
    "SigmaDenoiser": ("cdp_fast.diffusion.adapters", "SigmaDenoiser"),
    "karras_sigmas": ("cdp_fast.diffusion.schedule", "karras_sigmas"),
    "ContrastiveGuidance": ("cdp_fast.sampling.driver", "ContrastiveGuidance"),
    "Samples": ("cdp_fast.data", "Samples"),
    "timesteps": ("cdp_fast.diffusion.schedule", "timesteps"),
    "make_alphas_cumprod": ("cdp_fast.diffusion.schedule", "make_alphas_cumprod"),
    "pgd_step": ("cdp_fast.ops.pgd_step", "pgd_step"),
    "train_trades": ("cdp_fast.robust.train", "train_trades"),
    "train_pgd_at": ("cdp_fast.robust.train", "train_pgd_at"),
    "evaluate": ("cdp_fast.robust.evaluation", "evaluate"),
    "robustness": ("cdp_fast.robust.evaluation", None),
    "losses": ("cdp_fast.guidance.losses", None),
    "label": ("cdp_fast.label", None),
    "metrics": ("cdp_fast.metrics", None),
    "theory": ("cdp_fast.theory", None),
    "attacks": ("cdp_fast.robust.attacks", None),
    "models": ("cdp_fast.models", None),
    "kernels": ("cdp_fast.kernels", None),
    "schedule": ("cdp_fast.diffusion.schedule", None),
    "data": ("cdp_fast.data", None),
    "backend": ("cdp_fast.ops.backend", None),
    "ops": ("cdp_fast.ops", None),
    "runtime": ("cdp_fast.utils.runtime", None),
    "graphs": ("cdp_fast.sampling.graphs", None),
    "distributed": ("cdp_fast.utils.distributed", None),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'cdp_fast' has no attribute {name!r}") from None
    mod = _import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
