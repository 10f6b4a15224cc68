"""cdp_fast.robust.attacks: PGD (Madry et al. 2018) and the TRADES inner maximisation (Zhang et al.
2019), each checked against a literal transcription of the published loop written with the
plain PyTorch composite (no fused op), plus the properties the trainers rely on: the loss goes
up, the result stays in the ε-ball ∩ [0, 1], train/eval modes and parameter grads are left as
they were, torch.compile traces the loop. Gowal et al.'s variant (uniform start, train-mode
BatchNorm with frozen running statistics) against the formula and a hand computation.

Equality with the literal loops is exact: same model, same noise (same generator seed), same
elementwise step (the fused op is bitwise equal to the composite, tests/test_pgd_step.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdp_fast.ops import pgd_step as _ext
from cdp_fast.robust.attacks import pgd_attack, trades_attack
from cdp_fast.utils.runtime import eval_mode

EPS, ALPHA = 8 / 255, 2 / 255


@pytest.fixture(scope="session")
def ext():
    if not _ext.load_extension():
        pytest.fail(f"cdp_fast::pgd_step extension unavailable: {_ext.extension_error()}")


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def batch(n=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def in_ball(x_adv, x, eps):
    eps = eps.view(-1, 1, 1, 1) if isinstance(eps, torch.Tensor) else eps
    return bool(((x_adv - x).abs() <= eps + 1e-6).all() and (x_adv >= 0).all() and (x_adv <= 1).all())


def literal_pgd(model, x, y, eps, alpha, steps, generator):
    """Madry et al.'s loop as commonly written (composite step)."""
    x_adv = torch.clamp(x + (2 * torch.rand(x.shape, generator=generator) - 1) * eps, 0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + alpha * torch.sign(g)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def literal_trades(model, x, eps, alpha, steps, generator):
    """TRADES' public code (trades.py, l_inf branch), transcribed: eval mode, x + 0.001·N(0, I),
    KLDivLoss(size_average=False) against softmax(model(x)) recomputed every step."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, generator=generator)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1),
                               reduction="sum")
        (g,) = torch.autograd.grad(loss_kl, [x_adv])
        x_adv = x_adv.detach() + alpha * torch.sign(g.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def modes(model):
    return [m.training for m in model.modules()]


def test_pgd_matches_literal_loop_and_raises_loss(ext):
    model = tiny_cnn().eval()
    x, y = batch()
    x_adv = pgd_attack(model, x, y, eps=EPS, step_size=ALPHA, steps=5,
                       generator=torch.Generator().manual_seed(3))
    ref = literal_pgd(model, x, y, EPS, ALPHA, 5, torch.Generator().manual_seed(3))
    assert torch.equal(x_adv, ref)
    assert in_ball(x_adv, x, EPS) and not x_adv.requires_grad
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
    assert adv > clean + 0.01, (clean.item(), adv.item())


def test_pgd_options_and_state(ext):
    model = tiny_cnn().train()
    model[1].eval()  # a deliberately frozen BN inside a training model
    before = modes(model)
    bn_mean = model[1].running_mean.clone()
    x, y = batch(6)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    x_adv = pgd_attack(model, x, y, eps=eps, step_size=0.01, steps=3)
    assert in_ball(x_adv, x, eps)
    assert torch.equal(x_adv[0], x[0])  # ε = 0 leaves the sample alone
    assert modes(model) == before  # pgd_attack uses the model's mode as is and never changes it
    assert torch.equal(model[1].running_mean, bn_mean)
    assert all(p.grad is None for p in model.parameters())
    # steps = 0 returns the start: x itself without random start.
    assert torch.equal(pgd_attack(model, x, y, steps=0, random_start=False), x)
    # Same generator seed, same result.
    a = pgd_attack(model.eval(), x, y, steps=2, generator=torch.Generator().manual_seed(9))
    b = pgd_attack(model, x, y, steps=2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_trades_matches_public_code_and_restores_modes(ext):
    model = tiny_cnn()
    model.train()
    model[4].eval()  # dropout frozen by the user: must stay frozen, BN must go back to train
    before = modes(model)
    bn_mean, bn_var = model[1].running_mean.clone(), model[1].running_var.clone()
    x, _ = batch()
    x_adv = trades_attack(model, x, eps=EPS, step_size=ALPHA, steps=4,
                          generator=torch.Generator().manual_seed(5))
    assert modes(model) == before
    assert torch.equal(model[1].running_mean, bn_mean) and torch.equal(model[1].running_var, bn_var)
    assert all(p.grad is None for p in model.parameters())
    ref = literal_trades(model, x, EPS, ALPHA, 4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x_adv, ref, rtol=0, atol=0)
    assert in_ball(x_adv, x, EPS)
    with torch.no_grad(), eval_mode(model):
        p = F.softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
        x0 = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        kl_start = F.kl_div(F.log_softmax(model(x0), 1), p, reduction="sum")
    assert kl_adv > 10 * kl_start


def test_trades_restores_modes_on_error(ext):
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.BatchNorm2d(3), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        trades_attack(model, torch.rand(2, 3, 4, 4), eps=EPS, step_size=ALPHA)
    assert modes(model) == [True, True, True]


def test_trades_zero_steps_is_projected(ext):
    x = torch.rand(4, 3, 8, 8)
    x_adv = trades_attack(tiny_cnn(), x, eps=1e-4, step_size=ALPHA, steps=0)
    assert in_ball(x_adv, x, 1e-4)


def test_value_errors():
    model = tiny_cnn()
    x, y = batch(4)
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        pgd_attack(model, x, y, step_size=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        pgd_attack(model, x, y, steps=-1)
    with pytest.raises(ValueError, match="steps"):
        trades_attack(model, x, eps=EPS, step_size=ALPHA, steps=2.5)
    with pytest.raises(ValueError, match="loss"):
        pgd_attack(model, x, y, loss="cw")
    with pytest.raises(ValueError, match="y"):
        pgd_attack(model, x, y.float())
    with pytest.raises(ValueError, match="y"):
        pgd_attack(model, x, y[:2])
    with pytest.raises(ValueError, match="x"):
        pgd_attack(model, (x * 255).long(), y)
    with pytest.raises(ValueError, match="model"):
        trades_attack("not a model", x, eps=EPS, step_size=ALPHA)
    with pytest.raises(ValueError, match="eps"):
        pgd_attack(model, x, y, eps=torch.full((3,), 0.1), steps=1)


def test_compiled_attack_loops_match_eager(ext):
    """torch.compile(fullgraph=True) traces the whole attack (forward, autograd.grad, the fused
    op via register_fake). backend="aot_eager" keeps the test fast (the inductor path of the op
    itself is covered in test_pgd_step.py). Tracing autograd.grad needs
    torch._dynamo.config.trace_autograd_ops (recent torch); without it, dynamo graph-breaks
    there and the pieces are compiled (fullgraph=False)."""
    cfg = torch._dynamo.config
    full = hasattr(cfg, "trace_autograd_ops")
    patch = cfg.patch(trace_autograd_ops=True) if full else cfg.patch({})
    model = tiny_cnn()
    x, y = batch(6)
    with patch:
        model.eval()
        cpgd = torch.compile(pgd_attack, fullgraph=full, backend="aot_eager")
        out = cpgd(model, x, y, eps=EPS, step_size=ALPHA, steps=2, random_start=False)
        assert torch.equal(out, pgd_attack(model, x, y, steps=2, random_start=False))

        model.train()
        model[4].eval()
        before = modes(model)
        ctrades = torch.compile(trades_attack, fullgraph=full, backend="aot_eager")
        torch.manual_seed(3)  # generators cannot be traced: the global RNG is used
        out = ctrades(model, x, eps=EPS, step_size=ALPHA, steps=2)
        assert modes(model) == before
        torch.manual_seed(3)
        assert torch.equal(out, trades_attack(model, x, eps=EPS, step_size=ALPHA, steps=2))


# ------------------------------------------------------------------ Gowal et al.'s variant
def test_trades_uniform_start_is_uniform_in_the_ball_and_clamped(ext):
    """start="uniform" (gowal21uncovering/utils/trades.py: x + U(−ε, ε), then clamped to
    [0, 1]): with 0 steps the attack returns its start. Reference: the formula on the same
    draws; inside the ε-ball ∩ [0, 1]; away from the borders (δ / ε) is uniform on [−1, 1]
    (Kolmogorov–Smirnov distance below the 0.1 % critical value 1.95/√n); at black pixels
    the clamp puts about half of the starts exactly on 0, at white pixels on 1."""
    eps = 0.1
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(64, 3, 8, 8, generator=g)      # interior: x ± ε inside [0, 1]
    x[:, :, 0] = 0.0                                          # a black row, a white row
    x[:, :, 1] = 1.0
    model = tiny_cnn()
    x0 = trades_attack(model, x, eps=eps, step_size=ALPHA, steps=0, start="uniform",
                       generator=torch.Generator().manual_seed(7))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x0, torch.clamp(x + (2 * u - 1) * eps, 0, 1))
    assert in_ball(x0, x, eps)
    d = ((x0 - x) / eps)[:, :, 2:].flatten().double().sort().values
    n = d.numel()
    cdf = (d + 1) / 2
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.95 / n ** 0.5, ks
    assert abs(d.mean()) < 0.02 and abs(d.pow(2).mean() - 1 / 3) < 0.02
    black, white = x0[:, :, 0], x0[:, :, 1]
    assert (black >= 0).all() and (black <= eps).all() and (white >= 1 - eps).all()
    assert 0.45 < (black == 0).float().mean() < 0.55
    assert 0.45 < (white == 1).float().mean() < 0.55
    # The default stays Zhang et al.'s x + 0.001·N(0, I).
    z = trades_attack(model, x, eps=eps, step_size=ALPHA, steps=0,
                      generator=torch.Generator().manual_seed(7))
    assert (z - x).abs().max() < 0.01


def test_trades_train_mode_uses_batch_statistics_and_freezes_running_stats(ext):
    """mode="train" (gowal21uncovering/utils/trades.py: model.train() + track_bn_stats(False))
    on a model with one BatchNorm layer, float64, against a hand computation of the same
    attack in which the layer normalises with the statistics of the batch it sees —
    (z − mean_b z) / √(var_b z + ε_bn) · γ + β, biased variance over (batch, H, W) — for p(x)
    and for every step. The running statistics (set away from the batch's, so eval mode would
    differ) and num_batches_tracked are unchanged, modes and track_running_stats restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    bn = model[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    model.eval()
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps, alpha, steps = 0.1, 0.03, 3

    def f(z):   # the model with BatchNorm on batch statistics, by hand
        mu = z.mean(dim=(0, 2, 3), keepdim=True)
        var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (z - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) \
            + bn.bias.view(1, -1, 1, 1)
        return model[2](h.flatten(1))

    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = torch.clamp(x + (2 * u - 1) * eps, 0, 1)
    p = F.softmax(f(x), 1).detach()
    for _ in range(steps):
        ref.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(f(ref), 1), p, reduction="sum")
        (gr,) = torch.autograd.grad(kl, [ref])
        ref = ref.detach() + alpha * gr.sign()
        ref = torch.min(torch.max(ref, x - eps), x + eps).clamp(0, 1)
    got = trades_attack(model, x, eps=eps, step_size=alpha, steps=steps, start="uniform",
                        mode="train", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, b in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), stats):
        assert torch.equal(a, b)
    assert not model.training and bn.track_running_stats
    assert all(p.grad is None for p in model.parameters())
    # The mode matters here: eval mode (running statistics) gives another point.
    ev = trades_attack(model, x, eps=eps, step_size=alpha, steps=steps, start="uniform",
                       mode="eval", generator=torch.Generator().manual_seed(5))
    assert (ev - ref).abs().max() > 1e-3


def test_batch_stats_mode_restores_on_error_and_rejects_bad_options():
    from cdp_fast.robust.attacks import batch_stats_mode

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.BatchNorm2d(3), Boom()).eval()
    with pytest.raises(RuntimeError, match="boom"):
        trades_attack(model, torch.rand(2, 3, 4, 4), eps=EPS, step_size=ALPHA, mode="train")
    assert modes(model) == [False, False, False] and model[0].track_running_stats
    with batch_stats_mode(model):
        assert modes(model) == [True, True, True] and not model[0].track_running_stats
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="start"):
        trades_attack(tiny_cnn(), x, eps=EPS, step_size=ALPHA, start="gaussian")
    with pytest.raises(ValueError, match="mode"):
        trades_attack(tiny_cnn(), x, eps=EPS, step_size=ALPHA, mode="batch")


def test_attacks_do_not_ask_for_parameter_gradients(ext):
    """During PGD and the TRADES attack every parameter has requires_grad=False (a compiled
    backward would otherwise compute their gradients), and each flag is restored afterwards —
    also a parameter the caller had frozen."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 3)
            self.lin.bias.requires_grad_(False)            # frozen by the caller: stays so

        def forward(self, x):
            seen.append(any(p.requires_grad for p in self.parameters()))
            return self.lin(x.flatten(1))

    m = Spy()
    x = torch.rand(4, 3, 2, 2)
    y = torch.randint(0, 3, (4,))
    pgd_attack(m, x, y, eps=0.1, step_size=0.03, steps=2)
    trades_attack(m, x, eps=0.1, step_size=0.03, steps=2)
    assert seen and not any(seen)
    assert m.lin.weight.requires_grad and not m.lin.bias.requires_grad
