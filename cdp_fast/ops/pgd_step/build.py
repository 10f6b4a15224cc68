"""Where the fused PGD step's C++/CUDA extension ``cdp_fast::pgd_step`` (csrc/) comes from: the
prebuilt ``cdp_fast._C``, else a JIT build of csrc/.

Tried in this order, once per process (:func:`load`):
  1. ``cdp_fast._C``: built ahead of time by ``setup.py`` (``pip install --no-build-isolation``),
     skipped when a source in csrc/ is newer than it (an editable install edited since);
  2. a JIT build of ``csrc/`` with ninja (``torch.utils.cpp_extension.load``), cached in
     ``$TORCH_EXTENSIONS_DIR/cdp_fast/<key>`` or ``~/.cache/cdp_fast/ext/<key>``, where the key
     hashes the sources, the torch/CUDA/Python versions and the machine architecture (first
     use ~30-45 s on 2 cores, then a library load; concurrent processes wait on torch's lock
     file in that directory instead of building twice);
  3. otherwise :func:`load_error` says why, and :mod:`cdp_fast.ops.pgd_step` decides
     (an explicit request raises; "auto" warns once and runs the composite).

The op's ``register_fake`` (for torch.compile / FakeTensor) is not here: torch requires it to
be registered from the module that csrc/pgd_step.cpp names in ``m.set_python_module``,
:mod:`cdp_fast.ops.pgd_step`, whose :func:`~cdp_fast.ops.pgd_step.load_extension` calls
:func:`load` and then registers it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

__all__ = ["OP_NAME", "load", "load_error", "op_registered"]

OP_NAME = "cdp_fast::pgd_step"

_lock = threading.Lock()
_state = {"op": None, "error": None, "tried": False}


def _csrc_dir() -> Path | None:
    pkg = Path(__file__).resolve().parents[2]   # cdp_fast/
    for cand in (pkg / "csrc", pkg.parent / "csrc"):  # installed package data / repo checkout
        if (cand / "pgd_step.cpp").is_file():
            return cand
    return None


def _with_cuda() -> bool:
    if not getattr(torch.version, "cuda", None):
        return False
    from torch.utils import cpp_extension as ce
    return ce.CUDA_HOME is not None


def _jit_sources(csrc: Path) -> list[str]:
    srcs = sorted(str(p) for p in csrc.glob("*.cpp"))
    if _with_cuda():
        srcs += sorted(str(p) for p in csrc.glob("*.cu"))
    return srcs


def _cache_key(sources: list[str]) -> str:
    h = hashlib.sha256()
    for s in sources + sorted(str(p) for p in Path(sources[0]).parent.glob("*.h")):
        h.update(Path(s).name.encode())
        h.update(Path(s).read_bytes())
    # Anything that makes a built library unusable elsewhere: torch ABI, CUDA, Python, arch.
    for part in (torch.__version__, str(torch.version.cuda), sys.version, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build_dir(key: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) / "cdp_fast" if root else Path.home() / ".cache" / "cdp_fast" / "ext"
    d = base / key
    d.mkdir(parents=True, exist_ok=True)
    return d


def _prebuilt_stale() -> str | None:
    """In an editable install the prebuilt ``cdp_fast/_C*.so`` sits next to the sources it was
    built from; once a source is newer (edited after ``pip install -e``), loading it would run
    old code, and loading both it and a JIT build would register the op twice. Returns the
    reason to skip it, else None."""
    import importlib.util

    spec = importlib.util.find_spec("cdp_fast._C")
    if spec is None or not spec.origin:
        return None
    csrc = _csrc_dir()
    if csrc is None:
        return None
    so_mtime = Path(spec.origin).stat().st_mtime
    newer = [p.name for p in sorted(csrc.iterdir())
             if p.suffix in (".h", ".cpp", ".cu") and p.stat().st_mtime > so_mtime]
    return f"older than {', '.join(newer)} (rebuild with pip install -e .)" if newer else None


def op_registered() -> bool:
    """True when ``torch.ops.cdp_fast.pgd_step`` exists in this process, however it was loaded."""
    try:
        torch.ops.cdp_fast.pgd_step.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _jit_build() -> None:
    csrc = _csrc_dir()
    if csrc is None:
        raise RuntimeError("the csrc/ sources are not shipped with this installation")
    from torch.utils import cpp_extension as ce

    sources = _jit_sources(csrc)
    key = _cache_key(sources)
    flags = ["-O3"]  # torch's own -std (C++17 or C++20 by version) is kept
    cuda = any(s.endswith(".cu") for s in sources)
    if cuda:
        flags.append("-DCDP_FAST_WITH_CUDA")
    ce.load(name=f"cdp_fast_C_{key}", sources=sources, build_directory=str(_build_dir(key)),
            extra_cflags=flags, extra_cuda_cflags=["-O3"] if cuda else None,
            is_python_module=False, verbose=False)


def load() -> bool:
    """Make ``torch.ops.cdp_fast.pgd_step`` available (prebuilt, else JIT). Returns success;
    the failure reason is kept for the warning (:func:`load_error`). Thread-safe; tried once
    per process. (Callers use :func:`cdp_fast.ops.pgd_step.load_extension`, which also
    registers the op's fake.)"""
    with _lock:
        if _state["tried"]:
            return _state["op"] is not None
        _state["tried"] = True
        errors = []
        if not op_registered():
            stale = _prebuilt_stale()
            if stale:
                errors.append(f"prebuilt cdp_fast._C skipped: {stale}")
            else:
                try:
                    import cdp_fast._C  # noqa: F401  (registers the op at load)
                except ImportError as exc:
                    errors.append(f"prebuilt cdp_fast._C: {exc}")
        if not op_registered():
            try:
                _jit_build()
            except Exception as exc:  # no compiler, no ninja, no headers, read-only cache...
                errors.append(f"JIT build: {type(exc).__name__}: {exc}")
        if op_registered():
            _state["op"] = torch.ops.cdp_fast.pgd_step.default
        else:
            _state["error"] = "; ".join(errors) or "unknown reason"
        return _state["op"] is not None


def load_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried yet)."""
    return _state["error"]
