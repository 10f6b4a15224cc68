#!/usr/bin/env bash
# Compile csrc/ for sm_90 (H100/H200) with nvcc on a machine without a GPU, against a CUDA
# build of torch, and print the evidence that the result holds sm_90 machine code.
#
#   scripts/build_csrc_sm90.sh [OUT_DIR]          (default: a new folder under /tmp)
#
# Two builds, both for sm_90 only (-gencode arch=compute_90,code=sm_90):
#   1. nvcc -c csrc/pgd_step_cuda.cu -> OUT/pgd_step_cuda.o, with the flags torch's
#      BuildExtension uses and -Xptxas -v (registers, spills per kernel instantiation);
#   2. the real extension, `setup.py build_ext` with TORCH_CUDA_ARCH_LIST=9.0 (a CUDAExtension:
#      csrc/*.cpp + csrc/*.cu, linked against cudart and torch's CUDA libraries) ->
#      OUT/lib/cdp_fast/_C*.so. Nothing is written into the repository.
# Then cuobjdump --list-elf / --dump-resource-usage and readelf show the sm_90 cubins.
#
# Needs (exit status 2 and one line on stderr when missing):
#   CUDA_PYTHON   a python whose torch is a CUDA build (default /tmp/cuda-venv/bin/python).
#                 Make one (never in the project's environment, which keeps the CPU torch):
#                   python -m venv /tmp/cuda-venv && /tmp/cuda-venv/bin/pip install torch==2.14.1
#   CUDA_HOME     a CUDA toolkit with nvcc (default: /usr/local/cuda-13.0, else nvcc's parent);
#                 nvcc + cudart suffice: csrc/ includes no cuBLAS/cuSPARSE headers.
# Knobs: MAX_JOBS (compile jobs), SKIP_EXT=1 (step 1 only).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${CUDA_PYTHON:-/tmp/cuda-venv/bin/python}"
OUT="${1:-$(mktemp -d /tmp/cdp_fast_sm90.XXXXXX)}"

die2() { echo "build_csrc_sm90: $*" >&2; exit 2; }
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
export PYTHONWARNINGS="ignore::UserWarning"  # a CUDA torch without numpy warns at import

[ -x "$PY" ] || die2 "no python with a CUDA torch at $PY (set CUDA_PYTHON; see the header of this script)"
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)" \
  || die2 "$PY cannot import torch"
[ -n "$TORCH_CUDA" ] || die2 "$PY has a CPU-only torch (torch.version.cuda is None)"
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda-13.0
  elif command -v nvcc >/dev/null; then CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else die2 "no nvcc (set CUDA_HOME to a CUDA toolkit)"; fi
fi
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || die2 "no nvcc at $NVCC"
export CUDA_HOME
mkdir -p "$OUT" || die2 "cannot create $OUT"

# cuobjdump: the toolkit's, else the one bundled with Triton (either python)
CUOBJDUMP=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump 2>/dev/null)" \
         "$("$PY" -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)" \
         "$(python3 -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then CUOBJDUMP="$c"; break; fi
done

echo "== toolchain"
echo "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
"$NVCC" --version | tail -2
echo "CUDA_HOME=$CUDA_HOME  cuobjdump=${CUOBJDUMP:-none}  out=$OUT"

# --- 1. the .cu alone, flags as torch's BuildExtension passes them ---------------------------
mapfile -t FLAGS < <("$PY" - "$ROOT" <<'PYEOF'
import sys, sysconfig, torch
from torch.utils import cpp_extension as ce
try:
    inc = ce.include_paths("cuda")
except TypeError:  # torch < 2.6: include_paths(cuda=True)
    inc = ce.include_paths(cuda=True)
flags = [f"-I{p}" for p in inc + [sysconfig.get_paths()["include"], sys.argv[1] + "/csrc"]]
std = "-std=c++20" if "-std=c++20" in open(ce.__file__).read() else "-std=c++17"  # as BuildExtension
flags += list(ce.COMMON_NVCC_FLAGS) + [std, "-O3", "-DCDP_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xcompiler", "-fPIC"]
print("\n".join(flags))
PYEOF
) || die2 "cannot read torch's extension flags from $PY"
CMD=("$NVCC" -c "$ROOT/csrc/pgd_step_cuda.cu" -o "$OUT/pgd_step_cuda.o"
     -gencode arch=compute_90,code=sm_90 "${FLAGS[@]}" -Xptxas -v)
echo
echo "== 1. nvcc (sm_90 only)"
echo "${CMD[*]}"
T0=$(date +%s)
"${CMD[@]}" > "$OUT/nvcc.log" 2>&1
rc=$?
grep -E "error|warning|Compiling entry|registers|spill" "$OUT/nvcc.log" | demangle \
  | sed -E "s/^.*entry function '.*pgd_step_kernel<([^>]*)>.*$/  pgd_step_kernel<\1>:/"
[ "$rc" -eq 0 ] || tail -40 "$OUT/nvcc.log" >&2
[ "$rc" -eq 0 ] || { echo "build_csrc_sm90: nvcc failed (exit $rc)" >&2; exit "$rc"; }
echo "object built in $(( $(date +%s) - T0 )) s: $(ls -l "$OUT/pgd_step_cuda.o" | awk '{print $5}') bytes"

# --- 2. the extension through setup.py (CUDAExtension), sm_90 only ---------------------------
SO=""
if [ "${SKIP_EXT:-0}" != 1 ]; then
  echo
  echo "== 2. setup.py build_ext (TORCH_CUDA_ARCH_LIST=9.0)"
  T0=$(date +%s)
  (cd "$ROOT" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext \
      --build-temp "$OUT/tmp" --build-lib "$OUT/lib") > "$OUT/build_ext.log" 2>&1
  rc=$?
  grep -E "nvcc.*pgd_step_cuda" "$OUT/build_ext.log" | head -1
  if [ "$rc" -ne 0 ]; then tail -30 "$OUT/build_ext.log" >&2; echo "build_csrc_sm90: setup.py build_ext failed (exit $rc)" >&2; exit "$rc"; fi
  SO="$(ls "$OUT"/lib/cdp_fast/_C*.so 2>/dev/null | head -1)"
  [ -n "$SO" ] || { echo "build_csrc_sm90: no _C*.so under $OUT/lib (log: $OUT/build_ext.log)" >&2; exit 1; }
  echo "extension built in $(( $(date +%s) - T0 )) s: $SO"
fi

# --- evidence -------------------------------------------------------------------------------
echo
echo "== evidence"
status=0
for f in "$OUT/pgd_step_cuda.o" $SO; do
  echo "-- $f"
  if [ -n "$CUOBJDUMP" ]; then
    elfs="$("$CUOBJDUMP" --list-elf "$f" 2>&1)"
    echo "$elfs"
    echo "$elfs" | grep -q "sm_90" || { echo "build_csrc_sm90: no sm_90 cubin in $f" >&2; status=1; }
    "$CUOBJDUMP" --dump-resource-usage "$f" 2>&1 | grep -E "Function|REG:" | demangle \
      | sed -E 's/^.*Function .*pgd_step_kernel<([^>]*)>.*$/  pgd_step_kernel<\1>/; s/^ *(REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+ LOCAL:[0-9]+).*/    \1/' \
      | paste - -
  fi
  readelf -SW "$f" | grep -E "nv_fatbin|nvFatBinSegment" | sed 's/^ */  /'
  case "$f" in *.so) readelf -dW "$f" | grep NEEDED | grep -E "cuda|c10|torch" | sed 's/^ */  /';; esac
done
[ -n "$CUOBJDUMP" ] || echo "(no cuobjdump found: ELF sections only)"
[ "$status" -eq 0 ] && echo "OK: csrc/ compiled for sm_90 ($OUT)"
exit "$status"
