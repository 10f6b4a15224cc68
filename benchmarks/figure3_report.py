"""Summary, data-quality metrics, table and figure of benchmarks/figure3_mnist.py.

- :func:`summarise`: per split and arm mean ± sd over seeds of clean / PGD / AutoAttack accuracy;
  paired differences (same seed: same x_T, labels and noise, same classifier init) CDP − DDPM,
  CDP(random features) − DDPM, CDP − CDP(random), DDPM − real and CDP − real (R_r alone) with
  95% Student-t intervals; per-example
  paired counts pooled over seeds (b = first right & second wrong, c = the reverse); the
  references (real4K, syn5K-*) and the paper's two claims evaluated as stated in advance.
- :func:`data_quality`: for every synthetic set, :func:`cdp_fast.metrics.report` in three
  feature spaces — the trained guide's own (what CDP optimises), the random guide's and an
  independent PCA-40 of the real split — plus the mean pairwise cosine of the guide's features
  inside each contrastive batch of 128 (the quantity the HNM loss pushes down), the agreement of
  the trained guide's predicted class with the conditioning label and the guidance strength
  λ‖∇ℓ‖/‖ε‖ per step.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SPACES = ("trained", "random", "pca")


def ref_names(cfg):
    """(real-only reference, {arm: all-synthetic reference}) names, e.g. real4K, syn5K-ddpm."""
    return (f"real{cfg.ref_real / 1000:g}K" if cfg.ref_real else None,
            {arm: f"syn{cfg.total / 1000:g}K-{arm}" for arm in cfg.ref_syn_arms})


def _stats():
    from cdp_fast.demo.stats import paired_ci, summarise as summ

    return paired_ci, summ


# ---------------------------------------------------------------------------- accuracy
def summarise(cfg, res) -> dict:
    paired_ci, summ = _stats()
    runs = res["runs"]
    out = {"splits": {}, "references": {}, "claims": {}}
    metrics = ("clean", "pgd", "autoattack")
    for r in cfg.splits:
        s = {}
        for arm in tuple(cfg.arms) + (("real",) if getattr(cfg, "real_arms", False) else ()):
            names = [f"r{r}-{arm}-s{seed}" for seed in cfg.seeds]
            if all(n in runs for n in names):
                s[arm] = {m: summ([runs[n][m] for n in names]) for m in metrics}
        comps = {}
        for a, b in (("cdp", "ddpm"), ("cdp-rand", "ddpm"), ("cdp", "cdp-rand"), ("ddpm", "real"), ("cdp", "real")):
            if a in s and b in s:
                comps[f"{a} - {b}"] = {m: paired_ci([runs[f"r{r}-{a}-s{k}"][m] for k in cfg.seeds],
                                                    [runs[f"r{r}-{b}-s{k}"][m] for k in cfg.seeds]) for m in metrics}
                comps[f"{a} - {b}"]["per_example"] = {
                    m: per_example([runs[f"r{r}-{a}-s{k}"] for k in cfg.seeds],
                                   [runs[f"r{r}-{b}-s{k}"] for k in cfg.seeds], m) for m in ("clean", "autoattack")}
        out["splits"][str(r)] = {"arms": s, "paired": comps}
    real_ref, syn_refs = ref_names(cfg)
    for ref in ([real_ref] if real_ref else []) + list(syn_refs.values()):
        names = [f"{ref}-s{seed}" for seed in cfg.seeds]
        if all(n in runs for n in names):
            out["references"][ref] = {m: summ([runs[n][m] for n in names]) for m in metrics}
    if real_ref in out["references"]:
        for ref in syn_refs.values():
            if ref in out["references"]:
                out["references"][f"{ref} - {real_ref}"] = {
                    m: paired_ci([runs[f"{ref}-s{k}"][m] for k in cfg.seeds],
                                 [runs[f"{real_ref}-s{k}"][m] for k in cfg.seeds]) for m in metrics}
    # the paper's claims, as pre-registered (fidelity.md §B.5 step 13)
    wins = [r for r in cfg.splits if "cdp - ddpm" in out["splits"][str(r)]["paired"]
            and all(out["splits"][str(r)]["paired"]["cdp - ddpm"][m]["mean"] > 0 for m in ("clean", "autoattack"))]
    sig = [r for r in cfg.splits if "cdp - ddpm" in out["splits"][str(r)]["paired"]
           and all((out["splits"][str(r)]["paired"]["cdp - ddpm"][m]["lo"] or -1) > 0 for m in ("clean", "autoattack"))]
    out["claims"]["guidance_helps_both"] = {
        "rule": "CDP - DDPM > 0 in both clean and AutoAttack accuracy in a majority of the splits",
        "splits_with_both_means_positive": wins, "splits_with_both_intervals_above_0": sig,
        "holds_on_means": len(wins) * 2 > len(cfg.splits), "holds_with_intervals": len(sig) * 2 > len(cfg.splits)}
    out["claims"]["synthetic_helps_at_scarce_real"] = {
        "rule": "R_r + (5K - r) synthetic above R_r alone (same updates) in clean and AutoAttack accuracy",
        **{str(r): {comp: {m: {k: out["splits"][str(r)]["paired"][comp][m][k] for k in ("mean", "lo", "hi")}
                           for m in ("clean", "autoattack")}
                    for comp in ("ddpm - real", "cdp - real") if comp in out["splits"][str(r)]["paired"]}
           for r in cfg.splits}}
    refs = out["references"]
    diffs = {ref: refs[f"{ref} - {real_ref}"] for ref in syn_refs.values() if f"{ref} - {real_ref}" in refs}
    if diffs:
        out["claims"]["synthetic_only_beats_real"] = {
            "rule": f"all-synthetic ({cfg.total} images, no real data) above {real_ref} in clean and AutoAttack accuracy",
            **{ref: {m: {k: d[m][k] for k in ("mean", "lo", "hi")} for m in ("clean", "autoattack")}
               for ref, d in diffs.items()}}
    mixed = {}
    for r in cfg.splits:
        arms = out["splits"][str(r)]["arms"]
        if real_ref in refs:
            mixed[str(r)] = {arm: {m: arms[arm][m]["mean"] - refs[real_ref][m]["mean"] for m in ("clean", "autoattack")}
                             for arm in arms}
    out["claims"][f"mixed_minus_{real_ref}"] = mixed
    return out


def per_example(runs_a, runs_b, metric) -> dict:
    """Pooled over seeds: b = points a gets right and b wrong, c = the reverse (McNemar's
    discordant counts), n = all paired points."""
    b = c = n = 0
    for ra, rb in zip(runs_a, runs_b):
        pa = np.frombuffer(ra["per_example"][metric].encode(), np.uint8) == ord("1")
        pb = np.frombuffer(rb["per_example"][metric].encode(), np.uint8) == ord("1")
        b += int((pa & ~pb).sum())
        c += int((~pa & pb).sum())
        n += len(pa)
    return {"a_right_b_wrong": b, "a_wrong_b_right": c, "n": n,
            "mcnemar_z": (b - c) / math.sqrt(b + c) if b + c else None}


# ---------------------------------------------------------------------------- data quality
class _Space(torch.nn.Module):
    """A classifier's penultimate features on [0, 1] images, named for the report."""

    def __init__(self, net, description):
        super().__init__()
        self.net, self.description = net, description

    def forward(self, x):
        return self.net.features(x)


def batch_cosine(f: torch.Tensor, batch: int = 128) -> float:
    """Mean pairwise cosine similarity of features f (n, d) inside each consecutive batch of
    ``batch`` rows (the sampler's contrastive batches), off-diagonal pairs only."""
    f = torch.nn.functional.normalize(f.double(), dim=1)
    vals = []
    for i in range(0, len(f), batch):
        g = f[i:i + batch]
        m = len(g)
        if m > 1:
            s = g @ g.T
            vals.append(float((s.sum() - s.diagonal().sum()) / (m * (m - 1))))
    return float(np.mean(vals))


def data_quality(cfg, split, sets, nets, work) -> dict:
    """Per (tag, seed) and guided arm: cdp_fast.metrics.report against the DDPM set of the same
    seed, in each feature space; compact keys only (the full reports go to the work folder)."""
    from cdp_fast.metrics import extract_features, report
    from cdp_fast.utils.io import atomic_write_json

    out = {}
    for name, s in sorted(sets.items()):
        if s["arm"] == "ddpm":
            continue
        base = name.replace(f"-{s['arm']}-", "-ddpm-")
        if base not in sets:
            continue
        r = s["r"]
        real = split.real(r)
        spaces = {"trained": _Space(nets[r]["trained"], f"trained guide r={r} (4-layer CNN fc_1, 100-d)"),
                  "random": _Space(nets[r]["random"], f"random guide r={r} (4-layer CNN fc_1, 100-d)"),
                  "pca": None}
        entry = {}
        for key, feat in spaces.items():
            rep = report(str(s["dir"]), real=real, against=str(sets[base]["dir"]), features=feat,
                         classifier=nets[r]["trained"], num_classes=10, seed=0)
            atomic_write_json(work.path("reports", f"{name}-{key}.json"), rep)
            entry[key] = {arm: _compact(rep[k]) for arm, k in ((s["arm"], "samples"), ("ddpm", "against"))}
            entry[key]["real"] = {"fisher_ratio": rep["real"]["separation"]["fisher_ratio"]}
            entry["paired"] = rep["paired"]
        for arm, d in ((s["arm"], s["dir"]), ("ddpm", sets[base]["dir"])):
            x = _images01(d)
            for key in ("trained", "random"):
                entry[key][arm]["batch_cosine"] = batch_cosine(extract_features(spaces[key], x))
        entry["guidance_strength"] = _strength(s["dir"])
        out[name] = entry
    return out


def _images01(d) -> torch.Tensor:
    from cdp_fast.metrics import as_image_set

    return as_image_set(str(d)).x


def _strength(d):
    import json
    from pathlib import Path

    man = json.loads((Path(d) / "manifest.json").read_text())
    return man.get("guidance_strength")


def _compact(m: dict) -> dict:
    sep = m.get("separation") or {}
    fid = m.get("fidelity") or {}
    mem = (m.get("memorisation") or {}).get("pixel") or {}
    agr = m.get("agreement") or {}
    return {"fisher_ratio": sep.get("fisher_ratio"), "separation_mean": sep.get("separation_mean"),
            "effective_c": sep.get("effective_c"), "precision": fid.get("precision"), "recall": fid.get("recall"),
            "density": fid.get("density"), "coverage": fid.get("coverage"),
            "guide_agreement": agr.get("agreement"), "nn_pixel_median": mem.get("q50")}


# ---------------------------------------------------------------------------- table, figure
def _fmt(p, scale=100.0):
    if p is None:
        return "n/a"
    if p.get("lo") is None:
        return f"{scale * p['mean']:+.2f}"
    return f"{scale * p['mean']:+.2f} [{scale * p['lo']:+.2f}, {scale * p['hi']:+.2f}]"


def table(res) -> str:
    """Markdown: per split, accuracy of each arm (mean ± sd, %) and the paired differences."""
    sm = res["summary"]
    attacks = " + ".join(a.upper() for a in res.get("config", {}).get("aa_attacks", ("autoattack",)))
    lines = [f"| split | arm | clean % | PGD-{res.get('config', {}).get('eval_pgd_steps', '')} % | {attacks} % |",
             "|---|---|---|---|---|"]
    for r, s in sm["splits"].items():
        for arm, v in s["arms"].items():
            lines.append(f"| {int(r) / 1000:g}K real | {arm} | " + " | ".join(
                f"{100 * v[m]['mean']:.2f} ± {100 * (v[m]['std'] or 0):.2f}" for m in ("clean", "pgd", "autoattack")) + " |")
        for comp, v in s["paired"].items():
            lines.append(f"| {int(r) / 1000:g}K real | **{comp}** | " + " | ".join(_fmt(v[m]) for m in ("clean", "pgd", "autoattack")) + " |")
    for ref, v in sm["references"].items():
        if " - " in ref:
            lines.append(f"| reference | **{ref}** | " + " | ".join(_fmt(v[m]) for m in ("clean", "pgd", "autoattack")) + " |")
        else:
            lines.append(f"| reference | {ref} | " + " | ".join(
                f"{100 * v[m]['mean']:.2f} ± {100 * (v[m]['std'] or 0):.2f}" for m in ("clean", "pgd", "autoattack")) + " |")
    return "\n".join(lines)


def figure(res, path):
    """Clean (x) vs AutoAttack (y) accuracy: one marker per arm and split (error bars = seed sd),
    real4K as dashed lines, syn5K points marked. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sm = res["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    style = {"ddpm": ("o", "tab:blue"), "cdp": ("s", "tab:red"), "cdp-rand": ("^", "tab:gray"),
             "real": ("D", "tab:green")}
    for r, s in sm["splits"].items():
        for arm, v in s["arms"].items():
            mk, col = style.get(arm, ("x", "k"))
            ax.errorbar(100 * v["clean"]["mean"], 100 * v["autoattack"]["mean"], xerr=100 * (v["clean"]["std"] or 0),
                        yerr=100 * (v["autoattack"]["std"] or 0), fmt=mk, color=col, ms=6, capsize=2,
                        label=arm if r == next(iter(sm["splits"])) else None)
            ax.annotate(f"{int(r) / 1000:g}K", (100 * v["clean"]["mean"], 100 * v["autoattack"]["mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=col)
    refs = sm["references"]
    real_ref = next((k for k in refs if k.startswith("real") and " - " not in k), None)
    if real_ref:
        ax.axvline(100 * refs[real_ref]["clean"]["mean"], ls="--", color="k", lw=1, label=f"{real_ref[4:]} real only")
        ax.axhline(100 * refs[real_ref]["autoattack"]["mean"], ls="--", color="k", lw=1)
    for ref, v in refs.items():
        if ref.startswith("syn") and " - " not in ref:
            arm = ref.split("-", 1)[1]
            mk, col = style.get(arm, ("x", "k"))
            ax.errorbar(100 * v["clean"]["mean"], 100 * v["autoattack"]["mean"], xerr=100 * (v["clean"]["std"] or 0),
                        yerr=100 * (v["autoattack"]["std"] or 0), fmt=mk, mfc="none", color=col, ms=9, capsize=2,
                        label=f"{ref.split('-')[0][3:]} synthetic only ({arm})")
    ax.set_xlabel("clean accuracy (%)")
    attacks = " + ".join(a.upper() for a in res["config"]["aa_attacks"])
    ax.set_ylabel(f"robust accuracy (%): {attacks}, L∞ ε = {res['eps']}")
    ax.set_title(f"Figure 3 on 5K real MNIST digits ({res['config']['generator']} generator)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
