"""Range-explicit adapters (issue 23, F1, F7): ``as_labeler`` maps the sampler's [-1, 1] onto a
classifier's own range, ``as_feature_extractor(layer=...)`` hooks a named module of a network
without ``.features`` (RobustBench's DMWideResNet), and the rule of cdp_fast.models.ranges
refuses or warns about a network given to the side of the wrong range."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cdp_fast
from cdp_fast.models import WideResNet, as_feature_extractor, as_labeler, get_model
from cdp_fast.models.features import to_range

ABAR = cdp_fast.make_alphas_cumprod("linear", 1000)
C = 0.3   # the samples' constant value in [-1, 1]: (C + 1)/2 = 0.65 in [0, 1]


class MeanThreshold(torch.nn.Module):
    """A [0, 1] classifier whose decision depends on the range: class 1 iff the mean intensity
    in [0, 1] exceeds 0.5 (logits [0, 20(mean − 0.5)])."""

    def forward(self, x01):
        m = x01.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(m), 20.0 * (m - 0.5)], 1)


def x0_eps(x, t):
    """The ε of an x0-predictor whose x̂₀ is the constant image ±C (the sign of x_t's mean): a
    DDIM run (η = 0) keeps the sign (x̂₀'s pull outweighs the shrinking ε term), so the
    samples are ±C exactly and half of them (by x_T) are bright, half dark."""
    a = ABAR.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
    x0 = C * torch.sign(x.flatten(1).mean(1)).view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


KW = dict(loss=None, image_shape=(1, 4, 4), steps=10, skip="uniform", output="float", batch_size=16,
          progress=False, compile=False)


# ----------------------------------------------------------------------------- F1
def test_F1_a_unit_range_classifier_as_labeler_is_warned_about_and_as_labeler_labels_right():
    """Today a [0, 1] classifier passed as labeler silently labels x̂₀ in [-1, 1]: the bright
    samples (+0.3 = 0.65 in [0, 1]) fall below its 0.5 threshold. The raw module now warns,
    naming as_labeler; through as_labeler(..., input_range=(0, 1)) every label is right."""
    clf = MeanThreshold()
    with pytest.warns(UserWarning, match=r"labeler .*does not declare .*as_labeler\(model, input_range=\(0, 1\)\)"):
        raw = cdp_fast.sample(x0_eps, 16, labeler=clf, **KW)
    images = np.asarray(raw.images)
    np.testing.assert_allclose(np.abs(images), C, atol=1e-4)           # the samples are ±C
    truth = (images.reshape(16, -1).mean(1) > 0).astype(np.int64)     # bright <=> mean > 0.5 in [0, 1]
    assert 0 < truth.sum() < 16
    assert (np.asarray(raw.labels) != truth).sum() == truth.sum()      # every bright sample mislabelled
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # the adapter declares its range
        good = cdp_fast.sample(x0_eps, 16, labeler=as_labeler(clf, input_range=(0, 1)), **KW)
    np.testing.assert_array_equal(np.asarray(good.images), images)
    np.testing.assert_array_equal(np.asarray(good.labels), truth)


def test_F1_known_unit_range_networks_are_refused_by_the_sampler():
    """The package's classifiers take [0, 1] (documented): as labeler or features they are a
    ValueError naming the adapter, before any work."""
    clf = get_model("small-cnn", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match=r"labeler .*SmallCNN takes images in \[0, 1\].*as_labeler"):
        cdp_fast.sample(x0_eps, 4, labeler=clf, **KW)
    with pytest.raises(ValueError, match=r"features .*SmallCNN takes images in \[0, 1\].*as_feature_extractor"):
        cdp_fast.sample(x0_eps, 4, **dict(KW, loss="hnm", features=clf, lam=1.0))


def test_adapters_are_refused_where_images_are_in_unit_range():
    """evaluate / train give [0, 1] images: a sampler adapter (it takes [-1, 1]) is refused."""
    clf = get_model("small-cnn", num_classes=2, in_channels=1)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    for adapter in (as_labeler(clf), as_feature_extractor(clf)):
        with pytest.raises(ValueError, match=r"model \(evaluate .*takes images in \[-1, 1\].*classifier itself"):
            cdp_fast.evaluate(adapter, x, y, attacks=("clean",))
        with pytest.raises(ValueError, match=r"model \(training .*takes images in \[-1, 1\]"):
            cdp_fast.train_trades(adapter, (x, y), epochs=1, eps=0.1, step_size=0.05, batch_size=4)
    assert set(cdp_fast.evaluate(clf, x, y, attacks=("clean",))) == {"clean"}


@pytest.mark.parametrize("rng", [(0, 1), (-1, 1), (0, 255), (-0.5, 2.0)], ids=str)
def test_to_range_maps_the_sampler_range_affinely(rng):
    """to_range against the formula lo + (x + 1)(hi − lo)/2 in float64 (a few float32 ulps)."""
    x = torch.linspace(-1.5, 1.5, 37)
    ref = rng[0] + (x.double() + 1) * (rng[1] - rng[0]) / 2
    got = to_range(x, tuple(float(v) for v in rng))
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6 * max(abs(rng[0]), abs(rng[1])))
    assert float(to_range(torch.tensor(-1.0), rng)) == pytest.approx(rng[0])
    assert float(to_range(torch.tensor(1.0), rng)) == pytest.approx(rng[1])


def test_labeler_maps_and_records_its_range():
    clf = MeanThreshold()
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    torch.testing.assert_close(as_labeler(clf)(x), clf((x + 1) * 0.5), rtol=0, atol=0)
    torch.testing.assert_close(as_labeler(clf, input_range=(-1, 1))(x), clf(x), rtol=0, atol=0)
    assert as_labeler(clf, input_range=(0, 255)).input_range == (0.0, 255.0)
    for bad in ((1, 0), (0,), "01", (0, float("inf"))):
        with pytest.raises(ValueError, match="input_range"):
            as_labeler(clf, input_range=bad)


# ----------------------------------------------------------------------------- F7
def test_F7_guidance_without_features_is_an_explicit_choice():
    """Today loss="hnm" without features guided on pixels with λ = 1e5 silently; now None is a
    ValueError naming features= and features="pixels", and "pixels" takes no λ default."""
    kw = dict(KW, loss="hnm")
    with pytest.raises(ValueError, match=r"features=None.*features='pixels'"):
        cdp_fast.sample(x0_eps, 4, **kw)
    with pytest.raises(ValueError, match=r"lam: features='pixels' needs an explicit lam"):
        cdp_fast.sample(x0_eps, 4, features="pixels", **kw)
    with pytest.raises(ValueError, match="features must be"):
        cdp_fast.sample(x0_eps, 4, features="pixel", lam=1.0, **kw)
    a = cdp_fast.sample(x0_eps, 4, features="pixels", lam=10.0, **kw)
    b = cdp_fast.sample(x0_eps, 4, features=lambda x: x.flatten(1), lam=10.0, **kw)   # the same map, by hand
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    cdp_fast.sample(x0_eps, 4, **KW)                                  # unguided: no features needed


# ----------------------------------------------------------------------------- layer= hooks
class DMStyleWRN(torch.nn.Module):
    """RobustBench's ``DMWideResNet`` forward (``robustbench/model_zoo/architectures/
    dm_wide_resnet.py``): normalise, init_conv, layer, BN-Swish, avg_pool2d(8), logits — no
    ``.features`` method; the same module names (and so checkpoints) as cdp_fast's WideResNet,
    whose modules it borrows (built locally, nothing downloaded)."""

    def __init__(self, depth=10, width=1):
        super().__init__()
        w = WideResNet(num_classes=10, depth=depth, width=width)
        self.init_conv, self.layer, self.batchnorm, self.relu, self.logits = (
            w.init_conv, w.layer, w.batchnorm, w.relu, w.logits)
        self.register_buffer("mean", w.normalize.mean.clone())
        self.register_buffer("std", w.normalize.std.clone())
        self.num_channels = w.num_features

    def forward(self, x):
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        return self.logits(F.avg_pool2d(out, 8).view(-1, self.num_channels))


def dm_wrn():
    """RobustBench's own DMWideResNet when robustbench is installed, else the local copy."""
    torch.manual_seed(0)
    try:
        from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
        return DMWideResNet(num_classes=10, depth=10, width=1).eval()
    except ImportError:
        return DMStyleWRN().eval()


def _penultimate(m, x01):
    out = m.init_conv((x01 - m.mean) / m.std)
    return m.relu(m.batchnorm(m.layer(out))).mean(dim=(2, 3))


def test_layer_hook_gives_the_penultimate_features_and_their_gradient():
    """layer="logits", capture="input": the pooled 64·w vector of (x + 1)/2, as a plain
    re-computation gives it (avg_pool2d vs mean: float32 rounding, rtol 1e-5), and the same
    input gradient; the hook records only inside the extractor (the model is unchanged)."""
    m = dm_wrn()
    assert not hasattr(m, "features")
    f = as_feature_extractor(m, layer="logits", capture="input")
    x = (torch.rand(3, 3, 32, 32) * 2.4 - 1.2).requires_grad_(True)    # x_t leaves [-1, 1]
    z = f(x)
    assert z.shape == (3, m.logits.in_features)
    xr = x.detach().clone().requires_grad_(True)
    ref = _penultimate(m, (xr + 1) * 0.5)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)
    u = torch.randn_like(z)
    (g,) = torch.autograd.grad((z * u).sum(), x)
    (gr,) = torch.autograd.grad((ref * u).sum(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-7)
    out = f(x)
    torch.testing.assert_close(m.logits(out), m((x + 1) * 0.5), rtol=1e-5, atol=1e-6)
    # a deep copy (what sample() runs) hooks its own copy; outputs agree
    torch.testing.assert_close(copy.deepcopy(f)(x), z, rtol=0, atol=0)
    # capture="output" of a submodule: flattened
    fo = as_feature_extractor(m, layer="init_conv")
    assert fo(x).shape == (3, 16 * 32 * 32)


def test_layer_errors_name_the_cause():
    m = dm_wrn()
    with pytest.raises(ValueError, match=r"layer 'penultimate' is not a submodule of .*init_conv.*logits"):
        as_feature_extractor(m, layer="penultimate")
    with pytest.raises(ValueError, match=r"has no \.features\(x\) method: name the layer"):
        as_feature_extractor(m)
    with pytest.raises(ValueError, match="capture must be"):
        as_feature_extractor(m, layer="logits", capture="inputs")


def test_layer_and_range_change_the_run_fingerprint():
    from cdp_fast.sampling.fingerprints import fingerprint

    m = dm_wrn()
    a = fingerprint(as_feature_extractor(m, layer="logits", capture="input"))
    assert a != fingerprint(as_feature_extractor(m, layer="relu"))
    assert a != fingerprint(as_feature_extractor(m, layer="logits", capture="input", input_range=(-1, 1)))
    clf = get_model("small-cnn", num_classes=2, in_channels=1)
    # the default extractor records no settings: fingerprints of runs before the options existed hold
    assert as_feature_extractor(clf).fingerprint_settings() is None


def test_F7_cli_sample_needs_an_explicit_feature_space(monkeypatch, capsys):
    """`cdp-fast sample` mirrors sample(): a guided run of a model without bundled features
    needs --features (one line, exit 2); --features pixels needs --lam (the digits preset's λ,
    tuned for its features, is not applied to pixels)."""
    from cdp_fast import cli

    tiny = ["sample", "-n", "2", "--no-progress", "--model", "tests.test_cli:_tiny_eps", "--image-shape", "1,8,8"]
    assert cli.main(tiny) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--features" in err and "pixels" in err, err
    for argv in (tiny + ["--features", "pixels"], ["sample", "-n", "2", "--no-progress", "--features", "pixels"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lam" in err, err
    calls = []
    monkeypatch.setattr(cdp_fast, "sample", lambda model, n, **kw: calls.append(kw) or cdp_fast.Samples(
        np.zeros((n, 8, 8, 1), np.uint8)))
    assert cli.main(tiny + ["--features", "pixels", "--lam", "3"]) == 0
    assert (calls[-1]["features"], calls[-1]["lam"]) == ("pixels", 3.0)
    assert cli.main(tiny + ["--loss", "none"]) == 0 and "features" not in calls[-1]


# ----------------------------------------------------------------------------- adapters check the wrapped model
class DeclaresUnit(torch.nn.Module):
    accepts_range = (0, 1)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return x.flatten(1)[:, :3]


class DeclaresSampler(DeclaresUnit):
    accepts_range = (-1, 1)


class Declares255(DeclaresUnit):
    accepts_range = (0, 255)


def test_as_labeler_refuses_a_model_declaring_another_range():
    """The adapters used to wrap anything: digits_labeler() (it takes [-1, 1]) would have been
    fed (x + 1)/2, and SmallCNN (it takes [0, 1]) x itself. Both are now a ValueError naming
    both ranges and the input_range to pass; the matching range is accepted."""
    from cdp_fast.models import digits

    lab = digits.digits_labeler()
    with pytest.raises(ValueError, match=r"as_labeler: DigitsLabeler takes images in \[-1, 1\].*called on images "
                                         r"in \[0, 1\]; pass input_range=\(-1, 1\).*as it is"):
        as_labeler(lab)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(as_labeler(lab, input_range=(-1, 1))(x), lab(x), rtol=0, atol=0)
    clf = get_model("small-cnn", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match=r"as_labeler: SmallCNN takes images in \[0, 1\].*called on images in "
                                         r"\[-1, 1\]; pass input_range=\(0, 1\)"):
        as_labeler(clf, input_range=(-1, 1))
    with pytest.raises(ValueError, match=r"Labeler takes images in \[-1, 1\]"):   # an adapter wrapped twice
        as_labeler(as_labeler(clf))
    with pytest.raises(ValueError, match=r"DeclaresUnit takes images in \[0, 1\].*\[0, 255\]"):
        as_labeler(DeclaresUnit(), input_range=(0, 255))
    as_labeler(Declares255(), input_range=(0, 255))
    as_labeler(MeanThreshold(), input_range=(-1, 1))          # declares nothing: taken as stated


def test_as_feature_extractor_refuses_a_model_declaring_another_range():
    """feature_input="unit": the declared range must be input_range; "raw" calls the model on x_t
    itself, which a [-1, 1] model takes and a [0, 1] classifier gets by choice (the authors'
    setting, kept); another declared range is refused."""
    clf = get_model("small-cnn", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match=r"as_feature_extractor: SmallCNN takes images in \[0, 1\].*called on "
                                         r"images in \[-1, 1\]; pass input_range=\(0, 1\)"):
        as_feature_extractor(clf, input_range=(-1, 1))
    with pytest.raises(ValueError, match=r"DeclaresSampler takes images in \[-1, 1\].*\[0, 1\]; pass "
                                         r"input_range=\(-1, 1\)"):
        as_feature_extractor(DeclaresSampler())
    m = dm_wrn()
    m.accepts_range = (0, 1)                                       # a layer= extractor is checked too
    with pytest.raises(ValueError, match=r"as_feature_extractor: \w+ takes images in \[0, 1\]"):
        as_feature_extractor(m, layer="logits", capture="input", input_range=(-1, 1))
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    torch.testing.assert_close(as_feature_extractor(DeclaresSampler(), input_range=(-1, 1))(x), x.flatten(1))
    torch.testing.assert_close(as_feature_extractor(DeclaresSampler(), feature_input="raw")(x), x.flatten(1))
    torch.testing.assert_close(as_feature_extractor(DeclaresUnit(), feature_input="raw")(x), x.flatten(1))
    as_feature_extractor(clf, feature_input="raw")
    with pytest.raises(ValueError, match=r"feature_input='raw'\): Declares255 takes images in \[0, 255\].*"
                                         r"feature_input='unit', input_range=\(0, 255\)"):
        as_feature_extractor(Declares255(), feature_input="raw")
    torch.testing.assert_close(as_feature_extractor(Declares255(), input_range=(0, 255))(x),
                               (x.flatten(1) + 1) * 127.5)


# ----------------------------------------------------------------------------- --feature-input raw keeps layer=
def dm_layer_factory():
    """--features module:factory: a DM WRN's penultimate vector through a hook (no .features)."""
    return as_feature_extractor(dm_wrn(), layer="logits", capture="input")


def both_factory():
    """--features module:factory: a classifier that has .features, hooked at another layer."""
    torch.manual_seed(1)
    return as_feature_extractor(get_model("small-cnn", num_classes=3, in_channels=1), layer="body.0")


def wide_range_factory():
    """--features module:factory: an extractor for a classifier that takes [0, 255]."""
    return as_feature_extractor(Declares255(), input_range=(0, 255))


def test_cli_feature_input_raw_keeps_the_factorys_layer_and_capture():
    """--feature-input raw rebuilt the extractor from f.model alone: a DM WRN hooked at
    layer="logits", capture="input" then failed with "has no .features", and a model with both
    .features and a hooked layer silently switched to .features. Now layer / capture are kept
    (only the input changes: the raw extractor on x equals the unit one on 2x − 1), and a
    factory's input_range other than (0, 1) is refused, naming feature-input."""
    from cdp_fast.cli import specs

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for factory, shape in (("dm_layer_factory", (1, 3, 32, 32)), ("both_factory", (1, 1, 8, 8))):
        unit = specs.load_features(f"tests.test_adapters:{factory}", {}, None)
        raw = specs.load_features(f"tests.test_adapters:{factory}", {}, None, feature_input="raw")
        assert (raw.feature_input, raw.layer, raw.capture) == ("raw", unit.layer, unit.capture)
        xs = x[:, : shape[1], : shape[2], : shape[3]]
        with torch.no_grad():
            torch.testing.assert_close(raw(xs), unit(2 * xs - 1), rtol=1e-5, atol=1e-6)
    assert raw(xs).shape[1] != raw.model.features(xs).shape[1]        # body.0's output, not .features
    with pytest.raises(ValueError, match=r"feature-input: 'raw' .*input_range=\(0\.0, 255\.0\)"):
        specs.load_features("tests.test_adapters:wide_range_factory", {}, None, feature_input="raw")


def test_F7_demo_generate_set_needs_features_for_guided_kinds():
    """generate_set("cdp") said it used "the library's defaults" with features=None, which the
    sampler refuses since F7 (with a message about sample()); now it names generate_set, the
    kind and features= before any work; "ddim" needs none."""
    from cdp_fast.demo import digits as demo_data

    for kind in ("cdp", "cdp-class"):
        with pytest.raises(ValueError, match=rf"features: generate_set kind '{kind}' guides and needs features="):
            demo_data.generate_set(kind, 2, seed=0, eps_model=x0_eps, labeler=None)
    s = demo_data.generate_set("ddim", 2, seed=0, eps_model=x0_eps, labeler=None, steps=10)
    assert np.asarray(s.images).shape[0] == 2
