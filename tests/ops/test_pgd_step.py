"""cdp_fast::pgd_step (csrc/) against its reference ``pgd_step_ref`` (cdp_fast/ops/pgd_step/), and the
reference against a literal NumPy transcription of the formula

    y = clamp(min(max(x_adv + α·sign(g), x − ε), x + ε), 0, 1),   sign(0) = 0.

Tolerances: the op is elementwise sign/add/sub/min/max in the same precision as the
reference (float32/float64 in their dtype; float16/bfloat16 in float32 with one rounding at
the end), so it is compared BITWISE (NaN positions equal, payloads ignored) against
``pgd_step_ref`` for every dtype. Against the *native-dtype* eager composite (bf16/fp16
rounding after every op) it may differ by one rounding of an intermediate: ≤ 1 ulp at
|y| ≤ 2, i.e. 2^-7 (bf16) and 2^-10 (fp16).

The extension is built (or loaded from the cache) once per session by the ``ext`` fixture.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cdp_fast.ops import backend
from cdp_fast.ops import pgd_step as _ext
from cdp_fast.ops.pgd_step import build
from cdp_fast.ops.pgd_step import pgd_step, pgd_step_ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="session")
def ext():
    """Build/load the extension once; fail loudly (not skip) when it cannot be built, so a
    broken build cannot hide behind the composite fallback."""
    if not _ext.load_extension():
        pytest.fail(f"cdp_fast::pgd_step extension unavailable: {_ext.extension_error()}")
    return torch.ops.cdp_fast.pgd_step.default


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    both_nan = torch.isnan(a) & torch.isnan(b)
    same = a.view(_INT_VIEW[a.element_size()]) == b.view(_INT_VIEW[b.element_size()])
    bad = ~(same | both_nan)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {a.numel()} elements differ; first: "
        f"{a[bad][:5].tolist()} vs {b[bad][:5].tolist()}")


def make_inputs(shape, dtype, seed, zero_frac=0.3):
    """x in [-0.2, 1.2] (exercises the [0, 1] clamp), x_adv = x + noise (exercises the ball),
    g ~ N(0, 1) with a fraction of exact zeros (and one -0.0) so sign(0) = 0 is hit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    xa = x + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    g[torch.rand(shape, generator=gen) < zero_frac] = 0.0
    if g.numel():
        g.view(-1)[0] = -0.0
    return xa.to(dtype), g.to(dtype), x.to(dtype)


def per_sample_or_float(draw_val, per_sample, batch, gen_seed):
    if not per_sample:
        return draw_val
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.rand(batch, generator=gen, dtype=torch.float64) * 2 * draw_val


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=5).map(tuple)


@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.float64]),
       alpha=st.floats(0, 0.5), eps=st.floats(0, 0.5), per_sample=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_composite_bitwise(ext, shape, dtype, alpha, eps, per_sample, seed):
    xa, g, x = make_inputs(shape, dtype, seed)
    a = per_sample_or_float(alpha, per_sample, shape[0], seed + 1)
    e = per_sample_or_float(eps, per_sample, shape[0], seed + 2)
    y = pgd_step(xa, g, x, step_size=a, eps=e, impl="ext")
    assert_bitwise(y, pgd_step_ref(xa, g, x, step_size=a, eps=e))


@given(shape=shapes, dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       alpha=st.floats(0, 0.5), eps=st.floats(0, 0.5), per_sample=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_reduced_precision(ext, shape, dtype, alpha, eps, per_sample, seed):
    xa, g, x = make_inputs(shape, dtype, seed)
    a = per_sample_or_float(alpha, per_sample, shape[0], seed + 1)
    e = per_sample_or_float(eps, per_sample, shape[0], seed + 2)
    y = pgd_step(xa, g, x, step_size=a, eps=e, impl="ext")
    # Bitwise against the upcast reference (same math, one rounding).
    assert_bitwise(y, pgd_step_ref(xa, g, x, step_size=a, eps=e))
    # Within one intermediate rounding of the native-dtype eager composite.
    a_n = a.to(dtype).view((-1,) + (1,) * (len(shape) - 1)) if per_sample else a
    e_n = e.to(dtype).view((-1,) + (1,) * (len(shape) - 1)) if per_sample else e
    native = torch.clamp(torch.minimum(torch.maximum(xa + a_n * torch.sign(g), x - e_n), x + e_n), 0, 1)
    atol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(y, native, rtol=0, atol=atol)


@given(shape=shapes, alpha=st.floats(0, 0.5), eps=st.floats(0, 0.5), seed=st.integers(0, 2**31 - 1))
def test_reference_is_the_formula(shape, alpha, eps, seed):
    """pgd_step_ref against NumPy, written from the formula (float64; no NaNs here since
    np.sign(NaN) = NaN while torch.sign(NaN) = 0)."""
    xa, g, x = make_inputs(shape, torch.float64, seed)
    n_xa, n_g, n_x = xa.numpy(), g.numpy(), x.numpy()
    expect = np.clip(np.minimum(np.maximum(n_xa + alpha * np.sign(n_g), n_x - eps), n_x + eps), 0.0, 1.0)
    got = pgd_step_ref(xa, g, x, step_size=alpha, eps=eps).numpy()
    np.testing.assert_array_equal(got, expect)


def test_special_values_bitwise(ext):
    """Every combination of ±0, ±1, 0.5, NaN, ±inf, tiny and >1 values for (x_adv, g, x):
    NaN in x_adv/x propagates like torch.maximum/minimum/clamp, sign(NaN) = sign(±0) = 0,
    -0 survives the [0, 1] clamp exactly as in torch.clamp."""
    vals = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), -float("inf"),
                         1e-30, 2.0, 1.0000001, -1e-40], dtype=torch.float64)
    xa, g, x = (t.reshape(-1) for t in torch.meshgrid(vals, vals, vals, indexing="ij"))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for a, e in ((0.0, 0.0), (0.1, 0.05), (0.0, 0.3), (1.0, float("inf"))):
            args = (xa.to(dtype), g.to(dtype), x.to(dtype))
            assert_bitwise(pgd_step(*args, step_size=a, eps=e, impl="ext"),
                           pgd_step_ref(*args, step_size=a, eps=e))


def test_sign_zero_means_no_step(ext):
    x = torch.rand(5, 3, 7, 7) * 0.5
    for zero in (0.0, -0.0):
        y = pgd_step(x, torch.full_like(x, zero), x, step_size=0.3, eps=0.1, impl="ext")
        assert torch.equal(y, x)
    g = torch.zeros_like(x)
    g[0, 0, 0, 0] = 1.0
    y = pgd_step(x, g, x, step_size=0.01, eps=0.1, impl="ext")
    assert (y != x).nonzero().tolist() == [[0, 0, 0, 0]]


def test_large_per_sample_multithreaded(ext):
    """Chunks of at::parallel_for (32768 elements) cross sample boundaries: each element must
    still use its own sample's α, ε."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        xa, g, x = make_inputs((7, 3, 61, 67), torch.float32, seed=5)
        a = torch.linspace(0, 0.2, 7)
        e = torch.linspace(0.3, 0.0, 7, dtype=torch.float64)
        assert_bitwise(pgd_step(xa, g, x, step_size=a, eps=e, impl="ext"),
                       pgd_step_ref(xa, g, x, step_size=a, eps=e))
    finally:
        torch.set_num_threads(old)


def test_non_contiguous_inputs(ext):
    xa, g, x = make_inputs((4, 3, 9, 11), torch.float32, seed=7)
    cl = [t.to(memory_format=torch.channels_last) for t in (xa, g, x)]
    tr = [t.transpose(2, 3) for t in (xa, g, x)]
    for args in (cl, tr):
        y = pgd_step(*args, step_size=0.05, eps=0.1, impl="ext")
        assert y.is_contiguous()
        assert_bitwise(y, pgd_step_ref(*args, step_size=0.05, eps=0.1))


def test_empty_and_zero_dim(ext):
    z = torch.empty(0, 3)
    assert pgd_step(z, z, z, step_size=0.1, eps=0.1, impl="ext").shape == (0, 3)
    s = torch.tensor(0.5)
    assert_bitwise(pgd_step(s, torch.tensor(-1.0), s, step_size=0.1, eps=0.05, impl="ext"),
                   torch.tensor(0.45))


def test_opcheck(ext):
    xa, g, x = make_inputs((3, 2, 5, 5), torch.float32, seed=11)
    for a, e in ((torch.tensor(0.01, dtype=torch.float64), torch.tensor(0.03, dtype=torch.float64)),
                 (torch.rand(3) * 0.1, torch.rand(3, dtype=torch.float64) * 0.1)):
        torch.library.opcheck(ext, (xa, g, x, a, e))


def test_compiled_step_matches_eager(ext):
    """torch.compile (inductor, fullgraph) traces the op through its register_fake."""
    def step(xa, g, x, e):
        return pgd_step(xa, g, x, step_size=2 / 255, eps=e)

    xa, g, x = make_inputs((4, 3, 8, 8), torch.float32, seed=3)
    e = torch.full((4,), 8 / 255)
    compiled = torch.compile(step, fullgraph=True)
    assert_bitwise(compiled(xa, g, x, e), step(xa, g, x, e))


def test_value_errors():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="grad"):
        pgd_step(x, torch.rand(2, 4), x, step_size=0.1, eps=0.1)
    with pytest.raises(ValueError, match="x_nat"):
        pgd_step(x, x, torch.rand(3, 3), step_size=0.1, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, x, x, step_size=0.1, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, x, x, step_size=0.1, eps=float("nan"))
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, x, x, step_size=-1e-3, eps=0.1)
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, x, x, step_size=float("inf"), eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, x, x, step_size=0.1, eps=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="eps"):
        pgd_step(x, x, x, step_size=0.1, eps=torch.rand(3))
    with pytest.raises(ValueError, match="step_size"):
        pgd_step(x, x, x, step_size=torch.rand(2, 1), eps=0.1)
    with pytest.raises(ValueError, match="x_adv"):
        pgd_step(torch.ones(2, 3, dtype=torch.long), x, x, step_size=0.1, eps=0.1)
    with pytest.raises(ValueError, match="dtype"):
        pgd_step(x, x.double(), x, step_size=0.1, eps=0.1)
    with pytest.raises(ValueError, match="impl"):
        pgd_step(x, x, x, step_size=0.1, eps=0.1, impl="triton")


def test_direct_op_checks_in_cpp(ext):
    x = torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="one shape"):
        ext(x, torch.rand(3, 2), x, torch.tensor(0.1), torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="eps must have shape"):
        ext(x, x, x, torch.tensor(0.1), torch.rand(5))


def test_no_autograd():
    x = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        pgd_step(x, torch.rand(2, 3), x.detach(), step_size=0.1, eps=0.1)
    with torch.no_grad():
        assert not pgd_step(x, torch.rand(2, 3), x, step_size=0.1, eps=0.1).requires_grad


def _count_warnings(fn, n_calls):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [fn() for _ in range(n_calls)]
    return outs, [w for w in rec if "cdp_fast.pgd_step" in str(w.message)]


def test_forced_composite_warns_once_and_matches(ext, monkeypatch):
    xa, g, x = make_inputs((3, 3, 5, 5), torch.float32, seed=2)
    fused = pgd_step(xa, g, x, step_size=0.02, eps=0.05, impl="ext")
    monkeypatch.setenv("CDP_FAST_PGD_IMPL", "composite")
    monkeypatch.setattr(_ext, "_warned", set())
    outs, warns = _count_warnings(lambda: pgd_step(xa, g, x, step_size=0.02, eps=0.05), 3)
    assert len(warns) == 1 and "CDP_FAST_PGD_IMPL=composite" in str(warns[0].message)
    for o in outs:
        assert_bitwise(o, fused)
    # An explicit per-call choice does not warn.
    monkeypatch.setattr(_ext, "_warned", set())
    _, warns = _count_warnings(lambda: pgd_step(xa, g, x, step_size=0.02, eps=0.05, impl="composite"), 2)
    assert warns == []


@pytest.mark.parametrize("env,expected", [({"CDP_FAST_BACKEND": "torch"}, "composite"),
                                          ({"CDP_FAST_BACKEND": "triton"}, "ext"),
                                          ({"CDP_FAST_BACKEND": "auto"}, "ext"),
                                          ({"CDP_FAST_BACKEND": "torch", "CDP_FAST_PGD_IMPL": "ext"}, "ext"),
                                          ({"CDP_FAST_BACKEND": "triton", "CDP_FAST_PGD_IMPL": "composite"},
                                           "composite")])
def test_one_backend_rule_with_the_pgd_alias(ext, monkeypatch, env, expected):
    """CDP_FAST_BACKEND governs the PGD step too (torch -> composite, triton -> the extension);
    CDP_FAST_PGD_IMPL, kept as an alias, wins for this op."""
    monkeypatch.delenv("CDP_FAST_PGD_IMPL", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _ext.resolved_impl() == expected
        # backend.choose gives the request; the op resolves "auto" (the extension loads here)
        assert backend.choose("pgd_step") == ("auto" if env == {"CDP_FAST_BACKEND": "auto"} else expected)
    monkeypatch.setenv("CDP_FAST_PGD_IMPL", "fast")
    with pytest.raises(ValueError, match="CDP_FAST_PGD_IMPL"):
        backend.choose("pgd_step")


def test_unavailable_extension_falls_back_with_one_warning(ext, monkeypatch):
    """Simulates a machine where neither the prebuilt module nor the JIT build works."""
    xa, g, x = make_inputs((3, 3, 5, 5), torch.float32, seed=4)
    fused = pgd_step(xa, g, x, step_size=0.02, eps=0.05, impl="ext")
    monkeypatch.delenv("CDP_FAST_PGD_IMPL", raising=False)
    monkeypatch.delenv("CDP_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_ext, "_warned", set())
    for k, v in (("tried", True), ("op", None), ("error", "simulated: no compiler")):
        monkeypatch.setitem(build._state, k, v)
    outs, warns = _count_warnings(lambda: pgd_step(xa, g, x, step_size=0.02, eps=0.05), 3)
    assert len(warns) == 1 and "simulated: no compiler" in str(warns[0].message)
    for o in outs:
        assert_bitwise(o, fused)
    with pytest.raises(RuntimeError, match="unavailable"):
        pgd_step(xa, g, x, step_size=0.02, eps=0.05, impl="ext")


def test_stale_prebuilt_is_skipped(tmp_path, monkeypatch):
    """An editable install whose csrc/ was edited after `pip install -e .` must not load the
    old cdp_fast/_C*.so (it would run old code); the JIT build takes over."""
    import importlib.util
    import os
    import types

    so = tmp_path / "_C.so"
    so.write_bytes(b"")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "pgd_step.cpp").write_text("// new")
    os.utime(so, (1_000_000, 1_000_000))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: types.SimpleNamespace(origin=str(so)))
    monkeypatch.setattr(build, "_csrc_dir", lambda: csrc)
    assert "pgd_step.cpp" in build._prebuilt_stale()
    os.utime(so, None)
    os.utime(csrc / "pgd_step.cpp", (1_000_000, 1_000_000))
    assert build._prebuilt_stale() is None


def test_jit_cache_location_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build._build_dir("abc") == tmp_path / "cdp_fast" / "abc"
    src = tmp_path / "a.cpp"
    src.write_text("int a;")
    k1 = build._cache_key([str(src)])
    src.write_text("int b;")
    assert build._cache_key([str(src)]) != k1  # an edited source is a new build


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_composite(ext, dtype):
    """The CUDA kernel (csrc/pgd_step_cuda.cu) against the composite on the same device.
    Compared by value (exact, NaN = NaN) rather than bit pattern: CUDA's max/min tie rule for
    ±0 is not pinned down here. Never run on the CPU-only development machine."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("cdp_fast::pgd_step", "CUDA"):
        pytest.fail("no CUDA kernel registered: the extension was built without CUDA")
    xa, g, x = (t.cuda() for t in make_inputs((5, 3, 17, 19), dtype, seed=21))
    for a, e in ((2 / 255, 8 / 255), (torch.rand(5, device="cuda") * 0.1, torch.rand(5) * 0.1)):
        y = pgd_step(xa, g, x, step_size=a, eps=e, impl="ext")
        torch.testing.assert_close(y, pgd_step_ref(xa, g, x, step_size=a, eps=e),
                                   rtol=0, atol=0, equal_nan=True)
    torch.library.opcheck(ext, (xa, g, x, torch.tensor(0.01, dtype=torch.float64),
                                torch.rand(5, device="cuda")))
