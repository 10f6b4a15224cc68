"""`cdp-fast` CLI: every subcommand in-process through cdp_fast.cli.main, one subprocess run of
`python -m cdp_fast --help`, and bad arguments -> exit 2 with a one-line message."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from cdp_fast import cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("sample", "label", "select", "train", "eval", "inspect", "export", "demo", "bench")


def _npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_module_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "cdp_fast", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert name in r.stdout


def test_every_flag_is_documented(capsys):
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == set(SUBCOMMANDS)
    for name, sp in subs.choices.items():
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
        assert cli.main([name, "--help"]) == 0
        out = capsys.readouterr().out
        for action in sp._actions:
            for opt in action.option_strings:
                assert opt in out, f"{name}: {opt} missing from --help"


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "invalid choice"),
    ([], "choose a subcommand"),
    (["sample", "--bogus"], "unrecognized"),
    (["sample", "--loss", "l2"], "invalid choice"),
    (["sample", "--model", "no/such/model"], "model"),
    (["sample", "-n", "0", "--no-progress"], "n must be"),
    (["sample", "-n", "4", "--tau", "-1", "--no-progress"], "tau"),
    (["sample", "--image-shape", "a,b"], "image-shape"),
    (["eval", "--arch", "small-cnn"], "weights"),
    (["demo", "--seeds", "0"], "seeds"),
])
def test_bad_arguments_exit_2_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err and err.startswith("cdp-fast")


class _Payload:
    """A pickle whose unpickling would run a command (never unpickled here)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _ckpt(content):
    """A --checkpoint file for `train` holding ``content`` (bytes, str, or an object for torch.save)."""
    def make(tmp):
        import torch

        p = tmp / "ckpt.pt"
        if content == "truncated":
            torch.save({"model": {"w": torch.zeros(64)}}, p)
            p.write_bytes(p.read_bytes()[:100])
        elif isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
        else:
            torch.save(content() if callable(content) else content, p)
        return ["train", "--checkpoint", str(p), "--epochs", "1", "--steps", "1", "--no-progress",
                "--out", str(tmp / "o.pt")]
    return make


def _weights(tmp):
    import torch

    torch.save({"conv.weight": torch.zeros(1), "x": _Payload()}, tmp / "w.pt")
    return ["eval", "--weights", str(tmp / "w.pt"), "--no-progress"]


def _whole_model(tmp):
    import torch

    from cdp_fast.models import get_model

    torch.save(get_model("small-cnn", num_classes=10), tmp / "m.pt")   # the model, pickled
    return ["eval", "--weights", str(tmp / "m.pt"), "--no-progress"]


def _cifar(tmp):
    import pickle

    d = tmp / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": [0]}, f)
    return ["train", "--data", f"cifar10:{tmp}", "--no-progress", "--out", str(tmp / "o.pt")]


def _npz_data(layout, labels_hi=10):
    def make(tmp):
        g = np.random.default_rng(0)
        x = g.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
        if layout == "nchw":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        np.savez(tmp / "d.npz", image=x, label=np.arange(20) % labels_hi)
        return ["train", "--data", str(tmp / "d.npz"), "--num-classes", "5", "--epochs", "1", "--steps", "1",
                "--no-progress", "--out", str(tmp / "o.pt")]
    return make


def _device(cmd, dev):
    def make(tmp):
        out = str(tmp / "o.npz")
        argv = {"train": ["train", "--out", out], "eval": ["eval", "--arch", "digits"],
                "label": ["label", str(tmp / "none.npz"), "--out", out], "sample": ["sample", "-n", "4"],
                "select": ["select", str(tmp / "none.npz"), "--k-per-class", "1", "--out", out]}[cmd]
        return argv + ["--device", dev, "--no-progress"] if cmd != "select" else argv + ["--device", dev]
    return make


def _tensor():
    import torch

    return torch.zeros(3)


@pytest.mark.parametrize("make, needle", [
    (_ckpt("truncated"), "cannot be read (empty, truncated, corrupted or not a torch file"),
    (_ckpt("some text\n"), "cannot be read (empty, truncated, corrupted or not a torch file"),
    (_ckpt(b""), "cannot be read (empty, truncated, corrupted or not a torch file"),
    (_ckpt(_tensor), "holds a Tensor, not a training checkpoint"),
    (_ckpt([1, 2]), "holds a list, not a training checkpoint"),
    (_weights, "is not a state_dict saved by `cdp-fast train` (weights only): it holds pickled Python objects "
               f"({os.system.__module__}.system)"),
    (_whole_model, "it holds pickled Python objects (cdp_fast.models"),
    (_cifar, f"data_batch_1: not a CIFAR-10 python batch (refusing to load {os.system.__module__}.system"),
    (_npz_data("nhwc", labels_hi=10), "train_data: labels must lie in [0, 5) for a model with 5 outputs, "
                                      "found labels in [0, 9]"),
    (_npz_data("nchw"), "train_data as uint8 must be NHWC (N, H, W, C), got (N, 1, 8, 8): the NCHW layout"),
    (_device("train", "bogus"), "device: 'bogus' is not a torch device"),
    (_device("eval", "bogus"), "device: 'bogus' is not a torch device"),
    (_device("label", "bogus"), "device: 'bogus' is not a torch device"),
    (_device("sample", "bogus"), "device: 'bogus' is not a torch device"),
    (_device("select", "cuda:x"), "device: 'cuda:x' is not a torch device"),
    (_device("train", "cuda"), "device: cuda requested but torch.cuda.is_available() is False"),
    (_device("eval", "cuda"), "device: cuda requested but torch.cuda.is_available() is False"),
    (_device("label", "cuda"), "device: cuda requested but torch.cuda.is_available() is False"),
    (_device("sample", "cuda:0"), "device: cuda requested but torch.cuda.is_available() is False"),
], ids=["ckpt-truncated", "ckpt-text", "ckpt-empty", "ckpt-tensor", "ckpt-list", "weights-pickle",
        "weights-whole-model", "cifar-malicious", "labels-ge-num-classes", "uint8-nchw",
        "train-device-bogus", "eval-device-bogus", "label-device-bogus", "sample-device-bogus",
        "select-device-bad-index", "train-device-cuda", "eval-device-cuda", "label-device-cuda",
        "sample-device-cuda"])
def test_library_errors_exit_2_with_one_line_naming_the_cause(make, needle, tmp_path, capsys, monkeypatch):
    """Issue 14: each of these used to end in a traceback (or, for the pickle payload, in torch's
    advice to load with weights_only=False); now a ValueError at the library level, printed by
    the CLI as one line on stderr with exit status 2. CUDA is made unavailable for the cuda cases
    (so they hold on a GPU machine too)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = make(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cdp-fast: error: ") and needle in err, err
    assert "weights_only=False" not in err and "Traceback" not in err


def test_eval_and_label_show_progress_unless_no_progress(tmp_path, capsys):
    """eval's bar names the attack under way (AutoAttack blocks included); label's counts images."""
    args = ["eval", "--arch", "digits", "--n", "12", "--attacks", "clean,pgd"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "evaluate: pgd" in err and "/2 " in err
    assert cli.main(args + ["--no-progress"]) == 0
    assert "evaluate" not in capsys.readouterr().err
    x = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", image=x)
    assert cli.main(["label", str(tmp_path / "s.npz"), "--out", str(tmp_path / "l.npz")]) == 0
    assert "pseudo-label" in capsys.readouterr().err
    assert cli.main(["label", str(tmp_path / "s.npz"), "--out", str(tmp_path / "l.npz"), "--no-progress"]) == 0
    assert "pseudo-label" not in capsys.readouterr().err


def test_bench_help_names_the_subcommand(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: cdp-fast bench")


def test_spec_loaders_live_in_specs():
    from cdp_fast.cli import specs

    model, info = specs.load_model_spec("digits")
    from cdp_fast.models import digits

    assert info["guidance"] is digits.DIGITS_GUIDANCE and info["sampling"] is digits.DIGITS_SAMPLING
    assert info["image_shape"] == digits.IMAGE_SHAPE
    with pytest.raises(ValueError, match="module:factory"):
        specs.import_attr("nocolon", "model")
    assert specs.parse_shape("3x32x32") == (3, 32, 32)


@pytest.mark.parametrize("pipeline", [False, True])
def test_model_spec_loads_a_local_diffusers_folder(tmp_path, pipeline):
    """--model FOLDER goes through cdp_fast.diffusion.adapters.load_diffusers_unet: a UNet2DModel
    folder, or a pipeline folder whose scheduler/ also gives alphas_cumprod."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(str(tmp_path / "unet") if pipeline else str(tmp_path))
    if pipeline:
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(str(tmp_path / "scheduler"))
    from cdp_fast.cli import specs

    model, info = specs.load_model_spec(str(tmp_path))
    assert isinstance(model, UNet2DModel)
    assert info["image_shape"] == (3, 8, 8) and info["num_classes"] is None
    if pipeline:
        assert info["alphas_cumprod"].shape == (1000,)
        torch.testing.assert_close(model(torch.zeros(1, 3, 8, 8), torch.tensor([5])).sample,
                                   unet(torch.zeros(1, 3, 8, 8), torch.tensor([5])).sample)
    else:
        assert info["alphas_cumprod"] is None


def test_bench_outside_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    from cdp_fast.cli import demo as cli_demo  # cmd_bench's module: it finds the checkout from its own path

    monkeypatch.setattr(cli_demo, "__file__", str(tmp_path / "site-packages" / "cdp_fast" / "cli" / "demo.py"))
    assert cli.main(["bench", "--methods", "ddim"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source checkout" in err and "throughput.py" in err


def test_sample_guided_npz_grid_and_out(tmp_path, capsys):
    npz, png, out = tmp_path / "s.npz", tmp_path / "g.png", tmp_path / "gen"
    rc = cli.main(["sample", "--model", "digits", "-n", "8", "--batch-size", "8", "--steps", "4",
                   "--loss", "hnm", "--out", str(out), "--npz", str(npz), "--grid", str(png), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    d = _npz(npz)
    assert d["image"].shape == (8, 8, 8, 1) and d["image"].dtype == np.uint8
    assert d["label"].dtype == np.int64 and d["label"].min() >= 0 and d["label"].max() <= 9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "manifest.json").is_file()
    # same seed, unguided, in memory: different images (the guidance acted), same shape
    npz2 = tmp_path / "u.npz"
    assert cli.main(["sample", "-n", "8", "--batch-size", "8", "--steps", "4", "--loss", "none",
                     "--npz", str(npz2), "--no-progress"]) == 0
    assert _npz(npz2)["image"].shape == d["image"].shape


def test_label_select_train_eval_pipeline(tmp_path, capsys):
    raw, labelled, selected = tmp_path / "raw.npz", tmp_path / "lab.npz", tmp_path / "sel.npz"
    assert cli.main(["sample", "-n", "20", "--batch-size", "10", "--steps", "4", "--loss", "none",
                     "--labeler", "none", "--npz", str(raw), "--no-progress"]) == 0
    assert "label" not in _npz(raw)
    assert cli.main(["label", str(raw), "--classifier", "digits", "--out", str(labelled)]) == 0, \
        capsys.readouterr().err
    lab = _npz(labelled)
    assert lab["label"].shape == (20,)
    assert cli.main(["select", str(labelled), "--k-per-class", "1", "--out", str(selected)]) == 0, \
        capsys.readouterr().err
    sel = _npz(selected)
    assert 1 <= len(sel["label"]) <= 10 and len(set(sel["label"].tolist())) == len(sel["label"])
    weights = tmp_path / "clf.pt"
    assert cli.main(["train", "--data", "digits", "--synthetic", str(labelled), "--epochs", "1", "--steps", "1",
                     "--batch-size", "256", "--out", str(weights), "--no-progress"]) == 0, capsys.readouterr().err
    res = tmp_path / "eval.json"
    assert cli.main(["eval", "--weights", str(weights), "--n", "40", "--attacks", "clean,pgd",
                     "--json", str(res)]) == 0, capsys.readouterr().err
    r = json.loads(res.read_text())
    assert 0.0 <= r["pgd"] <= r["clean"] <= 1.0


def test_train_recipe_and_augmentation_flags(tmp_path, monkeypatch):
    """`train` passes --recipe / --label-smoothing / --pad / --flip / --no-flip through and
    otherwise leaves pad, flip and label smoothing to the library (None: fitted to the images
    and the recipe), the same rule for digits as for any other data."""
    import cdp_fast

    calls = []

    def fake(model, data, **kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(cdp_fast, "train_trades", fake)
    out = str(tmp_path / "w.pt")
    base = ["train", "--data", "digits", "--epochs", "1", "--out", out, "--no-progress"]
    assert cli.main(base) == 0
    assert calls[-1]["recipe"] == "gowal"
    assert (calls[-1]["pad"], calls[-1]["flip"], calls[-1]["label_smoothing"]) == (None, None, None)
    assert cli.main(base + ["--recipe", "zhang", "--label-smoothing", "0.2", "--pad", "2",
                            "--flip"]) == 0
    assert calls[-1]["recipe"] == "zhang" and calls[-1]["label_smoothing"] == 0.2
    assert (calls[-1]["pad"], calls[-1]["flip"]) == (2, True)
    assert cli.main(base + ["--no-flip"]) == 0 and calls[-1]["flip"] is False
    for bad in (["--recipe", "madry"], ["--flip", "--no-flip"]):
        assert cli.main(base + bad) == 2


def test_sample_fidelity_flags(monkeypatch):
    """`sample` maps --form / --embedding / --guide-window / --solver / --clip-x0 onto the
    library's arguments: "auto" takes the bundled model's preset (the digits preset pins the
    anchor form at every step without a head, the setting it was tuned in), else the
    library's defaults (the authors' choices)."""
    import cdp_fast

    calls = []

    def fake(model, n, **kw):
        calls.append(kw)
        return cdp_fast.Samples(np.zeros((n, 8, 8, 1), np.uint8))

    monkeypatch.setattr(cdp_fast, "sample", fake)
    base = ["sample", "-n", "2", "--no-progress"]
    assert cli.main(base) == 0
    assert (calls[-1]["form"], calls[-1]["embedding"], calls[-1]["guide_window"]) == ("anchors", None, None)
    assert (calls[-1]["solver"], calls[-1]["clip_x0"]) == ("ddim", None)
    assert cli.main(base + ["--form", "authors", "--embedding", "mlp", "--guide-window", "300", "999",
                            "--solver", "ddpm", "--clip-x0", "false"]) == 0
    kw = calls[-1]
    assert (kw["form"], kw["embedding"], kw["guide_window"], kw["solver"], kw["clip_x0"]) == \
        ("authors", "mlp", (300, 999), "ddpm", False)
    assert cli.main(base + ["--guide-window", "all"]) == 0 and calls[-1]["guide_window"] is None
    tiny = ["--model", "tests.test_cli:_tiny_eps", "--image-shape", "1,8,8"]
    assert cli.main(base + tiny + ["--features", "pixels", "--lam", "30"]) == 0
    assert (calls[-1]["form"], calls[-1]["embedding"], calls[-1]["guide_window"]) == (None, "auto", "auto")
    assert (calls[-1]["features"], calls[-1]["lam"]) == ("pixels", 30.0)
    assert cli.main(base + ["--solver", "heun", "--nfe", "19"]) == 0
    assert (calls[-1]["solver"], calls[-1]["nfe"]) == ("heun", 19)
    assert cli.main(base + ["--solver", "dpmpp_2m"]) == 0 and calls[-1]["nfe"] is None
    for bad in (["--guide-window", "5", "x"], ["--solver", "euler"], ["--form", "symmetric"], ["--nfe", "x"]):
        assert cli.main(base + bad) == 2


def test_sample_cli_fast_solver_end_to_end(tmp_path, capsys):
    """`cdp-fast sample --solver heun --nfe 5` on the bundled digits model: runs, and a
    bad NFE is one line, exit 2."""
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "-n", "4", "--batch-size", "4", "--no-progress", "--solver", "heun", "--nfe", "5",
                     "--npz", str(out)]) == 0
    assert out.exists()
    capsys.readouterr()
    assert cli.main(["sample", "-n", "4", "--no-progress", "--solver", "heun", "--nfe", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "odd nfe" in err and len(err.splitlines()) == 1, err


def _tiny_eps():
    import torch

    return torch.nn.Conv2d(1, 1, 3, padding=1)


def test_eval_bundled_classifier(capsys):
    assert cli.main(["eval", "--arch", "digits", "--n", "100", "--attacks", "clean"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("clean")[1].split("%")[0])
    assert acc > 90


def test_demo_tiny(tmp_path, capsys):
    rc = cli.main(["demo", "--seeds", "2", "--n-synthetic", "16", "--epochs", "1", "--attacks", "clean",
                   "--test-n", "30", "--real-n", "64", "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for c in ("real+ddim", "real+cdp", "clean acc"):
        assert c in out
    assert (tmp_path / "d" / "results.json").is_file()


def test_bench_passthrough(tmp_path, capsys):
    js = tmp_path / "tp.json"
    rc = cli.main(["bench", "--methods", "ddim-eager,diffusers,hnm-eager,ref-hnm", "--batch", "4", "--steps", "2",
                   "--repeats", "1", "--compile", "false", "--out", str(js)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(js.read_text())
    assert set(rec["results"]) == {"ddim-eager", "diffusers", "hnm-eager", "ref-hnm"}
    assert all(r["images_per_s"] > 0 for r in rec["results"].values())
    # same x_T and model: our unguided DDIM matches diffusers' loop to float rounding
    (row,) = [r for r in rec["ratios"] if r["method"] == "ddim-eager"]
    assert row["max_abs_diff"] < 1e-4
    assert cli.main(["bench", "--methods", "nope"]) == 2
    # bf16 autocast for ours (the yardstick stays fp32): runs, and the difference is bf16-sized
    rc = cli.main(["bench", "--methods", "ddim,diffusers", "--batch", "4", "--steps", "2", "--repeats", "1",
                   "--compile", "false", "--dtype", "bfloat16", "--out", str(js)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(js.read_text())
    assert rec["config"]["dtype"] == "torch.bfloat16"
    (row,) = [r for r in rec["ratios"] if r["method"] == "ddim"]
    assert 0 < row["max_abs_diff"] < 0.5


def test_throughput_rounds_interleave_and_pair_the_ratios(monkeypatch):
    """Each round times every method once in a rotated order; a speed-up is the median over
    rounds of t_yardstick / t_method from the same round (so a slow round hits both)."""
    import importlib.util
    import types

    import torch

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("_throughput_under_test", path)
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    calls, clock = [], [0.0]
    # per-round machine slowness (x1, x3, x1): method "a" costs 1 unit, "b" 2 units
    slow = [1.0, 3.0, 1.0]

    def runner(name, cost):
        def run():
            calls.append(name)
            clock[0] += cost * slow[(len(calls) - 1) // 2]  # two calls per round
        return run
    monkeypatch.setattr(tp.time, "perf_counter", lambda: clock[0])
    results = {"a": {"times_s": []}, "b": {"times_s": []}}
    args = types.SimpleNamespace(repeats=3, batch=10)
    tp.timed_rounds({"a": runner("a", 1.0), "b": runner("b", 2.0)}, results, args, torch.device("cpu"))
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results["a"]["times_s"] == [1.0, 3.0, 1.0] and results["b"]["times_s"] == [2.0, 6.0, 2.0]
    assert results["a"]["images_per_s"] == 10.0 and results["b"]["median_s"] == 2.0
    assert tp.paired_speedup(results, "a", "b") == (2.0, 2.0, 2.0)


def test_inspect_two_out_dirs(tmp_path, capsys):
    """`inspect` on two tiny out folders from the same x_T (unguided vs HNM) -> exit 0, a table
    with both columns, JSON with both sets and the paired comparison, a PNG; bad values exit 2."""
    import cdp_fast
    from cdp_fast.models import digits

    eps = digits.load_digits_eps_model()
    common = dict(image_shape=digits.IMAGE_SHAPE, steps=4, skip="uniform", batch_size=16, seed=0,
                  labeler=digits.digits_labeler(), progress=False)
    cdp_fast.sample(eps, 32, loss=None, out=str(tmp_path / "ddim"), **common)
    g = digits.DIGITS_GUIDANCE["hnm"]
    cdp_fast.sample(eps, 32, loss="hnm", lam=g["lam"], tau=g["tau"], form=g["form"], guide_window=None,
                    embedding=None, features=digits.digits_features(), out=str(tmp_path / "cdp"), **common)
    js, png = tmp_path / "inspect.json", tmp_path / "inspect.png"
    rc = cli.main(["inspect", str(tmp_path / "cdp"), "--against", str(tmp_path / "ddim"), "--json", str(js),
                   "--figure", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "independent" in out and "precision" in out and "paired: label-flip rate" in out
    rep = json.loads(js.read_text())
    assert {"setup", "real", "samples", "against", "paired"} <= set(rep)
    for key in ("samples", "against"):
        assert rep[key]["n"] == 32 and rep[key]["labels_from"] == "stored"
        assert 0 <= rep[key]["fidelity"]["precision"] <= 1 and "probe" in rep[key]
    assert rep["paired"]["n_pairs"] == 32 and rep["paired"]["same_seed"] is True
    assert rep["paired"]["dx_l2_mean"] > 0                    # the guidance moved the images
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for argv, needle in ((["inspect", str(tmp_path / "nope")], "does not exist"),
                         (["inspect", str(tmp_path / "cdp"), "--features", "bogus"], "features"),
                         (["inspect", str(tmp_path / "cdp"), "--real", "nowhere.npz"], "real")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and err.startswith("cdp-fast"), err
