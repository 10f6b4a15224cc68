#!/usr/bin/env bash
# cdp_fast: the project's one-command GPU validation (<= 8 min wall on one H200, sm_90). Run it
# first in any session that is lent a GPU; commit the JSONs it writes as
# benchmarks/results/*-<gpu>.json and put the numbers in the README.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR: $OUT on the device tool (default /tmp/cdp_gpu_out)
#
# Without a CUDA device it stops at once with exit status 2 and one line saying so.
#
# What it does, in order of importance (each phase has its own timeout; a global deadline keeps
# the whole script under DEADLINE seconds, default 465):
#   0. environment: GPU, driver, nvcc, torch/triton versions, TF32 defaults; torch==2.13.0 is
#      pip-installed ONLY if no CUDA torch is importable (the lent H200 image already has torch
#      2.11 + Triton 3.6 and no network); wheels carried in .whl/ (e.g. diffusers) are installed
#      to /tmp/site.
#   1. build: pip install --no-build-isolation --no-deps -e . (CUDAExtension cdp_fast._C, sm_90
#      only), then checks that cdp_fast.kernels imports and that cdp_fast::pgd_step has a CUDA
#      kernel (cdp_fast.ops.pgd_step).
#   2. the gpu-marked tests (tests/ops/*, tests/test_sampler.py, tests/test_graphs.py; -m gpu; junit XML).
#   3. throughput benchmark, CIFAR config (DDPM UNet 35.7M + WRN-28-10, batch 512), 10 uniform
#      steps, 3 interleaved rounds, methods ddim/diffusers/hnm/ref-hnm; TORCH_LOGS=recompiles,
#      perf_hints to catch recompiles and cudagraph skips. Falls back to --config digits when
#      diffusers is missing (then the goals are NOT measured).
#   4. kernel benchmark (benchmarks/kernels.py = benchmarks/ops/{contrastive,ddim}.py), GPU
#      config: bf16 fused loss, then fp32 fused+eager loss (the dense "compiled" provider is
#      left out: it compiles 19 shapes, minutes), then the DDIM update.
#   5. probe: registers/spills/shared memory and wgmma-vs-mma of the contrastive kernels
#      (d=640, fp32 and bf16), and a summary with every goal met/missed and MFU against the
#      MEASURED bf16 peak.
#
# How to run it with the device tool (the repo travels; this file is inside it):
#   # the H200 image has no diffusers and no network; for --config cifar carry a wheel (pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Results in OUT_DIR (<= 8 files, the tool's limit): summary.txt build.log tests.log tests.xml
#   bench.log throughput-<cfg>-<gpu>.json kernels-bf16-<gpu>.json kernels-fp32-<gpu>.json (the DDIM
#   micro-benchmark's JSON stays in /tmp/cdp_res; its rows are in bench.log and summary.txt).
# Written against torch 2.11 / Triton 3.6 (the lent image) and 2.13 / 3.9 (the dev machine): it
# uses only APIs present in both (torch.library.triton_op, wrap_triton, triton.testing.do_bench).
set -uo pipefail

ROOT=${CDP_ROOT:-$PWD}
cd "$ROOT" || exit 2
if [ ! -f setup.py ] || [ ! -d kernels ] || [ ! -d cdp_fast ]; then
    echo "run from the cdp_fast repository root (got $ROOT)" >&2; exit 2
fi
OUT=${1:-${OUT:-/tmp/cdp_gpu_out}}
RES=/tmp/cdp_res
mkdir -p "$OUT" "$RES"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0            # tests/conftest.py only setdefault()s it to 1 without a GPU
export CDP_FAST_BACKEND=auto CDP_FAST_PGD_IMPL=auto
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # setup.py's default builds 5 archs
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_DEFAULT_TIMEOUT=10 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (nvidia-smi finds none): this script validates the GPU path; nothing run" >&2
    exit 2
fi
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' \
          | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+//; s/-+$//' | cut -d- -f1)
GPU_TAG=${GPU_TAG:-gpu}

T0=$SECONDS
DEADLINE=${DEADLINE:-465}
S="$OUT/summary.txt"
: > "$S"
log()  { echo "[$((SECONDS - T0))s] $*" | tee -a "$S"; }
left() { echo $((DEADLINE - (SECONDS - T0))); }
# cap MAX RESERVE: a timeout of at most MAX seconds that still leaves RESERVE for later phases
cap()  { local c=$1 r=$2 l; l=$(( $(left) - r )); (( l > c )) && l=$c; (( l < 5 )) && l=5; echo "$l"; }
# phase NAME TIMEOUT LOGFILE CMD...
phase() {
    local name=$1 t=$2 logf=$3 rc; shift 3
    log "START $name (timeout ${t}s): $*"
    echo "===== $name: $*" >> "$logf"
    timeout -k 5 "$t" "$@" >> "$logf" 2>&1
    rc=$?
    log "END   $name rc=$rc$( [ "$rc" = 124 ] && echo ' TIMEOUT')"
    return "$rc"
}

# ------------------------------------------------------------------ 0. environment
log "repo $ROOT, OUT $OUT, deadline ${DEADLINE}s"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version 2>&1 | tail -n 2; } >> "$S" 2>&1
BARE=0
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    BARE=1
    log "no CUDA torch importable: pip install torch==2.13.0 (needs a registry)"
    timeout 240 "$PY" -m pip install -q --retries 1 torch==2.13.0 >> "$OUT/build.log" 2>&1 \
        || log "pip install torch==2.13.0 FAILED"
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >> "$OUT/build.log" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" && log "carried wheels installed: $(ls .whl)"
fi
# on a bare machine with a registry: the test/benchmark extras (not tried on the lent image)
if [ "$BARE" = 1 ]; then
    for pair in hypothesis:hypothesis pytest_timeout:pytest-timeout xdist:pytest-xdist \
                diffusers:diffusers tqdm:tqdm ninja:ninja numpy:numpy; do
        mod=${pair%%:*}; pkg=${pair##*:}
        "$PY" -c "import $mod" 2>/dev/null \
            || timeout 90 "$PY" -m pip install -q --retries 0 "$pkg" >> "$OUT/build.log" 2>&1 || true
    done
fi
"$PY" - >> "$S" 2>&1 <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(),
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "diffusers", "hypothesis", "xdist", "pytest_timeout", "ninja", "numpy"):
    try:
        print(f"  {m}", getattr(importlib.import_module(m), "__version__", "ok"))
    except Exception as e:  # noqa: BLE001
        print(f"  {m} MISSING ({type(e).__name__})")
print("TF32 defaults: cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32,
      "| cuda.matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32,
      "(the 'eager fp32' yardsticks run their convolutions in TF32 when the first is True)")
EOF

# ------------------------------------------------------------------ 1. build
phase build "$(cap 110 330)" "$OUT/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
  || phase build_inplace "$(cap 90 330)" "$OUT/build.log" "$PY" setup.py build_ext --inplace
if ! "$PY" -c 'import cdp_fast.kernels.contrastive' 2>/dev/null; then
    # the tests importorskip cdp_fast.kernels: without it they SKIP instead of failing
    ln -sfn ../kernels cdp_fast/kernels && log "cdp_fast.kernels not importable: symlinked cdp_fast/kernels -> ../kernels"
fi
"$PY" - >> "$S" 2>&1 <<'EOF'
import torch
try:
    import cdp_fast.kernels.contrastive  # noqa: F401
    import cdp_fast.kernels.ddim  # noqa: F401
    print("cdp_fast.kernels import: ok")
except Exception as e:  # noqa: BLE001
    print("cdp_fast.kernels import: FAILED", type(e).__name__, e)
from cdp_fast.ops import pgd_step as pgd_op
print("pgd_step extension loaded:", pgd_op.load_extension(), "| error:", pgd_op.extension_error())
print("pgd_step CUDA kernel registered:",
      torch._C._dispatch_has_kernel_for_dispatch_key("cdp_fast::pgd_step", "CUDA"))
EOF

# ------------------------------------------------------------------ 2. gpu-marked tests
XD=""
"$PY" -c 'import xdist' 2>/dev/null && XD="-n 4 --dist loadfile"
TO=""
"$PY" -c 'import pytest_timeout' 2>/dev/null && TO="--timeout=150"
# shellcheck disable=SC2086
phase gpu_tests "$(cap 140 215)" "$OUT/tests.log" \
    "$PY" -m pytest -m gpu $XD $TO -p no:cacheprovider -rA -q --junitxml="$OUT/tests.xml" \
    tests/ops/test_contrastive.py tests/ops/test_ddim.py tests/ops/test_pgd_step.py tests/test_sampler.py tests/test_graphs.py
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|error)" "$OUT/tests.log" | tail -n 25 >> "$S"

# ------------------------------------------------------------------ 3. sampling throughput
CFG=cifar
if ! "$PY" -c 'from diffusers import UNet2DModel, DDIMScheduler' 2>/dev/null; then
    CFG=digits
    log "diffusers missing: throughput runs --config digits (8x8 toy: the GPU goals are NOT measured)"
fi
phase throughput "$(cap 185 70)" "$OUT/bench.log" \
    env TORCH_LOGS=recompiles,perf_hints "$PY" benchmarks/throughput.py --config "$CFG" \
    --steps 10 --repeats 3 --methods ddim,diffusers,hnm,ref-hnm --out "$RES/throughput-$CFG-$GPU_TAG.json"
grep -v '^=====' "$OUT/bench.log" | grep -E "Recompiling|stride mismatch|skipping cudagraphs|PerfHint|graph break" \
    | sort | uniq -c | sort -rn | head -n 12 >> "$S"
cp "$RES"/throughput-*.json "$OUT"/ 2>/dev/null

# ------------------------------------------------------------------ 4. kernel micro-benchmarks
# bf16 with the autotuned tiles (CDP_FAST_AUTOTUNE=1; the probe below prints the choices), fp32
# with the fixed default tiles: the two views of the contrastive kernels
phase kernels_bf16 "$(cap 80 40)" "$OUT/bench.log" \
    env CDP_FAST_AUTOTUNE=1 "$PY" benchmarks/kernels.py --config gpu --dtype bfloat16 --providers fused --only loss \
    --out "$RES/kernels-bf16-$GPU_TAG.json"
cp "$RES"/kernels-bf16-*.json "$OUT"/ 2>/dev/null
if (( $(left) > 60 )); then
    phase kernels_fp32 "$(cap 110 35)" "$OUT/bench.log" \
        "$PY" benchmarks/kernels.py --config gpu --providers fused,eager --only loss \
        --out "$RES/kernels-fp32-$GPU_TAG.json"
    cp "$RES"/kernels-fp32-*.json "$OUT"/ 2>/dev/null
fi
if (( $(left) > 60 )); then   # DDIM update: memory-bound, small; rows go to bench.log
    phase kernels_ddim "$(cap 40 30)" "$OUT/bench.log" \
        "$PY" benchmarks/kernels.py --config gpu --providers fused,eager --only ddim \
        --out "$RES/kernels-ddim.json"
fi

# ------------------------------------------------------------------ 5. probe + summary
cat > "$RES/summary.py" <<'EOF'
"""Kernel resource probe and goal summary (reads the JSONs the benchmarks wrote)."""
import glob
import json
import math
import os
import time

import torch

res = os.environ.get("RES", "/tmp/cdp_res")
dev = "cuda"

# --- measured bf16 / fp32 / tf32 matmul peaks (the MFU denominators)
def peak(dtype, tf32=False):
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
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
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)

peaks = {"bf16": peak(torch.bfloat16), "tf32": peak(torch.float32, True), "fp32": peak(torch.float32)}
print("measured matmul peaks TFLOP/s:", {k: round(v / 1e12, 1) for k, v in peaks.items()})

# --- contrastive kernels: registers, spills, shared memory, wgmma or not (d = 640)
try:
    os.environ["CDP_FAST_AUTOTUNE"] = "1"          # probe the autotuned launches (and print their choices)
    from cdp_fast.kernels import contrastive as kc
    from cdp_fast.ops import contrastive as oc
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 640, device=dev, dtype=dt, requires_grad=True)
        p = torch.randn(1024, 640, device=dev, dtype=dt)
        oc.contrastive_loss(a, p, None, tau=0.5, tau_plus=0.1, beta=1.0, clamp=True, impl="triton").backward()
    torch.cuda.synchronize()
    for name in ("_fwd_tuned", "_bwd_d_tuned"):     # the autotuners' choices, per key
        for key, cfg in getattr(getattr(kc, name, None), "cache", {}).items():
            print(f"  {name}: {key} -> {cfg}")
    for name in ("_stats_fwd_kernel", "_stats_bwd_d_kernel"):
        fn = getattr(kc, name)
        caches = getattr(fn, "device_caches", {})
        for entry in caches.values():
            kcache = entry[0] if isinstance(entry, tuple) else entry
            for k in kcache.values():
                md = getattr(k, "metadata", None)
                ptx = getattr(k, "asm", {}).get("ptx", "")
                print(f"  {name}: regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')} "
                      f"shared={getattr(md, 'shared', '?')} warps={getattr(md, 'num_warps', '?')} "
                      f"stages={getattr(md, 'num_stages', '?')} wgmma={'wgmma' in ptx} "
                      f"mma.sync={'mma.sync' in ptx}")
except Exception as e:  # noqa: BLE001
    print("kernel probe failed:", type(e).__name__, e)

# --- throughput: speed-ups and MFU against the measured bf16 peak (ours) / tf32 peak (eager)
for path in glob.glob(os.path.join(res, "throughput-*.json")):
    r = json.load(open(path))
    R = r["results"]
    print(f"throughput {os.path.basename(path)}: batch {r['config']['batch']}, steps {r['config']['steps']}")
    for m, v in R.items():
        fl = v.get("flops")
        line = f"  {m:10s} {v['images_per_s']:9.1f} img/s  median {v['median_s']:.3f}s  warm-up {v['warmup_s']:.1f}s"
        if fl:
            line += (f"  {fl / v['median_s'] / 1e12:7.1f} TFLOP/s  MFU(bf16 peak) {100 * fl / v['median_s'] / peaks['bf16']:5.1f}%"
                     f"  MFU(tf32 peak) {100 * fl / v['median_s'] / peaks['tf32']:5.1f}%")
        print(line)
    for q in r.get("ratios", []):
        print(f"  {q['method']}/{q['yardstick']}: {q['speedup']:.2f}x ({q['speedup_min']:.2f}-{q['speedup_max']:.2f})"
              f"  max|dx0| {q['max_abs_diff']:.2e}")
    goals = {("hnm", "ref-hnm"): 3.0, ("ddim", "diffusers"): 1.5}
    for (m, y), g in goals.items():
        if m in R and y in R:
            sp = R[y]["median_s"] / R[m]["median_s"]
            print(f"  GOAL {m}/{y} >= {g}x: {sp:.2f}x -> {'met' if sp >= g else 'MISSED'}")
    if "hnm" in R and R["hnm"].get("flops"):
        mfu = R["hnm"]["flops"] / R["hnm"]["median_s"] / peaks["bf16"]
        print(f"  GOAL hnm MFU >= 60% of bf16 peak: {100 * mfu:.1f}% -> {'met' if mfu >= 0.6 else 'MISSED'}")

# --- contrastive kernels vs roofline (model 6mNd, and what the kernels really execute)
for path in sorted(glob.glob(os.path.join(res, "kernels-*.json"))):
    r = json.load(open(path))
    c = r["ceilings"]
    print(f"{os.path.basename(path)}: ceilings {json.dumps({k: round(v, 1) for k, v in c.items() if 'TFLOP' in k or 'GBps' in k})}")
    for row in r["results"]:
        if "median_ms" not in row:
            if "skipped" in row:
                print(f"  {row['op']} {row.get('provider')} {row.get('m')}x{row.get('N')} d={row.get('d')}: skipped ({row['skipped'][:80]})")
            continue
        if row["op"] == "hnm_loss":
            m, n, d = row["m"], row["N"], row["d"]
            nd = math.ceil(d / 128)
            done = 2 * m * n * d * (3 + 2 * nd) / (row["median_ms"] * 1e-3) / 1e12
            frac = row.get("fraction_of_matmul_ceiling", float("nan"))
            flag = ""
            if row["provider"] == "fused" and m == 65536 and n == 65536 and d == 640:
                flag = "  <- GOAL within 2x of roofline: " + ("met" if frac >= 0.5 else "MISSED")
            print(f"  hnm {row['provider']:6s} m={m} N={n} d={d} {row['dtype']}: {row['median_ms']:9.2f} ms "
                  f"model {row['TFLOPs']:7.1f} TFLOP/s ({100 * frac:5.1f}% of ceiling), executed {done:7.1f} TFLOP/s, "
                  f"peak mem {row['peak_mem_bytes'] / 2**20:8.0f} MiB{flag}")
        else:
            print(f"  ddim {row['provider']:6s} {row['shape']} {row['dtype']}: {row['median_ms']:.3f} ms "
                  f"{row.get('GBps', 0):.0f} GB/s ({100 * row.get('fraction_of_copy_bandwidth', 0):.0f}% of copy)")
EOF
phase summary "$(cap 60 0)" "$S" env RES="$RES" "$PY" "$RES/summary.py"
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
