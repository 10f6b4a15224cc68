"""The `cdp-fast` command (also `python -m cdp_fast`): one entry point, eight subcommands.

It holds the argument grammar (one ``_add_<name>`` per subcommand), the subcommands
(``cmd_<name>``: call the library, print) and the exit-status mapping (:func:`main`); what a
flag's value names (a model, a network, data) is resolved in :mod:`cdp_fast.cli.specs`. Over ~400
lines on purpose: the ~90 flags, each with its help text, stay in the file of the code that
reads them, so a flag and its use change together.

    cdp-fast demo                                   # the embedded digits experiment
    cdp-fast sample --model digits -n 512 --loss hnm --out gen/ --grid grid.png
    cdp-fast label gen/ --classifier digits --out labelled.npz
    cdp-fast select labelled.npz --k-per-class 50 --out selected.npz
    cdp-fast train --arch small-cnn --data digits --synthetic selected.npz --eps 0.1 --out clf.pt
    cdp-fast eval --arch small-cnn --weights clf.pt --data digits --eps 0.1
    cdp-fast inspect gen_cdp/ --against gen_ddim/ --json inspect.json --figure inspect.png
    cdp-fast bench [throughput.py options]          # source checkout only

Models (``--model``, ``--features``, ``--labeler``, ``--classifier``) are named as a bundled
name (``digits``), a local diffusers folder (``UNet2DModel.from_pretrained(path,
local_files_only=True)``; a pipeline folder with ``unet/`` and ``scheduler/`` also gives the
noise schedule), or ``module:factory`` (a callable returning the model; ``module:attr`` may
also name a ready nn.Module).

``inspect`` measures whether generated samples are better training data before training on them
(:mod:`cdp_fast.metrics`: class separation in an independent feature space, precision / recall /
density / coverage, class balance, agreement with an independent classifier, a linear probe,
memorisation, and the paired comparison with ``--against``).

``bench`` runs ``benchmarks/throughput.py`` from the source checkout this package was
installed from (``pip install -e .``); the benchmarks are not part of the installed package,
so elsewhere it exits with status 2 and says so.

Errors in arguments print one line on stderr and exit with status 2 (argparse's own errors
included); a missing optional dependency exits with status 1 and names the extra to install.
Only this module prints; the library reports through ``progress=`` / ``callback=``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cdp_fast.cli import specs
# re-exported: the spec loaders were public names of this module before cdp_fast.cli.specs existed
from cdp_fast.cli.specs import load_callable_spec, load_model_spec

__all__ = ["main", "build_parser", "load_model_spec", "load_callable_spec"]

PROG = "cdp-fast"


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


# ----------------------------------------------------------------------------- flag values
def _dtype(name):
    import torch

    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _compile_flag(v):
    return {"auto": "auto", "true": True, "false": False}[v]


# ----------------------------------------------------------------------------- subcommands
def _check_outputs(a, image_shape):
    """sample's output options, checked before any work: --out not empty, --grid only for
    uint8 (C, H, W) images, --npz / --grid into an existing writable folder."""
    import os

    if a.out is not None and not a.out.strip():
        raise ValueError("out: an empty path; give a directory or leave --out out (samples in memory)")
    if a.grid and (a.output != "uint8" or len(image_shape) != 3):
        raise ValueError("grid: needs --output uint8 and 3-D images (C, H, W)")
    for flag, value in (("npz", a.npz), ("grid", a.grid)):
        if value:
            folder = Path(value).resolve().parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise ValueError(f"{flag}: cannot write {value}: {folder} is not a writable folder")


def _guide_window(values, preset):
    """--guide-window: auto (the preset's, else the library's "auto"), all (None), or T_LO T_HI."""
    if values == ["auto"]:
        return preset.get("guide_window", "auto")
    if values == ["all"]:
        return None
    try:
        lo, hi = (int(v) for v in values)
    except ValueError:
        raise ValueError(f"guide-window: {' '.join(values)!r} is not auto, all or two ints T_LO T_HI") from None
    return (lo, hi)


def cmd_sample(a):
    import numpy as np

    import cdp_fast
    from cdp_fast.demo import save_grid_png

    model, info = specs.load_model_spec(a.model, a.device)
    image_shape = specs.parse_shape(a.image_shape) if a.image_shape else info.get("image_shape")
    if image_shape is None:
        raise ValueError("image-shape: required for a module:factory model (e.g. --image-shape 3,32,32)")
    _check_outputs(a, image_shape)      # before sampling: a bad output option must not cost the run
    loss = None if a.loss == "none" else a.loss
    samp = dict(info.get("sampling") or {})
    g = dict((info.get("guidance") or {}).get(loss, {})) if loss else {}
    # "auto" flags take the bundled model's preset where it has one (the digits preset pins the
    # setting it was tuned in), else the library's defaults (the authors' choices)
    embedding = {"none": None, "mlp": "mlp"}.get(a.embedding, g.get("embedding", "auto"))
    form = a.form if a.form != "auto" else g.get("form")
    kw = dict(
        loss=loss, embedding=embedding, form=form, guide_window=_guide_window(a.guide_window, g),
        solver=a.solver, clip_x0={"auto": None, "true": True, "false": False}[a.clip_x0],
        lam=a.lam if a.lam is not None else g.get("lam"),
        tau=a.tau if a.tau is not None else g.get("tau"),
        tau_plus=a.tau_plus, beta=a.beta, positive=a.positive, negatives=a.negatives,
        num_classes=a.num_classes if a.num_classes is not None else info.get("num_classes"),
        class_labels=specs.load_class_labels(a.class_labels),
        steps=a.steps if a.steps is not None else samp.get("steps", 200), nfe=a.nfe,
        skip=a.skip if a.skip is not None else samp.get("skip", "quadratic"),
        eta=a.eta, image_shape=image_shape,
        batch_size=a.batch_size if a.batch_size is not None else samp.get("batch_size", 512),
        output=a.output, seed=a.seed, device=a.device, dtype=_dtype(a.dtype),
        compile=_compile_flag(a.compile), progress=not a.no_progress,
    )
    if info.get("alphas_cumprod") is not None and a.betas is None:
        kw["alphas_cumprod"] = info["alphas_cumprod"]
    else:
        kw.update(T=a.T, betas=a.betas or "linear")
    if loss is not None:
        kw["features"] = specs.load_features(a.features, info, a.device)
        kw["real"] = specs.load_real_images(a.real, image_shape)
    labeler = specs.load_labeler(a.labeler, info, a.device)
    s = cdp_fast.sample(model, a.n, labeler=labeler, out=a.out, **kw)
    from cdp_fast.utils import distributed as cdist

    if not cdist.is_main():  # under torchrun: rank 0 reports and writes the extras
        return 0
    where = a.out or "memory"
    print(f"{len(s)} samples ({'guided: ' + loss if loss else 'unguided DDIM'}) -> {where}")
    tp = s.meta.get("throughput")
    if tp:
        print(f"throughput: {sum(t['images_per_s'] for t in tp):.1f} images/s total over {len(tp)} "
              "process(es); per rank: " + ", ".join(f"{t['rank']}: {t['images_per_s']:.1f}" for t in tp))
    if a.npz:
        s.save_npz(a.npz)
        print(f"wrote {a.npz}")
    if a.grid:
        k = min(64, a.n)
        imgs = np.asarray(s.images[:k])
        if loss is not None:
            # the unguided counterparts from the same x_T (same seed => same x_T for sample i),
            # as the paper's Figure 5: left block DDIM, right block Contrastive-DP
            base = {k2: v for k2, v in kw.items() if k2 not in ("features", "real", "loss", "embedding", "form",
                                                                  "guide_window", "lam", "tau")}
            base.update(loss=None, progress=False)
            u = np.asarray(cdp_fast.sample(model, k, **base).images[:k])
            sep = np.full((1,) + imgs.shape[1:], 255, np.uint8)
            imgs = np.concatenate([np.concatenate([u[i:i + 8], sep, imgs[i:i + 8]]) for i in range(0, k, 8)])
            save_grid_png(a.grid, imgs, nrow=17 if k >= 8 else 2 * k + 1, scale=4 if image_shape[-1] <= 16 else 1)
            print(f"wrote {a.grid} (each row: 8 DDIM | 8 Contrastive-DP from the same x_T)")
        else:
            save_grid_png(a.grid, imgs, nrow=8, scale=4 if image_shape[-1] <= 16 else 1)
            print(f"wrote {a.grid}")
    return 0


def cmd_label(a):
    import numpy as np

    from cdp_fast import label
    from cdp_fast.data import Samples

    s = specs.load_samples(a.samples)
    clf = specs.load_classifier(a.classifier, a.device)
    res = label.pseudo_label(clf, s, device=a.device, progress=not a.no_progress)
    labelled = Samples(np.asarray(s.images[:]), np.asarray(res["label"], dtype=np.int64),
                       np.asarray(res["confidence"], dtype=np.float32))
    labelled.save_npz(a.out)
    hist = np.bincount(labelled.labels).tolist()
    print(f"labelled {len(labelled)} samples -> {a.out}; class histogram {hist}")
    return 0


def cmd_select(a):
    import numpy as np

    from cdp_fast import label

    s = specs.load_samples(a.samples)
    clf = specs.load_classifier(a.classifier, a.device) if a.classifier != "none" else None
    out = label.select(s, a.criterion, a.k_per_class, classifier=clf, device=a.device)
    idx, chosen = out if isinstance(out, tuple) else (out, s.subset(np.asarray(out, dtype=np.int64)))
    chosen.save_npz(a.out)
    print(f"selected {len(idx)} of {len(s)} samples ({a.criterion}, {a.k_per_class} per class) -> {a.out}")
    return 0


def _save_state(model, path):
    import torch

    from cdp_fast.data import atomic_write

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def cmd_train(a):
    import cdp_fast

    model = specs.build_classifier(a.arch, a.num_classes)
    data = specs.load_train_data(a.data, "train")
    # pad / flip / label smoothing left as None: the library fits them to the images and the recipe
    trained = cdp_fast.train_trades(
        model, data, synthetic=a.synthetic, real_fraction=a.real_fraction, epochs=a.epochs, eps=a.eps,
        step_size=a.step_size if a.step_size is not None else 2.5 * a.eps / max(1, a.steps),
        steps=a.steps, beta=a.beta, batch_size=a.batch_size, ema=None if a.ema == 0 else a.ema,
        lr=a.lr, warmup_epochs=a.warmup_epochs, pad=a.pad, flip=a.flip,
        label_smoothing=a.label_smoothing, recipe=a.recipe, seed=a.seed, device=a.device,
        checkpoint=a.checkpoint, progress=not a.no_progress, sync_bn=a.sync_bn)
    from cdp_fast.utils import distributed as cdist

    if cdist.is_main():  # under torchrun every rank holds the same weights; rank 0 writes
        _save_state(trained, a.out)
        print(f"trained {a.arch} ({a.epochs} epochs, TRADES eps={a.eps:g}) -> {a.out}")
        tp = getattr(trained, "throughput", None)
        if tp:
            print(f"throughput: {sum(t['images_per_s'] for t in tp):.1f} images/s total over {len(tp)} "
                  "process(es); per rank: " + ", ".join(f"{t['rank']}: {t['images_per_s']:.1f}" for t in tp))
    return 0


def _load_weights(model, path, arch):
    """--weights: a state_dict saved by `cdp-fast train` into ``model``; ValueError naming the
    file when it cannot be read, holds pickled objects (never loaded: see
    :func:`cdp_fast.robust.loop.read_weights_only`), is not a state_dict or does not fit ``arch``."""
    from cdp_fast.robust.loop import read_weights_only

    if not Path(path).is_file():
        raise ValueError(f"weights: {path} does not exist")
    expected = "a state_dict saved by `cdp-fast train` (weights only)"
    state = read_weights_only(path, "weights:", expected)
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} is not {expected}: it holds a {type(state).__name__}")
    if "version" in state and "model" in state and "optimizer" in state:
        raise ValueError(f"weights: {path} is a training checkpoint (--checkpoint), not {expected} "
                         "(--out of `cdp-fast train`)")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"weights: {path} does not fit --arch {arch} ({why[:300]})") from None


def cmd_eval(a):
    import cdp_fast

    model = specs.build_classifier(a.arch, a.num_classes, trained_digits=not a.weights)
    if a.weights:
        _load_weights(model, a.weights, a.arch)
    elif a.arch != "digits":
        raise ValueError("weights: required (a state_dict saved by `cdp-fast train`)")
    x, y = specs.load_train_data(a.data, "test")
    if a.n is not None:
        x, y = x[:a.n], y[:a.n]
    attacks = tuple(v.strip() for v in a.attacks.split(",") if v.strip())
    model = model.to(a.device or "cpu").eval()
    res = cdp_fast.evaluate(model, x.to(a.device or "cpu"), y.to(a.device or "cpu"), eps=a.eps, attacks=attacks,
                            progress=not a.no_progress)
    from cdp_fast.utils import distributed as cdist

    if not cdist.is_main():
        return 0
    for k, v in res.items():
        if isinstance(v, float):
            print(f"{k:<12} {100 * v:6.2f}%")
    if a.json:
        from cdp_fast.data import atomic_write_bytes

        atomic_write_bytes(Path(a.json), (json.dumps(res, indent=2, default=float) + "\n").encode())
    return 0


def cmd_demo(a):
    from cdp_fast.demo import run_demo

    def csv(text):
        return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())

    if a.threads is not None:
        if a.threads < 1:
            raise UsageError(f"{PROG}: demo: --threads must be >= 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    k = a.k
    if a.real_n is not None:
        if a.k is not None:
            raise UsageError(f"{PROG}: demo: give --k or --real-n, not both")
        k = max(1, a.real_n // 10)
    try:
        lams = None if a.lams is None else tuple(float(v) for v in csv(a.lams))
    except ValueError:
        raise UsageError(f"{PROG}: demo: --lams must be a comma list of numbers, got {a.lams!r}") from None

    def cb(ev):
        st = ev["stage"]
        if st == "setup":
            n = ev["networks"]
            print(f"  labeler (CE on the k real): test acc {100 * n['labeler']['test_accuracy']:.1f}%; guidance net "
                  f"(TRADES on the k real): clean {100 * n['guidance']['test_clean']:.1f}%, PGD-20 "
                  f"{100 * n['guidance']['test_pgd20']:.1f}%", flush=True)
        elif st == "sweep":
            r = ev["row"]
            print(f"  sweep {r['kind']:<9} lambda {r['lam']:g}: Fisher {r['fisher_ratio']:.3f}, precision "
                  f"{r.get('precision', float('nan')):.3f}, label flips vs DDIM {r.get('label_flip_rate', 0):.3f}",
                  flush=True)
        elif st == "lambda":
            print("  lambda chosen: " + ", ".join(f"{k} {v['lam']:g}" for k, v in ev["choice"].items()), flush=True)
        elif st == "generated":
            print(f"  seed {ev['seed']}: synthetic sets generated", flush=True)
        elif st == "trained":
            r = "  ".join(f"{k} {100 * v:.1f}%" for k, v in ev["result"].items())
            print(f"  {ev['arm']:<15} seed {ev['seed']}: {r}", flush=True)

    seeds = None if a.seeds is None else list(range(a.seeds))
    parts = "the Gaussian chain" if a.gaussian else "scarce real digits: real / +DDIM / +CDP / +CDP-class / syn-only"
    print(f"cdp-fast demo: {parts}", flush=True)
    res = run_demo(out=a.out, full=a.full, seeds=seeds, k_per_class=k, n_synthetic=a.n_synthetic, epochs=a.epochs,
                   updates_per_epoch=a.updates_per_epoch, eps=a.eps, attacks=csv(a.attacks), test_n=a.test_n,
                   aa_n=a.aa_n,
                   arms=csv(a.arms) or None, lams=lams, metrics=not a.no_metrics, digits=not a.gaussian,
                   gaussian=not a.no_gaussian, gaussian_seeds=a.gaussian_seeds, device=a.device,
                   progress=not a.no_progress, callback=cb)
    for key in ("sweep_table", "table", "metrics_table", "gaussian_table"):
        if res.get(key):
            print()
            print(res[key])
    print(f"\n({res['timing_s']['total']:.0f} s; results in {a.out}/)")
    return 0


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def cmd_inspect(a):
    from cdp_fast import metrics

    if a.k < 1 or a.probe_eps < 0 or (a.n is not None and a.n < 1):
        raise ValueError("inspect: --k and --n must be >= 1 and --probe-eps >= 0")
    s = specs.load_samples(a.samples)
    other = specs.load_samples(a.against) if a.against else None
    train, test = specs.load_real_splits(a.real)
    features, fdesc = specs.load_inspect_features(a.features, a.device)
    clf, cdesc = specs.load_independent_classifier(a.classifier, train, a.device)
    rep = metrics.report(s, real=train, test=test, against=other, features=features, classifier=clf,
                         k=a.k, probe_eps=a.probe_eps, max_samples=a.n)
    setup = rep["setup"]
    setup["features"] = fdesc or setup["features"]
    setup["classifier"] = cdesc
    print(f"features:   {setup['features']}")
    print(f"classifier: {cdesc or 'none'}")
    print(f"real:       {a.real} ({setup['real_train_n']} train, "
          f"{setup['real_test_n'] if test is not None else 'no'} test{'' if test is not None else ': no probe'})")
    names = ["samples"] + (["against"] if other is not None else [])
    rows = metrics.table_rows(rep)
    w = max(len(r[0]) for r in rows) + 2
    print(f"{'metric':<{w}}" + "".join(f"{n:>12}" for n in names) + f"{'real':>12}")
    for label, vals, ref in rows:
        print(f"{label:<{w}}" + "".join(f"{_fmt(v):>12}" for v in vals)
              + ("" if len(vals) < len(names) else f"{_fmt(ref):>12}"))
    if a.json:
        from cdp_fast.data import atomic_write_json

        atomic_write_json(Path(a.json), rep)
        print(f"wrote {a.json}")
    if a.figure:
        metrics.figure(a.figure, rep, s, real=train, against=other, features=features, max_samples=a.n)
        print(f"wrote {a.figure}")
    return 0


def cmd_bench(a):
    """Run the checkout's benchmarks/throughput.py (it is not part of the installed package: it
    imports its sibling benchmark modules and yardsticks such as diffusers' loop)."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "throughput.py"
    if not script.is_file():
        raise ValueError(f"bench: needs a source checkout: {script} does not exist (the benchmarks are not "
                         "installed with the package; clone the repository and pip install -e . there)")
    spec = importlib.util.spec_from_file_location("cdp_fast_throughput", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = [v for v in a.bench_args if v != "--"]
    try:
        return mod.main(args, prog=f"{PROG} bench")
    except SystemExit as e:  # argparse inside the benchmark: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2


# ----------------------------------------------------------------------------- parser
def _add_sample(sub):
    s = sub.add_parser("sample", help="generate (guided) DDIM samples",
                       description="Generate Contrastive-DP / DDIM samples (cdp_fast.sample). Options with "
                                   "'default: per model' take the bundled model's tuned value for --model "
                                   "digits, else the library default.")
    s.add_argument("--model", default="digits",
                   help="eps-model: 'digits' (bundled), a diffusers folder, or module:factory (default: digits)")
    s.add_argument("-n", "--n", type=int, default=64, help="number of samples (default: 64)")
    _add_guidance_flags(s)
    _add_ddim_flags(s)
    _add_sample_output_flags(s)
    s.set_defaults(func=cmd_sample)


def _add_guidance_flags(s):
    """sample: the contrastive loss, its networks and its data."""
    s.add_argument("--loss", choices=("none", "infonce", "hnm"), default="hnm",
                   help="contrastive loss; none = plain DDIM (default: hnm)")
    s.add_argument("--features", default="auto",
                   help="feature extractor f for the loss: auto (the bundled model's, else pixels), pixels, "
                        "digits, or module:factory; f takes x in [-1, 1] (default: auto)")
    s.add_argument("--embedding", choices=("auto", "none", "mlp"), default="auto",
                   help="'mlp': online 2-layer head on f trained by the loss; auto = the model preset's, "
                        "else the head for hnm and none for infonce (the authors') (default: auto)")
    s.add_argument("--form", choices=("auto", "authors", "anchors"), default="auto",
                   help="loss form: the authors' (symmetric 2B-row HNM / keys InfoNCE, what the paper's "
                        "lambda means) or this package's earlier anchor form (~2x the gradient); auto = "
                        "the model preset's, else the authors' (default: auto)")
    s.add_argument("--guide-window", nargs="+", metavar="T", default=["auto"],
                   help="'auto' (the model preset's, else the authors' t >= 0.4 T), 'all' (every step, "
                        "Algorithm 1), or T_LO T_HI: guide only when T_LO <= t <= T_HI (default: auto)")
    s.add_argument("--lam", type=float, default=None, help="guidance strength lambda (default: per model/loss)")
    s.add_argument("--tau", type=float, default=None, help="temperature tau (default: per model/loss)")
    s.add_argument("--tau-plus", type=float, default=0.1, help="HNM class prior tau+ in [0, 1) (default: 0.1)")
    s.add_argument("--beta", type=float, default=1.0, help="HNM concentration beta >= 0 (default: 1.0)")
    s.add_argument("--positive", choices=("previous", "real"), default="previous",
                   help="positive pair: x_{t+1} of the same sample, or a real image (default: previous)")
    s.add_argument("--negatives", choices=("batch", "real", "class"), default="batch",
                   help="negatives: other batch samples, the real bank, or other-class samples (default: batch)")
    s.add_argument("--real", default=None,
                   help="real images for the 'real' modes: 'digits' or an npz / out folder (default: none)")
    s.add_argument("--num-classes", type=int, default=None,
                   help="class-conditional model: number of classes (default: from the model, else none)")
    s.add_argument("--class-labels", default=None,
                   help="per-sample classes: a .npy / labelled .npz file or a comma list (default: none)")
    s.add_argument("--labeler", default="auto",
                   help="pseudo-labeller: auto (the bundled model's classifier, else none), none, digits, or "
                        "module:factory taking x in [-1, 1] (default: auto)")


def _add_ddim_flags(s):
    """sample: the DDIM sampler and the noise schedule."""
    s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: per model; library 200)")
    s.add_argument("--skip", choices=("uniform", "quadratic"), default=None,
                   help="timestep sub-sequence (default: per model; library quadratic)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default: 0)")
    s.add_argument("--solver", choices=("ddim", "ddpm", "dpmpp_2m", "heun"), default="ddim",
                   help="ddim (the paper's), ddpm (ancestral, the revised paper's DDPM rows), dpmpp_2m "
                        "(DPM-Solver++(2M)) or heun (EDM, Karras sigmas; the model must take float "
                        "timesteps) (default: ddim)")
    s.add_argument("--nfe", type=int, default=None,
                   help="network evaluations per sample; sets --steps (heun: odd, 2*steps-1) (default: from --steps)")
    s.add_argument("--clip-x0", choices=("auto", "true", "false"), default="auto",
                   help="clip the x0-prediction to [-1, 1] in the DDPM step; auto = on for ddpm, off for "
                        "ddim (default: auto)")
    s.add_argument("--T", type=int, default=1000, help="training diffusion steps T (default: 1000)")
    s.add_argument("--betas", choices=("linear", "cosine"), default=None,
                   help="noise schedule (default: linear, or the diffusers folder's scheduler)")
    s.add_argument("--image-shape", default=None,
                   help="per-sample shape C,H,W (default: from the model; required for module:factory)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="batch size = contrastive batch m (default: per model; library 512)")


def _add_sample_output_flags(s):
    """sample: where the samples go, seed, device and precision."""
    s.add_argument("--out", default=None, help="directory for shards + manifest (resumable); default: in memory")
    s.add_argument("--npz", default=None, help="also write all samples to this npz (image uint8 NHWC, label)")
    s.add_argument("--grid", default=None,
                   help="write a PNG grid of the first 64 samples; when guided, beside the unguided DDIM "
                        "samples from the same starting noise")
    s.add_argument("--output", choices=("uint8", "float"), default="uint8",
                   help="uint8 NHWC images or float model-space arrays (default: uint8)")
    s.add_argument("--seed", type=int, default=0, help="run seed; sample i depends on (seed, i) (default: 0)")
    s.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda (default: the model's)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype for the networks (default: float32)")
    s.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile the eps-model: auto = on CUDA only (default: auto)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_label(sub):
    lab = sub.add_parser("label", help="pseudo-label samples with a classifier",
                         description="Pseudo-label generated samples (cdp_fast.label.pseudo_label).")
    lab.add_argument("samples", help="an out folder of `cdp-fast sample` or an npz")
    lab.add_argument("--classifier", default="digits",
                     help="classifier on [0, 1] images: 'digits' (bundled) or module:factory (default: digits)")
    lab.add_argument("--out", required=True, help="output npz (image, label, confidence)")
    lab.add_argument("--device", default=None, help="torch device (default: cpu)")
    lab.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab.set_defaults(func=cmd_label)


def _add_select(sub):
    sel = sub.add_parser("select", help="keep the best k samples per class",
                         description="Select k samples per pseudo-class (cdp_fast.label.select).")
    sel.add_argument("samples", help="a labelled npz or out folder")
    sel.add_argument("--criterion", default="confidence",
                     choices=("entropy", "confidence", "grad_norm", "robust_grad_norm", "separability"),
                     help="score ranking the samples within each class (cdp_fast.label.select) "
                          "(default: confidence)")
    sel.add_argument("--k-per-class", type=int, required=True, help="samples kept per class")
    sel.add_argument("--classifier", default="digits",
                     help="classifier on [0, 1] images scoring the samples: digits, module:factory, or none "
                          "(separability with stored labels only) (default: digits)")
    sel.add_argument("--out", required=True, help="output npz")
    sel.add_argument("--device", default=None, help="torch device (default: cpu)")
    sel.set_defaults(func=cmd_select)


def _add_train(sub):
    tr = sub.add_parser("train", help="TRADES adversarial training on real + synthetic data",
                        description="TRADES adversarial training (cdp_fast.train_trades).")
    tr.add_argument("--arch", default="small-cnn",
                    help="classifier: a cdp_fast.models name (small-cnn, preact-resnet18, wrn-28-10-swish), "
                         "digits (the bundled classifier's architecture) or module:factory (default: small-cnn)")
    tr.add_argument("--num-classes", type=int, default=10, help="number of classes (default: 10)")
    tr.add_argument("--data", default="digits",
                    help="real training data: 'digits' (bundled train split), 'cifar10:FOLDER' (local CIFAR-10 "
                         "batches) or an npz (default: digits)")
    tr.add_argument("--synthetic", default=None, help="synthetic data: npz or out folder (default: none)")
    tr.add_argument("--real-fraction", type=float, default=0.3,
                    help="share of real images per batch when --synthetic is given (default: 0.3)")
    tr.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    tr.add_argument("--eps", type=float, default=0.1, help="L-inf radius on [0, 1] pixels (default: 0.1)")
    tr.add_argument("--step-size", type=float, default=None, help="PGD step size (default: 2.5 eps / steps)")
    tr.add_argument("--steps", type=int, default=10, help="PGD steps (default: 10)")
    tr.add_argument("--beta", type=float, default=6.0, help="TRADES beta (default: 6)")
    tr.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    tr.add_argument("--ema", type=float, default=0.995, help="EMA decay, 0 = off (default: 0.995)")
    tr.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    tr.add_argument("--warmup-epochs", type=int, default=1,
                    help="linear learning-rate warm-up in epochs (default: 1)")
    tr.add_argument("--recipe", choices=("gowal", "zhang"), default="gowal",
                    help="'gowal': the paper's trainer (Gowal et al. 2021, gowal21uncovering/utils/trades.py + "
                         "watrain.py: uniform attack start, train-mode BatchNorm with frozen statistics in the attack, "
                         "label smoothing 0.1, EMA copied for the first 2.5%% of updates, EMA BatchNorm statistics "
                         "copied from the model each epoch); 'zhang': Zhang et al.'s trades.py attack (x + 0.001 "
                         "N(0, I) start, eval mode), no label smoothing, EMA ramp from the first update with "
                         "averaged BatchNorm statistics (this tool's behaviour before --recipe) (default: gowal)")
    tr.add_argument("--label-smoothing", type=float, default=None,
                    help="label smoothing on the clean cross-entropy (default: the recipe's, 0.1 gowal / 0 zhang)")
    tr.add_argument("--pad", type=int, default=None,
                    help="random-crop padding (default: min(H, W)/8 rounded, at least 1: 1 at 8x8, 4 at 32x32)")
    tr.add_argument("--sync-bn", action="store_true",
                    help="SyncBatchNorm across torchrun processes (CUDA/nccl only)")
    flips = tr.add_mutually_exclusive_group()
    flips.add_argument("--flip", dest="flip", action="store_const", const=True, default=None,
                       help="horizontal flips (default: only for 3-channel images, never for 1-channel digits)")
    flips.add_argument("--no-flip", dest="flip", action="store_const", const=False,
                       help="no horizontal flips (use for 3-channel signs or text)")
    tr.add_argument("--checkpoint", default=None, help="resumable checkpoint path (default: none)")
    tr.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    tr.add_argument("--device", default=None, help="torch device (default: cpu)")
    tr.add_argument("--out", required=True, help="where to write the trained state_dict (.pt)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)


def _add_eval(sub):
    ev = sub.add_parser("eval", help="clean / PGD / AutoAttack accuracy",
                        description="Evaluate a classifier (cdp_fast.evaluate); inputs in [0, 1].")
    ev.add_argument("--arch", default="small-cnn",
                    help="classifier architecture (as for train) or module:factory; 'digits' without "
                         "--weights evaluates the bundled digits classifier (default: small-cnn)")
    ev.add_argument("--num-classes", type=int, default=10, help="number of classes (default: 10)")
    ev.add_argument("--weights", default=None, help="state_dict saved by `cdp-fast train`")
    ev.add_argument("--data", default="digits",
                    help="test data: 'digits' (bundled test split), 'cifar10:FOLDER' (its test batch) or a "
                         "labelled npz (default: digits)")
    ev.add_argument("--n", type=int, default=None, help="evaluate on the first N test images (default: all)")
    ev.add_argument("--eps", type=float, default=0.1, help="L-inf radius (default: 0.1)")
    ev.add_argument("--attacks", default="clean,pgd,autoattack",
                    help="comma list of clean, pgd, autoattack (default: all three)")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--device", default=None, help="torch device (default: cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)


def _add_demo(sub):
    de = sub.add_parser("demo", help="the embedded experiment: scarce real digits + synthetic (DDIM vs Contrastive-DP)",
                        description="Test the paper's scarce-real-data claim (its MNIST Figure 3) in miniature on "
                                    "scikit-learn's 8x8 digits (cdp_fast.demo.run_demo): k real digits per class, "
                                    "synthetic sets from the bundled epsilon-model (trained on the whole training "
                                    "split: stated leakage, equal for every synthetic arm), lambda chosen once by an "
                                    "independent data metric, arms real / real+ddim / real+cdp / real+cdp-class / "
                                    "syn-only TRADES-trained per paired seed, paired differences to real+ddim with "
                                    "95% CIs; then the section-3 Gaussian chain. Prints the tables, writes "
                                    "results.json, results.png and sample grids. Default: about 7.5 min on 2 idle "
                                    "cores; --full is longer.")
    de.add_argument("--full", action="store_true",
                    help="longer run: 10 seeds, 2048 synthetic per set, 800 updates, 10-step TRADES PGD, standard "
                         "AutoAttack on all test digits, 50 Gaussian seeds")
    de.add_argument("--seeds", type=int, default=None, help="number of paired seeds 0..N-1 (default: 5; --full 10)")
    de.add_argument("--k", type=int, default=None, help="real training digits per class (default: 10)")
    de.add_argument("--real-n", type=int, default=None, help="real training digits in all: --k = N // 10")
    de.add_argument("--n-synthetic", type=int, default=None,
                    help="images per synthetic set (default: 512; --full 2048)")
    de.add_argument("--epochs", type=int, default=None,
                    help="training epochs of --updates-per-epoch updates, the same for every arm; the test curve is "
                         "taken at every epoch end (default: 8; --full 16)")
    de.add_argument("--updates-per-epoch", type=int, default=None, help="updates per epoch (default: 50)")
    de.add_argument("--eps", type=float, default=None, help="L-inf radius on [0, 1] pixels (default: 0.1)")
    de.add_argument("--attacks", default=None, help="comma list of clean, pgd, autoattack (default: all three)")
    de.add_argument("--aa-n", type=int, default=None,
                    help="AutoAttack (APGD-CE + APGD-T) on the first N test digits only (default: 150; 0 = all; "
                         "--full: all, standard AutoAttack)")
    de.add_argument("--test-n", type=int, default=None, help="first N test digits only (default: all 450)")
    de.add_argument("--arms", "--conditions", dest="arms", default=None,
                    help="comma list of the arms: real, real+ddim, real+cdp, real+cdp-class, syn-only (default: "
                         "all; real+ddim, the reference, always runs)")
    de.add_argument("--lams", default=None, help="the lambda grid of the selection rule (default: 5e3,1e4,2e4,4e4)")
    gx = de.add_mutually_exclusive_group()
    gx.add_argument("--gaussian", action="store_true", help="run only the Gaussian chain (seconds)")
    gx.add_argument("--no-gaussian", action="store_true", help="skip the Gaussian chain")
    de.add_argument("--gaussian-seeds", type=int, default=None, help="seeds of the Gaussian chain (default: 20)")
    de.add_argument("--no-metrics", action="store_true", help="skip the section-1 metrics of the synthetic sets")
    de.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is faster on a CPU other jobs share)")
    de.add_argument("--out", default="cdp_demo", help="output folder (default: cdp_demo)")
    de.add_argument("--device", default=None, help="torch device (default: cpu)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_demo)


def _add_inspect(sub):
    ins = sub.add_parser("inspect", help="are these samples better training data? (cdp_fast.metrics)",
                         description="Measure generated samples before training on them (cdp_fast.metrics.report): "
                                     "class separation (Fisher ratio, the paper's effective c) in an independent "
                                     "feature space, precision/recall/density/coverage against the real data, class "
                                     "balance, agreement with an independent classifier, a linear probe on real test "
                                     "data (clean and PGD), nearest-neighbour memorisation; with --against, the "
                                     "same for a second set and the paired comparison (label flips, |dx|).")
    ins.add_argument("samples", help="an out folder of `cdp-fast sample` or an npz")
    ins.add_argument("--against", default=None,
                     help="a second set from the same x_T (e.g. unguided DDIM, same seed) to compare with")
    ins.add_argument("--real", default="digits",
                     help="real data: 'digits' (bundled train/test splits), 'cifar10:FOLDER' or a labelled npz "
                          "(train only: no probe) (default: digits)")
    ins.add_argument("--features", default="pca",
                     help="independent feature space: 'pca' (20-component PCA of the real images), 'digits' (the "
                          "bundled classifier's features: the guidance's own, not independent) or module:factory "
                          "(default: pca)")
    ins.add_argument("--classifier", default="auto",
                     help="independent classifier for label agreement: 'auto' (pixel logistic regression fitted "
                          "on the real training split), 'none', 'digits' (the bundled one, not independent) or "
                          "module:factory (default: auto)")
    ins.add_argument("--k", type=int, default=5, help="neighbours of the precision/recall k-NN balls (default: 5)")
    ins.add_argument("--probe-eps", type=float, default=8 / 255,
                     help="L-inf PGD radius against the linear probe, [0, 1] pixels (default: 8/255)")
    ins.add_argument("--n", type=int, default=None, help="first N samples of each set only (default: all)")
    ins.add_argument("--json", default=None, help="write the full report to this JSON file")
    ins.add_argument("--figure", default=None,
                     help="write a PNG: class histograms, 2-D projection, guidance strength (needs matplotlib)")
    ins.add_argument("--device", default=None, help="torch device for networks (default: cpu)")
    ins.set_defaults(func=cmd_inspect)


def _add_bench(sub):
    be = sub.add_parser("bench", help="sampling throughput benchmark (benchmarks/throughput.py; source "
                                      "checkout only)",
                        description="Run benchmarks/throughput.py; every argument after 'bench' is passed "
                                    "through (e.g. cdp-fast bench --config cifar; cdp-fast bench --help lists "
                                    "them). Needs a source checkout (pip install -e .): the benchmarks are "
                                    "not installed with the package.")
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/throughput.py")
    be.set_defaults(func=cmd_bench)


def build_parser():
    """The `cdp-fast` parser: global flags, then one _add_<name>(sub) per subcommand."""
    p = _Parser(prog=PROG, description="Contrastive-guided diffusion (Contrastive-DP) for robust training.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="{sample,label,select,train,eval,inspect,demo,bench}",
                           parser_class=_Parser)
    _add_sample(sub)
    _add_label(sub)
    _add_select(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_demo(sub)
    _add_bench(sub)
    return p


def main(argv=None) -> int:
    """Entry point of `cdp-fast`; returns the exit status: 0 ok, 1 a missing optional package,
    2 a bad argument or a failure the user must act on (ValueError, a missing file, an OSError
    such as a full disk), each as one line on stderr."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(v) for v in argv]
    try:
        if argv and argv[0] == "bench":
            # everything after "bench" belongs to benchmarks/throughput.py (argparse.REMAINDER
            # would stop at a leading option)
            return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        if args.version:
            import cdp_fast

            print(f"cdp_fast {cdp_fast.__version__}")
            return 0
        if args.command is None:
            raise UsageError(f"{PROG}: choose a subcommand: sample, label, select, train, eval, inspect, demo, bench "
                             "(see --help)")
        # every subcommand's --device, checked before anything is loaded (one helper, one message)
        specs.check_device(getattr(args, "device", None))
        return args.func(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except ImportError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except OSError as e:
        # disk full, permission denied, a vanished folder: every file is written atomically, so
        # what was there stays consistent; say what failed in one line
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{PROG}: error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
