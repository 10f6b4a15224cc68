"""`cdp-fast label`, `select` and `inspect`: the subcommands on a set of samples (pseudo-label it,
keep the best k per class, measure it as training data), each with its flags."""
from __future__ import annotations

from pathlib import Path

import cdp_fast.cli.specs as specs
from cdp_fast.cli.common import check_output

__all__ = ["add_label", "cmd_label", "add_select", "cmd_select", "add_inspect", "cmd_inspect"]


def add_label(sub):
    """`cdp-fast label` and its flags."""
    lab = sub.add_parser("label", help="pseudo-label samples with a classifier",
                         description="Pseudo-label generated samples (cdp_fast.label.pseudo_label).")
    lab.add_argument("samples", help="an out folder of `cdp-fast sample` or an npz")
    lab.add_argument("--classifier", default="digits",
                     help="classifier on [0, 1] images: 'digits' (bundled) or module:factory (default: digits)")
    lab.add_argument("--out", required=True, help="output npz (image, label, confidence), in an existing folder "
                          "(checked before any work)")
    lab.add_argument("--device", default=None, help="torch device (default: cpu)")
    lab.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab.set_defaults(func=cmd_label)


def cmd_label(a):
    import numpy as np

    from cdp_fast import label
    from cdp_fast.data import Samples

    check_output("out", a.out)      # before any work: a bad output option must not cost the run
    s = specs.load_samples(a.samples)
    clf = specs.load_classifier(a.classifier, a.device)
    res = label.pseudo_label(clf, s, device=a.device, progress=not a.no_progress)
    labelled = Samples(np.asarray(s.images[:]), np.asarray(res["label"], dtype=np.int64),
                       np.asarray(res["confidence"], dtype=np.float32))
    labelled.save_npz(a.out)
    hist = np.bincount(labelled.labels).tolist()
    print(f"labelled {len(labelled)} samples -> {a.out}; class histogram {hist}")
    return 0


def add_select(sub):
    """`cdp-fast select` and its flags."""
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
    sel.add_argument("--out", required=True, help="output npz, in an existing folder (checked before any work)")
    sel.add_argument("--device", default=None, help="torch device (default: cpu)")
    sel.set_defaults(func=cmd_select)


def cmd_select(a):
    import numpy as np

    from cdp_fast import label

    check_output("out", a.out)
    s = specs.load_samples(a.samples)
    clf = specs.load_classifier(a.classifier, a.device) if a.classifier != "none" else None
    out = label.select(s, a.criterion, a.k_per_class, classifier=clf, device=a.device)
    idx, chosen = out if isinstance(out, tuple) else (out, s.subset(np.asarray(out, dtype=np.int64)))
    chosen.save_npz(a.out)
    print(f"selected {len(idx)} of {len(s)} samples ({a.criterion}, {a.k_per_class} per class) -> {a.out}")
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
    ins.add_argument("--json", default=None, help="write the full report to this JSON file (in an existing folder; "
                          "checked before any work)")
    ins.add_argument("--figure", default=None,
                     help="write a PNG: class histograms, 2-D projection, guidance strength (needs matplotlib; "
                          "in an existing folder)")
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


def cmd_inspect(a):
    from cdp_fast import metrics

    if a.k < 1 or a.probe_eps < 0 or (a.n is not None and a.n < 1):
        raise ValueError("inspect: --k and --n must be >= 1 and --probe-eps >= 0")
    check_output("json", a.json)
    check_output("figure", a.figure)
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
        from cdp_fast.utils.io import atomic_write_json

        atomic_write_json(Path(a.json), rep)
        print(f"wrote {a.json}")
    if a.figure:
        metrics.figure(a.figure, rep, s, real=train, against=other, features=features, max_samples=a.n)
        print(f"wrote {a.figure}")
    return 0
