"""How long one million guided images take, from counted FLOPs (issue 22, items 4 and 5).

    python benchmarks/projection.py [--json benchmarks/results/projection-cpu.json]

1. **This CPU's floor for the digits million.** The FLOPs of one guided ``cdp_fast.sample`` call
   are counted op by op (torch.utils.flop_counter's formulas, through benchmarks/throughput.py's
   counter: convolutions and matrix products, forward and backward; element-wise work is not
   counted, so the counts are lower bounds) for each solver setting, per image, and split into the ε-UNet's part
   (rows through the UNet × one row's FLOPs) and the guidance's (the rest: features forward and
   backward to the input, head, loss). Against this machine's measured fp32 matrix-product rate
   (a 2048² sgemm, the best case for its cores) that is the shortest time 1M images could take
   here; against the UNet's own measured eager rate, the time they would take at that rate.
2. **CIFAR-10 on an H100 / H200: a PROJECTION, not a measurement** (no GPU has run this code).
   The same row counts (UNet evaluations and guidance work per image, which depend on the solver,
   NFE and the authors' window, not on the networks) times the FLOPs of the paper's networks —
   the DDPM CIFAR-10 UNet (35.7M, diffusers' UNet2DModel config of benchmarks/throughput.py) and
   WRN-28-10 features — counted here on the CPU, divided by the chip's datasheet dense bf16 peak
   (989.4 TFLOP/s, H100 SXM; the H200 has the same compute) at 100% (the floor) and at a stated
   fraction of peak (an assumption, labelled as one).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

H100_BF16_DENSE = 989.4e12      # FLOP/s, NVIDIA H100 SXM datasheet (dense, no sparsity); H200: same
ASSUMED_MFU = 0.4               # an assumption for the "at 40% of peak" column, not a measurement
N_MILLION = 1_000_000
SETTINGS = [("ddim", 200, "uniform"), ("dpmpp_2m", 20, "logsnr"), ("dpmpp_2m", 10, "logsnr")]


class RowCounter:
    """Counts the rows (images) that go through a module's forward."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.rows += int(args[0].shape[0])


def flops_of(fn) -> int:
    """FLOPs of ``fn()``: benchmarks/throughput.py's counter (FlopCounterMode without its module
    tracker, which breaks on the guidance's ``torch.autograd.grad`` with respect to a leaf)."""
    from throughput import flop_counter

    with flop_counter() as fc:
        fn()
    return fc.get_total_flops()


def per_row_flops(module, x, *args) -> float:
    with torch.no_grad():
        return flops_of(lambda: module(x, *args)) / x.shape[0]


def digits_counts(batch: int) -> dict:
    """Per image, for each setting: total FLOPs, UNet rows and FLOPs, guidance FLOPs."""
    import cdp_fast
    from cdp_fast.models import digits
    from million import guidance_kwargs

    eps = digits.load_digits_eps_model()
    kw = guidance_kwargs()
    kw["batch_size"] = batch
    x = torch.randn(batch, *digits.IMAGE_SHAPE)
    f_unet = per_row_flops(eps, x, torch.full((batch,), 500))
    feats = kw["features"]
    f_feat = per_row_flops(feats, x.clamp(-1, 1))
    rows = {}
    for solver, nfe, skip in SETTINGS:
        unet_rows, feat_rows = RowCounter(eps), RowCounter(feats)
        steps = dict(steps=nfe) if solver == "ddim" else dict(nfe=nfe)
        total = flops_of(lambda: cdp_fast.sample(eps, batch, solver=solver, skip=skip, seed=0, progress=False,
                                                 compile=False, **steps, **kw))
        unet_rows.handle.remove()
        feat_rows.handle.remove()
        u = unet_rows.rows / batch
        g = (total / batch) - u * f_unet
        rows[f"{solver}-{nfe}-{skip}"] = {
            "solver": solver, "nfe": nfe, "skip": skip, "flops_per_image": total / batch,
            "unet_rows_per_image": u, "unet_flops_per_image": u * f_unet,
            "feature_rows_per_image": feat_rows.rows / batch,
            "guidance_flops_per_image": g, "guidance_in_feature_forwards": g / f_feat}
    return {"unet_flops_per_row": f_unet, "feature_flops_per_row": f_feat, "settings": rows}


def measured_rates(eps, image_shape, batch: int) -> dict:
    """This machine's fp32 sgemm rate and the digits UNet's eager forward rate, both in FLOP/s."""
    a = torch.randn(2048, 2048)
    for _ in range(2):
        a @ a
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ a
    sgemm = 2 * 2048 ** 3 * reps / (time.perf_counter() - t0)
    x, t = torch.randn(batch, *image_shape), torch.full((batch,), 500)
    f = per_row_flops(eps, x, t) * batch
    with torch.no_grad():
        for _ in range(2):
            eps(x, t)
        t0 = time.perf_counter()
        for _ in range(reps):
            eps(x, t)
        unet = f * reps / (time.perf_counter() - t0)
    return {"sgemm_fp32_flops_per_s": sgemm, "digits_unet_eager_flops_per_s": unet}


def cifar_flops() -> dict:
    """FLOPs per row of the paper's CIFAR-10 networks (random init; FLOPs do not depend on weights)."""
    from throughput import build_cifar

    setup = build_cifar("cpu")
    x = torch.randn(2, 3, 32, 32)
    f_unet = per_row_flops(setup["model"], x, torch.full((2,), 500))
    f_feat = per_row_flops(setup["features"], x)
    return {"unet_flops_per_row": f_unet, "feature_flops_per_row": f_feat, "unet_params": setup["params"]}


def main(argv=None):
    import harness

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128, help="digits batch (the guidance's B)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "projection-cpu.json"))
    ap.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 part (needs diffusers)")
    args = ap.parse_args(argv)
    from cdp_fast.models import digits

    rec = {"machine": harness.machine_info("cpu"), "n": N_MILLION,
           "note": "FLOPs counted op by op (conv/matmul, forward and backward; element-wise work not counted: "
                   "lower bounds). CPU minutes: measured rates. GPU hours: a projection from FLOP counts and "
                   "the datasheet peak; no GPU measurement exists."}
    d = digits_counts(args.batch)
    rates = measured_rates(digits.load_digits_eps_model(), digits.IMAGE_SHAPE, args.batch)
    rec["digits"] = d
    rec["cpu_rates"] = rates
    print(f"digits UNet {d['unet_flops_per_row'] / 1e6:.1f} MFLOP/row, features {d['feature_flops_per_row'] / 1e6:.2f}"
          f" MFLOP/row; this CPU: sgemm {rates['sgemm_fp32_flops_per_s'] / 1e9:.0f} GFLOP/s, UNet eager "
          f"{rates['digits_unet_eager_flops_per_s'] / 1e9:.0f} GFLOP/s")
    cif = None if args.no_cifar else cifar_flops()
    rec["cifar"] = cif
    if cif:
        print(f"CIFAR-10 UNet {cif['unet_flops_per_row'] / 1e9:.2f} GFLOP/row ({cif['unet_params'] / 1e6:.1f}M), "
              f"WRN-28-10 features {cif['feature_flops_per_row'] / 1e9:.2f} GFLOP/row")
    print(f"{'setting':24s} {'UNet rows':>9s} {'GFLOP/img':>9s} {'guid.%':>6s} | {'CPU floor':>9s} "
          f"{'CPU@UNet':>9s} | {'H100 floor':>10s} {'H100@40%':>9s}")
    for key, s in d["settings"].items():
        tot = s["flops_per_image"] * N_MILLION
        s["cpu_floor_min"] = tot / rates["sgemm_fp32_flops_per_s"] / 60
        s["cpu_at_unet_rate_min"] = tot / rates["digits_unet_eager_flops_per_s"] / 60
        line = (f"{key:24s} {s['unet_rows_per_image']:9.1f} {s['flops_per_image'] / 1e9:9.3f} "
                f"{100 * s['guidance_flops_per_image'] / s['flops_per_image']:6.1f} | {s['cpu_floor_min']:7.1f} m "
                f"{s['cpu_at_unet_rate_min']:7.1f} m |")
        if cif:
            per_img = (s["unet_rows_per_image"] * cif["unet_flops_per_row"]
                       + s["guidance_in_feature_forwards"] * cif["feature_flops_per_row"])
            s["cifar_flops_per_image"] = per_img
            s["h100_floor_h"] = per_img * N_MILLION / H100_BF16_DENSE / 3600
            s["h100_at_assumed_mfu_h"] = s["h100_floor_h"] / ASSUMED_MFU
            line += f" {s['h100_floor_h']:8.2f} h {s['h100_at_assumed_mfu_h']:7.2f} h"
        print(line)
    rec["assumptions"] = {"h100_bf16_dense_flops_per_s": H100_BF16_DENSE, "assumed_mfu": ASSUMED_MFU,
                          "cifar_guidance": "the digits run's guidance work, in feature-network forwards per "
                                            "image, times WRN-28-10's forward FLOPs (head and loss included "
                                            "in that ratio)"}
    harness.write_json(Path(args.json), rec)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
