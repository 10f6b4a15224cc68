"""The demo in a reduced configuration: table structure, files, and that the numbers are
measured (they move with the seed), plus the PNG writer (decoded with Pillow)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from cdp_fast import demo  # noqa: E402

# AutoAttack has a large fixed cost per model (~7-17 s even on a handful of points), so the
# six-model fixture runs clean + PGD and one extra test covers the AutoAttack path.
TINY = dict(n_synthetic=16, epochs=1, attacks=("clean", "pgd"), test_n=24, real_n=64,
            sampling_steps=5, pgd_steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    events = []
    res = demo.run_demo(out=out, seeds=[0, 1], callback=events.append, **TINY)
    return res, out, events


def test_demo_structure_and_files(tiny_run):
    res, out, events = tiny_run
    assert list(res["conditions"]) == list(demo.CONDITIONS)
    for cond, row in res["conditions"].items():
        assert set(row) == set(TINY["attacks"])
        for a, cell in row.items():
            assert len(cell["values"]) == 2
            assert all(0.0 <= v <= 1.0 for v in cell["values"])
            assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
            assert cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
        # robust accuracy never exceeds clean accuracy (same model, same images)
        for v_clean, v_pgd in zip(row["clean"]["values"], row["pgd"]["values"]):
            assert v_pgd <= v_clean + 1e-9
    for name in ("results.json", "grid_ddim.png", "grid_cdp.png", "grid_pair.png", "synthetic_ddim.npz",
                 "synthetic_cdp.npz"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["conditions"] == json.loads(json.dumps(res["conditions"]))
    table = res["table"]
    lines = table.splitlines()
    assert len(lines) == 3 + len(demo.CONDITIONS)
    for c in demo.CONDITIONS:
        assert any(line.startswith(c) for line in lines)
    assert "±" in table
    assert {e["stage"] for e in events} == {"generated", "trained"}
    for m in ("ddim", "cdp"):
        st = res["synthetic"][m]
        assert st["n"] == 16 and sum(st["class_histogram"]) == 16


def test_demo_numbers_are_measured(tiny_run):
    """Different seeds give different numbers somewhere (not constants), and the same seed
    reproduces its numbers."""
    res, _, _ = tiny_run
    moved = any(len(set(cell["values"])) > 1 for row in res["conditions"].values() for cell in row.values())
    assert moved, res["conditions"]
    again = demo.run_demo(out=None, seeds=[1], **dict(TINY, attacks=("clean",)))
    for c in demo.CONDITIONS:
        assert again["conditions"][c]["clean"]["values"][0] == pytest.approx(res["conditions"][c]["clean"]["values"][1])


@pytest.mark.slow
def test_demo_autoattack_path(tmp_path):
    res = demo.run_demo(out=None, seeds=[0], conditions=("real+cdp",), **dict(TINY, attacks=("clean", "autoattack"),
                                                                                  test_n=16))
    cell = res["conditions"]["real+cdp"]
    assert list(res["conditions"]) == ["real+cdp"]
    assert 0.0 <= cell["autoattack"]["values"][0] <= cell["clean"]["values"][0]
    assert "apgd-ce+apgd-t" in res["table"]


def test_same_start_noise_for_ddim_and_cdp():
    """Guided and unguided sets start from the same x_T (same seed), as in the paper's Fig. 5:
    with λ = 0 the "cdp" set equals the "ddim" set exactly."""
    a = demo.generate("ddim", 8, steps=3)
    b = demo.generate("cdp", 8, steps=3, guidance={"lam": 0.0})
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    c = demo.generate("cdp", 8, steps=3)
    assert not np.array_equal(np.asarray(a.images), np.asarray(c.images))


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(out=None, seeds=[])
    with pytest.raises(ValueError, match="attacks"):
        demo.run_demo(out=None, attacks=("fgsm",))
    with pytest.raises(ValueError, match="eps"):
        demo.run_demo(out=None, eps=2.0)
    with pytest.raises(ValueError, match="conditions"):
        demo.run_demo(out=None, conditions=("real+gan",))


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
    demo.write_png(tmp_path / "x.png", img)
    back = _read_png(tmp_path / "x.png")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back.reshape(img.shape), img)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="uint8"):
        demo.write_png(tmp_path / "y.png", img.astype(np.float32))


def test_save_grid_png_pixels_round_trip(tmp_path):
    """The file holds exactly image_grid's array, grey (C=1) and RGB (C=3)."""
    rng = np.random.default_rng(1)
    for c in (1, 3):
        imgs = rng.integers(0, 256, (5, 3, 4, c), dtype=np.uint8)
        demo.save_grid_png(tmp_path / f"g{c}.png", imgs, nrow=2, scale=3)
        back = _read_png(tmp_path / f"g{c}.png")
        np.testing.assert_array_equal(back, demo.image_grid(imgs, nrow=2, scale=3))


def test_png_without_pillow_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"cdp_fast\[demo\]"):
        demo.write_png(tmp_path / "x.png", np.zeros((2, 2), np.uint8))
    assert not (tmp_path / "x.png").exists()


def test_digits_presets_live_with_the_digits_models():
    from cdp_fast.models import digits

    assert demo.DIGITS_GUIDANCE is digits.DIGITS_GUIDANCE
    assert demo.DIGITS_SAMPLING is digits.DIGITS_SAMPLING
    assert digits.DIGITS_GUIDANCE["hnm"] == {"lam": 10_000.0, "tau": 10.0, "tau_plus": 0.1, "beta": 1.0,
                                             "form": "anchors", "guide_window": None, "embedding": None}


def test_image_grid_layout():
    imgs = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    g = demo.image_grid(imgs, nrow=2, scale=2, pad=1)
    assert g.shape == (2 * (4 + 1) + 1, 2 * (4 + 1) + 1)
    assert (g[1:5, 1:5] == np.kron(imgs[0, :, :, 0], np.ones((2, 2), np.uint8))).all()
    assert (g[6:10, 1:5] == np.kron(imgs[2, :, :, 0], np.ones((2, 2), np.uint8))).all()
    assert torch.is_tensor(torch.as_tensor(g))
