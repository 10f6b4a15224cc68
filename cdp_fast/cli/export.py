"""`cdp-fast export`: a set of samples as a PNG folder or zip for EDM's fid.py, clean-fid and
torch-fidelity (:func:`cdp_fast.data.export.export_png`)."""
from __future__ import annotations

from cdp_fast.cli.common import check_output

__all__ = ["add_export", "cmd_export"]


def add_export(sub):
    """`cdp-fast export` and its flags."""
    ex = sub.add_parser("export", help="write samples as PNG files (a folder or a zip) for external FID tools",
                        description="Write every image of a set as {index:06d}.png in one flat folder (read by EDM's "
                                    "fid.py, clean-fid and torch-fidelity) or a zip (read by EDM and clean-fid), "
                                    "with EDM's dataset.json labels when the set has labels. Resumable: PNGs "
                                    "already there that decode to the same pixels are kept.")
    ex.add_argument("samples", help="an out folder of `cdp-fast sample`, an npz, npz parts ('a.npz,b.npz' or a "
                                    "quoted glob) or a folder of per-class {k}.npy files")
    ex.add_argument("--png", required=True, help="output folder (created; its parent must exist), or the zip path "
                                                 "with --zip")
    ex.add_argument("--zip", action="store_true", help="write one zip instead of a folder (built under a temp "
                                                       "name, renamed when complete)")
    ex.add_argument("--no-labels", action="store_true", help="no dataset.json even when the set has labels")
    ex.add_argument("--chunk", type=int, default=1000, help="images read and encoded at a time (default: 1000)")
    ex.set_defaults(func=cmd_export)


def cmd_export(a):
    from cdp_fast.cli.data import load_sets
    from cdp_fast.data.export import export_png

    check_output("png", a.png, folder=not a.zip)
    if a.chunk < 1:
        raise ValueError(f"export: --chunk must be >= 1, got {a.chunk}")
    res = export_png(load_sets(a.samples), a.png, zip=a.zip, chunk=a.chunk, labels=not a.no_labels)
    removed = f", {res['removed']} stale removed" if res.get("removed") else ""
    print(f"exported {res['n']} images -> {res['out']} ({res['written']} written, {res['skipped']} already there"
          f"{removed}{', dataset.json with labels' if res['labels'] else ''})")
    return 0
