"""AutoAttack as the field runs it (cdp_fast.robust.autoattack, evaluate(..., version=,
state_path=, aa_log=)): attack by attack it gives the flags of one pyautoattack call; a run
interrupted after its first attack resumes from its state folder to the numbers (and log) of an
uninterrupted run without rerunning what was done; a state written for other settings or data is
refused; the CLI's numbers are the API's."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cdp_fast
from cdp_fast.robust import autoattack as aa
from cdp_fast.robust.evaluation import autoattack_accuracy

pyaa = pytest.importorskip("pyautoattack")


def _problem(n=24, seed=0):
    """A 10-class linear model on 1x4x4 images (AutoAttack is fast on it) and points that some
    attacks break and some do not."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 16, generator=g))
        model[1].bias.copy_(0.1 * torch.randn(10, generator=g))
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10                        # some misclassified points
    return model.eval(), x, y.detach()


@pytest.mark.parametrize("norm,eps,version,attacks", [
    ("linf", 0.05, "custom", ("apgd-ce", "apgd-dlr", "apgd-t")),
    ("l2", 0.3, "custom", ("apgd-ce", "fab-t")),
    pytest.param("l1", 0.3, "custom", ("apgd-ce", "apgd-t"), marks=pytest.mark.slow),
])
def test_attack_by_attack_is_one_pyautoattack_call(norm, eps, version, attacks):
    model, x, y = _problem()
    adv = pyaa.AutoAttack(model, attacks=list(attacks), eps=eps, norm=aa._PYAA_NORM[norm], seed=0,
                          version=version)
    adv.verbose = False
    _, y_adv = adv.run_standard_evaluation(x, y, batch_size=10)
    ref = (y_adv == y).double().mean().item()
    got = autoattack_accuracy(model, x, y, eps=eps, norm=norm, version=version, attacks=attacks,
                              batch_size=10)
    assert got == ref
    assert 0 < got < (model(x).argmax(1) == y).double().mean().item()   # attacks bite, not all


def _kw(state, **extra):
    return dict(eps=0.05, attacks=("clean", "autoattack"), version="custom",
                aa_attacks=("apgd-ce", "apgd-t"), batch_size=10, state_path=state, aa_log=True, **extra)


def test_interrupted_evaluation_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    model, x, y = _problem(n=25)
    full = cdp_fast.evaluate(model, x, y, **_kw(None))
    assert [e["attack"] for e in full["autoattack_log"]] == ["clean", "apgd-ce", "apgd-t"]
    accs = [e["robust_accuracy"] for e in full["autoattack_log"]]
    assert accs[0] == full["clean"] and accs[-1] == full["autoattack"] and accs == sorted(accs, reverse=True)
    assert accs[1] > accs[2]                        # the second attack matters here

    state = tmp_path / "aa"
    cls = pyaa.autopgd_base.APGDAttack_targeted

    def killed(self, *a, **k):
        raise KeyboardInterrupt                     # as a kill during the second attack

    with monkeypatch.context() as m:
        m.setattr(cls, "perturb", killed)
        with pytest.raises(KeyboardInterrupt):
            cdp_fast.evaluate(model, x, y, **_kw(state))
    blocks = sorted(state.glob("block-*.json"))
    assert len(blocks) == 3 and all(json.loads(b.read_text())["done"] == ["apgd-ce"] for b in blocks)
    assert [e["attack"] for e in json.loads((state / "log.json").read_text())] == ["clean", "apgd-ce"]

    calls = []
    orig = pyaa.autopgd_base.APGDAttack.perturb
    monkeypatch.setattr(pyaa.autopgd_base.APGDAttack, "perturb",
                        lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    resumed = cdp_fast.evaluate(model, x, y, **_kw(state))
    assert calls == []                              # apgd-ce was not run again
    strip = lambda r: {**r, "autoattack_log": [{**e, "seconds": 0} for e in r["autoattack_log"]]}  # noqa: E731
    assert strip(resumed) == strip(full)
    assert json.loads((state / "log.json").read_text())[-1]["robust_accuracy"] == full["autoattack"]
    again = cdp_fast.evaluate(model, x, y, **_kw(state))   # everything done: read back, same
    assert strip(again) == strip(full)


def test_state_of_another_run_is_refused(tmp_path):
    model, x, y = _problem(n=12)
    state = tmp_path / "aa"
    cdp_fast.evaluate(model, x, y, **_kw(state))
    for kw, key in ((dict(eps=0.06), "eps"), (dict(norm="l2"), "norm"), (dict(seed=1), "seed"),
                    (dict(aa_attacks=("apgd-ce",)), "attacks")):
        with pytest.raises(ValueError, match=f"state_path: .* {key}="):
            cdp_fast.evaluate(model, x, y, **{**_kw(state), **kw})
    with pytest.raises(ValueError, match="data_sha256"):
        cdp_fast.evaluate(model, x.flip(0), y.flip(0), **_kw(state))
    with torch.no_grad():
        model[1].bias.add_(0.01)
    with pytest.raises(ValueError, match="model_sha256"):
        cdp_fast.evaluate(model, x, y, **_kw(state))
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        cdp_fast.evaluate(model, x, y, **_kw(tmp_path / "f"))
    with pytest.raises(ValueError, match="twice"):
        cdp_fast.evaluate(model, x, y, **{**_kw(None), "aa_attacks": ("apgd-ce", "apgd-ce")})


def test_state_of_another_pyautoattack_version_is_refused(tmp_path, monkeypatch):
    """A state written under one pyautoattack version is refused after an upgrade (its attacks
    may differ), naming the setting; the same version resumes."""
    model, x, y = _problem(n=6)
    state = tmp_path / "aa"
    kw = {**_kw(state), "aa_attacks": ("apgd-ce",)}
    first = cdp_fast.evaluate(model, x, y, **kw)
    saved = json.loads(next(state.glob("block-*.json")).read_text())["config"]["pyautoattack"]
    assert saved == aa._pyaa_version() is not None
    assert cdp_fast.evaluate(model, x, y, **kw)["autoattack"] == first["autoattack"]
    monkeypatch.setattr(aa, "_pyaa_version", lambda: "99.0.0")
    with pytest.raises(ValueError, match=rf"state_path: .* pyautoattack={saved!r}, this evaluation has "
                                         r"pyautoattack='99\.0\.0'"):
        cdp_fast.evaluate(model, x, y, **kw)


@pytest.mark.slow
def test_cli_and_api_agree(tmp_path, capsys):
    from cdp_fast import cli
    from cdp_fast.cli import specs

    out, state = tmp_path / "r.json", tmp_path / "state"
    argv = ["eval", "--arch", "digits", "--n", "12", "--eps", "0.5", "--norm", "l2",
            "--attacks", "clean,pgd,autoattack", "--version", "custom", "--aa-attacks", "apgd-ce,apgd-t",
            "--state-path", str(state), "--json", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "autoattack after apgd-t" in printed
    got = json.loads(out.read_text())
    model = specs.classifier_for_arch("digits", 10, trained_digits=True).eval()
    x, y = specs.load_train_data("digits", "test")
    api = cdp_fast.evaluate(model, x[:12], y[:12], eps=0.5, norm="l2", version="custom",
                            aa_attacks=("apgd-ce", "apgd-t"), aa_log=True)
    for k in ("clean", "pgd", "autoattack"):
        assert got[k] == api[k]
    assert [e["robust_accuracy"] for e in got["autoattack_log"]] == \
        [e["robust_accuracy"] for e in api["autoattack_log"]]
    assert (state / "log.json").exists()
    capsys.readouterr()
    assert cli.main(["eval", "--arch", "digits", "--n", "4", "--aa-attacks", "apgd-ce"]) == 2   # no --version custom
    assert "aa_attacks is only used with version='custom'" in capsys.readouterr().err
