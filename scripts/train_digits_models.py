"""Reproduce the bundled digits models in ``cdp_fast/assets/`` (seeded, CPU, one thread).

    python scripts/train_digits_models.py                 # both models (~10 min, 1 thread)
    python scripts/train_digits_models.py --only classifier
    python scripts/train_digits_models.py --out /tmp/assets --eps-steps 200   # quick check

1. The classifier (:class:`cdp_fast.models.digits.DigitsClassifier`): cross-entropy, Adam
   lr 1e-3, batch 64, random ±1-pixel shifts, on the train split of
   :func:`cdp_fast.models.digits.load_digits_data`.
2. The ε-model (:class:`cdp_fast.models.unet.UNet`): the DDPM "simple" loss
   ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (Ho et al. 2020, Algorithm 1 / eq. (14)) with
   t ~ U{0..999}, linear β schedule, x_0 = 2x − 1; AdamW lr 2e-3 with 200 warm-up steps and
   cosine decay, batch 128, gradient clip 1.0; the shipped weights are the EMA (0.999).
3. A check: 256 DDIM samples (50 uniform steps, η = 0) classified by the new classifier;
   the mean confidence and class histogram go into ``digits_models.json``.

Weights are stored as fp16 state_dicts (written atomically: temp file, fsync, rename).
Results are bit-reproducible for a given torch build and thread count (we pin 1 thread).

To train an ε-model of your own, use :func:`cdp_fast.train_diffusion` (README, "Train your
own ε-model"). This script keeps its own loop on purpose: it must reproduce the shipped
weights, which came from it — updates drawn from one generator stream rather than per-epoch
permutations with per-sample keyed draws, a cosine learning-rate decay, no augmentation —
and ``train_diffusion`` would train (equally well, but) other weights.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdp_fast.ops.ddim import ddim_update_ref  # noqa: E402
from cdp_fast.models import digits  # noqa: E402
from cdp_fast.diffusion.schedule import make_alphas_cumprod, timesteps  # noqa: E402


def atomic_save(obj_bytes: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(obj_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_fp16(module: torch.nn.Module, path: Path) -> str:
    import io

    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_save(data, path)
    return hashlib.sha256(data).hexdigest()


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by dx, dy ∈ {-1, 0, 1} pixels (zero fill)."""
    padded = F.pad(x, (1, 1, 1, 1))
    d = torch.randint(0, 3, (x.shape[0], 2), generator=g)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        dy, dx = int(d[i, 0]), int(d[i, 1])
        out[i] = padded[i, :, dy:dy + 8, dx:dx + 8]
    return out


def train_classifier(args, log):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = digits.load_digits_data("train")
    xt, yt = digits.load_digits_data("test")
    model = digits.build_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = x.shape[0]
    for epoch in range(args.clf_epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, 64):
            idx = perm[i:i + 64]
            xb = random_shift(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        if (epoch + 1) % 10 == 0 or epoch == args.clf_epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(xt).argmax(1) == yt).float().mean().item()
            log(f"classifier epoch {epoch + 1}: train loss {total / n:.4f}, test acc {acc:.4f}")
    model.eval()
    # Accuracy of the fp16-stored weights (what users load).
    stored = copy.deepcopy(model).half().float()
    with torch.no_grad():
        acc = (stored(xt).argmax(1) == yt).float().mean().item()
        train_acc = (stored(x).argmax(1) == y).float().mean().item()
    sha = save_state_fp16(model, Path(args.out) / digits.CLASSIFIER_FILE)
    return {"epochs": args.clf_epochs, "test_accuracy": acc, "train_accuracy": train_acc, "sha256": sha,
            "params": sum(p.numel() for p in model.parameters())}


def train_eps(args, log):
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    x, _ = digits.load_digits_data("train")
    x0_all = digits.to_model_space(x)
    abar = make_alphas_cumprod("linear", 1000).to(torch.float32)
    model = digits.build_eps_model()
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = min(200, args.eps_steps // 10)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        prog = (step - warm) / max(1, args.eps_steps - warm)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))

    n = x0_all.shape[0]
    bs = args.batch_size
    t0 = time.time()
    run = 0.0
    perm = torch.randperm(n, generator=g)
    pos = 0
    for step in range(args.eps_steps):
        if pos + bs > n:
            perm = torch.randperm(n, generator=g)
            pos = 0
        idx = perm[pos:pos + bs]
        pos += bs
        x0 = x0_all[idx]
        t = torch.randint(0, 1000, (bs,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(xt, t), eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm, alpha=1 - d)
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 250 == 0 or step == args.eps_steps - 1:
            log(f"eps step {step + 1}/{args.eps_steps}: loss(ema of batches) {run:.4f}, "
                f"{time.time() - t0:.0f}s")
    sha = save_state_fp16(ema, Path(args.out) / digits.EPS_MODEL_FILE)
    return {"steps": args.eps_steps, "batch_size": bs, "lr": args.lr, "ema": args.ema,
            "final_loss": run, "seconds": time.time() - t0, "sha256": sha,
            "params": sum(p.numel() for p in model.parameters()), "config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in digits.EPS_MODEL_CONFIG.items()}}


@torch.no_grad()
def ddim_check(out_dir: Path, n: int = 256, steps: int = 50, seed: int = 0):
    """Unguided DDIM (η = 0) with the saved weights; classify the samples."""
    model = digits.load_digits_eps_model(path=out_dir / digits.EPS_MODEL_FILE)
    clf = digits.load_digits_classifier(path=out_dir / digits.CLASSIFIER_FILE)
    abar = make_alphas_cumprod("linear", 1000)
    ts = timesteps(1000, steps, "uniform").tolist()
    x = torch.randn(n, *digits.IMAGE_SHAPE, generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(ts):
        prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = model(x, torch.full((n,), t, dtype=torch.long))
        x, _ = ddim_update_ref(x, eps, None, lam=0.0, abar_t=float(abar[t]), abar_prev=prev, sigma=0.0)
    p = F.softmax(clf(digits.from_model_space(x)), dim=1)
    conf, pred = p.max(1)
    return {"n": n, "ddim_steps": steps, "mean_confidence": conf.mean().item(),
            "frac_confidence_gt_0.8": (conf > 0.8).float().mean().item(),
            "class_histogram": torch.bincount(pred, minlength=10).tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "cdp_fast" / "assets"), help="output folder")
    ap.add_argument("--only", choices=["eps", "classifier", "check"], default=None,
                    help="train just one model (or only run the sample check)")
    ap.add_argument("--eps-steps", type=int, default=3000, help="ε-model optimiser steps")
    ap.add_argument("--batch-size", type=int, default=128, help="ε-model batch size")
    ap.add_argument("--lr", type=float, default=2e-3, help="ε-model peak learning rate")
    ap.add_argument("--ema", type=float, default=0.999, help="ε-model EMA decay")
    ap.add_argument("--clf-epochs", type=int, default=40, help="classifier epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = reproducible)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    meta_path = out / digits.METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    def log(msg):
        print(msg, flush=True)

    if args.only in (None, "classifier"):
        meta["classifier"] = train_classifier(args, log)
        log(f"classifier: {meta['classifier']}")
    if args.only in (None, "eps"):
        meta["eps_model"] = train_eps(args, log)
        log(f"eps model: {meta['eps_model']}")
    if (out / digits.EPS_MODEL_FILE).is_file() and (out / digits.CLASSIFIER_FILE).is_file():
        meta["check"] = ddim_check(out)
        log(f"check: {meta['check']}")
    meta["torch"] = torch.__version__
    meta["threads"] = args.threads
    meta["seed"] = args.seed
    meta["data"] = {"source": "sklearn.datasets.load_digits", "split": "train (1347 images)",
                    "space": "x/16*2-1 in [-1, 1], (1, 8, 8)"}
    atomic_save((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(), meta_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
