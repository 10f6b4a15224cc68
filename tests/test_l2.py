"""L2 threat model end to end: the L2 PGD step against a per-example float64 transcription of its
formula (Hypothesis-drawn shapes and values) and its gradients, the L2 random start (uniform in
the ball), L2 PGD / TRADES against the loss and TRADES' public ``l_2`` loop, training with
norm="l2" (TRADES, PGD-AT, checkpoint configuration), evaluate's PGD-L2 and AutoAttack-L2
against the exact robust accuracy of a binary linear model, the CLI flag and the refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cdp_fast
from cdp_fast.robust.attacks import (_start_from_draws, pgd_attack, pgd_from_draws, pgd_step_l2,
                                     trades_attack)
from cdp_fast.models import SmallCNN


def _formula(xa, g, x, alpha, eps):
    """pgd_step_l2 written from its docstring, one example at a time, float64 Python sums."""
    out = torch.empty_like(xa)
    for i in range(len(xa)):
        gi = g[i].flatten().tolist()
        gn = math.sqrt(sum(v * v for v in gi))
        d = [v / gn if gn > 0 else 0.0 for v in gi]
        a = float(alpha[i]) if isinstance(alpha, torch.Tensor) else alpha
        e = float(eps[i]) if isinstance(eps, torch.Tensor) else eps
        xi, xai = x[i].flatten().tolist(), xa[i].flatten().tolist()
        delta = [min(max(xv + a * dv, 0.0), 1.0) - x0 for xv, dv, x0 in zip(xai, d, xi)]
        dn = math.sqrt(sum(v * v for v in delta))
        f = e / dn if dn > e else 1.0
        out[i] = torch.tensor([min(max(x0 + v * f, 0.0), 1.0) for x0, v in zip(xi, delta)],
                              dtype=xa.dtype).reshape(xa[i].shape)
    return out


shapes = st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 7), st.integers(1, 6))


@given(shape=shapes, alpha=st.floats(0, 2), eps=st.floats(0, 2), seed=st.integers(0, 2**31 - 1),
       zero_rows=st.booleans(), per_sample=st.booleans())
def test_l2_step_is_the_formula_and_stays_in_the_ball(shape, alpha, eps, seed, zero_rows, per_sample):
    g0 = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g0, dtype=torch.float64)
    xa = (x + 0.3 * torch.randn(shape, generator=g0, dtype=torch.float64)).clamp(0, 1)
    g = torch.randn(shape, generator=g0, dtype=torch.float64) * 10.0 ** torch.randint(-6, 3, (1,), generator=g0)
    if zero_rows:
        g[0] = 0.0                                  # zero gradient: no step, never NaN
    a, e = alpha, eps
    if per_sample:
        a = torch.rand(shape[0], generator=g0, dtype=torch.float64) * alpha
        e = torch.rand(shape[0], generator=g0, dtype=torch.float64) * eps
    y = pgd_step_l2(xa, g, x, step_size=a, eps=e)
    torch.testing.assert_close(y, _formula(xa, g, x, a, e), rtol=0, atol=1e-12)
    e_row = e if isinstance(e, torch.Tensor) else torch.full((shape[0],), e, dtype=torch.float64)
    assert ((y - x).flatten(1).norm(dim=1) <= e_row * (1 + 1e-12) + 1e-12).all()
    assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()
    if zero_rows:
        # no step on row 0: x_adv clamped, then projected (alpha plays no part)
        torch.testing.assert_close(y[:1], pgd_step_l2(xa[:1], g[:1], x[:1], step_size=0.0,
                                                       eps=e if not per_sample else e[:1]))


def test_l2_step_gradients_and_low_precision():
    """Differentiable where it is smooth (no clamp active, inside and outside the ball):
    gradcheck in float64; bf16 / fp16 compute in float32 and round once."""
    g0 = torch.Generator().manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(3, 2, 3, 3, generator=g0, dtype=torch.float64)
    xa = x + 0.01 * torch.randn(x.shape, generator=g0, dtype=torch.float64)
    g = torch.randn(x.shape, generator=g0, dtype=torch.float64)
    for eps in (0.02, 1.0):   # the ball binds / does not bind
        assert torch.autograd.gradcheck(
            lambda a, b, c: pgd_step_l2(a, b, c, step_size=0.05, eps=eps),
            (xa.clone().requires_grad_(), g.clone().requires_grad_(), x.clone().requires_grad_()))
    for dt in (torch.bfloat16, torch.float16):
        y = pgd_step_l2(xa.to(dt), g.to(dt), x.to(dt), step_size=0.05, eps=0.02)
        ref = pgd_step_l2(xa.to(dt).float(), g.to(dt).float(), x.to(dt).float(), step_size=0.05, eps=0.02)
        assert y.dtype == dt and torch.equal(y, ref.to(dt))


def test_l2_random_start_is_uniform_in_the_ball():
    """(‖δ‖/ε)^D ~ U(0, 1) (mean 1/2, variance 1/12) and the direction has mean 0, when the box
    does not bind; with the box binding the start is clipped into [0, 1] and stays in the ball."""
    x = torch.full((4000, 1, 4, 4), 0.5)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    d = _start_from_draws(x, u, 0.3, "l2") - x
    n = d.flatten(1).norm(dim=1)
    assert n.max() <= 0.3 * (1 + 1e-6)
    v = (n.double() / 0.3) ** 16
    assert abs(v.mean() - 0.5) < 0.02 and abs(v.var() - 1 / 12) < 0.01   # 4000 draws: SE ~0.005
    assert (d.flatten(1) / n[:, None]).mean(0).abs().max() < 0.03
    xb = torch.rand(50, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    s = _start_from_draws(xb, torch.rand(xb.shape), torch.full((50,), 2.0), "l2")
    assert s.min() >= 0 and s.max() <= 1 and ((s - xb).flatten(1).norm(dim=1) <= 2.0 + 1e-5).all()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 10)).eval()


def _batch(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_l2_pgd_raises_the_loss_and_matches_its_draws_form():
    model, (x, y) = _cnn(), _batch()
    with torch.no_grad():
        model[-1].weight.mul_(10.0)                   # confident logits: the loss can move
    eps = 0.5
    ce = lambda t: F.cross_entropy(model(t), y).item()   # noqa: E731
    xa = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm="l2",
                    generator=torch.Generator().manual_seed(3))
    start = pgd_attack(model, x, y, eps=eps, step_size=eps / 4, steps=0, norm="l2",
                       generator=torch.Generator().manual_seed(3))
    assert ce(xa) > ce(start) > 0 and ce(xa) > ce(x) + 0.5
    assert ((xa - x).flatten(1).norm(dim=1) <= eps + 1e-5).all() and xa.min() >= 0 and xa.max() <= 1
    # an L2 attack moves far more than ε per pixel somewhere (it is not an L∞ attack)
    assert (xa - x).abs().max() > eps / 8 * 1.5
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xa, pgd_from_draws(model, x, y, u, eps=eps, step_size=eps / 4, steps=10, norm="l2"))
    assert torch.equal(pgd_attack(model, x, y, norm="L2", generator=torch.Generator().manual_seed(3)),
                       pgd_attack(model, x, y, norm="l2", generator=torch.Generator().manual_seed(3)))


def test_l2_trades_is_the_public_l2_loop():
    """TRADES' ``distance='l_2'`` branch (trades.py; also DM-Improves-AT core/utils/trades.py),
    transcribed: δ = 0.001·N(0, I), SGD on −KL with the gradient normalised per example and lr
    2ε/k, clamp, renorm_(p=2, maxnorm=ε) (its 1e-7 in the divisor: tolerance 1e-5)."""
    model, (x, _) = _cnn(), _batch()
    eps, k = 0.5, 5
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    delta = (0.001 * noise).requires_grad_(True)
    opt = torch.optim.SGD([delta], lr=eps / k * 2)
    p_nat = F.softmax(model(x), dim=1).detach()
    for _ in range(k):
        opt.zero_grad()
        loss = -F.kl_div(F.log_softmax(model(x + delta), dim=1), p_nat, reduction="sum")
        loss.backward()
        gn = delta.grad.view(len(x), -1).norm(p=2, dim=1)
        delta.grad.div_(gn.view(-1, 1, 1, 1))
        opt.step()
        delta.data.add_(x)
        delta.data.clamp_(0, 1).sub_(x)
        delta.data.renorm_(p=2, dim=0, maxnorm=eps)
    literal = torch.clamp(x + delta.detach(), 0, 1)
    ours = trades_attack(model, x, eps=eps, step_size=2 * eps / k, steps=k, norm="l2",
                         generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, literal, rtol=0, atol=1e-5)
    uni = trades_attack(model, x, eps=eps, step_size=0.1, steps=0, norm="l2", start="uniform")
    assert ((uni - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()


_FAST = dict(epochs=1, eps=0.5, step_size=0.25, steps=2, batch_size=16, progress=False,
             steps_per_epoch=2, augment=False, ema=None)


def test_trades_and_pgd_at_train_with_l2_and_the_norm_is_in_the_checkpoint(tmp_path):
    x, y = _batch(32)
    seen = []
    for train in (cdp_fast.train_trades, cdp_fast.train_pgd_at):
        torch.manual_seed(0)
        m = train(SmallCNN(width=4, feature_dim=8), (x, y), norm="l2", **_FAST)
        assert math.isfinite(m.history[0]["loss"])
        seen.append(m.history[0]["loss"])
    torch.manual_seed(0)
    linf = cdp_fast.train_trades(SmallCNN(width=4, feature_dim=8), (x, y), **_FAST)
    assert linf.history[0]["loss"] != seen[0]          # the norm reaches the inner attack
    ckpt = tmp_path / "c.pt"
    cdp_fast.train_trades(SmallCNN(width=4, feature_dim=8), (x, y), norm="l2", checkpoint=ckpt, **_FAST)
    with pytest.raises(ValueError, match="norm"):
        cdp_fast.train_trades(SmallCNN(width=4, feature_dim=8), (x, y), checkpoint=ckpt,
                              **{**_FAST, "epochs": 2})
    for bad in ("l1", "linf2", None):
        with pytest.raises(ValueError, match="norm"):
            cdp_fast.train_trades(SmallCNN(width=4, feature_dim=8), (x, y), norm=bad, **_FAST)


def _binary_linear(eps, n=200, seed=1):
    """Two classes, linear: the CE gradient is ±(w₁ − w₀) everywhere, so L2 PGD walks straight to
    the worst point of the ball and the exact L2 robust accuracy is mean(margin − ε‖w₁ − w₀‖₂ > 0)
    (x in [ε, 1 − ε]: the box never binds)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 16, generator=g)
    x = eps + (1 - 2 * eps) * torch.rand(n, 1, 4, 4, generator=g)
    s = x.flatten(1) @ (w[1] - w[0])
    y = (s > s.median()).long()
    margin = torch.where(y == 1, s, -s) - eps * (w[1] - w[0]).norm()
    keep = margin.abs() > 1e-3
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.zero_()
    return model.eval(), x[keep], y[keep], (margin[keep] > 0).double().mean().item()


def test_evaluate_l2_pgd_and_autoattack_are_exact_on_a_binary_linear_model():
    eps = 0.2
    model, x, y, robust = _binary_linear(eps)
    assert 0.1 < robust < 0.9
    res = cdp_fast.evaluate(model, x, y, eps=eps, norm="l2", pgd_steps=10, pgd_step_size=eps / 2,
                            version="custom", aa_attacks=("apgd-ce",), batch_size=64)
    assert res["pgd"] == pytest.approx(robust) and res["autoattack"] == pytest.approx(robust)
    linf = cdp_fast.evaluate(model, x, y, eps=eps, attacks=("pgd",), pgd_steps=10, pgd_step_size=eps / 2)
    assert linf["pgd"] < res["pgd"]                    # the L∞ ball of the same ε is far larger
    for kw, name in ((dict(norm="l3"), "norm"), (dict(norm="l1"), "L1 has no PGD")):
        with pytest.raises(ValueError, match=name):
            cdp_fast.evaluate(model, x, y, eps=eps, **kw)
    l1 = cdp_fast.evaluate(model, x[:20], y[:20], eps=eps, norm="l1", attacks=("autoattack",),
                           version="custom", aa_attacks=("apgd-ce",))
    assert 0.0 <= l1["autoattack"] <= 1.0


def test_cli_norm_flags(tmp_path, capsys):
    from cdp_fast import cli

    out = tmp_path / "w.pt"
    assert cli.main(["train", "--data", "digits", "--epochs", "1", "--steps", "1", "--batch-size", "512",
                     "--norm", "l2", "--eps", "0.5", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert "TRADES l2 eps=0.5" in capsys.readouterr().out
    assert cli.main(["eval", "--weights", str(out), "--n", "20", "--norm", "L2", "--eps", "0.5",
                     "--attacks", "clean,pgd", "--no-progress"]) == 0
    for argv in (["train", "--norm", "l1", "--out", str(out)], ["eval", "--norm", "l3"],
                 ["eval", "--arch", "digits", "--norm", "l1", "--attacks", "pgd"]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "norm" in err and err.count("\n") == 1, err
