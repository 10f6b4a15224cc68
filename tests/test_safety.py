"""Nothing silently wrong in an out directory (issue "Nothing silently wrong", sampling side):
the directory lock (a subprocess race), behaviour fingerprints of callables, verified loads,
trusted shard names only, validated labeler output, a failed first call that does not pin its
arguments, numpy scalars, stray temp files, bad output options — one test per item."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast.data import Samples

REPO = Path(__file__).resolve().parents[1]


class Eps(torch.nn.Module):
    def __init__(self, scale=0.2):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(scale / 9)
            self.conv.bias.zero_()

    def forward(self, x, t):
        return self.conv(x) + 1e-4 * t.float().view(-1, 1, 1, 1)


KW = dict(image_shape=(1, 5, 5), steps=4, skip="uniform", output="float", progress=False, loss=None,
          batch_size=2, shard_size=2)


def test_second_run_into_a_locked_dir_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    """A run holds out/.lock for its whole life: a second run (other seed) started meanwhile is
    refused naming the holder's pid; after the holder is SIGKILLed (the kernel drops its
    lock), a new run resumes and the output equals an uninterrupted run."""
    out = tmp_path / "gen"
    holder = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import cdp_fast
        from test_safety import Eps, KW

        class Slow(Eps):
            def forward(self, x, t):
                time.sleep(0.5)
                return super().forward(x, t)

        cdp_fast.sample(Slow(), 40, out={str(out)!r}, seed=1, **KW)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() or not (out / ".lock").read_text().strip():
            assert proc.poll() is None, "the holder exited early"
            assert time.time() < deadline, "the holder never took the lock"
            time.sleep(0.1)
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {proc.pid} "):
            cdp_fast.sample(Eps(), 40, out=str(out), seed=2, **KW)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = cdp_fast.sample(Eps(), 40, out=str(out), seed=1, **KW)
    ref = cdp_fast.sample(Eps(), 40, seed=1, **{k: v for k, v in KW.items() if k != "shard_size"})
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(ref.images))


def _features_of(k):
    return lambda x: x.flatten(1) * k          # same __qualname__ for every k


def test_callables_are_fingerprinted_by_behaviour(tmp_path):
    """A different network behind the same function name is refused on resume (it was
    accepted: the manifest stored the name); the same one resumes."""
    out = str(tmp_path / "o")
    kw = dict(KW, loss="hnm", lam=1.0, tau=0.5, guide_window=None, embedding=None)
    cdp_fast.sample(Eps(), 4, out=out, features=_features_of(1.0), **kw)
    cdp_fast.sample(Eps(), 4, out=out, features=_features_of(1.0), **kw)
    with pytest.raises(ValueError, match="features"):
        cdp_fast.sample(Eps(), 4, out=out, features=_features_of(2.0), **kw)
    eps_a = lambda x, t: 0.1 * x  # noqa: E731
    eps_b = lambda x, t: 0.2 * x  # noqa: E731
    eps_b.__qualname__ = eps_a.__qualname__
    cdp_fast.sample(eps_a, 4, out=str(tmp_path / "m"), **KW)
    with pytest.raises(ValueError, match="model"):
        cdp_fast.sample(eps_b, 4, out=str(tmp_path / "m"), **KW)


def _flip_byte(path: Path, where: float = 0.9):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_loading_verifies_each_shard(tmp_path):
    """Samples.load(dir) checks every shard against the manifest's sha256 when first read: a
    same-size byte flip or a truncation is a ValueError naming the shard (verify=False trusts)."""
    out = tmp_path / "o"
    cdp_fast.sample(Eps(), 6, out=str(out), **KW)
    Samples.load(out)
    _flip_byte(out / "shard-000001.npz")
    with pytest.raises(ValueError, match="shard-000001.npz.*corrupted"):
        Samples.load(out).images[:]
    Samples.load(out, verify=False)
    shard = out / "shard-000002.npz"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match="shard-000002.npz"):
        np.asarray(Samples.load(out, verify=False).images[4:6])


def test_manifest_shard_names_are_not_trusted(tmp_path):
    """A manifest naming a file outside the plan (../other/..., /etc/x) is refused by
    Samples.load; a resume ignores the entry and returns exactly n samples."""
    out = tmp_path / "o"
    cdp_fast.sample(Eps(), 4, out=str(out), **KW)
    man = json.loads((out / "manifest.json").read_text())
    info = dict(man["shards"]["shard-000000.npz"])
    man["shards"]["../other/shard-000000.npz"] = dict(info, start=4)
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="never makes"):
        Samples.load(out)
    with pytest.warns(UserWarning, match="does not make"):
        s = cdp_fast.sample(Eps(), 4, out=str(out), **KW)
    assert len(s) == 4


def test_manifest_records_without_start_or_count_are_a_clear_error(tmp_path):
    """A shard record missing its start (or with a non-int count) is a ValueError naming the
    shard, not a KeyError from inside the loader."""
    out = tmp_path / "o"
    cdp_fast.sample(Eps(), 4, out=str(out), **KW)
    good = (out / "manifest.json").read_text()
    for damage in (lambda r: r.pop("start"), lambda r: r.update(count="2")):
        man = json.loads(good)
        damage(man["shards"]["shard-000000.npz"])
        (out / "manifest.json").write_text(json.dumps(man))
        with pytest.raises(ValueError, match="shard-000000.npz.*start/count"):
            Samples.load(out)


@pytest.mark.parametrize("bad", ["nan", "batch"])
def test_labeler_output_is_validated_before_anything_is_written(tmp_path, bad):
    def labeler(x):
        if bad == "nan":
            return torch.full((len(x), 3), float("nan"))
        return torch.zeros(max(1, len(x) - 1), 3)

    out = tmp_path / "o"
    with pytest.raises(ValueError, match="labeler.*probe|labeler"):
        cdp_fast.sample(Eps(), 4, out=str(out), labeler=labeler, **KW)
    assert not out.exists()                      # the probe stops it before the directory is made


def test_a_failed_first_call_does_not_pin_its_arguments(tmp_path):
    """A first call that dies before finishing a shard leaves a manifest; the corrected call
    (other arguments) starts afresh instead of being refused."""
    out = str(tmp_path / "o")

    def dies(x, t):
        if int(t[0]) < 300:
            raise RuntimeError("out of memory (simulated)")
        return 0.1 * x

    with pytest.raises(RuntimeError):
        cdp_fast.sample(dies, 4, out=out, **KW)
    assert (Path(out) / "manifest.json").exists()
    with pytest.warns(UserWarning, match="starting afresh"):
        s = cdp_fast.sample(Eps(), 4, out=out, seed=3, **KW)
    assert len(s) == 4 and s.meta["args"]["seed"] == 3


def test_numpy_scalars_are_their_numbers(tmp_path):
    out = str(tmp_path / "o")
    kw = dict(KW, batch_size=np.int64(2), shard_size=np.int64(2))
    a = cdp_fast.sample(Eps(), np.int64(4), out=out, seed=np.int64(5), **kw)
    b = cdp_fast.sample(Eps(), 4, out=out, seed=5, **KW)          # the same run: resumes
    assert a.meta["args"]["batch_size"] == 2 and isinstance(a.meta["args"]["batch_size"], int)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_stray_temp_files_and_bad_out_paths(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".manifest.json.abc123.tmp").write_text("{")          # a kill during the first write
    (out / ".shard-000000.npz.x.tmp").write_bytes(b"PK")
    cdp_fast.sample(Eps(), 2, out=str(out), **KW)
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(ValueError, match="out: an empty path"):
        cdp_fast.sample(Eps(), 2, out="", **KW)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cdp_fast.sample(Eps(), 2, out=str(f), **KW)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            cdp_fast.sample(Eps(), 2, out=str(ro), **KW)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("argv,needle", [
    (["--grid", "g.png", "--output", "float"], "grid: needs --output uint8"),
    (["--npz", "/nonexistent/dir/x.npz"], "npz: cannot write"),
    (["--out", ""], "out: an empty path"),
    (["--image-shape", "1,7,7", "--loss", "none"], "image_shape"),
])
def test_sample_cli_checks_outputs_first(argv, needle, capsys, tmp_path, monkeypatch):
    """Bad output options fail in a line before sampling (nothing is generated), exit 2."""
    from cdp_fast import cli

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(cdp_fast.sampling.driver, "batches", lambda *a, **k: calls.append(1) or iter(()))
    assert cli.main(["sample", "-n", "2", "--steps", "2", "--no-progress"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not calls


def test_disk_full_is_one_line_and_leaves_the_dir_consistent(tmp_path, monkeypatch, capsys):
    """A write failing with ENOSPC mid-run: one line, exit 2; the manifest still lists only
    intact shards, and the same call later resumes to the uninterrupted result."""
    import errno

    from cdp_fast import cli
    from cdp_fast.sampling import stream

    out = tmp_path / "o"
    calls = {"n": 0}
    real = stream.atomic_write_bytes

    def flaky(path, data):
        if str(path).endswith(".npz"):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(stream, "atomic_write_bytes", flaky)
    argv = ["sample", "--model", "digits", "-n", "8", "--batch-size", "2", "--steps", "2", "--loss", "none",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["shards"] == {} and not list(out.glob("*.npz")) and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(stream, "atomic_write_bytes", real)
    assert cli.main(argv) == 0
    assert len(Samples.load(out)) == 8


class BNEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(1)
        self.conv = Eps()

    def forward(self, x, t):
        return self.conv(self.bn(x), t)


def test_probe_and_sampling_leave_a_train_mode_batchnorm_model_alone(tmp_path):
    """A BatchNorm model in train mode: no running statistic moves (probe and sampling run in
    eval mode), its flags come back, and the same call resumes (its fingerprint is stable)."""
    m = BNEps().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = str(tmp_path / "o")
    cdp_fast.sample(m, 4, out=out, **KW)
    cdp_fast.sample(m, 4, out=out, **KW)
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_lock_is_released_whatever_fails(tmp_path, monkeypatch):
    """An OSError between taking the lock and the first manifest write releases the lock: the
    next call in the same process runs (it was refused as 'in use by' its own pid)."""
    import errno

    from cdp_fast.sampling import stream

    real = stream.atomic_write_json
    fail = {"on": True}

    def flaky(path, obj):
        if fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(stream, "atomic_write_json", flaky)
    out = str(tmp_path / "o")
    with pytest.raises(OSError):
        cdp_fast.sample(Eps(), 2, out=out, **KW)
    fail["on"] = False
    assert len(cdp_fast.sample(Eps(), 2, out=out, **KW)) == 2


def test_behaviour_fingerprints_tolerate_float_noise_and_old_names(tmp_path):
    """The same callable with 1e-7 relative noise in its outputs resumes (another device or
    thread count); a manifest that recorded the model by name is accepted with a warning."""
    noise = {"scale": 0.0}

    def eps(x, t):
        return 0.1 * x * (1 + noise["scale"] * torch.sin(1e3 * x))

    out = tmp_path / "o"
    cdp_fast.sample(eps, 4, out=str(out), **KW)
    noise["scale"] = 1e-7
    cdp_fast.sample(eps, 4, out=str(out), **KW)
    man = json.loads((out / "manifest.json").read_text())
    man["args"]["model"] = "test_safety.eps"
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.warns(UserWarning, match="by name"):
        cdp_fast.sample(eps, 4, out=str(out), **KW)


@pytest.mark.parametrize("over,name", [(dict(T=1000.9), "T"), (dict(seed=1.5), "seed"), (dict(seed=None), "seed")])
def test_numbers_are_checked_not_coerced(over, name):
    with pytest.raises(ValueError, match=name):
        cdp_fast.sample(Eps(), 2, **dict(KW, **over))
