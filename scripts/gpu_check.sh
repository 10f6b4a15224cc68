#!/usr/bin/env bash
# cdp_fast: the project's one-command GPU validation (< 8 min wall on one H100/H200, sm_90). Run it
# first in any session that is lent a GPU; commit the JSONs it writes as
# benchmarks/results/*-<gpu>.json and put the numbers in the README.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # OUT_DIR: $OUT on the device tool (default /tmp/cdp_gpu_out)
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   # on CPU: every phase with a stand-in, one timed out on purpose
#
# Without --dry-run and without a CUDA device it stops at once with exit status 2 and one line.
#
# The phases run from scripts/gpu_phases.py (its docstring lists them), ordered by value:
# environment + capped build -> gpu tests without the autotune sweep -> CIFAR-config throughput
# (speed-ups, MFU) -> goal-shape kernel rows -> the rest (DDIM kernel, probe, autotune sweep,
# autotuned row, scripts/build_csrc_sm90.sh if present). Each phase has a cap, the whole run a
# budget (BUDGET, default 465 s, counted from this script's start); an overrunning phase gets
# SIGINT first (pytest writes its JUnit XML, the benchmarks their partial JSON), then SIGTERM,
# then SIGKILL. After every phase OUT/summary.json and OUT/summary.txt are rewritten (timeline,
# status, key numbers from whatever partial results exist, goals), so a run cut short anywhere
# still returns what it measured. `python scripts/gpu_phases.py summarize OUT` rebuilds them.
#
# Results in OUT_DIR (<= 8 files, the device tool's limit): summary.json summary.txt run.log
#   tests.log tests.xml throughput-<config>-<gpu>.json kernels-<gpu>.json
#
# How to run it with the device tool (the repo travels; this file is inside it):
#   # the lent image has no diffusers and no network; for --config cifar carry a wheel (pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# Without diffusers the throughput phase runs --config digits and the GPU goals are NOT measured.
set -uo pipefail

export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ROOT=${CDP_ROOT:-$PWD}
cd "$ROOT" || exit 2
if [ ! -f setup.py ] || [ ! -d kernels ] || [ ! -d cdp_fast ] || [ ! -f scripts/gpu_phases.py ]; then
    echo "run from the cdp_fast repository root (got $ROOT)" >&2; exit 2
fi
OUT=${1:-${OUT:-/tmp/cdp_gpu_out}}
mkdir -p "$OUT" || exit 2
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
    : > "$OUT/run.log"
    exec "$PY" scripts/gpu_phases.py run "$OUT" --dry-run ${BUDGET:+--budget "$BUDGET"}
fi

if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (nvidia-smi finds none): this script validates the GPU path; nothing run (try --dry-run)" >&2
    exit 2
fi
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' \
          | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+//; s/-+$//' | cut -d- -f1)
GPU_TAG=${GPU_TAG:-gpu}

export TRITON_INTERPRET=0            # tests/conftest.py only setdefault()s it to 1 without a GPU
export CDP_FAST_BACKEND=auto CDP_FAST_PGD_IMPL=auto
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # setup.py's default builds 5 archs
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_DEFAULT_TIMEOUT=10 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

# the environment the phases run in (logged to run.log; the env phase reports versions)
: > "$OUT/run.log"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA torch importable: pip install torch==2.13.0 (needs a registry)" | tee -a "$OUT/run.log"
    timeout 150 "$PY" -m pip install -q --retries 1 torch==2.13.0 >> "$OUT/run.log" 2>&1 \
        || echo "pip install torch==2.13.0 FAILED" | tee -a "$OUT/run.log"
    for pair in hypothesis:hypothesis pytest_timeout:pytest-timeout xdist:pytest-xdist \
                diffusers:diffusers tqdm:tqdm ninja:ninja numpy:numpy; do
        mod=${pair%%:*}; pkg=${pair##*:}
        "$PY" -c "import $mod" 2>/dev/null \
            || timeout 60 "$PY" -m pip install -q --retries 0 "$pkg" >> "$OUT/run.log" 2>&1 || true
    done
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >> "$OUT/run.log" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" && echo "carried wheels installed: $(ls .whl)" | tee -a "$OUT/run.log"
fi

exec "$PY" scripts/gpu_phases.py run "$OUT" --tag "$GPU_TAG" ${BUDGET:+--budget "$BUDGET"}
