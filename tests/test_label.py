"""Pseudo-labels and the selection criteria (paper App. D.3) against direct, loop-based
computations on tiny models: softmax/argmax, per-sample gradient norms by a Python loop of
autograd.grad (vs the torch.func version), class centroids by hand, top-K per class."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cdp_fast
from cdp_fast.robust.attacks import trades_attack
from cdp_fast.label import CRITERIA, attack_generator, per_sample_grad_norm, pseudo_label, scores, select
from cdp_fast.models import SmallCNN, WideResNet


def _model(kind="cnn"):
    torch.manual_seed(0)
    if kind == "cnn":
        return SmallCNN(width=4, feature_dim=8).eval()
    m = WideResNet(num_classes=10, depth=10, width=1, in_channels=1, mean=0.5, std=0.5)
    # Non-trivial BatchNorm statistics, so eval-mode buffers matter in the functional call.
    m.train()
    with torch.no_grad():
        m(torch.rand(16, 1, 8, 8))
        m.logits.weight.mul_(20.0)   # input-dependent logits (the fresh head is near-constant)
    return m.eval()


def _images(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 255.0


def _loop_grad_norm(model, x, y, x_adv=None, beta=6.0):
    out = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(x)):
        ln = model(x[i:i + 1])
        loss = F.cross_entropy(ln, y[i:i + 1])
        if x_adv is not None:
            la = model(x_adv[i:i + 1])
            p = ln.softmax(1)
            loss = loss + beta * (p * (ln.log_softmax(1) - la.log_softmax(1))).sum()
        gs = torch.autograd.grad(loss, params)
        out.append(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))
    return torch.stack(out)


def test_pseudo_label_matches_softmax_in_every_input_form():
    m = _model()
    x = _images()
    with torch.no_grad():
        p = m(x).softmax(1)
    ent = -(p * p.log()).sum(1)
    for images in (x, (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                   cdp_fast.Samples((x * 2 - 1).numpy())):
        out = pseudo_label(m, images, batch_size=5)
        assert out["label"].dtype == np.int64
        np.testing.assert_array_equal(out["label"], p.argmax(1).numpy())
        np.testing.assert_allclose(out["confidence"], p.max(1).values.numpy(), rtol=1e-5)
        np.testing.assert_allclose(out["entropy"], ent.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "wrn"])
def test_grad_norm_torch_func_matches_loop(kind):
    m = _model(kind)
    x = _images(7)
    y = torch.arange(7) % 10
    ref = _loop_grad_norm(m, x, y)
    got = per_sample_grad_norm(m, x, y, chunk_size=3)
    # fp32 gradients summed in different orders: relative 1e-4.
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-7)
    xa = torch.rand_like(x)                      # far from x: a visible KL term
    ref_r = _loop_grad_norm(m, x, y, x_adv=xa, beta=6.0)
    got_r = per_sample_grad_norm(m, x, y, x_adv=xa, beta=6.0, chunk_size=None)
    torch.testing.assert_close(got_r.double(), ref_r, rtol=1e-4, atol=1e-7)
    assert (got_r.double() - ref).abs().max() > 1e-2   # the robust term matters


def test_scores_against_direct_computations():
    m = _model()
    x = _images(30, seed=2)
    labels = np.arange(30) % 3
    with torch.no_grad():
        p = m(x).softmax(1)
        feats = m.features(x).double()
    # given labels (SEL1/SEL2): entropy, + log K + 1 where the argmax disagrees; p of the label
    disagree = (p.argmax(1).numpy() != labels)
    s, lab = scores(x, "entropy", classifier=m, labels=labels)
    np.testing.assert_allclose(s, (-(p * p.log()).sum(1)).numpy() + disagree * (np.log(p.shape[1]) + 1),
                               rtol=1e-4)
    np.testing.assert_array_equal(lab, labels)
    s, _ = scores(x, "confidence", classifier=m, labels=labels)
    np.testing.assert_allclose(s, p[torch.arange(30), torch.from_numpy(labels)].numpy(), rtol=1e-5)
    s, _ = scores(x, "confidence", classifier=m)          # pseudo-labels: the max softmax
    np.testing.assert_allclose(s, p.max(1).values.numpy(), rtol=1e-5)
    s, _ = scores(x, "grad_norm", classifier=m, labels=labels, batch_size=8)
    np.testing.assert_allclose(s, _loop_grad_norm(m, x, torch.from_numpy(labels)).numpy(),
                               rtol=1e-4)
    # robust: the attack of batch b is seeded by attack_generator(seed, b)
    s, _ = scores(x, "robust_grad_norm", classifier=m, labels=labels, batch_size=8, eps=0.1,
                  step_size=0.03, steps=3, seed=4)
    ref = []
    for b, i in enumerate(range(0, 30, 8)):
        xb = x[i:i + 8]
        xa = trades_attack(m, xb, eps=0.1, step_size=0.03, steps=3,
                           generator=attack_generator(4, b, "cpu"))
        ref.append(_loop_grad_norm(m, xb, torch.from_numpy(labels[i:i + 8]), x_adv=xa))
    np.testing.assert_allclose(s, torch.cat(ref).numpy(), rtol=1e-4)
    # separability: distance to the own class centroid, centroids by hand
    s, _ = scores(x, "separability", classifier=m, labels=labels, batch_size=7)
    ref = np.empty(30)
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        cen = feats[idx].mean(0)
        for i in idx:
            ref[i] = float((feats[i] - cen).norm())
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    # without labels the classifier's pseudo-labels define the classes
    _, lab = scores(x, "separability", classifier=m)
    np.testing.assert_array_equal(lab, p.argmax(1).numpy())


@pytest.mark.parametrize("criterion", CRITERIA)
def test_select_top_k_per_class(criterion):
    m = _model()
    x = _images(26, seed=5)
    labels = np.array([0] * 10 + [1] * 12 + [2] * 4)
    k = 5
    idx = select(x, criterion, k, classifier=m, labels=labels, steps=2, eps=0.05,
                 step_size=0.02, batch_size=9)
    s, _ = scores(x, criterion, classifier=m, labels=labels, steps=2, eps=0.05,
                  step_size=0.02, batch_size=9)
    assert idx.dtype == np.int64 and len(set(idx.tolist())) == len(idx)
    counts = {c: int((labels[idx] == c).sum()) for c in range(3)}
    assert counts == {0: 5, 1: 5, 2: 4}             # a short class keeps all its samples
    largest = criterion in ("confidence", "label_probability", "grad_norm", "robust_grad_norm")
    for c in range(3):
        chosen = idx[labels[idx] == c]
        rest = np.setdiff1d(np.flatnonzero(labels == c), chosen)
        key = -s if largest else s
        assert list(chosen) == sorted(chosen, key=lambda i: (key[i], i))   # best first
        if len(rest):
            assert key[chosen].max() <= key[rest].min()


def test_select_on_samples_returns_subset_and_checks_arguments():
    m = _model()
    x = _images(20, seed=6)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    samp = cdp_fast.Samples(u8, np.arange(20) % 4)
    idx, sub = select(samp, "entropy", 2, classifier=m)
    assert len(idx) == 8 and len(sub) == 8
    np.testing.assert_array_equal(sub.labels, samp.labels[idx])
    np.testing.assert_array_equal(np.asarray(sub.images), u8[idx])
    with pytest.raises(ValueError, match="criterion"):
        select(x, "loss", 2, classifier=m)
    with pytest.raises(ValueError, match="k_per_class"):
        select(x, "entropy", 0, classifier=m)
    with pytest.raises(ValueError, match="classifier"):
        select(x, "grad_norm", 2)
    with pytest.raises(ValueError, match="labels"):
        select(x, "entropy", 2, classifier=m, labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        pseudo_label(m, x, batch_size=0)
    with pytest.raises(ValueError, match="images"):
        pseudo_label(m, torch.zeros(3, 8, 8, dtype=torch.int32))
    # separability with explicit features and labels needs no classifier
    f = lambda t: t.flatten(1)  # noqa: E731
    idx = select(x, "separability", 3, features=f, labels=np.arange(20) % 2)
    assert len(idx) == 6


def test_pseudo_label_progress_counts_images(capsys):
    """Issue 14: `cdp-fast label` showed nothing while labelling; progress=True gives a bar
    over the images (rank 0 only), the same labels, and nothing on stderr by default."""
    m, x = _model(), _images()
    quiet = pseudo_label(m, x, batch_size=5)
    assert capsys.readouterr().err == ""
    shown = pseudo_label(m, x, batch_size=5, progress=True)
    err = capsys.readouterr().err
    assert "pseudo-label" in err and "/23 " in err
    for k in quiet:
        np.testing.assert_array_equal(quiet[k], shown[k])


def test_label_and_select_refuse_the_samplers_adapters(tmp_path):
    """pseudo_label / pseudo_label_to_npz / select give the classifier images in [0, 1]; an
    adapter made for the sampler (as_labeler / as_feature_extractor: it takes [-1, 1]) would
    map them a second time, so it is refused by name (cdp_fast.models.ranges)."""
    from cdp_fast.label import pseudo_label_to_npz
    from cdp_fast.models import as_labeler

    clf = _model()
    imgs = _images(8)
    wrapped = as_labeler(clf, input_range=(0, 1))
    with pytest.raises(ValueError, match=r"pseudo_label gives it images in \[0, 1\].*adapter's .model"):
        pseudo_label(wrapped, imgs)
    with pytest.raises(ValueError, match=r"pseudo_label gives it images in \[0, 1\]"):
        pseudo_label_to_npz(wrapped, imgs, tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"select gives it images in \[0, 1\]"):
        select(imgs, "confidence", 1, classifier=wrapped)
    assert pseudo_label(wrapped.model, imgs)["label"].shape == (8,)   # the classifier itself is fine
