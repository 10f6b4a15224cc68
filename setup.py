"""Build script for the optional C++/CUDA extension ``cdp_fast._C`` (the fused PGD step,
``torch.ops.cdp_fast.pgd_step``); everything else is in pyproject.toml.

Install with ``pip install --no-build-isolation [-e] .`` so that this script sees the torch
already installed (an isolated build env would fetch another torch). Without torch at build
time, or with CDP_FAST_SKIP_EXT=1, no extension is built and ``cdp_fast.ops.pgd_step`` JIT-builds the
same sources with ninja on first use (cached), or falls back to the PyTorch composite.

Knobs (environment):
  CDP_FAST_SKIP_EXT=1      build no extension
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "7.5;8.0;8.6;8.9;9.0+PTX": PTX of the newest
                           arch lets later GPUs JIT it)
  MAX_JOBS                 parallel compile jobs (read by torch's BuildExtension / ninja)

CUDAExtension when torch was built with CUDA and a toolkit is present (``torch.version.cuda``
and ``CUDA_HOME``); asking ``torch.cuda.is_available()`` would be wrong on a GPU-less build
machine. Otherwise a CppExtension with the CPU kernel only (csrc/*.cpp; the .cu is skipped).

The sources in csrc/ are also copied into the built package as ``cdp_fast/csrc`` (wheels and
non-editable installs), so the JIT fallback finds them; editable installs read the repo's
csrc/ directly.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _csrc_files(*patterns):
    out = []
    for pat in patterns:
        out += glob.glob(os.path.join(CSRC, pat))
    return sorted(os.path.relpath(p, HERE) for p in out)


class BuildPyWithCsrc(build_py):
    """Ship csrc/*.{h,cpp,cu} inside the package (cdp_fast/csrc) for the JIT fallback."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the editable package reads <repo>/csrc
        dst = os.path.join(self.build_lib, "cdp_fast", "csrc")
        self.mkpath(dst)
        for src in _csrc_files("*.h", "*.cpp", "*.cu"):
            self.copy_file(os.path.join(HERE, src), os.path.join(dst, os.path.basename(src)))


def _ext_modules():
    if os.environ.get("CDP_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception:  # isolated build env without torch: JIT build at first use instead
        return [], {}
    cpu_sources = _csrc_files("*.cpp")
    if not cpu_sources:
        return [], {}
    cu_sources = _csrc_files("*.cu")
    # -O3; no -ffast-math: the kernels must keep NaN/±0 semantics bitwise equal to PyTorch.
    # No -std flag: torch's BuildExtension adds the standard its headers need.
    cxx = ["-O3"]
    if getattr(torch.version, "cuda", None) and ce.CUDA_HOME and cu_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = ce.CUDAExtension(
            "cdp_fast._C", cpu_sources + cu_sources,
            include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx + ["-DCDP_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-DCDP_FAST_WITH_CUDA"]},
        )
    else:
        ext = ce.CppExtension("cdp_fast._C", cpu_sources, include_dirs=[CSRC],
                              extra_compile_args={"cxx": cxx})
    # ninja honours MAX_JOBS (BuildExtension passes it as -j).
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
cmdclass["build_py"] = BuildPyWithCsrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
