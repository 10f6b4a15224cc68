"""One benchmark harness for every cdp_fast micro-benchmark (docs/style.md: Liger-Kernel's habit).

* time: ``triton.testing.do_bench`` on CUDA (quantiles 0.5/0.2/0.8, L2 flushed between runs),
  ``torch.utils.benchmark.Timer`` on CPU (median and 20/80 percentiles of its blocked runs);
* peak memory: ``torch.cuda.max_memory_allocated`` above the pre-call allocation on CUDA; on
  CPU the peak resident-set growth of one call, sampled from /proc/self/statm every 0.5 ms by
  a background thread (torch kernels release the GIL), i.e. what the OS really gave the
  process — allocator caching included, not a tracemalloc estimate;
* ceilings measured in the same run: a large copy (bandwidth, GB/s) and a large matmul
  (FLOP/s), so achieved GB/s and TFLOP/s are reported against this machine, not a data sheet;
* provenance: machine, versions and git commit written beside the numbers, atomically.

A benchmark script supplies callables; this module times them.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

__all__ = ["bench", "peak_rss_growth", "measure_ceilings", "machine_info", "write_json", "device_tag", "git_commit",
           "cpu_model"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotone) peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so that RSS growth measures this call's
    peak rather than what the allocator kept from earlier calls."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_growth(fn, interval_s: float = 5e-4) -> int:
    """Peak RSS growth (bytes) during one call of ``fn`` (CPU memory)."""
    _trim_heap()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base


def bench(fn, *, device="cpu", min_run_time: float = 0.5, warmup: int = 1, rep_ms: int = 100) -> dict:
    """Time ``fn()``: {"median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "mem_kind"}."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        import triton

        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=rep_ms)
        return dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=int(peak),
                    mem_kind="cuda.max_memory_allocated")
    from torch.utils import benchmark as tb

    peak = peak_rss_growth(fn)
    m = tb.Timer(stmt="fn()", globals={"fn": fn},
                 num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    times = sorted(t * 1e3 for t in m.times)
    if len(times) == 1:
        q20 = q80 = times[0]
    else:
        qs = statistics.quantiles(times, n=10, method="inclusive")
        q20, q80 = qs[1], qs[7]
    return dict(median_ms=statistics.median(times), p20_ms=q20, p80_ms=q80, peak_mem_bytes=int(peak),
                mem_kind="peak RSS growth (sampled)")


def measure_ceilings(device="cpu", *, quick: bool = True) -> dict:
    """Measured bandwidth (large copy, GB/s counting read + write) and matmul FLOP/s."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    nbytes = (2 << 30) if cuda else ((128 << 20) if quick else (512 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device=dev, min_run_time=0.3)["median_ms"] * 1e-3
    out = {"copy_bytes": nbytes, "bandwidth_GBps": 2 * nbytes / t / 1e9}
    del src, dst
    sizes = {"float32": 8192 if cuda else (1024 if quick else 2048)}
    if cuda:
        sizes["bfloat16"] = 8192
    for name, n in sizes.items():
        dt = getattr(torch, name)
        x = torch.randn(n, n, device=dev, dtype=dt)
        y = torch.randn(n, n, device=dev, dtype=dt)
        t = bench(lambda: x @ y, device=dev, min_run_time=0.3)["median_ms"] * 1e-3
        out[f"matmul_{name}_TFLOPs"] = 2 * n ** 3 / t / 1e12
        out[f"matmul_{name}_n"] = n
    return out


def git_commit() -> str | None:
    """HEAD's sha, with "-dirty" if tracked files differ from it, not counting
    benchmarks/results/ (where benchmark runs write, so one run does not mark the next dirty)."""
    try:
        here = Path(__file__).resolve().parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "") if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(device="cpu") -> dict:
    info = {
        "device": str(device), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())  # a shared machine shows up here
    except OSError:
        pass
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def device_tag(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        return "cuda-" + torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON atomically (cdp_fast.utils.io.atomic_write_json)."""
    from cdp_fast.utils.io import atomic_write_json

    atomic_write_json(path, obj)


