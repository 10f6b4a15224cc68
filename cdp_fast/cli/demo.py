"""`cdp-fast demo` (the embedded experiment, :func:`cdp_fast.demo.run_demo`) and `cdp-fast bench`
(the checkout's benchmarks/throughput.py), each with its flags."""
from __future__ import annotations

import argparse
from pathlib import Path

from cdp_fast.cli.common import PROG, UsageError, check_output

__all__ = ["add_demo", "cmd_demo", "add_bench", "cmd_bench"]


def add_demo(sub):
    """`cdp-fast demo` and its flags."""
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
    de.add_argument("--out", default="cdp_demo", help="output folder, made in an existing folder (default: cdp_demo)")
    de.add_argument("--device", default=None, help="torch device (default: cpu)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    de.set_defaults(func=cmd_demo)


def cmd_demo(a):
    from cdp_fast.demo import run_demo

    check_output("out", a.out, folder=True)      # before any work: not after the experiment
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


def add_bench(sub):
    """`cdp-fast bench`: every argument goes to benchmarks/throughput.py."""
    be = sub.add_parser("bench", help="sampling throughput benchmark (benchmarks/throughput.py; source "
                                      "checkout only)",
                        description="Run benchmarks/throughput.py; every argument after 'bench' is passed "
                                    "through (e.g. cdp-fast bench --config cifar; cdp-fast bench --help lists "
                                    "them). Needs a source checkout (pip install -e .): the benchmarks are "
                                    "not installed with the package.")
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benchmarks/throughput.py")
    be.set_defaults(func=cmd_bench)


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
