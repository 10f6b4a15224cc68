"""Reproduce the paper's Gaussian simulations (Tables 1, 7, 8, 9; §3 and App. B) with
``cdp_fast.theory.simulate`` and print them beside the paper's numbers.

    PYTHONPATH=. python benchmarks/gaussian_tables.py [--trials 50] [--seed 0] [--out benchmarks/results]

Writes ``gaussian_tables.md`` and ``gaussian_tables.json`` (atomically) under ``--out``.
Runs in well under a minute on one CPU core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cdp_fast import theory  # noqa: E402
from harness import git_commit  # noqa: E402  (provenance, shared with the other benchmarks)

NS = (10, 20, 50, 100)
ROWS = (None, 0.5, 1.0, 1.5)   # None = "Real"

# The paper's (acc, acc_std, rob, rob_std) per (row, n). Tables 7 and 8 from the ICLR .md;
# Table 9 from the revision (its Table 7), because the ICLR extraction repeats the mean as the
# robust std. Table 1 = the n ∈ {10, 100} rows of Table 7 (0°) and Table 9 (see ASSUMPTIONS).
PAPER = {
    ("d2", 0): {
        None: [(.9201, .0012, .7593, .0020), (.9204, .0007, .7598, .0016),
               (.9206, .0004, .7605, .0007), (.9205, .0004, .7608, .0006)],
        0.5: [(.9159, .0099, .7541, .0096), (.9179, .0047, .7562, .0050),
              (.9200, .0023, .7586, .0024), (.9213, .0011, .7601, .0009)],
        1.0: [(.9133, .0066, .7502, .0061), (.9155, .0020, .7516, .0019),
              (.9161, .0009, .7525, .0006), (.9165, .0005, .7528, .0006)],
        1.5: [(.9209, .0038, .7523, .0025), (.9228, .0010, .7536, .0006),
              (.9229, .0008, .7538, .0005), (.9232, .0003, .7538, .0005)],
    },
    ("d2", 90): {
        None: [(.9171, .0046, .7552, .0040), (.9186, .0017, .7563, .0012),
               (.9196, .0009, .7566, .0006), (.9199, .0006, .7565, .0007)],
        0.5: [(.9104, .0121, .7492, .0122), (.9161, .0052, .7546, .0054),
              (.9183, .0022, .7570, .0022), (.9193, .0012, .7576, .0010)],
        1.0: [(.9161, .0048, .7598, .0048), (.9180, .0017, .7612, .0020),
              (.9186, .0010, .7620, .0006), (.9189, .0005, .7622, .0003)],
        1.5: [(.9221, .0017, .7583, .0015), (.9226, .0013, .7588, .0013),
              (.9232, .0005, .7594, .0006), (.9233, .0005, .7595, .0005)],
    },
    ("d2", 30): {
        None: [(.8307, .0123, .6343, .0283), (.8353, .0055, .6404, .0234),
               (.8371, .0022, .6450, .0168), (.8385, .0010, .6461, .0097)],
        0.5: [(.8265, .0184, .6282, .0418), (.8299, .0129, .6352, .0325),
              (.8372, .0046, .6483, .0215), (.8402, .0015, .6466, .0110)],
        1.0: [(.8383, .0158, .6439, .0319), (.8425, .0060, .6480, .0218),
              (.8455, .0023, .6553, .0128), (.8457, .0021, .6535, .0100)],
        1.5: [(.8431, .0045, .6542, .0173), (.8447, .0021, .6542, .0142),
              (.8455, .0006, .6556, .0082), (.8457, .0004, .6547, .0057)],
    },
    ("d2", 60): {
        None: [(.8348, .0117, .6378, .0293), (.8391, .0050, .6433, .0222),
               (.8410, .0017, .6494, .0134), (.8413, .0013, .6522, .0102)],
        0.5: [(.8338, .0132, .6303, .0335), (.8365, .0132, .6393, .0316),
              (.8414, .0034, .6489, .0199), (.8431, .0012, .6510, .0135)],
        1.0: [(.8377, .0074, .6396, .0267), (.8416, .0034, .6513, .0178),
              (.8432, .0020, .6503, .0122), (.8435, .0014, .6501, .0096)],
        1.5: [(.8368, .0073, .6446, .0213), (.8393, .0022, .6479, .0150),
              (.8404, .0005, .6488, .0089), (.8404, .0007, .6486, .0082)],
    },
    ("d100", 0): {
        None: [(.9023, .0192, .6843, .0359), (.9341, .0128, .7519, .0267),
               (.9599, .0028, .8078, .0061), (.9682, .0014, .8239, .0028)],
        0.5: [(.7562, .0564, .4611, .0694), (.8566, .0307, .6047, .0491),
              (.9261, .0117, .7328, .0227), (.9505, .0047, .7848, .0111)],
        1.0: [(.8866, .0273, .6557, .0487), (.9371, .0091, .7555, .0201),
              (.9620, .0028, .8085, .0060), (.9695, .0012, .8239, .0031)],
        1.5: [(.9400, .0100, .7603, .0233), (.9591, .0037, .8031, .0080),
              (.9710, .0013, .8280, .0028), (.9743, .0008, .8343, .0011)],
    },
}

# (d, ‖μ‖², ε) per setting; see ASSUMPTIONS for the d = 2, 30°/60° norm.
SETTINGS = {
    ("d2", 0): (2, 2.0, 0.5), ("d2", 90): (2, 2.0, 0.5),
    ("d2", 30): (2, 1.0, 0.5), ("d2", 60): (2, 1.0, 0.5),
    ("d100", 0): (100, 4.0, 0.1),
}

TABLES = {
    "Table 7 (d = 2, 0° and 90°)": [("d2", 0), ("d2", 90)],
    "Table 8 (d = 2, 30° and 60°)": [("d2", 30), ("d2", 60)],
    "Table 9 (d = 100, 0°)": [("d100", 0)],
    "Table 1 (n, ñ ∈ {10, 100}; d = 2 at 0° and d = 100 at 0°)": [("d2", 0), ("d100", 0)],
}

ASSUMPTIONS = [
    "x | y ~ N(y μ, σ² I) with σ = 1 (the best accuracies in the paper's tables equal "
    "Φ(‖μ‖/σ) and Φ((‖μ‖ - ε‖μ‖₁/‖μ‖)/σ) with σ = 1: 0.9214/0.7602 for d = 2, 0.9772/0.8413 for d = 100).",
    "n counts labelled real points PER CLASS (2n points, labels exactly balanced) and ñ synthetic "
    "points per mixture component; with n total instead, the d = 100 Real row falls ~0.02-0.05 "
    "below the paper's at small n (e.g. 0.857 vs 0.9023 at n = 10).",
    "Synthetic rows: the intermediate classifier θ̂_inter = mean of y x over n = ñ labelled real points "
    "per class (the paper does not say which n; n = ñ reproduces the c = 0.5 and c = 1 rows of "
    "Table 9 to within 0.01), pseudo-labels sign(θ̂_interᵀ x̃), and θ̂_final = mean of ỹ x̃ over the "
    "synthetic points ONLY (the revision's App. B: 'learning θ … on synthetic data'; with the real "
    "points joined as in eq. (5), c = 0.5 could not fall below the Real row as it does in Table 9).",
    "θ̂_final is the mean estimator of eq. (5), not the adversarial training of the revision's "
    "App. B step 4 (unspecified there: loss, optimiser and ε schedule are not given).",
    "Accuracies are exact expectations over the test distribution, 1 - eq. (6) and 1 - eq. (7), "
    "not a 10k-point test set; std over trials with ddof = 0.",
    "Angle a between μ and ε1_d: μ = ‖μ‖ (cos a · 1/√d + sin a · u) with u the unit alternating "
    "vector (1, -1, …)/√d, so d = 2 gives μ ∝ (cos(45°-a), sin(45°-a)).",
    "d = 2 at 30°/60° uses ‖μ‖² = 1, not 2: every method in the paper's Table 8 saturates at clean "
    "≈ 0.84 ≈ Φ(1) and robust ≈ 0.65 ≈ Φ(1 - 0.5(cos15° + sin15°)), which ‖μ‖² = 2 cannot give "
    "(its optimum is 0.9214 at every angle).",
    "Table 1: the ICLR extraction's 'Real' row repeats the c = 0.5 row in both columns; the paper "
    "values shown for Real are Table 7 (0°) and Table 9 (the revision's Table 1 agrees).",
    "Each cell uses seed = --seed (common random numbers across rows), trials = --trials.",
    "Orderings: Proposition 1 claims clean accuracy increasing in c for μ̃ = cμ (Case 2) and robust "
    "accuracy increasing in c for μ̃ = c(μ - ε1) (Case 3). At 0°/90° the two coincide; at 30°/60° the "
    "tables' μ̃ = cμ rows are not Case 3, and their robust differences are within noise (the paper's "
    "60° column is not monotone either).",
]


def _atomic_write(path, text):
    from cdp_fast.data import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def run_setting(key, trials, seed):
    d, m2, eps = SETTINGS[key]
    angle = key[1]
    out = {}
    for c in ROWS:
        cells = []
        for n in NS:
            r = theory.simulate(d, m2, eps, n, n, c=c, angle=angle, trials=trials, seed=seed)
            cells.append(r)
        out["real" if c is None else f"c={c:g}"] = cells
    return out


def orderings(ours):
    """Proposition 1 / Table 1 claims checked on our numbers, per setting and n."""
    res = {}
    for key, rows in ours.items():
        name = f"{key[0]}_{key[1]}deg"
        checks = {}
        for i, n in enumerate(NS):
            a = [rows[f"c={c:g}"][i]["acc_mean"] for c in (0.5, 1.0, 1.5)]
            r = [rows[f"c={c:g}"][i]["rob_mean"] for c in (0.5, 1.0, 1.5)]
            checks[f"n={n}"] = {
                "clean_increasing_in_c": bool(a[0] < a[1] < a[2]),
                "robust_increasing_in_c": bool(r[0] < r[1] < r[2]),
                "c1.5_beats_real_clean": bool(a[2] > rows["real"][i]["acc_mean"]),
                "c1.5_beats_real_robust": bool(r[2] > rows["real"][i]["rob_mean"]),
            }
        res[name] = checks
    return res


def _fmt(m, s):
    return f"{m:.4f} ({s:.4f})"


def render(ours, trials, seed, elapsed):
    lines = ["# Gaussian simulations of §3 (Tables 1, 7, 8, 9)", "",
             f"`cdp_fast.theory.simulate`, trials = {trials}, seed = {seed}; "
             f"total {elapsed:.1f} s on CPU. Cells: ours (std) | paper (std) | ours − paper.", "",
             "## Assumptions (the paper under-specifies the pipeline)", ""]
    lines += [f"- {a}" for a in ASSUMPTIONS]
    for title, keys in TABLES.items():
        ns = (10, 100) if title.startswith("Table 1") else NS
        lines += ["", f"## {title}", ""]
        for key in keys:
            d, m2, eps = SETTINGS[key]
            lines += [f"### d = {d}, angle {key[1]}°, ‖μ‖² = {m2:g}, ε = {eps:g}", "",
                      "| row | n (= ñ) | acc ours | acc paper | Δacc | rob ours | rob paper | Δrob |",
                      "|---|---|---|---|---|---|---|---|"]
            for c in ROWS:
                name = "Real" if c is None else f"c = {c:g}"
                rk = "real" if c is None else f"c={c:g}"
                for n in ns:
                    i = NS.index(n)
                    o = ours[key][rk][i]
                    p = PAPER[key][c][i]
                    lines.append(
                        f"| {name} | {n} | {_fmt(o['acc_mean'], o['acc_std'])} | {_fmt(p[0], p[1])} "
                        f"| {o['acc_mean'] - p[0]:+.4f} | {_fmt(o['rob_mean'], o['rob_std'])} "
                        f"| {_fmt(p[2], p[3])} | {o['rob_mean'] - p[2]:+.4f} |")
            lines.append("")
    lines += ["## Orderings (Proposition 1) on our numbers", "",
              "| setting | n | clean ↑ in c | robust ↑ in c | c=1.5 > Real (clean) | c=1.5 > Real (robust) |",
              "|---|---|---|---|---|---|"]
    for name, checks in orderings(ours).items():
        for n, ch in checks.items():
            lines.append(f"| {name} | {n} | {ch['clean_increasing_in_c']} | "
                         f"{ch['robust_increasing_in_c']} | {ch['c1.5_beats_real_clean']} | "
                         f"{ch['c1.5_beats_real_robust']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ours = {key: run_setting(key, args.trials, args.seed) for key in SETTINGS}
    elapsed = time.perf_counter() - t0
    md = render(ours, args.trials, args.seed, elapsed)
    print(md)
    payload = {
        "what": "Gaussian simulations of §3 (Tables 1, 7, 8, 9)",
        "trials": args.trials, "seed": args.seed, "seconds": elapsed, "ns": list(NS),
        "assumptions": ASSUMPTIONS,
        "settings": {f"{k[0]}_{k[1]}deg": {"d": v[0], "mu_norm2": v[1], "eps": v[2], "angle": k[1]}
                     for k, v in SETTINGS.items()},
        "ours": {f"{k[0]}_{k[1]}deg": v for k, v in ours.items()},
        "paper": {f"{k[0]}_{k[1]}deg": {("real" if c is None else f"c={c:g}"):
                                        [dict(zip(("acc_mean", "acc_std", "rob_mean", "rob_std"), p))
                                         for p in v] for c, v in rows.items()}
                  for k, rows in PAPER.items()},
        "orderings": orderings(ours),
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "platform": platform.platform(), "commit": git_commit()},
    }
    _atomic_write(os.path.join(args.out, "gaussian_tables.md"), md)
    _atomic_write(os.path.join(args.out, "gaussian_tables.json"), json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
