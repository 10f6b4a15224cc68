"""cdp_fast: the Contrastive-Guided Diffusion Process (Ouyang, Xie, Cheng) for generating
adversarial-training data, fast and resumable.

    s = cdp_fast.sample(eps_model, n, loss="hnm", features=f, labeler=as_labeler(clf), out="gen/")
    model = cdp_fast.train_trades(model, (x, y), synthetic=s, epochs=..., eps=8/255, step_size=2/255)
    cdp_fast.evaluate(model, x_test, y_test, eps=8/255)

The front door holds the user's verbs and types and the subpackages as namespaces (the
public contract: docs/design.md §3). The pipeline reads top-down as the subpackages:
``diffusion`` (schedules, adapters, the pure solver loops) → ``guidance`` (the paper's losses
and :class:`ContrastiveGuidance`) → ``sampling`` (the :func:`sample` driver, shards) → ``data``
→ ``label`` → ``robust`` (attacks, TRADES / PGD-AT, evaluation), with ``metrics`` as the check
and ``theory`` as the paper's §3; ``ops`` (the kernels' ops), ``models`` and ``utils`` below.

Everything is imported on first use, so ``import cdp_fast`` stays cheap (no Triton, no
compiler, no optional extras until used).
"""
from importlib import import_module as _import_module

__version__ = "0.2.0"

# public name -> (module, attribute; None for the module itself)
_LAZY = {
    # generate
    "sample": ("cdp_fast.sampling.driver", "sample"),
    "Samples": ("cdp_fast.data", "Samples"),
    # the method as pure pieces
    "ContrastiveGuidance": ("cdp_fast.guidance.contrastive", "ContrastiveGuidance"),
    "guided_ddim": ("cdp_fast.diffusion.solvers", "guided_ddim"),
    "guided_ddpm": ("cdp_fast.diffusion.solvers", "guided_ddpm"),
    "guided_dpmpp_2m": ("cdp_fast.diffusion.solvers", "guided_dpmpp_2m"),
    "guided_heun": ("cdp_fast.diffusion.solvers", "guided_heun"),
    "SigmaDenoiser": ("cdp_fast.diffusion.adapters", "SigmaDenoiser"),
    "timesteps": ("cdp_fast.diffusion.schedule", "timesteps"),
    "make_alphas_cumprod": ("cdp_fast.diffusion.schedule", "make_alphas_cumprod"),
    "karras_sigmas": ("cdp_fast.diffusion.schedule", "karras_sigmas"),
    # label, train and evaluate
    "pseudo_label": ("cdp_fast.label", "pseudo_label"),
    "select": ("cdp_fast.label", "select"),
    "train_trades": ("cdp_fast.robust.train", "train_trades"),
    "train_pgd_at": ("cdp_fast.robust.train", "train_pgd_at"),
    "train_diffusion": ("cdp_fast.diffusion.train", "train_diffusion"),
    "evaluate": ("cdp_fast.robust.evaluation", "evaluate"),
    "pgd_step": ("cdp_fast.ops.pgd_step", "pgd_step"),
    # namespaces
    "data": ("cdp_fast.data", None),
    "diffusion": ("cdp_fast.diffusion", None),
    "guidance": ("cdp_fast.guidance", None),
    "label": ("cdp_fast.label", None),
    "losses": ("cdp_fast.guidance.losses", None),     # docs/design.md §3: cdp_fast.losses.hnm_loss
    "metrics": ("cdp_fast.metrics", None),
    "models": ("cdp_fast.models", None),
    "ops": ("cdp_fast.ops", None),
    "robust": ("cdp_fast.robust", None),
    "sampling": ("cdp_fast.sampling", None),
    "theory": ("cdp_fast.theory", None),
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
