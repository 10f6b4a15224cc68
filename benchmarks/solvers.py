"""Contrastive guidance on fast solvers: sample quality against network evaluations (NFE) on the
bundled digits models, guided DDIM at 10-200 steps vs DPM-Solver++(2M) and EDM Heun at ~10, 20,
40 NFE, every condition from the same x_T (per-sample seeding), over paired seeds.

    python benchmarks/solvers.py [--n 512] [--seeds 5] [--threads 2] [--out benchmarks/results/solvers-cpu.json]

Guidance: ℓ_HNM with the digits preset (cdp_fast.models.digits.DIGITS_GUIDANCE: λ = 1e4, τ = 10,
anchor form, every step, no head) on the bundled classifier's features; λ is the same for every
solver (the rule, README "Fast solvers": the guidance enters each solver as the velocity term
ε̃ = ε + λ∇ℓ of the same ODE, so it is integrated over σ rather than applied per step; the
unguided twin of every condition measures the guidance's effect at that NFE).

Metrics, none of which the guidance optimises (cdp_fast.metrics): features = PCA-20 of the real
training pixels; labels = an independent judge (multinomial logistic regression on the real
training pixels); Fisher ratio of the judge-labelled samples; k-NN precision / recall (k = 5)
against the real *test* digits; class balance (normalised label entropy); pseudo-label agreement
(the bundled classifier — the labeller — against the judge). Per condition: mean and 95%
t-interval over seeds; paired differences (guided − unguided; condition − guided DDIM-200) with
their intervals. "Quality-matched": the fewest-NFE condition whose mean precision and recall lie
inside guided DDIM-200's interval (uniform spacing; benchmarks/throughput.py --quality-matched
times it); beside it, the fewest-NFE condition no worse than that interval's lower ends. Timestep spacings: "uniform" (the digits preset, DDIM's leading spacing) and
"quadratic" (the paper's CIFAR-10 spacing) for DDIM and DPM-Solver++; Karras σ's for Heun.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: (solver, NFE, timestep spacing): guided DDIM at 200 steps and fewer, the fast solvers near
#: 10/20/40; "uniform" is the digits preset (DDIM's leading spacing), "quadratic" the paper's
#: CIFAR-10 spacing (small steps near t = 0); Heun uses Karras σ's whatever the spacing
CONDITIONS = [("ddim", 200, "uniform"), ("ddim", 50, "uniform"), ("ddim", 20, "uniform"), ("ddim", 10, "uniform"),
              ("ddim", 20, "quadratic"), ("ddim", 10, "quadratic"),
              ("dpmpp_2m", 10, "uniform"), ("dpmpp_2m", 20, "uniform"), ("dpmpp_2m", 40, "uniform"),
              ("dpmpp_2m", 10, "quadratic"), ("dpmpp_2m", 20, "quadratic"), ("dpmpp_2m", 40, "quadratic"),
              ("dpmpp_2m", 10, "logsnr"), ("dpmpp_2m", 20, "logsnr"), ("dpmpp_2m", 40, "logsnr"),
              ("heun", 9, "karras"), ("heun", 19, "karras"), ("heun", 39, "karras")]
METRICS = ("fisher_ratio", "precision", "recall", "balance", "agreement")
#: two-sided 97.5% Student-t quantiles by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def ci(values) -> dict:
    """Mean and 95% Student-t interval of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return {"mean": m, "lo": m, "hi": m, "n": len(v)}
    df = len(v) - 1
    t = _T975.get(df, _T975[max(k for k in _T975 if k <= df)])
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(v)}


class Instruments:
    """The measuring side: PCA-20 and the logistic-regression judge, both fit on the real
    training pixels; the real test digits' features are the precision/recall reference."""

    def __init__(self):
        from cdp_fast import metrics
        from cdp_fast.models import digits

        x_tr, y_tr = digits.load_digits_data("train")
        x_te, _ = digits.load_digits_data("test")
        self.pca = metrics.fit_pca(x_tr, 20)
        self.judge = metrics.fit_logistic_regression(x_tr, y_tr, num_classes=10)
        self.f_test = metrics.extract_features(self.pca, x_te)
        self.labeler = digits.load_digits_classifier()

    def measure(self, x_model) -> dict:
        from cdp_fast import metrics

        x01 = ((torch.as_tensor(x_model).float() + 1) / 2).clamp(0, 1)
        f = metrics.extract_features(self.pca, x01)
        with torch.no_grad():
            y = self.judge(x01).argmax(1)
            pseudo = self.labeler(x01).argmax(1)
        pr = metrics.prdc(self.f_test, f, k=5)
        return {"fisher_ratio": metrics.class_separation(f, y)["fisher_ratio"],
                "precision": pr["precision"], "recall": pr["recall"],
                "balance": metrics.class_balance(y, 10)["entropy_normalised"],
                "agreement": float((pseudo == y).double().mean())}


def run(n: int, seeds: list, conditions=CONDITIONS, progress=print) -> dict:
    import cdp_fast
    from cdp_fast.models import digits

    eps = digits.load_digits_eps_model()
    feats = digits.digits_features()
    g = dict(digits.DIGITS_GUIDANCE["hnm"])
    common = dict(image_shape=digits.IMAGE_SHAPE, batch_size=digits.DIGITS_SAMPLING["batch_size"],
                  output="float", progress=False, compile=False)
    inst = Instruments()
    rows = []
    for seed in seeds:
        for solver, nfe, spacing in conditions:
            for guided in (True, False):
                kw = dict(common, solver=solver, nfe=nfe, seed=seed,
                          skip="uniform" if spacing == "karras" else spacing)
                if guided:
                    kw.update(loss="hnm", features=feats, **g)
                else:
                    kw.update(loss=None)
                start = time.perf_counter()
                s = cdp_fast.sample(eps, n, **kw)
                secs = time.perf_counter() - start
                m = inst.measure(s.images)
                rows.append({"seed": seed, "solver": solver, "nfe": s.meta["nfe"], "spacing": spacing,
                             "guided": guided, "seconds": secs, **m})
                progress(f"  seed {seed} {solver:8s} {spacing:9s} nfe {nfe:3d} {'guided  ' if guided else 'unguided'} "
                         f"{secs:6.1f} s  " + "  ".join(f"{k} {m[k]:.3f}" for k in METRICS))
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows) -> dict:
    """Per (solver, NFE, guided): CIs of each metric over seeds; paired differences guided −
    unguided and condition − guided DDIM-200 (same seed); the quality-matched condition."""
    by = {}
    for r in rows:
        by.setdefault((r["solver"], r["nfe"], r.get("spacing", "uniform"), r["guided"]), {})[r["seed"]] = r
    ref = by.get(("ddim", 200, "uniform", True), {})
    out = []
    for (solver, nfe, spacing, guided), per_seed in by.items():
        seeds = sorted(per_seed)
        entry = {"solver": solver, "nfe": nfe, "spacing": spacing, "guided": guided, "seeds": seeds,
                 "seconds": ci([per_seed[s]["seconds"] for s in seeds])}
        for k in METRICS:
            entry[k] = ci([per_seed[s][k] for s in seeds])
            twin = by.get((solver, nfe, spacing, not guided), {})
            if guided and all(s in twin for s in seeds):
                entry[f"{k}_guidance_effect"] = ci([per_seed[s][k] - twin[s][k] for s in seeds])
            if guided and all(s in ref for s in seeds):
                entry[f"{k}_minus_ddim200"] = ci([per_seed[s][k] - ref[s][k] for s in seeds])
        out.append(entry)
    is_bar = lambda e: (e["solver"], e["nfe"], e["spacing"]) == ("ddim", 200, "uniform")  # noqa: E731
    bar = next((e for e in out if is_bar(e) and e["guided"]), None)

    def fewest(flag, ok):
        """Mark each guided condition with ``flag`` (the bar itself counts) and return the
        fewest-NFE condition whose precision and recall means are ``ok`` against the bar's
        intervals (at equal NFE a fast solver before DDIM), or None."""
        if bar is None:
            return None
        hits = [e for e in out if e["guided"] and not is_bar(e)
                and all(ok(e[k]["mean"], bar[k]) for k in ("precision", "recall"))]
        for e in out:
            if e["guided"]:
                e[flag] = e in hits or is_bar(e)
        if not hits:
            return None
        best = min(hits, key=lambda e: (e["nfe"], e["solver"] == "ddim", e["solver"]))
        return {"solver": best["solver"], "nfe": best["nfe"],
                "skip": "uniform" if best["spacing"] == "karras" else best["spacing"]}

    matched = fewest("inside_ddim200_interval", lambda m, c: c["lo"] <= m <= c["hi"])
    # a looser reading: no worse than DDIM-200's interval (a recall or precision *above* it
    # counts as matched); reported beside the strict one, not used by throughput.py
    loose = fewest("no_worse_than_ddim200", lambda m, c: m >= c["lo"])
    return {"conditions": out, "quality_matched": matched, "no_worse_than_ddim200": loose}


def table(summary) -> str:
    """The README table: guided conditions, mean [95% CI] per metric, guidance effect on Fisher."""
    lines = ["| solver | spacing | NFE | Fisher ratio | precision | recall | balance | agreement | Δ Fisher (guided − unguided) | in DDIM-200 CI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    conds = sorted((e for e in summary["conditions"] if e["guided"]),
                   key=lambda e: (["ddim", "dpmpp_2m", "heun"].index(e["solver"]), e["spacing"], -e["nfe"]))
    for e in conds:
        def f(c):
            return f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"
        eff = e.get("fisher_ratio_guidance_effect")
        lines.append(f"| {e['solver']} | {e['spacing']} | {e['nfe']} | " + " | ".join(f(e[k]) for k in METRICS)
                     + f" | {f(eff) if eff else '-'} | {'yes' if e.get('inside_ddim200_interval') else 'no'} |")
    return "\n".join(lines)


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, k in zip(axes, ("fisher_ratio", "precision", "recall", "agreement")):
        for solver, spacing, style in (("ddim", "uniform", "o-"), ("ddim", "quadratic", "o--"),
                                       ("dpmpp_2m", "uniform", "s-"), ("dpmpp_2m", "quadratic", "s--"),
                                       ("heun", "karras", "^-")):
            for guided, alpha in ((True, 1.0), (False, 0.3)):
                es = sorted((e for e in summary["conditions"] if e["solver"] == solver and e["spacing"] == spacing
                             and e["guided"] == guided), key=lambda e: e["nfe"])
                if not es:
                    continue
                x = [e["nfe"] for e in es]
                m = [e[k]["mean"] for e in es]
                err = [[e[k]["mean"] - e[k]["lo"] for e in es], [e[k]["hi"] - e[k]["mean"] for e in es]]
                ax.errorbar(x, m, yerr=err, fmt=style, alpha=alpha, capsize=2,
                            label=f"{solver} {spacing}{'' if guided else ' (unguided)'}")
        bar = next((e for e in summary["conditions"] if (e["solver"], e["nfe"], e["spacing"], e["guided"])
                    == ("ddim", 200, "uniform", True)), None)
        if bar is not None:
            ax.axhspan(bar[k]["lo"], bar[k]["hi"], color="grey", alpha=0.2, label="guided DDIM-200 95% CI")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_title(k.replace("_", " "))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7)
    fig.suptitle("Contrastive-guided (HNM) digits samples vs NFE: mean and 95% CI over paired seeds")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="samples per condition and seed (default 512)")
    ap.add_argument("--seeds", type=int, default=5, help="paired seeds (default 5)")
    ap.add_argument("--seed", type=int, default=2000, help="first seed (default 2000, outside the demo's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solvers-cpu.json"))
    ap.add_argument("--resummarise", action="store_true",
                    help="recompute the summary, table and plot from the rows already in --out (no sampling)")
    ap.add_argument("--conditions", default=None,
                    help="run only these, comma-separated solver:nfe:spacing (e.g. dpmpp_2m:10:logsnr), and "
                         "merge their rows into --out in place of earlier rows of the same conditions")
    args = ap.parse_args(argv)
    if args.resummarise:
        import harness
        rec = json.loads(Path(args.out).read_text())
        rec["summary"] = summarise(rec["rows"])
        harness.write_json(Path(args.out), rec)
        print(table(rec["summary"]))
        plot(rec["summary"], Path(args.out).with_suffix(".png"))
        return
    if args.n < 16 or args.seeds < 1:
        ap.error("need --n >= 16 and --seeds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    import harness

    out = Path(args.out)
    if args.conditions:
        return _merge_run(args, out, harness)
    res = run(args.n, list(range(args.seed, args.seed + args.seeds)))
    res = {"machine": harness.machine_info("cpu"), "n": args.n, "seeds": args.seeds, **res,
           "setup": {"guidance": "hnm, cdp_fast.models.digits.DIGITS_GUIDANCE",
                     "spacing": "per condition; the bar is guided DDIM-200 with uniform (leading) spacing",
                     "features": "PCA-20 of the real training pixels", "labels": "logistic-regression judge",
                     "precision_recall_reference": "real test digits, k = 5"}}
    harness.write_json(out, res)
    print(table(res["summary"]))
    print("quality-matched:", res["summary"]["quality_matched"],
          "| no worse on precision and recall:", res["summary"]["no_worse_than_ddim200"])
    plot(res["summary"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _merge_run(args, out, harness):
    """--conditions: run those conditions with --out's n and seeds and put their rows in place of
    the earlier rows of the same conditions (the others were not re-run: each merge is recorded
    with its machine, time and commit)."""
    conds = []
    for c in args.conditions.split(","):
        solver, nfe, spacing = c.strip().split(":")
        conds.append((solver, int(nfe), spacing))
    rec = json.loads(out.read_text())
    if (rec["n"], rec["seeds"]) != (args.n, args.seeds):
        raise SystemExit(f"--out was run with n={rec['n']}, seeds={rec['seeds']}: pass the same --n and --seeds")
    seeds = sorted({r["seed"] for r in rec["rows"]})
    new = run(args.n, seeds, conditions=conds)["rows"]
    names = {(s, n, sp) for s, n, sp in conds}
    rec["rows"] = [r for r in rec["rows"] if (r["solver"], r["nfe"], r["spacing"]) not in names] + new
    rec.setdefault("merges", []).append({"conditions": args.conditions, "machine": harness.machine_info("cpu")})
    rec["summary"] = summarise(rec["rows"])
    harness.write_json(out, rec)
    print(table(rec["summary"]))
    print("quality-matched:", rec["summary"]["quality_matched"],
          "| no worse on precision and recall:", rec["summary"]["no_worse_than_ddim200"])
    plot(rec["summary"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
