"""Streaming to disk: shards + manifest, SIGKILL-and-resume byte identity, corruption
detection, changed-argument refusal, Samples loading/saving, the CIFAR-10 loader."""
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.data import Samples, load_cifar10, write_npz

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys, time, torch, cdp_fast
class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 3, 1, 1, generator=g) * 0.3)
    def forward(self, x, t):
        time.sleep(float(sys.argv[2]))
        return torch.nn.functional.conv2d(x, self.w) + 0.1 * x
labeler = lambda x: torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)
cdp_fast.sample(Slow(), 40, loss="hnm", features="pixels", lam=5.0, tau=0.5, labeler=labeler,
                image_shape=(3, 4, 4), batch_size=4, shard_size=8, steps=6, eta=0.5, out=sys.argv[1], progress=False)
'''


def _run(out, delay="0"):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), delay], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*.npz"))}


@pytest.mark.slow
def test_sigkill_and_resume_is_byte_identical(tmp_path):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    assert _run(ref_dir).wait(timeout=300) == 0
    proc = _run(killed_dir, delay="0.05")
    manifest = killed_dir / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if manifest.exists():
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 2:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest.read_text())
    assert 2 <= len(partial["shards"]) < 5 and not partial["complete"]
    assert _run(killed_dir).wait(timeout=300) == 0
    ref, res = _shard_bytes(ref_dir), _shard_bytes(killed_dir)
    assert list(ref) == [f"shard-{k:06d}.npz" for k in range(5)]
    assert ref == res
    assert not list(killed_dir.glob(".*.tmp"))
    s = Samples.load(killed_dir)
    assert len(s) == 40 and s.images.shape == (40, 4, 4, 3) and s.labels.shape == (40,)


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, t):
        return self.a * x


KW = dict(loss="infonce", lam=2.0, tau=0.5, features="pixels", image_shape=(3, 2, 3), batch_size=3,
          shard_size=6, steps=4, progress=False)


def test_in_memory_and_streamed_runs_agree(tmp_path):
    mem = cdp_fast.sample(Lin(), 14, **KW)
    disk = cdp_fast.sample(Lin(), 14, out=tmp_path / "o", **KW)
    np.testing.assert_array_equal(np.asarray(disk.images[:]), mem.images)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["complete"] and m["n"] == 14 and m["num_shards"] == 3
    assert [v["count"] for _, v in sorted(m["shards"].items())] == [6, 6, 2]
    assert m["args"]["seed"] == 0 and m["args"]["loss"] == "infonce" and len(m["shards"]["shard-000000.npz"]["sha256"]) == 64


def test_corrupted_and_truncated_shards_are_regenerated(tmp_path):
    out = tmp_path / "o"
    cdp_fast.sample(Lin(), 14, out=out, **KW)
    good = _shard_bytes(out)
    p0, p1 = out / "shard-000000.npz", out / "shard-000001.npz"
    data = bytearray(p0.read_bytes())
    data[-40] ^= 0xFF  # flip a bit inside the image data
    p0.write_bytes(bytes(data))
    p1.write_bytes(p1.read_bytes()[:100])  # truncated
    (out / "shard-000002.npz").unlink()   # missing
    with pytest.warns(UserWarning, match="corrupted|missing"):
        cdp_fast.sample(Lin(), 14, out=out, **KW)
    assert _shard_bytes(out) == good


def test_changed_arguments_refuse_to_resume(tmp_path):
    out = tmp_path / "o"
    cdp_fast.sample(Lin(), 14, out=out, **KW)
    with pytest.raises(ValueError, match=r"tau: 0\.5 -> 0\.7"):
        cdp_fast.sample(Lin(), 14, out=out, **{**KW, "tau": 0.7})
    with pytest.raises(ValueError, match="n: 14 -> 15"):
        cdp_fast.sample(Lin(), 15, out=out, **KW)
    other = Lin()
    with torch.no_grad():
        other.a.fill_(0.3)
    with pytest.raises(ValueError, match="model"):
        cdp_fast.sample(other, 14, out=out, **KW)


def test_shards_are_plain_npz_without_pickle(tmp_path):
    out = tmp_path / "o"
    cdp_fast.sample(Lin(), 6, out=out, **KW)
    with np.load(out / "shard-000000.npz", allow_pickle=False) as z:
        assert set(z.files) == {"image", "index"}
        assert z["image"].dtype == np.uint8 and z["image"].shape == (6, 2, 3, 3)
        np.testing.assert_array_equal(z["index"], np.arange(6))
    with zipfile.ZipFile(out / "shard-000000.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0)
                   for i in zf.infolist())


def test_save_npz_and_load_roundtrip(tmp_path):
    out = tmp_path / "o"
    lab = lambda x: torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1)  # noqa: E731
    s = cdp_fast.sample(Lin(), 14, out=out, labeler=lab, **KW)
    s.save_npz(tmp_path / "all.npz")
    with np.load(tmp_path / "all.npz", allow_pickle=False) as z:
        assert z["image"].dtype == np.uint8 and z["image"].shape == (14, 2, 3, 3)
        assert z["label"].dtype == np.int64
        np.testing.assert_array_equal(z["image"], np.asarray(s.images[:]))
    back = Samples.load(tmp_path / "all.npz")
    assert isinstance(back.images, np.memmap)  # lazily mapped, not read
    np.testing.assert_array_equal(back.labels, s.labels)
    x = back.to_tensor()
    assert x.shape == (14, 3, 2, 3) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_load_arr0_arr1_npz_and_lazy_indexing(tmp_path):
    imgs = np.random.randint(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labs = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", imgs, labs)  # numpy's own writer: keys arr_0 / arr_1
    s = Samples.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(np.asarray(s.images), imgs)
    np.testing.assert_array_equal(s.labels, labs)
    np.savez_compressed(tmp_path / "c.npz", image=imgs, label=labs)  # compressed: read whole
    np.testing.assert_array_equal(np.asarray(Samples.load(tmp_path / "c.npz").images), imgs)
    out = tmp_path / "o"
    d = cdp_fast.sample(Lin(), 14, out=out, **KW)
    full = np.asarray(d.images[:])
    for idx in [3, -1, slice(4, 13), slice(None, None, 3), [13, 0, 7, 7], np.array([True, False] * 7)]:
        np.testing.assert_array_equal(d.images[idx], full[idx])
    assert d.subset([1, 5]).images.shape == (2, 2, 3, 3)


def test_load_rejects_bad_paths_and_pickles(tmp_path):
    with pytest.raises(ValueError, match="path"):
        Samples.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest"):
        Samples.load(tmp_path / "empty")
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        Samples.load(tmp_path / "obj.npz").images


def test_deterministic_npz_writer(tmp_path):
    arrays = {"image": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "label": np.array([1, 2])}
    write_npz(tmp_path / "a.npz", arrays)
    time.sleep(1.1)
    write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_cifar10_loader_on_tiny_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    want = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 3, dtype=np.uint8)
        pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], 1).tofile(root / f"{name}.bin")
        want[name] = (labels, pixels)
    x, y = load_cifar10(tmp_path, train=True)
    assert x.shape == (15, 3, 32, 32) and y.dtype == torch.int64
    np.testing.assert_array_equal(y[:3].numpy(), want["data_batch_1"][0])
    np.testing.assert_allclose(x[0].numpy().ravel(), want["data_batch_1"][1][0] / 255.0, rtol=1e-6)
    xt, yt = load_cifar10(root, train=False)
    assert xt.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="root"):
        load_cifar10(tmp_path / "missing")


def test_cifar10_python_batches_with_restricted_unpickler(tmp_path):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, f)
    x, y = load_cifar10(tmp_path)
    assert x.shape == (10, 3, 32, 32) and y.tolist()[:2] == [1, 2]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    # (a ValueError naming the file since issue 14; the CLI prints it as one line)
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("content, needle", [
    ("evil", f"refusing to load {os.system.__module__}.system from a CIFAR batch"),
    ("truncated", "pickle data was truncated"),
    ("garbage", "not a CIFAR-10 python batch"),
    ("list", "holds a list, not a dict"),
    ("shape", "expected (N, 3072) and (N,)"),
])
def test_bad_cifar10_python_batches_are_value_errors_naming_the_file(tmp_path, content, needle):
    """Issue 14: the restricted unpickler's refusal (and any other unreadable batch) used to
    escape as a pickle.UnpicklingError / EOFError / AttributeError traceback."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    raw = {"evil": lambda: pickle.dumps({b"data": Evil(), b"labels": [0]}),
           "truncated": lambda: good[:len(good) // 2], "garbage": lambda: b"hello world",
           "list": lambda: pickle.dumps([1, 2]),
           "shape": lambda: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]})}
    (root / "test_batch").write_bytes(raw[content]())
    with pytest.raises(ValueError) as e:
        load_cifar10(tmp_path, train=False)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(root / "test_batch") in msg and needle in msg, msg


def test_uint8_nchw_is_refused_naming_the_layout():
    """Issue 14: uint8 (N, 3, 32, 32) used to be read as NHWC (32 "channels" of 3 x 32 pixels)
    and trained on silently; a last dim that is no channel count (not 1 or 3) while dim 1 is
    one is refused, by the one conversion and so by every caller, naming the input."""
    from cdp_fast.data import as_source, images_to_float01

    nchw = np.zeros((4, 3, 32, 32), np.uint8)
    with pytest.raises(ValueError, match=r"x as uint8 must be NHWC .* got \(N, 3, 32, 32\): the NCHW"):
        images_to_float01(nchw, "x")
    with pytest.raises(ValueError, match="synthetic as uint8 must be NHWC"):
        as_source((nchw, np.zeros(4, np.int64)), "synthetic")
    with pytest.raises(ValueError, match="train_data as uint8 must be NHWC"):
        as_source(Samples(nchw[:, :1], np.zeros(4, np.int64)), "train_data")
    for ok in ((4, 32, 32, 3), (4, 8, 8, 1), (4, 3, 8, 1), (4, 8, 8), (4, 5, 6, 7)):
        assert images_to_float01(np.zeros(ok, np.uint8)).shape[0] == 4


def test_images_to_float01_is_the_one_conversion(tmp_path):
    """uint8 NHWC and grey NHW -> float32 NCHW / 255 (contiguous); float NCHW passes through
    untouched; model space [-1, 1] -> [0, 1]; read-only memory maps are read, never written;
    train / label / evaluate / Samples.to_tensor all go through it."""
    from cdp_fast.data import as_source, images_to_float01

    u8 = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 2), dtype=np.uint8)   # NHWC
    ref = torch.from_numpy(u8.astype(np.float32) / 255).permute(0, 3, 1, 2)
    for form in (u8, torch.from_numpy(u8)):
        t = images_to_float01(form)
        assert t.dtype == torch.float32 and t.is_contiguous() and torch.equal(t, ref)
    assert torch.equal(images_to_float01(u8[..., 0]), ref[:, :1])                    # grey
    f = torch.rand(5, 2, 4, 3, dtype=torch.float64)
    assert images_to_float01(f) is f
    pm1 = np.linspace(-1.2, 1.2, 24, dtype=np.float32).reshape(2, 3, 4)
    got = images_to_float01(pm1, model_space=True)
    assert torch.equal(got, ((torch.from_numpy(pm1) + 1) * 0.5).clamp(0, 1))
    np.save(tmp_path / "u8.npy", u8)
    mm = np.load(tmp_path / "u8.npy", mmap_mode="r")
    assert torch.equal(images_to_float01(mm), ref)
    with pytest.raises(ValueError, match="pix images must be uint8"):
        images_to_float01(np.zeros((2, 3, 4, 4), np.int32), "pix")
    with pytest.raises(ValueError, match="pix as uint8 must be NHWC"):
        images_to_float01(np.zeros((2, 3), np.uint8), "pix")
    # The callers agree with it.
    assert torch.equal(Samples(u8).to_tensor(), ref)
    src = as_source((u8, np.arange(5)))
    assert src.image_shape == (2, 4, 3) and torch.equal(src.get(np.array([4, 1]))[0], ref[[4, 1]])
