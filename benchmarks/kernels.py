"""Micro-benchmarks of the ops, run together: the contrastive loss (HNM, forward + backward;
benchmarks/ops/contrastive.py) and the DDIM update (benchmarks/ops/ddim.py), each against the
eager PyTorch reference and torch.compile(reference), measured in the same run (ratios
printed; JSON with machine, versions, commit and the measured bandwidth/FLOP ceilings written
to benchmarks/results/kernels-<device>.json). The PGD step has its own script,
benchmarks/ops/pgd_step.py.

    python benchmarks/kernels.py                  # CPU, small sizes (~1-2 min on 2 cores)
    python benchmarks/kernels.py --config gpu     # CUDA: m up to 65536, banks up to 1M, d 128/640

Providers:
  fused     the op as cdp_fast runs it (cdp_fast.ops.backend.choose: Triton on CUDA; on CPU the
            contrastive op's chunked streaming PyTorch path, and for the DDIM update the
            reference itself)
  eager     cdp_fast.ops.contrastive.reference.hnm_loss_ref / cdp_fast.ops.ddim.ddim_update_ref
  compiled  torch.compile(reference) (inductor)
"""
from __future__ import annotations

import argparse
import os
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(DENSE_BUDGET), default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--providers", default="fused,eager,compiled")
    ap.add_argument("--only", choices=["loss", "ddim"], default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; use 1 on a shared machine)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    args = ap.parse_args(argv)
    device = "cuda" if args.config == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--config gpu needs a CUDA device")
    if device == "cpu" and args.dtype != "float32":
        ap.error("the CPU config runs fp32 only")
    os.environ.setdefault("CDP_FAST_BACKEND", "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    # one compiled reference per problem size: without this, dynamo stops recompiling after 8
    # shapes and silently runs the eager reference under the "compiled" label
    torch._dynamo.config.recompile_limit = 64
    dtype = getattr(torch, args.dtype)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    budget = DENSE_BUDGET[args.config] or int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    ceilings = harness.measure_ceilings(device, quick=device == "cpu")
    rows = []
    if args.only in (None, "loss"):
        rows += bench_contrastive.bench(bench_contrastive.CONFIGS[args.config], device, dtype, providers, budget)
    if args.only in (None, "ddim"):
        rows += bench_ddim.bench(bench_ddim.CONFIGS[args.config], device, dtype, providers)
    peak = ceilings["matmul_bfloat16_TFLOPs" if args.dtype != "float32" and "matmul_bfloat16_TFLOPs" in ceilings
                    else "matmul_float32_TFLOPs"]
    for r in rows:
        if "TFLOPs" in r:
            r["fraction_of_matmul_ceiling"] = r["TFLOPs"] / peak
        if "exec_TFLOPs" in r:
            r["executed_fraction_of_matmul_ceiling"] = r["exec_TFLOPs"] / peak
        if "GBps" in r:
            r["fraction_of_copy_bandwidth"] = r["GBps"] / ceilings["bandwidth_GBps"]
    print_table(rows, ceilings)
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"kernels-{harness.device_tag(device)}.json")
    harness.write_json(out, {"machine": harness.machine_info(device), "ceilings": ceilings,
                             "config": args.config, "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
