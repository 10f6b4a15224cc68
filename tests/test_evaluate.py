"""evaluate(): clean / PGD / AutoAttack accuracies against closed forms on a linear model, where
the exact L∞ robust accuracy is known, plus input forms, n_ex, modes and argument checks."""
import pytest
import torch
from torch import nn

import cdp_fast


class _Linear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _linear_problem(n=60, k=10, eps=0.05, seed=0):
    """A 10-class linear model on 1x4x4 images in [eps, 1 - eps] (so the [0, 1] box never
    binds). Exact L∞ robust accuracy: x is robust iff for every j != y
        (w_y - w_j)·x + b_y - b_j > eps · ||w_y - w_j||_1
    (the worst δ for the pair (y, j) is -eps·sign(w_y - w_j)); points within 1e-3 of a
    decision boundary are dropped so the numbers are not at the mercy of rounding."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, 16, generator=g)
    b = torch.randn(k, generator=g) * 0.1
    x = eps + (1 - 2 * eps) * torch.rand(4 * n, 1, 4, 4, generator=g)
    logits = x.flatten(1) @ w.T + b
    y = logits.argmax(1)
    flip = torch.rand(len(x), generator=g) < 0.1          # some misclassified points
    y = torch.where(flip, (y + 1) % k, y)
    wd = w[y][:, None, :] - w[None, :, :]                  # (N, K, 16): w_y - w_j
    m = (logits.gather(1, y[:, None]) - logits)            # clean margins (N, K)
    rm = m - eps * wd.abs().sum(-1)
    rm[torch.arange(len(x)), y] = float("inf")
    cm = m.clone()
    cm[torch.arange(len(x)), y] = float("inf")
    keep = (rm.min(1).values.abs() > 1e-3) & (cm.min(1).values.abs() > 1e-3)
    x, y = x[keep][:n], y[keep][:n]
    robust = (rm[keep][:n].min(1).values > 0).double().mean().item()
    clean = (cm[keep][:n].min(1).values > 0).double().mean().item()
    return _Linear(w, b).eval(), x, y, clean, robust


def test_clean_pgd_autoattack_against_the_exact_robust_accuracy():
    eps = 0.05
    model, x, y, clean, robust = _linear_problem(eps=eps)
    assert 0.1 < robust < clean          # the problem is not degenerate
    res = cdp_fast.evaluate(model, x, y, eps=eps, pgd_steps=20, batch_size=16)
    assert set(res) == {"clean", "pgd", "autoattack"}
    assert all(isinstance(v, float) for v in res.values())
    assert res["clean"] == pytest.approx(clean)
    # AutoAttack's targeted APGD tries every target class: exact on a linear model.
    assert res["autoattack"] == pytest.approx(robust)
    # Untargeted PGD-CE is an upper bound on the robust accuracy and below clean.
    assert robust <= res["pgd"] <= res["clean"]


def test_pgd_is_exact_on_a_binary_linear_model():
    """Two classes: the CE gradient's sign is ±sign(w_1 - w_0) everywhere, so PGD reaches the
    worst corner of the ε-ball and its accuracy is the exact robust accuracy."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 16, generator=g)
    b = torch.zeros(2)
    eps = 0.05
    x = eps + (1 - 2 * eps) * torch.rand(200, 1, 4, 4, generator=g)
    s = (x.flatten(1) @ (w[1] - w[0]))
    y = (s > s.median()).long()
    margin = torch.where(y == 1, s, -s) - eps * (w[1] - w[0]).abs().sum()
    keep = margin.abs() > 1e-3
    x, y, margin = x[keep], y[keep], margin[keep]
    res = cdp_fast.evaluate(_Linear(w, b).eval(), x, y, eps=eps, attacks=("clean", "pgd"),
                            pgd_steps=10, pgd_step_size=eps / 2)
    assert res["pgd"] == pytest.approx((margin > 0).double().mean().item())


def test_custom_autoattack_input_forms_and_n_ex():
    eps = 0.05
    model, x, y, clean, robust = _linear_problem(n=40, eps=eps, seed=3)
    res = cdp_fast.evaluate(model, x, y, eps=eps, attacks=("autoattack",), version="custom",
                            aa_attacks=("apgd-t",))
    assert set(res) == {"autoattack"} and res["autoattack"] == pytest.approx(robust)
    # uint8 NHWC input == its float version; numpy labels accepted
    u8 = (x * 255).round().to(torch.uint8)
    xf = u8.float() / 255
    a = cdp_fast.evaluate(model, u8.permute(0, 2, 3, 1).numpy(), y.numpy(), attacks=("clean",))
    b = cdp_fast.evaluate(model, xf, y, attacks=("clean",))
    assert a == b
    # n_ex restricts every attack to the first n_ex points
    c = cdp_fast.evaluate(model, x, y, eps=eps, attacks=("clean", "pgd"), n_ex=7)
    d = cdp_fast.evaluate(model, x[:7], y[:7], eps=eps, attacks=("clean", "pgd"))
    assert c == d


def test_modes_restored_and_deterministic():
    torch.manual_seed(0)
    model = cdp_fast.models.SmallCNN(width=4, feature_dim=8).train()
    x = torch.rand(12, 1, 8, 8)
    y = torch.randint(0, 10, (12,))
    r1 = cdp_fast.evaluate(model, x, y, eps=0.1, attacks=("clean", "pgd"), batch_size=5)
    r2 = cdp_fast.evaluate(model, x, y, eps=0.1, attacks=("clean", "pgd"), batch_size=5)
    assert r1 == r2
    assert model.training and all(m.training for m in model.modules())


def test_bad_arguments():
    model, x, y, _, _ = _linear_problem(n=10)
    cases = [
        (dict(attacks=("fgsm",)), "attacks"), (dict(attacks=()), "attacks"),
        (dict(eps=-1.0), "eps"), (dict(pgd_steps=0), "pgd_steps"),
        (dict(batch_size=0), "batch_size"), (dict(n_ex=0), "n_ex"),
        (dict(attacks=("autoattack",), version="custom"), "aa_attacks"),
        (dict(attacks=("autoattack",), version="custom", aa_attacks=("pgd",)), "aa_attacks"),
        (dict(attacks=("autoattack",), version="quick"), "version"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            cdp_fast.evaluate(model, x, y, **kw)
    with pytest.raises(ValueError, match="x must be in"):
        cdp_fast.evaluate(model, x + 1, y)
    with pytest.raises(ValueError, match="y must"):
        cdp_fast.evaluate(model, x, y[:3])
    with pytest.raises(ValueError, match="model"):
        cdp_fast.evaluate(lambda t: t, x, y)


def test_pgd_randomness_is_per_point_so_batching_does_not_matter():
    """PGD's random start of point i comes from (seed, i) alone: the blocks of any batch size
    (and so any split over torch.distributed ranks, tests/test_distributed_train.py) give the
    same accuracy."""
    from cdp_fast.robust.evaluation import pgd_starts

    x = torch.rand(13, 1, 8, 8)
    assert torch.equal(pgd_starts(x[3:9], 3, seed=4), pgd_starts(x, 0, seed=4)[3:9])
    assert not torch.equal(pgd_starts(x, 0, seed=4), pgd_starts(x, 0, seed=5))
    # Linear problem, 2 short PGD steps: the start matters (measured PGD accuracy 0.75, 0.775,
    # 0.775, 0.65 for seeds 0..3), the batch size must not.
    model, x, y, _, _ = _linear_problem(n=40, eps=0.05)
    per_seed = []
    for seed in (0, 3):
        res = [cdp_fast.evaluate(model, x, y, eps=0.05, attacks=("clean", "pgd"), pgd_steps=2,
                                 pgd_step_size=0.01, batch_size=bs, seed=seed) for bs in (1, 7, 40)]
        assert res[0] == res[1] == res[2]
        per_seed.append(res[0]["pgd"])
    assert per_seed[0] != per_seed[1]
    # Importing the module (cdp_fast.robust.evaluation) leaves the public name a function.
    assert cdp_fast.evaluate is cdp_fast.robust.evaluation.evaluate
    assert cdp_fast.evaluate(model, x, y, eps=0.05, attacks=("clean",))["clean"] == res[0]["clean"]
    with pytest.raises(ValueError, match="distributed"):
        cdp_fast.evaluate(model, x, y, distributed="no")


def test_progress_bar_steps_through_every_attack_and_block_autoattack_included(capsys):
    """Issue 14: one bar step per (block, attack), the attack under way in the description, so
    a long AutoAttack block is named while it runs; nothing on stderr with progress=False."""
    eps = 0.05
    model, x, y, _, _ = _linear_problem(n=20, eps=eps, seed=2)
    kw = dict(eps=eps, attacks=("clean", "pgd", "autoattack"), version="custom",
              aa_attacks=("apgd-ce",), batch_size=10, pgd_steps=2)
    quiet = cdp_fast.evaluate(model, x, y, **kw)
    assert capsys.readouterr().err == ""
    shown = cdp_fast.evaluate(model, x, y, progress=True, **kw)
    err = capsys.readouterr().err
    assert shown == quiet
    for name in ("clean", "pgd", "autoattack"):
        assert f"evaluate: {name} block 2/2" in err, err
    assert "/6 " in err   # (the last refresh may fall within tqdm's mininterval)
