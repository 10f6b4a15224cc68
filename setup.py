"""Build script for the optional C++/CUDA extension (fused PGD step); everything else is in
pyproject.toml.

Knobs (environment):
  CDP_FAST_SKIP_EXT=1      build no extension (the op is JIT-built on first use, or the
                           PyTorch composite is used)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (read by torch's build_ext)
"""
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("CDP_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension as ce
    except Exception:  # isolated build env without torch: JIT build at first use instead
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    cpu_sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".cpp")
    ) if os.path.isdir(csrc) else []
    if not cpu_sources:
        return [], {}
    cu_sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".cu"))
    cxx = ["-O3", "-std=c++17"]
    # CUDAExtension when torch was built with CUDA and a toolkit is present: asking
    # torch.cuda.is_available() would be wrong on a GPU-less build machine.
    if getattr(torch.version, "cuda", None) and ce.CUDA_HOME and cu_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = ce.CUDAExtension(
            "cdp_fast._C", cpu_sources + cu_sources,
            extra_compile_args={"cxx": cxx + ["-DCDP_FAST_WITH_CUDA"], "nvcc": ["-O3"]},
        )
    else:
        ext = ce.CppExtension("cdp_fast._C", cpu_sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
