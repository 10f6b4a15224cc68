"""Every Triton kernel of cdp_fast compiles for sm_90 (H100/H200) on a machine without a GPU,
in every variant the package can launch, within the H100/H200 shared-memory limit.

How the variants are found (nothing about the kernels is listed here, so new kernels, flags,
tiles or autotune candidates are covered when the launchers use them):

1. A subprocess with ``TRITON_INTERPRET=0`` (tests/conftest.py sets 1 on GPU-less machines,
   and Triton reads it at import) imports the kernel modules of ``cdp_fast.kernels`` and drives
   their public launchers (``stats_forward``, ``stats_backward``, ``launch_ddim_update``) over
   every flag that reaches a kernel — dtype fp32/bf16/fp16, labels or none, in-batch or not,
   β = 0 or not, guidance/noise/x̂_0 on or off, ``CDP_FAST_AUTOTUNE`` 0 and 1 — on odd and
   16-aligned shapes, through their CUDA branch: CPU tensors report ``device == cuda`` (a
   stand-in: factory calls on "cuda" allocate on the CPU, ``get_device_properties`` answers
   132 SMs as an H100 SXM), and ``JITFunction.run`` / ``Autotuner.run`` record the launch
   instead of running it.
2. Every recorded launch becomes a compile: the signature from the argument types (tensors →
   pointers of their dtype, 16-byte aligned as every CUDA allocation is; ints → i32/i64 and
   ``tt.divisibility=16`` when the value is a multiple of 16, as Triton specialises at launch;
   floats → fp32), the constexprs as launched, and for an autotuned kernel one compile per
   candidate ``triton.Config`` (its kwargs, ``num_warps``, ``num_stages``).
3. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole
   pipeline down to the cubin with ptxas (Triton's bundled one): no driver, no device.
4. Every ``@triton.jit`` function in the kernel modules must be launched (1) or called by a
   launched one; a new kernel that no launcher reaches fails the coverage test.

Checks: all variants compile; shared memory (Triton's dynamic + the cubin's static) ≤ 232448
bytes (227 KiB, the per-block opt-in maximum of sm_90: CUDA C Programming Guide, "Technical
Specifications per Compute Capability"); the launch space was reached (three dtypes, each
boolean flag both ways, every autotune candidate). Registers and local memory (spills) are read
from the cubin with cuobjdump (Triton's bundled one) and printed (``-s``), not asserted: a
spill is a performance fact, not a bug.

Tiers: "ci" (the default, what CI runs): 16-aligned shapes, every flag × dtype at the default
tiles, and the autotune candidates with every flag on — 114 variants, ~2 min of one core
(128 s CPU measured, Triton 3.9). "full" (``-m sm90``, ``CDP_FAST_SM90_TIER=full`` or the
script): odd and aligned shapes × every flag × every candidate, 816 variants, 1102 s CPU. One test runs
the worker, so pytest-xdist compiles once.

Script: ``python tests/test_sm90_compile.py [--tier ci|full] [--json out.json]`` prints the
table. Skipped (with the reason) when Triton has no CUDA backend or cannot run ptxas here.
The same file tests ``scripts/build_csrc_sm90.sh`` (csrc/ for sm_90 with nvcc; skipped without
a CUDA torch venv).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMEM_LIMIT_SM90 = 232448  # bytes: 227 KiB, max dynamic shared memory per block (opt-in), sm_90
TARGET = ("cuda", 90, 32)


# ============================================================================================
# worker: runs in a subprocess with TRITON_INTERPRET=0
# ============================================================================================
class _Launch:
    """One recorded launch: the JITFunction (or Autotuner) and its arguments by name."""

    def __init__(self, kernel, args: dict):
        self.kernel, self.args = kernel, args


_LAUNCHES: list[_Launch] = []


def _record_run(self, *args, grid=None, warmup=False, **kwargs):
    names = self.fn.arg_names if hasattr(self, "configs") else self.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    _LAUNCHES.append(_Launch(self, bound))


@contextlib.contextmanager
def _fake_cuda(n_sms: int = 132):
    """CPU tensors that say they are on CUDA, "cuda" factories that allocate on the CPU, and
    Triton launches that are recorded, not run: the launchers take their CUDA branch."""
    import types

    import torch
    from torch.overrides import TorchFunctionMode
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def cpu(v):
        if isinstance(v, torch.device) and v.type == "cuda":
            return torch.device("cpu")
        if isinstance(v, str) and v.split(":")[0] == "cuda":
            return "cpu"
        return v

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            if func is torch.device:  # a device object stays what it says; allocations move
                return func(*args, **(kwargs or {}))
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            args = tuple(cpu(a) for a in args)
            out_dtype = kwargs.pop("out_dtype", None)
            if out_dtype is not None:  # aten::mm.dtype exists on CUDA only: same result dtype
                args = tuple(a.to(out_dtype) if isinstance(a, torch.Tensor) else a for a in args)
            return func(*args, **kwargs)

    props = types.SimpleNamespace(multi_processor_count=n_sms, name="H100 (compile-only stand-in)",
                                  major=9, minor=0, total_memory=80 * 2**30)
    saved = [(torch.Tensor, "device"), (torch.Tensor, "is_cuda"), (torch.cuda, "get_device_properties"),
             (torch.cuda, "device"), (torch.cuda, "current_device"), (JITFunction, "run"), (Autotuner, "run")]
    old = [(obj, name, obj.__dict__.get(name, getattr(obj, name))) for obj, name in saved]
    cuda0 = torch.device("cuda", 0)
    torch.Tensor.device = property(lambda self: cuda0)
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    JITFunction.run = _record_run
    Autotuner.run = _record_run
    try:
        with Mode():
            yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def _kernel_modules():
    import importlib
    import pkgutil

    try:
        import cdp_fast.kernels as pkg
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH (another venv): kernels/ by path
        from cdp_fast.ops.backend import kernels_module

        kernels_module("ddim")
        import cdp_fast.kernels as pkg

    return {info.name: importlib.import_module(f"{pkg.__name__}.{info.name}")
            for info in pkgutil.iter_modules(pkg.__path__)}


def _drive_launchers(mods, tier: str) -> list[str]:
    """Call every launcher over its flag space (tier "full": odd and 16-aligned shapes; "ci":
    16-aligned only). Returns the names of the launchers called."""
    import itertools

    import torch

    for mod in mods.values():  # launch the kernel objects themselves (no torch.library HOP)
        if hasattr(mod, "wrap_triton"):
            mod.wrap_triton = lambda k: k
    driven = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    con = mods.get("contrastive")
    if con is not None:
        driven += ["contrastive.stats_forward", "contrastive.stats_backward"]
        for (m, n, d), dtype, autotune, in_batch, labels, beta in itertools.product(
                ((128, 256, 64),) + (((100, 300, 40),) if tier == "full" else ()), dtypes, ("0", "1"), (False, True), (False, True), (0.0, 0.5)):
            os.environ["CDP_FAST_AUTOTUNE"] = autotune
            a = torch.randn(m, d).to(dtype)
            k = a if in_batch else torch.randn(n, d).to(dtype)
            nk = k.shape[0]
            ra, rk = torch.rand(m) + 0.5, torch.rand(nk) + 0.5
            la = torch.randint(0, 3, (m,)) if labels else None
            lk = (la if in_batch else torch.randint(0, 3, (nk,))) if labels else None
            L1, L0 = con.stats_forward(a, k, ra, rk, la, lk, 20.0, beta, in_batch)[:2]
            con.stats_backward(a, k, ra, rk, la, lk, L1.nan_to_num(0.0), L0.nan_to_num(0.0),
                               torch.ones(m), torch.ones(m), 20.0, beta, in_batch)
        os.environ.pop("CDP_FAST_AUTOTUNE", None)
    dd = mods.get("ddim")
    if dd is not None:
        driven.append("ddim.launch_ddim_update")
        coef = (0.6, 0.8, 0.9, 0.3, 0.2)
        for shape, dtype, g, z, x0 in itertools.product(
                ((2, 4, 8, 8),) + (((2, 3, 5, 7),) if tier == "full" else ()), dtypes,
                                                         (False, True), (False, True), (False, True)):
            x = torch.randn(shape).to(dtype)
            dd.launch_ddim_update(x, torch.randn(shape).to(dtype), torch.randn(shape).to(dtype) if g else None,
                                  torch.randn(shape).to(dtype) if z else None, 1.5, coef, x0)
    return driven


_TRITON_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
                 "torch.int64": "i64", "torch.int32": "i32", "torch.int8": "i8", "torch.uint8": "u8",
                 "torch.bool": "i1", "torch.float64": "fp64"}


def _variants(launch: _Launch):
    """(fn, signature, constexprs, attrs, options) per compile of one recorded launch."""
    import torch

    kernel = launch.kernel
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    configs = list(kernel.configs) if hasattr(kernel, "configs") else [None]
    const_names = {p.name for p in fn.params if p.is_constexpr}
    for cfg in configs:
        args = dict(launch.args)
        opts = {"num_warps": args.pop("num_warps", 4), "num_stages": args.pop("num_stages", 3)}
        if cfg is not None:
            args.update(cfg.kwargs)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        sig, consts, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            v = args[name]
            if name in const_names or v is None:
                sig[name] = "constexpr"
                consts[name] = v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + _TRITON_DTYPE[str(v.dtype)]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {name}={v!r} of unsupported type {type(v)}")
        yield fn, sig, consts, attrs, opts


def _cuobjdump():
    import shutil

    import triton

    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for cand in (os.environ.get("TRITON_CUOBJDUMP_PATH"), str(here), shutil.which("cuobjdump")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _resources(cubin: bytes, tool) -> dict:
    """REG / LOCAL (spill) / STACK from ``cuobjdump --dump-resource-usage``; {} when unavailable."""
    import re

    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    names = {"REG": "reg", "STACK": "stack", "LOCAL": "local", "SHARED": "static_shared"}
    return {names[k]: int(v) for k, v in found.items()}


def _probe_backend(triton):
    """None when the CUDA backend compiles a trivial kernel to an sm_90 cubin, else why not."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def _probe(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        k = triton.compile(triton.compiler.ASTSource(fn=_probe, signature={"X": "*fp32", "BLOCK": "constexpr"},
                                                     constexprs={"BLOCK": 32}),
                           target=GPUTarget(*TARGET))
        assert k.asm.get("cubin"), "no cubin produced"
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot compile for sm_90 here"
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    return None


def _ci_subset(launch: _Launch, fn, consts: dict) -> bool:
    """The "ci" tier: every launch at its default tiles (``CDP_FAST_AUTOTUNE`` unset), and the
    autotune candidates only with every boolean flag on (the largest live state per tile)."""
    if not hasattr(launch.kernel, "configs"):
        return True
    return all(v for v in consts.values() if isinstance(v, bool))


def _public_launchers(mods, triton) -> list[str]:
    """The public functions of the kernel modules that name a kernel (a launcher must be driven)."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    out = []
    for mname, mod in mods.items():
        kernels = {n for n, o in vars(mod).items() if isinstance(o, (triton.runtime.jit.JITFunction, Autotuner))}
        for name in getattr(mod, "__all__", ()):
            obj = inspect.unwrap(getattr(mod, name))
            if inspect.isfunction(obj) and kernels & set(obj.__code__.co_names):
                out.append(f"{mname}.{name}")
    return sorted(out)


def _worker(out_path: str, tier: str) -> None:
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    report = {"triton": triton.__version__, "target": list(TARGET), "smem_limit": SMEM_LIMIT_SM90, "tier": tier}
    if "constexprs" not in inspect.signature(triton.compiler.ASTSource).parameters:
        report["skip"] = f"Triton {triton.__version__}: ASTSource(constexprs=) needs Triton >= 3.3"
    elif "nvidia" not in getattr(triton.backends, "backends", {}):
        report["skip"] = f"Triton {triton.__version__} has no CUDA (nvidia) backend"
    else:
        why = _probe_backend(triton)
        if why:
            report["skip"] = f"Triton cannot compile for sm_90 here ({why})"
    if "skip" in report:
        Path(out_path).write_text(json.dumps(report))
        return

    mods = _kernel_modules()
    jit_fns = {f"{mname}.{name}": obj for mname, mod in mods.items() for name, obj in vars(mod).items()
               if isinstance(obj, triton.runtime.jit.JITFunction)}
    report["public_launchers"] = _public_launchers(mods, triton)
    with _fake_cuda():
        report["launchers"] = _drive_launchers(mods, tier)
    # every jit function: launched, or called (transitively) from a launched one
    launched = {}
    for la in _LAUNCHES:
        fn = la.kernel.fn if hasattr(la.kernel, "configs") else la.kernel
        launched[fn.__name__] = fn
    reached, frontier = set(launched), list(launched.values())
    by_name = {f.__name__: f for f in jit_fns.values()}
    while frontier:
        src = frontier.pop().src
        for name, f in by_name.items():
            if name not in reached and f"{name}(" in src:
                reached.add(name)
                frontier.append(f)
    report["jit_functions"] = sorted(jit_fns)
    report["launched"] = sorted(launched)
    report["candidates"] = {(la.kernel.fn.__name__): len(la.kernel.configs) for la in _LAUNCHES
                            if hasattr(la.kernel, "configs")}
    report["unreached"] = sorted(q for q, f in jit_fns.items() if f.__name__ not in reached)

    tool = _cuobjdump()
    report["cuobjdump"] = tool
    seen, rows = {}, []
    t_all = time.perf_counter()
    for la in _LAUNCHES:
        tuned = hasattr(la.kernel, "configs")
        for fn, sig, consts, attrs, opts in _variants(la):
            key = (fn.__name__, tuple(sig.items()), tuple(sorted(consts.items(), key=str)),
                   tuple(sorted(attrs)), tuple(sorted(opts.items())))
            if key in seen:  # e.g. the default tiles are also an autotune candidate
                seen[key]["autotune_candidate"] |= tuned
                continue
            if tier == "ci" and not _ci_subset(la, fn, consts):
                continue
            row = {"kernel": fn.__name__, "signature": sig, "constexprs": dict(consts),
                   "aligned": sorted(fn.arg_names[i[0]] for i in attrs), "autotune_candidate": tuned, **opts}
            seen[key] = row
            t0 = time.perf_counter()
            try:
                ck = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                    target=GPUTarget(*TARGET), options=dict(opts))
                row["shared"] = int(ck.metadata.shared)
                row.update(_resources(ck.asm["cubin"], tool))
            except Exception as err:  # noqa: BLE001 - reported per variant, asserted by the test
                row["error"] = f"{type(err).__name__}: {err}"[-2000:]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
    report["compile_seconds"] = round(time.perf_counter() - t_all, 1)
    t = os.times()  # CPU time, ptxas children included: the wall time depends on the machine's load
    report["cpu_seconds"] = round(t.user + t.system + t.children_user + t.children_system, 1)
    report["variants"] = rows
    Path(out_path).write_text(json.dumps(report, default=str))


def run_worker(out_path: str, tier: str = "ci", timeout: float | None = None) -> dict:
    """Run :func:`_worker` in a fresh interpreter with TRITON_INTERPRET=0 and read its report."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 3.6 fuses too
    with tempfile.TemporaryDirectory(prefix="cdp_sm90_triton_") as cache:
        env.setdefault("TRITON_CACHE_DIR", cache)  # a cold compile, and no cache left behind
        res = subprocess.run([sys.executable, __file__, "--worker", out_path, tier], capture_output=True,
                             text=True, env=env, timeout=timeout or (1100 if tier == "ci" else 7200))
    if res.returncode != 0 or not Path(out_path).exists():
        raise RuntimeError(f"sm_90 compile worker failed (exit {res.returncode}):\n{res.stdout[-3000:]}"
                           f"\n{res.stderr[-6000:]}")
    return json.loads(Path(out_path).read_text())


def _table(report: dict) -> str:
    lines = [f"Triton {report['triton']} -> sm_90, {report['tier']} tier: {len(report['variants'])} variants in "
             f"{report['compile_seconds']} s ({report['cpu_seconds']} s CPU); "
             f"cuobjdump: {report.get('cuobjdump') or 'none'}",
             f"{'kernel':<22}{'dtype':<6}{'flags':<34}{'tiles':<16}{'w/s':<6}{'smem':>8}{'regs':>6}"
             f"{'spill':>7}{'sec':>7}"]
    for r in report["variants"]:
        c = r["constexprs"]
        ptr = [t for t in r["signature"].values() if t.startswith("*")]
        flags = ",".join(f"{k}" if v is True else f"{k}={v}" for k, v in c.items()
                         if not k.startswith("BLOCK") and v not in (False, None))
        tiles = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
        status = "ERROR " + r["error"].splitlines()[-1][:60] if "error" in r else ""
        lines.append(f"{r['kernel']:<22}{ptr[0][1:] if ptr else '-':<6}{flags[:33]:<34}{tiles:<16}"
                     f"{r['num_warps']}/{r['num_stages']:<4}{r.get('shared', '-'):>8}{r.get('reg', '-'):>6}"
                     f"{r.get('local', '-'):>7}{r['seconds']:>7} {status}")
    return "\n".join(lines)


# ============================================================================================
# tests
# ============================================================================================
def _full_requested(config) -> bool:
    """The full tier when asked for: ``-m sm90`` (not ``-m "not sm90"``) or CDP_FAST_SM90_TIER=full."""
    expr = (config.getoption("markexpr", "") or "").replace(" ", "")
    return os.environ.get("CDP_FAST_SM90_TIER") == "full" or ("sm90" in expr and "notsm90" not in expr)


def _problems(report: dict) -> list[str]:
    """Everything wrong in a report, one line each (empty: all kernels fine for sm_90)."""
    out = []
    if not report["launched"]:
        out.append("no kernel launch was recorded: the launchers were not driven")
    if report["unreached"]:
        out.append(f"@triton.jit functions that no driven launcher reaches: {report['unreached']} "
                   f"(drive their launcher in _drive_launchers; driven: {report['launchers']})")
    missing = sorted(set(report["public_launchers"]) - set(report["launchers"]))
    if missing:
        out.append(f"public launchers of cdp_fast.kernels not driven by _drive_launchers: {missing}")
    by_kernel = {}
    for r in report["variants"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
        what = f"{r['kernel']} {r['signature'].get(next(iter(r['signature'])))} {r['constexprs']} " \
               f"w{r['num_warps']}/s{r['num_stages']}"
        if "error" in r:
            out.append(f"does not compile: {what}: {r['error']}")
        elif r["shared"] + r.get("static_shared", 0) > SMEM_LIMIT_SM90:
            out.append(f"shared memory {r['shared']} + {r.get('static_shared', 0)} B > {SMEM_LIMIT_SM90} B: {what}")
    if set(by_kernel) != set(report["launched"]):
        out.append(f"kernels launched but not compiled: {sorted(set(report['launched']) - set(by_kernel))}")
    # the driving reached the whole space: three dtypes, each boolean flag both ways, every candidate
    for name, rows in by_kernel.items():
        dtypes = {next(t for t in r["signature"].values() if t.startswith("*")) for r in rows}
        if not {"*fp32", "*bf16", "*fp16"} <= dtypes:
            out.append(f"{name}: compiled only for {sorted(dtypes)}")
        for flag in sorted({k for r in rows for k, v in r["constexprs"].items() if isinstance(v, bool)}):
            if {r["constexprs"][flag] for r in rows} != {False, True}:
                out.append(f"{name}: flag {flag} compiled one way only")
        tuned = {(r["constexprs"].get("BLOCK_M"), r["num_warps"], r["num_stages"])
                 for r in rows if r["autotune_candidate"]}
        if tuned and len(tuned) != report["candidates"][name]:
            out.append(f"{name}: {len(tuned)} of {report['candidates'][name]} autotune candidates compiled")
    if report.get("cuobjdump") and any("reg" not in r for r in report["variants"] if "error" not in r):
        out.append("cuobjdump gave no register count for some variants")
    return out


if __name__ != "__main__":
    import pytest

    @pytest.mark.slow
    @pytest.mark.sm90
    def test_every_triton_kernel_compiles_for_sm90(request, tmp_path):
        """One test, so that pytest-xdist runs the compiles once. Registers and local memory
        (spills) are printed with ``-s``, not asserted."""
        pytest.importorskip("triton")
        tier = "full" if _full_requested(request.config) else "ci"
        rep = run_worker(str(tmp_path / "report.json"), tier)
        if "skip" in rep:
            pytest.skip(rep["skip"])
        print("\n" + _table(rep))
        problems = _problems(rep)
        assert not problems, f"{len(problems)} problem(s) compiling for sm_90 ({tier} tier):\n" + "\n".join(problems)


    BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_csrc_sm90.sh"

    def _cuda_python():
        return os.environ.get("CUDA_PYTHON", "/tmp/cuda-venv/bin/python")

    def test_build_script_parses():
        assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], capture_output=True).returncode == 0

    def test_build_script_without_cuda_torch_exits_2(tmp_path):
        """A missing prerequisite: exit 2 and one line on stderr saying which."""
        res = subprocess.run(["bash", str(BUILD_SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                             env=dict(os.environ, CUDA_PYTHON=str(tmp_path / "no-python")), timeout=60)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "CUDA torch" in lines[0], res.stderr

    @pytest.mark.slow
    @pytest.mark.sm90
    def test_csrc_builds_for_sm90(tmp_path):
        """scripts/build_csrc_sm90.sh: nvcc compiles csrc/ for sm_90 against a CUDA torch (an
        object, then the CUDAExtension through setup.py) and the results hold sm_90 cubins.
        Several minutes; skipped without the CUDA venv (see the script) or nvcc."""
        import shutil

        py = _cuda_python()
        if not os.access(py, os.X_OK):
            pytest.skip(f"no CUDA torch python at {py} (CUDA_PYTHON; scripts/build_csrc_sm90.sh says how to make one)")
        if not (os.access("/usr/local/cuda-13.0/bin/nvcc", os.X_OK) or shutil.which("nvcc")
                or os.environ.get("CUDA_HOME")):
            pytest.skip("no nvcc")
        res = subprocess.run(["bash", str(BUILD_SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                             env=dict(os.environ, CUDA_PYTHON=py), timeout=1800)
        print(res.stdout)
        if res.returncode == 2:
            pytest.skip(res.stderr.strip())
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "-gencode arch=compute_90,code=sm_90" in res.stdout
        assert res.stdout.count("sm_90.cubin") >= 2, res.stdout  # the object and the extension
        assert "OK: csrc/ compiled for sm_90" in res.stdout


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        import argparse

        ap = argparse.ArgumentParser(description="Compile every Triton kernel variant of cdp_fast for sm_90.")
        ap.add_argument("--tier", choices=("ci", "full"), default="full")
        ap.add_argument("--json", help="also keep the report here")
        opt = ap.parse_args()
        with tempfile.TemporaryDirectory() as tmp:
            rep = run_worker(opt.json or os.path.join(tmp, "report.json"), opt.tier)
        if "skip" in rep:
            print(f"skipped: {rep['skip']}")
            sys.exit(0)
        print(_table(rep))
        problems = _problems(rep)
        print("\n".join(problems) or "all variants compile for sm_90 within the shared-memory limit")
        sys.exit(1 if problems else 0)
