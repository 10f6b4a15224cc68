"""Nothing silently wrong, the data side: each probe finding of docs/reviews (ids TR*, Z*, I*,
MT*, SEL*, SE*, P*, EV*) as its repro, inverted — refused with a ValueError naming the input
before any work, or done right and warned once. The one image-input rule is
docs/design.md §3 ("One image-input adapter") and :mod:`cdp_fast.data.sources`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast import metrics
from cdp_fast.data import Samples, as_source, open_images, write_npz
from cdp_fast.label import per_sample_grad_norm, pseudo_label, select
from cdp_fast.models import digits


@pytest.fixture(scope="module")
def dig():
    x, y = digits.load_digits_data("train")
    return x[:200], y[:200]


def _u8(x):
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- image rule
def test_TR1_I14_float_0_255_npz_is_refused_everywhere(tmp_path, dig):
    """TR1/I14: float32 NCHW 0..255 images in an npz were read as model space (white)."""
    x, y = dig
    f = tmp_path / "f255.npz"
    write_npz(f, {"image": (x[:32] * 255).round().numpy().astype(np.float32), "label": y[:32].numpy()})
    for call in (lambda: as_source(str(f), "synthetic"),
                 lambda: metrics.as_image_set(str(f)),
                 lambda: pseudo_label(digits.load_digits_classifier(), str(f)),
                 lambda: cdp_fast.train_trades(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                                               (x, y), synthetic=str(f), epochs=1, batch_size=16,
                                               eps=0.1, step_size=0.05)):
        with pytest.raises(ValueError, match=r"model space .*got values in \[0, 255\]"):
            call()


def test_TR2_I13_float01_npz_warns_model_space(tmp_path, dig):
    """TR2/I13: float [0, 1] images in an npz are read as model space with one warning."""
    x, y = dig
    f = tmp_path / "f01.npz"
    write_npz(f, {"image": x[:32].numpy(), "label": y[:32].numpy()})
    with pytest.warns(UserWarning, match="every value is >= 0"):
        open_images(str(f), "synthetic")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_TR3_TR4_Z6_int64_images_refused_naming_dtype(tmp_path, dig, layout):
    """TR3/TR4/Z6: int64 0..255 images (a Samples or an npz) were model space / a shape error."""
    x, y = dig
    img = (x[:16] * 255).round().long().numpy()
    if layout == "NHWC":
        img = img.transpose(0, 2, 3, 1)
    write_npz(tmp_path / "i.npz", {"image": img, "label": y[:16].numpy()})
    with pytest.raises(ValueError, match="synthetic images must be uint8.*int64"):
        as_source(str(tmp_path / "i.npz"), "synthetic")
    with pytest.raises(ValueError, match="int64"):
        Samples.load(tmp_path / "i.npz").to_tensor()


def test_Z7_bool_images_refused():
    """Z7: bool images were read as model space 0.5 / 1.0."""
    b = np.zeros((4, 8, 8, 1), bool)
    with pytest.raises(ValueError, match="bool"):
        Samples(b).to_tensor()
    with pytest.raises(ValueError, match="images must be uint8.*bool"):
        open_images(Samples(b), "samples")


def test_model_space_overshoot_is_accepted_and_clamped():
    """The sampler does not clip: a little overshoot of [-1, 1] stays legitimate."""
    x = np.linspace(-1.1, 1.1, 4 * 64, dtype=np.float32).reshape(4, 1, 8, 8)
    t = open_images(Samples(x), "samples").all()
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0


# ----------------------------------------------------------------------------- labels
def test_Z11_I17_TR5_float_labels_refused_not_truncated(tmp_path, dig):
    """Z11/I17/TR5: labels 8.7 were truncated to 8; integral floats (3.0) are accepted."""
    x, y = dig
    write_npz(tmp_path / "fl.npz", {"image": _u8(x[:8]), "label": y[:8].numpy() + 0.7})
    with pytest.raises(ValueError, match="label must be whole numbers"):
        Samples.load(tmp_path / "fl.npz")
    with pytest.raises(ValueError, match="synthetic labels must be whole numbers"):
        as_source(Samples(_u8(x[:8]), y[:8].numpy() + 0.7), "synthetic")
    write_npz(tmp_path / "il.npz", {"image": _u8(x[:8]), "label": y[:8].numpy().astype(np.float64)})
    got = Samples.load(tmp_path / "il.npz").labels
    assert got.dtype == np.int64 and np.array_equal(got, y[:8].numpy())


def test_TR6_one_hot_labels_named(dig):
    """TR6: 2-D one-hot labels gave 'Tensors must have same number of dimensions'."""
    x, y = dig
    oh = np.eye(10, dtype=np.int64)[y[:8].numpy()]
    with pytest.raises(ValueError, match="synthetic labels must be class indices"):
        as_source(Samples(_u8(x[:8]), oh), "synthetic")
    with pytest.raises(ValueError, match="train_data labels must be class indices"):
        as_source((x[:8], torch.from_numpy(oh)), "train_data")


def test_Z3_arr0_with_label_key_reads_labels(tmp_path, dig):
    """Z3: an npz with arr_0 + label loaded with labels None."""
    x, y = dig
    np.savez(tmp_path / "a.npz", arr_0=_u8(x[:8]), label=y[:8].numpy())
    assert np.array_equal(Samples.load(tmp_path / "a.npz").labels, y[:8].numpy())


def test_Z14_Z17_truncated_member_names_the_file(tmp_path):
    """Z14/Z17: a bare 'mmap length is greater than file size'."""
    import io
    import zipfile

    from cdp_fast.data.npz import read_member

    # A member header that claims more rows than the file holds.
    big = tmp_path / "big.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (2 ** 30, 8, 8, 1)})
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("image.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(ValueError, match=r"big\.npz: member image claims shape"):
        read_member(big, "image")
    with pytest.raises(ValueError, match=r"big\.npz"):
        Samples.load(big).images[:1]


# ----------------------------------------------------------------------------- NaN / inf
def test_I18_MT9_MT10_TR12_nan_images_refused(dig):
    """I18/MT9/MT10/TR12: one NaN pixel changed the metrics (coverage 0.113 -> 0.0) or became a
    'non-finite loss' in training; now refused at the input, naming it."""
    x, y = dig
    xs = (x[:64] * 2 - 1).numpy()
    xs[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="samples .*NaN or inf.*image 0"):
        metrics.report(Samples(xs, y[:64].numpy()), real=(x[64:], y[64:]))
    with pytest.raises(ValueError, match="samples x holds NaN"):
        metrics.as_image_set((torch.full((4, 1, 8, 8), float("nan")), None))
    xn = x.clone()
    xn[5, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="train_data x holds NaN or inf values \\(the first in image 5"):
        as_source((xn, y), "train_data")
    xi = x[:8].clone()
    xi[2] = float("inf")
    with pytest.raises(ValueError, match="x holds NaN"):
        cdp_fast.evaluate(digits.load_digits_classifier(), xi, y[:8], attacks="clean")


def test_MT8_MT15_I20_nan_features_refused(dig):
    """MT8/MT15/I20: NaN features gave precision/recall/coverage 0.0 silently."""
    x, y = dig
    f = torch.randn(40, 4, dtype=torch.float64)
    g = f.clone()
    g[3, 1] = float("nan")
    with pytest.raises(ValueError, match="fake features hold NaN"):
        metrics.prdc(f, g, k=3)
    with pytest.raises(ValueError, match="features hold NaN"):
        metrics.class_separation(g, torch.arange(40) % 2)

    def nan_features(z):
        return torch.full((len(z), 3), float("nan"))
    with pytest.raises(ValueError, match="features \\(nan_features\\) of the images hold NaN"):
        metrics.report((x[:40], y[:40]), real=(x[40:], y[40:]), features=nan_features)


# ----------------------------------------------------------------------------- selection
def test_SEL1_SEL2_SE8_select_scores_the_stored_label():
    """SEL1/SEL2/SE8: 'confidence' / 'entropy' ranked by the classifier's own argmax, so 8 of
    20 picks had a wrong stored label; now p of the stored label / disagreement ranks last."""
    xt, yt = digits.load_digits_data("test")
    xt, yt = xt[:64], yt[:64]
    lab = yt.numpy().copy()
    lab[::4] = (lab[::4] + 1) % 10
    clf = digits.load_digits_classifier()
    for criterion in ("confidence", "entropy"):
        idx, _ = select(Samples(_u8(xt), lab), criterion, 2, classifier=clf)
        wrong = int(sum(lab[i] != yt[i] for i in idx))
        assert wrong == 0, (criterion, wrong)


@pytest.mark.parametrize("criterion", ["grad_norm", "robust_grad_norm"])
def test_SE5_SE6_grad_norm_with_a_frozen_classifier(criterion, dig):
    """SE5/SE6: the bundled (frozen) classifier gave AttributeError 'int' has no 'sqrt'."""
    x, y = dig
    clf = digits.load_digits_classifier()
    assert not any(p.requires_grad for p in clf.parameters())
    idx = select(x[:30], criterion, 1, classifier=clf, labels=y[:30].numpy(), steps=1)
    assert len(idx) > 0
    clf2 = digits.load_digits_classifier()
    for p in clf2.parameters():
        p.requires_grad_(True)
    a = per_sample_grad_norm(clf, x[:6], y[:6])
    b = per_sample_grad_norm(clf2, x[:6], y[:6])
    torch.testing.assert_close(a, b)


def test_P9_probability_classifier_is_not_softmaxed_twice(dig):
    """P9 (label side of P1/C39): confidence 0.23 instead of 0.99; now read as probabilities,
    warned once."""
    x, _ = dig
    clf = digits.load_digits_classifier()
    ref = pseudo_label(clf, x[:64])

    class Prob(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = clf

        def forward(self, z):
            return self.c(z).softmax(1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = pseudo_label(Prob(), x[:64], batch_size=16)
    assert sum("probabilities" in str(m.message) for m in w) == 1
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_allclose(got["confidence"], ref["confidence"], atol=1e-5)


# ----------------------------------------------------------------------------- sizes
def test_EV1_MT13_negative_sizes_refused(dig):
    """EV1/MT13: report(max_samples=-5) measured n=35 of 40; evaluate's n must be >= 1."""
    x, y = dig
    with pytest.raises(ValueError, match="max_samples must be an int >= 1"):
        metrics.report((x[:40], y[:40]), real=(x[40:], y[40:]), max_samples=-5)
    with pytest.raises(ValueError, match="max_samples"):
        metrics.as_image_set((x[:40], y[:40]), max_samples=-5)
    with pytest.raises(ValueError, match="n_ex must be an int >= 1"):
        cdp_fast.evaluate(digits.load_digits_classifier(), x[:10], y[:10], attacks="clean", n_ex=-5)


def test_MT5_MT6_MT16_k_and_pca_components_refused(dig):
    """MT5/MT6: k <= 0 gave IndexError / RuntimeError; MT16: pca_components <= 0 used 1."""
    x, y = dig
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            metrics.knn_radii(torch.randn(10, 3), k)
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            metrics.report((x[:40], y[:40]), real=(x[40:], y[40:]), k=k)
    for c in (0, -3):
        with pytest.raises(ValueError, match="n_components must be an int >= 1"):
            metrics.fit_pca(x, c)
        with pytest.raises(ValueError, match="pca_components must be an int >= 1"):
            metrics.report((x[:40], y[:40]), real=(x[40:], y[40:]), pca_components=c)


def test_MT11_MT12_label_summaries_refuse_bad_input():
    """MT11: class_balance([-1, ...]) gave a bincount RuntimeError; MT12: confidence_summary([])."""
    with pytest.raises(ValueError, match="labels must be >= 0"):
        metrics.class_balance([-1, 0, 1])
    with pytest.raises(ValueError, match="confidence is empty"):
        metrics.confidence_summary([])


# ----------------------------------------------------------------------------- separation
def test_I3_MT1_MT2_constant_images_give_none(dig):
    """I3/MT1/MT2: constant images gave Fisher ratio inf / 2.185 (0/0 from rounding noise)."""
    x, y = dig
    sep = metrics.class_separation(torch.full((32, 20), 0.3), torch.arange(32) % 4)
    assert sep["fisher_ratio"] is None and sep["separation_min"] is None
    const = np.full((32, 8, 8, 1), 0, np.uint8)
    rep = metrics.report(Samples(const, np.arange(32) % 9), real=(x, y))
    assert rep["samples"]["separation"]["fisher_ratio"] is None
    assert rep["samples"]["separation"]["separation_min"] is None
    rows = {r[0]: r[1] for r in metrics.table_rows(rep)}
    assert rows["Fisher ratio tr S_B / tr S_W"] == [None]
    pca = metrics.fit_pca(x, 20)
    sep2 = metrics.class_separation(pca(torch.zeros(32, 1, 8, 8)), torch.arange(32) % 4)
    assert sep2["fisher_ratio"] is None


def test_I16_sample_classes_missing_from_real_warn(dig):
    """I16: sample labels 10..19 against digits 0..9 silently made K = 20."""
    x, y = dig
    with pytest.warns(UserWarning, match="classes the real set lacks"):
        rep = metrics.report((x[:40], y[:40] + 10), real=(x[40:], y[40:]))
    assert rep["setup"]["num_classes"] == 20
