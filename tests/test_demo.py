"""`cdp-fast demo` in a tiny configuration (k = 2 per class, 2 paired seeds, a few updates, 32
synthetic images, no AutoAttack): the JSON structure, the paired CIs against a hand computation
(SciPy's t quantile and the table), the λ rule on a synthetic table, distinct networks per role,
the Gaussian chain against the closed forms of cdp_fast.theory, the CLI, and the PNG writer."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from cdp_fast import demo, theory
from cdp_fast.demo import digits as demo_data
from cdp_fast.demo import gaussian as demo_gaussian
from cdp_fast.demo import stats as demo_stats  # noqa: E402
from cdp_fast.utils import png  # noqa: E402

TINY = dict(k_per_class=2, n_synthetic=32, epochs=2, updates_per_epoch=2, sampling_steps=4, sweep_n=16, test_n=40,
            labeler_steps=5, guide_updates=2, gaussian_seeds=2, lams=(5e3, 4e4), attacks=("clean", "pgd"),
            progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    events = []
    res = demo.run_demo(out=out, seeds=[0, 1], callback=events.append, **TINY)
    return res, out, events


def test_demo_json_structure_and_files(tiny_run):
    res, out, events = tiny_run
    cfg = res["config"]
    # the table names AutoAttack only when it ran (this run: clean and PGD)
    assert "AutoAttack =" not in res["table"] and "no AutoAttack" in res["table"].splitlines()[0]
    assert cfg["k_per_class"] == 2 and cfg["real_n"] == 20 and len(cfg["real_indices"]) == 20
    assert cfg["updates"] == 4 and cfg["seeds"] == [0, 1] and cfg["sweep_seed"] not in cfg["seeds"]
    assert "WHOLE digits training split" in cfg["leakage"]
    assert list(res["arms"]) == list(demo.ARMS)
    for arm, row in res["arms"].items():
        assert set(row) == {"clean", "pgd"}
        for cell in row.values():
            assert len(cell["values"]) == 2 and all(0.0 <= v <= 1.0 for v in cell["values"])
            assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
            assert cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
        for c, p in zip(row["clean"]["values"], row["pgd"]["values"]):
            assert p <= c + 1e-9
    # paired differences: every arm but the reference, d_s = arm_s - ddim_s
    assert set(res["paired_vs_ddim"]) == set(demo.ARMS) - {"real+ddim"}
    for arm, row in res["paired_vs_ddim"].items():
        for a, p in row.items():
            d = np.array(res["arms"][arm][a]["values"]) - np.array(res["arms"]["real+ddim"][a]["values"])
            assert p["diffs"] == pytest.approx(d.tolist())
            assert p["mean"] == pytest.approx(d.mean())
            hw = 12.706205 * np.std(d, ddof=1) / math.sqrt(2)
            assert p["lo"] == pytest.approx(d.mean() - hw, abs=1e-6) and p["hi"] == pytest.approx(d.mean() + hw, abs=1e-6)
    # λ sweep: DDIM row + one row per (kind, λ), a choice per guided kind, chosen from the grid
    sweep = res["lambda_sweep"]
    kinds = [r["kind"] for r in sweep["rows"]]
    assert kinds == ["ddim"] + ["cdp"] * 2 + ["cdp-class"] * 2
    for kind in ("cdp", "cdp-class"):
        assert sweep["choice"][kind]["lam"] in (5e3, 4e4) and cfg["lam"][kind] == sweep["choice"][kind]["lam"]
    # curves: one per arm and seed, a point per epoch
    for arm, runs in res["curves"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        assert [p["updates"] for p in runs[0]["points"]] == [2, 4]
    # networks and metrics
    nets = res["networks"]
    assert nets["distinct_objects"] and "k real" in nets["labeler"]["trained_on"]
    assert 0 <= nets["labeler"]["test_accuracy"] <= 1 and 0 <= nets["judge"]["test_accuracy"] <= 1
    msum = res["metrics"]["summary"]
    assert set(res["metrics"]["per_seed"]) == {"ddim", "cdp", "cdp-class"}
    assert len(msum["rows"]["precision vs the k real"]["ddim"]["values"]) == 2
    assert "label flips vs DDIM (same x_T)" in res["metrics_table"]
    # Gaussian chain in both settings
    assert set(res["gaussian"]) == set(demo_gaussian.GAUSS_SETTINGS)
    for name in ("real", "real+ddim", "real+cdp-class"):
        assert name in res["gaussian_table"] and name in res["table"]
    assert "clean acc" in res["table"] and "95% CI" in res["table"]
    assert {"setup", "sweep", "lambda", "generated", "trained", "gaussian"} <= {e["stage"] for e in events}
    for name in ("results.json", "grid_ddim.png", "grid_cdp.png", "grid_cdp_class.png", "grid_pair.png",
                 "synthetic_ddim.npz", "synthetic_cdp.npz", "synthetic_cdp_class.npz"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["arms"] == json.loads(json.dumps(res["arms"]))
    assert on_disk["machine"]["torch"] == torch.__version__


def test_demo_numbers_are_measured_and_reproducible(tiny_run):
    res, _, _ = tiny_run
    moved = any(len(set(c["values"])) > 1 for row in res["arms"].values() for c in row.values())
    assert moved, res["arms"]
    again = demo.run_demo(out=None, seeds=[1], arms=("real+ddim",), metrics=False, gaussian=False,
                          **dict(TINY, attacks=("clean",)))
    assert list(again["arms"]) == ["real+ddim"]
    assert again["arms"]["real+ddim"]["clean"]["values"][0] == pytest.approx(
        res["arms"]["real+ddim"]["clean"]["values"][1])


def test_demo_autoattack_on_the_first_aa_n_test_digits():
    res = demo.run_demo(out=None, seeds=[0], arms=("real+ddim",), metrics=False, gaussian=False, aa_n=8,
                        **dict(TINY, attacks=("clean", "autoattack")))
    cell = res["arms"]["real+ddim"]
    assert res["config"]["aa_test_n"] == 8 and "apgd-ce+apgd-t on the first 8" in res["table"]
    assert 0.0 <= cell["autoattack"]["values"][0] <= 1.0


def test_networks_are_distinct_objects_per_role():
    from cdp_fast.demo.runner import Run
    from cdp_fast.models import SmallCNN, digits

    run = Run(_run_opts())
    run.setup()
    lab, feat, judge = run.labeler.classifier, run.features.model, run.inst.judge
    assert isinstance(lab, digits.DigitsClassifier) and isinstance(feat, SmallCNN)
    assert len({id(lab), id(feat), id(judge)}) == 3
    assert not any(p.requires_grad for p in lab.parameters()) and not any(p.requires_grad for p in feat.parameters())
    # neither is the bundled classifier (trained on the whole split): the weights differ
    bundled = digits.load_digits_classifier()
    assert not torch.equal(lab.conv1.weight, bundled.conv1.weight)
    assert run.inst.pca.dim == min(20, len(run.xk) - 1)


def _run_opts():
    return dict(out=None, full=False, seeds=[0, 1], k_per_class=2, n_synthetic=32, epochs=1, updates_per_epoch=1,
                eps=None, real_fraction=None, batch_size=None, width=None, pgd_steps=None, attacks=None, test_n=20,
                aa_n=None,
                sampling_steps=2, arms=demo.ARMS, lams=(5e3,), sweep_n=16, metrics=False, gaussian=False,
                gaussian_seeds=None, labeler_steps=2, guide_updates=2, device=None, progress=False, callback=None)


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(out=None, seeds=[])
    with pytest.raises(ValueError, match="sweep seed"):
        demo.run_demo(out=None, seeds=[0, 1000])
    with pytest.raises(ValueError, match="attacks"):
        demo.run_demo(out=None, attacks=("fgsm",))
    with pytest.raises(ValueError, match="eps"):
        demo.run_demo(out=None, eps=2.0)
    with pytest.raises(ValueError, match="arms"):
        demo.run_demo(out=None, arms=("real+gan",))
    with pytest.raises(ValueError, match="lams"):
        demo.run_demo(out=None, lams=(0.0,))
    with pytest.raises(ValueError, match="nothing to run"):
        demo.run_demo(out=None, digits=False, gaussian=False)
    with pytest.raises(ValueError, match="k_per_class"):
        demo_data.choose_real(0)


# ----------------------------------------------------------------------------- statistics
def test_paired_ci_by_hand():
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.80, 0.80, 0.81, 0.80]
    d = np.array(a) - np.array(b)                  # 0.02, 0.02, -0.01, 0.04, 0.01
    mean, sd = d.mean(), math.sqrt(((d - d.mean()) ** 2).sum() / 4)
    assert mean == pytest.approx(0.016) and sd == pytest.approx(math.sqrt(0.00132 / 4))
    for use_scipy in (True, False):
        p = demo_stats.paired_ci(a, b, use_scipy=use_scipy)
        hw = 2.776445 * sd / math.sqrt(5)          # t_{0.975, 4}
        assert p["n"] == 5 and p["t"] == pytest.approx(2.776445, abs=1e-6)
        assert p["mean"] == pytest.approx(mean) and p["std"] == pytest.approx(sd)
        assert p["lo"] == pytest.approx(mean - hw, abs=1e-8) and p["hi"] == pytest.approx(mean + hw, abs=1e-8)
    one = demo_stats.paired_ci([0.5], [0.4])
    assert one["mean"] == pytest.approx(0.1) and one["lo"] is None and one["std"] is None
    with pytest.raises(ValueError):
        demo_stats.paired_ci([1, 2], [1])


def test_t_quantile_scipy_and_table_agree(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [60, 120, 1000]:
        ref = float(stats.t.ppf(0.975, df))
        assert demo_stats.t975(df) == pytest.approx(ref, abs=1e-9)
        assert demo_stats.t975(df, use_scipy=False) == pytest.approx(ref, abs=1e-5)
    # without SciPy the table is used
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert demo_stats.t975(1) == 12.706205 and demo_stats.t975(4) == 2.776445
    assert demo_stats.t975(100) == pytest.approx(1.983972, abs=1e-5)
    with pytest.raises(ValueError, match="df"):
        demo_stats.t975(0)


def test_lambda_rule_on_a_synthetic_table():
    ddim = {"lam": 0.0, "precision": 0.90, "fisher_ratio": 1.0}
    rows = [{"lam": 5e3, "precision": 0.89, "fisher_ratio": 1.10},
            {"lam": 1e4, "precision": 0.86, "fisher_ratio": 1.30},     # within 0.05: qualifies
            {"lam": 2e4, "precision": 0.84, "fisher_ratio": 2.00},     # quality dropped 0.06: out
            {"lam": 4e4, "precision": 0.95, "fisher_ratio": None}]     # no separation measured
    c = demo_data.select_lambda(rows, ddim)
    assert c["lam"] == 1e4 and c["qualifying"] == [5e3, 1e4, 4e4]
    # ties -> the smaller λ
    tie = [dict(r, fisher_ratio=1.3) for r in rows[:2]]
    assert demo_data.select_lambda(tie, ddim)["lam"] == 5e3
    # another key (effective c)
    rows_c = [dict(r, effective_c=v) for r, v in zip(rows, (1.2, 1.0, 3.0, 1.1))]
    assert demo_data.select_lambda(rows_c, ddim, key="effective_c")["lam"] == 5e3
    # nothing qualifies -> the smallest λ, and it says so
    bad = [dict(r, precision=0.5) for r in rows]
    c = demo_data.select_lambda(bad, ddim)
    assert c["lam"] == 5e3 and c["qualifying"] == [] and "smallest" in c["reason"]


# ----------------------------------------------------------------------------- Gaussian chain
def test_eq5_and_pseudo_labels_by_hand():
    x = np.array([[1.0, 2.0], [-1.0, 0.5]])
    y = np.array([1.0, -1.0])
    xs = np.array([[0.0, 0.0], [2.0, -3.0], [-1.0, -1.0]])
    theta = np.array([1.0, 1.0])
    ys = demo_gaussian.pseudo_labels(theta, xs)
    assert ys.tolist() == [1.0, -1.0, -1.0]            # sign(0) := +1
    # (Σ y x + Σ ỹ x̃) / (n + ñ) = ((2, 1.5) + (-1, 4)) / 5
    np.testing.assert_allclose(demo_gaussian.eq5(x, y, xs, ys), [0.2, 1.1])
    np.testing.assert_allclose(demo_gaussian.eq5(x, y), [1.0, 0.75])


def test_gaussian_chain_matches_the_closed_forms():
    res = demo_gaussian.gaussian_chain(seeds=[0, 1], n_real=5, n_syn=16, steps=5, mu=(1.0, 1.0), eps=0.5)
    mu = np.array([1.0, 1.0])
    for arm in demo_gaussian.GAUSS_ARMS:
        for i, rec in enumerate(res["theta"][arm]):
            th = rec["theta"]
            assert rec["cos_mu"] == pytest.approx(np.dot(th, mu) / (np.linalg.norm(th) * np.linalg.norm(mu)))
            assert res["arms"][arm]["standard"]["values"][i] == pytest.approx(
                1 - theory.err_standard(np.array(th), mu))
            assert res["arms"][arm]["robust"]["values"][i] == pytest.approx(
                1 - theory.err_robust(np.array(th), mu, 1.0, 0.5))
    # the real-only arm is θ̂_inter of the seed's real points (the draw of the chain)
    rng = np.random.default_rng([0, 7])
    y = np.concatenate([np.ones(5), -np.ones(5)])
    x = y[:, None] * mu + rng.standard_normal((10, 2))
    np.testing.assert_allclose(res["theta"]["real"][0]["theta"], (y @ x) / 10)
    for arm in ("real", "real+cdp", "real+cdp-class", "syn-only"):
        p = res["paired_vs_ddim"][arm]["robust"]
        d = np.array(res["arms"][arm]["robust"]["values"]) - np.array(res["arms"]["real+ddim"]["robust"]["values"])
        assert p["mean"] == pytest.approx(d.mean())
    # no accuracy above the Bayes optimum: 1 - eq. (6) at θ = μ
    bayes = 1 - theory.err_standard(mu, mu)
    assert max(max(r["standard"]["values"]) for r in res["arms"].values()) <= bayes + 1e-12


def test_gaussian_only_run_writes_json(tmp_path):
    res = demo.run_demo(out=tmp_path, digits=False, gaussian_seeds=2, progress=False)
    assert res["config"]["parts"] == ["gaussian"] and set(res["gaussian"]) == {"d=2", "d=100"}
    assert json.loads((tmp_path / "results.json").read_text())["gaussian_table"] == res["gaussian_table"]


# ----------------------------------------------------------------------------- CLI
def test_cli_demo_gaussian_only_and_bad_arguments(tmp_path, capsys):
    from cdp_fast import cli

    assert cli.main(["demo", "--gaussian", "--gaussian-seeds", "2", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "Gaussian chain: d = 2" in out and "Gaussian chain: d = 100" in out
    for argv, needle in ((["demo", "--threads", "0"], "threads"), (["demo", "--k", "3", "--real-n", "40"], "--k"),
                         (["demo", "--lams", "a,b"], "lams"), (["demo", "--arms", "real,bogus"], "arms"),
                         (["demo", "--gaussian", "--no-gaussian"], "not allowed")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and err.startswith("cdp-fast"), err


# ----------------------------------------------------------------------------- kept helpers
def test_same_start_noise_for_ddim_and_cdp():
    """The previous demo's preset generator (kept for DIGITS_GUIDANCE's record): with λ = 0 the
    "cdp" set equals the "ddim" set exactly (same x_T)."""
    from cdp_fast.demo import preset

    a = preset.generate("ddim", 8, steps=3)
    b = preset.generate("cdp", 8, steps=3, guidance={"lam": 0.0})
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_demo_sets_share_x_T():
    """Every kind of the new demo starts from the same x_T: at λ → 0 the guided sets are the DDIM set."""
    from cdp_fast.models import as_feature_extractor, digits, small_cnn

    xk, yk, _ = demo_data.choose_real(2)
    kw = dict(seed=3, eps_model=digits.load_digits_eps_model(), labeler=digits.digits_labeler(),
              features=as_feature_extractor(small_cnn()).eval(), steps=3)
    a = demo_data.generate_set("ddim", 8, **kw)
    for kind in ("cdp", "cdp-class"):
        b = demo_data.generate_set(kind, 8, lam=1e-12, **kw)
        np.testing.assert_allclose(np.asarray(a.images, np.float64), np.asarray(b.images, np.float64), atol=1)


def _read_png(path):
    Image = pytest.importorskip("PIL.Image")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 3), (6, 2, 1)])
def test_png_round_trip(tmp_path, shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png.write_png(tmp_path / "x.png", img)
    back = _read_png(tmp_path / "x.png")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back.reshape(img.shape), img)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="uint8"):
        png.write_png(tmp_path / "y.png", img.astype(np.float32))


def test_save_grid_png_pixels_round_trip(tmp_path):
    """The file holds exactly image_grid's array, grey (C=1) and RGB (C=3)."""
    rng = np.random.default_rng(1)
    for c in (1, 3):
        imgs = rng.integers(0, 256, (5, 3, 4, c), dtype=np.uint8)
        png.save_grid_png(tmp_path / f"g{c}.png", imgs, nrow=2, scale=3)
        back = _read_png(tmp_path / f"g{c}.png")
        np.testing.assert_array_equal(back, png.image_grid(imgs, nrow=2, scale=3))


def test_png_without_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"cdp_fast\[demo\]"):
        png.write_png(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    assert not (tmp_path / "x.png").exists()


def test_digits_presets_live_with_the_digits_models():
    from cdp_fast.models import digits

    assert digits.DIGITS_GUIDANCE["hnm"] == {"lam": 10_000.0, "tau": 10.0, "tau_plus": 0.1, "beta": 1.0,
                                             "form": "anchors", "guide_window": None, "embedding": None}


def test_image_grid_layout():
    imgs = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    g = png.image_grid(imgs, nrow=2, scale=2, pad=1)
    assert g.shape == (2 * (4 + 1) + 1, 2 * (4 + 1) + 1)
    assert (g[1:5, 1:5] == np.kron(imgs[0, :, :, 0], np.ones((2, 2), np.uint8))).all()
    assert (g[6:10, 1:5] == np.kron(imgs[2, :, :, 0], np.ones((2, 2), np.uint8))).all()
