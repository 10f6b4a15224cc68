"""`cdp-fast label`, `select` and `inspect`: the subcommands on a set of samples (pseudo-label it,
keep the best k or the best fraction per class, measure it as training data), each with its
flags. A set is anything :meth:`cdp_fast.Samples.load` opens: an out folder, an npz, npz parts
(comma-separated and/or a glob) or a folder of per-class ``{k}.npy`` files."""
from __future__ import annotations

from pathlib import Path

import cdp_fast.cli.specs as specs
from cdp_fast.cli.common import check_output

__all__ = ["add_label", "cmd_label", "add_select", "cmd_select", "add_inspect", "cmd_inspect", "load_sets"]

_SAMPLES_HELP = ("an out folder of `cdp-fast sample`, an npz, npz parts ('a.npz,b.npz' or a quoted glob "
                 "'aux/50m_part*.npz', read in that order, matches sorted by name) or a folder of per-class "
                 "{k}.npy files (EDM / DM-Improves-AT generate.py)")


def add_label(sub):
    """`cdp-fast label` and its flags."""
    lab = sub.add_parser("label", help="pseudo-label samples with a classifier",
                         description="Pseudo-label generated samples (cdp_fast.label.pseudo_label_to_npz): the "
                                     "images are read and written a batch at a time, so memory does not grow "
                                     "with the number of images.")
    lab.add_argument("samples", help=_SAMPLES_HELP)
    lab.add_argument("--classifier", default="digits",
                     help="classifier on [0, 1] images: 'digits' (bundled) or module:factory (default: digits)")
    lab.add_argument("--out", required=True, help="output npz (image, label, confidence), in an existing folder "
                          "(checked before any work); the labels are the classifier's, replacing stored ones")
    lab.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: 512)")
    lab.add_argument("--device", default=None, help="torch device (default: cpu)")
    lab.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab.set_defaults(func=cmd_label)


def cmd_label(a):
    from cdp_fast import label

    check_output("out", a.out)      # before any work: a bad output option must not cost the run
    if a.batch_size < 1:
        raise ValueError(f"label: --batch-size must be >= 1, got {a.batch_size}")
    s = load_sets(a.samples)
    clf = specs.load_classifier(a.classifier, a.device)
    res = label.pseudo_label_to_npz(clf, s, a.out, batch_size=a.batch_size, device=a.device,
                                    progress=not a.no_progress)
    print(f"labelled {res['n']} samples -> {a.out}; class histogram {res['class_counts'].tolist()}")
    return 0


def load_sets(spec):
    """A samples argument as :class:`cdp_fast.data.Samples`: an existing path through
    :func:`cdp_fast.cli.specs.load_samples`; comma-separated paths / glob patterns (which name
    no file) as the npz parts they list (:meth:`Samples.load`)."""
    from cdp_fast.data import Samples

    if Path(spec).exists() or not ("," in spec or any(c in spec for c in "*?[")):
        return specs.load_samples(spec)
    return Samples.load(spec)


def add_select(sub):
    """`cdp-fast select` and its flags."""
    sel = sub.add_parser("select", help="keep the best k samples (or the best fraction) per class",
                         description="Select the best k samples, or the best fraction, of every class "
                                     "(cdp_fast.label.select); classes are the stored labels (a class-conditional "
                                     "set's conditioning classes), else the classifier's pseudo-labels. "
                                     "DM-Improves-AT's select_1M.py is --criterion label_probability "
                                     "--top-fraction 0.2.")
    sel.add_argument("samples", help=_SAMPLES_HELP)
    sel.add_argument("--criterion", default="confidence",
                     choices=("entropy", "confidence", "label_probability", "grad_norm", "robust_grad_norm",
                              "separability"),
                     help="score ranking the samples within each class (cdp_fast.label.select): confidence = "
                          "p(label | x) of the stored label, else the max softmax; label_probability = p(stored "
                          "label | x), refused for samples without labels (default: confidence)")
    size = sel.add_mutually_exclusive_group(required=True)
    size.add_argument("--k-per-class", type=int, default=None, help="samples kept per class")
    size.add_argument("--top-fraction", type=float, default=None,
                      help="share of each class kept, in (0, 1]: floor(f * class size) (DM-Improves-AT's "
                           "--top_scale)")
    sel.add_argument("--classifier", default="digits",
                     help="classifier on [0, 1] images scoring the samples: digits, module:factory, or none "
                          "(separability with stored labels only) (default: digits)")
    sel.add_argument("--out", required=True, help="output npz, in an existing folder (checked before any work)")
    sel.add_argument("--device", default=None, help="torch device (default: cpu)")
    sel.set_defaults(func=cmd_select)


def cmd_select(a):
    import numpy as np

    from cdp_fast import label

    check_output("out", a.out)
    if a.top_fraction is not None and not 0 < a.top_fraction <= 1:   # before loading anything
        raise ValueError(f"select: --top-fraction must be in (0, 1], got {a.top_fraction}")
    if a.k_per_class is not None and a.k_per_class < 1:
        raise ValueError(f"select: --k-per-class must be >= 1, got {a.k_per_class}")
    s = load_sets(a.samples)
    clf = specs.load_classifier(a.classifier, a.device) if a.classifier != "none" else None
    out = label.select(s, a.criterion, a.k_per_class, top_fraction=a.top_fraction, classifier=clf,
                       device=a.device)
    idx, chosen = out if isinstance(out, tuple) else (out, s.subset(np.asarray(out, dtype=np.int64)))
    chosen.save_npz(a.out)
    size = f"{a.k_per_class} per class" if a.k_per_class is not None else f"top {a.top_fraction:g} of each class"
    print(f"selected {len(idx)} of {len(s)} samples ({a.criterion}, {size}) -> {a.out}")
    return 0


def add_inspect(sub):
    """`cdp-fast inspect` and its flags."""
    ins = sub.add_parser("inspect", help="are these samples better training data? (cdp_fast.metrics)",
                         description="Measure generated samples before training on them (cdp_fast.metrics.report): "
                                     "class separation (Fisher ratio, the paper's effective c) in an independent "
                                     "feature space, precision/recall/density/coverage against the real data, class "
                                     "balance, agreement with an independent classifier, a linear probe on real test "
                                     "data (clean and PGD), nearest-neighbour memorisation; with --against, the "
                                     "same for a second set and the paired comparison (label flips, |dx|).")
    ins.add_argument("samples", help=_SAMPLES_HELP)
    ins.add_argument("--against", default=None,
                     help="a second set from the same x_T (e.g. unguided DDIM, same seed) to compare with")
    ins.add_argument("--real", default="digits",
                     help="real data: 'digits' (bundled train/test splits), 'cifar10:FOLDER' or a labelled npz "
                          "(train only: no probe) (default: digits)")
    ins.add_argument("--features", default="pca",
                     help="independent feature space: 'pca' (20-component PCA of the real images), 'digits' (the "
                          "bundled classifier's features: the guidance's own, not independent), 'inception' "
                          "(Inception-v3 pool3, the FID space; weights as --fid-weights) or module:factory "
                          "(default: pca)")
    ins.add_argument("--classifier", default="auto",
                     help="independent classifier for label agreement: 'auto' (pixel logistic regression fitted "
                          "on the real training split), 'none', 'digits' (the bundled one, not independent) or "
                          "module:factory (default: auto)")
    ins.add_argument("--k", type=int, default=5, help="neighbours of the precision/recall k-NN balls (default: 5)")
    ins.add_argument("--probe-eps", type=float, default=8 / 255,
                     help="L-inf PGD radius against the linear probe, [0, 1] pixels (default: 8/255)")
    ins.add_argument("--n", type=int, default=None, help="first N samples of each set only (default: all)")
    ins.add_argument("--json", default=None, help="write the full report to this JSON file (in an existing folder; "
                          "checked before any work)")
    ins.add_argument("--figure", default=None,
                     help="write a PNG: class histograms, 2-D projection, guidance strength (needs matplotlib; "
                          "in an existing folder)")
    ins.add_argument("--fid", default=None, metavar="REF",
                     help="also FID, KID and IS (Inception-v3, cdp_fast.metrics.frechet; needs the [fid] extra) "
                          "against "
                          "REF: a reference-statistics npz (keys mu, sigma: EDM's cifar10-32x32.npz; FID only), "
                          "'digits' / 'cifar10:FOLDER' (the training split) or any set SAMPLES accepts")
    ins.add_argument("--fid-weights", default=None, metavar="PATH",
                     help="Inception-v3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
                          "default: $CDP_FAST_FID_WEIGHTS, else the torch hub cache; 'download' fetches it "
                          "(nothing is downloaded otherwise)")
    ins.add_argument("--fid-batch-size", type=int, default=200, help="images per Inception pass (default: 200)")
    ins.add_argument("--device", default=None, help="torch device for networks (default: cpu)")
    ins.set_defaults(func=cmd_inspect)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _fid_extractor(a):
    """inspect --fid: the Inception-v3 extractor (FileNotFoundError naming --fid-weights first)."""
    from cdp_fast.metrics.inception import inception_v3

    return inception_v3(a.fid_weights, device=a.device)


def _inspect_fid(a, extractor, s, other):
    """FID / KID / IS of the samples (and --against) against --fid REF, printed; returns the
    JSON part: {"ref", "samples": fid(...)[, "against": ...]}."""
    from cdp_fast.metrics import frechet

    ref = a.fid
    if frechet.load_reference_stats(ref) is None:
        if ref == "digits" or ref.startswith("cifar10:"):
            ref = specs.load_real_splits(ref)[0][0]
        else:
            ref = load_sets(ref)
        ref = frechet.feature_stats(ref, extractor, batch_size=a.fid_batch_size, device=a.device, name="fid ref")
    out = {"ref": a.fid}
    for key, data in (("samples", s), ("against", other)):
        if data is not None:
            out[key] = frechet.fid(data, ref, extractor=extractor, device=a.device, batch_size=a.fid_batch_size,
                               max_samples=a.n)
            r = out[key]
            kid = "-" if r["kid_mean"] is None else f"{r['kid_mean']:.4g} ± {r['kid_std']:.2g}"
            isc = "-" if r["is_mean"] is None else f"{r['is_mean']:.4g} ± {r['is_std']:.2g}"
            print(f"{key}: FID {r['fid']:.4g}  KID {kid}  IS {isc}  ({r['n_samples']} images vs {a.fid})")
    return out


def cmd_inspect(a):
    from cdp_fast import metrics

    if a.k < 1 or a.probe_eps < 0 or (a.n is not None and a.n < 1):
        raise ValueError("inspect: --k and --n must be >= 1 and --probe-eps >= 0")
    if a.fid_batch_size < 1:
        raise ValueError(f"inspect: --fid-batch-size must be >= 1, got {a.fid_batch_size}")
    check_output("json", a.json)
    check_output("figure", a.figure)
    fid_extractor = _fid_extractor(a) if a.fid else None      # missing weights: said before any work
    s = load_sets(a.samples)
    other = load_sets(a.against) if a.against else None
    train, test = specs.load_real_splits(a.real)
    if a.features == "inception":   # precision / recall ... in the standard FID feature space
        fid_extractor = fid_extractor or _fid_extractor(a)
        features, fdesc = (lambda x: fid_extractor(x)[0]), fid_extractor.description
    else:
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
    if a.fid:
        rep["fid"] = _inspect_fid(a, fid_extractor, s, other)
    if a.json:
        from cdp_fast.utils.io import atomic_write_json

        atomic_write_json(Path(a.json), rep)
        print(f"wrote {a.json}")
    if a.figure:
        metrics.figure(a.figure, rep, s, real=train, against=other, features=features, max_samples=a.n)
        print(f"wrote {a.figure}")
    return 0
