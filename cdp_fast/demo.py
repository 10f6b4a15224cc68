"""`cdp-fast demo`: the paper's real-vs-synthetic experiment in miniature, on a laptop CPU.

The revised paper's Figure 3 (MNIST) and Table 2 (CIFAR-10) compare adversarial training on
real data only, on real + vanilla DDIM samples and on real + Contrastive-DP samples, at a
fixed training budget. Here, on scikit-learn's bundled 8×8 digits with the models shipped in
``cdp_fast/assets`` (:mod:`cdp_fast.models.digits`):

1. generate ``n_synthetic`` samples with the bundled ε-model twice from the *same* starting
   noise (same seed ⇒ same x_T for sample i): plain DDIM (λ = 0) and Contrastive-DP with the
   HNM loss on the bundled classifier's features
   (:data:`cdp_fast.models.digits.DIGITS_GUIDANCE`); pseudo-label both with the bundled
   classifier (``cdp_fast.sample(labeler=...)``);
2. for each condition — ``real`` (the 1347 real training digits only), ``real+ddim``,
   ``real+cdp`` — and each seed, TRADES-train a fresh small CNN
   (:func:`cdp_fast.models.small_cnn`; SGD lr 0.05 after a 1-epoch linear warm-up, shared by
   all conditions; without the warm-up, lr 0.1 diverged for training seed 1 in every
   condition — 60% / 13% / 33% clean accuracy — so the recipe was fixed on the real-only
   condition, seeds 0 and 1: 96.7% / 95.3% clean, 71.1% / 69.3% PGD-20)
   for the same number of updates with the same batch size (the fixed budget: in the synthetic conditions a fraction ``real_fraction`` of every
   batch is real, the rest synthetic, as in Gowal et al. 2021 / DM-Improves-AT);
3. evaluate the EMA model on the 450 held-out test digits: clean, PGD-20 and AutoAttack
   (quick run: APGD-CE + APGD-T; ``full``: standard AutoAttack) accuracy at L∞ ε (default 0.1 on [0, 1] pixels: the digits have 17 grey levels, so
   ε = 0.1 is 1.6 levels; MNIST's customary 0.3 would erase 8×8 strokes);
4. report mean ± sample standard deviation (ddof = 1) over the seeds as a table, a JSON file,
   a bar plot (matplotlib, if installed) and the two sample grids as PNG.

The numbers are whatever this run measures. Nothing is tuned per condition: the training
hyper-parameters are shared by the three conditions, and λ, τ were chosen once from
sample statistics (see :data:`cdp_fast.models.digits.DIGITS_GUIDANCE`), never from
adversarial accuracy.

Defaults (``full=False``) fit a 2-core CPU in minutes: one synthetic set per method (seed 0)
shared by all training seeds, 10 epochs, 5-step PGD inside TRADES, AutoAttack as APGD-CE +
APGD-T. ``full=True`` regenerates the synthetic sets per seed and uses more synthetic samples,
30 epochs, 10-step PGD, standard AutoAttack and 5 seeds.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from cdp_fast.data import atomic_write_bytes
# the presets live with the models they were tuned for; re-exported here for callers of
# cdp_fast.demo.DIGITS_GUIDANCE / DIGITS_SAMPLING
from cdp_fast.models.digits import DIGITS_GUIDANCE, DIGITS_SAMPLING

__all__ = ["run_demo", "format_table", "DIGITS_GUIDANCE", "DIGITS_SAMPLING", "write_png", "image_grid",
           "save_grid_png", "CONDITIONS"]

CONDITIONS = ("real", "real+ddim", "real+cdp")
ATTACKS = ("clean", "pgd", "autoattack")
#: AutoAttack components of the default (quick) run: APGD-CE + APGD-T, the two attacks of
#: standard AutoAttack that make nearly all of its reductions (Croce & Hein 2020, Table 2: FAB-T
#: and Square rarely change the result). Square's 5000 queries alone took ~6 min on the 450
#: test digits on the 2-core dev CPU. ``full=True`` runs standard AutoAttack (all four).
QUICK_AA = ("apgd-ce", "apgd-t")


# ----------------------------------------------------------------------------- PNG
def write_png(path, img: np.ndarray) -> None:
    """Write a uint8 image (H, W) grey or (H, W, 1|3) RGB as PNG (Pillow), atomically."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"img must be uint8 (H, W) or (H, W, 1|3), got {img.dtype} {img.shape}")
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("writing PNG grids needs Pillow: pip install 'cdp_fast[demo]'") from e
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    buf = io.BytesIO()
    # uint8 (H, W) -> mode "L", (H, W, 3) -> "RGB"; Pillow infers it (its mode= is deprecated)
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def image_grid(images: np.ndarray, nrow: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images (N, H, W, C) into one uint8 image, each upscaled ``scale``×
    (nearest neighbour) with a ``pad``-pixel border of value 255 ... returned (H', W') for C=1."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nr = math.ceil(n / ncol)
    grid = np.full((nr * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid[:, :, 0] if c == 1 else grid


def save_grid_png(path, images, nrow: int = 8, scale: int = 4) -> None:
    """Save uint8 NHWC images as a PNG grid."""
    write_png(path, image_grid(np.asarray(images), nrow=nrow, scale=scale))


# ----------------------------------------------------------------------------- pieces
def generate(method: str, n: int, *, seed: int = 0, progress: bool = False, device=None,
             compile=False, guidance=None, steps: int | None = None):
    """Synthetic digits from the bundled ε-model: ``method`` "ddim" (λ = 0) or "cdp" (HNM
    guidance on the bundled features), pseudo-labelled by the bundled classifier. Returns a
    :class:`cdp_fast.Samples` (uint8 NHWC (n, 8, 8, 1), labels, confidence)."""
    import cdp_fast
    from cdp_fast.models import digits

    if method not in ("ddim", "cdp"):
        raise ValueError(f"method must be 'ddim' or 'cdp', got {method!r}")
    model = digits.load_digits_eps_model(device)
    labeler = digits.digits_labeler(device)
    kw = {}
    if method == "cdp":
        g = dict(DIGITS_GUIDANCE["hnm"], **(guidance or {}))
        kw = dict(loss="hnm", features=digits.digits_features(device), **g)
    else:
        kw = dict(loss=None)
    samp = dict(DIGITS_SAMPLING)
    # the contrastive batch m is min(128, n): guided batches are always computed full
    samp["batch_size"] = min(samp["batch_size"], n)
    if steps is not None:
        samp["steps"] = steps
    return cdp_fast.sample(model, n, labeler=labeler, image_shape=digits.IMAGE_SHAPE, seed=seed,
                           device=device, compile=compile, progress=progress, **samp, **kw)


def synthetic_stats(samples, features=None) -> dict:
    """Class histogram, mean pseudo-label confidence and feature spread of a sample set."""
    labels = np.asarray(samples.labels)
    conf = np.asarray(samples.confidence, dtype=np.float64)
    hist = np.bincount(labels, minlength=10)
    p = hist / max(1, hist.sum())
    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    out = {"n": int(len(labels)), "class_histogram": hist.tolist(), "label_entropy_nats": ent,
           "mean_confidence": float(conf.mean()), "frac_confidence_gt_0.8": float((conf > 0.8).mean())}
    if features is not None:
        x = samples.to_tensor() * 2 - 1
        with torch.no_grad():
            z = torch.nn.functional.normalize(features(x).float(), dim=1)
        sim = z @ z.T
        n = sim.shape[0]
        same = torch.as_tensor(labels)[:, None] == torch.as_tensor(labels)[None, :]
        off = ~torch.eye(n, dtype=torch.bool)
        out["mean_cosine_same_class"] = float(sim[same & off].mean())
        out["mean_cosine_other_class"] = float(sim[~same].mean())
    return out


def guidance_sweep(taus=(0.1, 1.0, 10.0), lams=(10.0, 100.0, 1000.0, 10000.0), *, loss="hnm", n=256,
                   seed=1000, steps=None, progress=False) -> list:
    """Sample statistics of guided digits for a grid of (τ, λ), plus the unguided baseline
    (λ = 0), each on ``n`` samples from the same starting noise (seed ``seed``, disjoint from
    the demo's seeds). Used once to choose :data:`cdp_fast.models.digits.DIGITS_GUIDANCE`; the
    criterion is in its comment. Returns a list of dicts (tau, lam, and :func:`synthetic_stats`)."""
    from cdp_fast.models import digits

    feats = digits.digits_features()
    rows = [dict(tau=None, lam=0.0, **synthetic_stats(generate("ddim", n, seed=seed, steps=steps), feats))]
    for tau in taus:
        for lam in lams:
            g = {"tau": tau, "lam": lam}
            if loss != "hnm":
                raise ValueError("guidance_sweep: only loss='hnm' is swept")
            s = generate("cdp", n, seed=seed, steps=steps, guidance=g, progress=progress)
            rows.append(dict(tau=tau, lam=lam, **synthetic_stats(s, feats)))
    return rows


def _summ(values):
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "values": [float(a) for a in v]}


def format_table(results: dict) -> str:
    """The demo's table: rows = conditions, columns = attacks, cells = mean ± std (%)."""
    attacks = results["config"]["attacks"]
    nseeds = len(results["config"]["seeds"])
    head = f"{'condition':<12}" + "".join(f"{a + ' acc (%)':>20}" for a in attacks)
    aa = results["config"].get("autoattack", "standard")
    lines = [f"TRADES small CNN on 8x8 digits, L-inf eps={results['config']['eps']:g}, "
             f"mean ± std over {nseeds} seeds, {results['config']['test_n']} test images, "
             f"PGD-{results['config'].get('eval_pgd_steps', 20)}, AutoAttack: {aa}", head,
             "-" * len(head)]
    for c, row in results["conditions"].items():
        cells = []
        for a in attacks:
            m, s = 100 * row[a]["mean"], 100 * row[a]["std"]
            cells.append(f"{m:6.2f} ± {s:5.2f}" if not math.isnan(s) else f"{m:6.2f}")
        lines.append(f"{c:<12}" + "".join(f"{x:>20}" for x in cells))
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    attacks = results["config"]["attacks"]
    conds = list(results["conditions"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        m = [100 * results["conditions"][c][a]["mean"] for a in attacks]
        s = [100 * np.nan_to_num(results["conditions"][c][a]["std"]) for a in attacks]
        ax.bar(np.arange(len(attacks)) + (i - (len(conds) - 1) / 2) * width, m, width, yerr=s, capsize=3, label=c)
    ax.set_xticks(np.arange(len(attacks)))
    ax.set_xticklabels(attacks)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"8x8 digits, TRADES, eps={results['config']['eps']:g}, {len(results['config']['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- driver
def run_demo(*, out="cdp_demo", full: bool = False, seeds=None, n_synthetic: int | None = None,
             epochs: int | None = None, eps: float = 0.1, real_fraction: float = 0.5,
             batch_size: int = 128, pgd_steps: int | None = None, attacks=ATTACKS, test_n: int | None = None,
             real_n: int | None = None, sampling_steps: int | None = None, conditions=CONDITIONS, device=None,
             progress: bool = True, callback=None) -> dict:
    """Run the miniature real / real+DDIM / real+Contrastive-DP comparison.

    Args:
        out: output folder (results.json, results.png, grid_ddim.png, grid_cdp.png,
            grid_pair.png, synthetic_*.npz); None writes nothing.
        full: the longer run (n_synthetic 4000, 30 epochs, 10 PGD steps in training, standard
            AutoAttack, 5 seeds, synthetic sets regenerated per seed). Explicit arguments
            override either preset.
        seeds: training seeds (default 3 seeds 0, 1, 2; ``full``: 0..4). >= 1 (std needs 2).
        n_synthetic: synthetic images per method (default 1024).
        epochs: TRADES epochs; an epoch is ceil(real_n / batch_size) updates for every
            condition (the fixed budget; default 10).
        eps: L∞ radius on [0, 1] pixels for training (TRADES) and evaluation.
        real_fraction: share of real images in each batch of the synthetic conditions.
        batch_size: TRADES batch size. pgd_steps: TRADES inner PGD steps, step size
            2.5 ε / steps (default 5; ``full`` 10, the paper's).
        attacks: subset of ("clean", "pgd", "autoattack") for the evaluation.
        test_n: evaluate on the first ``test_n`` test digits (default all 450).
        real_n: use the first ``real_n`` real training digits (default all 1347).
        sampling_steps: DDIM steps for the synthetic sets (default 50, :data:`DIGITS_SAMPLING`).
        conditions: subset of :data:`CONDITIONS` to train (default all three).
        device: torch device (default CPU).
        progress: progress bars; callback: called with {"stage", ...} dicts as stages finish.
    Returns:
        dict with "config", "synthetic" (per method: class histogram, confidence, feature
        cosine statistics), "conditions" (per condition, per attack: mean, std, values),
        "table" (the formatted table), "timing_s" and "files".
    """
    import cdp_fast
    from cdp_fast.models import digits, small_cnn

    t_start = time.time()
    seeds = list(seeds) if seeds is not None else (list(range(5)) if full else [0, 1, 2])
    if len(seeds) < 1 or any((not isinstance(s, int)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds!r}")
    n_synthetic = n_synthetic if n_synthetic is not None else (4000 if full else 1024)
    epochs = epochs if epochs is not None else (30 if full else 10)
    pgd_steps = pgd_steps if pgd_steps is not None else (10 if full else 5)
    aa_kw = {} if full else {"version": "custom", "aa_attacks": QUICK_AA}
    if not isinstance(n_synthetic, int) or n_synthetic < 2:
        raise ValueError(f"n_synthetic must be an int >= 2, got {n_synthetic!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not (isinstance(eps, (int, float)) and 0 <= eps <= 1):
        raise ValueError(f"eps must lie in [0, 1], got {eps!r}")
    if not (0 < real_fraction < 1):
        raise ValueError(f"real_fraction must lie in (0, 1), got {real_fraction!r}")
    attacks = tuple(attacks)
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {attacks!r}")
    conditions = tuple(conditions)
    if not conditions or any(c not in CONDITIONS for c in conditions):
        raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions!r}")
    out = None if out is None else Path(out)
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def report(stage, **kw):
        if callback is not None:
            callback(dict(stage=stage, **kw))

    x_tr, y_tr = digits.load_digits_data("train")
    x_te, y_te = digits.load_digits_data("test")
    if real_n is not None:
        x_tr, y_tr = x_tr[:real_n], y_tr[:real_n]
    if test_n is not None:
        x_te, y_te = x_te[:test_n], y_te[:test_n]
    feats = digits.digits_features()
    spe = math.ceil(len(x_tr) / batch_size)
    timing = {}

    # 1. synthetic data (same seed => same x_T for sample i in both methods)
    synth = {}
    stats = {}
    regen = full
    gen_seeds = seeds if regen else [0]
    t0 = time.time()
    for method in ("ddim", "cdp"):
        for gs in gen_seeds:
            s = generate(method, n_synthetic, seed=gs, progress=progress, device=dev, steps=sampling_steps)
            synth[(method, gs)] = s
            if gs == gen_seeds[0]:
                stats[method] = synthetic_stats(s, feats)
                if out is not None:
                    s.save_npz(out / f"synthetic_{method}.npz")
        report("generated", method=method, stats=stats[method])
    timing["generate"] = time.time() - t0

    files = {}
    if out is not None:
        k = min(64, n_synthetic)
        a, b = np.asarray(synth[("ddim", gen_seeds[0])].images[:k]), np.asarray(synth[("cdp", gen_seeds[0])].images[:k])
        save_grid_png(out / "grid_ddim.png", a)
        save_grid_png(out / "grid_cdp.png", b)
        sep = np.full((1,) + a.shape[1:], 255, np.uint8)
        pair = np.concatenate([np.concatenate([a[i:i + 8], sep, b[i:i + 8]]) for i in range(0, k, 8)])
        save_grid_png(out / "grid_pair.png", pair, nrow=17)
        files.update(grid_ddim=str(out / "grid_ddim.png"), grid_cdp=str(out / "grid_cdp.png"),
                     grid_pair=str(out / "grid_pair.png"))

    # 2-3. TRADES per condition and seed, same budget
    step_size = 2.5 * eps / pgd_steps
    acc = {c: {a: [] for a in attacks} for c in conditions}
    t0 = time.time()
    for c in conditions:
        for seed in seeds:
            syn = None
            if c != "real":
                s = synth[(c.split("+")[1], seed if regen else 0)]
                syn = (s.to_tensor(), torch.as_tensor(np.asarray(s.labels), dtype=torch.int64))
            torch.manual_seed(seed)
            model = small_cnn(num_classes=10)
            model = cdp_fast.train_trades(
                model, (x_tr, y_tr), synthetic=syn, real_fraction=real_fraction if syn is not None else 1.0,
                epochs=epochs, eps=eps, step_size=step_size, steps=pgd_steps, beta=6.0,
                batch_size=batch_size, ema=0.995, lr=0.05, warmup_epochs=1, pad=1, flip=False,
                steps_per_epoch=spe, recipe="zhang",
                seed=seed, device=dev, progress=False)
            res = cdp_fast.evaluate(model, x_te.to(dev), y_te.to(dev), eps=eps, attacks=attacks, **aa_kw)
            for a in attacks:
                acc[c][a].append(float(res[a]))
            report("trained", condition=c, seed=seed, result={a: float(res[a]) for a in attacks})
    timing["train_eval"] = time.time() - t0
    timing["total"] = time.time() - t_start

    results = {
        "config": {"seeds": seeds, "n_synthetic": n_synthetic, "epochs": epochs, "steps_per_epoch": spe,
                   "updates": epochs * spe, "eps": eps, "step_size": step_size, "pgd_steps": pgd_steps,
                   "real_fraction": real_fraction, "batch_size": batch_size, "attacks": list(attacks),
                   "autoattack": "standard" if full else "+".join(QUICK_AA), "eval_pgd_steps": 20,
                   "real_n": int(len(x_tr)), "test_n": int(len(x_te)), "full": full,
                   "synthetic_regenerated_per_seed": regen, "guidance": DIGITS_GUIDANCE["hnm"],
                   "sampling": dict(DIGITS_SAMPLING, steps=sampling_steps or DIGITS_SAMPLING["steps"],
                                    batch_size=min(DIGITS_SAMPLING["batch_size"], n_synthetic)),
                   "model": "cdp_fast.models.small_cnn(num_classes=10)",
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "synthetic": stats,
        "conditions": {c: {a: _summ(acc[c][a]) for a in attacks} for c in conditions},
        "timing_s": timing,
    }
    results["table"] = format_table(results)
    if out is not None:
        if _plot(results, out / "results.png"):
            files["plot"] = str(out / "results.png")
        files["json"] = str(out / "results.json")
        results["files"] = files
        atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    else:
        results["files"] = files
    return results
