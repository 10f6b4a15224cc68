"""The phase runner behind scripts/gpu_check.sh: run the GPU validation as phases ordered by
value, each under its own time cap and one global budget, and leave in OUT what every phase
measured, whatever happens to the later ones.

    python scripts/gpu_phases.py run OUT [--tag h100] [--budget 465]   # what gpu_check.sh runs
    python scripts/gpu_phases.py run OUT --dry-run    # CPU: stand-ins for every phase, one timed out
    python scripts/gpu_phases.py summarize OUT        # rebuild OUT/summary.{json,txt} from what is there

Phases (in this order; a phase is skipped when the budget left, minus what it keeps for later
phases, is below its minimum):
  env            GPU, driver, nvcc, CUDA_HOME headers, torch/triton versions, TF32 defaults, and
                 the first-command risk checks (addmm/mm with out_dtype, tl.maximum with NaN)
  build          python setup.py build_ext --inplace (sm_90 only), capped; no pip, no JIT after it
  ext_check      imports cdp_fast.kernels and the prebuilt cdp_fast._C (never a JIT build); without
                 _C the pgd tests are left out and CDP_FAST_PGD_IMPL=composite is set for the rest
  tests          the gpu-marked tests WITHOUT the autotune sweep (-v, --durations, JUnit XML)
  throughput     benchmarks/throughput.py, CIFAR config (digits when diffusers is missing),
                 groups hnm,ref-hnm then ddim,diffusers, 2 rounds; JSON rewritten as it goes
  kernels_goal   benchmarks/kernels.py: the goal-shape rows (m = N = 65536, d = 640; a 1M bank),
                 bf16 and fp32, fixed tiles; JSON rewritten after every row
  then the rest: kernels_ddim, probe (matmul peaks, kernels' registers/spills/wgmma),
                 tests_autotune (the autotune sweep), kernels_autotune, sm90_build (if
                 scripts/build_csrc_sm90.sh exists)

A phase that overruns gets SIGINT (pytest then writes its JUnit XML and summary; the benchmarks
write their partial JSON), then SIGTERM after a grace period, then SIGKILL; its process group
is always cleaned up. After every phase's start and end OUT/summary.json and OUT/summary.txt are
rewritten: the timeline (phase, start, end, status), each phase's key numbers read from whatever
(partial) results exist, which phases ran, timed out, were skipped or not reached, and the goals.

OUT holds at most 8 files (the device tool returns no more): summary.json, summary.txt, run.log
(every phase but the tests), tests.log, tests.xml, throughput-<config>-<tag>.json,
kernels-<tag>.json. Small per-phase JSONs (env, ext_check, probe, the autotune tests' XML)
stay in a work folder and are copied into summary.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ME = str(Path(__file__).resolve())
PY = sys.executable
KILL_WAIT_S = 5.0     # after SIGTERM, and after SIGKILL
MAX_OUT_FILES = 8     # the device tool returns at most 8 files from $OUT
GPU_TEST_FILES = ["tests/ops/test_pgd_step.py", "tests/ops/test_ddim.py", "tests/test_graphs.py",
                  "tests/test_sampler.py", "tests/ops/test_contrastive.py"]   # fast -> slow
# the autotune sweep: ~140 Triton compiles in one process (reviews/gpu.md L1), a phase of its own
AUTOTUNE_K = "every_autotune_candidate or (test_triton_cuda_matches_reference and -1])"
GOAL_SHAPES = "65536:-:640,4096:1000000:640"


@dataclass
class Phase:
    """One step of the check. ``cmd``: argv, or a callable(runner) -> argv | str (a str is the
    reason to skip it). ``kind`` says how its key numbers are read: pytest (JUnit XML, else the
    -v log), throughput / kernels (the benchmark's JSON, partial or not), json (a small JSON
    the command writes, copied into the summary), plain."""
    name: str
    what: str
    cmd: object
    cap_s: float
    min_s: float = 5.0
    reserve_s: float = 0.0      # seconds kept for the phases after it
    grace_s: float = 10.0       # SIGINT -> SIGTERM
    log: str = "run.log"
    kind: str = "plain"
    results: str | None = None  # path of the JSON / XML it writes (OUT or the work folder)
    env: dict = field(default_factory=dict)


def _now_utc():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _default_sigint():
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt even
    when this runner was started with SIGINT ignored (a background job of a non-interactive
    shell): an ignored SIGINT is inherited, and pytest would never write its report."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path) -> dict | None:
    """A JSON file as written so far (None if missing or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None


# ----------------------------------------------------------------------------- key numbers
def junit_counts(path) -> dict | None:
    """Counts, failures and the slowest tests of a JUnit XML (None if missing or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "interrupted": 0}
    failed, times = [], []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        tags = {child.tag for child in tc}
        st = ("interrupted" if not tc.get("name")        # the test running when SIGINT came
              else "failed" if "failure" in tags else "error" if "error" in tags
              else "skipped" if "skipped" in tags else "passed")
        counts[st] += 1
        if st in ("failed", "error"):
            failed.append(name)
        if st == "interrupted":
            continue
        times.append((float(tc.get("time") or 0.0), name))
    times.sort(reverse=True)
    return {"source": "junit", "tests": sum(counts.values()), **counts, "not_passed": failed[:25],
            "slowest": [{"test": n, "s": round(t, 2)} for t, n in times[:8]]}


_V_LINE = re.compile(r"::\S*.*?\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b|\b(PASSED|FAILED|ERROR|SKIPPED)\b.*::")


def log_counts(path, span) -> dict | None:
    """Counts from pytest -v lines in ``path``[span] (when no JUnit XML was written)."""
    try:
        with open(path, "rb") as f:
            f.seek(span[0])
            text = f.read(span[1] - span[0]).decode(errors="replace")
    except (OSError, TypeError, IndexError):
        return None
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    names = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error",
             "SKIPPED": "skipped", "XFAIL": "skipped"}
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")) and " - " in line:
            continue   # the short summary repeats the -v lines
        m = _V_LINE.search(line)
        if m:
            counts[names[m.group(1) or m.group(2)]] += 1
    return {"source": "log (-v lines)", "tests": sum(counts.values()), **counts}


def throughput_key(path) -> dict | None:
    r = read_json(path)
    if r is None:
        return None
    key = {"file": Path(path).name, "config": r.get("config", {}).get("name"), "complete": r.get("complete", True),
           "stage": r.get("stage"), "interrupted": r.get("interrupted", False), "methods": {},
           "ratios": [], "skipped": r.get("skipped", {})}
    for m, v in (r.get("results") or {}).items():
        row = {k: v[k] for k in ("images_per_s", "median_s", "warmup_s", "peak_mem_mib", "flops", "mfu",
                                 "mfu_peak", "mfu_met") if k in v}
        row["rounds"] = len(v.get("times_s", []))
        key["methods"][m] = row
    for q in r.get("ratios") or []:
        key["ratios"].append({k: q.get(k) for k in ("method", "yardstick", "speedup", "speedup_min",
                                                     "speedup_max", "goal", "met", "max_abs_diff")})
    return key


def kernels_key(path, rows_before=0) -> dict | None:
    r = read_json(path)
    if r is None:
        return None
    rows = []
    for row in (r.get("results") or [])[rows_before:]:
        keep = {k: row[k] for k in ("op", "provider", "m", "N", "d", "bank", "shape", "dtype", "median_ms",
                                    "TFLOPs", "exec_TFLOPs", "fraction_of_matmul_ceiling", "GBps",
                                    "fraction_of_copy_bandwidth", "peak_mem_bytes", "skipped") if k in row}
        rows.append(keep)
    return {"file": Path(path).name, "complete": r.get("complete", True), "interrupted": r.get("interrupted", False),
            "ceilings": r.get("ceilings"), "rows": rows}


def key_numbers(ph: Phase, rec: dict) -> dict | None:
    if ph.kind == "pytest":
        return junit_counts(ph.results) or log_counts(rec["log_path"], rec.get("log_span"))
    if ph.kind == "throughput":
        return throughput_key(ph.results)
    if ph.kind == "kernels":
        return kernels_key(ph.results, rec.get("rows_before", 0))
    if ph.kind == "json":
        return read_json(ph.results)
    return None


def goals(records) -> list[str]:
    """GOAL lines from the throughput (CIFAR config only: the digits toy measures no goal) and
    kernel phases' key numbers."""
    lines = []
    for rec in records:
        key = rec.get("key") or {}
        if rec.get("kind") == "throughput" and key:
            if key.get("config") != "cifar":
                lines.append(f"throughput ran --config {key.get('config')}: the GPU goals are NOT measured "
                             "(CIFAR config only)")
                continue
            for q in key["ratios"]:
                if q.get("goal") is not None:
                    lines.append(f"GOAL {q['method']}/{q['yardstick']} >= {q['goal']}x: {q['speedup']:.2f}x -> "
                                 f"{'met' if q['met'] else 'MISSED'}")
            h = key["methods"].get("hnm", {})
            if "mfu" in h:
                lines.append(f"GOAL hnm MFU >= 60% of the bf16 peak: {100 * h['mfu']:.1f}% -> "
                             f"{'met' if h.get('mfu_met') else 'MISSED'}")
        if rec.get("kind") == "kernels" and key:
            for row in key["rows"]:
                if (row.get("op") == "hnm_loss" and row.get("provider") == "fused" and row.get("m") == 65536
                        and row.get("N") == 65536 and row.get("d") == 640 and "fraction_of_matmul_ceiling" in row):
                    frac = row["fraction_of_matmul_ceiling"]
                    lines.append(f"GOAL fused HNM m=N=65536 d=640 {row['dtype']} within 2x of the matmul roofline: "
                                 f"{100 * frac:.1f}% of ceiling -> {'met' if frac >= 0.5 else 'MISSED'}")
    return lines


# ----------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, out: Path, work: Path, budget_s: float, *, tag: str, dry_run: bool, t0: float | None = None):
        self.out, self.work, self.budget_s, self.tag, self.dry_run = out, work, budget_s, tag, dry_run
        self.t0 = time.time() if t0 is None else t0       # wall clock: gpu_check.sh's start counts
        self.records: list[dict] = []
        self.plan: list[str] = []
        self.started = _now_utc()
        self.finished = False
        self.extra_env: dict = {}                          # set by a phase's command for the later ones
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def _stop(self, proc, grace_s) -> str:
        """SIGINT to the phase's process group, SIGTERM after ``grace_s``, SIGKILL after that."""
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, KILL_WAIT_S), (signal.SIGKILL, KILL_WAIT_S)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return "exited"
            try:
                proc.wait(wait)
                return signal.Signals(sig).name
            except subprocess.TimeoutExpired:
                continue
        return "SIGKILL (still running)"

    def run(self, ph: Phase) -> dict:
        rec = {"name": ph.name, "what": ph.what, "kind": ph.kind, "log": ph.log, "cap_s": ph.cap_s}
        try:
            cmd = ph.cmd(self) if callable(ph.cmd) else ph.cmd
        except Exception as e:  # noqa: BLE001 (a broken plan step skips that phase, not the rest)
            cmd = f"its command could not be made: {type(e).__name__}: {e}"
        timeout = min(ph.cap_s, self.left() - ph.reserve_s - ph.grace_s - 2 * KILL_WAIT_S)
        reason = cmd if isinstance(cmd, str) else None
        if reason is None and timeout < ph.min_s:
            reason = (f"budget: {self.left():.0f}s left, {ph.reserve_s:.0f}s kept for later phases, "
                      f"{ph.min_s:.0f}s needed")
        if reason is not None:
            rec.update(status="skipped", reason=reason, start_s=round(self.elapsed(), 1))
            rec["end_s"] = rec["start_s"]
            self.records.append(rec)
            self.write_summary()
            print(f"[{self.elapsed():5.0f}s] SKIP  {ph.name}: {reason}", flush=True)
            return rec
        log_path = self.out / ph.log
        rec.update(status="running", start_s=round(self.elapsed(), 1), timeout_s=round(timeout, 1),
                   cmd=[str(c) for c in cmd], log_path=str(log_path))
        if ph.kind == "kernels":
            rec["rows_before"] = len((read_json(ph.results) or {}).get("results") or [])
        if ph.results:
            rec["results_file"] = str(ph.results)
        self.records.append(rec)
        self.write_summary()
        print(f"[{self.elapsed():5.0f}s] START {ph.name} (timeout {timeout:.0f}s): {ph.what}", flush=True)
        env = {**os.environ, **self.extra_env, **ph.env}
        with open(log_path, "ab") as lf:
            a = lf.seek(0, os.SEEK_END)
            lf.write(f"\n===== [{self.elapsed():.0f}s] {ph.name} (timeout {timeout:.0f}s): "
                     f"{' '.join(map(str, cmd))}\n".encode())
            lf.flush()
            t = time.monotonic()
            proc = subprocess.Popen([str(c) for c in cmd], stdout=lf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(ROOT), env=env,
                                    start_new_session=True, preexec_fn=_default_sigint)
            rec["pgid"] = proc.pid
            stopped = None
            try:
                rc = proc.wait(timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
                stopped = self._stop(proc, ph.grace_s)
                rc = proc.returncode
            except KeyboardInterrupt:          # the runner itself was stopped
                self._stop(proc, min(ph.grace_s, 5.0))
                rec.update(status="interrupted", end_s=round(self.elapsed(), 1))
                rec["key"] = key_numbers(ph, rec)
                self.write_summary()
                raise
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)   # leftovers of this phase's group only
                except (ProcessLookupError, PermissionError):
                    pass
            wall = time.monotonic() - t
            lf.write(f"===== [{self.elapsed():.0f}s] {ph.name}: {status} rc={rc}"
                     f"{' stopped by ' + stopped if stopped else ''} after {wall:.1f}s\n".encode())
            b = lf.tell()
        rec.update(status=status, rc=rc, end_s=round(self.elapsed(), 1), wall_s=round(wall, 1), log_span=[a, b])
        if stopped:
            rec["stopped_by"] = stopped
        rec["key"] = key_numbers(ph, rec)
        self.write_summary()
        print(f"[{self.elapsed():5.0f}s] END   {ph.name}: {status} rc={rc} {wall:.1f}s"
              f"{' (stopped by ' + stopped + ')' if stopped else ''}", flush=True)
        return rec

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict:
        done = {r["name"]: r for r in self.records}
        by = lambda *st: [r["name"] for r in self.records if r["status"] in st]  # noqa: E731
        files = sorted(p.name for p in self.out.iterdir() if p.is_file() and not p.name.startswith("."))
        return {"tool": "scripts/gpu_check.sh (scripts/gpu_phases.py)", "dry_run": self.dry_run, "tag": self.tag,
                "started_utc": self.started, "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
                "finished": self.finished, "plan": self.plan,
                "ran": by("ok", "failed", "timeout", "interrupted"), "ok": by("ok"), "failed": by("failed"),
                "timed_out": by("timeout"), "skipped": by("skipped"), "running": by("running"),
                "not_reached": [n for n in self.plan if n not in done],
                "timeline": [{k: r.get(k) for k in ("name", "start_s", "end_s", "status", "timeout_s")}
                             for r in self.records],
                "goals": goals(self.records), "phases": self.records, "files": files}

    def write_summary(self):
        s = self.summary()
        _atomic_write(self.out / "summary.json", json.dumps(s, indent=2, default=str) + "\n")
        _atomic_write(self.out / "summary.txt", summary_text(s))


def _fmt_key(rec) -> list[str]:
    key, kind = rec.get("key"), rec.get("kind")
    if not key:
        return []
    if kind == "pytest":
        intr = f", {key['interrupted']} interrupted" if key.get("interrupted") else ""
        out = [f"{key['tests']} tests: {key['passed']} passed, {key['failed']} failed, {key['error']} errors, "
               f"{key['skipped']} skipped{intr} (from the {key['source']})"]
        out += [f"  not passed: {n}" for n in key.get("not_passed", [])[:10]]
        out += [f"  slow: {s['s']:.1f}s {s['test']}" for s in key.get("slowest", [])[:5]]
        return out
    if kind == "throughput":
        out = [f"--config {key['config']} ({'complete' if key['complete'] else 'PARTIAL, stage ' + str(key['stage'])})"]
        for m, v in key["methods"].items():
            line = f"  {m:12s} warm-up {v.get('warmup_s', float('nan')):.1f}s"
            if "images_per_s" in v:
                line += f"  {v['images_per_s']:.1f} img/s  median {v['median_s']:.3f}s ({v['rounds']} rounds)"
            if "mfu" in v:
                line += f"  MFU {100 * v['mfu']:.1f}% of {v['mfu_peak']}"
            out.append(line)
        out += [f"  {q['method']}/{q['yardstick']}: {q['speedup']:.2f}x ({q['speedup_min']:.2f}-{q['speedup_max']:.2f})"
                f" max|dx0| {q['max_abs_diff']:.1e}" for q in key["ratios"]]
        out += [f"  skipped {m}: {why[:100]}" for m, why in key.get("skipped", {}).items()]
        return out
    if kind == "kernels":
        out = [f"{key['file']} ({'complete' if key['complete'] else 'PARTIAL'}), {len(key['rows'])} rows"]
        for r in key["rows"]:
            what = (f"hnm {r.get('provider')} m={r.get('m')} N={r.get('N')} d={r.get('d')}" if r.get("op") == "hnm_loss"
                    else f"ddim {r.get('provider')} {r.get('shape')}")
            if "median_ms" in r:
                extra = (f"{r['TFLOPs']:.1f} TFLOP/s ({100 * r.get('fraction_of_matmul_ceiling', 0):.0f}% of ceiling)"
                         if "TFLOPs" in r else f"{r.get('GBps', 0):.0f} GB/s")
                out.append(f"  {what} {r.get('dtype')}: {r['median_ms']:.3f} ms  {extra}")
            else:
                out.append(f"  {what} {r.get('dtype')}: skipped ({str(r.get('skipped'))[:80]})")
        return out
    return [f"  {k}: {json.dumps(v, default=str)[:200]}" for k, v in key.items()][:30]


def summary_text(s: dict) -> str:
    lines = [f"gpu_check summary{' (DRY RUN: stand-ins on CPU)' if s['dry_run'] else ''}: tag {s['tag']}, "
             f"budget {s['budget_s']:.0f}s, elapsed {s['elapsed_s']:.0f}s, "
             f"{'finished' if s['finished'] else 'NOT finished (running or stopped)'}",
             "", f"{'phase':18s} {'start':>6s} {'end':>6s} {'wall':>6s} {'timeout':>7s}  status"]
    for r in s["phases"]:
        end = r.get("end_s")
        lines.append(f"{r['name']:18s} {r.get('start_s', 0):6.0f} {'' if end is None else f'{end:.0f}':>6s} "
                     f"{'' if r.get('wall_s') is None else format(r['wall_s'], '.1f'):>6s} "
                     f"{'' if r.get('timeout_s') is None else format(r['timeout_s'], '.0f'):>7s}  {r['status']}"
                     f"{' (' + r['reason'] + ')' if r.get('reason') else ''}"
                     f"{' stopped by ' + r['stopped_by'] if r.get('stopped_by') else ''}")
    lines += ["", f"ran: {', '.join(s['ran']) or '-'}", f"timed out: {', '.join(s['timed_out']) or '-'}",
              f"failed: {', '.join(s['failed']) or '-'}", f"skipped: {', '.join(s['skipped']) or '-'}",
              f"running: {', '.join(s['running']) or '-'}", f"not reached: {', '.join(s['not_reached']) or '-'}", ""]
    for r in s["phases"]:
        body = _fmt_key(r)
        if body:
            lines.append(f"[{r['name']}]")
            lines += body
    if s["goals"]:
        lines += ["", "goals (stand-in numbers, NOT measurements):" if s["dry_run"] else "goals:"]
        lines += ["  " + g for g in s["goals"]]
    lines += ["", f"files in OUT: {' '.join(s['files'])}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the plans
def _pytest(files, junit, extra=()):
    cmd = [PY, "-m", "pytest", *files, "-v", "--durations=25", "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *extra]
    return cmd


def real_plan(r: Runner) -> list[Phase]:
    out, work, tag = r.out, r.work, r.tag
    kern = out / f"kernels-{tag}.json"

    def tests_cmd(run):
        files = list(GPU_TEST_FILES)
        ext = read_json(work / "ext.json") or {}
        if not ext.get("ext_loaded"):
            files.remove("tests/ops/test_pgd_step.py")  # without _C it would JIT-build inside the cap
            run.extra_env["CDP_FAST_PGD_IMPL"] = "composite"
        extra = ["-m", "gpu", "-k", f"not ({AUTOTUNE_K})"]
        if _importable("xdist"):
            extra += ["-n", "4", "--dist", "loadfile"]
        if _importable("pytest_timeout"):
            extra += ["--timeout=90"]
        return _pytest(files, out / "tests.xml", extra)

    def throughput_cmd(run):
        env = read_json(work / "env.json") or {}
        cfg = "cifar" if env.get("modules", {}).get("diffusers") else "digits"
        ph_by_name["throughput"].results = out / f"throughput-{cfg}-{tag}.json"
        return [PY, "benchmarks/throughput.py", "--config", cfg, "--steps", "10", "--repeats", "2",
                "--methods", "hnm,ref-hnm;ddim,diffusers", "--out", ph_by_name["throughput"].results]

    def autotune_cmd(run):
        extra = ["-m", "gpu", "-k", AUTOTUNE_K] + (["--timeout=120"] if _importable("pytest_timeout") else [])
        return _pytest(["tests/ops/test_contrastive.py"], work / "tests-autotune.xml", extra)

    def sm90_cmd(run):
        script = ROOT / "scripts" / "build_csrc_sm90.sh"
        if not script.is_file():
            return "no scripts/build_csrc_sm90.sh in this checkout"
        ph_by_name["sm90_build"].env["CUDA_PYTHON"] = PY       # this machine's torch is a CUDA build
        return ["bash", str(script), work / "sm90"]            # its files stay out of OUT

    kbench = [PY, "benchmarks/kernels.py", "--config", "gpu", "--out", kern]
    phases = [
        Phase("env", "environment, versions and first-command risk checks", [PY, ME, "env-probe", work / "env.json"],
              cap_s=60, reserve_s=300, kind="json", results=work / "env.json"),
        Phase("build", "setup.py build_ext --inplace (cdp_fast._C, sm_90)", [PY, "setup.py", "build_ext", "--inplace"],
              cap_s=150, min_s=30, reserve_s=280, grace_s=5,
              env={"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                   "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}),
        Phase("ext_check", "cdp_fast.kernels and the prebuilt cdp_fast._C import (no JIT build)",
              [PY, ME, "ext-check", work / "ext.json"], cap_s=45, reserve_s=250, grace_s=5, kind="json",
              results=work / "ext.json"),
        Phase("tests", "gpu-marked tests without the autotune sweep", tests_cmd, cap_s=120, min_s=30,
              reserve_s=150, grace_s=25, log="tests.log", kind="pytest", results=out / "tests.xml"),
        Phase("throughput", "sampling throughput, speed-ups and MFU", throughput_cmd, cap_s=170, min_s=40,
              reserve_s=40, grace_s=15, kind="throughput",
              env={"TORCH_LOGS": "recompiles,graph_breaks,perf_hints"}),
        Phase("kernels_goal", "contrastive kernels at the goal shapes, bf16 + fp32, fixed tiles",
              kbench + ["--only", "loss", "--providers", "fused", "--dtype", "bfloat16,float32",
                        "--shapes", GOAL_SHAPES], cap_s=80, min_s=20, grace_s=10, kind="kernels", results=kern),
        Phase("kernels_ddim", "the fused DDIM update vs eager", kbench + ["--only", "ddim", "--providers",
              "fused,eager", "--dtype", "bfloat16", "--append"], cap_s=40, min_s=15, kind="kernels", results=kern),
        Phase("probe", "matmul peaks; contrastive kernels' registers, spills, shared memory, wgmma",
              [PY, ME, "probe", work / "probe.json"], cap_s=50, min_s=15, kind="json", results=work / "probe.json"),
        Phase("tests_autotune", "the autotune sweep of the contrastive tests", autotune_cmd, cap_s=150, min_s=30,
              grace_s=20, log="tests.log", kind="pytest", results=work / "tests-autotune.xml"),
        Phase("kernels_autotune", "the goal shape with CDP_FAST_AUTOTUNE=1 (bf16)",
              kbench + ["--only", "loss", "--providers", "fused", "--dtype", "bfloat16", "--shapes", "65536:-:640",
                        "--append"], cap_s=60, min_s=20, kind="kernels", results=kern,
              env={"CDP_FAST_AUTOTUNE": "1"}),
        Phase("sm90_build", "scripts/build_csrc_sm90.sh (csrc/ for sm_90, cubin evidence)", sm90_cmd,
              cap_s=90, min_s=30, grace_s=5),
    ]
    ph_by_name = {p.name: p for p in phases}
    return phases


def dry_plan(r: Runner, timeout_phase: str) -> list[Phase]:
    """Every phase of :func:`real_plan` with a stand-in that mimics it on CPU in well under a
    second (the pytest phases run real pytest on a generated file); ``timeout_phase`` hangs
    and is stopped at its cap."""
    out, work = r.out, r.work
    tests_dir = work / "dry_tests"
    tests_dir.mkdir(parents=True, exist_ok=True)
    (tests_dir / "pytest.ini").write_text("[pytest]\n")
    (tests_dir / "test_dry_tests.py").write_text(
        "import pytest\n\ndef test_one():\n    assert 1 + 1 == 2\n\ndef test_two():\n    pass\n\n"
        "@pytest.mark.skip(reason='no GPU')\ndef test_three():\n    pass\n")
    (tests_dir / "test_dry_autotune.py").write_text(
        "def test_candidate_ok():\n    pass\n\ndef test_candidate_wrong():\n    assert 0.1 + 0.2 == 0.3\n")
    (tests_dir / "test_dry_hang.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(600)\n")
    pyt_env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

    def pyt(name, junit):
        stem = "hang" if timeout_phase == name else ("autotune" if "autotune" in name else "tests")
        f = f"test_dry_{stem}.py"
        return _pytest([str(tests_dir / f)], junit, ["--rootdir", str(tests_dir), "-c", str(tests_dir / "pytest.ini")])

    def bench(kind, path, items, name, append=False):
        hang = ["--hang-after", "1"] if timeout_phase == name else []
        return [PY, ME, "standin", "bench", kind, path, "--items", items, *hang] + (["--append"] if append else [])

    kern = out / "kernels-dry.json"
    sm90 = ROOT / "scripts" / "build_csrc_sm90.sh"
    sleep = lambda what: [PY, ME, "standin", "sleep", "0.05", what]  # noqa: E731
    phases = [
        Phase("env", "stand-in: environment probe", [PY, ME, "standin", "env", work / "env.json"], cap_s=10,
              kind="json", results=work / "env.json"),
        Phase("build", "stand-in: the capped build", sleep("build_ext --inplace"), cap_s=10),
        Phase("ext_check", "stand-in: import checks", [PY, ME, "standin", "env", work / "ext.json"], cap_s=10,
              kind="json", results=work / "ext.json"),
        Phase("tests", "stand-in: a tiny pytest run", pyt("tests", out / "tests.xml"), cap_s=20, log="tests.log",
              kind="pytest", results=out / "tests.xml", env=pyt_env),
        Phase("throughput", "stand-in: a throughput run writing partial JSON",
              bench("throughput", out / "throughput-dry-dry.json", "hnm,ref-hnm,ddim,diffusers", "throughput"),
              cap_s=10, kind="throughput", results=out / "throughput-dry-dry.json"),
        Phase("kernels_goal", "stand-in: kernel rows written one by one",
              bench("kernels", kern, "65536:-:640:bfloat16,65536:-:640:float32", "kernels_goal"), cap_s=10,
              kind="kernels", results=kern),
        Phase("kernels_ddim", "stand-in: more kernel rows (appended)",
              bench("kernels", kern, "512x3x32x32:bfloat16", "kernels_ddim", append=True), cap_s=10,
              kind="kernels", results=kern),
        Phase("probe", "stand-in: the resource probe", [PY, ME, "standin", "env", work / "probe.json"], cap_s=10,
              kind="json", results=work / "probe.json"),
        Phase("tests_autotune", "stand-in: a pytest run with a failing test",
              pyt("tests_autotune", work / "tests-autotune.xml"), cap_s=20, log="tests.log", kind="pytest",
              results=work / "tests-autotune.xml", env=pyt_env),
        Phase("kernels_autotune", "stand-in: one more row",
              bench("kernels", kern, "65536:-:640:bfloat16", "kernels_autotune", append=True), cap_s=10,
              kind="kernels", results=kern),
        Phase("sm90_build", "stand-in: bash -n scripts/build_csrc_sm90.sh",
              (["bash", "-n", str(sm90)] if sm90.is_file() else "no scripts/build_csrc_sm90.sh in this checkout"),
              cap_s=10),
    ]
    for p in phases:
        p.grace_s = 3.0 if p.kind == "pytest" else 2.0
        p.min_s = 1.0
        if p.name == timeout_phase:
            p.cap_s = 1.5 if p.kind != "pytest" else 4.0   # pytest's start-up: ~1-2 s on a busy CPU
    return phases


def _importable(mod) -> bool:
    return subprocess.run([PY, "-c", f"import {mod}"], capture_output=True).returncode == 0


def cmd_run(args) -> int:
    out = Path(args.out).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="cdp_gpu_work_")).resolve()
    t0 = float(os.environ["GPU_CHECK_T0"]) if os.environ.get("GPU_CHECK_T0") else None
    budget = args.budget if args.budget is not None else (40.0 if args.dry_run else 465.0)
    r = Runner(out, work, budget, tag=args.tag or ("dry" if args.dry_run else "gpu"), dry_run=args.dry_run, t0=t0)
    for name in ("summary.json", "summary.txt", "tests.xml", "tests.log"):   # run.log: gpu_check.sh starts it
        (out / name).unlink(missing_ok=True)
    for pattern in ("throughput-*.json", "kernels-*.json"):
        for p in glob.glob(str(out / pattern)):
            os.unlink(p)
    phases = dry_plan(r, args.timeout_phase) if args.dry_run else real_plan(r)
    r.plan = [p.name for p in phases]
    print(f"gpu_phases: {'DRY RUN, ' if args.dry_run else ''}OUT {out}, work {work}, budget {budget:.0f}s, "
          f"{len(phases)} phases", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    try:
        for ph in phases:
            r.run(ph)
    except KeyboardInterrupt as e:
        print(f"gpu_phases: stopped ({e}); summary kept", file=sys.stderr, flush=True)
        r.write_summary()
        return 130
    r.finished = True
    r.write_summary()
    if args.dry_run and not args.work:
        shutil.rmtree(work, ignore_errors=True)    # its small files are copied into summary.json
    print()
    print((out / "summary.txt").read_text(), flush=True)
    n_files = len([p for p in out.iterdir() if p.is_file()])
    if n_files > MAX_OUT_FILES:
        print(f"gpu_phases: WARNING {n_files} files in OUT, the device tool returns {MAX_OUT_FILES}", file=sys.stderr)
    return 0


def cmd_summarize(args) -> int:
    """Rebuild summary.json/.txt from a summary.json and the result files in OUT (e.g. after
    the runner itself was killed): key numbers re-read from the (partial) results."""
    out = Path(args.out)
    s = read_json(out / "summary.json")
    if s is None:
        print(f"gpu_phases: no readable {out / 'summary.json'}", file=sys.stderr)
        return 2
    r = Runner(out, Path(tempfile.gettempdir()), s.get("budget_s", 0), tag=s.get("tag", "?"),
               dry_run=s.get("dry_run", False), t0=time.time() - s.get("elapsed_s", 0))
    r.plan, r.records = s.get("plan", []), s.get("phases", [])
    r.started, r.finished = s.get("started_utc"), s.get("finished")
    for rec in r.records:
        res = rec.get("results_file")
        if res and rec.get("kind") in ("throughput", "kernels", "pytest", "json") and rec["status"] != "skipped":
            ph = Phase(rec["name"], rec.get("what", ""), [], 0, kind=rec["kind"], results=res)
            rec["key"] = key_numbers(ph, rec) or rec.get("key")
    r.write_summary()
    print((out / "summary.txt").read_text())
    return 0


# ----------------------------------------------------------------------------- probes (run as phases)
def env_probe(path) -> int:
    """GPU, toolkit and versions, and the first-command risk checks; JSON to ``path``."""
    info = {"python": sys.version.split()[0], "CUDA_HOME": os.environ.get("CUDA_HOME")}
    for name, argv in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                       "--format=csv,noheader"]), ("nvcc", ["nvcc", "--version"])):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            info[name] = res.stdout.strip().splitlines()[-2:]
        except (OSError, subprocess.SubprocessError) as e:
            info[name] = f"unavailable: {e}"
    import importlib

    import torch
    from torch.utils import cpp_extension as ce

    home = ce.CUDA_HOME
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                cuda_available=torch.cuda.is_available(), torch_CUDA_HOME=home,
                cublas_header=bool(home and Path(home, "include", "cublas_v2.h").is_file()),
                cusparse_header=bool(home and Path(home, "include", "cusparse.h").is_file()),
                tf32={"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                      "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32})
    mods = {}
    for m in ("triton", "diffusers", "hypothesis", "xdist", "pytest_timeout", "ninja", "numpy"):
        try:
            mods[m] = str(getattr(importlib.import_module(m), "__version__", "ok"))
        except Exception as e:  # noqa: BLE001
            mods[m] = None
            info.setdefault("missing", {})[m] = type(e).__name__
    info["modules"] = mods
    checks = {}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        a = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(32, 48, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("addmm_out_dtype_fp32_self", lambda: torch.addmm(torch.zeros(64, 48, device="cuda"), a, b,
                                                                           out_dtype=torch.float32)),
                         ("mm_out_dtype", lambda: torch.mm(a, b, out_dtype=torch.float32))):
            try:
                res = fn()
                checks[name] = f"ok ({res.dtype}, max err {float((res - a.float() @ b.float()).abs().max()):.1e})"
            except Exception as e:  # noqa: BLE001
                checks[name] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        checks["tl_maximum_nan"] = _nan_max_check(torch)
        checks.update(_risk_checks(torch))
    info["checks"] = checks
    Path(path).write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(json.dumps(info, indent=2, default=str))
    return 0


def _risk_checks(torch, device: str = "cuda") -> dict:
    """What reading the code could not settle (issue 25, item 5), each checked on the GPU and
    reported as a line (never raising): the contrastive op's NaN rule in the compiled kernels vs
    the chunked torch path; the backward's candidate tiles split at CUDA's grid-y limit (a
    lowered GRID_Y_MAX must give bitwise the same gradients); one step-graph capture over three
    sample() calls; the number of devices (the device guard and record_stream matter only with
    more than one). ``device`` "cpu" runs the same checks through the Triton interpreter and the
    step graph's CPU stand-in (tests/test_gpu_check.py)."""
    cuda = device == "cuda"
    impl = "triton" if cuda else "interpret"
    out = {"device_count": str(torch.cuda.device_count())}
    sys.path.insert(0, str(ROOT))

    def attempt(name, fn):
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001
            out[name] = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    def nan_rule():
        from cdp_fast.ops.contrastive import contrastive_stats

        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(8, 32, device=device, generator=g)
        k = torch.randn(300, 32, device=device, generator=g)
        k[5] = float("nan")
        res = {i: contrastive_stats(a, k, None, None, 10.0, 1.0, False, -1.0, i)[0] for i in (impl, "torch")}
        same = torch.equal(res[impl].isnan(), res["torch"].isnan()) and bool(res["torch"].isnan().any())
        fin = res["torch"].isfinite()
        err = float((res[impl][fin] - res["torch"][fin]).abs().max()) if bool(fin.any()) else 0.0
        return f"{'ok' if same else 'MISMATCH'}: NaN rows {impl} {int(res[impl].isnan().sum())} / torch " \
               f"{int(res['torch'].isnan().sum())}, max err on finite rows {err:.1e}"

    def grid_split():
        from cdp_fast.ops.contrastive import contrastive_stats
        from cdp_fast.kernels import contrastive as kc      # importable after ops (backend loads it)

        a = torch.randn(16, 32, device=device, requires_grad=True)
        k = torch.randn(5000 if cuda else 300, 32, device=device)

        def grad():
            L1 = contrastive_stats(a, k, None, None, 10.0, 1.0, False, -1.0, impl)[0]
            return torch.autograd.grad(L1.sum(), a)[0]

        full = grad()
        saved = kc.GRID_Y_MAX
        try:
            kc.GRID_Y_MAX = 2
            split = grad()
        finally:
            kc.GRID_Y_MAX = saved
        return f"{'ok' if torch.equal(full, split) else 'MISMATCH'}: GRID_Y_MAX=2 vs {saved}, " \
               f"max diff {float((full - split).abs().max()):.1e}"

    def captures():
        import cdp_fast
        from cdp_fast.models import digits

        eps, feats = digits.load_digits_eps_model(device), digits.digits_features(device)
        kw = dict(loss="hnm", lam=1e4, tau=10.0, features=feats, form="anchors", guide_window=None, embedding=None,
                  image_shape=digits.IMAGE_SHAPE, batch_size=32, steps=10, progress=False, compile=False)
        # the step graph is wanted only when compiling ("auto"); "1" asks for it without paying
        # for a compile, which is what this check needs (one capture over three calls)
        saved = os.environ.get("CDP_FAST_STEP_GRAPH")
        os.environ["CDP_FAST_STEP_GRAPH"] = "1"
        try:
            seen = [cdp_fast.sample(eps, 32, seed=i, device=device, **kw).meta.get("step_graph") or {}
                    for i in range(3)]
        finally:
            if saved is None:
                os.environ.pop("CDP_FAST_STEP_GRAPH", None)
            else:
                os.environ["CDP_FAST_STEP_GRAPH"] = saved
        cap = [s.get("captured") for s in seen]
        rep = [s.get("replayed") for s in seen]
        ok = bool(cap[0]) and not any(cap[1:]) and all(rep)
        where = f"reserved {torch.cuda.memory_reserved() >> 20} MiB" if cuda else "CPU stand-in"
        return f"{'ok' if ok else 'UNEXPECTED'}: captured per call {cap}, replayed {rep}, {where}"

    attempt("contrastive_nan_rule", nan_rule)
    attempt("grid_y_split", grid_split)
    attempt("step_graph_captures_3_calls", captures)
    return out


def _nan_max_check(torch) -> str:
    """Does tl.maximum / tl.max propagate NaN on this GPU (the interpreter's numpy does)?"""
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def k(x_ptr, y_ptr, out_ptr, red_ptr):
            offs = tl.arange(0, 16)
            x = tl.load(x_ptr + offs)
            y = tl.load(y_ptr + offs)
            tl.store(out_ptr + offs, tl.maximum(x, y))
            tl.store(red_ptr, tl.max(x, axis=0))

        x = torch.zeros(16, device="cuda")
        x[3] = float("nan")
        y = torch.ones(16, device="cuda")
        out = torch.empty(16, device="cuda")
        red = torch.empty(1, device="cuda")
        k[(1,)](x, y, out, red)
        torch.cuda.synchronize()
        return (f"maximum(NaN, 1) = {float(out[3])}, max over a row with a NaN = {float(red[0])} "
                "(the interpreter gives nan for both)")
    except Exception as e:  # noqa: BLE001
        return f"not checked: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def ext_check(path) -> int:
    """cdp_fast.kernels importable (else symlinked from kernels/), the prebuilt cdp_fast._C
    imported directly — never ``load_extension()``, which would JIT-build with no time limit."""
    res = {}
    sys.path.insert(0, str(ROOT))
    try:
        import cdp_fast.kernels.contrastive  # noqa: F401
        import cdp_fast.kernels.ddim  # noqa: F401
        res["kernels_import"] = "ok"
    except Exception as e:  # noqa: BLE001
        link = ROOT / "cdp_fast" / "kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "kernels")
            res["kernels_import"] = f"{type(e).__name__}: symlinked cdp_fast/kernels -> ../kernels"
        else:
            res["kernels_import"] = f"FAILED {type(e).__name__}: {e}"
    import importlib.util

    import torch

    spec = importlib.util.find_spec("cdp_fast._C")
    res["prebuilt"] = spec.origin if spec else None
    if spec and spec.origin:
        so = Path(spec.origin)
        srcs = [p for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")]
        newest = max((p.stat().st_mtime for p in srcs), default=0.0)
        built_now = so.stat().st_mtime >= float(os.environ.get("GPU_CHECK_T0") or "inf")
        if so.stat().st_mtime <= newest:
            res["older_than_sources"] = True
            if built_now:
                # built by this run's build phase, yet dated before the copied sources (their
                # mtimes came from a machine whose clock is ahead): cdp_fast.ops.pgd_step would
                # call it stale and JIT-build in a later phase; date it after them
                os.utime(so, (newest + 1, newest + 1))
                res["mtime_adjusted"] = True
    try:
        import cdp_fast._C  # noqa: F401
        res["ext_loaded"] = True
    except ImportError as e:
        res["ext_loaded"] = False
        res["ext_error"] = str(e)[:300]
    res["cuda_kernel_registered"] = bool(torch._C._dispatch_has_kernel_for_dispatch_key("cdp_fast::pgd_step", "CUDA")) \
        if res["ext_loaded"] else False
    Path(path).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if res["ext_loaded"] else 1


def probe(path) -> int:
    """Measured matmul peaks (bf16, tf32, fp32) and the contrastive kernels' resources at d = 640."""
    import torch

    res = {}

    def peak(dtype, tf32=False):
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        torch.backends.cuda.matmul.allow_tf32 = old
        return 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12

    res["peaks_TFLOPs"] = {"bf16": peak(torch.bfloat16), "tf32": peak(torch.float32, True), "fp32": peak(torch.float32)}
    sys.path.insert(0, str(ROOT))
    kernels = []
    try:
        from cdp_fast.kernels import contrastive as kc
        from cdp_fast.ops import contrastive as oc
        for dt in (torch.float32, torch.bfloat16):
            a = torch.randn(1024, 640, device="cuda", dtype=dt, requires_grad=True)
            p = torch.randn(1024, 640, device="cuda", dtype=dt)
            oc.contrastive_loss(a, p, None, tau=0.5, tau_plus=0.1, beta=1.0, clamp=True, impl="triton").backward()
        torch.cuda.synchronize()
        for name in ("_stats_fwd_kernel", "_stats_bwd_d_kernel"):
            for entry in getattr(getattr(kc, name, None), "device_caches", {}).values():
                for k in (entry[0] if isinstance(entry, tuple) else entry).values():
                    md, ptx = getattr(k, "metadata", None), getattr(k, "asm", {}).get("ptx", "")
                    kernels.append({"kernel": name, "regs": getattr(k, "n_regs", None),
                                    "spills": getattr(k, "n_spills", None), "shared": getattr(md, "shared", None),
                                    "warps": getattr(md, "num_warps", None), "stages": getattr(md, "num_stages", None),
                                    "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx})
    except Exception as e:  # noqa: BLE001
        res["kernel_probe_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["kernels"] = kernels
    Path(path).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps(res, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------- stand-ins (--dry-run)
def standin(args) -> int:
    if args.what == "sleep":
        print(f"stand-in: {' '.join(args.rest[1:])}", flush=True)
        time.sleep(float(args.rest[0]))
        return 0
    if args.what == "env":
        Path(args.rest[0]).write_text(json.dumps({"stand_in": True, "python": sys.version.split()[0],
                                                  "modules": {"diffusers": None}}) + "\n")
        print("stand-in env probe", flush=True)
        return 0
    # bench KIND PATH --items a,b --hang-after N [--append]: the benchmarks' partial-JSON habit
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["throughput", "kernels"])
    ap.add_argument("path")
    ap.add_argument("--items", required=True)
    ap.add_argument("--hang-after", type=int, default=None)
    ap.add_argument("--append", action="store_true")
    a = ap.parse_args(args.rest)
    path = Path(a.path)
    items = a.items.split(",")
    prev = (read_json(path) or {}) if a.append else {}
    state = {"complete": False, "interrupted": False, "stage": "setup"}
    rows = list(prev.get("results", [])) if a.kind == "kernels" else {}

    def write():
        rec = dict(state, results=rows, config={"name": "dry"})
        if a.kind == "kernels":
            rec["ceilings"] = {"matmul_float32_TFLOPs": 1.0, "bandwidth_GBps": 1.0}
        _atomic_write(path, json.dumps(rec, indent=2) + "\n")

    try:
        write()
        for i, item in enumerate(items):
            if a.hang_after is not None and i >= a.hang_after:
                state["stage"] = f"hanging before {item}"
                write()
                print(f"stand-in: hanging before {item}", flush=True)
                time.sleep(600)
            time.sleep(0.05)
            if a.kind == "throughput":
                rows[item] = {"warmup_s": 0.1, "times_s": [0.01], "median_s": 0.01, "images_per_s": 100.0}
            else:
                spec = item.split(":")
                row = {"op": "hnm_loss", "provider": "fused", "dtype": spec[-1], "median_ms": 1.0, "TFLOPs": 0.5,
                       "fraction_of_matmul_ceiling": 0.5}
                if len(spec) == 4:
                    row.update(m=int(spec[0]), N=int(spec[0]) if spec[1] == "-" else int(spec[1]), d=int(spec[2]))
                else:
                    row.update(op="ddim_update", shape=[int(x) for x in spec[0].split("x")], GBps=1.0,
                               fraction_of_copy_bandwidth=0.5)
                    del row["TFLOPs"], row["fraction_of_matmul_ceiling"]
                rows.append(row)
            state["stage"] = f"done {item}"
            write()
            print(f"stand-in: {item} done", flush=True)
    except KeyboardInterrupt:
        state["interrupted"] = True
        write()
        print("stand-in: interrupted, partial JSON kept", file=sys.stderr, flush=True)
        return 130
    state["complete"] = True
    write()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the phases into OUT")
    r.add_argument("out")
    r.add_argument("--dry-run", action="store_true", help="stand-ins on CPU; one phase is timed out on purpose")
    r.add_argument("--timeout-phase", default="throughput", help="--dry-run: the phase that hangs (default throughput)")
    r.add_argument("--budget", type=float, default=None, help="seconds for everything (default 465; dry run 40)")
    r.add_argument("--tag", default=None, help="GPU tag in file names (h100, h200)")
    r.add_argument("--work", default=None, help="folder for the small per-phase files (default: a new temp folder)")
    s = sub.add_parser("summarize", help="rebuild OUT/summary.{json,txt} from what is in OUT")
    s.add_argument("out")
    for name in ("env-probe", "ext-check", "probe"):
        sub.add_parser(name).add_argument("path")
    st = sub.add_parser("standin")
    st.add_argument("what", choices=["sleep", "env", "bench"])
    st.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "summarize":
        return cmd_summarize(args)
    if args.cmd == "standin":
        return standin(args)
    return {"env-probe": env_probe, "ext-check": ext_check, "probe": probe}[args.cmd](args.path)


if __name__ == "__main__":
    raise SystemExit(main())
