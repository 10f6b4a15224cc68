"""The reference losses against a loop-based, literal transcription of docs/design.md §4
(no log space, float64), values and gradients, masks included; and numerical safety."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from cdp_fast.guidance import losses

from cdp_fast.ops.contrastive import reference


def literal_hnm(a, p, k, tau, tau_plus, beta, in_batch, la=None, lk=None, infonce=False):
    """ℓ = mean_i −log(pos_i / (pos_i + Ng_i)), written with explicit loops over i and j."""
    a = a / a.norm(dim=1, keepdim=True)
    p = p / p.norm(dim=1, keepdim=True)
    k = a if in_batch else k / k.norm(dim=1, keepdim=True)
    if in_batch and la is not None:
        lk = la
    total = 0.0
    for i in range(a.shape[0]):
        pos = torch.exp(a[i] @ p[i] / tau)
        negs = []
        for j in range(k.shape[0]):
            if in_batch and j == i:
                continue
            if la is not None and la[i] == lk[j]:
                continue
            negs.append(torch.exp(a[i] @ k[j] / tau))
        if not negs:
            continue  # no negative: denominator is pos alone, ℓ_i = 0
        negs = torch.stack(negs)
        n_i = len(negs)
        if infonce:
            ng = negs.sum()
        else:
            imp = negs ** beta
            reweight = (imp * negs).sum() / imp.mean()
            ng = torch.maximum((-tau_plus * n_i * pos + reweight) / (1 - tau_plus),
                               torch.tensor(n_i * math.exp(-1 / tau), dtype=a.dtype))
        total = total + (-torch.log(pos / (pos + ng)))
    return total / a.shape[0]


@st.composite
def problems(draw):
    m = draw(st.integers(2, 9))
    d = draw(st.integers(1, 13))
    bank = draw(st.booleans())
    n = draw(st.integers(1, 11)) if bank else m
    labels = draw(st.booleans())
    ncls = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    tau = draw(st.sampled_from([0.2, 0.5, 1.0, 3.0, 10.0]))
    tau_plus = draw(st.sampled_from([0.0, 0.1, 0.5]))
    beta = draw(st.sampled_from([0.0, 1.0, 2.0]))
    return m, d, n, bank, labels, ncls, seed, tau, tau_plus, beta


@given(problems())
def test_hnm_and_infonce_match_literal_formula(prob):
    m, d, n, bank, labels, ncls, seed, tau, tau_plus, beta = prob
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d, generator=g, dtype=torch.float64)
    p = torch.randn(m, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64) if bank else None
    la = torch.randint(0, ncls, (m,), generator=g) if labels else None
    lk = (torch.randint(0, ncls, (n,), generator=g) if bank else la) if labels else None

    for infonce in (False, True):
        a1 = a.clone().requires_grad_()
        k1 = k.clone().requires_grad_() if bank else None
        if infonce:
            ours = reference.infonce_loss_ref(a1, p, k1, tau=tau, anchor_labels=la, candidate_labels=lk)
        else:
            ours = reference.hnm_loss_ref(a1, p, k1, tau=tau, tau_plus=tau_plus, beta=beta,
                                       anchor_labels=la, candidate_labels=lk)
        a2 = a.clone().requires_grad_()
        k2 = k.clone().requires_grad_() if bank else None
        ref = literal_hnm(a2, p, k2, tau, tau_plus, beta, not bank, la, lk, infonce=infonce)
        if not isinstance(ref, torch.Tensor):  # every row empty
            assert ours.item() == 0.0
            continue
        # float64 both sides; the only difference is log-space vs direct exp: ~1e-12
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-7, atol=1e-9)
        if bank:
            torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-7, atol=1e-9)


def test_positive_is_detached_and_negatives_get_gradient():
    a = torch.randn(6, 5, requires_grad=True)
    p = torch.randn(6, 5, requires_grad=True)
    k = torch.randn(7, 5, requires_grad=True)
    losses.hnm_loss(a, p, k, tau=0.5, tau_plus=0.1, beta=1.0).backward()
    assert p.grad is None
    assert a.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


@given(st.sampled_from([0.05, 0.1, 1.0, 10.0]), st.sampled_from([2, 64, 2048]),
       st.integers(0, 1000), st.booleans())
def test_no_nan_or_inf(tau, d, seed, scale_up):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, d, generator=g) * (1e3 if scale_up else 1)
    a[1] = a[0]  # identical rows: s = 1 exactly
    a.requires_grad_()
    p = torch.randn(16, d, generator=g)
    labels = torch.tensor([0, 0] + [1] * 14)  # rows 2.. have only 2 negatives
    for kw in [dict(), dict(anchor_labels=labels)]:
        for fn in (lambda: losses.hnm_loss(a, p, tau=tau, tau_plus=0.1, beta=1.0, **kw),
                   lambda: losses.infonce_loss(a, p, tau=tau, **kw)):
            a.grad = None
            val = fn()
            val.backward()
            assert torch.isfinite(val) and torch.isfinite(a.grad).all()


def test_all_same_class_gives_zero_loss_and_zero_grad():
    a = torch.randn(5, 3, requires_grad=True)
    lab = torch.zeros(5, dtype=torch.long)
    val = losses.hnm_loss(a, a.detach(), tau=0.5, anchor_labels=lab)
    val.backward()
    assert val.item() == 0.0 and torch.count_nonzero(a.grad) == 0


@pytest.mark.parametrize("kw,name", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(tau=1.0, tau_plus=1.0), "tau_plus"),
    (dict(tau=1.0, tau_plus=-0.1), "tau_plus"), (dict(tau=1.0, beta=-1.0), "beta"),
])
def test_bad_hyperparameters(kw, name):
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match=name):
        losses.hnm_loss(a, a, **kw)


def test_batch_of_one_in_batch_negatives_rejected():
    a = torch.randn(1, 3)
    with pytest.raises(ValueError, match="batch_size"):
        losses.infonce_loss(a, a, tau=1.0)
