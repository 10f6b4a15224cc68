"""TRADES training throughput: ``cdp_fast.train_trades`` against a reference loop, same run.

    python benchmarks/train.py                       # CPU, small CNN on 1x8x8 (digits-sized)
    python benchmarks/train.py --config cpu-preact   # CPU, PreAct-ResNet-18 on 3x32x32, batch 16
    python benchmarks/train.py --config cifar        # CUDA only: WRN-28-10, batch 512, bf16

What is timed: one TRADES update = the 10-step inner attack + the clean and adversarial
forwards + backward + SGD step + EMA update, on a batch mixing real and synthetic images at
real_fraction 0.3 (random data of the right shape; throughput does not depend on the values).

- ``ours``: :func:`cdp_fast.train_trades` itself (fused ``pgd_step``, input-only gradients in
  the attack, foreach EMA; on CUDA bf16 autocast + torch.compile), timed over the second of two
  epochs (the first absorbs compilation / allocator warm-up), with ``recipe="zhang"`` so that
  both sides run the same algorithm (eval-mode attack from x + 0.001·N(0, I), no label
  smoothing);
- ``reference``: the loop of Zhang et al.'s public TRADES code as adversarial-training repos
  run it: eager fp32, the attack's PGD step as the PyTorch composite
  (``min(max(x + α·sign(g), x − ε), x + ε).clamp(0, 1)``), ``loss.backward()`` through the
  parameters during the attack, a per-parameter EMA loop.

Each side runs in its own subprocess so that the peak memory (peak RSS growth on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) of one is not hidden by the other's allocator
cache. Results go to ``benchmarks/results/train-cpu.json`` / ``train-cpu-preact.json`` /
``train-cuda-<gpu>.json`` (atomically) with the
machine, versions, thread count and git commit; a ratio table is printed.

The ``cifar`` configuration needs a CUDA GPU; it has not been run on the CPU-only development
machine, so no GPU numbers are published from it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "cpu": dict(model="small-cnn", shape=(1, 8, 8), batch=128, updates=20, steps=10,
                eps=0.1, step_size=0.025, device="cpu"),
    "cpu-preact": dict(model="preact-resnet18", shape=(3, 32, 32), batch=16, updates=3,
                       steps=10, eps=8 / 255, step_size=2 / 255, device="cpu"),
    "cifar": dict(model="wrn-28-10-swish", shape=(3, 32, 32), batch=512, updates=20, steps=10,
                  eps=8 / 255, step_size=2 / 255, device="cuda"),
}


def _data(cfg, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + tuple(cfg["shape"]), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _model(cfg):
    import torch

    from cdp_fast.models import get_model

    torch.manual_seed(0)
    kw = {"in_channels": 1, "mean": 0.5, "std": 0.5} if cfg["shape"][0] == 1 and \
        cfg["model"] != "small-cnn" else {}
    return get_model(cfg["model"], **kw)


def run_ours(cfg) -> dict:
    import torch

    import cdp_fast
    from cdp_fast.ops import pgd_step as pgd_op

    dev = torch.device(cfg["device"])
    n_real = cfg["batch"] * cfg["updates"]          # one epoch = `updates` updates
    real = _data(cfg, n_real, 1)
    syn = _data(cfg, n_real, 2)
    model = _model(cfg).to(dev)
    t0 = time.perf_counter()
    model = cdp_fast.train_trades(
        model, real, synthetic=syn, real_fraction=0.3, epochs=2, eps=cfg["eps"],
        step_size=cfg["step_size"], steps=cfg["steps"], batch_size=cfg["batch"], lr=0.1,
        augment=False, progress=False, device=dev, recipe="zhang")
    total = time.perf_counter() - t0
    dt = model.history[-1]["time_s"]
    return {"updates_per_s": cfg["updates"] / dt, "seconds_per_update": dt / cfg["updates"],
            "total_s_incl_warmup": total, "pgd_step_impl": pgd_op.resolved_impl(),
            "amp_bf16": dev.type == "cuda", "compiled": dev.type == "cuda"}


def run_reference(cfg) -> dict:
    """Eager fp32 TRADES loop (Zhang et al. public code's structure), composite PGD step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    dev = torch.device(cfg["device"])
    n = cfg["batch"] * cfg["updates"]
    xr, yr = _data(cfg, n, 1)
    xs, ys = _data(cfg, n, 2)
    model = _model(cfg).to(dev)
    ema_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    b_real = round(cfg["batch"] * 0.3)
    rng = np.random.default_rng(0)
    eps, alpha, steps = cfg["eps"], cfg["step_size"], cfg["steps"]
    kl_sum = torch.nn.KLDivLoss(reduction="sum")

    def update(k):
        ir = torch.from_numpy(rng.integers(0, n, b_real))
        isy = torch.from_numpy(rng.integers(0, n, cfg["batch"] - b_real))
        x = torch.cat([xr[ir], xs[isy]]).to(dev)
        y = torch.cat([yr[ir], ys[isy]]).to(dev)
        model.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        p_nat = F.softmax(model(x), dim=1).detach()
        for _ in range(steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = kl_sum(F.log_softmax(model(x_adv), dim=1), p_nat)
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        opt.zero_grad()
        logits = model(x)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits, y) + 6.0 * F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        loss.backward()
        opt.step()
        decay = min(0.995, (1 + k) / (10 + k))
        with torch.no_grad():
            for pe, pm in zip(ema_model.parameters(), model.parameters()):
                pe.mul_(decay).add_(pm, alpha=1 - decay)
        return loss

    for k in range(cfg["updates"]):           # warm-up epoch, as for ours
        update(k + 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(cfg["updates"]):
        loss = update(cfg["updates"] + k + 1)
    float(loss)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"updates_per_s": cfg["updates"] / dt, "seconds_per_update": dt / cfg["updates"],
            "pgd_step_impl": "composite (eager)", "amp_bf16": False, "compiled": False}


def worker(which: str, config: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    dev = torch.device(cfg["device"])
    fn = run_ours if which == "ours" else run_reference
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        res = fn(cfg)
        res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
        res["mem_kind"] = "cuda.max_memory_allocated"
    else:
        from harness import peak_rss_growth

        box = {}
        res_peak = peak_rss_growth(lambda: box.setdefault("r", fn(cfg)))
        res = box["r"]
        res["peak_mem_bytes"] = int(res_peak)
        res["mem_kind"] = "peak RSS growth (sampled), whole run incl. data"
    print("RESULT " + json.dumps(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, args.threads)
        return 0

    import torch
    from harness import device_tag, machine_info, write_json

    torch.set_num_threads(args.threads)   # so machine_info records the workers' thread count
    cfg = CONFIGS[args.config]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print(f"--config {args.config} needs a CUDA GPU (WRN-28-10, batch 512, bf16); none is "
              "available here, nothing was measured.", file=sys.stderr)
        return 2
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    for which in ("reference", "ours"):
        proc = subprocess.run([sys.executable, __file__, "--worker", which, "--config",
                               args.config, "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        results[which] = json.loads(line[-1][len("RESULT "):])
    ours, ref = results["ours"], results["reference"]
    speedup = ours["updates_per_s"] / ref["updates_per_s"]
    mem_ratio = (ours["peak_mem_bytes"] / ref["peak_mem_bytes"]
                 if ref["peak_mem_bytes"] > 0 else float("nan"))
    tag = device_tag(cfg["device"])
    name = f"train-{tag}.json" if args.config in ("cpu", "cifar") else f"train-{args.config}.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    record = {"benchmark": "train_trades", "config": args.config, "settings": cfg,
              "threads": args.threads, "machine": machine_info(cfg["device"]),
              "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "results": results, "speedup_updates_per_s": speedup,
              "peak_mem_ratio_ours_over_ref": mem_ratio}
    write_json(out, record)
    print(f"TRADES training, config={args.config} ({cfg['model']}, batch {cfg['batch']}, "
          f"{cfg['steps']}-step attack), {args.threads} thread(s), {tag}")
    print(f"{'impl':<11} {'updates/s':>10} {'s/update':>9} {'peak MB':>9}  pgd_step")
    for name, r in (("reference", ref), ("ours", ours)):
        print(f"{name:<11} {r['updates_per_s']:>10.3f} {r['seconds_per_update']:>9.4f} "
              f"{r['peak_mem_bytes'] / 2**20:>9.1f}  {r['pgd_step_impl']}")
    print(f"ratio ours/reference: updates/s x{speedup:.2f}, peak memory x{mem_ratio:.2f}")
    print(f"wrote {out}")
    return 0 if math.isfinite(speedup) else 1


if __name__ == "__main__":
    sys.exit(main())
