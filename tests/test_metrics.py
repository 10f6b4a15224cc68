"""cdp_fast.metrics: each metric against a case with a known answer (analytic Fisher ratio and
separation of Gaussian classes, identical / disjoint sets for precision-recall-density-coverage,
shuffled labels at chance, a balanced histogram, separable data for the probe, copies for
memorisation, a set paired with itself), the chunked distances against brute force, the input
adapters and the JSON report."""
import json
import math

import numpy as np
import pytest
import torch

from cdp_fast import metrics
from cdp_fast.data import Samples, images_to_float01


def _gauss(n, mu, sigma, seed):
    """Two equally likely classes x | y ~ N(±mu, sigma² I) (the paper's §3.1 model), y in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    y = torch.arange(n) % 2
    sign = (2 * y - 1).to(torch.float64)[:, None]
    x = sign * mu + sigma * torch.randn(n, len(mu), generator=g, dtype=torch.float64)
    return x, y


# ----------------------------------------------------------------------------- separation
def test_fisher_ratio_and_separation_of_two_gaussians_match_the_closed_form():
    # tr S_B = |mu|^2, tr S_W = d sigma^2  ->  ratio |mu|^2 / (d sigma^2) = 2 / (5 * 1) = 0.4;
    # separation |m_1 - m_0| / sigma = 2 |mu| / sigma = 2 sqrt(2). n = 40000: sampling sd of
    # both is < 0.5%; tolerance 2% relative.
    mu = [1.0, 1.0, 0.0, 0.0, 0.0]
    f, y = _gauss(40_000, mu, 1.0, seed=1)
    sep = metrics.class_separation(f, y)
    assert sep["fisher_ratio"] == pytest.approx(0.4, rel=0.02)
    assert sep["separation_mean"] == pytest.approx(2 * math.sqrt(2), rel=0.02)
    assert sep["separation_min"] == sep["separation_mean"] and sep["closest_pair"] == [0, 1]
    # sigma = 2: ratio / 4, separation / 2
    f2, y2 = _gauss(40_000, mu, 2.0, seed=2)
    assert metrics.class_separation(f2, y2)["fisher_ratio"] == pytest.approx(0.1, rel=0.03)


def test_separation_for_three_classes_is_the_mean_over_pairs():
    # class means 0, 3 e1, 4 e2 with sigma = 1: pair distances 3, 4, 5 -> mean 4, min 3 (pair 0-1)
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [0.0, 4, 0]], dtype=torch.float64)
    y = torch.arange(30_000) % 3
    f = means[y] + torch.randn(30_000, 3, generator=g, dtype=torch.float64)
    sep = metrics.class_separation(f, y)
    assert sep["separation_mean"] == pytest.approx(4.0, rel=0.02)
    assert sep["separation_min"] == pytest.approx(3.0, rel=0.02) and sep["closest_pair"] == [0, 1]


def test_effective_c_recovers_the_papers_c():
    mu = [1.0, 0.5, 0.0, 0.0]
    fr, yr = _gauss(40_000, mu, 1.0, seed=3)
    fs, ys = _gauss(40_000, [1.5 * v for v in mu], 1.0, seed=4)          # mu~ = 1.5 mu, same sigma
    assert metrics.effective_c(fs, ys, fr, yr)["effective_c"] == pytest.approx(1.5, rel=0.02)
    fh, yh = _gauss(40_000, mu, 0.5, seed=5)                              # same means, half the spread
    assert metrics.effective_c(fh, yh, fr, yr)["effective_c"] == pytest.approx(2.0, rel=0.02)
    same = metrics.effective_c(fr, yr, fr, yr)
    assert same["effective_c"] == pytest.approx(1.0, abs=1e-12) and same["pairs"] == 1


# ----------------------------------------------------------------------------- precision / recall
def test_knn_radii_and_nn_distances_match_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    d = torch.cdist(a, a)
    d.fill_diagonal_(math.inf)
    want = d.sort(1).values[:, 4]
    assert torch.equal(metrics.knn_radii(a, 5, chunk=37), metrics.knn_radii(a, 5, chunk=1024))
    torch.testing.assert_close(metrics.knn_radii(a, 5, chunk=37), want)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64)
    dist, idx = metrics.nn_distances(a, b, chunk=29)
    bd = torch.cdist(a, b)
    torch.testing.assert_close(dist, bd.min(1).values)
    assert torch.equal(idx, bd.argmin(1))


def test_prdc_identical_sets_are_perfect():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(700, 8, generator=g)
    r = metrics.prdc(f, f.clone(), k=5, chunk=64)
    # each real ball holds its own copy and its k - 1 nearer neighbours (strict <): density = 1
    assert r == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0, "k": 5}


def test_prdc_same_distribution_and_disjoint_sets():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    r = metrics.prdc(a, b)
    # i.i.d. draws: E[density] = 1 (Naeem et al. 2020); measured 0.997 at this seed
    assert r["density"] == pytest.approx(1.0, abs=0.05)
    assert min(r["precision"], r["recall"], r["coverage"]) > 0.9
    far = metrics.prdc(a, b + 100.0)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    assert metrics.prdc(a, b, chunk=100) == r                       # chunking changes nothing


# ----------------------------------------------------------------------------- labels
class _Oracle(torch.nn.Module):
    """Reads the class off pixel (0, 0): value c / 10 -> one-hot logits of c."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 10).float()


def test_label_agreement_of_shuffled_labels_is_chance():
    n, K = 10_000, 10
    y = torch.arange(n) % K
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = y / 10
    assert metrics.label_agreement(_Oracle(), x, y)["agreement"] == 1.0
    g = torch.Generator().manual_seed(0)
    shuffled = y[torch.randperm(n, generator=g)]
    # chance = 1/K = 0.1; binomial sd sqrt(0.09 / 10000) = 0.003 -> tolerance 0.02 (> 6 sd)
    assert metrics.label_agreement(_Oracle(), x, shuffled)["agreement"] == pytest.approx(0.1, abs=0.02)


def test_class_balance():
    bal = metrics.class_balance(torch.arange(1000) % 10, 10)
    assert bal["entropy_normalised"] == pytest.approx(1.0, abs=1e-12)
    assert bal["entropy_nats"] == pytest.approx(math.log(10), abs=1e-12)
    assert bal["max_count"] == bal["min_count"] == 100 and bal["histogram"] == [100] * 10
    one = metrics.class_balance(np.zeros(50, dtype=np.int64), 10)
    assert one["entropy_nats"] == 0.0 and one["entropy_normalised"] == 0.0
    assert one["max_count"] == 50 and one["min_count"] == 0
    with pytest.raises(ValueError, match="num_classes"):
        metrics.class_balance([0, 12], 10)


def test_confidence_summary():
    c = np.linspace(0, 1, 101)
    s = metrics.confidence_summary(c)
    assert s["mean"] == pytest.approx(0.5) and s["q50"] == pytest.approx(0.5) and s["q05"] == pytest.approx(0.05)
    assert s["fraction_above_0.8"] == pytest.approx(20 / 101)


# ----------------------------------------------------------------------------- probe
def _separable(n, seed):
    """Class c lights pixel c of a 4x4 image (value 0.9) over background noise in [0, 0.1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.1 * torch.rand(n, 1, 4, 4, generator=g)
    x.view(n, -1)[torch.arange(n), y] = 0.9
    return x, y


def test_linear_probe_on_separable_data():
    xtr, ytr = _separable(400, 0)
    xte, yte = _separable(200, 1)
    r = metrics.linear_probe(xtr, ytr, xte, yte, eps=0.05)
    assert r["clean_accuracy"] == 1.0 and r["train_accuracy"] == 1.0
    assert r["robust_accuracy"] == 1.0                    # a 0.8 margin per pixel survives eps = 0.05
    assert metrics.linear_probe(xtr, ytr, xte, yte, eps=0.05) == r      # seeded: deterministic
    # labels unrelated to the images -> chance on the test set
    g = torch.Generator().manual_seed(2)
    bad = metrics.linear_probe(xtr, ytr[torch.randperm(400, generator=g)], xte, yte, eps=0.0)
    assert bad["clean_accuracy"] < 0.5 and bad["robust_accuracy"] is None


# ----------------------------------------------------------------------------- memorisation
def test_memorisation_of_copies_and_of_new_images():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, 1, 8, 8, generator=g)
    copies = train[torch.randint(0, 300, (120,), generator=g)]
    m = metrics.memorisation(copies, train, f_syn=copies.flatten(1), f_train=train.flatten(1))
    for space in ("pixel", "features"):
        assert m[space]["max"] == 0.0 and m[space]["fraction_below"] == 1.0
        assert m[space]["real_nn_q"] > 0
    new = metrics.memorisation(torch.rand(100, 1, 8, 8, generator=g), train)
    assert new["pixel"]["min"] > 0 and new["pixel"]["fraction_below"] < 0.2 and "features" not in new


def test_nn_distances_high_dimensional_copies_are_exactly_zero():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(150, 3, 16, 16, generator=g)                   # 768 dims: the Gram path
    idx = torch.randint(0, 150, (40,), generator=g)
    d, j = metrics.nn_distances(b[idx], b, chunk=16)
    assert torch.equal(d, torch.zeros(40, dtype=torch.float64)) and torch.equal(j, idx)
    a = torch.rand(30, 3, 16, 16, generator=g)
    d, j = metrics.nn_distances(a, b)
    bd = torch.cdist(a.flatten(1).double(), b.flatten(1).double())
    torch.testing.assert_close(d, bd.min(1).values)
    assert torch.equal(j, bd.argmin(1))
    own, oj = metrics.nn_distances(b, b, exclude_self=True)
    assert (oj != torch.arange(150)).all() and (own > 0).all()


# ----------------------------------------------------------------------------- paired
def test_paired_comparison():
    g = torch.Generator().manual_seed(0)
    x = 0.8 * torch.rand(50, 1, 8, 8, generator=g)
    y = torch.arange(50) % 10
    same = metrics.paired((x, y), (x, y))
    assert same["label_flip_rate"] == 0.0 and same["dx_l2_mean"] == 0.0 and same["dx_l2_median"] == 0.0
    y2 = y.clone()
    y2[:25] = (y2[:25] + 1) % 10
    moved = metrics.paired((x, y), (x + 0.1, y2))
    assert moved["label_flip_rate"] == 0.5
    assert moved["dx_l2_mean"] == pytest.approx(0.8) and moved["dx_l2_median"] == pytest.approx(0.8)  # 0.1·√64
    assert moved["n_pairs"] == 50 and moved["same_seed"] is None


# ----------------------------------------------------------------------------- inputs, report
def test_as_image_set_accepts_the_package_forms(tmp_path):
    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, size=(20, 8, 8, 1), dtype=np.uint8)
    lab = np.arange(20, dtype=np.int64) % 10
    want = images_to_float01(u8)
    s = Samples(u8, lab, np.full(20, 0.9, np.float32))
    for data in (s, (u8, lab), (torch.from_numpy(u8), torch.from_numpy(lab)), (want, lab)):
        got = metrics.as_image_set(data)
        assert torch.equal(got.x, want) and torch.equal(got.y, torch.from_numpy(lab))
    s.save_npz(tmp_path / "s.npz")
    got = metrics.as_image_set(str(tmp_path / "s.npz"), max_samples=7)
    assert torch.equal(got.x, want[:7]) and got.confidence.shape == (7,)
    # float model-space images of a Samples (output="float") map from [-1, 1]
    fs = metrics.as_image_set(Samples(np.zeros((3, 1, 8, 8), np.float32)))
    assert torch.equal(fs.x, torch.full((3, 1, 8, 8), 0.5)) and fs.y is None
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        metrics.as_image_set((want * 2, lab))
    with pytest.raises(ValueError, match="does not exist"):
        metrics.as_image_set(str(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="labels"):
        metrics.as_image_set((want, lab[:5]))


def test_report_is_json_and_consistent():
    xtr, ytr = _separable(300, 0)
    xte, yte = _separable(120, 1)
    syn, ysyn = _separable(200, 3)
    other, yother = _separable(200, 3)
    yother = yother.clone()
    yother[:20] = (yother[:20] + 1) % 4
    rep = metrics.report((syn, ysyn), real=(xtr, ytr), test=(xte, yte), against=(other, yother),
                         classifier=metrics.fit_logistic_regression(xtr, ytr))
    json.dumps(rep, allow_nan=False)
    assert set(rep) == {"setup", "real", "samples", "against", "paired"}
    s = rep["samples"]
    assert s["class_balance"]["entropy_normalised"] == pytest.approx(1.0)
    assert s["probe"]["clean_accuracy"] == 1.0 and s["agreement"]["agreement"] == 1.0
    assert rep["against"]["agreement"]["agreement"] == pytest.approx(0.9)
    assert rep["paired"]["label_flip_rate"] == pytest.approx(0.1) and rep["paired"]["dx_l2_mean"] == 0.0
    assert rep["setup"]["feature_dim"] == 16 and rep["setup"]["k"] == 5
    assert 0 < s["fidelity"]["precision"] <= 1 and s["separation"]["effective_c"] > 0
    rows = metrics.table_rows(rep)
    labels = [r[0] for r in rows]
    assert "precision" in labels and "paired: label-flip rate" in labels
    assert all(len(v) == 2 for lab, v, _ in rows if not lab.startswith("paired"))
    # unlabelled samples get the classifier's labels (and no agreement row)
    un = metrics.report(syn, real=(xtr, ytr), classifier=metrics.fit_logistic_regression(xtr, ytr))
    assert un["samples"]["labels_from"] == "classifier" and "agreement" not in un["samples"]
    assert metrics.report(syn, real=(xtr, ytr))["samples"]["labels_from"] is None
