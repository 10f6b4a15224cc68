"""Why the million's guidance loses quality at few steps: the quickstart's guidance (HNM, λ = 2e4,
τ = 10, the authors' form and window, online head) under DPM-Solver++(2M) log-SNR at 10 and 20
NFE, with and without the online head, against guided DDIM-200 on the same x_T.

    python benchmarks/head_ablation.py [--n 640] [--json benchmarks/results/head-ablation-cpu.json]

Metrics and rule: benchmarks/solvers.py's (k-NN precision / recall against the real test digits
in PCA-20 space, the independent judge's Fisher ratio), per chunk of 128 rows (one guidance
batch), 95% Student-t intervals over chunks, and each condition minus DDIM-200 paired by chunk.
Also the guidance's strength per guided step (λ‖g‖/‖ε‖, the sampler's ``guidance_strength``
record) of the first batch, whose size per step is what a few-step solver applies over a long
interval.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHUNK = 128
DPM = dict(solver="dpmpp_2m", skip="logsnr")
CONDITIONS = {
    "ddim200": dict(solver="ddim", steps=200, skip="uniform"),
    "dpmpp20": dict(DPM, nfe=20),
    "dpmpp20-nohead": dict(DPM, nfe=20, embedding=None),
    "dpmpp10": dict(DPM, nfe=10),
    "dpmpp10-nohead": dict(DPM, nfe=10, embedding=None),
    "dpmpp20-unguided": dict(DPM, nfe=20, loss=None),
}


def main(argv=None):
    import harness
    from million import guidance_kwargs
    from solvers import METRICS, Instruments, ci

    import cdp_fast
    from cdp_fast.models import digits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=640, help="rows per condition (a multiple of 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "head-ablation-cpu.json"))
    args = ap.parse_args(argv)
    if args.n < 2 * CHUNK or args.n % CHUNK:
        ap.error(f"--n must be a multiple of {CHUNK}, at least {2 * CHUNK}")
    eps = digits.load_digits_eps_model()
    inst = Instruments()
    rec = {"machine": harness.machine_info("cpu"), "n": args.n, "seed": args.seed, "chunk": CHUNK,
           "guidance": "hnm, lam 2e4, tau 10, the authors' form, window t >= 0.4 T, online head (unless "
                       "-nohead), batch 128", "conditions": {}}
    per_chunk = {}
    for name, over in CONDITIONS.items():
        kw = guidance_kwargs()
        kw.update(output="float", progress=False, compile=False, **over)
        t0 = time.perf_counter()
        s = cdp_fast.sample(eps, args.n, seed=args.seed, **kw)
        x = torch.as_tensor(np.asarray(s.images))
        per_chunk[name] = [inst.measure(x[k * CHUNK:(k + 1) * CHUNK]) for k in range(args.n // CHUNK)]
        row = {k: ci([m[k] for m in per_chunk[name]]) for k in METRICS}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        strength = s.meta.get("guidance_strength") or []
        row["strength_first_batch"] = [{"t": r["t"], "mean": round(r["ratio_mean"], 3), "max": round(r["ratio_max"], 3)}
                                       for r in strength]
        if name != "ddim200":
            for k in METRICS:
                row[k]["minus_ddim200"] = ci([a[k] - b[k] for a, b in zip(per_chunk[name], per_chunk["ddim200"])])
            ref = rec["conditions"]["ddim200"]
            row["inside_ddim200_interval"] = all(ref[k]["lo"] <= row[k]["mean"] <= ref[k]["hi"]
                                                 for k in ("precision", "recall"))
        rec["conditions"][name] = row
        peak = max((r["ratio_max"] for r in strength), default=0.0)
        print(f"{name:18s} precision {row['precision']['mean']:.3f} [{row['precision']['lo']:.3f}, "
              f"{row['precision']['hi']:.3f}]  recall {row['recall']['mean']:.3f} [{row['recall']['lo']:.3f}, "
              f"{row['recall']['hi']:.3f}]  Fisher {row['fisher_ratio']['mean']:.3f}  max λ|g|/|ε| {peak:.2f}  "
              f"({row['seconds']:.0f} s)", flush=True)
        harness.write_json(Path(args.json), rec)      # after every condition: a killed run keeps its rows
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
