"""The printed tables of `cdp-fast demo`: the arms with their paired differences to real+ddim
(:func:`format_table`), the λ sweep (:func:`format_sweep_table`), the §1 metrics of the synthetic
sets (:func:`metrics_summary`, :func:`format_metrics_table`) and the Gaussian chain
(:func:`format_gaussian_table`)."""
from __future__ import annotations

from cdp_fast.demo.stats import paired_ci, summarise

__all__ = ["format_table", "format_sweep_table", "METRIC_ROWS", "metrics_summary", "format_metrics_table",
           "format_gaussian_table"]


def _pct(cell, key="mean"):
    v = cell.get(key) if isinstance(cell, dict) else cell
    return None if v is None else 100.0 * v


def _ci_text(p, scale=100.0, digits=2):
    if p["lo"] is None:
        return f"{scale * p['mean']:+.{digits}f}"
    return f"{scale * p['mean']:+.{digits}f} [{scale * p['lo']:+.{digits}f}, {scale * p['hi']:+.{digits}f}]"


def format_table(results: dict) -> str:
    """Rows = arms (mean ± std, %), then each arm's paired Δ vs real+ddim with its 95% CI
    (percentage points)."""
    cfg = results["config"]
    attacks = cfg["attacks"]
    names = {"clean": "clean acc (%)", "pgd": "PGD-20 acc (%)", "autoattack": "AA acc (%)"}
    n = len(cfg["seeds"])
    lines = [f"k = {cfg['k_per_class']}/class ({cfg['real_n']} real digits), {cfg['n_synthetic']} synthetic per set, "
             f"TRADES small CNN, eps = {cfg['eps']:g}, {cfg['updates']} updates, {n} paired seeds, "
             f"{cfg['test_n']} test digits"
             # name AutoAttack only when it ran
             + (f"; AutoAttack = {cfg['autoattack']} on the first {cfg['aa_test_n']}" if "autoattack" in attacks
                else "; no AutoAttack"),
             f"{'arm':<16}" + "".join(f"{names[a]:>18}" for a in attacks)]
    lines.append("-" * len(lines[-1]))
    for arm, row in results["arms"].items():
        cells = []
        for a in attacks:
            m, s = _pct(row[a]), _pct(row[a], "std")
            cells.append(f"{m:6.2f} ± {s:4.2f}" if s is not None else f"{m:6.2f}")
        lines.append(f"{arm:<16}" + "".join(f"{c:>18}" for c in cells))
    lines.append(f"paired difference to real+ddim, points, mean [95% CI, Student t, df = {n - 1}]")
    for arm, row in results["paired_vs_ddim"].items():
        lines.append(f"{arm:<16}" + "".join(f"{_ci_text(row[a]):>24}" for a in attacks))
    lines.append("note: the epsilon-model saw all 1347 training digits (leakage, equal for every synthetic arm; "
                 "config.leakage in the JSON)")
    return "\n".join(lines)


def format_sweep_table(sweep: dict) -> str:
    """The λ sweep (sweep seed, PCA of the k real digits, pseudo-labels) and the choice per kind."""
    lines = [f"lambda sweep (seed {sweep['seed']}, {sweep['n']} samples per set, tau {sweep['tau']:g}); rule: largest "
             "Fisher ratio with precision >= DDIM's - 0.05",
             f"{'set':<10}{'lambda':>9}{'Fisher':>9}{'eff. c':>9}{'precision':>11}{'recall':>9}{'flips':>8}"]
    for r in sweep["rows"]:
        mark = "  <- chosen" if r["kind"] in sweep["choice"] and sweep["choice"][r["kind"]]["lam"] == r["lam"] else ""

        def f(key, w, d=3):
            v = r.get(key)
            return f"{'-':>{w}}" if v is None else f"{v:>{w}.{d}f}"
        lines.append(f"{r['kind']:<10}{r['lam']:>9g}" + f("fisher_ratio", 9) + f("effective_c", 9) + f("precision", 11)
                     + f("recall", 9) + f("label_flip_rate", 8) + mark)
    return "\n".join(lines)


#: (label, path into a metrics.report per-set dict ("samples"))
METRIC_ROWS = [("Fisher ratio (PCA of the k real)", ("separation", "fisher_ratio")),
               ("effective c (mean over pairs)", ("separation", "effective_c")),
               ("precision vs the k real", ("fidelity", "precision")),
               ("recall vs the k real", ("fidelity", "recall")),
               ("density", ("fidelity", "density")),
               ("coverage", ("fidelity", "coverage")),
               ("label agreement with the judge", ("agreement", "agreement")),
               ("labeler confidence, mean", ("confidence", "mean")),
               ("classes: entropy / log K", ("class_balance", "entropy_normalised")),
               ("probe: clean acc. on test", ("probe", "clean_accuracy")),
               ("probe: PGD acc. on test", ("probe", "robust_accuracy")),
               ("NN dist. to the k real, px, median", ("memorisation", "pixel", "q50")),
               ("label flips vs DDIM (same x_T)", ("paired", "label_flip_rate"))]


def _get(d, path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def metrics_summary(per_seed: dict) -> dict:
    """per_seed: kind -> [:func:`cdp_fast.demo.digits.set_report` per seed] -> {"rows": {label: {kind:
    summary over seeds}}, "paired_vs_ddim": {kind: {label: paired CI vs the DDIM set}}}."""
    out = {"rows": {}, "paired_vs_ddim": {}}
    for label, path in METRIC_ROWS:
        row = {}
        for kind, reps in per_seed.items():
            vals = [_get(r.get("samples"), path) for r in reps]
            if vals and all(v is not None for v in vals):
                row[kind] = summarise(vals)
        out["rows"][label] = row
        for kind in per_seed:
            if kind != "ddim" and kind in row and "ddim" in row:
                out["paired_vs_ddim"].setdefault(kind, {})[label] = paired_ci(row[kind]["values"],
                                                                              row["ddim"]["values"])
    return out


def format_metrics_table(msum: dict) -> str:
    """The §1 metrics of each synthetic kind (mean ± std over seeds) and Δ vs DDIM [95% CI]."""
    kinds = [k for k in ("ddim", "cdp", "cdp-class") if any(k in r for r in msum["rows"].values())]
    lines = [f"{'metric (mean ± std over seeds)':<36}" + "".join(f"{k:>16}" for k in kinds)
             + "".join(f"{'Δ ' + k + ' vs ddim [95% CI]':>32}" for k in kinds if k != "ddim")]
    lines.append("-" * len(lines[0]))
    for label, row in msum["rows"].items():
        cells = []
        for k in kinds:
            c = row.get(k)
            cells.append("-" if c is None else (f"{c['mean']:.3f} ± {c['std']:.3f}" if c["std"] is not None
                                                 else f"{c['mean']:.3f}"))
        for k in kinds:
            if k != "ddim":
                p = msum["paired_vs_ddim"].get(k, {}).get(label)
                cells.append("-" if p is None else _ci_text(p, scale=1.0, digits=3))
        widths = [16] * len(kinds) + [32] * (len(kinds) - 1)
        lines.append(f"{label:<36}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def format_gaussian_table(g: dict) -> str:
    cfg = g["config"]
    lines = [f"Gaussian chain: d = {len(cfg['mu'])}, |mu|^2 = {sum(v * v for v in cfg['mu']):g}, eps = {cfg['eps']:g}, "
             f"n = {cfg['n_real_per_class']}/class, {cfg['n_syn']} synthetic, {len(cfg['seeds'])} paired seeds; "
             "accuracies exact (1 - eq. 6 / 1 - eq. 7), %",
             f"{'arm':<16}{'standard':>22}{'robust':>22}{'Δ standard vs ddim':>30}{'Δ robust vs ddim':>30}"]
    for arm, row in g["arms"].items():
        cells = [f"{100 * row[m]['mean']:.3f}" + ("" if row[m]["std"] is None else f" ± {100 * row[m]['std']:.3f}")
                 for m in ("standard", "robust")]
        p = g["paired_vs_ddim"].get(arm)
        cells += ["" if p is None else _ci_text(p[m], digits=3) for m in ("standard", "robust")]
        lines.append(f"{arm:<16}{cells[0]:>22}{cells[1]:>22}{cells[2]:>30}{cells[3]:>30}")
    fm = g.get("fisher_along_mu", {})
    if fm:
        lines.append("Fisher ratio along mu of the pseudo-labelled synthetic set (mean over seeds): "
                     + ", ".join(f"{k} {v['mean']:.2f}" for k, v in fm.items()))
    return "\n".join(lines)
