"""The mission's own call, run for real: ``cdp_fast.sample(eps_model, n=1_000_000, loss="hnm", ...)``
on the bundled digits models, streamed to shards, with the online head and the authors' window
on (the README quickstart's guidance: HNM, λ = 2e4, τ = 10, the authors' loss form), at a fast
solver's quality-matched setting.

    python benchmarks/million.py [--n 1000000] [--solver dpmpp_2m --nfe 10 --skip logsnr]
                                 [--out /tmp/million] [--json benchmarks/results/million-cpu.json]

Records: wall time, images/s over time (shards finished, sampled every 10 s), peak RSS, the
solver / NFE / spacing and compile decision, and the data-quality metrics of benchmarks/solvers.py
(PCA-20 Fisher ratio with an independent judge's labels, k-NN precision / recall against the
real test digits, class balance, labeller-judge agreement) on a fixed subsample — the run's
first 5 × 512 rows — beside guided DDIM-200 (uniform spacing, the paper's sampler) on the same
rows: same x_T (per-sample seeding), same guidance, same head scope, both through uint8 as
written. Per chunk of 512 a paired difference; the rule of benchmarks/solvers.py: "no worse"
(mean ≥ the DDIM-200 interval's lower end) and "strict" (inside it) on precision and recall.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHUNK, CHUNKS = 512, 5


def guidance_kwargs():
    """The README quickstart's guidance on the bundled models: the authors' defaults (loss form,
    window t >= 0.4 T, online head) with λ = 2e4, τ = 10 for these 128-d features, B = 128."""
    from cdp_fast.models import digits

    return dict(loss="hnm", lam=2e4, tau=10.0, features=digits.digits_features(), labeler=digits.digits_labeler(),
                image_shape=digits.IMAGE_SHAPE, batch_size=128)


class Watch:
    """Samples the out dir's finished shards and this process's RSS every ``every`` seconds."""

    def __init__(self, out: Path, every: float = 10.0):
        self.out, self.every, self.timeline, self.peak_rss = out, every, [], 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self):
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _run(self):
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self):
        rss = self._rss()
        self.peak_rss = max(self.peak_rss, rss)
        rows = 0
        try:                          # the manifest is rewritten atomically after every shard
            info = json.loads((self.out / "manifest.json").read_text())
            rows = sum(int(v["count"]) for v in info["shards"].values())
        except (OSError, ValueError, KeyError):
            pass
        self.timeline.append({"t_s": round(time.perf_counter() - self._t0, 1), "rows": rows, "rss_mb": rss >> 20})

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def as_model_space(images_uint8_nhwc) -> torch.Tensor:
    """uint8 NHWC as written -> float NCHW in [-1, 1] (the inverse of the sampler's write)."""
    x = torch.as_tensor(np.asarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def quality(samples, instruments) -> list:
    x = as_model_space(samples.images[: CHUNK * CHUNKS])
    return [instruments.measure(x[k * CHUNK:(k + 1) * CHUNK]) for k in range(CHUNKS)]


def compare(fast, ref) -> dict:
    from solvers import METRICS, ci

    out = {}
    for k in METRICS:
        out[k] = {"fast": ci([m[k] for m in fast]), "ddim200": ci([m[k] for m in ref]),
                  "fast_minus_ddim200": ci([a[k] - b[k] for a, b in zip(fast, ref)])}
    pr = ("precision", "recall")
    out["no_worse_than_ddim200"] = all(out[k]["fast"]["mean"] >= out[k]["ddim200"]["lo"] for k in pr)
    out["inside_ddim200_interval"] = all(out[k]["ddim200"]["lo"] <= out[k]["fast"]["mean"] <= out[k]["ddim200"]["hi"]
                                         for k in pr)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--solver", default="dpmpp_2m")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--skip", default="logsnr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/million", help="shard directory (resumes if present)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "million-cpu.json"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-reference", action="store_true", help="skip the DDIM-200 quality reference")
    args = ap.parse_args(argv)
    if args.n < CHUNK * CHUNKS:
        ap.error(f"--n must be >= {CHUNK * CHUNKS} (the quality subsample)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import harness

    import cdp_fast
    from cdp_fast.models import digits
    from solvers import Instruments

    eps = digits.load_digits_eps_model()
    kw = guidance_kwargs()
    out = Path(args.out)
    rec = {"machine": harness.machine_info("cpu"), "n": args.n, "solver": args.solver, "nfe": args.nfe,
           "skip": args.skip, "seed": args.seed,
           "guidance": "hnm, lam 2e4, tau 10, the authors' form, window t >= 0.4 T, online head, batch 128",
           "load_before": list(os.getloadavg())}
    start = time.perf_counter()
    with Watch(out) as watch:
        s = cdp_fast.sample(eps, args.n, solver=args.solver, nfe=args.nfe, skip=args.skip, seed=args.seed,
                            out=str(out), progress=True, compile="auto", **kw)
    wall = time.perf_counter() - start
    rec.update(wall_s=round(wall, 1), images_per_s=round(args.n / wall, 1), written=len(s),
               shards=len(list(out.glob("shard-*.npz"))), peak_rss_mb=watch.peak_rss >> 20,
               timeline=watch.timeline, per_rank=s.meta.get("throughput"), nfe_recorded=s.meta.get("nfe"),
               load_after=list(os.getloadavg()))
    print(f"{len(s):,} images in {wall / 60:.1f} min ({args.n / wall:.0f} img/s), peak RSS {watch.peak_rss >> 20} MB")
    harness.write_json(Path(args.json), rec)
    if not args.no_reference:
        inst = Instruments()
        fast = quality(s, inst)
        t0 = time.perf_counter()
        ref = cdp_fast.sample(eps, CHUNK * CHUNKS, solver="ddim", steps=200, skip="uniform", seed=args.seed,
                              shard_size=int(s.meta["shard_size"]), progress=False,
                              compile="auto", **kw)
        rec["ddim200_reference_s"] = round(time.perf_counter() - t0, 1)
        rec["quality"] = compare(fast, quality(ref, inst))
        q = rec["quality"]
        print("precision", q["precision"]["fast"], "vs DDIM-200", q["precision"]["ddim200"])
        print("recall", q["recall"]["fast"], "vs DDIM-200", q["recall"]["ddim200"])
        print("no worse:", q["no_worse_than_ddim200"], "| strict:", q["inside_ddim200_interval"])
    harness.write_json(Path(args.json), rec)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
