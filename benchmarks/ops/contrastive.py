"""Benchmark of the contrastive-statistics op (cdp_fast.ops.contrastive): ℓ_HNM forward +
backward through the streaming op (Triton on CUDA, the chunked PyTorch path on CPU) against the
dense eager reference and torch.compile(reference), in the same run.

    python benchmarks/ops/contrastive.py [--config gpu] [--dtype bfloat16] [--providers ...]

Same options and JSON as ``benchmarks/kernels.py --only loss`` (the runner over all ops, which
owns the table, the ceilings and the provenance). Model FLOPs: 6·m·N·d (forward 2mNd,
backward dA and dK 4mNd) give ``TFLOPs``; executed FLOPs give ``exec_TFLOPs``: the fused op
recomputes s once in its backward (one D-tile kernel, then dÂ = D·K̂ and dK̂ = Dᵀ·Â as GEMMs),
8·m·N·d in all — before the restructure it recomputed s per 128-wide slice of d for each of
its two passes, 2·m·N·d·(1 + 2·⌈d/128⌉ + 2) with the forward (26·m·N·d at d = 640); the dense providers execute
the model FLOPs. Dense providers are skipped where their m×N working set would not fit
(estimated).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/: the shared harness
import harness  # noqa: E402

#: (m, N or None for in-batch, d) per config
CONFIGS = {
    "cpu": [(512, None, 128), (512, 16384, 128), (4096, None, 128), (512, 100_000, 64)],
    "gpu": [(m, None, d) for m in (512, 4096, 16384, 65536) for d in (128, 640)]
           + [(m, n, d) for m in (512, 4096) for n in (100_000, 1_000_000) for d in (128, 640)],
}


def _loss_inputs(m, n, d, device, dtype):
    # drawn on the device (a 1M x 640 bank drawn on the CPU and copied takes seconds)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, d, generator=g, device=device).to(dtype).requires_grad_()
    p = torch.randn(m, d, generator=g, device=device).to(dtype)
    k = None if n is None else torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
    return a, p, k


def bench(cfg, device, dtype, providers, budget, on_row=None):
    """Rows of {op, provider, m, N, d, ..., median_ms, TFLOPs | skipped} per (m, N, d) of cfg;
    ``on_row(row)`` is called as each row is done (the runner writes its partial JSON there)."""
    from cdp_fast.ops import contrastive as op
    from cdp_fast.ops.contrastive import reference

    def fused(a, p, k=None, **kw):         # ℓ_HNM straight through the op (no argument checks)
        return op.contrastive_loss(a, p, k, clamp=True, **kw)

    rows = []
    compiled_ref = torch.compile(reference.hnm_loss_ref, dynamic=False) if "compiled" in providers else None
    for m, n, d in cfg:
        a, p, k = _loss_inputs(m, n, d, device, dtype)
        nn = m if n is None else n
        ins = [a] + ([k] if k is not None else [])
        kw = dict(tau=0.5, tau_plus=0.1, beta=1.0)
        impls = {"fused": fused, "eager": reference.hnm_loss_ref, "compiled": compiled_ref}
        dense_bytes = 8 * m * nn * 4          # ~8 live m×N fp32 buffers in the reference's backward
        for prov in providers:
            fn = impls[prov]
            row = dict(op="hnm_loss", provider=prov, m=m, N=nn, d=d, bank=n is not None,
                       dtype=str(dtype).replace("torch.", ""))
            if prov != "fused" and dense_bytes > budget:
                row["skipped"] = f"dense m×N working set ≈ {dense_bytes / 2**30:.1f} GiB > budget"
                rows.append(row)
                if on_row is not None:
                    on_row(row)
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
                executed = (8 if prov == "fused" else 6) * m * nn * d
                row["exec_TFLOPs"] = executed / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del a, p, k, ins
    return rows


if __name__ == "__main__":
    import kernels  # the runner: table, ceilings, provenance, JSON

    kernels.main(["--only", "loss"] + sys.argv[1:])
