"""The PNG summary of a report (`cdp-fast inspect --figure`): class histograms, a 2-D
projection of each set in the independent feature space, the guidance-strength curve."""
from __future__ import annotations

import numpy as np

from cdp_fast.metrics.defaults import METRIC_DEFAULTS
from cdp_fast.metrics.features import extract_features, fit_pca
from cdp_fast.metrics.inputs import as_image_set

__all__ = ["figure"]


def figure(path, rep: dict, samples, *, real, against=None, features=None,
           pca_components: int = METRIC_DEFAULTS["pca_components"], max_points: int = 3000, seed: int = 0,
           max_samples=None) -> None:
    """Write a PNG summary of a :func:`report`: class histograms (each set and the real one, as
    fractions), a 2-D projection of each set (the top two principal axes of the *independent
    features* of the real set) coloured by label over the real set in grey, and — when a set's
    manifest recorded it — the guidance-strength curve ratio_mean (‖λ∇ℓ‖/‖ε‖) against t.

    Args: as :func:`report` (the same ``features``: None = PCA of the real images; the same
    ``max_samples``, so the figure shows the sets the report measured); at most ``max_points``
    points per scatter, a seeded subset. Needs matplotlib (the demo extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the inspect figure needs matplotlib: pip install 'cdp_fast[demo]'") from e
    from cdp_fast.utils.io import atomic_write

    r = as_image_set(real, "real")
    sets = {"samples": as_image_set(samples, "samples", max_samples=max_samples)}
    if against is not None:
        sets["against"] = as_image_set(against, "against", max_samples=max_samples)
    if features is None:
        features = fit_pca(r.x, pca_components)
    f_real = extract_features(features, r.x)
    proj = fit_pca(f_real, 2)   # the top two principal axes of the real set's features
    strength = {k: rep[k]["guidance_strength"] for k in sets if rep.get(k, {}).get("guidance_strength")}
    ncols = 1 + len(sets) + (1 if strength else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.8))
    axes = np.atleast_1d(axes)

    ax = axes[0]
    K = rep["setup"]["num_classes"]
    hists = [("real", rep["real"]["class_balance"]["histogram"])]
    hists += [(k, rep[k]["class_balance"]["histogram"]) for k in sets if "class_balance" in rep.get(k, {})]
    w = 0.8 / len(hists)
    for j, (name, h) in enumerate(hists):
        tot = max(1, sum(h))
        ax.bar(np.arange(K) + (j - (len(hists) - 1) / 2) * w, [v / tot for v in h], width=w, label=name)
    ax.axhline(1.0 / K, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(K))
    ax.set_xlabel("label")
    ax.set_ylabel("fraction")
    ax.set_title("class histogram")
    ax.legend(fontsize=7)

    g = np.random.default_rng(seed)
    pr = proj(f_real).numpy()
    for j, (name, s) in enumerate(sets.items()):
        ax = axes[1 + j]
        ax.scatter(pr[:, 0], pr[:, 1], s=3, c="0.8", label="real")
        ps = proj(extract_features(features, s.x)).numpy()
        idx = np.sort(g.permutation(len(ps))[:max_points])
        if s.y is not None:
            sc = ax.scatter(ps[idx, 0], ps[idx, 1], s=4, c=s.y.numpy()[idx], cmap="tab10", vmin=0,
                            vmax=max(9, K - 1))
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        else:
            ax.scatter(ps[idx, 0], ps[idx, 1], s=4, c="C0")
        ax.set_title(f"{name}: 2-D PCA of the features")
        ax.set_xticks([])
        ax.set_yticks([])
    if strength:
        ax = axes[-1]
        for name, curve in strength.items():
            ts = [c["t"] for c in curve]
            ax.plot(ts, [c["ratio_mean"] for c in curve], marker=".", label=name)
        ax.set_xlabel("t")
        ax.set_ylabel("mean |lambda grad l| / |eps|")
        ax.set_title("guidance strength")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
