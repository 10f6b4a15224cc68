"""L2 vs L∞ adversarial training on the bundled 8×8 digits, and the cost of the L2 PGD step.

1. Step cost (CPU): one L2 PGD step (:func:`cdp_fast.robust.attacks.pgd_step_l2`, plain PyTorch:
   the composite path serves L2) against the fused L∞ op (:func:`cdp_fast.pgd_step`, the C++
   extension) and its composite reference (:func:`cdp_fast.ops.pgd_step.pgd_step_ref`), same
   inputs, timed by benchmarks/harness.py.
2. Done-when measurement (issue 24): TRADES-trained SmallCNNs, one trained with norm="linf" at
   ε∞ and one with norm="l2" at the matched ε₂, paired by seed (same init, data order, crops),
   both evaluated with L2 PGD-20 at ε₂ (and L∞ PGD-20 at ε∞) on the 450 test digits.
   Matched ε: the field's CIFAR-10 pair, L∞ 8/255 and L2 128/255 (RobustBench; DM-Improves-AT),
   has ε₂/ε∞ = 16 at D = 3·32·32 = 3072; an L2 radius scales with √D at a fixed per-pixel
   budget, so at D = 64: ε₂ = ε∞ · 16 · √(64/3072) ≈ 2.31 · ε∞ (ε∞ = 0.1 → ε₂ ≈ 0.231).
   Reported: per-arm mean accuracies and the paired difference (L2-trained − L∞-trained) with a
   95 % t interval over seeds.

    OMP_NUM_THREADS=1 python benchmarks/l2_vs_linf.py            # ~3-4 min on one core
    python benchmarks/l2_vs_linf.py --seeds 5                    # tighter intervals

Writes benchmarks/results/l2-vs-linf-cpu.json (with machine, versions and commit).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench, machine_info, write_json  # noqa: E402

import cdp_fast  # noqa: E402
from cdp_fast.models import SmallCNN, digits  # noqa: E402
from cdp_fast.ops.pgd_step import pgd_step, pgd_step_ref  # noqa: E402
from cdp_fast.robust.attacks import pgd_step_l2  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "l2-vs-linf-cpu.json"
# two-sided 95 % Student t quantiles, df = 1..9
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]


def step_cost(shapes):
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=g)
        xa = (x + 0.01 * torch.randn(shape, generator=g)).clamp(0, 1)
        grad = torch.randn(shape, generator=g)
        t = {
            "linf_fused_op": bench(lambda: pgd_step(xa, grad, x, step_size=2 / 255, eps=8 / 255)),
            "linf_composite": bench(lambda: pgd_step_ref(xa, grad, x, step_size=2 / 255, eps=8 / 255)),
            "l2_composite": bench(lambda: pgd_step_l2(xa, grad, x, step_size=15 / 255, eps=128 / 255)),
        }
        rows.append({"shape": list(shape), **{k: v["median_ms"] for k, v in t.items()},
                     "l2_over_linf_fused": t["l2_composite"]["median_ms"] / t["linf_fused_op"]["median_ms"]})
        print(f"step {tuple(shape)}: L∞ fused {rows[-1]['linf_fused_op']:.3f} ms, L∞ composite "
              f"{rows[-1]['linf_composite']:.3f} ms, L2 composite {rows[-1]['l2_composite']:.3f} ms "
              f"({rows[-1]['l2_over_linf_fused']:.2f}x the fused L∞ step)")
    return rows


def interval(d):
    m = statistics.fmean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = T975[len(d) - 2] * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h


def train_and_eval(args):
    x, y = digits.load_digits_data("train")
    xt, yt = digits.load_digits_data("test")
    eps_inf, eps_2 = args.eps_inf, args.eps_inf * 16 * math.sqrt(64 / 3072)
    arms = {"linf": eps_inf, "l2": eps_2}
    res = {a: [] for a in arms}
    for seed in range(args.seeds):
        for arm, eps in arms.items():
            torch.manual_seed(seed)                  # same init for both arms of a seed
            model = SmallCNN(width=16)
            t0 = time.perf_counter()
            # tests/test_train.py's digits recipe (clean 0.976 / PGD-20 0.864 at L∞ 0.1); α = 2ε/k
            # is also TRADES' L2 step (trades.py distance='l_2')
            cdp_fast.train_trades(model, (x, y), epochs=args.epochs, eps=eps, step_size=2 * eps / args.steps,
                                  steps=args.steps, batch_size=64, lr=0.05, ema=0.99, augment=False,
                                  recipe="zhang", seed=seed, progress=False, norm=arm)
            secs = time.perf_counter() - t0
            l2 = cdp_fast.evaluate(model, xt, yt, eps=eps_2, norm="l2", attacks=("clean", "pgd"), seed=seed)
            li = cdp_fast.evaluate(model, xt, yt, eps=eps_inf, attacks=("pgd",), seed=seed)
            res[arm].append({"seed": seed, "clean": l2["clean"], "l2_pgd": l2["pgd"], "linf_pgd": li["pgd"],
                             "train_s": secs})
            print(f"seed {seed} trained {arm:4s}: clean {l2['clean']:.3f}  L2-PGD@{eps_2:.3f} {l2['pgd']:.3f}  "
                  f"L∞-PGD@{eps_inf:g} {li['pgd']:.3f}  ({secs:.0f} s)", flush=True)
    summary = {}
    for metric in ("clean", "l2_pgd", "linf_pgd"):
        d = [b[metric] - a[metric] for a, b in zip(res["linf"], res["l2"])]
        m, lo, hi = interval(d)
        summary[metric] = {"linf_trained": statistics.fmean(r[metric] for r in res["linf"]),
                           "l2_trained": statistics.fmean(r[metric] for r in res["l2"]),
                           "diff_l2_minus_linf": m, "ci95": [lo, hi]}
        print(f"{metric:9s} L∞-trained {summary[metric]['linf_trained']:.3f}  L2-trained "
              f"{summary[metric]['l2_trained']:.3f}  diff {m:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}]")
    return {"eps_linf": eps_inf, "eps_l2": eps_2, "runs": res, "summary": summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="inner PGD steps in training")
    p.add_argument("--eps-inf", type=float, default=0.1)
    p.add_argument("--skip-train", action="store_true", help="the step cost only")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    out = {"machine": machine_info("cpu"),
           "step_cost_ms": step_cost([(128, 3, 32, 32), (512, 1, 8, 8)])}
    if not a.skip_train:
        out["digits"] = {"args": vars(a), **train_and_eval(a)}
    write_json(Path(a.out), out)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
