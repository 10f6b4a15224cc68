"""Resumable streaming of a long generation run into an out directory: fixed-size shards, the
manifest, resume (comparing the arguments' fingerprints, :mod:`.fingerprints`) and the split
of shards over torchrun ranks. Knows nothing of sampling: it calls
``generate(start, count, advance)`` for the rows of each missing shard.

Layout of ``out/`` (docs/design.md §6): ``shard-000123.npz`` (see :mod:`cdp_fast.data`),
``manifest.json`` (arguments, counts, seeding, each finished shard's size and sha256,
``complete``), ``.lock`` (the run's lock and its holder, :class:`DirLock`) and, during a
multi-process run, one ``shard-000123.json`` record per shard written by its rank (folded into
the manifest by rank 0 at the end). Every file is written
atomically; a killed run resumed with the same arguments rewrites only the missing shards,
byte-identically; a missing, truncated or corrupted shard is detected by its sha256 and
regenerated; changed arguments refuse to resume and name what changed.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cdp_fast.utils import distributed
from cdp_fast.data import npz_bytes, shard_intact
from cdp_fast.utils.io import atomic_write_bytes, atomic_write_json

__all__ = ["ShardPlan", "DirLock", "write_shards", "shard_name", "SEEDING"]

#: What the manifest says about randomness (checked by nobody; read by people).
SEEDING = ("sample i draws x_T and its real positive from torch.Generator seeded with "
           "cdp_fast.utils.seeding.sample_seed(seed, i), and its per-step noise from "
           "cdp_fast.utils.seeding.counter_normal keyed by that seed")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.npz"


@dataclass(frozen=True)
class ShardPlan:
    """Where and how a run of ``n`` rows is cut: shard k holds rows
    [k·shard_size, min(n, (k+1)·shard_size)). ``args`` (JSON-serialisable) must match for a
    resume."""

    out: Path
    n: int
    shard_size: int
    args: dict
    #: values that manifests written before an argument existed implicitly had (a missing
    #: key compares as this value, so adding an argument does not refuse old runs)
    legacy: dict = field(default_factory=dict)

    @property
    def shards(self) -> list:
        """[(k, start, count)] for every shard of the run."""
        return [(k, s, min(self.shard_size, self.n - s)) for k, s in enumerate(range(0, self.n, self.shard_size))]


# ----------------------------------------------------------------------------- manifest
def _same(key, old, new, out) -> bool:
    """Whether a recorded argument matches: exactly, except behaviour fingerprints (dicts with
    "behaviour": projections of a callable's probe output, :func:`cdp_fast.sampling.prepare.probe`),
    which match within rtol 1e-3 — float noise across devices, thread counts or versions must
    not refuse a resume; a different network differs by far more. A name recorded before
    behaviour fingerprints existed cannot be checked: accepted with a warning."""
    if isinstance(new, dict) and "behaviour" in new:
        if isinstance(old, str):
            warnings.warn(f"out: {out} records {key} by name ({old}); its behaviour cannot be checked")
            return True
        if not (isinstance(old, dict) and len(old.get("behaviour", ())) == len(new["behaviour"])):
            return False
        a, b = np.asarray(old["behaviour"]), np.asarray(new["behaviour"])
        return bool(np.all(np.abs(a - b) <= 1e-3 * max(np.abs(a).max(), np.abs(b).max(), 1e-12)))
    return old == new


def _nothing_finished(plan: ShardPlan, manifest) -> bool:
    """No finished shard anywhere (manifest, rank records, files): a failed first call, whose
    manifest must not pin its arguments on the corrected one."""
    return (not manifest.get("shards") and not any(plan.out.glob("shard-*.json"))
            and not any(plan.out.glob("shard-*.npz")))


def _load_or_start_manifest(plan: ShardPlan, *, may_restart: bool = False):
    path = plan.out / "manifest.json"
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"out: {path} is not valid JSON ({e}); remove it to start afresh") from None
        old = {**plan.legacy, **manifest.get("args", {})}
        args = plan.args
        changed = sorted(k for k in set(old) | set(args) if not _same(k, old.get(k), args.get(k), plan.out))
        if changed and may_restart and _nothing_finished(plan, manifest):
            warnings.warn(f"out: {plan.out} held a run with other arguments but no finished shard; "
                          "starting afresh")
            changed = None
        elif changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {args.get(k)!r}" for k in changed)
            unchecked = [k for k in changed if isinstance(old.get(k), str) and old[k].endswith((".list", ".tuple"))]
            if unchecked:     # cdp_fast < 0.2 recorded a list or tuple by its type name alone
                raise ValueError(f"out: {plan.out} recorded {', '.join(unchecked)} as a bare type name (cdp_fast "
                                 "< 0.2 did not fingerprint the values of lists): whether they match cannot be "
                                 "checked, so this run cannot be resumed safely; start a new directory")
            raise ValueError(f"out: {plan.out} holds a run with different arguments ({detail}); "
                             "use another directory or the original arguments to resume")
        if changed is not None:
            return manifest
    manifest = {
        "format": "cdp_fast.samples", "version": 1, "args": plan.args, "n": plan.n,
        "shard_size": plan.shard_size, "num_shards": len(plan.shards), "seeding": SEEDING,
        "shards": {}, "complete": False,
    }
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)
    return manifest


def _shard_ok(out: Path, name, info) -> bool:
    return shard_intact(out / name, info)


def _verify_shards(plan: ShardPlan, manifest):
    """Keep in the manifest only the shards whose file is intact, then absorb the records
    left by a multi-process run (:func:`_absorb_records`). Missing, truncated or corrupted
    shards are dropped (and so regenerated)."""
    good = {}
    expected = {shard_name(k) for k, _, _ in plan.shards}
    for name, info in manifest.get("shards", {}).items():
        if name not in expected:       # only names the plan makes, inside the directory
            warnings.warn(f"{plan.out}: the manifest lists {name!r}, which this run does not make; ignored")
            continue
        if _shard_ok(plan.out, name, info):
            good[name] = info
        else:
            warnings.warn(f"{plan.out / name} is missing, truncated or corrupted (sha256 mismatch); "
                          "it will be regenerated")
    manifest["shards"] = good
    _absorb_records(plan, manifest)


def _absorb_records(plan: ShardPlan, manifest):
    """Add to the manifest the shards that ranks of a multi-process run recorded beside
    themselves (``shard-*.json``), each checked against its file; shards already in the
    manifest are not read again."""
    expected = {shard_name(k): (s, c) for k, s, c in plan.shards}
    good = manifest["shards"]
    for rec in sorted(plan.out.glob("shard-*.json")):
        name = rec.stem + ".npz"
        try:
            info = json.loads(rec.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if name in good or name not in expected or (info.get("start"), info.get("count")) != expected[name]:
            continue
        if _shard_ok(plan.out, name, info):
            good[name] = info


def _finish_manifest(plan: ShardPlan, manifest):
    manifest["complete"] = all(shard_name(k) in manifest["shards"] for k, _, _ in plan.shards)
    atomic_write_json(plan.out / "manifest.json", manifest)
    for rec in plan.out.glob("shard-*.json"):
        if rec.stem + ".npz" in manifest["shards"]:
            rec.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the lock
class DirLock:
    """An exclusive lock on ``out/.lock`` (``fcntl.flock``), held by one process for a whole
    run, with the holder's pid, host and start time written in the file for the message a
    second run gets. The kernel drops the lock when its holder dies (a crash or SIGKILL), so a
    stale lock never blocks; the file itself stays (deleting it would race with a new holder).
    Under torchrun rank 0 holds it for the ranks of its run. Caveat: flock on network file
    systems is only as good as the file system's support (NFSv4 and Lustre with ``flock``
    mounts honour it)."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self._fd = None

    def acquire(self) -> "DirLock":
        import fcntl
        import os
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            raise ValueError(f"out: {self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to "
                             "finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            import os

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _prepare_out(out: Path) -> DirLock:
    """The directory exists, is writable and is ours: locked, stray temp files of a killed
    run (shards and manifest) removed."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out: cannot create {out} ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out: {out} is not writable")
    lock = DirLock(out).acquire()
    try:
        for stray in list(out.glob(".shard-*.tmp")) + list(out.glob(".manifest.json.*.tmp")):
            stray.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------- the loop
def write_shards(plan: ShardPlan, generate: Callable[..., Iterable[dict]], *, device=None,
                 progress: bool = True, desc: str = "cdp_fast.sample", extras=None, merge=None) -> list:
    """Generate every missing shard of ``plan`` into ``plan.out``, in this process or, under
    torchrun, shared among the ranks (shard k on rank k % world_size).

    Args:
        plan: the run's :class:`ShardPlan`.
        generate: ``generate(start, count, advance)`` yields dicts of numpy arrays (the same
            keys each time: ``image`` and any others, e.g. ``label``, ``confidence``) whose
            rows, concatenated, are rows [start, start + count) of the run, and calls
            ``advance(k)`` to move the progress bar by k (fractional) rows as it works. The
            shard also gets ``index`` (the row numbers).
        device: this rank's device (nccl for CUDA, else gloo, when a process group is made).
        progress: a tqdm bar on rank 0. desc: its label.
        extras, merge: ``extras()`` -> a small per-rank object, gathered from every rank at
            the end; ``merge(list) -> dict`` of manifest entries rank 0 stores with the final
            manifest (summaries of the run; not arguments).
    Returns:
        Per-rank throughput: [{rank, images, seconds, images_per_s}] (every rank's).
    Raises:
        ValueError naming the cause when ``plan.out`` is a file, not writable, in use by
        another run (pid, host, start time), or holds a run with other arguments.

    The directory is locked for the run (:class:`DirLock`): two runs into one directory
    cannot mix their shards.
    """
    from tqdm.auto import tqdm

    out = plan.out
    rank, world = distributed.maybe_init(device)
    lock, failure = None, None
    if rank == 0:
        try:
            lock = _prepare_out(out)
            _load_or_start_manifest(plan, may_restart=True)
        except Exception as e:  # noqa: BLE001  (any failure: release, tell every rank, re-raise)
            failure = e
            if lock is not None:
                lock.release()
                lock = None
    _stop_together(failure)
    try:
        return _write(plan, generate, rank, world, progress, desc, extras, merge)
    finally:
        if lock is not None:
            lock.release()


def _stop_together(failure) -> None:
    """Every rank learns whether any rank failed; the failing rank re-raises its own error,
    the others a ValueError naming it (no rank is left waiting at a collective)."""
    reasons = distributed.all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    for r, reason in enumerate(reasons):
        if reason is not None:
            raise ValueError(f"rank {r} stopped the run: {reason}")


def _write(plan, generate, rank, world, progress, desc, extras, merge):
    from tqdm.auto import tqdm

    out = plan.out
    shards = plan.shards
    manifest, failure = None, None
    try:
        manifest = _load_or_start_manifest(plan)
    except Exception as e:  # noqa: BLE001  (e.g. a rank whose arguments differ)
        failure = e
    _stop_together(failure)
    _verify_shards(plan, manifest)
    distributed.barrier()
    todo = [p for p in shards if shard_name(p[0]) not in manifest["shards"] and p[0] % world == rank]
    total = plan.n if world == 1 else sum(c for _, _, c in todo)
    bar = tqdm(total=total, initial=total - sum(c for _, _, c in todo), disable=not progress or rank != 0,
               desc=desc + (f" [rank 0 of {world}]" if world > 1 else ""), unit="img",
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    made, t0 = 0, time.perf_counter()

    def persist(k, start, count, arrays):
        # runs on the writer thread: serialise, write atomically, then record the shard
        data = npz_bytes(arrays)
        name = shard_name(k)
        atomic_write_bytes(out / name, data)
        info = {"start": start, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["shards"][name] = info
        if world == 1:
            manifest["complete"] = len(manifest["shards"]) == len(shards)
            atomic_write_json(out / "manifest.json", manifest)
        else:  # one small record per shard; rank 0 folds them into the manifest at the end
            atomic_write_json(out / f"shard-{k:06d}.json", info)

    # Shard k is written by one background thread while shard k+1 is generated: at most one
    # shard waits in memory, and shards are recorded in order.
    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdp_fast-shard-writer") as writer:
        for k, start, count in todo:
            chunks = list(generate(start, count, bar.update))
            # member order image, index, then the rest: the shards' bytes are part of the format
            cat = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
            arrays = {"image": cat.pop("image"), "index": np.arange(start, start + count, dtype=np.int64),
                      **cat}
            if pending is not None:
                pending.result()  # re-raises a failed write
            pending = writer.submit(persist, k, start, count, arrays)
            made += count
        if pending is not None:
            pending.result()
    bar.close()
    elapsed = time.perf_counter() - t0
    gathered = distributed.all_gather_object(
        ({"rank": rank, "images": made, "seconds": elapsed, "images_per_s": made / elapsed if elapsed > 0 else 0.0},
         None if extras is None else extras()))
    distributed.barrier()
    if rank == 0:  # its manifest was verified at the start and holds its own shards since
        _absorb_records(plan, manifest)
        if merge is not None:
            manifest.update(merge([e for _, e in gathered]))
        _finish_manifest(plan, manifest)
    distributed.barrier()
    return [st for st, _ in gathered]
