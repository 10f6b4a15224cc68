"""End-to-end sampling throughput: ours vs the faithful eager Algorithm 1 vs diffusers' DDIM loop.

    python benchmarks/throughput.py                  # digits UNet, batch 128, 20 steps (CPU-sized)
    python benchmarks/throughput.py --config cifar   # DDPM CIFAR-10 UNet (35.7M) + WRN-28-10, batch 512
    python benchmarks/throughput.py --methods ddim,diffusers --repeats 5

Every method runs in the same process on the same ε-model, features, batch, timesteps and
x_T (sample i's x_T is drawn exactly as ``cdp_fast.sample`` draws it), so the ratios are
measured in one run:

  ddim          cdp_fast.sample(loss=None)                         (ours, unguided; compile and
                --dtype as given: bf16 autocast on CUDA by default)
  ddim-eager    the same with compile=False
  infonce, hnm  cdp_fast.sample(loss=..., features=f)              (ours, guided)
  hnm-eager     the same with compile=False
  hnm-nograph   (opt-in) "hnm" with CDP_FAST_STEP_GRAPH=0: on CUDA the ε-model alone in CUDA
                graphs instead of the whole guided step (cdp_fast.sampling.graphs); on CPU = "hnm"
  ref-hnm, ref-infonce   benchmarks/reference_cdp.py: Algorithm 1 written plainly (fp32, full
                similarity matrix, Python loop, fresh autograd graph each step)
  diffusers     diffusers.DDIMScheduler (leading spacing, set_alpha_to_one, no clipping) +
                the same model, the canonical loop

Each method is warmed up (one run, which absorbs torch.compile, then one run under the memory
probe), then ``--repeats`` rounds each time every method once, in an order rotated per round:
interleaving puts a method and its yardstick on the same machine state, which matters on a
virtualised CPU whose speed drifts by tens of percent within a minute. Reported per method:
images/s (batch / median wall time over the rounds), warm-up seconds, peak memory, and the
largest |x_0 difference| to its yardstick (a correctness check: ours unguided vs diffusers should agree
to float rounding; ours guided vs the reference to the loss's float rounding amplified by λ).
A speed-up is the median over rounds of t_yardstick / t_method within the round, printed with
its range over the rounds.

Peak memory: CUDA — ``torch.cuda.max_memory_allocated`` (reset per method); CPU — the peak of
the process's resident set above its level just before the method ran, sampled every 2 ms by
a thread (after ``gc.collect()`` and glibc ``malloc_trim``), so it includes allocator slack
and is a coarse number.

On CUDA (or with ``--flops``) it also reports model-FLOP utilisation: the FLOPs of what ran
(:func:`run_flops`): ``torch.utils.flop_counter.FlopCounterMode``'s count of eager, uncaptured
runs of the same sampling at 2 and 3 steps (the networks' forward and backward in the dtype
they run in; elementwise work is not counted, nor the contrastive op's GEMMs: a custom op is
opaque to the mode — ~6·B²·d, under 0.1% at batch 512), extrapolated per step to ``--steps``,
so the steps the whole-step CUDA graph replays count too (a replay is one C++ call that a
dispatch mode never sees: counting the timed run itself read 3-5x low), divided by time and
by a peak measured here with a large matmul: "ours" against the bf16 peak when it runs under
bf16 autocast, the yardsticks against the true-fp32 peak. The yardsticks pin their precision:
on CUDA the plain ``diffusers`` / ``ref-*`` run with TF32 off (torch's default would let cuDNN
convolutions use TF32), and ``diffusers-tf32`` / ``ref-*-tf32`` run the same loops with TF32
on, so both comparisons are printed. Goals are per device (:data:`GOALS`, :data:`MFU_GOAL`):
CPU ≥ 1.3× both yardsticks; GPU ≥ 1.5× diffusers unguided, ≥ 3× the fp32 reference guided,
≥ 60% MFU of the measured bf16 peak for guided HNM. That path has not been run on a GPU yet.

Writes ``benchmarks/results/throughput-<device>.json`` with machine, versions and commit, and
rewrites it (atomically) after every method's warm-up and every timed round, with
``"complete": false`` and the stage it reached, so a run that is stopped (Ctrl-C / SIGINT /
SIGTERM: ``"interrupted": true``; a kill) still leaves what it measured. ``--methods`` may
name groups separated by ``;`` (``hnm,ref-hnm;ddim,diffusers``): each group is warmed up and
timed before the next one starts, so a stopped run keeps whole comparisons.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import git_commit  # noqa: E402  (provenance, shared with the other benchmarks)

ALL_METHODS = ("ddim", "ddim-eager", "diffusers", "hnm", "hnm-eager", "ref-hnm", "infonce", "ref-infonce")
# CUDA only: the same yardsticks with TF32 allowed (cuDNN convolutions and matmuls on tensor
# cores), beside the true-fp32 ones; the plain names run with TF32 off on CUDA
TF32_METHODS = ("diffusers-tf32", "ref-hnm-tf32", "ref-infonce-tf32")
# opt-in: ours guided (HNM) without the whole-step CUDA graph (CDP_FAST_STEP_GRAPH=0: the
# ε-model alone in CUDA graphs); on CPU the same as "hnm" (no step graph there)
GRAPH_METHODS = ("hnm-nograph",)
# --quality-matched: guided (HNM) DDIM at 200 steps, and the fewest-NFE solver setting whose
# quality benchmarks/solvers.py found inside DDIM-200's 95% interval (both ours, same x_T)
QUALITY_METHODS = ("hnm-ddim200", "hnm-matched")
# (method, yardstick) rows of the ratio table; the goals are per device (GOALS)
RATIOS = (
    ("ddim", "diffusers"),
    ("ddim", "diffusers-tf32"),
    ("ddim-eager", "diffusers"),
    ("hnm", "ref-hnm"),
    ("hnm", "ref-hnm-tf32"),
    ("hnm-eager", "ref-hnm"),
    ("hnm", "hnm-nograph"),
    ("infonce", "ref-infonce"),
    ("hnm-matched", "hnm-ddim200"),
)
# speed goals per device type: CPU ≥ 1.3× both yardsticks; GPU ≥ 1.5× diffusers unguided, ≥ 3×
# the faithful eager fp32 loop guided (HNM), and ≥ 60% MFU (of the measured bf16 peak) for hnm
GOALS = {
    "cpu": {("ddim", "diffusers"): 1.3, ("hnm", "ref-hnm"): 1.3},
    "cuda": {("ddim", "diffusers"): 1.5, ("hnm", "ref-hnm"): 3.0},
}
MFU_GOAL = {"cuda": {"hnm": 0.60}}


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or CPU RSS above the starting level."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = self._rss()
        self._peak = self._base
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_bytes = self._peak - self._base
        return False


# ----------------------------------------------------------------------------- setup
def build_digits(device):
    from cdp_fast.models import digits

    try:
        model = digits.load_digits_eps_model(device)
        feats = digits.digits_features(device)
        note = "bundled digits UNet (cdp_fast/assets) + the bundled classifier's features"
    except FileNotFoundError:
        model = digits.build_eps_model().to(device).eval()
        feats = digits.DigitsFeatures(digits.build_classifier().to(device)).eval()
        note = "digits UNet architecture, random init (assets missing)"
    from cdp_fast.models.digits import DIGITS_GUIDANCE

    g = DIGITS_GUIDANCE
    return {"model": model, "features": feats, "image_shape": digits.IMAGE_SHAPE, "note": note,
            "params": sum(p.numel() for p in model.parameters()),
            "hnm": dict(lam=g["hnm"]["lam"], tau=g["hnm"]["tau"], tau_plus=0.1, beta=1.0),
            "infonce": dict(lam=g["infonce"]["lam"], tau=g["infonce"]["tau"])}


def build_small(device):
    """A small diffusers UNet at 16×16 (CPU-sized, the shape of a real pipeline: diffusers
    blocks, self-attention, 3 channels) + a SmallCNN's features, both random init."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise SystemExit("--config small needs diffusers: pip install 'cdp_fast[diffusers]'") from e
    from cdp_fast.models.small_cnn import small_cnn

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).to(device).eval()
    cnn = small_cnn(in_channels=3).to(device).eval()
    return _random_setup(model, cnn, (3, 16, 16), "diffusers UNet2DModel 16x16 (32-64-64, attention at 8x8), "
                         "random init + SmallCNN (3 channels) features, random init")


def _random_setup(model, classifier, image_shape, note):
    """The setup of a random-init config: both networks frozen, the classifier as the feature
    extractor, the library's default guidance (cdp_fast.guidance.PAPER_DEFAULTS)."""
    from cdp_fast.guidance import PAPER_DEFAULTS as DEFAULTS
    from cdp_fast.models import as_feature_extractor

    for p in list(model.parameters()) + list(classifier.parameters()):
        p.requires_grad_(False)
    return {"model": model, "features": as_feature_extractor(classifier), "image_shape": image_shape,
            "note": note, "params": sum(p.numel() for p in model.parameters()),
            "hnm": dict(DEFAULTS["hnm"]), "infonce": dict(DEFAULTS["infonce"])}


def build_cifar(device):
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise SystemExit("--config cifar needs diffusers: pip install 'cdp_fast[diffusers]'") from e
    from cdp_fast.models import wrn_28_10

    # Ho et al. (2020)'s CIFAR-10 DDPM UNet as diffusers expresses it (the google/ddpm-cifar10-32
    # architecture): widths 128-256-256-256, 2 res blocks per level, self-attention at 16x16,
    # 35,746,307 parameters (counted with this diffusers build).
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=32, dropout=0.0, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ).to(device).eval()
    wrn = wrn_28_10().to(device).eval()
    return _random_setup(model, wrn, (3, 32, 32), "diffusers UNet2DModel, DDPM CIFAR-10 config, random init + "
                         "WRN-28-10 (Swish) features, random init")


def start_noise(n, shape, seed, device):
    """x_T exactly as cdp_fast.sample draws it: sample i from sample_seed(seed, i)."""
    from cdp_fast.utils.seeding import sample_seed

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in range(n)]).to(device)


# ----------------------------------------------------------------------------- methods
def make_runner(method, setup, args, device, x_T):
    import cdp_fast

    model, feats = setup["model"], setup["features"]
    shape = tuple(setup["image_shape"])
    B = args.batch

    def ours(loss, eager=False, step_graph=None):
        # The optimised methods take --compile and --dtype ("-eager" ones: no compile, fp32) and
        # their own copy of the ε-model: compiling on CUDA converts the module to channels_last,
        # which must not change the model the yardsticks run.
        compile_, dtype = (False, None) if eager else (args.compile, args.dtype)
        net = model if eager else setup.setdefault("model_ours", copy.deepcopy(model))

        def run():
            kw = {}
            if loss is not None:
                # the yardstick is Algorithm 1 as written (every step, anchor form, no head):
                # ours runs that same method, so the ratio compares implementations
                kw = dict(setup[loss], features=feats, form="anchors", guide_window=None, embedding=None)
            with _env("CDP_FAST_STEP_GRAPH", step_graph):
                s = cdp_fast.sample(net, B, loss=loss, steps=args.steps, skip="uniform", image_shape=shape,
                                    batch_size=B, output="float", seed=args.seed, device=device,
                                    compile=compile_, dtype=dtype, progress=False, **kw)
            if s.meta.get("step_graph"):
                setup.setdefault("step_graph", {})[method] = s.meta["step_graph"]
            return torch.as_tensor(s.images)
        return run

    if method in QUALITY_METHODS:
        solver, nfe, skip = ("ddim", 200, "uniform") if method == "hnm-ddim200" else args.matched
        kw = dict(setup["hnm"], features=feats, form="anchors", guide_window=None, embedding=None)

        def run_q():
            s = cdp_fast.sample(model, B, loss="hnm", solver=solver, nfe=nfe, skip=skip, image_shape=shape,
                                batch_size=B, output="float", seed=args.seed, device=device, compile=args.compile,
                                dtype=args.dtype, progress=False, **kw)
            return torch.as_tensor(s.images)
        return run_q
    if method in ("ddim", "ddim-eager"):
        return ours(None, eager=method.endswith("-eager"))
    if method == "hnm-nograph":
        return ours("hnm", step_graph="0")
    if method in ("hnm", "hnm-eager", "infonce"):
        return ours(method.split("-")[0], eager=method.endswith("-eager"))
    if method.endswith("-tf32"):
        if device.type != "cuda":
            raise ImportError("TF32 yardsticks exist on CUDA only")
        inner = make_runner(method[:-len("-tf32")], setup, args, device, x_T)
        return lambda: _with_tf32(True, inner)
    if method in ("ref-hnm", "ref-infonce"):
        from reference_cdp import reference_cdp

        from cdp_fast.diffusion.schedule import make_alphas_cumprod, timesteps

        loss = method.split("-")[1]
        abar = make_alphas_cumprod("linear", 1000)
        ts = timesteps(1000, args.steps, "uniform")

        def run():
            return _with_tf32(False, lambda: reference_cdp(model, x_T, feats, alphas_cumprod=abar, timesteps=ts,
                                                            loss=loss, **setup[loss]).cpu())
        return run
    if method == "diffusers":
        try:
            from diffusers import DDIMScheduler
        except ImportError as e:
            raise ImportError("the diffusers yardstick needs diffusers: pip install 'cdp_fast[diffusers]'") from e
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                              timestep_spacing="leading")

        @torch.no_grad()
        def loop():
            sched.set_timesteps(args.steps)
            x = x_T.clone()
            for t in sched.timesteps:
                out = model(x, t.to(device).expand(x.shape[0]))
                eps = getattr(out, "sample", out)
                x = sched.step(eps, t, x, eta=0.0).prev_sample
            return x.cpu()
        return lambda: _with_tf32(False, loop)
    raise ValueError(f"unknown method {method!r}")


@contextlib.contextmanager
def _env(name, value):
    """Environment variable ``name`` set to ``value`` inside (None: left as it is)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _with_tf32(allowed: bool, fn):
    """Run ``fn`` with cuDNN / matmul TF32 set to ``allowed`` (restored after): the yardsticks
    pin their precision (torch's default lets cuDNN convolutions run in TF32, so an "fp32"
    eager loop is not fp32 on a GPU unless told). No effect on a CPU."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        return fn()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm_up(method, setup, args, device, x_T):
    """Build the runner, run it once (absorbs torch.compile), then once more for peak memory;
    with ``args.flops`` the FLOPs of one run (:func:`run_flops`)."""
    run = make_runner(method, setup, args, device, x_T)
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    warm = time.perf_counter() - t0
    with PeakMemory(device) as mem:
        out = run()
    res = {"warmup_s": warm, "peak_mem_mib": mem.peak_bytes / 2**20, "x0": out, "times_s": []}
    if args.flops and method not in QUALITY_METHODS:   # those run a solver's nfe, not --steps
        try:
            res.update(run_flops(lambda k: _counting_runner(method, setup, args, device, x_T, k), args.steps))
        except Exception as e:  # noqa: BLE001 (no MFU for this method; its timings still count)
            res["flops_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  FLOP count of {method} failed: {res['flops_error']}", flush=True)
    return run, res


class _NoModuleTracker:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global"."""
    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (same formulas, same total) without its
    per-module tracker: the tracker's backward hooks make ``torch.autograd.grad`` with respect
    to a module's leaf input raise "A leaf node was passed to _will_engine_execute_node"
    (pytorch#131753, torch >= 2.4) — exactly the guidance's ∇_x ℓ — so the plain mode cannot
    count a guided run at all. Per-module tables are not needed here."""
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    if hasattr(fc, "mod_tracker"):
        fc.mod_tracker = _NoModuleTracker()
    return fc


#: step counts of the two eager runs :func:`run_flops` counts (1 step is refused by the
#: uniform schedule: it would be the single timestep t = 0)
FLOP_COUNT_STEPS = (2, 3)


def run_flops(make_run, steps: int) -> dict:
    """FLOPs of one ``steps``-step run, counted so that every executed step counts, captured
    and replayed or not: ``make_run(k)`` returns a callable that runs the same sampling with
    ``k`` steps eagerly with nothing captured; its FLOPs are counted (:func:`flop_counter`) at
    k = 2 and 3, the difference is one step's FLOPs, and the total is
    ``f(2) + (steps - 2) · per_step`` — exact when every step after the first two costs what
    the third does (DDIM: one ε evaluation per step and, guided, one feature forward +
    input-gradient). With ``steps`` <= 3 the run itself is counted.

    Returns {"flops", "flops_per_step", "flops_counted_at_steps"}."""
    def count(k):
        run = make_run(k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a 2-step uniform schedule warns about its start
            with flop_counter() as fc:
                run()
        return int(fc.get_total_flops())

    if steps <= FLOP_COUNT_STEPS[-1]:
        total = count(steps)
        return {"flops": total, "flops_per_step": total / steps, "flops_counted_at_steps": [steps]}
    k1, k2 = FLOP_COUNT_STEPS
    f1, f2 = count(k1), count(k2)
    per_step = (f2 - f1) // (k2 - k1)
    return {"flops": f1 + (steps - k1) * per_step, "flops_per_step": per_step,
            "flops_counted_at_steps": [k1, k2]}


def _counting_runner(method, setup, args, device, x_T, k):
    """``method``'s runner for a k-step run that executes every op where a dispatch mode sees
    it: not compiled (compiled code calls its kernels past the dispatcher), no CUDA graph
    (CDP_FAST_STEP_GRAPH=0), and the plain-PyTorch op paths (CDP_FAST_BACKEND=torch: a Triton
    launch that reaches FlopCounterMode as a higher-order op is counted, not run), under the
    same autocast dtype as the timed run."""
    a = copy.copy(args)
    a.steps, a.compile = k, False
    run = make_runner(method, setup, a, device, x_T)

    def counted():
        with _env("CDP_FAST_STEP_GRAPH", "0"), _env("CDP_FAST_BACKEND", "torch"):
            return run()
    return counted


def timed_rounds(runners, results, args, device, after_round=None):
    """``--repeats`` rounds; each round times every method once, in a rotated order; the
    medians are updated after every round, then ``after_round(r)`` is called (the partial JSON).

    Interleaving makes a method and its yardstick see the same machine state: on a shared or
    virtualised CPU the speed drifts by tens of percent over a minute, which sequential blocks
    of repeats would fold into the ratios.
    """
    names = list(runners)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            sync(device)
            t0 = time.perf_counter()
            runners[m]()
            sync(device)
            results[m]["times_s"].append(time.perf_counter() - t0)
        for m in names:
            med = statistics.median(results[m]["times_s"])
            results[m].update(images_per_s=args.batch / med, median_s=med)
        if after_round is not None:
            after_round(r)


def paired_speedup(results, m, ref):
    """Median over rounds of t_ref / t_m (same round), and the range over rounds."""
    per_round = [tr / tm for tm, tr in zip(results[m]["times_s"], results[ref]["times_s"])]
    return statistics.median(per_round), min(per_round), max(per_round)


def _mfu_peak(method, args) -> str:
    """The peak an MFU is divided by: "ours" (not -eager) in bf16 when it runs under bf16
    autocast, the TF32 yardsticks against TF32, everything else against true fp32."""
    if method.endswith("-tf32"):
        return "tf32"
    ours = method in ("ddim", "hnm", "infonce")
    return "bf16" if ours and args.dtype == torch.bfloat16 else "fp32"


def measured_peak_flops(device, dtype=torch.float32):
    """Dense matmul FLOP/s measured on this device (the denominator of MFU)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- provenance
def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            info["cpu"] = m.group(1).strip()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions():
    v = {"torch": torch.__version__}
    for name in ("diffusers", "numpy", "cdp_fast"):
        with contextlib.suppress(Exception):
            v[name] = __import__(name).__version__
    return v


def _atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None, prog=None):
    # prog: "cdp-fast bench" when run through the CLI (None: argparse's default, the script name)
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Sampling throughput: ours vs eager Algorithm 1 vs diffusers.")
    ap.add_argument("--config", choices=("digits", "small", "cifar"), default="digits",
                    help="digits: bundled 8x8 UNet (CPU-sized); small: a 16x16 diffusers UNet + SmallCNN "
                         "(CPU-sized, random init); cifar: DDPM CIFAR-10 UNet + WRN-28-10")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: digits 128, small 64, cifar 512)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (uniform skip)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="interleaved timing rounds (each times every method once; medians are reported)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS),
                    help=f"comma-separated subset of {','.join(ALL_METHODS + TF32_METHODS + GRAPH_METHODS)} "
                         "(the -tf32 yardsticks: CUDA only; the plain ones run with TF32 off there; "
                         "hnm-nograph: ours without the whole-step CUDA graph); ';' separates groups "
                         "that are warmed up and timed one after the other (e.g. hnm,ref-hnm;ddim,diffusers)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--compile", choices=("auto", "true", "false"), default="true",
                    help="compile= passed to cdp_fast.sample for the non-'-eager' methods")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="autocast dtype of the networks for ours (not the '-eager' methods); "
                         "auto: bfloat16 on CUDA, float32 on CPU (the yardsticks are always fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--flops", dest="flops", action="store_true", default=None,
                    help="count FLOPs (default: on CUDA only; MFU is reported on CUDA)")
    ap.add_argument("--no-flops", dest="flops", action="store_false", help="skip FLOP counting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-matched", nargs="?", const=str(ROOT / "benchmarks" / "results" / "solvers-cpu.json"),
                    default=None, metavar="SOLVERS_JSON",
                    help="also time guided DDIM-200 and the quality-matched fast-solver setting recorded by "
                         "benchmarks/solvers.py (default file: benchmarks/results/solvers-cpu.json)")
    ap.add_argument("--match-rule", choices=("strict", "no-worse"), default="strict",
                    help="which of benchmarks/solvers.py's settings --quality-matched times: strict = precision "
                         "and recall inside guided DDIM-200's 95%% interval; no-worse = not below it")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput-<device>.json)")
    args = ap.parse_args(argv)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    groups = [[m.strip() for m in g.split(",") if m.strip()] for g in args.methods.split(";")]
    groups = [g for g in groups if g]
    methods = [m for g in groups for m in g]
    if len(set(methods)) != len(methods):
        ap.error(f"--methods: a method is named twice ({args.methods})")
    bad = [m for m in methods if m not in ALL_METHODS + TF32_METHODS + GRAPH_METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {ALL_METHODS + TF32_METHODS + GRAPH_METHODS}")
    args.matched = None
    if args.quality_matched is not None:
        try:
            rec = json.loads(Path(args.quality_matched).read_text())
            qm = rec["summary"]["quality_matched" if args.match_rule == "strict" else "no_worse_than_ddim200"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--quality-matched: cannot read the quality-matched setting from {args.quality_matched} ({e})")
        if not qm:
            ap.error(f"--quality-matched: {args.quality_matched} records no {args.match_rule} setting")
        args.matched = (qm["solver"], int(qm["nfe"]), qm.get("skip", "uniform"))
        extra = [m for m in QUALITY_METHODS if m not in methods]
        methods += extra
        groups[-1] += extra
    args.methods, args.groups = methods, groups
    if args.batch is None:
        args.batch = {"digits": 128, "small": 64, "cifar": 512}[args.config]
    if args.batch < 2 or args.steps < 1 or args.repeats < 1:
        ap.error("--batch must be >= 2, --steps and --repeats >= 1")
    return args


def _ratios(results, device, groups):
    """The (method, yardstick) rows computable from ``results``: both in one group (timed in
    the same rounds) and timed at least once."""
    rows = []
    goals = GOALS.get(device.type, {})
    for m, ref in RATIOS:
        if m not in results or ref not in results or not any(m in g and ref in g for g in groups):
            continue
        n = min(len(results[m]["times_s"]), len(results[ref]["times_s"]))
        if n == 0:
            continue
        sp, lo, hi = paired_speedup(results, m, ref)
        goal = goals.get((m, ref))
        diff = float((results[m]["x0"] - results[ref]["x0"]).abs().max())
        results[m]["max_abs_diff_vs_" + ref] = diff     # correctness: same x_T as the yardstick
        rows.append({"method": m, "yardstick": ref, "speedup": sp, "speedup_min": lo, "speedup_max": hi,
                     "rounds": n, "goal": goal, "met": None if goal is None else sp >= goal,
                     "max_abs_diff": diff})
    return rows


def _mfu(results, args, device, peaks):
    """MFU of every timed method with a FLOP count, in place (needs the measured peaks)."""
    for m, r in results.items():
        if peaks and "flops" in r and "median_s" in r:
            r["mfu_peak"] = _mfu_peak(m, args)
            r["mfu"] = r["flops"] / r["median_s"] / peaks[r["mfu_peak"]]
            goal = MFU_GOAL.get(device.type, {}).get(m)
            if goal is not None:
                r["mfu_goal"], r["mfu_met"] = goal, r["mfu"] >= goal


def _record(args, setup, device, state, complete):
    """The JSON record of the run so far (``complete``: every group timed and the table printed)."""
    results = state["results"]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete, "stage": state["stage"], "interrupted": state.get("interrupted", False),
        "commit": state["commit"], "machine": state["machine"], "versions": state["versions"],
        "config": {"name": args.config, "note": setup["note"], "params": setup["params"], "batch": args.batch,
                   "steps": args.steps, "skip": "uniform", "repeats": args.repeats, "compile": args.compile,
                   "groups": args.groups,
                   "quality_matched": None if args.matched is None else
                   {"solver": args.matched[0], "nfe": args.matched[1], "skip": args.matched[2],
                    "rule": args.match_rule, "from": args.quality_matched},
                   "dtype": str(args.dtype or torch.float32),
                   "image_shape": list(setup["image_shape"]), "hnm": setup["hnm"], "infonce": setup["infonce"]},
        "flops_counting": ("FlopCounterMode (without its module tracker) over eager, uncaptured runs of "
                           f"{' and '.join(map(str, FLOP_COUNT_STEPS))} steps, extrapolated per step to --steps"
                           if args.flops else None),
        "peak_flops_measured": state["peaks"] or None,
        "goals": {f"{m}/{r}": g for (m, r), g in GOALS.get(device.type, {}).items()},
        "mfu_goals": MFU_GOAL.get(device.type, {}),
        "yardstick_precision": ("fp32 (TF32 off); the *-tf32 rows with TF32 on" if device.type == "cuda"
                                else "fp32"),
        "tf32_defaults": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                          "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "results": {m: {k: v for k, v in r.items() if k != "x0"} for m, r in results.items()},
        "ratios": _ratios(results, device, args.groups),
        "skipped": state["skipped"],
        # the whole-step CUDA graph of ours (cdp_fast.sampling.graphs): steps eager / warm-up / captured /
        # replayed in the last run of each method that used one
        "step_graph": setup.get("step_graph"),
    }


class _Stopped(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as SIGINT (the partial JSON is written)."""


def _raise_stopped(signum, frame):
    raise _Stopped(f"signal {signum}")


def main(argv=None, prog=None):
    old_term = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return _main(argv, prog)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_term)


def _main(argv=None, prog=None):
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    args.dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    setup = {"digits": build_digits, "small": build_small, "cifar": build_cifar}[args.config](device)
    x_T = start_noise(args.batch, tuple(setup["image_shape"]), args.seed, device)
    print(f"config {args.config}: {setup['note']}; {setup['params'] / 1e6:.2f}M params; batch {args.batch}, "
          f"{args.steps} steps, {args.repeats} interleaved rounds; device {device}, {torch.get_num_threads()} threads, "
          f"ours in {args.dtype or torch.float32}",
          flush=True)
    dev_name = ("cpu" if device.type == "cpu"
                else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-"))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"throughput-{dev_name}.json"
    if args.flops is None:
        args.flops = device.type == "cuda"
    state = {"results": {}, "skipped": {}, "peaks": {}, "stage": "setup", "commit": git_commit(),
             "machine": machine_info(device), "versions": versions()}
    results = state["results"]

    def write(complete=False):
        _mfu(results, args, device, state["peaks"])
        _atomic_write_text(out, json.dumps(_record(args, setup, device, state, complete), indent=2) + "\n")

    try:
        if device.type == "cuda" and args.flops:
            # MFU denominators measured first (a run stopped later still has its MFU): "ours"
            # against the peak of the dtype it runs in, the yardsticks against true fp32 (their
            # TF32 twins against TF32)
            state["stage"] = "peaks"
            state["peaks"] = {"fp32": _with_tf32(False, lambda: measured_peak_flops(device)),
                              "tf32": _with_tf32(True, lambda: measured_peak_flops(device)),
                              "bf16": measured_peak_flops(device, torch.bfloat16)}
        write()
        for gi, group in enumerate(args.groups):
            runners = {}
            for m in group:
                state["stage"] = f"warm-up {m}"
                print(f"  warming up {m} ...", flush=True)
                try:
                    runners[m], results[m] = warm_up(m, setup, args, device, x_T)
                except ImportError as e:  # an optional yardstick whose package is missing
                    state["skipped"][m] = str(e)
                    print(f"  skipped {m}: {e}", flush=True)
                write()
            state["stage"] = f"rounds of group {gi + 1}/{len(args.groups)}"
            print(f"  timing {args.repeats} interleaved rounds of {','.join(runners)} ...", flush=True)
            timed_rounds(runners, results, args, device, after_round=lambda r: write())
        state["stage"] = "done"
    except KeyboardInterrupt as e:   # SIGINT, or SIGTERM (_Stopped): keep what was measured
        state["interrupted"] = True
        write()
        print(f"\ninterrupted ({type(e).__name__}: {e}) during {state['stage']}; partial results in {out}",
              file=sys.stderr, flush=True)
        return 130

    peak = state["peaks"].get("bf16")
    _mfu(results, args, device, state["peaks"])
    ratios = _ratios(results, device, args.groups)
    hdr = f"{'method':<12} {'img/s':>10} {'median s':>10} {'warm-up s':>10} {'peak MiB':>10}"
    if peak:
        hdr += f" {'MFU':>7}"
    print("\n" + hdr)
    for m, r in results.items():
        line = (f"{m:<12} {r['images_per_s']:>10.1f} {r['median_s']:>10.3f} {r['warmup_s']:>10.2f} "
                f"{r['peak_mem_mib']:>10.1f}")
        if "mfu" in r:
            line += f" {100 * r['mfu']:>6.2f}% of {r['mfu_peak']}"
            if "mfu_goal" in r:
                line += f" (goal {100 * r['mfu_goal']:.0f}%: {'met' if r['mfu_met'] else 'MISSED'})"
        print(line)
    print(f"\n{'ratio (median of rounds)':<26} {'speed-up':>9} {'range':>13} {'goal':>6} {'max|Δx0|':>10}"
          f"   (goals for {device.type})")
    for q in ratios:
        g = "" if q["goal"] is None else f"{q['goal']:.1f}x"
        flag = "" if q["met"] is None else (" met" if q["met"] else " MISSED")
        print(f"{q['method'] + ' / ' + q['yardstick']:<26} {q['speedup']:>8.2f}x {q['speedup_min']:>5.2f}-"
              f"{q['speedup_max']:<5.2f}x {g:>6} {q['max_abs_diff']:>10.2e}{flag}")
    if "hnm-matched" in results:
        print(f"(hnm-matched = {args.matched[0]} at {args.matched[1]} NFE ({args.matched[2]} spacing), the "
              f"{args.match_rule} quality match read from {args.quality_matched} (benchmarks/solvers.py: the "
              "fewest-NFE setting whose precision and recall are inside / not below guided DDIM-200's interval); "
              "its max|Δx0| compares two solvers' samples, not a correctness check)")
    if device.type == "cuda" and not peak:
        print("(MFU not measured: --no-flops)")
    elif device.type != "cuda":
        print("(MFU is reported on CUDA only; this run is CPU" + (": FLOPs are in the JSON)" if args.flops else ")"))
    write(complete=True)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
