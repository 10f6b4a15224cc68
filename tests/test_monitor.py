"""Training observability (cdp_fast.robust.monitor): the held-out split against a plain-Python
reference (disjoint, deterministic by seed, removed from training), its PGD evaluation every
``eval_every`` epochs, the per-epoch CSV (and TensorBoard, through a stand-in writer) after a
tiny run and after a resume (each epoch once), the refusals; and the checkpoint fingerprint of
a synthetic set given as a list of npz parts (every part covered)."""
import csv
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cdp_fast
from cdp_fast.data import write_npz
from cdp_fast.models import SmallCNN
from cdp_fast.robust import holdout_split
from cdp_fast.robust.monitor import LOG_COLUMNS, LOG_NAME

_M64 = (1 << 64) - 1
_FAST = dict(eps=0.1, step_size=0.05, steps=2, batch_size=10, lr=0.05, progress=False, augment=False)
_TIMES = ("time_s", "images_per_s", "holdout_time_s")


def _mix_ref(z):
    """splitmix64's finaliser on Python ints mod 2**64 (the reference for the numpy version)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _split_ref(n, holdout, seed):
    k = round(holdout * n) if isinstance(holdout, float) else holdout
    base = _mix_ref((seed & _M64) ^ 0x686F6C646F7574)
    keys = [_mix_ref((base + i) & _M64) for i in range(n)]
    held = sorted(sorted(range(n), key=lambda i: keys[i])[:k])
    return held, [i for i in range(n) if i not in set(held)]


@given(n=st.integers(2, 300), frac=st.floats(0.01, 0.99), count=st.integers(1, 299), use_frac=st.booleans(),
       seed=st.integers(0, 2**40))
def test_holdout_split_matches_the_reference(n, frac, count, use_frac, seed):
    holdout = frac if use_frac else min(count, n - 1)
    k = round(holdout * n) if use_frac else holdout
    if not 1 <= k < n:
        with pytest.raises(ValueError, match="holdout"):
            holdout_split(n, holdout, seed)
        return
    held, kept = holdout_split(n, holdout, seed)
    ref_held, ref_kept = _split_ref(n, holdout, seed)
    assert held.tolist() == ref_held and kept.tolist() == ref_kept
    assert held.dtype == kept.dtype == np.int64 and len(held) == k
    assert not set(held.tolist()) & set(kept.tolist()) and len(held) + len(kept) == n
    again, _ = holdout_split(n, k, seed)          # a count and its fraction: the same split
    assert again.tolist() == ref_held


def test_holdout_split_depends_on_the_seed():
    a, _ = holdout_split(1000, 100, 0)
    b, _ = holdout_split(1000, 100, 1)
    assert len(set(a.tolist()) & set(b.tolist())) < 40      # ~10 expected by chance


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 255.0
    return x, torch.randint(0, 10, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return SmallCNN(width=4, feature_dim=16)


class _Recording(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.seen = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.x[i], int(self.y[i])


def test_holdout_is_never_trained_on():
    """The held-out items are read once (for the evaluation) and never by the training loop,
    which sees every other item each epoch; the epoch shrinks to the remaining 30 items."""
    x, y = _data()
    ds = _Recording(x, y)
    m = cdp_fast.train_trades(_model(), ds, holdout=10, epochs=2, seed=3, **_FAST)
    held, kept = holdout_split(40, 10, 3)
    assert ds.seen[0] == 0                          # as_source reads item 0 for the shape
    assert ds.seen[1:11] == held.tolist()
    assert set(ds.seen[11:]) == set(kept.tolist()) and len(ds.seen[11:]) == 2 * 30
    assert [e["updates"] for e in m.history] == [3, 6]


def _rows(log_dir):
    with open(log_dir / LOG_NAME, newline="") as f:
        return list(csv.reader(f))


def test_csv_rows_columns_and_eval_every(tmp_path):
    """metrics.csv: the columns, one row per epoch with the history's values; the holdout is
    evaluated at epochs 2 (eval_every) and 3 (the last) only, and the last numbers are
    cdp_fast.evaluate's on the returned (EMA) model; TensorBoard absent -> the CSV alone."""
    x, y = _data()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch.utils.tensorboard", None)     # not installed
        m = cdp_fast.train_trades(_model(), (x, y), holdout=0.25, eval_every=2, epochs=3, log_dir=tmp_path / "log",
                                  **_FAST)
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == [LOG_NAME]
    rows = _rows(tmp_path / "log")
    assert rows[0] == list(LOG_COLUMNS) and len(rows) == 4
    for row, entry in zip(rows[1:], m.history):
        for col, cell in zip(rows[0], row):
            assert cell == ("" if col not in entry else repr(entry[col]) if isinstance(entry[col], float)
                            else str(entry[col])), col
    assert [("holdout_pgd_acc" in e) for e in m.history] == [False, True, True]
    held, _ = holdout_split(40, 10, 0)
    ref = cdp_fast.evaluate(m, x[held], y[held], eps=0.1, attacks=("clean", "pgd"), seed=0, batch_size=10)
    assert (m.history[-1]["holdout_clean_acc"], m.history[-1]["holdout_pgd_acc"]) == (ref["clean"], ref["pgd"])


@pytest.mark.parametrize("ema", [0.9, None])
def test_evaluation_does_not_change_the_training(ema):
    x, y = _data()
    a = cdp_fast.train_trades(_model(), (x, y), holdout=8, eval_every=1, epochs=3, ema=ema, **_FAST)
    b = cdp_fast.train_trades(_model(), (x, y), holdout=8, eval_every=3, epochs=3, ema=ema, **_FAST)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [("holdout_pgd_acc" in e) for e in a.history] == [True, True, True]


class _Stop(Exception):
    pass


def _fake_tensorboard(record):
    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            record.append(("open", purge_step))

        def add_scalar(self, tag, value, step):
            record.append((tag, step))

        def flush(self):
            pass

        def close(self):
            record.append(("close", None))
    return types.SimpleNamespace(SummaryWriter=SummaryWriter)


def test_resume_logs_each_epoch_once(tmp_path, monkeypatch):
    """A run stopped after epoch 2 and resumed from its checkpoint ends with the log of an
    uninterrupted run (times aside), each epoch once; TensorBoard gets each epoch once, the
    resumed writer purging from epoch 3; another holdout is refused on resume."""
    x, y = _data()
    kw = dict(holdout=8, eval_every=2, epochs=4, **_FAST)
    cdp_fast.train_trades(_model(), (x, y), log_dir=tmp_path / "full", **kw)
    tb = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _fake_tensorboard(tb))

    def stop(info):
        if info["epoch"] == 2:
            raise _Stop

    ck = tmp_path / "ck.pt"
    with pytest.raises(_Stop):
        cdp_fast.train_trades(_model(), (x, y), log_dir=tmp_path / "log", checkpoint=ck, callback=stop, **kw)
    assert len(_rows(tmp_path / "log")) == 3
    cdp_fast.train_trades(_model(), (x, y), log_dir=tmp_path / "log", checkpoint=ck, **kw)
    full, resumed = _rows(tmp_path / "full"), _rows(tmp_path / "log")
    keep = [i for i, c in enumerate(full[0]) if c not in _TIMES]
    assert [[r[i] for i in keep] for r in resumed] == [[r[i] for i in keep] for r in full]
    assert [r[0] for r in resumed[1:]] == ["1", "2", "3", "4"]
    opens = [s for t, s in tb if t == "open"]
    steps = [s for t, s in tb if t == "train/loss"]
    assert opens == [1, 3] and steps == [1, 2, 3, 4]
    assert [s for t, s in tb if t == "holdout/pgd_acc"] == [2, 4]
    with pytest.raises(ValueError, match="holdout: 8 -> 6"):
        cdp_fast.train_trades(_model(), (x, y), checkpoint=ck, **{**kw, "holdout": 6})


@pytest.mark.parametrize("kw, needle", [
    (dict(holdout=0), "holdout"), (dict(holdout=1.0), "holdout"), (dict(holdout=-0.5), "holdout"),
    (dict(holdout=True), "holdout"), (dict(holdout="0.1"), "holdout"),
    (dict(holdout=40), "leaves nothing to train on"), (dict(holdout=0.001), "holds no item"),
    (dict(eval_every=2), "eval_every needs holdout"), (dict(holdout=4, eval_every=0), "eval_every"),
    (dict(holdout=4, eval_every=1.5), "eval_every"),
    (dict(log_dir="/no/such/folder/log"), "does not exist"), (dict(log_dir=""), "log_dir"),
])
def test_refusals(kw, needle):
    x, y = _data()
    with pytest.raises(ValueError, match=needle):
        cdp_fast.train_trades(_model(), (x, y), epochs=1, **kw, **_FAST)


def test_log_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cdp_fast.train_trades(_model(), _data(), epochs=1, log_dir=tmp_path / "f", **_FAST)


@pytest.mark.parametrize("n_parts", [2, 3])
def test_checkpoint_fingerprint_covers_every_part_of_a_list(tmp_path, n_parts):
    """synthetic= a list of npz parts: the checkpoint's fingerprint covers each part's contents,
    so resuming after the last part changed (same size, other pixels) is refused by name.
    (Before: two parts were taken for an (x, y) pair of path strings, a TypeError; three were
    not fingerprinted, and the resume went on with other data.)"""
    rng = np.random.default_rng(0)
    parts = []
    for i in range(n_parts):
        p = tmp_path / f"part{i}.npz"
        write_npz(p, {"image": rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                      "label": rng.integers(0, 10, 10)})
        parts.append(str(p))
    ck = tmp_path / "ck.pt"
    kw = dict(synthetic=parts, epochs=1, checkpoint=ck, **_FAST)
    cdp_fast.train_trades(_model(), _data(), **kw)
    cdp_fast.train_trades(_model(), _data(), **kw)             # unchanged parts: resumes
    write_npz(parts[-1], {"image": rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                         "label": rng.integers(0, 10, 10)})
    with pytest.raises(ValueError, match="synthetic"):
        cdp_fast.train_trades(_model(), _data(), **kw)



def test_holdout_is_attacked_in_the_runs_norm():
    """norm="l2": the holdout's PGD is L2 at the run's eps, cdp_fast.evaluate's number (which
    differs from L∞ at that eps here: 8x8 digits, a briefly trained small CNN)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.tensor(d.images[:400], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:400], dtype=torch.int64)
    m = cdp_fast.train_trades(_model(), (x, y), holdout=100, epochs=3, norm="l2",
                              **{**_FAST, "eps": 0.3, "step_size": 0.15, "batch_size": 50, "lr": 0.1})
    held, _ = holdout_split(400, 100, 0)
    ref = {nm: cdp_fast.evaluate(m, x[held], y[held], eps=0.3, attacks=("pgd",), seed=0, batch_size=50,
                                 norm=nm)["pgd"] for nm in ("l2", "linf")}
    assert m.history[-1]["holdout_pgd_acc"] == ref["l2"] != ref["linf"]


def test_cli_holdout_takes_a_whole_number_written_as_a_float(tmp_path, monkeypatch, capsys):
    """`--holdout 1e3` was parsed as the float 1000.0 and refused as "neither a fraction nor a
    count"; a whole number >= 1 in any notation is now a count (an int, as the library takes
    it), as is a --config file's 1000.0; a fraction stays a float; 1.5 and 0 are refused."""
    import json

    from cdp_fast import cli

    calls = []
    monkeypatch.setattr(cdp_fast, "train_trades", lambda model, data, **kw: calls.append(kw) or model)
    out = str(tmp_path / "w.pt")
    for text, want in (("1e3", 1000), ("1000.0", 1000), ("1E1", 10), ("7", 7), ("0.25", 0.25), ("2.5e-1", 0.25)):
        assert cli.main(["train", "--holdout", text, "--out", out, "--epochs", "1"]) == 0, text
        assert calls[-1]["holdout"] == want and type(calls[-1]["holdout"]) is type(want), (text, calls[-1]["holdout"])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"holdout": 1e3, "out": out}))
    assert cli.main(["train", "--config", str(cfg)]) == 0 and calls[-1]["holdout"] == 1000
    capsys.readouterr()
    for bad in ("1.5", "0", "1e400", "nan", "-3"):
        assert cli.main(["train", "--holdout", bad, "--out", out]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "a count (a whole number >= 1)" in err, err
