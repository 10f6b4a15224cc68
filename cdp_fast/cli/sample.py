"""`cdp-fast sample`: its flags (:func:`add_sample`: the guidance, the DDIM sampler, the outputs)
and :func:`cmd_sample`, which calls :func:`cdp_fast.sample` and writes the npz and PNG grid."""
from __future__ import annotations

import cdp_fast.cli.specs as specs
from cdp_fast.cli.common import check_output
from cdp_fast.cli.config import add_config_flags, replay_run

__all__ = ["add_sample", "cmd_sample"]


def add_sample(sub):
    """`cdp-fast sample` and its flags."""
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
    add_config_flags(s, replay=True)
    s.set_defaults(func=cmd_sample)


def _add_guidance_flags(s):
    """sample: the contrastive loss, its networks and its data."""
    s.add_argument("--loss", choices=("none", "infonce", "hnm"), default="hnm",
                   help="contrastive loss; none = plain DDIM (default: hnm)")
    s.add_argument("--features", default="auto",
                   help="feature extractor f for the loss: auto (the bundled model's; a guided run of any other "
                        "model must name one), pixels (raw pixels; needs --lam: no lambda default applies), "
                        "digits, or module:factory; f takes x in [-1, 1] (a [0, 1] classifier: return "
                        "cdp_fast.models.as_feature_extractor(clf[, layer=...]) from the factory) (default: auto)")
    s.add_argument("--embedding", default="auto", metavar="{auto,none,mlp,H}",
                   help="'mlp': online 2-layer head on f trained by the loss, d->128->128; an int H: the same "
                        "head d->H->H (the authors' MNIST head: 64); auto = the model preset's, else the head "
                        "for hnm and none for infonce (the authors') (default: auto)")
    s.add_argument("--feature-input", choices=("unit", "raw"), default="unit",
                   help="what the classifier behind --features gets: unit = x in [-1, 1] mapped to [0, 1] (its "
                        "input range); raw = x_t as it is (the authors' setting, outside the classifier's range; "
                        "for --features digits, or a module:factory returning "
                        "cdp_fast.models.as_feature_extractor(...)) (default: unit)")
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
                        "module:factory taking x in [-1, 1] (a [0, 1] classifier: return "
                        "cdp_fast.models.as_labeler(clf, input_range=(0, 1)) from the factory) (default: auto)")


def _add_ddim_flags(s):
    """sample: the DDIM sampler and the noise schedule."""
    s.add_argument("--steps", type=int, default=None, help="DDIM steps (default: per model; library 200)")
    s.add_argument("--skip", choices=("uniform", "quadratic", "logsnr", "linspace"), default=None,
                   help="timestep sub-sequence; linspace = the authors' MNIST grid linspace(0, T-1, steps) "
                        "floored (default: per model; library: logsnr for dpmpp_2m, else quadratic)")
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
    s.add_argument("--out", default=None, help="directory for shards + manifest (resumable), made in an existing "
                                                    "folder, with sample-config.json (the run's settings, for "
                                                    "--from-manifest / --config); default: in memory")
    s.add_argument("--npz", default=None,
                   help="also write all samples to this npz: image (uint8 NHWC with --output uint8; float32 NCHW "
                        "model-space values, about [-1, 1], with --output float), label; in an existing folder")
    s.add_argument("--grid", default=None,
                   help="write a PNG grid of the first 64 samples; when guided, beside the unguided DDIM "
                        "samples from the same starting noise; in an existing folder")
    s.add_argument("--output", choices=("uint8", "float"), default="uint8",
                   help="uint8 NHWC images or float model-space arrays (default: uint8)")
    s.add_argument("--seed", type=int, default=0, help="run seed; sample i depends on (seed, i) (default: 0)")
    s.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda (default: the model's)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype for the networks (default: float32)")
    s.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                   help="torch.compile the eps-model: auto = on CUDA only (default: auto)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- flag values
def _dtype(name):
    import torch

    return {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _compile_flag(v):
    return {"auto": "auto", "true": True, "false": False}[v]


def _check_outputs(a):
    """sample's output options, checked before any work (before the model is even loaded):
    --out a folder (or a new one) in an existing writable folder, --npz / --grid files in an
    existing writable folder (:func:`cdp_fast.cli.common.check_output`)."""
    if a.out is not None and not a.out.strip():
        raise ValueError("out: an empty path; give a directory or leave --out out (samples in memory)")
    check_output("out", a.out, folder=True)
    check_output("npz", a.npz)
    check_output("grid", a.grid)
    if a.grid and a.output != "uint8":
        raise ValueError("grid: needs --output uint8 and 3-D images (C, H, W)")


def _embedding(value):
    """--embedding: "auto", None ("none"), "mlp" or a positive int H; "auto" is resolved against
    the model preset later."""
    if value in ("auto", "mlp"):
        return value
    if value == "none":
        return None
    try:
        h = int(value)
    except ValueError:
        h = 0
    if h < 1:
        raise ValueError(f"embedding: {value!r} is not auto, none, mlp or a positive int H (the head d->H->H)")
    return h


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


def _pixels(spec, info):
    """Whether a guided run's --features means raw pixels: only "pixels" ("auto" for a bundled
    model means its bundled features — the digits preset's classifier features — never pixels);
    "auto" for a model with no bundled features is a ValueError (guidance needs an explicit
    feature space: issue 23, F7)."""
    if spec == "pixels":
        return True
    if spec in (None, "auto") and not info.get("bundled"):
        raise ValueError("features: a guided run of this model needs --features: module:factory (a classifier's "
                         "features on x in [-1, 1]), or pixels with --lam (no lambda default applies to pixels); "
                         "or --loss none")
    return False


# ----------------------------------------------------------------------------- the subcommand
def cmd_sample(a):
    import numpy as np

    import cdp_fast
    from cdp_fast.utils.png import save_grid_png

    _check_outputs(a)      # before any work: a bad output option must not cost the run
    embedding = _embedding(a.embedding)
    model, info = specs.load_model_spec(a.model, a.device)
    image_shape = specs.parse_shape(a.image_shape) if a.image_shape else info.get("image_shape")
    if image_shape is None:
        raise ValueError("image-shape: required for a module:factory model (e.g. --image-shape 3,32,32)")
    if a.grid and len(image_shape) != 3:
        raise ValueError("grid: needs --output uint8 and 3-D images (C, H, W)")
    loss = None if a.loss == "none" else a.loss
    samp = dict(info.get("sampling") or {})
    g = dict((info.get("guidance") or {}).get(loss, {})) if loss else {}
    # "auto" flags take the bundled model's preset where it has one (the digits preset pins the
    # setting it was tuned in), else the library's defaults (the authors' choices)
    if embedding == "auto":
        embedding = g.get("embedding", "auto")
    form = a.form if a.form != "auto" else g.get("form")
    num_classes = a.num_classes if a.num_classes is not None else info.get("num_classes")
    pixels = loss is not None and _pixels(a.features, info)
    kw = dict(
        loss=loss, embedding=embedding, form=form, guide_window=_guide_window(a.guide_window, g),
        solver=a.solver, clip_x0={"auto": None, "true": True, "false": False}[a.clip_x0],
        # the preset's lambda was tuned for the bundled features, not pixels: pixels take --lam only
        lam=a.lam if a.lam is not None or pixels else g.get("lam"),
        tau=a.tau if a.tau is not None else g.get("tau"),
        tau_plus=a.tau_plus, beta=a.beta, positive=a.positive, negatives=a.negatives,
        num_classes=num_classes, class_labels=specs.load_class_labels(a.class_labels, num_classes),
        steps=a.steps if a.steps is not None else samp.get("steps", 200), nfe=a.nfe,
        # the model's preset spacing is a DDIM setting; the other solvers get their own default
        skip=a.skip if a.skip is not None else (samp.get("skip") if a.solver in ("ddim", "ddpm") else None),
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
        kw["features"] = specs.load_features(a.features, info, a.device, feature_input=a.feature_input)
        if pixels:
            kw["features"] = "pixels"
        elif kw["features"] is not None and ":" in a.features:
            specs.check_features(kw["features"], image_shape, a.features)
        kw["real"] = specs.load_real_images(a.real, image_shape)
    labeler = specs.load_labeler(a.labeler, info, a.device)
    kw.update(a.api_kwargs or {})     # a config file's keywords without a flag (shard_size, init_std)
    with replay_run(a):               # out/sample-config.json; --from-manifest: extend / compare
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
            if base.get("class_labels") is not None:    # the grid's k samples: their k labels
                base["class_labels"] = base["class_labels"][:k]
            u = np.asarray(cdp_fast.sample(model, k, **base).images[:k])
            sep = np.full((1,) + imgs.shape[1:], 255, np.uint8)
            imgs = np.concatenate([np.concatenate([u[i:i + 8], sep, imgs[i:i + 8]]) for i in range(0, k, 8)])
            save_grid_png(a.grid, imgs, nrow=17 if k >= 8 else 2 * k + 1, scale=4 if image_shape[-1] <= 16 else 1)
            print(f"wrote {a.grid} (each row: 8 DDIM | 8 Contrastive-DP from the same x_T)")
        else:
            save_grid_png(a.grid, imgs, nrow=8, scale=4 if image_shape[-1] <= 16 else 1)
            print(f"wrote {a.grid}")
    return 0
