"""The defaults of :func:`cdp_fast.metrics.report` and `cdp-fast inspect` (one table, so the
report's ``setup`` and the functions' keyword defaults cannot drift apart)."""

__all__ = ["METRIC_DEFAULTS"]

#: Defaults of :func:`~cdp_fast.metrics.report` (and `cdp-fast inspect`).
METRIC_DEFAULTS = {
    "pca_components": 20,      # PCA of the real images: the default independent feature space
    "k": 5,                    # k-NN radii of precision/recall/density/coverage ([N20] uses 5)
    "probe_steps": 100,        # LBFGS iterations of the linear probe (full batch, one .step)
    "probe_l2": 1e-3,          # ridge on the probe's weights (keeps separable data bounded)
    "probe_eps": 8 / 255,      # L∞ PGD radius on [0, 1] pixels against the probe (CIFAR-10 standard)
    "probe_pgd_steps": 10,     # PGD steps, step size 2.5·eps/steps
    "memorisation_quantile": 0.05,
    "chunk": 1024,             # rows per distance block: at most chunk × N distances in memory
    "seed": 0,
}
