"""The `cdp-fast` command (also `python -m cdp_fast`): one entry point, nine subcommands.

This module holds the parser (:func:`build_parser`) and the exit-status mapping (:func:`main`).
Each subcommand's flags (``add_<name>``) live beside the code that reads them (``cmd_<name>``:
call the library, print), so a flag and its use change together: :mod:`cdp_fast.cli.sample`
(sample), :mod:`cdp_fast.cli.data` (label, select, inspect), :mod:`cdp_fast.cli.export`
(export), :mod:`cdp_fast.cli.train` (train, eval), :mod:`cdp_fast.cli.demo` (demo, bench).
What a flag's value names (a model, a network, data) is resolved in :mod:`cdp_fast.cli.specs`.

    cdp-fast demo                                   # the embedded digits experiment
    cdp-fast sample --model digits -n 512 --loss hnm --out gen/ --grid grid.png
    cdp-fast label gen/ --classifier digits --out labelled.npz
    cdp-fast select labelled.npz --k-per-class 50 --out selected.npz
    cdp-fast train --arch small-cnn --data digits --synthetic selected.npz --eps 0.1 --out clf.pt
    cdp-fast eval --arch small-cnn --weights clf.pt --data digits --eps 0.1
    cdp-fast inspect gen_cdp/ --against gen_ddim/ --json inspect.json --figure inspect.png
    cdp-fast inspect gen/ --fid real.npz --fid-weights inception.pth   # FID / KID / IS
    cdp-fast export gen/ --png gen_png/                  # {index:06d}.png for EDM / clean-fid / torch-fidelity
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

``sample`` and ``train`` also read their options from a file (``--config run.yaml``: keys are the
library's keyword names, flags override it), and ``sample --from-manifest gen/manifest.json``
replays or extends a recorded run (:mod:`cdp_fast.cli.config`).

Errors in arguments print one line on stderr and exit with status 2 (argparse's own errors
included); output options (``--out``, ``--json``, ``--npz``, ...) are checked before any work
(:func:`cdp_fast.cli.common.check_output`: not a directory, in an existing writable folder); a missing optional dependency exits with status 1 and names the extra to install.
Only this package prints; the library reports through ``progress=`` / ``callback=``.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from cdp_fast.cli import specs
from cdp_fast.cli.common import PROG, UsageError
from cdp_fast.cli.config import apply_config
from cdp_fast.cli.data import add_inspect, add_label, add_select
from cdp_fast.cli.demo import add_bench, add_demo, cmd_bench
from cdp_fast.cli.export import add_export
from cdp_fast.cli.sample import add_sample
from cdp_fast.cli.train import add_eval, add_train

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def build_parser():
    """The `cdp-fast` parser: global flags, then one add_<name>(sub) per subcommand."""
    p = _Parser(prog=PROG, description="Contrastive-guided diffusion (Contrastive-DP) for robust training.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="{sample,label,select,train,eval,inspect,export,demo,bench}",
                           parser_class=_Parser)
    add_sample(sub)
    add_label(sub)
    add_select(sub)
    add_train(sub)
    add_eval(sub)
    add_inspect(sub)
    add_export(sub)
    add_demo(sub)
    add_bench(sub)
    p.subcommands = sub.choices      # (for --config: which flags the command line gave)
    return p


def _format_warning(message, category, filename, lineno, line=None):
    """A warning as one line (not Python's two: the message and its source line)."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    return f"{PROG}: warning: {text}\n"


def main(argv=None) -> int:
    """Entry point of `cdp-fast`; returns the exit status: 0 ok, 1 a missing optional package,
    2 a bad argument or a failure the user must act on (ValueError, a missing file, an OSError
    such as a full disk), each as one line on stderr; a warning is one line too."""
    saved, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _main(argv)
    finally:   # the caller's warning format back (in-process calls)
        warnings.formatwarning = saved


def _main(argv):
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
        if getattr(args, "config", None) or getattr(args, "from_manifest", None):
            # the file's settings under the flags given (cdp_fast.cli.config)
            args = apply_config(parser.subcommands[args.command], args, argv[argv.index(args.command) + 1:])
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
