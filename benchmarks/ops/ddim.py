"""Benchmark of the guided DDIM update op (cdp_fast.ops.ddim): the fused kernel (Triton on
CUDA; on CPU the op runs the reference) against the eager reference and
torch.compile(reference), in the same run.

    python benchmarks/ops/ddim.py [--config gpu] [--dtype bfloat16] [--providers ...]

Same options and JSON as ``benchmarks/kernels.py --only ddim``. Model bytes: reads x, ε, g, z
and writes x_prev once.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/: the shared harness
import harness  # noqa: E402

#: (B, C, H, W) per config
CONFIGS = {
    "cpu": [(512, 3, 32, 32), (64, 3, 64, 64)],
    "gpu": [(512, 3, 32, 32), (512, 3, 64, 64), (256, 3, 256, 256)],
}


def bench(cfg, device, dtype, providers, budget=None, on_row=None):
    """Rows of {op, provider, shape, ..., median_ms, GBps | skipped} per shape of cfg;
    ``on_row(row)`` is called as each row is done (the runner writes its partial JSON there)."""
    from cdp_fast.ops.ddim import ddim_update, ddim_update_ref

    rows = []
    compiled_ref = torch.compile(ddim_update_ref, dynamic=False) if "compiled" in providers else None
    kw = dict(lam=0.7, abar_t=0.3, abar_prev=0.5, sigma=0.1, return_x0=False)
    for shape in cfg:
        g = torch.Generator(device=device).manual_seed(0)      # drawn on the device
        x, e, gg, z = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(4))
        impls = {
            "fused": lambda: ddim_update(x, e, gg, noise=z, **kw),
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
            if on_row is not None:
                on_row(row)
    return rows


if __name__ == "__main__":
    import kernels  # the runner: table, ceilings, provenance, JSON

    kernels.main(["--only", "ddim"] + sys.argv[1:])
