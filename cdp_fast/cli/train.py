"""`cdp-fast train` (TRADES on real + synthetic data) and `cdp-fast eval` (clean / PGD /
AutoAttack accuracy), each with its flags and the state_dict file between them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cdp_fast.cli.specs as specs
from cdp_fast.cli.common import check_output
from cdp_fast.cli.config import add_config_flags

__all__ = ["add_train", "cmd_train", "add_eval", "cmd_eval"]


def add_train(sub):
    """`cdp-fast train` and its flags."""
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
    tr.add_argument("--eps", type=float, default=0.1, help="radius in --norm on [0, 1] pixels (default: 0.1)")
    tr.add_argument("--norm", type=_norm_arg(("linf", "l2")), default="linf",
                    help="threat model of the inner attack: linf or l2 (L2 PGD: normalised-gradient step, clamp, "
                         "scale onto the ball; TRADES L2 starts at x + 0.001 N(0, I)) (default: linf)")
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
    tr.add_argument("--checkpoint", default=None,
                    help="resumable checkpoint path, in an existing folder (default: none)")
    tr.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    tr.add_argument("--device", default=None, help="torch device (default: cpu)")
    tr.add_argument("--out", default=None, help="where to write the trained state_dict, in an existing folder "
                                                      "(checked before training): safetensors when the name ends in "
                                                      ".safetensors, else a torch file (.pt); required (here or in "
                                                      "--config)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--holdout", type=_holdout, default=None, metavar="FRACTION|COUNT",
                    help="hold out part of the real training data (--data; never the test set), chosen by --seed "
                         "and not trained on: a fraction in (0, 1) or a count (a whole number >= 1: 1000 or 1e3); "
                         "evaluated (clean + PGD-20 at --eps) "
                         "every --eval-every epochs (default: none)")
    tr.add_argument("--eval-every", type=int, default=None, metavar="K",
                    help="evaluate the --holdout split every K epochs and after the last (default: 1)")
    tr.add_argument("--log-dir", default=None,
                    help="folder (made in an existing folder) for metrics.csv, one row per epoch: losses, "
                         "accuracies, lr and the --holdout numbers; TensorBoard events too when tensorboard is "
                         "installed (default: no log)")
    add_config_flags(tr)
    tr.set_defaults(func=cmd_train)


def _holdout(value):
    """--holdout: a fraction in (0, 1), or a count: a whole number >= 1, written as an int or as
    a number ("1e3", "1000.0": 1000; what a --config file's number reads as)."""
    import argparse

    try:
        v = float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        v = None
    if isinstance(v, float) and v >= 1 and v.is_integer():
        v = int(v)
    if v is None or not (0 < v < 1 if isinstance(v, float) else v >= 1):
        raise argparse.ArgumentTypeError(f"{value!r} is neither a fraction in (0, 1) nor a count (a whole "
                                         "number >= 1)")
    return v


def _norm_arg(allowed):
    """argparse type: a norm name (case-insensitive) among ``allowed``, else one-line error."""
    def parse(v):
        if v.lower() not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, got {v!r}")
        return v.lower()
    parse.__name__ = "norm"
    return parse


def _save_state(model, path):
    from cdp_fast.utils.checkpoint import write_weights

    write_weights(Path(path), model.state_dict())     # .safetensors by its suffix, else torch.save


def cmd_train(a):
    # before any work: a bad output option must not cost the training run
    if a.out is None:
        raise ValueError("out: required: where to write the trained state_dict (--out, or out in --config)")
    check_output("out", a.out)
    check_output("checkpoint", a.checkpoint)
    check_output("log-dir", a.log_dir, folder=True)
    model = specs.classifier_for_arch(a.arch, a.num_classes)
    data = specs.load_train_data(a.data, "train")
    # pad / flip / label smoothing left as None: the library fits them to the images and the recipe
    try:
        trained = _train(a, model, data)
    except FloatingPointError as e:   # the library's divergence check: a setting to change, not a bug
        raise ValueError(f"train: {e}: the training diverged (a smaller --lr than {a.lr:g}, a longer "
                         "--warmup-epochs? a NaN in the data?)") from None
    from cdp_fast.utils import distributed as cdist

    if cdist.is_main():  # under torchrun every rank holds the same weights; rank 0 writes
        _save_state(trained, a.out)
        print(f"trained {a.arch} ({a.epochs} epochs, TRADES {a.norm} eps={a.eps:g}) -> {a.out}")
        tp = getattr(trained, "throughput", None)
        if tp:
            print(f"throughput: {sum(t['images_per_s'] for t in tp):.1f} images/s total over {len(tp)} "
                  "process(es); per rank: " + ", ".join(f"{t['rank']}: {t['images_per_s']:.1f}" for t in tp))
        held = [e for e in getattr(trained, "history", None) or [] if "holdout_pgd_acc" in e]
        if held:
            print(f"holdout ({a.holdout}) after epoch {held[-1]['epoch']}: clean "
                  f"{100 * held[-1]['holdout_clean_acc']:.2f}%, PGD-20 {100 * held[-1]['holdout_pgd_acc']:.2f}%")
        if a.log_dir:
            print(f"log: {Path(a.log_dir) / 'metrics.csv'}")
    return 0


def _train(a, model, data):
    """cdp_fast.train_trades with the flags of ``a``."""
    import cdp_fast

    return cdp_fast.train_trades(
        model, data, synthetic=a.synthetic, real_fraction=a.real_fraction, epochs=a.epochs, eps=a.eps,
        step_size=a.step_size if a.step_size is not None else 2.5 * a.eps / max(1, a.steps),
        steps=a.steps, beta=a.beta, batch_size=a.batch_size, ema=None if a.ema == 0 else a.ema,
        lr=a.lr, warmup_epochs=a.warmup_epochs, pad=a.pad, flip=a.flip,
        label_smoothing=a.label_smoothing, recipe=a.recipe, norm=a.norm, seed=a.seed, device=a.device,
        checkpoint=a.checkpoint, progress=not a.no_progress, sync_bn=a.sync_bn,
        holdout=a.holdout, eval_every=a.eval_every, log_dir=a.log_dir,
        **(getattr(a, "api_kwargs", None) or {}))     # a config file's keywords without a flag


def add_eval(sub):
    """`cdp-fast eval` and its flags."""
    ev = sub.add_parser("eval", help="clean / PGD / AutoAttack accuracy",
                        description="Evaluate a classifier (cdp_fast.evaluate); inputs in [0, 1].")
    ev.add_argument("--arch", default="small-cnn",
                    help="classifier architecture (as for train) or module:factory; 'digits' without "
                         "--weights evaluates the bundled digits classifier (default: small-cnn)")
    ev.add_argument("--num-classes", type=int, default=10, help="number of classes (default: 10)")
    ev.add_argument("--weights", default=None,
                    help="state_dict saved by `cdp-fast train` (.pt, or .safetensors by its suffix), or a published "
                         "checkpoint of --arch as it is: DM-Improves-AT's {'model_state_dict': ...} with 'module.0.' "
                         "keys, RobustBench's {'state_dict': ...} with 'module.' keys (read weights-only)")
    ev.add_argument("--data", default="digits",
                    help="test data: 'digits' (bundled test split), 'cifar10:FOLDER' (its test batch) or a "
                         "labelled npz (default: digits)")
    ev.add_argument("--n", type=int, default=None, help="evaluate on the first N test images (default: all)")
    ev.add_argument("--eps", type=float, default=0.1, help="radius in --norm (default: 0.1)")
    ev.add_argument("--norm", type=_norm_arg(("linf", "l2", "l1")), default="linf",
                    help="threat model: linf, l2 or l1 (l1: AutoAttack only) (default: linf)")
    ev.add_argument("--attacks", default="clean,pgd,autoattack",
                    help="comma list of clean, pgd, autoattack (default: all three)")
    ev.add_argument("--version", dest="aa_version", choices=("standard", "plus", "rand", "custom"),
                    default="standard", help="AutoAttack version; custom runs --aa-attacks (default: standard)")
    ev.add_argument("--aa-attacks", default=None,
                    help="AutoAttack attacks for --version custom, comma list of apgd-ce, apgd-dlr, fab, square, "
                         "apgd-t, fab-t")
    ev.add_argument("--state-path", default=None,
                    help="folder for AutoAttack's resumable state (one file per block, log.json with the robust "
                         "accuracy after each attack); rerun the same command to resume a killed evaluation")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file (in an existing folder; "
                                                    "checked before the attacks)")
    ev.add_argument("--device", default=None, help="torch device (default: cpu)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)


def _load_weights(model, path, arch):
    """--weights: a state_dict saved by `cdp-fast train` (torch or safetensors, by the suffix), or
    a published DM-Improves-AT / RobustBench checkpoint (:func:`cdp_fast.models.load_checkpoint_into`),
    into ``model``; ValueError naming the file when it cannot be read, holds pickled objects
    (never loaded: see :func:`cdp_fast.utils.checkpoint.read_weights`), is not a state_dict or
    does not fit ``arch`` (the missing / unexpected keys named)."""
    from cdp_fast.models import load_checkpoint_into
    from cdp_fast.utils.checkpoint import read_weights

    if Path(path).is_dir():
        raise ValueError(f"weights: {path} is a directory, not a state_dict file")
    if not Path(path).is_file():
        raise ValueError(f"weights: {path} does not exist")
    expected = "a state_dict saved by `cdp-fast train` (weights only)"
    state = read_weights(path, "weights:", expected)
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} is not {expected}: it holds a {type(state).__name__}")
    if "version" in state and "model" in state and "optimizer" in state:
        raise ValueError(f"weights: {path} is a training checkpoint (--checkpoint), not {expected} "
                         "(--out of `cdp-fast train`)")
    try:
        load_checkpoint_into(model, state, what=f"weights: {path}")
    except ValueError as e:
        raise ValueError(f"{e} (--arch {arch})") from None
    except (RuntimeError, TypeError, AttributeError) as e:
        why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"weights: {path} does not fit --arch {arch} ({why[:300]})") from None


def cmd_eval(a):
    import cdp_fast

    check_output("json", a.json)      # before any work: not after the attacks have run
    if a.n is not None and a.n < 1:   # a slice x[:-5] would drop items silently (probe.md EV1)
        raise ValueError(f"n: must be >= 1 (the first n test points), got {a.n}")
    model = specs.classifier_for_arch(a.arch, a.num_classes, trained_digits=not a.weights)
    if a.weights:
        _load_weights(model, a.weights, a.arch)
    elif a.arch != "digits":
        raise ValueError("weights: required (a state_dict saved by `cdp-fast train`)")
    x, y = specs.load_train_data(a.data, "test")
    if a.n is not None:
        x, y = x[:a.n], y[:a.n]
    attacks = tuple(v.strip() for v in a.attacks.split(",") if v.strip())
    model = model.to(a.device or "cpu").eval()
    aa_attacks = tuple(v.strip() for v in a.aa_attacks.split(",") if v.strip()) if a.aa_attacks else None
    res = cdp_fast.evaluate(model, x.to(a.device or "cpu"), y.to(a.device or "cpu"), eps=a.eps, attacks=attacks,
                            progress=not a.no_progress, norm=a.norm, version=a.aa_version, aa_attacks=aa_attacks,
                            state_path=a.state_path, aa_log="autoattack" in attacks)
    from cdp_fast.utils import distributed as cdist

    if not cdist.is_main():
        return 0
    for k, v in res.items():
        if isinstance(v, float):
            print(f"{k:<12} {100 * v:6.2f}%")
    for e in res.get("autoattack_log", []):   # AutoAttack's robust accuracy after each of its attacks
        print(f"  autoattack after {e['attack']:<8} {100 * e['robust_accuracy']:6.2f}%  ({e['seconds']:.1f} s)")
    if a.json:
        from cdp_fast.utils.io import atomic_write_bytes

        atomic_write_bytes(Path(a.json), (json.dumps(res, indent=2, default=float) + "\n").encode())
    return 0
