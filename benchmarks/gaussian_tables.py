"""Reproduce the paper's Gaussian tables (§3 / App. B) beside both versions of the paper.
(A long script: every table of both versions with its source, setting and the analyses of the
offsets, in one place.)

    python benchmarks/gaussian_tables.py [--trials 50] [--seed 0] [--ref-trials 2000]
        [--holdouts 2000] [--test-size 10000] [--fit-trials 300] [--out benchmarks/results]

Uses ``cdp_fast.theory.simulate`` (exact accuracies, eqs. 6/7) and ``theory.holdout_*`` (finite
test sets). Writes ``gaussian_tables.md`` and ``gaussian_tables.json`` (atomically) under
``--out``; under 15 s on one CPU core with the defaults (references and the setting scan dominate).

Sources (numbers copied into this file from /work/shared/paper/):

* ICLR = ``contrastive-dp-iclr2023.md`` (the ICLR 2023 submission): Table 1 (d = 2 and 100;
  its "Real" row repeats the c = 0.5 row), App. B Tables 7 (d = 2, 0°/90°), 8 (d = 2, 30°/60°)
  and 9 (d = 100; its robust stds repeat the means).
* revised = ``contrastive-dp-revised.txt`` (the later revision, a text extraction without
  captions or formulas; table numbers inferred from their order and the text's references):
  Table 1 (d = 100 only) and App. B Tables 4, 5, 6, which are ICLR Tables 7, 8, 9 number for
  number (checked when this file was written; the revision fills in Table 6's robust stds and
  writes 0.65011 for 0.6501), plus a NEW Table 7: d = 2, "30 degree" / "60 degree", clean
  ≈ 0.905-0.924. (The revision's Table 8 is the CIFAR-10 contrastive-loss ablation.)

Revised Table 7's setting. Stated in the revision: App. B's pipeline (intermediate classifier
from labelled data, synthetic data from the two-component mixture, pseudo-labels, θ learned on
the synthetic data, tested on "10k extra real data"), the "30 degree" / "60 degree" column
heads, and "for d = 2 we set [‖μ‖², ε]" with the values lost in extraction (the ICLR Table 1
caption gives ‖μ‖² = 2, ε = 0.5). Inferred here by fitting each column's 16 cells x 4 numbers
(means and stds; section "How the setting of revised Table 7 was inferred"): d = 2,
‖μ‖² = 2, ε = 0.5, n = ñ per class, 50 trials (assumed, as in the other tables),
μ̃ = c(μ - ε1_d) (Proposition 1 Case 3, not the cμ of ICLR Table 8), θ̂ from the synthetic
points only, and μ 15° from a diagonal: "30 degree" = √2(cos 30°, sin 30°) (15° from 1_d,
``make_mu`` angle 15°), "60 degree" = √2(cos 60°, -sin 60°) (105° from 1_d, ``make_mu`` angle
105°); swapping the coordinates gives the equivalent √2(cos 60°, sin 60°) and
√2(cos 150°, sin 150°). Clean ≈ Φ(√2) fixes ‖μ‖² = 2; the Real rows' robust means AND stds fix
‖μ‖₁/‖μ‖ = cos 30° + sin 30° (μ 15°, not 30°, from a diagonal); the synthetic rows fix Case 3
and which diagonal. How the authors' angle labels map to these directions is not recoverable.

The d = 2 offsets (e.g. the c = 1 row at 0°, ours 0.005 clean / 0.007 robust above the
paper at every n). Explanation: the paper measures accuracy on ONE finite test set per row
(the revision: "testing on 10k extra real data"); we use the exact expectations, eqs. (6)/(7).
A 10k-point test set has sampling SD 0.0027 (clean) / 0.0043 (robust) at d = 2, 0°, and the
error is shared by all trials and all n of a row. Evidence, all computed below:
(i) the paper's c = 1.5 rows (0.9232 at 0°, 0.9233 at 90°, n = 100, std 0.0003-0.0005) and
revised Table 7's 60° Real row (0.9235) exceed the Bayes-optimal clean accuracy Φ(√2) =
0.9214 of ANY classifier at the stated ‖μ‖² = 2, which only a finite test set can do; (ii) the
paper's n = 100 stds (0.0003-0.0006) are far below 0.0027, so the test set is not redrawn per
trial; (iii) our offset is constant along n within a row (c = 1, 0°: +0.0051/+0.0044/+0.0046/
+0.0047) but differs between rows; (iv) at 0° every estimator here is aimed at μ by the
coordinate-swap symmetry, so a constant -0.0049 at n = 100 would need a 12° systematic tilt of
θ̂; (v) in units of the 10k test-set noise the c = 1 row is z = -1.7 (clean) and -1.7
(robust), joint p ≈ 0.15 (16% of simulated test sets are as far out), and the n = 100 rows of
every table give a χ² consistent with test-set noise alone (all settings: 35.9 on 56 dof; if
anything a little less spread than 10k points predict; 20k points give 70.5). Ruled out by
computation: more trials (50 vs 2000: < 0.0005), eq. (5) with the real points joined, oracle
labels, n counted in total instead of per class, a fixed n for θ̂_inter (each moves the row by
≤ 0.0035 at n = 10 and ≤ 0.0002 at n = 100; section "The d = 2, 0°, c = 1 row"), and the
closed form itself (``holdout_accuracy`` on test sets averages to eqs. (6)/(7); tests).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cdp_fast import theory  # noqa: E402
from harness import git_commit  # noqa: E402  (provenance, shared with the other benchmarks)

NS = (10, 20, 50, 100)
ROWS = (None, 0.5, 1.0, 1.5)   # None = "Real"
ICLR_FILE = "contrastive-dp-iclr2023.md"
REV_FILE = "contrastive-dp-revised.txt"

# The paper's (acc, acc_std, rob, rob_std) per (row, n). Tables 7 and 8 from the ICLR .md (the
# revision's Tables 4 and 5 are the same numbers); Table 9 from the revision's Table 6, because
# the ICLR extraction repeats the mean as the robust std. Table 1 = the n ∈ {10, 100} rows of
# Table 7 (0°) and Table 9 (see ASSUMPTIONS).
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
    # The revision's new App. B Table 7 (no ICLR counterpart), columns "30 degree" / "60 degree".
    ("rev7", 30): {
        None: [(.9152, .0049, .7633, .0111), (.9170, .0030, .7642, .0075),
               (.9183, .0009, .7653, .0040), (.9185, .0006, .7658, .0027)],
        0.5: [(.9089, .0183, .7563, .0310), (.9144, .0068, .7659, .0107),
              (.9174, .0029, .7680, .0068), (.9183, .0016, .7681, .0053)],
        1.0: [(.9135, .0116, .7642, .0194), (.9178, .0046, .7710, .0073),
              (.9183, .0042, .7728, .0042), (.9196, .0017, .7733, .0036)],
        1.5: [(.9181, .0079, .7747, .0104), (.9209, .0053, .7770, .0052),
              (.9218, .0029, .7788, .0028), (.9222, .0017, .7793, .0023)],
    },
    ("rev7", 60): {
        None: [(.9211, .0034, .7702, .0094), (.9225, .0020, .7714, .0068),
               (.9232, .0011, .7711, .0050), (.9235, .0009, .7724, .0027)],
        0.5: [(.9111, .0114, .7638, .0172), (.9138, .0068, .7694, .0066),
              (.9161, .0038, .7714, .0033), (.9165, .0031, .7727, .0014)],
        1.0: [(.9069, .0111, .7677, .0109), (.9042, .0098, .7676, .0072),
              (.9073, .0047, .7702, .0017), (.9059, .0039, .7698, .0016)],
        1.5: [(.9034, .0079, .7704, .0053), (.9077, .0059, .7716, .0056),
              (.9073, .0030, .7722, .0014), (.9077, .0024, .7729, .0011)],
    },
}

# Where each setting's paper numbers come from (file, table, column).
SOURCES = {
    ("d2", 0): f"ICLR `{ICLR_FILE}` Table 7, 0° = revised `{REV_FILE}` Table 4, 0° (same numbers)",
    ("d2", 90): f"ICLR `{ICLR_FILE}` Table 7, 90° = revised `{REV_FILE}` Table 4, 90° (same numbers)",
    ("d2", 30): f"ICLR `{ICLR_FILE}` Table 8, 30° = revised `{REV_FILE}` Table 5, 30° (same numbers)",
    ("d2", 60): f"ICLR `{ICLR_FILE}` Table 8, 60° = revised `{REV_FILE}` Table 5, 60° (same numbers; "
                "the revision writes 0.65011 for 0.6501)",
    ("d100", 0): f"revised `{REV_FILE}` Table 6 = ICLR `{ICLR_FILE}` Table 9 (same means; the ICLR "
                 "extraction repeats the robust mean as its std, so the robust stds are the revision's)",
    ("rev7", 30): f"revised `{REV_FILE}` Table 7, \"30 degree\" (new in the revision; no ICLR counterpart)",
    ("rev7", 60): f"revised `{REV_FILE}` Table 7, \"60 degree\" (new in the revision; no ICLR counterpart)",
}

# Our setting per key: d, ‖μ‖², ε, make_mu angle (degrees from 1_d), target of μ̃ (theory.synthetic_mean).
SETTINGS = {
    ("d2", 0): (2, 2.0, 0.5, 0, "clean"), ("d2", 90): (2, 2.0, 0.5, 90, "clean"),
    ("d2", 30): (2, 1.0, 0.5, 30, "clean"), ("d2", 60): (2, 1.0, 0.5, 60, "clean"),
    ("d100", 0): (100, 4.0, 0.1, 0, "clean"),
    ("rev7", 30): (2, 2.0, 0.5, 15, "robust"), ("rev7", 60): (2, 2.0, 0.5, 105, "robust"),
}

TABLES = {
    "Table 7 (ICLR) = Table 4 (revised): d = 2, 0° and 90°": [("d2", 0), ("d2", 90)],
    "Table 8 (ICLR) = Table 5 (revised): d = 2, 30° and 60°, ‖μ‖² = 1": [("d2", 30), ("d2", 60)],
    "Table 7 (revised only): d = 2, \"30°\" and \"60°\", ‖μ‖² = 2, μ̃ = c(μ − ε1)": [("rev7", 30), ("rev7", 60)],
    "Table 9 (ICLR) = Table 6 (revised): d = 100, 0°": [("d100", 0)],
    "Table 1 (ICLR: d = 2 at 0° and d = 100; revised: d = 100 only), n, ñ ∈ {10, 100}":
        [("d2", 0), ("d100", 0)],
}

TEST_SIZE_PAPER = 10_000   # the revision's App. B: "testing on 10k extra real data"

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
    "not a 10k-point test set; std over trials with ddof = 0. The paper's numbers carry the error "
    "of one finite test set per row (see 'Offsets in units of a 10k-point test set').",
    "Angle a between μ and ε1_d: μ = ‖μ‖ (cos a · 1/√d + sin a · u) with u the unit alternating "
    "vector (1, -1, …)/√d, so d = 2 gives μ ∝ (cos(45°-a), sin(45°-a)).",
    "ICLR Table 8 (d = 2, 30°/60°) uses ‖μ‖² = 1, not 2: every method there saturates at clean "
    "≈ 0.84 ≈ Φ(1) and robust ≈ 0.65 ≈ Φ(1 - 0.5(cos15° + sin15°)), which ‖μ‖² = 2 cannot give "
    "(its optimum is 0.9214 at every angle).",
    "Revised Table 7 (d = 2, '30 degree'/'60 degree', clean ≈ 0.92): ‖μ‖² = 2, ε = 0.5, μ̃ = c(μ - ε1_d) "
    "(Case 3), μ = √2(cos 30°, sin 30°) for '30 degree' (make_mu angle 15°) and √2(cos 60°, -sin 60°) "
    "for '60 degree' (make_mu angle 105°) — inferred by fit, see 'How the setting of revised Table 7 "
    "was inferred'; the revision states neither the norm nor the angle convention legibly.",
    "Table 1: the ICLR extraction's 'Real' row repeats the c = 0.5 row in both columns; the paper "
    "values shown for Real are Table 7 (0°) and Table 9. The revision's Table 1 has the d = 100 rows "
    "only, equal to its Table 6 at n ∈ {10, 100}.",
    "Each cell uses seed = --seed (common random numbers across rows), trials = --trials.",
    "Orderings: Proposition 1 claims clean accuracy increasing in c for μ̃ = cμ (Case 2) and robust "
    "accuracy increasing in c for μ̃ = c(μ - ε1) (Case 3). At 0°/90° the two coincide; at 30°/60° the "
    "ICLR tables' μ̃ = cμ rows are not Case 3, and their robust differences are within noise (the paper's "
    "60° column is not monotone either); revised Table 7 is Case 3, so only its robust column is claimed.",
]


def _atomic_write(path, text):
    from cdp_fast.utils.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _rk(c):
    return "real" if c is None else f"c={c:g}"


def _name(key):
    return f"{key[0]}_{key[1]}deg"


def run_setting(key, trials, seed, ns=NS):
    d, m2, eps, angle, target = SETTINGS[key]
    return {_rk(c): [theory.simulate(d, m2, eps, n, n, c=c, angle=angle, trials=trials, seed=seed,
                                     target=target) for n in ns]
            for c in ROWS}


def reference(d, m2, eps, n, c, angle, target="clean", trials=2000, seed=0, chunk=250, **kw):
    """simulate() with many trials, in chunks of ``chunk`` (bounded memory at d = 100):
    mean of the chunk means and RMS of the chunk stds."""
    chunks = [chunk] * (trials // chunk) + ([trials % chunk] if trials % chunk else [])
    rs = [theory.simulate(d, m2, eps, n, n, c=c, angle=angle, trials=t, seed=seed + 7919 * (k + 1),
                          target=target, **kw) for k, t in enumerate(chunks)]
    w = np.array(chunks, dtype=float) / trials
    out = {}
    for m in ("acc", "rob"):
        means = np.array([r[f"{m}_mean"] for r in rs])
        mean = float(w @ means)
        var = float(w @ (np.array([r[f"{m}_std"] for r in rs]) ** 2 + (means - mean) ** 2))
        out[f"{m}_mean"], out[f"{m}_std"] = mean, math.sqrt(var)
    return out


def chi2_sf_even(x, dof):
    """P(χ²_dof ≥ x) for even dof: e^{-x/2} Σ_{i<dof/2} (x/2)^i / i!."""
    assert dof % 2 == 0 and dof > 0
    h, term, s = x / 2.0, 1.0, 1.0
    for i in range(1, dof // 2):
        term *= h / i
        s += term
    return math.exp(-h) * s


def offset_stats(paper, ours, ref_trials, test_size=TEST_SIZE_PAPER, paper_trials=50):
    """(paper - ours) at one cell in units of its noise: the paper's test-set error (holdout_sd at
    our accuracies) plus the trial noise of both means. Returns z_acc, z_rob, their correlation
    and the joint d² = zᵀ R⁻¹ z (≈ χ²₂ if the offset is test-set and trial noise only)."""
    pa, pas, pr, prs = paper
    oa, orr = ours["acc_mean"], ours["rob_mean"]
    sd_a, sd_r, rho_t = theory.holdout_sd(oa, orr, test_size)
    se_a = math.sqrt(sd_a ** 2 + pas ** 2 / paper_trials + ours["acc_std"] ** 2 / ref_trials)
    se_r = math.sqrt(sd_r ** 2 + prs ** 2 / paper_trials + ours["rob_std"] ** 2 / ref_trials)
    rho = rho_t * sd_a * sd_r / (se_a * se_r)
    za, zr = (pa - oa) / se_a, (pr - orr) / se_r
    d2 = (za * za - 2 * rho * za * zr + zr * zr) / (1 - rho * rho)
    return {"ours_acc": oa, "ours_rob": orr, "paper_acc": pa, "paper_rob": pr,
            "sd_test_acc": sd_a, "sd_test_rob": sd_r, "z_acc": za, "z_rob": zr, "rho": rho,
            "d2": d2, "p": chi2_sf_even(d2, 2)}


def holdout_analysis(ref_trials, seed, test_size, profile=(5_000, 10_000, 20_000, 40_000)):
    """n = 100 rows of every table against our many-trial reference, in test-set units
    (``test_size`` points), plus the total χ² for the other test-set sizes in ``profile``."""
    refs = {key: {c: reference(d, m2, eps, 100, c, angle, target, trials=ref_trials, seed=seed)
                  for c in ROWS}
            for key, (d, m2, eps, angle, target) in SETTINGS.items()}

    def analyse(size):
        out = {}
        for key in SETTINGS:
            rows = {_rk(c): offset_stats(PAPER[key][c][NS.index(100)], refs[key][c], ref_trials, size)
                    for c in ROWS}
            chi = sum(r["d2"] for r in rows.values())
            out[_name(key)] = {"rows": rows, "chi2": chi, "dof": 2 * len(rows),
                               "p": chi2_sf_even(chi, 2 * len(rows))}
        chi = sum(v["chi2"] for v in out.values())
        dof = sum(v["dof"] for v in out.values())
        return out, {"chi2": chi, "dof": dof, "p": chi2_sf_even(chi, dof)}

    settings, total = analyse(test_size)
    prof = {str(size): analyse(size)[1] for size in profile}
    return {"n": 100, "test_size": test_size, "ref_trials": ref_trials, "settings": settings,
            "total": total, "total_by_test_size": prof,
            "refs": {_name(k): {_rk(c): r for c, r in v.items()} for k, v in refs.items()}}


def holdout_monte_carlo(holdouts, test_size, seed, paper_offset):
    """θ = μ at d = 2, 0° (the n → ∞ classifier of every row there) measured on ``holdouts``
    independent test sets of ``test_size`` points: the spread of the measured accuracies and the
    fraction of test sets whose (clean, robust) error is at least as far out (Mahalanobis, with
    holdout_sd's covariance) as ``paper_offset`` = paper - ours of the c = 1 row at n = 100."""
    d, m2, eps = 2, 2.0, 0.5
    mu = theory.make_mu(d, m2, 0)
    acc0, rob0 = 1 - theory.err_standard(mu, mu), 1 - theory.err_robust(mu, mu, 1.0, eps)
    rng = np.random.default_rng(seed + 424242)
    meas = np.array([theory.holdout_accuracy(mu, *theory.draw_holdout(mu, test_size, rng=rng), eps)
                     for _ in range(holdouts)])
    dev = meas - np.array([acc0, rob0])
    sd_a, sd_r, rho = theory.holdout_sd(acc0, rob0, test_size)

    def d2(da, dr):
        za, zr = da / sd_a, dr / sd_r
        return (za * za - 2 * rho * za * zr + zr * zr) / (1 - rho * rho)

    obs = d2(*paper_offset)
    sims = d2(dev[:, 0], dev[:, 1])
    return {"holdouts": holdouts, "test_size": test_size, "acc_true": acc0, "rob_true": rob0,
            "sd_acc_mc": float(dev[:, 0].std()), "sd_rob_mc": float(dev[:, 1].std()),
            "corr_mc": float(np.corrcoef(dev.T)[0, 1]), "sd_acc": sd_a, "sd_rob": sd_r, "rho": rho,
            "paper_offset": list(paper_offset), "d2_observed": obs,
            "frac_at_least_as_far": float(np.mean(sims >= obs)),
            "frac_both_as_low": float(np.mean((dev[:, 0] <= paper_offset[0])
                                              & (dev[:, 1] <= paper_offset[1])))}


def c1_hypotheses(ref_trials, seed, trials):
    """The d = 2, 0°, c = 1 row under alternative pipelines (all n), beside the paper's."""
    d, m2, eps = 2, 2.0, 0.5
    var = {
        f"ours as in the tables ({trials} trials, seed {seed})":
            [theory.simulate(d, m2, eps, n, n, c=1.0, trials=trials, seed=seed) for n in NS],
        f"ours, {ref_trials} trials":
            [reference(d, m2, eps, n, 1.0, 0, trials=ref_trials, seed=seed) for n in NS],
        "eq. (5): real points joined (include_real)":
            [reference(d, m2, eps, n, 1.0, 0, trials=ref_trials, seed=seed, include_real=True) for n in NS],
        "oracle labels instead of pseudo-labels":
            [reference(d, m2, eps, n, 1.0, 0, trials=ref_trials, seed=seed, labels="oracle") for n in NS],
        "n, ñ counted in total (n/2 per class)":
            [reference(d, m2, eps, n // 2, 1.0, 0, trials=ref_trials, seed=seed) for n in NS],
    }
    # θ̂_inter from a fixed n = 10 (resp. 100) per class, ñ as in the column
    for n_inter in (10, 100):
        rows = []
        for n in NS:
            rs = [theory.simulate(d, m2, eps, n_inter, n, c=1.0, trials=250, seed=seed + 7919 * (k + 1))
                  for k in range(max(1, ref_trials // 250))]
            rows.append({m: float(np.mean([r[m] for r in rs])) for m in ("acc_mean", "rob_mean")})
        var[f"θ̂_inter from n = {n_inter} per class"] = rows
    mu = theory.make_mu(d, m2, 0)
    bound = (1 - theory.err_standard(mu, mu), 1 - theory.err_robust(mu, mu, 1.0, eps))
    paper = PAPER[("d2", 0)][1.0]
    # the tilt of θ away from μ that the paper's n = 100 clean number would need
    tilt = math.degrees(math.acos(_phi_inv(paper[3][0]) / math.sqrt(m2)))
    base = var[f"ours, {ref_trials} trials"]
    shift = {m: [max(abs(v[j][m] - base[j][m]) for v in var.values()) for j in range(len(NS))]
             for m in ("acc_mean", "rob_mean")}
    return {"variants": {k: [{"acc_mean": r["acc_mean"], "rob_mean": r["rob_mean"]} for r in v]
                         for k, v in var.items()},
            "max_shift_vs_reference": shift,
            "paper": [{"acc_mean": p[0], "rob_mean": p[2]} for p in paper],
            "bayes_clean": bound[0], "best_robust": bound[1], "tilt_deg_for_paper_n100": tilt}


def _phi_inv(p):
    """Φ⁻¹(p) by bisection on Q (double precision is plenty here)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1 - theory.Q(mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_score(paper_rows, ours_rows, trials, test_size=TEST_SIZE_PAPER, paper_trials=50):
    """Mismatch of a whole column: Σ over rows, n and (clean, robust) of ((ours - paper)/SE)², SE²
    = test-set variance + both trial variances (cells treated as independent: a fit score, not a
    calibrated χ²), and Σ log²(our std / paper std)."""
    chi, lstd = 0.0, 0.0
    for c in ROWS:
        for p, o in zip(paper_rows[c], ours_rows[_rk(c)]):
            for m, (pm, ps) in (("acc", (p[0], p[1])), ("rob", (p[2], p[3]))):
                om, os_ = o[f"{m}_mean"], o[f"{m}_std"]
                se2 = pm * (1 - pm) / test_size + ps ** 2 / paper_trials + os_ ** 2 / trials
                chi += (om - pm) ** 2 / se2
                lstd += math.log(max(os_, 1e-5) / ps) ** 2
    return chi, lstd


FIT_CANDIDATES = [
    # label, ‖μ‖², make_mu angle for "30 degree", for "60 degree", target
    ("ICLR Table 8's setting: ‖μ‖² = 1, μ at 30°/60° from 1_d, μ̃ = cμ", 1.0, 30, 60, "clean"),
    ("stated norm, ICLR angles: ‖μ‖² = 2, μ at 30°/60° from 1_d, μ̃ = cμ", 2.0, 30, 60, "clean"),
    ("‖μ‖² = 2, μ at 30°/60° from 1_d, μ̃ = c(μ − ε1)", 2.0, 30, 60, "robust"),
    ("‖μ‖² = 2, μ at 15°/105° from 1_d, μ̃ = cμ", 2.0, 15, 105, "clean"),
    ("used: ‖μ‖² = 2, μ at 15°/105° from 1_d, μ̃ = c(μ − ε1)", 2.0, 15, 105, "robust"),
]


def rev7_fit(fit_trials, seed):
    """How revised Table 7's setting was inferred: named candidates, then a scan of μ's direction
    (make_mu angle 0-180° in 5° steps: every direction up to the coordinate swap, which leaves
    the whole pipeline invariant) × target, at ‖μ‖² = 2, ε = 0.5."""
    def col(m2, angle, target):
        return {_rk(c): [theory.simulate(2, m2, 0.5, n, n, c=c, angle=angle, trials=fit_trials,
                                         seed=seed, target=target) for n in NS] for c in ROWS}

    cands = []
    for label, m2, a30, a60, target in FIT_CANDIDATES:
        s30 = fit_score(PAPER[("rev7", 30)], col(m2, a30, target), fit_trials)
        s60 = fit_score(PAPER[("rev7", 60)], col(m2, a60, target), fit_trials)
        cands.append({"label": label, "mu_norm2": m2, "angles": [a30, a60], "target": target,
                      "score_30": s30[0], "logstd_30": s30[1], "score_60": s60[0], "logstd_60": s60[1]})
    scan = {30: [], 60: []}
    for target in ("clean", "robust"):
        for angle in range(0, 181, 5):
            ours = col(2.0, angle, target)
            for k in (30, 60):
                s = fit_score(PAPER[("rev7", k)], ours, fit_trials)
                scan[k].append({"angle": angle, "target": target, "score": s[0], "logstd": s[1]})
    best = {k: sorted(v, key=lambda r: r["score"])[:4] for k, v in scan.items()}
    min_lstd = {t: min(r["logstd"] for k in scan for r in scan[k] if r["target"] == t)
                for t in ("clean", "robust")}
    return {"fit_trials": fit_trials, "candidates": cands, "scan_best": best,
            "min_logstd_by_target": min_lstd,
            "cells": 4 * len(NS) * 2}


def orderings(ours):
    """Proposition 1 / Table 1 claims checked on our numbers, per setting and n."""
    res = {}
    for key, rows in ours.items():
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
        res[_name(key)] = checks
    return res


def _fmt(m, s):
    return f"{m:.4f} ({s:.4f})"


def _setting_line(key):
    d, m2, eps, angle, target = SETTINGS[key]
    mt = "cμ" if target == "clean" else "c(μ − ε1)"
    return f"ours: d = {d}, ‖μ‖² = {m2:g}, ε = {eps:g}, μ at {angle}° from 1_d (`make_mu`), μ̃ = {mt}"


def render(ours, trials, seed, elapsed, hold, mc, hyp, fit, args):
    L = ["# Gaussian simulations of §3 / App. B (ICLR Tables 1, 7, 8, 9; revised Tables 1, 4-7)", "",
         f"`cdp_fast.theory.simulate`, trials = {trials}, seed = {seed}; references {args.ref_trials} "
         f"trials, {args.holdouts} test sets of {args.test_size} points, setting fit {args.fit_trials} "
         f"trials; total {elapsed:.1f} s on CPU (`python benchmarks/gaussian_tables.py"
         f"{args.cmd_options}`). "
         "Cells: ours (std) | paper (std) | ours − paper.", "",
         "## Sources", "",
         f"- ICLR = `/work/shared/paper/{ICLR_FILE}` (the ICLR 2023 submission): Tables 1, 7, 8, 9.",
         f"- revised = `/work/shared/paper/{REV_FILE}` (the later revision; text extraction, captions and "
         "formulas lost, table numbers from their order and the text's references): Table 1 (d = 100 only), "
         "App. B Tables 4, 5, 6 = ICLR Tables 7, 8, 9 number for number, and a new Table 7 (d = 2, "
         "'30 degree'/'60 degree', clean ≈ 0.905-0.924). Its Table 8 is the CIFAR-10 contrastive-loss ablation.",
         "- The two d = 2 30°/60° tables are different experiments: ICLR Table 8 (= revised Table 5) has "
         "‖μ‖² = 1 and μ̃ = cμ; revised Table 7 has ‖μ‖² = 2, μ̃ = c(μ − ε1) and μ 15° from a diagonal "
         "(inferred, see below). Each is compared with ours in its own setting.",
         "",
         "## Explanation of the d = 2 offsets (e.g. c = 1 at 0°: ours +0.005 clean, +0.007 robust)", ""]
    c1 = hold["settings"]["d2_0deg"]["rows"]["c=1"]
    c15 = PAPER[("d2", 0)][1.5][3][0], PAPER[("d2", 90)][1.5][3][0]
    L += [f"The paper evaluates on ONE finite test set per row (revised App. B: \"testing on 10k extra real "
          f"data\"); ours are exact expectations (eqs. 6/7). A {args.test_size}-point test set has sampling SD "
          f"{mc['sd_acc']:.4f} (clean) / {mc['sd_rob']:.4f} (robust) at d = 2, 0° (correlation "
          f"{mc['rho']:.2f}; Monte Carlo over {mc['holdouts']} test sets: {mc['sd_acc_mc']:.4f} / "
          f"{mc['sd_rob_mc']:.4f} / {mc['corr_mc']:.2f}), and that error is shared by every trial and n of a row.", "",
          f"1. The paper's c = 1.5 rows at n = 100 ({c15[0]:.4f} at 0°, {c15[1]:.4f} at 90°, std 0.0003/0.0005) "
          f"and revised Table 7's 60° Real row (0.9235) exceed Φ(√2) = {hyp['bayes_clean']:.4f}, the Bayes "
          "accuracy of ANY classifier at the stated ‖μ‖² = 2, σ = 1: only a finite test set can do that.",
          f"2. The paper's n = 100 stds (0.0003-0.0006 at 0°/90°) are far below {mc['sd_acc']:.4f}: the test set "
          "is not redrawn per trial.",
          "3. Our offset is constant along n within a row (c = 1, 0°: " + ", ".join(
              f"{o['acc_mean'] - p[0]:+.4f}" for o, p in zip(ours[('d2', 0)]['c=1'], PAPER[('d2', 0)][1.0]))
          + " clean) but differs between rows: one test set per row.",
          f"4. At 0° the problem is symmetric under swapping the coordinates, so every estimator here aims "
          f"at μ; the paper's n = 100 clean {PAPER[('d2', 0)][1.0][3][0]:.4f} would need θ̂ tilted "
          f"{hyp['tilt_deg_for_paper_n100']:.0f}° off μ in every trial (std 0.0005). The alternative pipelines "
          "below move this row by at most "
          f"{max(hyp['max_shift_vs_reference']['acc_mean']):.4f} / {max(hyp['max_shift_vs_reference']['rob_mean']):.4f}"
          f" (at n = {NS[int(np.argmax(hyp['max_shift_vs_reference']['acc_mean']))]}) and by ≤ "
          f"{hyp['max_shift_vs_reference']['acc_mean'][-1]:.4f} / "
          f"{hyp['max_shift_vs_reference']['rob_mean'][-1]:.4f} at n = 100.",
          f"5. In units of that noise the c = 1 row is z = {c1['z_acc']:+.2f} (clean), {c1['z_rob']:+.2f} "
          f"(robust), joint d² = {c1['d2']:.2f}, p = {c1['p']:.2f} (χ²₂); {100 * mc['frac_at_least_as_far']:.0f}% "
          f"of simulated {args.test_size}-point test sets are at least as far out. Over the n = 100 rows of "
          f"all {len(hold['settings'])} settings χ² = {hold['total']['chi2']:.1f} on {hold['total']['dof']} "
          f"dof (p = {hold['total']['p']:.2f}): no offset beyond test-set noise is left (if anything less "
          "spread than a 10k test set predicts; see the χ² by test-set size below).",
          ""]
    L += ["## Assumptions (the paper under-specifies the pipeline)", ""]
    L += [f"- {a}" for a in ASSUMPTIONS]
    # at a glance: the two 30°/60° tables at n = 100
    i = NS.index(100)
    L += ["", "## At a glance: the two d = 2, 30°/60° tables at n = 100 (clean / robust)", "",
          "| row | ICLR T8 30° paper | ours (‖μ‖²=1, cμ) | ICLR T8 60° paper | ours | "
          "rev. T7 \"30°\" paper | ours (‖μ‖²=2, c(μ−ε1)) | rev. T7 \"60°\" paper | ours |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in ROWS:
        cells = []
        for key in (("d2", 30), ("d2", 60), ("rev7", 30), ("rev7", 60)):
            p, o = PAPER[key][c][i], ours[key][_rk(c)][i]
            cells += [f"{p[0]:.4f} / {p[2]:.4f}", f"{o['acc_mean']:.4f} / {o['rob_mean']:.4f}"]
        L.append(f"| {'Real' if c is None else f'c = {c:g}'} | " + " | ".join(cells) + " |")
    for title, keys in TABLES.items():
        ns = (10, 100) if title.startswith("Table 1") else NS
        L += ["", f"## {title}", ""]
        for key in keys:
            d, m2, eps, angle, target = SETTINGS[key]
            head = f"d = {d}, angle {key[1]}°" if key[0] != "rev7" else f"d = {d}, \"{key[1]} degree\""
            L += [f"### {head}, ‖μ‖² = {m2:g}, ε = {eps:g}", "",
                  f"paper: {SOURCES[key]}; {_setting_line(key)}.", "",
                  "| row | n (= ñ) | acc ours | acc paper | Δacc | rob ours | rob paper | Δrob |",
                  "|---|---|---|---|---|---|---|---|"]
            for c in ROWS:
                name = "Real" if c is None else f"c = {c:g}"
                for n in ns:
                    j = NS.index(n)
                    o, p = ours[key][_rk(c)][j], PAPER[key][c][j]
                    L.append(f"| {name} | {n} | {_fmt(o['acc_mean'], o['acc_std'])} | {_fmt(p[0], p[1])} "
                             f"| {o['acc_mean'] - p[0]:+.4f} | {_fmt(o['rob_mean'], o['rob_std'])} "
                             f"| {_fmt(p[2], p[3])} | {o['rob_mean'] - p[2]:+.4f} |")
            L.append("")
    # revised Table 7 inference
    L += ["## How the setting of revised Table 7 was inferred", "",
          "Stated in the revision: the App. B pipeline, '30 degree'/'60 degree' column heads, and 'for d = 2 we "
          "set [‖μ‖², ε]' with the values lost in extraction (ICLR Table 1: ‖μ‖² = 2, ε = 0.5). Inferred: ‖μ‖² = 2 "
          "(clean ≈ Φ(√2) = 0.9214), ε = 0.5, μ 15° from a diagonal (the Real rows' robust means AND stds; the Real "
          "row is invariant to which diagonal and to μ̃), μ̃ = c(μ − ε1) and the diagonal (the synthetic rows; "
          "c(μ − ε1) is the only ingredient that tells (1, 1) from (1, −1)). Score = Σ over the 16 cells × 2 "
          f"numbers of ((ours − paper)/SE)², SE² = {TEST_SIZE_PAPER}-point test-set variance + trial variances "
          "(cells treated as independent, so a fit score, not a calibrated χ²; 32 numbers per column); "
          f"std score = Σ log²(our std / paper std). {fit['fit_trials']} trials per cell.", "",
          "| candidate (ε = 0.5, synthetic points only, pseudo-labels) | score \"30°\" | std score \"30°\" | "
          "score \"60°\" | std score \"60°\" |", "|---|---|---|---|---|"]
    for cnd in fit["candidates"]:
        L.append(f"| {cnd['label']} | {cnd['score_30']:.0f} | {cnd['logstd_30']:.1f} | "
                 f"{cnd['score_60']:.0f} | {cnd['logstd_60']:.1f} |")
    L += ["", "Scan of μ's direction (make_mu angle 0-180° in 5° steps, which covers every direction up to the "
          "coordinate swap that leaves the pipeline invariant) × μ̃ ∈ {cμ, c(μ − ε1)} at ‖μ‖² = 2, ε = 0.5; "
          "best four per column:", "",
          "| column | make_mu angle | μ̃ | score | std score |", "|---|---|---|---|---|"]
    for k in (30, 60):
        for r in fit["scan_best"][k]:
            mt = "cμ" if r["target"] == "clean" else "c(μ − ε1)"
            L.append(f"| \"{k}°\" | {r['angle']} | {mt} | {r['score']:.0f} | {r['logstd']:.1f} |")
    L += ["", "make_mu angle 15° is μ = √2(cos 30°, sin 30°) and 105° is μ = √2(cos 60°, −sin 60°); their coordinate "
          "swaps are √2(cos 60°, sin 60°) and √2(cos 150°, sin 150°). With μ̃ = cμ every sign flip of a coordinate "
          "is a symmetry too, so 15°, 75°, 105° and 165° are the same experiment and the two columns could not "
          "differ; with μ̃ = c(μ − ε1) only the swap is, so 15° and 105° differ in their synthetic rows while "
          "their Real rows agree — as in the revised table. The std score alone rules out cμ at every "
          f"direction (best std score over the scan: cμ {fit['min_logstd_by_target']['clean']:.1f}, "
          f"c(μ − ε1) {fit['min_logstd_by_target']['robust']:.1f}).", ""]
    # offsets in test-set units
    L += [f"## Offsets in units of a {args.test_size}-point test set (n = 100)", "",
          f"paper − ours (ours: {args.ref_trials} trials), divided by √(test-set variance at our accuracy + "
          "paper std²/50 + our std²/trials); d² = joint (clean, robust) Mahalanobis distance with the test-set "
          "correlation, p = P(χ²₂ ≥ d²). Per setting: χ² = Σ d² over its 4 rows (8 dof).", "",
          "| setting | row | ours acc / rob | paper acc / rob | z acc | z rob | d² | p |",
          "|---|---|---|---|---|---|---|---|"]
    for name, s in hold["settings"].items():
        for rk, r in s["rows"].items():
            L.append(f"| {name} | {rk} | {r['ours_acc']:.4f} / {r['ours_rob']:.4f} | {r['paper_acc']:.4f} / "
                     f"{r['paper_rob']:.4f} | {r['z_acc']:+.2f} | {r['z_rob']:+.2f} | {r['d2']:.2f} | {r['p']:.2f} |")
        L.append(f"| {name} | **χ²** | | | | | {s['chi2']:.1f} (8 dof) | {s['p']:.2f} |")
    t = hold["total"]
    L += ["", f"All settings: χ² = {t['chi2']:.1f} on {t['dof']} dof, p = {t['p']:.2f} (P(χ² ≥ observed)); "
          f"P(χ² ≤ observed) = {1 - t['p']:.2f}: the offsets are, if anything, smaller than a "
          f"{args.test_size}-point test set predicts. Total χ² (56 dof) if the test set had N points: "
          + ", ".join(f"N = {k}: {v['chi2']:.1f}" for k, v in hold["total_by_test_size"].items())
          + " (expected 56 ± 11): 10k-20k points (e.g. 10k per class) fit.", ""]
    # c = 1 hypotheses
    L += ["## The d = 2, 0°, c = 1 row: hypotheses computed", "",
          f"Bounds: Bayes clean Φ(√2) = {hyp['bayes_clean']:.4f}, best robust at θ ∝ μ = "
          f"{hyp['best_robust']:.4f}. clean / robust per n (= ñ):", "",
          "| pipeline | " + " | ".join(f"n = {n}" for n in NS) + " |", "|---|" + "---|" * len(NS),
          "| **paper** (ICLR T7 = revised T4) | " + " | ".join(
              f"{p['acc_mean']:.4f} / {p['rob_mean']:.4f}" for p in hyp["paper"]) + " |"]
    for k, v in hyp["variants"].items():
        L.append(f"| {k} | " + " | ".join(f"{r['acc_mean']:.4f} / {r['rob_mean']:.4f}" for r in v) + " |")
    L += ["", "Every variant converges to the bounds by n = 100, as the paper's Real and c = 0.5 rows do; none "
          "gives an n-independent −0.005 / −0.007. Test-set Monte Carlo (θ = μ, "
          f"{mc['holdouts']} test sets of {mc['test_size']}): both measured accuracies at least as low as the "
          f"paper's c = 1 offset ({mc['paper_offset'][0]:+.4f} / {mc['paper_offset'][1]:+.4f}) in "
          f"{100 * mc['frac_both_as_low']:.1f}% of test sets; at least as far out (d²) in "
          f"{100 * mc['frac_at_least_as_far']:.1f}%.", ""]
    L += ["## Orderings (Proposition 1) on our numbers", "",
          "| setting | n | clean ↑ in c | robust ↑ in c | c=1.5 > Real (clean) | c=1.5 > Real (robust) |",
          "|---|---|---|---|---|---|"]
    for name, checks in orderings(ours).items():
        for n, ch in checks.items():
            L.append(f"| {name} | {n} | {ch['clean_increasing_in_c']} | "
                     f"{ch['robust_increasing_in_c']} | {ch['c1.5_beats_real_clean']} | "
                     f"{ch['c1.5_beats_real_robust']} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per table cell (the paper: 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-trials", type=int, default=2000,
                    help="trials of the n = 100 references for the test-set analysis (chunks of 250)")
    ap.add_argument("--holdouts", type=int, default=2000,
                    help="simulated test sets in the Monte Carlo of the c = 1 offset")
    ap.add_argument("--test-size", type=int, default=TEST_SIZE_PAPER,
                    help="points per test set assumed for the paper (revised App. B: 10k)")
    ap.add_argument("--fit-trials", type=int, default=300,
                    help="trials per cell when inferring revised Table 7's setting")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results"))
    args = ap.parse_args(argv)
    args.cmd_options = "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "out" and v != ap.get_default(k))
    t0 = time.perf_counter()
    ours = {key: run_setting(key, args.trials, args.seed) for key in SETTINGS}
    hold = holdout_analysis(args.ref_trials, args.seed, args.test_size)
    c1 = hold["settings"]["d2_0deg"]["rows"]["c=1"]
    mc = holdout_monte_carlo(args.holdouts, args.test_size, args.seed,
                             (c1["paper_acc"] - c1["ours_acc"], c1["paper_rob"] - c1["ours_rob"]))
    hyp = c1_hypotheses(args.ref_trials, args.seed, args.trials)
    fit = rev7_fit(args.fit_trials, args.seed)
    elapsed = time.perf_counter() - t0
    md = render(ours, args.trials, args.seed, elapsed, hold, mc, hyp, fit, args)
    print(md)
    payload = {
        "what": "Gaussian simulations of §3 / App. B (ICLR Tables 1, 7, 8, 9; revised Tables 1, 4-7)",
        "trials": args.trials, "seed": args.seed, "ref_trials": args.ref_trials,
        "holdouts": args.holdouts, "test_size": args.test_size, "fit_trials": args.fit_trials,
        "seconds": elapsed, "ns": list(NS),
        "assumptions": ASSUMPTIONS,
        "sources": {_name(k): v for k, v in SOURCES.items()},
        "settings": {_name(k): {"d": v[0], "mu_norm2": v[1], "eps": v[2], "angle": v[3], "target": v[4]}
                     for k, v in SETTINGS.items()},
        "ours": {_name(k): v for k, v in ours.items()},
        "paper": {_name(k): {_rk(c): [dict(zip(("acc_mean", "acc_std", "rob_mean", "rob_std"), p))
                                      for p in v] for c, v in rows.items()}
                  for k, rows in PAPER.items()},
        "test_set_offsets": hold,
        "test_set_monte_carlo": mc,
        "c1_hypotheses": hyp,
        "revised_table7_fit": {**fit, "scan_best": {str(k): v for k, v in fit["scan_best"].items()}},
        "orderings": orderings(ours),
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "platform": platform.platform(), "commit": git_commit()},
    }
    _atomic_write(os.path.join(args.out, "gaussian_tables.md"), md)
    _atomic_write(os.path.join(args.out, "gaussian_tables.json"), json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
