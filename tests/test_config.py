"""Config files for `cdp-fast sample` / `cdp-fast train` (cdp_fast.cli.config): keys are the
library's keyword names, flags override the file, library spellings map onto the flags',
unknown keys and bad values are one-line refusals (exit 2), YAML without PyYAML names the extra
(exit 1); and `sample --from-manifest`: a replay into a new directory is bitwise the original,
a larger --n extends the run in place to what a fresh run of that n makes."""
import importlib
import json
import sys
import warnings

import numpy as np
import pytest

import cdp_fast
from cdp_fast import cli
from cdp_fast.cli.config import RECORD


@pytest.fixture
def sample_calls(monkeypatch):
    calls = []

    def fake(model, n, **kw):
        calls.append(dict(kw, n=n))
        return cdp_fast.Samples(np.zeros((n, 8, 8, 1), np.uint8))

    monkeypatch.setattr(cdp_fast, "sample", fake)
    return calls


@pytest.fixture
def train_calls(monkeypatch):
    calls = []

    def fake(model, data, **kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(cdp_fast, "train_trades", fake)
    return calls


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- --config
def test_sample_config_keys_are_the_api_names_and_flags_override(tmp_path, sample_calls):
    """Library spellings (lists, null, booleans) arrive as the flag would give them; a flag on
    the command line wins over the file; a keyword without a flag (shard_size) is passed on."""
    cfg = _write(tmp_path / "run.json", {
        "n": 5, "lam": 300.0, "tau": 0.5, "tau_plus": 0.2, "guide_window": [300, 999], "clip_x0": False,
        "embedding": 64, "compile": False, "progress": False, "shard_size": 16, "dtype": "float32",
        "class_labels": [1, 2, 3, 4, 5], "num_classes": 10, "seed": 7})
    assert cli.main(["sample", "--config", cfg]) == 0
    kw = sample_calls[-1]
    assert (kw["n"], kw["lam"], kw["tau"], kw["tau_plus"], kw["seed"]) == (5, 300.0, 0.5, 0.2, 7)
    assert (kw["guide_window"], kw["clip_x0"], kw["embedding"], kw["compile"]) == ((300, 999), False, 64, False)
    assert (kw["progress"], kw["shard_size"]) == (False, 16)
    assert list(kw["class_labels"]) == [1, 2, 3, 4, 5]
    assert cli.main(["sample", "--config", cfg, "--lam", "7", "-n", "3", "--guide-window", "all",
                     "--class-labels", "0,1,2"]) == 0
    kw = sample_calls[-1]
    assert (kw["n"], kw["lam"], kw["guide_window"], kw["tau"]) == (3, 7.0, None, 0.5)
    cfg2 = _write(tmp_path / "b.json", {"n": 2, "guide_window": None, "embedding": None, "loss": "infonce",
                                        "progress": True})
    assert cli.main(["sample", "--config", cfg2, "--no-progress"]) == 0
    kw = sample_calls[-1]
    assert (kw["guide_window"], kw["embedding"], kw["loss"], kw["progress"]) == (None, None, "infonce", False)


def test_train_config_sets_out_and_api_keywords(tmp_path, train_calls, capsys):
    out = str(tmp_path / "w.pt")
    cfg = _write(tmp_path / "t.json", {"out": out, "epochs": 3, "eps": 0.05, "ema": None, "flip": True,
                                       "momentum": 0.8, "nesterov": False, "holdout": 0.25, "eval_every": 2,
                                       "progress": False})
    assert cli.main(["train", "--config", cfg]) == 0
    kw = train_calls[-1]
    assert (kw["epochs"], kw["eps"], kw["ema"], kw["flip"], kw["momentum"], kw["nesterov"]) == \
        (3, 0.05, None, True, 0.8, False)
    assert (kw["holdout"], kw["eval_every"], kw["log_dir"], kw["progress"]) == (0.25, 2, None, False)
    assert cli.main(["train", "--config", cfg, "--no-flip", "--epochs", "1", "--holdout", "10"]) == 0
    kw = train_calls[-1]
    assert (kw["flip"], kw["epochs"], kw["holdout"], kw["momentum"]) == (False, 1, 10, 0.8)
    capsys.readouterr()
    assert cli.main(["train", "--config", _write(tmp_path / "n.json", {"epochs": 1})]) == 2
    assert "out: required" in _err(capsys)


@pytest.mark.parametrize("obj, needle", [
    ({"lamda": 3}, "unknown key 'lamda' (did you mean 'lam'?)"),
    ({"batch-size": 3}, "did you mean 'batch_size'"),
    ({"steps": "x"}, "steps: expected an int"),
    ({"steps": 2.5}, "steps: expected an int"),
    ({"lam": [1, 2]}, "lam: [1, 2] is not a value of --lam"),
    ({"loss": "l2"}, "loss: 'l2' is not one of"),
    ({"progress": "yes"}, "progress: expected true or false"),
    ({"guide_window": [1, None]}, "guide_window"),
    ({"shard_size": [1]}, "shard_size: expected a single value"),
    ([1, 2], "the top level must be a mapping"),
])
def test_bad_sample_configs_exit_2_one_line(obj, needle, tmp_path, sample_calls, capsys):
    assert cli.main(["sample", "--config", _write(tmp_path / "c.json", obj)]) == 2
    line = _err(capsys)
    assert needle in line and "c.json" in line, line
    assert not sample_calls


def test_config_file_refusals(tmp_path, sample_calls, capsys):
    (tmp_path / "dup.json").write_text('{"n": 1, "n": 2}')
    (tmp_path / "bad.json").write_text('{"n": ')
    (tmp_path / "c.toml").write_text("n = 1")
    for name, needle in (("dup.json", "the key 'n' appears twice"), ("bad.json", "not valid JSON"),
                         ("c.toml", "give a .json, .yaml or .yml file"), ("none.json", "does not exist")):
        assert cli.main(["sample", "--config", str(tmp_path / name)]) == 2
        assert needle in _err(capsys)
    assert cli.main(["train", "--holdout", "1.5", "--out", str(tmp_path / "w.pt")]) == 2
    assert "neither a fraction in (0, 1) nor a count" in _err(capsys)
    assert not sample_calls


def test_yaml_config(tmp_path, sample_calls, capsys):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("n: 4\nlam: 1.5e3\nguide_window: [10, 20]\nclip_x0: true\nprogress: false\n")
    assert cli.main(["sample", "--config", str(cfg)]) == 0
    kw = sample_calls[-1]
    assert (kw["n"], kw["lam"], kw["guide_window"], kw["clip_x0"]) == (4, 1500.0, (10, 20), True)
    (tmp_path / "dup.yaml").write_text("n: 1\nn: 2\n")
    assert cli.main(["sample", "--config", str(tmp_path / "dup.yaml")]) == 2
    assert "appears twice" in _err(capsys)
    (tmp_path / "bad.yaml").write_text("n: [1\n")
    assert cli.main(["sample", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in _err(capsys)


def test_yaml_without_pyyaml_names_the_extra(tmp_path, sample_calls, monkeypatch, capsys):
    cfg = tmp_path / "run.yml"
    cfg.write_text("n: 4\n")
    monkeypatch.setitem(sys.modules, "yaml", None)      # PyYAML not installed
    assert cli.main(["sample", "--config", str(cfg)]) == 1
    line = _err(capsys)
    assert "PyYAML" in line and "cdp_fast[config]" in line and "json" in line
    assert not sample_calls


# ----------------------------------------------------------------------------- replay
_RUN = ["sample", "--model", "digits", "--batch-size", "4", "--steps", "3", "--no-progress"]


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.npz"))}


def test_replay_is_bitwise_and_extension_equals_a_fresh_run(tmp_path, capsys):
    """A guided run (shard_size 4 from a config: shards of 4 and 2) replayed from its manifest
    into a new directory gives the same shard bytes; --n 10 into its own directory keeps the
    full shard (same file), makes the partial one again and the rest, and equals a fresh
    n = 10 run; a smaller n is refused and leaves the manifest as it was."""
    gen, cfg = tmp_path / "gen", _write(tmp_path / "c.json", {"shard_size": 4, "n": 6})
    assert cli.main(_RUN + ["--config", cfg, "--out", str(gen)]) == 0
    assert [len(b) > 0 for b in _shards(gen).values()] == [True, True]
    rec = json.loads((gen / RECORD).read_text())
    assert (rec["n"], rec["shard_size"], rec["steps"], rec["loss"]) == (6, 4, 3, "hnm")
    assert cli.main(["sample", "--from-manifest", str(gen / "manifest.json"), "--out", str(tmp_path / "again"),
                     "--no-progress"]) == 0
    assert _shards(tmp_path / "again") == _shards(gen)
    first = (gen / "shard-000000.npz").stat().st_ino
    assert cli.main(["sample", "--from-manifest", str(gen), "--n", "10", "--no-progress"]) == 0
    assert (gen / "shard-000000.npz").stat().st_ino == first       # kept, not rewritten
    m = json.loads((gen / "manifest.json").read_text())
    assert (m["n"], m["num_shards"], m["complete"], m["args"]["n"]) == (10, 3, True, 10)
    assert json.loads((gen / RECORD).read_text())["n"] == 10
    assert cli.main(_RUN + ["--config", cfg, "-n", "10", "--out", str(tmp_path / "fresh")]) == 0
    assert _shards(gen) == _shards(tmp_path / "fresh")
    before = (gen / "manifest.json").read_bytes()
    capsys.readouterr()
    assert cli.main(["sample", "--from-manifest", str(gen), "--n", "4", "--no-progress"]) == 2
    assert "n: 10 -> 4" in _err(capsys)
    assert cli.main(["sample", "--from-manifest", str(gen), "--n", "12", "--lam", "5", "--no-progress"]) == 2
    assert "lam" in _err(capsys)
    assert (gen / "manifest.json").read_bytes() == before      # the grown manifest was put back


def test_replay_refusals(tmp_path, capsys):
    out = tmp_path / "api"
    cdp_fast.sample(_tiny_eps(), 2, loss=None, steps=2, image_shape=(1, 8, 8), batch_size=2, out=out,
                    progress=False)
    assert cli.main(["sample", "--from-manifest", str(out / "manifest.json")]) == 2
    assert f"has no {RECORD}" in _err(capsys)
    (tmp_path / "x.json").write_text("{}")
    assert cli.main(["sample", "--from-manifest", str(tmp_path / "x.json")]) == 2
    assert "not the manifest of a cdp_fast.sample out directory" in _err(capsys)
    assert cli.main(["sample", "--from-manifest", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _err(capsys)
    (out / RECORD).write_text(json.dumps({"n": 3, "seed": 0}))     # out of step with the manifest
    assert cli.main(["sample", "--from-manifest", str(out)]) == 2
    assert "does not match" in _err(capsys)


def test_replay_warns_when_the_shards_differ(tmp_path, monkeypatch):
    """The replay's shards are compared with the original's sha256: a replay that differs (here
    a different model behind the same spec string) is a warning naming the shard."""
    gen = tmp_path / "gen"
    base = ["sample", "--model", "tests.test_config:_tiny_eps", "--image-shape", "1,8,8", "--loss", "none",
            "-n", "2", "--batch-size", "2", "--steps", "2", "--no-progress"]
    assert cli.main(base + ["--out", str(gen)]) == 0
    with pytest.warns(UserWarning) as seen:      # (a replay of the same model: no warning)
        assert cli.main(["sample", "--from-manifest", str(gen), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
        warnings.warn("sentinel", UserWarning)
    assert [str(w.message) for w in seen] == ["sentinel"]
    monkeypatch.setattr(importlib.import_module("tests.test_config"), "_SCALE", 0.5)
    with pytest.warns(UserWarning, match=r"differs from .*arguments model.*shards shard-000000\.npz"):
        assert cli.main(["sample", "--from-manifest", str(gen), "--out", str(tmp_path / "b"), "--no-progress"]) == 0


_SCALE = 0.1


def _tiny_eps():
    import torch

    class Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((1,), _SCALE))

        def forward(self, x, t):
            return self.w * x

    return Eps()
