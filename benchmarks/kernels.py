"""Micro-benchmarks of the ops, run together: the contrastive loss (HNM, forward + backward;
benchmarks/ops/contrastive.py) and the DDIM update (benchmarks/ops/ddim.py), each against the
eager PyTorch reference and torch.compile(reference), measured in the same run (ratios
printed; JSON with machine, versions, commit and the measured bandwidth/FLOP ceilings written
to benchmarks/results/kernels-<device>.json). The PGD step has its own script,
benchmarks/ops/pgd_step.py.

    python benchmarks/kernels.py                  # CPU, small sizes (~1-2 min on 2 cores)
    python benchmarks/kernels.py --config gpu     # CUDA: m up to 65536, banks up to 1M, d 128/640
    python benchmarks/kernels.py --config gpu --only loss --dtype bfloat16,float32 \
        --shapes 65536:-:640,4096:1000000:640     # chosen rows (m:N:d, N "-" = in-batch)

The JSON is rewritten (atomically) after every row with ``"complete": false`` until the end,
so a run that is stopped (SIGINT / SIGTERM: ``"interrupted": true``; a kill) keeps the rows it
measured; ``--append`` adds this run's rows to those already in ``--out`` (one file for several
runs, e.g. scripts/gpu_check.sh's kernel phases).

Providers:
  fused     the op as cdp_fast runs it (cdp_fast.ops.backend.choose: Triton on CUDA; on CPU the
            contrastive op's chunked streaming PyTorch path, and for the DDIM update the
            reference itself)
  eager     cdp_fast.ops.contrastive.reference.hnm_loss_ref / cdp_fast.ops.ddim.ddim_update_ref
  compiled  torch.compile(reference) (inductor)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from ops import contrastive as bench_contrastive  # noqa: E402
from ops import ddim as bench_ddim  # noqa: E402

#: bytes of device memory the dense providers may use (None: 60% of the GPU's)
DENSE_BUDGET = {"cpu": 3 << 30, "gpu": None}



def _key(r):
    if r["op"] == "hnm_loss":
        return (r["op"], r["m"], r["N"], r["d"], r["bank"], r["dtype"])
    return (r["op"], tuple(r["shape"]), r["dtype"])


def print_table(rows, ceilings):
    """One line per problem: fused time and the others' time ratios (>1: fused is faster)."""
    by = {}
    for r in rows:
        by.setdefault(_key(r), {})[r["provider"]] = r
    print(f"ceilings: copy {ceilings['bandwidth_GBps']:.1f} GB/s, "
          f"fp32 matmul {ceilings['matmul_float32_TFLOPs']:.3f} TFLOP/s")
    print(f"{'problem':44s} {'fused ms':>10s} {'eager/fused':>12s} {'compiled/fused':>15s} "
          f"{'fused mem MB':>13s} {'eager mem MB':>13s} {'achieved':>16s}")
    for key, prov in by.items():
        f = prov.get("fused", {})
        if key[0] == "hnm_loss":
            name = f"hnm m={key[1]} N={key[2]}{' bank' if key[4] else ''} d={key[3]} {key[5]}"
        else:
            name = f"ddim {'x'.join(map(str, key[1]))} {key[2]}"

        def ratio(p):
            o = prov.get(p, {})
            if "median_ms" in o and "median_ms" in f:
                return f"{o['median_ms'] / f['median_ms']:.2f}x"
            return "skip" if o else "-"

        def mem(p):
            o = prov.get(p, {})
            return f"{o['peak_mem_bytes'] / 2**20:.0f}" if "peak_mem_bytes" in o else "-"

        if "TFLOPs" in f:
            ach = f"{f['TFLOPs']:.3f} TFLOP/s"
            if "exec_TFLOPs" in f:
                ach += f" (executed {f['exec_TFLOPs']:.3f})"
        elif "GBps" in f:
            ach = f"{f['GBps']:.1f} GB/s"
        else:
            ach = "-"
        fm = f"{f['median_ms']:.2f}" if "median_ms" in f else "skip"
        print(f"{name:44s} {fm:>10s} {ratio('eager'):>12s} {ratio('compiled'):>15s} {mem('fused'):>13s} "
              f"{mem('eager'):>13s} {ach:>16s}")


def parse_shapes(text):
    """"m:N:d,..." (N "-" or "0": in-batch negatives) -> [(m, N or None, d), ...]."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"shape {item!r} is not m:N:d")
        m, n, d = parts
        n = None if n in ("-", "0", "") else int(n)
        m, d = int(m), int(d)
        if m < 1 or d < 1 or (n is not None and n < 1):
            raise ValueError(f"shape {item!r}: m, N and d must be positive")
        out.append((m, n, d))
    return out


def _fractions(row, ceilings):
    """A row's achieved TFLOP/s (GB/s) as a fraction of the ceiling of its dtype measured here."""
    # fp16 runs at the bf16 tensor-core rate; the CPU config measures fp32 only
    name = "bfloat16" if row.get("dtype") == "float16" else row.get("dtype")
    peak = ceilings.get(f"matmul_{name}_TFLOPs", ceilings["matmul_float32_TFLOPs"])
    if "TFLOPs" in row:
        row["fraction_of_matmul_ceiling"] = row["TFLOPs"] / peak
    if "exec_TFLOPs" in row:
        row["executed_fraction_of_matmul_ceiling"] = row["exec_TFLOPs"] / peak
    if "GBps" in row:
        row["fraction_of_copy_bandwidth"] = row["GBps"] / ceilings["bandwidth_GBps"]


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    import threading

    main_thread = threading.current_thread() is threading.main_thread()   # signals: main thread only
    old_term = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _stop)     # SIGTERM stops as SIGINT does: partial JSON kept
    try:
        return _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(DENSE_BUDGET), default="cpu")
    ap.add_argument("--dtype", default="float32",
                    help="float32 | bfloat16 | float16, or several comma-separated (run in that order)")
    ap.add_argument("--providers", default="fused,eager,compiled")
    ap.add_argument("--only", choices=["loss", "ddim"], default=None)
    ap.add_argument("--shapes", default=None,
                    help="contrastive problems m:N:d,... (N '-' = in-batch) instead of the config's")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out and add this run's (one file for several runs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; use 1 on a shared machine)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    args = ap.parse_args(argv)
    device = "cuda" if args.config == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--config gpu needs a CUDA device")
    dtypes = [t.strip() for t in args.dtype.split(",") if t.strip()]
    bad = [t for t in dtypes if t not in ("float32", "bfloat16", "float16")]
    if bad or not dtypes:
        ap.error(f"--dtype: unknown {bad or args.dtype!r}; choose from float32, bfloat16, float16")
    if device == "cpu" and dtypes != ["float32"]:
        ap.error("the CPU config runs fp32 only")
    try:
        loss_cfg = parse_shapes(args.shapes) if args.shapes else bench_contrastive.CONFIGS[args.config]
    except ValueError as e:
        ap.error(f"--shapes: {e}")
    os.environ.setdefault("CDP_FAST_BACKEND", "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    # one compiled reference per problem size: without this, dynamo stops recompiling after 8
    # shapes and silently runs the eager reference under the "compiled" label
    torch._dynamo.config.recompile_limit = 64
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    budget = DENSE_BUDGET[args.config] or int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"kernels-{harness.device_tag(device)}.json")
    earlier = {"results": [], "runs": []}
    if args.append and out.is_file():
        try:
            prev = json.loads(out.read_text())
            earlier = {"results": list(prev.get("results", [])), "runs": list(prev.get("runs", []))}
        except (OSError, ValueError) as e:
            print(f"--append: {out} unreadable ({e}); starting it afresh", file=sys.stderr)
    run = {"argv": list(sys.argv[1:] if argv is None else argv), "dtypes": dtypes, "providers": providers,
           "autotune": os.environ.get("CDP_FAST_AUTOTUNE", "0"), "complete": False, "interrupted": False}
    rows, state = [], {"ceilings": None}
    machine = harness.machine_info(device)

    def write():
        harness.write_json(out, {"machine": machine, "ceilings": state["ceilings"],
                                 "config": args.config, "complete": run["complete"],
                                 "interrupted": run["interrupted"], "runs": earlier["runs"] + [run],
                                 "results": earlier["results"] + rows})

    def on_row(row):
        _fractions(row, state["ceilings"])
        write()

    try:
        state["ceilings"] = harness.measure_ceilings(device, quick=device == "cpu")
        write()
        for name in dtypes:
            dtype = getattr(torch, name)
            if args.only in (None, "loss"):
                bench_contrastive.bench(loss_cfg, device, dtype, providers, budget,
                                        on_row=_collect(rows, on_row))
            if args.only in (None, "ddim"):
                bench_ddim.bench(bench_ddim.CONFIGS[args.config], device, dtype, providers,
                                 on_row=_collect(rows, on_row))
    except KeyboardInterrupt as e:
        run["interrupted"] = True
        write()
        print(f"interrupted ({e}); {len(rows)} rows kept in {out}", file=sys.stderr, flush=True)
        return 130
    run["complete"] = True
    write()
    if state["ceilings"] is not None:
        print_table(rows, state["ceilings"])
    print(f"wrote {out}")
    return 0


def _collect(rows, on_row):
    """The callback that appends a finished row to ``rows`` and then writes the partial JSON."""
    def cb(row):
        rows.append(row)
        on_row(row)
    return cb


if __name__ == "__main__":
    raise SystemExit(main())
