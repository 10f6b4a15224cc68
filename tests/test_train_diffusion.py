"""cdp_fast.train_diffusion (the DDPM objective, EMA, resumable checkpoints) and the
class-conditional UNet, on scikit-learn's 8×8 digits.

Runs are small (a UNet of width 8, 256–512 images, 4 updates an epoch) so each test takes a
few seconds on one CPU core. Bitwise comparisons (resume, uint8 vs float input, the bundled
model) compare runs in the same process; pinned numbers from another machine get a stated
tolerance.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cdp_fast
from cdp_fast.diffusion.augment import crop_boxes, random_resized_crop, sample_draws
from cdp_fast.models import digits
from cdp_fast.models.unet import UNet

FAST = dict(batch_size=64, lr=2e-3, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: the runs are tiny (two threads only add synchronisation) and bitwise
    comparisons need the same thread count within a test anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_data():
    """256 train digits in [-1, 1] (N, 1, 8, 8) and their labels."""
    x, y = digits.load_digits_data("train")
    return (2 * x[:256] - 1).contiguous(), y[:256].contiguous()


def _unet(num_classes=None, seed=0):
    torch.manual_seed(seed)
    return UNet(1, ch=8, ch_mult=(1, 2), num_classes=num_classes)


def _params(m):
    return [p.detach().clone() for p in m.state_dict().values()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# --------------------------------------------------------------------------- the UNet
def test_default_unet_is_todays_module_and_loads_the_bundled_checkpoint():
    """num_classes=None is the unconditional module: same state_dict keys as the shipped file,
    and the shipped weights give the outputs the unconditional code gave before the option
    existed (pinned from that code on the dev machine, where the new code reproduced them bit
    for bit; rtol 1e-5 allows another BLAS)."""
    m = digits.load_digits_eps_model()
    assert m.num_classes is None and not hasattr(m, "label_emb")
    stored = torch.load(digits.ASSETS / digits.EPS_MODEL_FILE, weights_only=True)
    assert list(stored) == list(UNet(**digits.EPS_MODEL_CONFIG).state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    with torch.no_grad():
        out = m(x, t).double()
    ref = torch.tensor([-1.034201, -1.076521, -0.243741, -0.488749, 0.805906, 0.701841], dtype=torch.float64)
    assert torch.allclose(out.flatten()[:6], ref, rtol=1e-5, atol=1e-5)
    assert out.sum().item() == pytest.approx(235.8050729437964, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(997.1384660931071, rel=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        m(x, t, torch.zeros(16, dtype=torch.long))


def test_class_conditional_unet_depends_on_y_and_checks_it():
    m = _unet(num_classes=10)
    assert m.label_emb.weight.shape == (10, 32)   # nn.Embedding(K, 4·ch)
    assert "label_emb.weight" in m.state_dict()
    torch.nn.init.normal_(m.conv_out.weight, std=0.1)     # (zero-initialised: ε = 0 for every y)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        a = m(x, t, torch.tensor([0, 1, 2, 3]))
        b = m(x, t, torch.tensor([4, 5, 6, 7]))
        c = m(x, t, torch.tensor([0, 1, 2, 3]))
        d = m(x, t, torch.tensor(3))                       # a scalar label is broadcast
    assert not torch.allclose(a, b) and torch.equal(a, c) and d.shape == x.shape
    for y, match in ((None, "y is required"), (torch.tensor([0, 1, 2, 10]), r"labels must lie in \[0, 10\)"),
                     (torch.tensor([0, 1, -1, 3]), r"found labels in \[-1, 3\]"),
                     (torch.zeros(4), "integer"), (torch.zeros(3, dtype=torch.long), r"shape \(4,\)")):
        with pytest.raises(ValueError, match=match):
            m(x, t, y)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            UNet(num_classes=bad)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)


# --------------------------------------------------------------------------- training
def test_loss_falls_and_history(digits_data):
    """L_simple of an untrained (zero-output) model is E‖ε‖²/d = 1; after 4 short epochs the
    mean loss of the last epoch is below 0.6 of the first's (measured: 0.92 -> 0.33 for this
    seed, 32 updates; the margin allows other BLAS builds and thread counts)."""
    x, y = digits_data
    m = cdp_fast.train_diffusion(_unet(), (x, y), epochs=4, ema=0.9, seed=0, **dict(FAST, batch_size=32))
    h = m.history
    assert [e["epoch"] for e in h] == [1, 2, 3, 4] and [e["updates"] for e in h] == [8, 16, 24, 32]
    assert h[-1]["loss"] < 0.6 * h[0]["loss"], [e["loss"] for e in h]
    assert all(e["images_per_s"] > 0 and e["lr"] == 2e-3 for e in h)
    assert not m.training and m.alphas_cumprod.shape == (1000,)
    assert torch.equal(m.alphas_cumprod, cdp_fast.make_alphas_cumprod("linear", 1000))
    (tp,) = m.throughput
    assert tp["images"] == 4 * 256 and tp["images_per_s"] > 0
    assert cdp_fast.train_diffusion is cdp_fast.diffusion.train_diffusion   # front door = home


def test_the_ema_is_returned(digits_data):
    x, _ = digits_data
    seen = {}

    def grab(info):
        seen["model"] = _params(info["model"])
        seen["ema"] = _params(info["ema_model"])

    m = cdp_fast.train_diffusion(_unet(), x, epochs=2, ema=0.9, callback=grab, **FAST)
    assert _same(_params(m), seen["ema"]) and not _same(seen["ema"], seen["model"])
    raw = cdp_fast.train_diffusion(_unet(), x, epochs=2, ema=None, **FAST)
    assert _same(_params(raw), seen["model"])   # ema=None: the last weights, the same run


@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_resume_is_exact(digits_data, tmp_path, conditional):
    """2 epochs, then a second call with epochs=4 on the same checkpoint == 4 epochs straight,
    bit for bit (weights, EMA, history losses); the caller's RNG is untouched."""
    x, y = digits_data
    k = 10 if conditional else None
    kw = dict(FAST, ema=0.9, seed=3, warmup_steps=3)
    model, other_init = _unet(k), _unet(k, seed=5)
    straight = cdp_fast.train_diffusion(_unet(k), (x, y), epochs=4, **kw)
    ckpt = tmp_path / "eps.pt"
    first = cdp_fast.train_diffusion(model, (x, y), epochs=2, checkpoint=ckpt, **kw)
    assert len(first.history) == 2
    state = torch.random.get_rng_state()
    resumed = cdp_fast.train_diffusion(other_init, (x, y), epochs=4, checkpoint=ckpt, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same(_params(resumed), _params(straight))
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in straight.history]
    # Asking for fewer epochs than the checkpoint holds is refused; as many returns it as is.
    with pytest.raises(ValueError, match="epochs=3"):
        cdp_fast.train_diffusion(_unet(k), (x, y), epochs=3, checkpoint=ckpt, **kw)
    again = cdp_fast.train_diffusion(_unet(k), (x, y), epochs=4, checkpoint=ckpt, **kw)
    assert _same(_params(again), _params(straight))


def test_dropout_resume_is_exact(digits_data, tmp_path):
    x, _ = digits_data
    kw = dict(FAST, ema=None, seed=1)

    def net():
        torch.manual_seed(0)
        return UNet(1, ch=8, ch_mult=(1, 2), dropout=0.3)

    straight = cdp_fast.train_diffusion(net(), x, epochs=2, **kw)
    cdp_fast.train_diffusion(net(), x, epochs=1, checkpoint=tmp_path / "c.pt", **kw)
    torch.manual_seed(123)   # the global RNG does not matter: re-seeded from (seed, epoch, rank)
    resumed = cdp_fast.train_diffusion(net(), x, epochs=2, checkpoint=tmp_path / "c.pt", **kw)
    assert _same(_params(resumed), _params(straight))


def test_checkpoint_from_other_arguments_or_data_is_refused(digits_data, tmp_path):
    x, y = digits_data
    ckpt = tmp_path / "eps.pt"
    kw = dict(FAST, ema=0.9)
    cdp_fast.train_diffusion(_unet(), (x, y), epochs=1, checkpoint=ckpt, **kw)
    with pytest.raises(ValueError, match=r"different arguments \(lr: 0.002 -> 0.001\)"):
        cdp_fast.train_diffusion(_unet(), (x, y), epochs=2, checkpoint=ckpt, **dict(kw, lr=1e-3))
    with pytest.raises(ValueError, match="different arguments.*betas: 'linear' -> 'cosine'"):
        cdp_fast.train_diffusion(_unet(), (x, y), epochs=2, checkpoint=ckpt, betas="cosine", **kw)
    with pytest.raises(ValueError, match="different arguments.*seed"):
        cdp_fast.train_diffusion(_unet(), (x, y), epochs=2, checkpoint=ckpt, seed=1, **kw)
    other = x.flip(-1)   # the same size, other images
    with pytest.raises(ValueError, match="written for other data"):
        cdp_fast.train_diffusion(_unet(), (other, y), epochs=2, checkpoint=ckpt, **kw)
    with pytest.raises(ValueError, match="does not fit this model"):
        cdp_fast.train_diffusion(UNet(1, ch=16, ch_mult=(1, 2)), (x, y), epochs=2, checkpoint=ckpt, **kw)
    # resume=False starts over (and overwrites); a damaged file is refused by its hash
    cdp_fast.train_diffusion(_unet(), (x, y), epochs=1, checkpoint=ckpt, resume=False, **dict(kw, lr=1e-3))
    state = torch.load(ckpt, weights_only=True)
    state["model"]["conv_in.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="is corrupted"):
        cdp_fast.train_diffusion(_unet(), (x, y), epochs=2, checkpoint=ckpt, **dict(kw, lr=1e-3))


def test_checkpoints_of_other_trainers_and_garbage_are_refused(tmp_path, digits_data):
    x, _ = digits_data
    bad = tmp_path / "weights.pt"
    torch.save(_unet().state_dict(), bad)
    with pytest.raises(ValueError, match="not a checkpoint written by cdp_fast.train_diffusion"):
        cdp_fast.train_diffusion(_unet(), x, epochs=1, checkpoint=bad, **FAST)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read"):
        cdp_fast.train_diffusion(_unet(), x, epochs=1, checkpoint=bad, **FAST)


def test_uint8_nhwc_input_is_the_same_run_as_its_model_space_floats(digits_data):
    x, _ = digits_data
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()     # (N, 8, 8, 1)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    a = cdp_fast.train_diffusion(_unet(), u8, epochs=1, ema=None, **FAST)
    b = cdp_fast.train_diffusion(_unet(), as_float, epochs=1, ema=None, **FAST)
    assert _same(_params(a), _params(b))


class _Cropper(torch.nn.Module):
    """An ε-model of the wrong output shape."""

    def forward(self, x, t):
        return x[:, :, :4]


def _bad_cases():
    x, y = digits.load_digits_data("train")
    x, y = (2 * x[:128] - 1), y[:128]
    nan = x.clone()
    nan[5, 0, 3, 3] = float("nan")
    return [
        ("unit-range", lambda: ((x + 1) / 2, y), {}, r"look like \[0, 1\] images.*2 \* x - 1"),
        ("0..255 floats", lambda: ((x + 1) * 127.5, y), {}, r"must be in \[-1, 1\], got values in \[0, 255\]"),
        ("nan", lambda: (nan, y), {}, r"NaN or inf values \(the first in image 5\)"),
        ("count", lambda: (x, y[:100]), {}, "100 labels for 128 images"),
        ("range", lambda: (x, y + 1), {"k": 10}, r"data y: labels must lie in \[0, 10\).*\[1, 10\]"),
        ("missing", lambda: x, {"k": 10}, "needs labels.*num_classes=10"),
        ("fractional", lambda: (x, y.double() + 0.5), {}, "whole numbers"),
        ("int images", lambda: (x.long(), y), {}, "dtype torch.int64"),
        ("3-D floats", lambda: (x[:, 0], y), {}, "NCHW"),
        ("one-hot", lambda: (x, F.one_hot(y, 10)), {}, r"shape \(N,\)"),
        ("empty", lambda: x[:0], {}, "empty"),
        ("epochs", lambda: x, {"epochs": 0}, "epochs must be >= 1"),
        ("batch too big", lambda: x, {"batch_size": 129}, "batch_size=129 is larger than the 128"),
        ("ema", lambda: x, {"ema": 1.0}, "ema must be < 1"),
        ("lr", lambda: x, {"lr": 0.0}, "lr must be > 0"),
        ("betas", lambda: x, {"betas": "quadratic"}, "betas:"),
        ("betas count", lambda: x, {"betas": torch.full((10,), 0.01)}, "betas: .*10 entries"),
        ("crop", lambda: x, {"crop_scale": (0.9, 1.5)}, r"crop_scale\[1\] must be <= 1"),
        ("augment", lambda: x, {"augment": "yes"}, "augment must be True or False"),
        ("grad_clip", lambda: x, {"grad_clip": -1.0}, "grad_clip must be > 0"),
        ("model", lambda: x, {"model": lambda x, t: x}, "model must be a torch.nn.Module"),
        ("signature", lambda: x, {"model": torch.nn.Conv2d(1, 1, 1)}, r"called as model\(x, t\)"),
        ("shape", lambda: x, {"model": _Cropper()}, r"same shape, got \(2, 1, 4, 8\)"),
        ("missing path", lambda: "/nonexistent/gen", {}, "does not exist"),
    ]


@pytest.mark.parametrize("make, opts, match", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_refused_by_name(make, opts, match):
    opts = dict(opts)
    k = opts.pop("k", None)
    model = opts.pop("model", None) or _unet(k)
    kw = dict(FAST, epochs=1)
    kw.update(opts)
    with pytest.raises(ValueError, match=match):
        cdp_fast.train_diffusion(model, make(), **kw)


def test_a_samples_and_an_npz_train_like_their_arrays(tmp_path, digits_data):
    """A Samples of uint8 images with labels (what cdp_fast.sample writes) trains a conditional
    model like the (uint8, labels) pair it holds; a Samples without labels needs none when the
    model is unconditional."""
    x, y = digits_data
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    s = cdp_fast.Samples(images=u8, labels=y.numpy())
    path = tmp_path / "set.npz"
    s.save_npz(path)
    a = cdp_fast.train_diffusion(_unet(10), str(path), epochs=1, ema=None, **FAST)
    b = cdp_fast.train_diffusion(_unet(10), (u8, y), epochs=1, ema=None, **FAST)
    assert _same(_params(a), _params(b))
    cdp_fast.train_diffusion(_unet(), cdp_fast.Samples(images=u8, labels=None), epochs=1, **FAST)


# --------------------------------------------------------------------------- augmentation
@given(b=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(2, 12), w=st.integers(2, 12),
       seed=st.integers(0, 2 ** 31))
def test_random_resized_crop_shape_range_and_reference(b, c, h, w, seed):
    """Same shape and dtype; each output image within its input's [min, max] (a convex
    combination of its pixels); equal to a per-image ``F.interpolate`` of the crop (bilinear,
    align_corners=False) to 1e-6 (fp32 rounding of the weights: the interpolation weights are
    computed in float64 here, in fp32 by torch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g) * 2 - 1
    u = torch.rand(b, 4, generator=g, dtype=torch.float64)
    top, left, bh, bw = crop_boxes(u, (h, w))
    assert bool(((bh >= 1) & (bh <= h) & (bw >= 1) & (bw <= w)).all())
    assert bool(((top + bh <= h) & (left + bw <= w) & (top >= 0) & (left >= 0)).all())
    out = random_resized_crop(x, top, left, bh, bw)
    assert out.shape == x.shape and out.dtype == x.dtype
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    assert bool((out.amin(dim=(1, 2, 3)) >= lo - 1e-6).all() and (out.amax(dim=(1, 2, 3)) <= hi + 1e-6).all())
    ref = torch.cat([F.interpolate(x[i:i + 1, :, top[i]:top[i] + bh[i], left[i]:left[i] + bw[i]], size=(h, w),
                                   mode="bilinear", align_corners=False) for i in range(b)])
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@given(b=st.integers(1, 5), h=st.integers(1, 10), w=st.integers(1, 10), seed=st.integers(0, 2 ** 31))
def test_random_resized_crop_is_the_identity_at_full_scale(b, h, w, seed):
    """scale (1, 1) and ratio W/H (1, 1 for square images): the box is the whole image and the
    output is the input bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, h, w, generator=g)
    u = torch.rand(b, 4, generator=g, dtype=torch.float64)
    boxes = crop_boxes(u, (h, w), scale=(1.0, 1.0), ratio=(w / h, w / h))
    assert torch.equal(random_resized_crop(x, *boxes), x)
    if h == w:
        assert torch.equal(random_resized_crop(x, *crop_boxes(u, (h, w), (1.0, 1.0), (1.0, 1.0))), x)


def test_draws_are_per_sample():
    """An example's ε, t and crop are a function of (seed, epoch, index): the same in any batch,
    different across epochs and seeds; t covers {0..T-1} uniformly enough (chi-square-free
    check: each tenth of [0, T) gets 6–14 % of 4096 draws)."""
    eps, t, u = sample_draws(0, 2, list(range(64)), (1, 8, 8), 1000, "cpu")
    e2, t2, u2 = sample_draws(0, 2, [40, 3], (1, 8, 8), 1000, "cpu")
    assert torch.equal(e2, eps[[40, 3]]) and torch.equal(t2, t[[40, 3]]) and torch.equal(u2, u[[40, 3]])
    e3, _, _ = sample_draws(0, 3, [40, 3], (1, 8, 8), 1000, "cpu")
    e4, _, _ = sample_draws(1, 2, [40, 3], (1, 8, 8), 1000, "cpu")
    assert not torch.equal(e3, e2) and not torch.equal(e4, e2)
    _, t, u = sample_draws(7, 0, list(range(4096)), (1,), 1000, "cpu")
    share = np.bincount((t // 100).numpy(), minlength=10) / 4096
    assert t.min() >= 0 and t.max() <= 999 and share.min() > 0.06 and share.max() < 0.14
    assert bool(((u > 0) & (u < 1)).all())


# --------------------------------------------------------------------------- torchrun
DDP_WORKER = r'''
import sys, torch, cdp_fast, cdp_fast.utils.distributed
from cdp_fast.models import digits
from cdp_fast.models.unet import UNet
torch.set_num_threads(1)
out, ckpt, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
x, y = digits.load_digits_data("train")
rank, world = cdp_fast.utils.distributed.maybe_init(torch.device("cpu"))
torch.manual_seed(0)
m = UNet(1, ch=8, ch_mult=(1, 2), num_classes=10)
m = cdp_fast.train_diffusion(m, (2 * x[:256] - 1, y[:256]), epochs=epochs, batch_size=64, lr=2e-3,
                             ema=0.9, seed=2, checkpoint=ckpt, progress=False)
torch.save({"world": world, "ema": m.state_dict(), "loss": [h["loss"] for h in m.history],
            "images": [t["images"] for t in m.throughput]}, f"{out}.rank{rank}.pt")
'''


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    """DDP (gloo, 2 CPU processes) on the conditional UNet: the EMA is bitwise the same on both
    ranks; the loss trajectory and weights follow the 1-process run of the same global batches
    (each example's draws are its own; only the order of the gradient reductions differs:
    losses within rtol 1e-4; weights as bounded below); a 2-process checkpoint resumes in 1
    process."""
    import os, subprocess, sys   # noqa: E401
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    single = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT")}

    def run(nproc, name, ckpt, epochs):
        args = [str(script), str(tmp_path / name), str(tmp_path / ckpt), str(epochs)]
        cmd = ([sys.executable] + args if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args)
        res = subprocess.run(cmd, cwd=repo, env=env if nproc > 1 else single, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    def load(name, rank=0):
        return torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=True)

    run(2, "two", "two.pt", 2)
    run(1, "one", "one.pt", 3)
    run(1, "resumed", "two.pt", 3)        # the 2-process checkpoint, one more epoch in 1 process
    r0, r1, one, res = load("two", 0), load("two", 1), load("one"), load("resumed")
    assert r0["world"] == 2 and r1["world"] == 2 and one["world"] == 1
    assert all(torch.equal(v, r1["ema"][k]) for k, v in r0["ema"].items())
    assert r0["images"] == [2 * 4 * 32, 2 * 4 * 32] and one["images"] == [3 * 4 * 64]
    np.testing.assert_allclose(r0["loss"], one["loss"][:2], rtol=1e-4)
    np.testing.assert_allclose(res["loss"], one["loss"], rtol=1e-4)
    assert res["loss"][:2] == r0["loss"]                   # (history from the checkpoint)
    # Weights: Adam moves a weight by about lr per update whatever its gradient's size, so a
    # near-zero gradient component whose sign differs by reduction order moves it by up to
    # ~lr = 2e-3 the other way (measured: max 2.7e-4, mean 1e-6). Bounds: max < lr / 2, and a
    # mean difference under 1 % of the mean change of the third epoch (measured 2.4e-3).
    diff = torch.cat([(res["ema"][k] - v).abs().flatten() for k, v in one["ema"].items()])
    change = torch.cat([(r0["ema"][k] - v).abs().flatten() for k, v in one["ema"].items()])
    assert diff.max() < 1e-3 and diff.mean() < 0.01 * change.mean(), (diff.max(), diff.mean(), change.mean())
