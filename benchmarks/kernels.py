"""Micro-benchmarks of the fused kernels: contrastive loss (HNM, forward + backward) and the
DDIM update, each against the eager PyTorch reference and torch.compile(reference), measured
in the same run (ratios printed; JSON with machine, versions, commit and the measured
bandwidth/FLOP ceilings written to benchmarks/results/kernels-<device>.json).

    python benchmarks/kernels.py                  # CPU, small sizes (~1-2 min on 2 cores)
    python benchmarks/kernels.py --config gpu     # CUDA: m up to 65536, banks up to 1M, d 128/640

Providers:
  fused     cdp_fast.kernels (Triton on CUDA; on CPU the contrastive op's CPU kernel, i.e.
            the chunked streaming PyTorch path; the DDIM update has no CPU kernel, so on CPU
            "fused" is the reference itself)
  eager     cdp_fast.losses.hnm_loss_ref / cdp_fast.backend.ddim_update_ref
  compiled  torch.compile(reference) (inductor)
Dense providers are skipped where their m×N working set would not fit (estimated).
Model FLOPs of the loss: 6·m·N·d (forward 2mNd, backward dA and dK 4mNd; the fused backward
recomputes s, doing 10·m·N·d); model bytes of the DDIM update: reads x, ε, g (+z) and writes
x_prev (+x̂₀) once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIGS = {
    "cpu": {
        "loss": [  # (m, N or None for in-batch, d)
            (512, None, 128), (512, 16384, 128), (4096, None, 128),
            (512, 100_000, 64),
        ],
        "ddim": [(512, 3, 32, 32), (64, 3, 64, 64)],
        "dense_budget_bytes": 3 << 30,
    },
    "gpu": {
        "loss": [(m, None, d) for m in (512, 4096, 16384, 65536) for d in (128, 640)]
                + [(m, n, d) for m in (512, 4096) for n in (100_000, 1_000_000) for d in (128, 640)],
        "ddim": [(512, 3, 32, 32), (512, 3, 64, 64), (256, 3, 256, 256)],
        "dense_budget_bytes": None,   # 60% of the device memory
    },
}


def _loss_inputs(m, n, d, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, d, generator=g).to(device, dtype).requires_grad_()
    p = torch.randn(m, d, generator=g).to(device, dtype)
    k = None if n is None else torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    return a, p, k


def bench_loss(cfg, device, dtype, providers, budget):
    from cdp_fast import losses
    from cdp_fast.kernels import contrastive as kc

    rows = []
    compiled_ref = torch.compile(losses.hnm_loss_ref, dynamic=False) if "compiled" in providers else None
    for m, n, d in cfg:
        a, p, k = _loss_inputs(m, n, d, device, dtype)
        nn = m if n is None else n
        ins = [a] + ([k] if k is not None else [])
        kw = dict(tau=0.5, tau_plus=0.1, beta=1.0)
        impls = {"fused": kc.hnm_loss_fused, "eager": losses.hnm_loss_ref, "compiled": compiled_ref}
        dense_bytes = 8 * m * nn * 4          # ~8 live m×N fp32 buffers in the reference's backward
        for prov in providers:
            fn = impls[prov]
            row = dict(op="hnm_loss", provider=prov, m=m, N=nn, d=d, bank=n is not None,
                       dtype=str(dtype).replace("torch.", ""))
            if prov != "fused" and dense_bytes > budget:
                row["skipped"] = f"dense m×N working set ≈ {dense_bytes / 2**30:.1f} GiB > budget"
                rows.append(row)
                continue

            def step(fn=fn):
                for t in ins:
                    t.grad = None
                fn(a, p, k, **kw).backward()

            try:
                row.update(harness.bench(step, device=device, min_run_time=0.3))
            except Exception as err:  # noqa: BLE001 (compile failures are reported, not fatal)
                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if "median_ms" in row:
                row["TFLOPs"] = 6 * m * nn * d / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)
        del a, p, k, ins
    return rows


def bench_ddim(cfg, device, dtype, providers):
    from cdp_fast.backend import ddim_update_ref
    from cdp_fast.kernels import ddim as kd

    rows = []
    compiled_ref = torch.compile(ddim_update_ref, dynamic=False) if "compiled" in providers else None
    kw = dict(lam=0.7, abar_t=0.3, abar_prev=0.5, sigma=0.1, return_x0=False)
    for shape in cfg:
        g = torch.Generator(device="cpu").manual_seed(0)
        x, e, gg, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
        impls = {
            "fused": lambda: kd.ddim_update_op(x, e, gg, z, kw["lam"], kw["abar_t"], kw["abar_prev"],
                                               kw["sigma"], False),
            "eager": lambda: ddim_update_ref(x, e, gg, noise=z, **kw),
            "compiled": lambda: compiled_ref(x, e, gg, noise=z, **kw),
        }
        nbytes = 5 * x.numel() * x.element_size()     # read x, ε, g, z; write x_prev
        for prov in providers:
            row = dict(op="ddim_update", provider=prov, shape=list(shape), dtype=str(dtype).replace("torch.", ""))
            try:
                row.update(harness.bench(impls[prov], device=device, min_run_time=0.3))
                row["GBps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            except Exception as err:  # noqa: BLE001
                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(row)
    return rows


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
        elif "GBps" in f:
            ach = f"{f['GBps']:.1f} GB/s"
        else:
            ach = "-"
        fm = f"{f['median_ms']:.2f}" if "median_ms" in f else "skip"
        print(f"{name:44s} {fm:>10s} {ratio('eager'):>12s} {ratio('compiled'):>15s} {mem('fused'):>13s} "
              f"{mem('eager'):>13s} {ach:>16s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
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
    cfg = CONFIGS[args.config]
    budget = cfg["dense_budget_bytes"] or int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    ceilings = harness.measure_ceilings(device, quick=device == "cpu")
    rows = []
    if args.only in (None, "loss"):
        rows += bench_loss(cfg["loss"], device, dtype, providers, budget)
    if args.only in (None, "ddim"):
        rows += bench_ddim(cfg["ddim"], device, dtype, providers)
    for r in rows:
        if "TFLOPs" in r:
            r["fraction_of_matmul_ceiling"] = r["TFLOPs"] / ceilings[
                "matmul_bfloat16_TFLOPs" if args.dtype != "float32" and "matmul_bfloat16_TFLOPs" in ceilings
                else "matmul_float32_TFLOPs"]
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
