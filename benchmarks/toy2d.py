"""The 2-D experiment of Figure 2 / App. C.2: contrastive-guided DDIM on a two-Gaussian mixture
with an exact (analytic, untrained) ε-predictor.

    PYTHONPATH=. python benchmarks/toy2d.py [--n 200] [--steps 50] [--seed 0] [--out benchmarks/results]

Writes toy2d_init1.png, toy2d_init4.png (App. C.2 Figures 3/4 style), toy2d_fig2.png (Figure 2
style), toy2d.md and toy2d.json under ``--out``.

Data (App. C.2, "the oracle distribution N(±1, I)"): p_0 = ½ N(μ, s₀² I) + ½ N(−μ, s₀² I),
μ = (1, 1), s₀ = 1. Forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020), so
p_t = ½ N(m_t, v_t I) + ½ N(−m_t, v_t I) with m_t = √ᾱ_t μ and v_t = ᾱ_t s₀² + 1 − ᾱ_t (= 1 for
s₀ = 1). Its score is ∇log p_t(x) = (m_t tanh(m_tᵀx / v_t) − x) / v_t, and the ε that
minimises the DDPM loss is ε*(x, t) = −√(1 − ᾱ_t) ∇log p_t(x) (Song et al. 2021, "score SDE",
eq. (7) ↔ Ho et al. eq. (11)).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cdp_fast  # noqa: E402
from harness import git_commit  # noqa: E402  (provenance, shared with the other benchmarks)
from cdp_fast.diffusion.schedule import timesteps as make_timesteps  # noqa: E402

# the mixture, its exact ε-model and the measured guidance settings live in the package (the
# demo's Gaussian part imports them); re-exported here under their old names
from cdp_fast.theory.mixture import LAM_CLASS, LAM_UNCOND, MU, VARIANTS, MixtureEps, sign_labeler  # noqa: E402,F401


def oracle_samples(n, *, mu=MU, s0=1.0, seed=0):
    """n points of p_0 (balanced classes, first half +μ), (n, D) float32, and their labels."""
    g = torch.Generator().manual_seed(seed)
    mu_t = torch.as_tensor(mu, dtype=torch.float32)
    y = torch.where(torch.arange(n) < (n + 1) // 2, 1.0, -1.0)
    x = y[:, None] * mu_t + s0 * torch.randn(n, mu_t.numel(), generator=g)
    return x, (y > 0).long()


def generate(variant, *, n=200, steps=50, init_std=1.0, seed=0, real=None, model=None, via="auto"):
    """Samples of one variant, (n, 2) float32 numpy.

    ``init_std`` = 1: ``cdp_fast.sample`` (x_T ~ N(0, I), the public API). Other values (App.
    C.2's N(0, 4I) is init_std = 2): the same per-sample noise scaled by ``init_std``, run through
    the pure loop ``cdp_fast.guided_ddim`` with ``cdp_fast.ContrastiveGuidance`` — ``sample``
    has no argument to scale x_T. ``via="loop"`` forces the second route for any init_std
    (the tests check both routes agree at init_std = 1). One contrastive batch of n samples.
    """
    if via not in ("auto", "sample", "loop"):
        raise ValueError(f"via must be 'auto', 'sample' or 'loop', got {via!r}")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    if via == "sample" and init_std != 1.0:
        raise ValueError("via='sample' needs init_std=1 (cdp_fast.sample draws x_T ~ N(0, I))")
    opts = dict(VARIANTS[variant]) if isinstance(variant, str) else dict(variant)
    model = MixtureEps() if model is None else model
    if real is None:
        real, _ = oracle_samples(500, seed=seed + 1)
    labeler = sign_labeler()
    loss = opts.pop("loss")
    # App. C.2's setting as measured here: the anchor form at every step, no head (the toy is
    # the paper's illustration, not the authors' CIFAR-10 recipe)
    kw = dict(tau_plus=opts.pop("tau_plus", 0.1), beta=opts.pop("beta", 1.0),
              positive=opts.pop("positive", "previous"), negatives=opts.pop("negatives", "batch"),
              form="anchors", embedding=None)
    lam, tau = opts.pop("lam", None), opts.pop("tau", None)
    if opts:
        raise ValueError(f"variant: unknown options {sorted(opts)}")
    if via == "sample" or (via == "auto" and init_std == 1.0):
        s = cdp_fast.sample(model, n, loss=loss, lam=lam, tau=tau, real=real, labeler=labeler, features="pixels",
                            image_shape=(2,), output="float", steps=steps, skip="uniform",
                            batch_size=n, seed=seed, progress=False, compile=False, guide_window=None, **kw)
        return np.asarray(s.images, dtype=np.float32)
    from cdp_fast.utils.seeding import sample_seed
    abar = model.alphas_cumprod
    ts = make_timesteps(abar.numel(), steps, "uniform")
    gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(n)]
    x_T = init_std * torch.stack([torch.randn((2,), generator=g) for g in gens])
    guidance = None
    if loss is not None:
        guidance = cdp_fast.ContrastiveGuidance(loss=loss, lam=lam, tau=tau, labeler=labeler,
                                                real=real, alphas_cumprod=abar, seed=seed, **kw)
        pos_idx = None
        if kw["positive"] == "real":   # the draw order of cdp_fast.sample: x_T, then the index
            pos_idx = torch.tensor([int(torch.randint(len(real), (1,), generator=g)) for g in gens])
        guidance.reset(real_positive_index=pos_idx)
    x0 = cdp_fast.guided_ddim(model, x_T, alphas_cumprod=abar, timesteps=ts, guidance=guidance)
    return x0.detach().float().numpy()


def class_stats(x, mu=MU, labels=None):
    """Separation statistics of 2-D samples x (n, 2), classes k = [xᵀμ > 0] unless ``labels``.

    With u = μ/‖μ‖, w ⟂ u (unit), per class c ∈ {+, −}: centroid m_c, projections p = xᵀu,
    q = xᵀw, variances with ddof = 0:
      between_dist  = ‖m₊ − m₋‖                       (Euclidean distance of the centroids)
      within_var_mu = ½ (Var₊(p) + Var₋(p))           (within-class variance along μ)
      within_var_perp = ½ (Var₊(q) + Var₋(q))         (within-class variance orthogonal to μ)
      fisher        = (mean₊(p) − mean₋(p))² / (Var₊(p) + Var₋(p))   (Fisher ratio along μ)
      frac_pos      = fraction in class +
    """
    x = np.asarray(x, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    u = mu / np.linalg.norm(mu)
    w = np.array([-u[1], u[0]])
    k = (x @ mu > 0) if labels is None else np.asarray(labels).astype(bool)
    if k.all() or (~k).all():
        raise ValueError("x: all samples fall in one class; the statistics need both")
    p, q = x @ u, x @ w
    vp = (p[k].var(), p[~k].var())
    return {
        "between_dist": float(np.linalg.norm(x[k].mean(0) - x[~k].mean(0))),
        "within_var_mu": float(0.5 * sum(vp)),
        "within_var_perp": float(0.5 * (q[k].var() + q[~k].var())),
        "fisher": float((p[k].mean() - p[~k].mean()) ** 2 / sum(vp)),
        "frac_pos": float(k.mean()),
    }


def _atomic_write_bytes(path, data):
    from cdp_fast.utils.io import atomic_write_bytes

    atomic_write_bytes(path, data)


def _plot(panels, path, title):
    """panels: list of (name, (n, 2) array). Scatter grid, classes coloured by side of xᵀμ = 0."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise ImportError("the toy2d plots need matplotlib: pip install matplotlib") from e
    import io
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    allx = np.concatenate([x for _, x in panels])
    lim = max(4.5, float(np.quantile(np.abs(allx), 0.995)) + 0.5)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, panels):
        k = x @ np.asarray(MU) > 0
        ax.scatter(x[k, 0], x[k, 1], s=6, c="tab:red", alpha=0.7, label="xᵀμ > 0")
        ax.scatter(x[~k, 0], x[~k, 1], s=6, c="tab:blue", alpha=0.7, label="xᵀμ < 0")
        ax.plot([-lim, lim], [lim, -lim], "k--", lw=0.7)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


STAT_DOC = [
    "Classes: side of the Bayes boundary xᵀμ = 0 (μ = (1, 1)); the labeler of the class-conditional "
    "variant is the same rule applied to the current x̂₀ during sampling.",
    "between_dist = ‖m₊ − m₋‖ (Euclidean distance between the class centroids).",
    "within_var_mu = ½(Var₊(xᵀu) + Var₋(xᵀu)), u = μ/‖μ‖ (ddof = 0).",
    "within_var_perp = ½(Var₊(xᵀw) + Var₋(xᵀw)), w ⟂ μ: the 'circle' of App. C.2 shows up here.",
    "fisher = (mean₊(xᵀu) − mean₋(xᵀu))² / (Var₊(xᵀu) + Var₋(xᵀu)) (Fisher ratio along μ).",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    real, _ = oracle_samples(500, seed=args.seed + 1)
    oracle, _ = oracle_samples(args.n, seed=args.seed + 2)
    results = {"oracle data (p_0)": {"init_std": None, **class_stats(oracle.numpy())}}
    samples = {}
    for init_std in (1.0, 2.0):
        panels = [("oracle data N(±(1,1), I)", oracle.numpy())]
        for name, opts in VARIANTS.items():
            x = generate(name, n=args.n, steps=args.steps, init_std=init_std, seed=args.seed,
                         real=real)
            samples[(name, init_std)] = x
            key = f"{name} | init N(0, {init_std ** 2:g}I)"
            results[key] = {"init_std": init_std, "options": opts, **class_stats(x)}
            panels.append((name, x))
        tag = f"init{int(init_std ** 2)}"
        _plot(panels, os.path.join(args.out, f"toy2d_{tag}.png"),
              f"Contrastive-guided DDIM on ½N(μ, I) + ½N(−μ, I), init N(0, {init_std ** 2:g}I), "
              f"{args.steps} uniform steps, n = {args.n}")
    _plot([("(a) DDIM, no guidance", samples[("no guidance", 1.0)]),
           ("(b) class-conditional HNM", samples[("class-conditional HNM", 1.0)])],
          os.path.join(args.out, "toy2d_fig2.png"), "Figure 2 (2-D)")
    elapsed = time.perf_counter() - t0
    lines = ["# 2-D contrastive-guided DDIM (Figure 2, App. C.2)", "",
             f"Exact ε-model of ½N(μ, I) + ½N(−μ, I), μ = (1, 1); linear β, T = 1000, "
             f"{args.steps} uniform DDIM steps, η = 0, n = {args.n} (one contrastive batch), "
             f"seed {args.seed}; features = identity (2-D points, L2-normalised inside the loss); "
             f"τ = 0.5 (InfoNCE, HNM), τ⁺ = 0, β = 1; λ = {LAM_CLASS:g} for class-conditional HNM and "
             f"{LAM_UNCOND:g} for the unconditional variants (ℓ is the mean over the n anchors); "
             f"real bank = 500 oracle points. "
             f"{elapsed:.1f} s on CPU.", "", "Definitions:", ""]
    lines += [f"- {s}" for s in STAT_DOC]
    lines += ["", "| variant | init | between_dist | within_var_mu | within_var_perp | fisher | frac + |",
              "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = key.split(" | ")[0]
        init = "—" if r["init_std"] is None else f"N(0, {r['init_std'] ** 2:g}I)"
        lines.append(f"| {name} | {init} | {r['between_dist']:.3f} | {r['within_var_mu']:.3f} | "
                     f"{r['within_var_perp']:.3f} | {r['fisher']:.2f} | {r['frac_pos']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    payload = {"what": "2-D contrastive-guided DDIM (Figure 2, App. C.2)", "n": args.n,
               "steps": args.steps, "seed": args.seed, "seconds": elapsed, "definitions": STAT_DOC,
               "results": results,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "platform": platform.platform(), "commit": git_commit()}}
    _atomic_write_bytes(os.path.join(args.out, "toy2d.md"), md.encode())
    _atomic_write_bytes(os.path.join(args.out, "toy2d.json"),
                        json.dumps(payload, indent=1, default=str).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
