"""Measurements behind the fidelity choices (the authors' loss form, their window, a head per
shard), on the bundled 8×8 digits models, CPU, minutes. Writes benchmarks/results/fidelity-cpu.json.

    python benchmarks/fidelity.py [--n 256] [--threads 1]

1. **Loss form.** At real sampler states (x_t, x_{t+1}) of plain-DDIM digit trajectories
   (B = 128, 50 uniform steps), the guidance gradient ∇_{x_t} of the anchor form (B anchors,
   negatives the other anchors, positive detached; this package's earlier form) against the
   authors' form (symmetric 2B-row HNM; keys InfoNCE), through the bundled classifier's
   features, no head: cosine and norm ratio per timestep. Also HNM (β = 1, τ⁺ = 0.1) against
   β = 0, τ⁺ = 0 at τ = 10 (what HNM does at the paper's temperature).
2. **Window.** n samples from the same x_T: plain DDIM and the authors' HNM (τ = 10, no head,
   λ = 2e4: twice the digits preset's 1e4 of the anchor form, the form factor of item 1) with
   guidance at every step, t >= 400 only (the authors' CIFAR window) and t < 400 only: the share
   of samples whose bundled-classifier label changes against DDIM, and the mean |Δx|.
3. **Head scope.** The authors keep one head for a whole run; the package keeps one per shard
   (resume and process count). Eight batches of 128 run through one guidance object with the
   head carried (run scope); the head after k = 0, 1, 3, 7 batches is then evaluated at the same
   probe state of the last batch: gradient cosine against the k = 7 head. And the samples of
   the last batch made with the head carried through 8 batches vs 2 batches (a shard of 256)
   vs 1 (reset per batch): label agreement and mean |Δx|.
Nothing here is tuned on adversarial accuracy; the numbers are reported as measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402

import cdp_fast  # noqa: E402
from cdp_fast.guidance import losses  # noqa: E402
from cdp_fast.models import digits  # noqa: E402
from cdp_fast.utils.seeding import generators, per_sample_randn  # noqa: E402

STEPS, B = 50, 128


def _setup():
    model = digits.load_digits_eps_model()
    feats = digits.digits_features()
    labeler = digits.digits_labeler()
    abar = cdp_fast.make_alphas_cumprod("linear", 1000)
    ts = cdp_fast.timesteps(1000, STEPS, "uniform")
    return model, feats, labeler, abar, ts


def _x_T(seed, n, start=0):
    return per_sample_randn(generators(seed, range(start, start + n)), digits.IMAGE_SHAPE, "cpu")


def _grad(loss_fn, feats, x_t, x_prev):
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        z = feats(x).float()
        w = feats(x_prev).float()
        return torch.autograd.grad(loss_fn(z, w), x)[0]


def _cos_ratio(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float(a.norm() / b.norm())


def loss_forms(model, feats, abar, ts, seed):
    """Item 1: per timestep, (cosine, ‖anchor‖/‖authors‖) for HNM τ=10 and InfoNCE τ=0.1."""
    states = []
    cdp_fast.guided_ddim(model, _x_T(seed, B), alphas_cumprod=abar, timesteps=ts,
                         callback=lambda d: states.append(d["x"].detach()))
    xs = [_x_T(seed, B)] + states                      # xs[k] is the state before step k
    rows = []
    for k in (2, 10, 20, 30, 40, 48):
        t = int(ts[k])
        x_t, x_prev = xs[k], xs[k - 1]
        h_auth = _grad(lambda z, w: losses.hnm_loss_symmetric(z, w, tau=10.0), feats, x_t, x_prev)
        h_anch = _grad(lambda z, w: losses.hnm_loss(z, w.detach(), tau=10.0), feats, x_t, x_prev)
        h_nce = _grad(lambda z, w: losses.hnm_loss_symmetric(z, w, tau=10.0, tau_plus=0.0, beta=0.0),
                      feats, x_t, x_prev)
        i_auth = _grad(lambda z, w: losses.infonce_loss_keys(z, w, tau=0.1), feats, x_t, x_prev)
        i_anch = _grad(lambda z, w: losses.infonce_loss(z, w.detach(), tau=0.1), feats, x_t, x_prev)
        hc, hr = _cos_ratio(h_anch, h_auth)
        ic, ir = _cos_ratio(i_anch, i_auth)
        bc, br = _cos_ratio(h_auth, h_nce)
        rows.append({"t": t, "hnm_cos": hc, "hnm_ratio_anchor_over_authors": hr, "infonce_cos": ic,
                     "infonce_ratio_anchor_over_authors": ir, "hnm_vs_beta0_taup0_cos": bc,
                     "hnm_vs_beta0_taup0_ratio": br})
    return rows


def _samples(model, feats, labeler, n, seed, **kw):
    s = cdp_fast.sample(model, n, features=feats, labeler=labeler, image_shape=digits.IMAGE_SHAPE,
                        steps=STEPS, skip="uniform", batch_size=B, output="float", seed=seed,
                        progress=False, compile=False, **kw)
    return np.asarray(s.images), np.asarray(s.labels)


def windows(model, feats, labeler, n, seed, lam):
    """Item 2: label changes vs plain DDIM for guidance at every step / t >= 400 / t < 400."""
    x0, y0 = _samples(model, feats, labeler, n, seed, loss=None)
    out = {}
    for name, window in (("every step", None), ("t >= 400 (authors' CIFAR)", (400, 999)),
                         ("t < 400", (0, 399))):
        x, y = _samples(model, feats, labeler, n, seed, loss="hnm", lam=lam, tau=10.0, embedding=None,
                        guide_window=window)
        out[name] = {"label_change_vs_ddim": float((y != y0).mean()),
                     "mean_abs_dx": float(np.abs(x - x0).mean())}
    return out


def head_scope(model, feats, labeler, abar, ts, seed, lam, batches=8):
    """Item 3: head carried through a run vs a shard vs a batch."""
    g = cdp_fast.ContrastiveGuidance(loss="hnm", lam=lam, tau=10.0, features=feats, embedding="mlp",
                                     seed=seed)
    snaps = {}
    probe = None
    for b in range(batches):
        g.reset(keep_head=b > 0)
        states = []
        cdp_fast.guided_ddim(model, _x_T(seed, B, start=b * B), alphas_cumprod=abar, timesteps=ts,
                             guidance=g, callback=lambda d: states.append(d["x"].detach()))
        snaps[b + 1] = (copy.deepcopy(g._head), copy.deepcopy(g._opt.state_dict()))
        if b == batches - 1:
            probe = (states[20], states[19])           # (x_t, x_{t+1}) of the last batch
    snaps[0] = None

    def grad_with(snap):
        h = cdp_fast.ContrastiveGuidance(loss="hnm", lam=1.0, tau=10.0, features=feats, embedding="mlp", seed=seed)
        h(probe[1], 999, probe[1], 0)                 # x_{t+1}: the unguided first step
        if snap is not None:
            h._head = copy.deepcopy(snap[0])
            h._opt = torch.optim.Adam(h._head.parameters(), lr=1e-2)
        return h(probe[0], 500, probe[0], 1)[0]

    ref = grad_with(snaps[batches])
    cos = {k: _cos_ratio(grad_with(snaps[k] if k else None), ref)[0] for k in (0, 1, 3, batches - 1)}
    n = batches * B
    kw = dict(loss="hnm", lam=lam, tau=10.0, embedding="mlp", guide_window=None)
    x_run, y_run = _samples(model, feats, labeler, n, seed, shard_size=n, **kw)
    x_sh, y_sh = _samples(model, feats, labeler, n, seed, shard_size=2 * B, **kw)
    x_b, y_b = _samples(model, feats, labeler, n, seed, shard_size=B, **kw)
    last = slice(n - B, n)
    return {"gradient_cosine_vs_head_after_8_batches": {f"after {k} batches": v for k, v in cos.items()},
            "last_batch_vs_run_scope": {
                "shard of 2 batches": {"label_agreement": float((y_sh[last] == y_run[last]).mean()),
                                       "mean_abs_dx": float(np.abs(x_sh[last] - x_run[last]).mean())},
                "reset every batch": {"label_agreement": float((y_b[last] == y_run[last]).mean()),
                                      "mean_abs_dx": float(np.abs(x_b[last] - x_run[last]).mean())}}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="samples per condition in item 2 (default 256)")
    ap.add_argument("--seed", type=int, default=1000, help="sampling seed (default 1000, outside the demo's)")
    ap.add_argument("--lam", type=float, default=2e4,
                    help="λ of the authors' form for items 2-3 (default 2e4 = 2 x the preset's 1e4)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fidelity-cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, feats, labeler, abar, ts = _setup()
    res = {"machine": harness.machine_info("cpu"), "config": vars(args) | {"steps": STEPS, "batch": B}}
    res["loss_forms"] = loss_forms(model, feats, abar, ts, args.seed)
    print("1. loss forms (anchor / authors), per t:")
    for r in res["loss_forms"]:
        print(f"   t={r['t']:4d}  HNM cos {r['hnm_cos']:.4f} ratio {r['hnm_ratio_anchor_over_authors']:.3f} | "
              f"InfoNCE cos {r['infonce_cos']:.4f} ratio {r['infonce_ratio_anchor_over_authors']:.3f} | "
              f"HNM vs beta0: cos {r['hnm_vs_beta0_taup0_cos']:.5f} ratio {r['hnm_vs_beta0_taup0_ratio']:.3f}")
    res["windows"] = windows(model, feats, labeler, args.n, args.seed, args.lam)
    print("2. windows (authors' HNM, no head): label change vs DDIM, mean |dx|")
    for k, v in res["windows"].items():
        print(f"   {k:28s} {100 * v['label_change_vs_ddim']:5.1f}%  {v['mean_abs_dx']:.4f}")
    res["head_scope"] = head_scope(model, feats, labeler, abar, ts, args.seed, args.lam)
    print("3. head scope:", json.dumps(res["head_scope"], indent=1))
    harness.write_json(Path(args.out), res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
