"""`cdp-fast`: nothing silently wrong. A bad input or output option is refused in ONE line on
stderr naming the cause, with exit status 2, before any work (sampling, training, loading the
data). One test per finding of the adversarial probe (docs: /work/shared/reviews/probe.md;
the finding ids T23, L3, SE4, EV13, EV14, I11, C34–C38, C41, C42, T24, I22, I24)."""
import json
import os
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

import cdp_fast  # noqa: E402
from cdp_fast import cli  # noqa: E402

TOYS = '''
import torch


class Cond(torch.nn.Module):
    """A class-conditional eps-model whose embedding holds 10 classes (an IndexError beyond)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 1)

    def forward(self, x, t, y=None):
        e = 0.1 * x
        return e if y is None else e + 0.0 * self.emb(y)[:, :, None, None]


def cond():
    return Cond()


def const_features():
    return lambda x: torch.ones(x.shape[0], 4)                 # f ignores x


def nan_features():
    return lambda x: torch.full((x.shape[0], 4), float("nan"))
'''

SAMPLE = ["sample", "-n", "4", "--batch-size", "4", "--steps", "2", "--no-progress"]


@pytest.fixture
def toys(tmp_path, monkeypatch):
    d = tmp_path / "toymods_dir"
    d.mkdir()
    (d / "cdp_refusal_toys.py").write_text(TOYS)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, "cdp_refusal_toys", raising=False)
    return "cdp_refusal_toys"


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if sampling, training or an evaluation starts."""
    def boom(*a, **k):
        raise AssertionError("work started before the bad option was refused")

    monkeypatch.setattr(cdp_fast.sampling.driver, "batches", boom)
    monkeypatch.setattr(cdp_fast, "train_trades", boom)
    monkeypatch.setattr(cdp_fast, "evaluate", boom)


def _refused(argv, needle, capsys):
    assert cli.main([str(v) for v in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cdp-fast: error: ") and needle in err, err
    assert ".tmp" not in err, err      # never names the atomic write's temp file
    return err


@pytest.fixture
def labelled(tmp_path):
    p = tmp_path / "lab.npz"
    g = np.random.default_rng(0)
    cdp_fast.data.write_npz(p, {"image": g.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8),
                                "label": np.arange(20) % 10})
    return p


# ----------------------------------------------------------------------------- T23 & co: outputs first
def test_T23_train_out_directory_refused_before_training(tmp_path, capsys, no_work):
    """T23: `train --out <a directory>` trained the whole run, then lost the weights."""
    _refused(["train", "--epochs", "1", "--out", tmp_path, "--no-progress"], f"out: cannot write {tmp_path}: it "
             "is a directory", capsys)


@pytest.mark.parametrize("flag, value, needle", [
    ("--out", "{tmp}/nope/w.pt", "does not exist"),
    ("--checkpoint", "{tmp}", "is a directory"),
    ("--checkpoint", "{tmp}/nope/c.pt", "checkpoint: cannot write"),
], ids=["out-missing-parent", "checkpoint-dir", "checkpoint-missing-parent"])
def test_T23_train_bad_output_options_refused_before_training(flag, value, needle, tmp_path, capsys, no_work):
    """T23: every output option of train, checked before the training run."""
    argv = ["train", "--epochs", "1", "--out", tmp_path / "w.pt", "--no-progress", flag, value.format(tmp=tmp_path)]
    _refused(argv, needle, capsys)


def test_T23_train_out_in_unwritable_folder(tmp_path, capsys, no_work, monkeypatch):
    """T23: an unwritable folder (os.access says so: also under root, who writes anyway)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: str(p) != str(ro) and real(p, mode, **k))
    _refused(["train", "--out", ro / "w.pt", "--no-progress"], f"the folder {ro} is not writable", capsys)


def test_L3_label_out_directory_names_the_option(tmp_path, labelled, capsys, monkeypatch):
    """L3: `label --out <a directory>` said 'Is a directory (/.tmp.xxxx.tmp)'; and now before
    the classifier runs."""
    import cdp_fast.label

    monkeypatch.setattr(cdp_fast.label, "pseudo_label", lambda *a, **k: pytest.fail("labelled first"))
    _refused(["label", labelled, "--out", tmp_path, "--no-progress"], f"out: cannot write {tmp_path}: it is a "
             "directory", capsys)


def test_SE4_select_out_directory_names_the_option(tmp_path, labelled, capsys):
    """SE4: `select --out <a directory>` named the temp file."""
    _refused(["select", labelled, "--k-per-class", "1", "--classifier", "none", "--criterion", "separability",
              "--out", tmp_path], f"out: cannot write {tmp_path}: it is a directory", capsys)


def test_EV14_eval_json_directory_refused_before_the_attacks(tmp_path, capsys, no_work):
    """EV14: `eval --json <a directory>` printed the results, then named the temp file."""
    _refused(["eval", "--arch", "digits", "--json", tmp_path, "--no-progress"],
             f"json: cannot write {tmp_path}: it is a directory", capsys)


def test_EV13_eval_weights_directory_says_directory(tmp_path, capsys, no_work):
    """EV13: `eval --weights /tmp` said 'does not exist'."""
    err = _refused(["eval", "--weights", tmp_path, "--no-progress"], f"weights: {tmp_path} is a directory", capsys)
    assert "does not exist" not in err


@pytest.mark.parametrize("flag", ["--json", "--figure"])
def test_I11_inspect_json_directory_refused_before_measuring(flag, tmp_path, labelled, capsys, monkeypatch):
    """I11: `inspect --json <a directory>` printed the table, then named the temp file."""
    monkeypatch.setattr(cdp_fast.metrics, "report", lambda *a, **k: pytest.fail("measured first"))
    _refused(["inspect", labelled, flag, tmp_path], f"{flag[2:]}: cannot write {tmp_path}: it is a directory",
             capsys)


def test_T23_sample_and_demo_outputs_use_the_same_check(tmp_path, capsys, no_work, monkeypatch):
    """T23 (the shared helper): sample --npz / --grid pointing at a directory, sample --out and
    demo --out pointing at a file, each refused before any work."""
    import cdp_fast.demo

    f = tmp_path / "file"
    f.write_text("x")
    _refused(SAMPLE + ["--npz", tmp_path], f"npz: cannot write {tmp_path}: it is a directory", capsys)
    _refused(SAMPLE + ["--grid", tmp_path], f"grid: cannot write {tmp_path}: it is a directory", capsys)
    _refused(SAMPLE + ["--out", f], "out: cannot write into", capsys)
    _refused(SAMPLE + ["--out", tmp_path / "nope" / "gen"], "does not exist", capsys)
    monkeypatch.setattr(cdp_fast.demo, "run_demo", lambda **k: pytest.fail("demo ran"))
    _refused(["demo", "--gaussian", "--out", f], "out: cannot write into", capsys)


# ----------------------------------------------------------------------------- C42, C34, C35: class labels
def test_C42_float_class_labels_refused_not_truncated(tmp_path, capsys, no_work):
    """C42: `--class-labels f.npy` with [0.9, 1.9, ...] was truncated to [0, 1, ...]."""
    p = tmp_path / "cl_float.npy"
    np.save(p, np.arange(4) + 0.9)
    _refused(SAMPLE + ["--loss", "none", "--class-labels", p], f"class-labels: {p} must be whole numbers",
             capsys)
    q = tmp_path / "cl_float.npz"
    cdp_fast.data.write_npz(q, {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.arange(4) + 0.5})
    _refused(SAMPLE + ["--loss", "none", "--class-labels", q], f"class-labels: {q} must be whole numbers",
             capsys)
    from cdp_fast.cli import specs

    w = tmp_path / "whole.npy"
    np.save(w, np.array([1.0, 2.0, 0.0]))       # whole-number floats are labels, taken as they are
    assert specs.load_class_labels(str(w), 10).tolist() == [1, 2, 0]


@pytest.mark.parametrize("labels, needle", [("1,2,3,12", "holds label 12, out of range for 10 classes"),
                                            ("1,2,3,-1", "holds a negative label (-1)")], ids=["C34", "C35"])
def test_C34_C35_class_labels_out_of_range_refused_before_sampling(labels, needle, toys, capsys, no_work):
    """C34 / C35: labels >= num_classes or negative were an IndexError traceback mid-run."""
    _refused(SAMPLE + ["--model", f"{toys}:cond", "--image-shape", "1,8,8", "--num-classes", "10", "--loss",
                       "none", "--labeler", "none", "--class-labels", labels], needle, capsys)


# ----------------------------------------------------------------------------- C36, C37: features
@pytest.mark.parametrize("name, needle", [("const_features", "do not depend on the images"),
                                          ("nan_features", "do not depend on the images")], ids=["C36", "C37"])
def test_C36_C37_features_without_gradient_refused_before_sampling(name, needle, toys, capsys, no_work):
    """C36 / C37: a feature map that ignores x was a RuntimeError 'does not require grad'."""
    _refused(SAMPLE + ["--features", f"{toys}:{name}"], f"features: {toys}:{name} returns values that {needle}",
             capsys)


# ----------------------------------------------------------------------------- C38: grid labels
def test_C38_grid_rerun_uses_the_first_64_labels(tmp_path, capsys, monkeypatch):
    """C38: -n 72 with 72 class labels and --grid failed after sampling ('class_labels must hold
    n=64 labels, got 72'); the grid's unguided re-run now gets the first 64 labels."""
    seen = []
    real = cdp_fast.sample

    def spy(model, n, **kw):
        seen.append((n, None if kw.get("class_labels") is None else list(kw["class_labels"])))
        return real(model, n, **kw)

    monkeypatch.setattr(cdp_fast, "sample", spy)
    labels = ",".join(str(i % 10) for i in range(72))
    png = tmp_path / "g.png"
    rc = cli.main(["sample", "-n", "72", "--batch-size", "72", "--steps", "3", "--skip", "quadratic",
                   "--negatives", "class",
                   "--class-labels", labels, "--grid", str(png), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [n for n, _ in seen] == [72, 64] and seen[1][1] == [i % 10 for i in range(64)]


# ----------------------------------------------------------------------------- C41: --npz help
def test_C41_npz_help_says_what_float_output_writes(capsys):
    """C41: `--output float --npz` writes float32 NCHW model-space images; the help said only
    'image uint8 NHWC'."""
    assert cli.main(["sample", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "float32 NCHW model-space values" in out and "with --output float" in out


# ----------------------------------------------------------------------------- T24, I22, I24: one line
def test_T24_diverging_training_is_one_line(tmp_path, capsys, monkeypatch):
    """T24: `train --lr 1000` ended in a FloatingPointError traceback, exit 1."""
    def diverge(*a, **k):
        raise FloatingPointError("non-finite loss at epoch 1, update 2")

    monkeypatch.setattr(cdp_fast, "train_trades", diverge)
    err = _refused(["train", "--lr", "1000", "--out", tmp_path / "w.pt", "--no-progress"],
                   "train: non-finite loss at epoch 1, update 2: the training diverged", capsys)
    assert "--lr than 1000" in err
    assert not (tmp_path / "w.pt").exists()

    def bug(*a, **k):
        raise KeyError("a bug")

    # the mapping stays narrow: a genuine bug (any other exception) still shows its traceback
    monkeypatch.setattr(cdp_fast, "train_trades", bug)
    with pytest.raises(KeyError):
        cli.main(["train", "--out", str(tmp_path / "w.pt"), "--no-progress"])


def test_I22_inspect_of_a_run_with_no_finished_shard_is_one_line(tmp_path, capsys):
    """I22: an out dir whose only shard is being written gave a UserWarning, its source line and
    the error: now the error's line only (the 'incomplete run' warning is shown when the
    finished shards are loaded, as one line)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "manifest.json").write_text(json.dumps({"complete": False, "shards": {}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _refused(["inspect", busy], "holds no finished shard", capsys)
    assert not caught, [str(w.message) for w in caught]


def test_I22_cli_warnings_are_one_line(monkeypatch, capsys):
    """I22: a warning the CLI shows is one line (its message), not the message and its source
    line; the caller's warning format is restored after the call."""
    from cdp_fast.cli import specs

    seen = []
    before = warnings.formatwarning
    monkeypatch.setattr(specs, "check_device", lambda d: seen.append(
        warnings.formatwarning("run is incomplete\nsecond line", UserWarning, "x.py", 3)))
    assert cli.main(["inspect", "/nonexistent/samples.npz"]) == 2
    assert seen == ["cdp-fast: warning: run is incomplete\n"]
    assert warnings.formatwarning is before


def test_I24_structured_dtype_npz_is_one_line(tmp_path, capsys):
    """I24: a structured-dtype npz in inspect was a TypeError traceback, exit 1."""
    p = tmp_path / "structured.npz"
    dt = np.dtype([("a", np.uint8), ("b", np.uint8)])
    cdp_fast.data.write_npz(p, {"image": np.zeros((8, 8, 8, 1), np.uint8), "label": np.zeros(8, dtype=dt)})
    _refused(["inspect", p], str(p), capsys)


@pytest.mark.parametrize("n", ["-5", "0"])
def test_EV1_eval_negative_n_refused(n, capsys):
    """`cdp-fast eval --n -5` evaluated all but the last 5 test digits (a slice): refused."""
    from cdp_fast import cli

    assert cli.main(["eval", "--n", n]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n: must be >= 1" in err, err
