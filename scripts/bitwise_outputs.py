"""Hash the outputs of a fixed set of ``cdp_fast.sample`` calls, to show that a refactor changed
no bit of what users get.

    python scripts/bitwise_outputs.py --write tests/data/bitwise_outputs.json   # before a change
    python scripts/bitwise_outputs.py --check tests/data/bitwise_outputs.json   # after it

The calls cover every solver (DDIM, DDIM η = 1, DDPM, DPM-Solver++(2M), Heun), unguided and guided (HNM / InfoNCE, the authors' and the anchor form, with and
without the online head, class negatives), in memory (float and uint8) and streamed to shards.
Each call runs on the bundled 8×8 digits models at a small size (~1 min in all on 2 cores).
A hash covers the images, labels, confidences and the shard files' bytes, and, for the
streamed calls, a second one the manifest's arguments (what a resume compares). Entries
re-recorded after an intended change name it in the JSON's "notes". Floating-point
results are only comparable on the same CPU, torch and thread count: the JSON records them and
``--check`` says so when they differ (tests/test_bitwise.py then skips).
"""
import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import cdp_fast
from cdp_fast.models import digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import cpu_model  # noqa: E402  (the benchmarks' provenance helper)

COMMON = dict(image_shape=(1, 8, 8), steps=8, skip="uniform", batch_size=16, progress=False,
              compile=False, seed=3)
GUIDED = dict(loss="hnm", lam=2e4, tau=10.0)


def _calls():
    f = digits.digits_features()
    lab = digits.digits_labeler()
    return {
        "ddim-plain": dict(loss=None),
        "ddim-eta1-plain": dict(loss=None, eta=1.0),
        "ddpm-plain": dict(loss=None, solver="ddpm"),
        "dpmpp-plain": dict(loss=None, solver="dpmpp_2m", skip="quadratic"),
        "heun-plain": dict(loss=None, solver="heun", nfe=7),
        "ddim-hnm-head": dict(GUIDED, features=f, labeler=lab, guide_window=None),
        "ddim-hnm-nohead": dict(GUIDED, features=f, embedding=None, guide_window=None),
        "ddim-hnm-authorswindow": dict(GUIDED, features=f),
        "ddim-infonce-anchors": dict(loss="infonce", lam=2e3, features=f, form="anchors",
                                     guide_window=None),
        "ddim-eta1-hnm-head": dict(GUIDED, features=f, eta=1.0, guide_window=None),
        "ddpm-hnm-head": dict(GUIDED, features=f, solver="ddpm", guide_window=None),
        "dpmpp-hnm-head": dict(GUIDED, features=f, solver="dpmpp_2m", guide_window=None),
        "heun-hnm-nohead": dict(GUIDED, features=f, solver="heun", nfe=7, embedding=None,
                                guide_window=None),
        "ddim-hnm-class": dict(GUIDED, features=f, labeler=lab, negatives="class",
                               embedding=None, guide_window=None),
        "ddim-hnm-float": dict(GUIDED, features=f, output="float", guide_window=None),
        "ddim-hnm-head-shards": dict(GUIDED, features=f, labeler=lab, guide_window=None,
                                     out=True, shard_size=32),
        "ddpm-plain-shards": dict(loss=None, solver="ddpm", out=True, shard_size=32),
    }


def digest(s, out_dir):
    h = hashlib.sha256()
    for a in (s.images, s.labels, s.confidence):
        if a is not None:
            a = np.ascontiguousarray(np.asarray(a))
            h.update(str((a.dtype, a.shape)).encode())
            h.update(a.tobytes())
    if out_dir is not None:
        for p in sorted(Path(out_dir).glob("shard-*.npz")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def environment():
    return {"torch": torch.__version__, "machine": platform.machine(),
            "processor": cpu_model(), "threads": torch.get_num_threads()}


def run(names=None, n=48):
    model = digits.load_digits_eps_model()
    calls = _calls()
    hashes = {}
    for name, kw in calls.items():
        if names and name not in names:
            continue
        kw = dict(COMMON, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            out = None
            if kw.pop("out", None):
                out = Path(tmp) / "gen"
                kw["out"] = str(out)
            s = cdp_fast.sample(model, n, **kw)
            hashes[name] = digest(s, out)
            if out is not None:     # what a resume compares: the manifest's arguments
                args = json.loads((out / "manifest.json").read_text())["args"]
                hashes[name + ":manifest"] = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
    return hashes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="JSON")
    g.add_argument("--check", metavar="JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    hashes = run()
    if a.write:
        Path(a.write).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write).write_text(json.dumps({"environment": environment(), "hashes": hashes},
                                            indent=1) + "\n")
        print(f"wrote {len(hashes)} hashes to {a.write}")
        return 0
    ref = json.loads(Path(a.check).read_text())
    if ref["environment"] != environment():
        print(f"note: recorded on {ref['environment']}, this is {environment()}: "
              "float results may differ for that reason alone")
    bad = [k for k in ref["hashes"] if hashes.get(k) != ref["hashes"][k]]
    for k in ref["hashes"]:
        print(f"{k:38s} {'same' if k not in bad else 'DIFFERENT'}  {ref.get('notes', {}).get(k, '')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
