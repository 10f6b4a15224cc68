"""CDP_FAST_BACKEND semantics (cdp_fast.ops.backend.choose is the one place that decides; the ops
execute its answer) and the end-to-end equivalence of the sampler on the Triton (interpreted)
and PyTorch backends."""
import os

import pytest
import torch

from cdp_fast.ops import backend
from cdp_fast.guidance import losses
from cdp_fast.ops.contrastive import reference
from cdp_fast.ops.ddim import ddim_update, ddim_update_ref

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
kc = pytest.importorskip("cdp_fast.kernels.contrastive")
kd = pytest.importorskip("cdp_fast.kernels.ddim")


def _ddim_args():
    x, e, g = (torch.randn(2, 3, 4) for _ in range(3))
    return (x, e, g), dict(lam=0.5, abar_t=0.3, abar_prev=0.6, sigma=0.0, return_x0=True)


@pytest.mark.parametrize("value,dtype,expected", [
    ("auto", torch.float32, "torch"), ("torch", torch.float32, "torch"), ("auto", torch.float64, "torch"),
    ("triton", torch.float32, "interpret")])
def test_choose_on_cpu_tensors(monkeypatch, value, dtype, expected):
    if expected == "interpret" and not INTERP:
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CDP_FAST_BACKEND", value)
    for op in ("contrastive", "ddim"):
        assert backend.choose(op, torch.zeros(2, dtype=dtype)) == expected
    with pytest.raises(ValueError, match="op must be one of"):
        backend.choose("matmul", torch.zeros(2))


def test_explicit_triton_interpreter_is_fp32_only(monkeypatch):
    if not INTERP:
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CDP_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="fp32 only"):
        backend.choose("contrastive", torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("", "auto"), ("auto", "auto"),
                                            (" Triton ", "triton"), ("TORCH", "torch")])
def test_requested_backend_values(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CDP_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("CDP_FAST_BACKEND", value)
    assert backend.requested_backend() == expected


def test_bad_backend_value_raises_valueerror(monkeypatch):
    monkeypatch.setenv("CDP_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CDP_FAST_BACKEND"):
        backend.requested_backend()
    a = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="CDP_FAST_BACKEND"):
        losses.hnm_loss(a, a.detach(), tau=0.5)
    args, kw = _ddim_args()
    with pytest.raises(ValueError, match="CDP_FAST_BACKEND"):
        ddim_update(*args, **kw)


def test_explicit_triton_without_device_or_interpreter_raises(monkeypatch):
    """CPU tensors, no TRITON_INTERPRET: nothing can run Triton, and it was asked for."""
    monkeypatch.setenv("CDP_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        losses.hnm_loss(a, a.detach(), tau=0.5)
    args, kw = _ddim_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ddim_update(*args, **kw)


def _spy(monkeypatch, module, name):
    calls = []
    orig = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(name)
        return orig(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("value", ["auto", "torch", "triton"])
def test_dispatch_reaches_the_right_implementation(monkeypatch, value):
    """auto/torch on CPU tensors never touch the Triton launchers (even with TRITON_INTERPRET=1:
    the interpreter is a test tool); triton under the interpreter always does."""
    if value == "triton" and not INTERP:
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("CDP_FAST_BACKEND", value)
    fwd = _spy(monkeypatch, kc, "stats_forward")
    bwd = _spy(monkeypatch, kc, "stats_backward")
    upd = _spy(monkeypatch, kd, "launch_ddim_update")
    a = torch.randn(6, 5, requires_grad=True)
    k = torch.randn(7, 5, requires_grad=True)
    out = losses.hnm_loss(a, a.detach() + 0.1, k, tau=0.5)
    out.backward()
    ref = reference.hnm_loss_ref(a, a.detach() + 0.1, k, tau=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    args, kw = _ddim_args()
    xp, x0 = ddim_update(*args, **kw)
    rxp, rx0 = ddim_update_ref(*args, **kw)
    torch.testing.assert_close(xp, rxp)
    torch.testing.assert_close(x0, rx0)
    used = value == "triton"
    assert (fwd == ["stats_forward"]) == used and (bwd == ["stats_backward"]) == used
    assert (upd == ["launch_ddim_update"]) == used


def test_ddim_update_contract(monkeypatch):
    """(x_prev, None) without return_x0, in x_t's dtype and shape, on every backend."""
    for value in ["auto", "torch"] + (["triton"] if INTERP else []):
        monkeypatch.setenv("CDP_FAST_BACKEND", value)
        (x, e, g), kw = _ddim_args()
        kw["return_x0"] = False
        xp, x0 = ddim_update(x, e, g, **kw)
        assert x0 is None and xp.shape == x.shape and xp.dtype == x.dtype


class _TinyEps(torch.nn.Module):
    """A tiny conv ε-model: deterministic weights, mixes in t so every step differs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + 1e-3 * t.float().view(-1, 1, 1, 1)


@pytest.mark.skipif(not INTERP, reason="the Triton backend runs on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("loss", ["hnm", "infonce"])
def test_sampler_same_samples_on_triton_and_torch(monkeypatch, loss):
    """Same samples (to fp32 rounding) whether the guidance loss and the DDIM update run as
    interpreted Triton kernels or as the PyTorch path."""
    import cdp_fast

    model = _TinyEps()
    kw = dict(loss=loss, image_shape=(1, 5, 5), batch_size=6, steps=4, output="float", progress=False,
              seed=0, lam=0.5, tau=0.5, eta=0.5, compile=False, guide_window=None, features="pixels")
    outs = {}
    for value in ("torch", "triton"):
        monkeypatch.setenv("CDP_FAST_BACKEND", value)
        fwd = _spy(monkeypatch, kc, "stats_forward")
        upd = _spy(monkeypatch, kd, "launch_ddim_update")
        outs[value] = torch.as_tensor(cdp_fast.sample(model, 6, **kw).images)
        monkeypatch.undo()  # drop the spies (and the env) before the next backend
        assert bool(fwd) == bool(upd) == (value == "triton"), (value, len(fwd), len(upd))
    assert torch.isfinite(outs["torch"]).all()
    # fp32: the two paths sum the same terms in different orders; the guidance gradient
    # (λ·∇ℓ) is the only place where that shows, well below 1e-4 after 4 steps
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-5)


def test_explicit_triton_without_triton_raises(monkeypatch):
    """Triton not importable (e.g. macOS): triton requested -> RuntimeError naming the cause;
    auto falls back to the PyTorch path quietly."""
    def no_triton(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(backend, "_import_kernels", no_triton)
    monkeypatch.setenv("CDP_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton"):
        backend.choose("contrastive", torch.zeros(2))
    monkeypatch.setenv("CDP_FAST_BACKEND", "auto")
    a = torch.randn(5, 4, requires_grad=True)
    out = losses.hnm_loss(a, a.detach(), tau=0.5)
    torch.testing.assert_close(out, reference.hnm_loss_ref(a, a.detach(), tau=0.5), rtol=1e-5, atol=1e-6)


def test_kernels_load_from_an_uninstalled_checkout():
    """Without the editable install's finder, cdp_fast.ops.backend still finds <repo>/kernels."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(backend.__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import torch\n"
        "from cdp_fast.ops import backend\n"
        "from cdp_fast.guidance import losses\n"
        "mod, err = backend._kernels_or_error('contrastive')\n"
        "assert mod is not None, err\n"
        "a = torch.randn(5, 3, requires_grad=True)\n"
        "losses.hnm_loss(a, a.detach(), tau=0.5).backward()\n"
        "print(mod.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(root), CDP_FAST_BACKEND="auto")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(root),
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve() == root / "kernels" / "contrastive.py"
