"""Micro-benchmark of the fused L∞ PGD step (cdp_fast::pgd_step) against the eager PyTorch
composite it replaces, on CPU, measured in the same run.

    python benchmarks/ops/pgd_step.py [--batch 512] [--threads N] [--dtype float32] [--no-compile]

Rows (all compute clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1)):
  fused             the C++ op, α, ε Python floats
  fused-per-sample  the C++ op, α, ε tensors of shape (B,)
  composite         cdp_fast.ops.pgd_step.pgd_step_ref in eager mode (~8 kernels, 7 temporaries)
  composite-compiled  the same function under torch.compile (inductor fuses it as well;
                    shown for honesty, it is the alternative to writing an extension)
Timing: torch.utils.benchmark.Timer.blocked_autorange; median and 20th/80th percentiles of
the per-block means. Writes benchmarks/results/pgd_step-<device>.json (atomically) with the
machine, versions, thread count, load average and git commit next to the numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cdp_fast.ops import pgd_step as op  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import cpu_model, git_commit  # noqa: E402  (provenance, shared with the other benchmarks)


def measure(stmt_fn, threads: int, min_run_time: float) -> dict:
    m = Timer(stmt="f()", globals={"f": stmt_fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    t = np.asarray(m.times) * 1e3
    return {"median_ms": float(np.median(t)), "p20_ms": float(np.percentile(t, 20)),
            "p80_ms": float(np.percentile(t, 80)), "blocks": int(len(t)),
            "calls_per_block": int(m.number_per_run)}


def atomic_write_json(path: Path, obj) -> None:
    from cdp_fast.utils.io import atomic_write_json as _write

    _write(path, obj)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
                    help="thread counts to measure (default: 1 and torch's default)")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per row")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pgd_step-cpu.json")
    args = ap.parse_args(argv)

    if not op.load_extension():
        print(f"extension unavailable: {op.extension_error()}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, *args.shape)
    x = torch.rand(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    xa = (x + 0.02 * torch.randn(shape, generator=gen).to(dtype)).clamp(0, 1)
    a, e = 2 / 255, 8 / 255
    a_t, e_t = torch.full((args.batch,), a), torch.full((args.batch,), e)

    fused = torch.ops.cdp_fast.pgd_step.default
    a0, e0 = torch.tensor(a, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)
    ref = op.pgd_step_ref
    rows = {
        # The raw op: what attacks pay per step besides the Python argument checks.
        "fused": lambda: fused(xa, g, x, a0, e0),
        "fused-per-sample": lambda: fused(xa, g, x, a_t, e_t),
        "fused-python-api": lambda: op.pgd_step(xa, g, x, step_size=a, eps=e, impl="ext"),
        "composite": lambda: ref(xa, g, x, step_size=a, eps=e),
    }
    if not args.no_compile:
        compiled = torch.compile(ref)
        rows["composite-compiled"] = lambda: compiled(xa, g, x, step_size=a, eps=e)

    # Same answer before timing anything.
    want = ref(xa, g, x, step_size=a, eps=e)
    for name, fn in rows.items():
        if not torch.equal(fn(), want):
            print(f"{name}: result differs from the composite", file=sys.stderr)
            return 1

    nbytes = 4 * xa.numel() * xa.element_size()
    by_threads = {}
    for threads in dict.fromkeys(args.threads):  # ordered, no duplicates
        torch.set_num_threads(threads)
        results = {name: measure(fn, threads, args.min_run_time) for name, fn in rows.items()}
        base = results["composite"]["median_ms"]
        for r in results.values():
            r["speedup_vs_composite"] = base / r["median_ms"]
        by_threads[str(threads)] = results
        print(f"\npgd_step {tuple(shape)} {args.dtype}, {threads} thread(s), load avg "
              f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}")
        print(f"{'impl':<20}{'median ms':>11}{'p20 ms':>9}{'p80 ms':>9}{'GB/s*':>8}{'vs composite':>14}")
        for name, r in results.items():
            gbs = nbytes / (r["median_ms"] * 1e-3) / 1e9
            print(f"{name:<20}{r['median_ms']:>11.3f}{r['p20_ms']:>9.3f}{r['p80_ms']:>9.3f}"
                  f"{gbs:>8.1f}{r['speedup_vs_composite']:>13.2f}x")
    print("* bytes of one pass (read x_adv, g, x; write y) / median time")

    record = {
        "benchmark": "pgd_step", "device": "cpu", "shape": list(shape), "dtype": args.dtype,
        "step_size": a, "eps": e, "results_ms_by_threads": by_threads,
        "goal": "fused >= 2x eager composite",
        "goal_met": all(r["fused"]["speedup_vs_composite"] >= 2.0 for r in by_threads.values()),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "cpu_count": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), "torch": torch.__version__},
        "git_commit": git_commit(),
    }
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
