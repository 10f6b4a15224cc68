"""Selection as DM-Improves-AT does it for class-conditional samples (issue 23, item 2 and F2):
score = p(stored label | x) ("label_probability"; "confidence" when labels exist), keep a top
fraction of every class (``top_fraction``, CLI ``--top-fraction``). Checked against a
line-by-line transcription of DM-Improves-AT's ``edm/select_1M.py`` loop, with a classifier
that disagrees with the stored labels, on the rounding of the fraction, per class, and on
refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cdp_fast import cli
from cdp_fast.data import Samples
from cdp_fast.label import pseudo_label, scores, select


class Disagreeing(nn.Module):
    """3 classes; logits (5.5 + u, v, v) for an image whose first two pixels are (u, v): p(class 0)
    ≈ 0.98 for every image, p(1) = p(2) ∝ e^v. The F2 repro: stored labels 1 / 2."""

    def forward(self, x):
        u, v = x[:, 0, 0, 0], x[:, 0, 0, 1]
        return torch.stack([5.5 + u, v, v], dim=1)


def _f2_set():
    # u rises while v falls: ranking by max softmax (p0) and by p(stored) are reversed.
    t = torch.linspace(0, 1, 6)
    x = torch.zeros(6, 1, 2, 2)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = t, 1 - t
    return x, np.array([1, 1, 1, 2, 2, 2])


@pytest.mark.parametrize("criterion", ["confidence", "label_probability"])
def test_F2_scores_are_p_of_the_stored_label(criterion):
    """F2 (issue 23): with stored labels 1/2 and a classifier that gives p(class 0) ≈ 0.98, the
    scores were ≈ 0.98 (max softmax) and the pick within a class the image the classifier
    most confidently puts in class 0; now p(stored label) ≈ 0.01 and the pick maximises it.
    (Checked to fail with the max-softmax rule: `confidence` fell back to it before c0c5e5b,
    `label_probability` did not exist.)"""
    x, stored = _f2_set()
    clf = Disagreeing()
    p = clf(x).softmax(1).detach()
    assert float(p[:, 0].min()) > 0.97                        # the classifier prefers class 0
    s, lab = scores(x, criterion, classifier=clf, labels=stored)
    np.testing.assert_array_equal(lab, stored)
    np.testing.assert_allclose(s, p[torch.arange(6), torch.from_numpy(stored)].numpy(), rtol=1e-5)
    assert s.max() < 0.02
    idx = select(x, criterion, 1, classifier=clf, labels=stored)
    # within each class the largest v (the first image): p(stored) highest, p0 lowest
    assert idx.tolist() == [0, 3]
    top = p.max(1).values.detach().numpy()
    max_softmax_pick = [int(np.argmax(top[c * 3:(c + 1) * 3])) + 3 * c for c in (0, 1)]
    assert max_softmax_pick == [2, 5] != idx.tolist()       # what the old rule kept


def test_label_probability_refuses_samples_without_labels():
    x, _ = _f2_set()
    with pytest.raises(ValueError, match="carry no labels: pass labels="):
        select(x, "label_probability", top_fraction=0.5, classifier=Disagreeing())
    with pytest.raises(ValueError, match="carry no labels"):
        select(Samples((x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()),
               "label_probability", 1, classifier=Disagreeing())


def _select_1m(probs: np.ndarray, labels: np.ndarray, top_scale: float) -> list:
    """DM-Improves-AT's edm/select_1M.py, transcribed: per class (files 0.npy, 1.npy, ... here
    the rows of that class in order), confidence = softmax[:, class], keep
    ``argsort(confidence)[::-1][:int(n * top_scale)]``."""
    kept = []
    for c in range(probs.shape[1]):
        rows = np.flatnonzero(labels == c)
        conf = probs[rows, c]
        mask = np.argsort(conf)[::-1][:int(rows.shape[0] * top_scale)]
        kept.append(rows[mask])
    return kept


def test_top_fraction_matches_dm_improves_at_on_a_class_folder(tmp_path):
    """A folder of per-class {k}.npy files (EDM / DM-Improves-AT generate.py output) selected
    with label_probability + top_fraction keeps the images select_1M.py keeps, in its order."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(27, 4))
    rng = np.random.default_rng(1)
    sizes = {0: 15, 1: 10, 2: 20, 3: 5}          # 0.2 of each: 3, 2, 4, 1 (exact products)
    imgs = {k: rng.integers(0, 256, (n, 3, 3, 3), dtype=np.uint8) for k, n in sizes.items()}
    for k, a in imgs.items():
        np.save(tmp_path / f"{k}.npy", a)
    s = Samples.load(tmp_path)
    x = torch.from_numpy(np.concatenate(list(imgs.values()))).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probs = clf(x).softmax(1).numpy()
    ref = _select_1m(probs, s.labels, 0.2)
    idx, sub = select(s, "label_probability", top_fraction=0.2, classifier=clf)
    assert [len(r) for r in ref] == [3, 2, 4, 1]
    assert idx.tolist() == np.concatenate(ref).tolist()      # same images, same order (no ties)
    np.testing.assert_array_equal(sub.labels, np.repeat([0, 1, 2, 3], [3, 2, 4, 1]))
    np.testing.assert_array_equal(np.asarray(sub.images), np.asarray(s.images)[idx])


def test_top_fraction_rounding_and_per_class_counts():
    """⌊f·n_c⌋ per class; f·n_c a whole number up to float rounding counts as that number."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(120, 1, 2, 2)
    labels = np.array([0] * 100 + [1] * 7 + [2] * 13)
    assert int(0.29 * 100) == 28                    # the float trap the rule avoids
    for f, want in [(0.29, {0: 29, 1: 2, 2: 3}), (0.5, {0: 50, 1: 3, 2: 6}), (1.0, {0: 100, 1: 7, 2: 13}),
                    (0.1, {0: 10, 1: 0, 2: 1}), (1 / 7, {0: 14, 1: 1, 2: 1})]:
        idx = select(x, "confidence", top_fraction=f, classifier=clf, labels=labels)
        got = {c: int((labels[idx] == c).sum()) for c in range(3)}
        assert got == want, (f, got)
        assert got == {c: math.floor(f * n + 1e-6) for c, n in zip(range(3), (100, 7, 13))}
        s, _ = scores(x, "confidence", classifier=clf, labels=labels)
        for c in range(3):                          # the kept ones are the best of their class
            chosen = idx[labels[idx] == c]
            rest = np.setdiff1d(np.flatnonzero(labels == c), chosen)
            if len(chosen) and len(rest):
                assert s[chosen].min() >= s[rest].max()
            assert list(chosen) == sorted(chosen, key=lambda i: (-s[i], i))


def test_top_fraction_and_k_per_class_refusals():
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(12, 1, 2, 2)
    labels = np.arange(12) % 3                      # 4 per class
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.2"):
        with pytest.raises(ValueError, match=r"top_fraction must be a number in \(0, 1\]"):
            select(x, "confidence", top_fraction=bad, classifier=clf, labels=labels)
    with pytest.raises(ValueError, match="exactly one of k_per_class"):
        select(x, "confidence", 2, top_fraction=0.5, classifier=clf, labels=labels)
    with pytest.raises(ValueError, match="exactly one of k_per_class"):
        select(x, "confidence", classifier=clf, labels=labels)
    with pytest.raises(ValueError, match="keeps no sample: the largest class has 4"):
        select(x, "confidence", top_fraction=0.2, classifier=clf, labels=labels)


def test_select_and_label_check_the_unit_range():
    """The classifier takes [0, 1] images: [-1, 1] (model space) tensors are refused by name."""
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(6, 1, 2, 2) * 2 - 1
    with pytest.raises(ValueError, match=r"samples must be in \[0, 1\], got values in \[-"):
        select(x, "confidence", 1, classifier=clf)
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        pseudo_label(clf, x)
    pseudo_label(clf, x.clamp(0, 1))                # the edges themselves are accepted


def test_cli_select_top_fraction_on_a_class_folder(tmp_path, capsys):
    """`cdp-fast select FOLDER --criterion label_probability --top-fraction 0.2` (select_1M.py's
    default) with the bundled digits classifier; a fraction outside (0, 1] is exit 2."""
    from cdp_fast.models import digits

    x, y = digits.load_digits_data("test")
    u8 = (x[:100].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    folder = tmp_path / "gen"
    folder.mkdir()
    for k in range(10):
        np.save(folder / f"{k}.npy", u8[y[:100].numpy() == k])
    out = tmp_path / "sel.npz"
    assert cli.main(["select", str(folder), "--criterion", "label_probability", "--top-fraction", "0.2",
                     "--out", str(out)]) == 0
    s, got = Samples.load(folder), Samples.load(out)
    idx, _ = select(s, "label_probability", top_fraction=0.2, classifier=digits.load_digits_classifier())
    np.testing.assert_array_equal(got.labels, s.labels[idx])
    np.testing.assert_array_equal(np.asarray(got.images), np.asarray(s.images)[idx])
    assert "top 0.2 of each class" in capsys.readouterr().out
    assert cli.main(["select", str(folder), "--top-fraction", "1.5", "--out", str(out)]) == 2
    assert "--top-fraction must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert cli.main(["select", str(folder), "--top-fraction", "0.2", "--k-per-class", "3",
                     "--out", str(out)]) == 2      # one or the other
    assert "not allowed with argument" in capsys.readouterr().err
