"""FID / KID / IS (cdp_fast.metrics.frechet): the closed form on two Gaussians, the libraries'
own results on the same features (torchmetrics; scipy's sqrtm as EDM's fid.py computes it),
streamed statistics equal to one-shot ones for any chunking, bounded memory, the missing-
weights error, and `cdp-fast inspect --fid`. The feature network is a small one built here
(no download), passed as ``extractor=``: the same code path Inception-v3 takes.

Tolerances: every statistic is accumulated in float64; streamed vs one-shot sums differ only in
summation order (rtol 1e-9 on O(1) values); FID vs closed forms differ by the eigen solvers'
round-off, ~1e-10 relative at d <= 32."""
import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_fast.cli import main
from cdp_fast.metrics import frechet as F
from cdp_fast.metrics import inception

#: torchmetrics (the [fid] extra) gives KID's estimator and the reference FID / KID / IS
needs_torchmetrics = pytest.mark.skipif(find_spec("torchmetrics") is None, reason="needs torchmetrics ([fid] extra)")


class SmallNet(torch.nn.Module):
    """A fixed random conv net: float (B, C, H, W) [0, 1] -> (features (B, 12), logits (B, 5))."""

    description = "test network"

    def __init__(self, c=3, logits=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(c, 12, 3)
        self.fc = torch.nn.Linear(12, 5)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.logits = logits

    def forward(self, x):
        f = torch.relu(self.conv(x.float())).mean((2, 3))
        return (f, self.fc(f)) if self.logits else f


def _images(n, seed, c=3, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 8, 8, c)) + shift, 0, 255).astype(np.uint8)


def _random_cov(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_form_commuting():
    """Diagonal covariances commute: FID = ‖Δμ‖² + Σ (√a − √b)², exactly."""
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    m1, m2 = rng.standard_normal(7), rng.standard_normal(7)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert F.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)


@needs_torchmetrics
@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_distance_equals_edm_sqrtm_and_torchmetrics(d):
    """General covariances: EDM's fid.py formula (scipy.linalg.sqrtm of Σ₁Σ₂) and torchmetrics'
    eigvals route give the same number."""
    from torchmetrics.image.fid import _compute_fid

    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s = scipy_linalg.sqrtm(s1 @ s2)
    s = s[0] if isinstance(s, tuple) else s
    edm = float(np.real(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * s)))
    tm = float(_compute_fid(*(torch.from_numpy(v) for v in (m1, s1, m2, s2))))
    got = F.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(edm, rel=1e-9, abs=1e-10)
    assert got == pytest.approx(tm, rel=1e-9, abs=1e-10)
    assert F.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)


@needs_torchmetrics
def test_fid_of_two_gaussian_feature_sets_matches_closed_form_and_torchmetrics():
    """Features drawn from two Gaussians, fed as 'images' through an identity extractor (the
    pipeline's own path): FID equals the closed form on the sample mean / covariance, which
    approaches the population closed form, and torchmetrics' FrechetInceptionDistance with the
    same identity network gives the same number."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    d, n = 4, 20000
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    m1, m2 = rng.standard_normal(d) * 0.1 + 0.5, rng.standard_normal(d) * 0.1 + 0.5
    x1 = rng.multivariate_normal(m1, s1, n) * 0.02 + 0.5      # kept inside [0, 1] as images
    x2 = rng.multivariate_normal(m2, s2, n) * 0.02 + 0.5
    assert x1.min() >= 0 and x1.max() <= 1 and x2.min() >= 0 and x2.max() <= 1
    as_img = (lambda x: torch.from_numpy(x).reshape(n, 1, 2, 2))
    ident = torch.nn.Flatten()
    x1, x2 = x1.astype(np.float32), x2.astype(np.float32)   # the pipeline reads images as float32
    got = F.fid(as_img(x1), as_img(x2), extractor=ident, batch_size=777, kid_subsets=2)["fid"]
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    emp = F.frechet_distance(x1.mean(0), np.cov(x1.T), x2.mean(0), np.cov(x2.T))
    assert got == pytest.approx(emp, rel=1e-9)
    pop = 0.02 ** 2 * F.frechet_distance(m1, s1, m2, s2)   # x = 0.02 z + 0.5: FID scales by 0.02²
    assert got == pytest.approx(pop, rel=0.05)
    tm = FrechetInceptionDistance(feature=torch.nn.Flatten(), input_img_size=(1, 2, 2))
    tm.update(as_img(x2).double(), real=True)
    tm.update(as_img(x1).double(), real=False)
    assert got == pytest.approx(float(tm.compute()), rel=1e-7)


@needs_torchmetrics
def test_kid_and_is_equal_torchmetrics_on_the_same_features():
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(3)
    fr, ff = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(250, 6, generator=g,
                                                                                 dtype=torch.float64) + 0.3
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=50)
    tm.update(fr, real=True)
    tm.update(ff, real=False)
    torch.manual_seed(11)
    want = [float(v) for v in tm.compute()]
    assert F.kernel_distance(fr, ff, subsets=7, subset_size=50, seed=11) == pytest.approx(want, rel=1e-12)
    logits = torch.randn(200, 5, generator=g, dtype=torch.float64) * 3
    st_ = F.FeatureStats(splits=1).update(ff[:200], logits)
    tis = InceptionScore(feature=torch.nn.Identity(), splits=1)
    tis.update(logits)
    assert st_.inception_score()[0] == pytest.approx(float(tis.compute()[0]), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 119), max_size=8), keep=st.integers(1, 40))
def test_streamed_statistics_equal_one_shot(cuts, keep):
    """Any chunking gives the one-shot mean / covariance (numpy), the same KID subset and the
    same IS sums."""
    rng = np.random.default_rng(5)
    f = rng.standard_normal((120, 5)) * 3 + 100          # a large mean: the shifted sums keep the digits
    lg = rng.standard_normal((120, 4))
    edges = [0] + sorted(set(cuts)) + [120]
    st_ = F.FeatureStats(keep=keep, splits=3)
    for lo, hi in zip(edges[:-1], edges[1:]):
        st_.update(f[lo:hi], lg[lo:hi])
    one = F.FeatureStats(keep=keep, splits=3).update(f, lg)
    np.testing.assert_allclose(st_.mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st_.sigma.numpy(), np.cov(f.T), rtol=1e-9, atol=1e-9)
    assert torch.equal(st_.kept(), one.kept())
    assert len(st_.kept()) == min(keep, 120)
    assert st_.inception_score() == pytest.approx(one.inception_score(), rel=1e-12)


def test_kid_subset_is_uniform_bottom_k():
    """The kept rows are the ones with the smallest hash keys: the same set for any order of
    arrival of chunks, and spread over the whole index range (not the first rows)."""
    st_ = F.FeatureStats(keep=100)
    for lo in range(0, 10000, 250):
        st_.update(np.arange(lo, lo + 250, dtype=np.float64)[:, None])
    idx = st_.kept()[:, 0].numpy().astype(np.int64)
    keys = F._row_keys(np.arange(10000), 0)
    assert set(idx) == set(np.argsort(keys)[:100])
    assert idx.max() > 5000


def test_memory_is_bounded_over_many_chunks():
    """The state's bytes do not grow with N: after 40 and after 2,000 chunks of 64 rows it is
    the same size, at most keep·d·4 (the KID rows) + d²·8 + small."""
    d, keep = 16, 128

    def state_bytes(s):
        return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else v.nbytes
                   for v in vars(s).values() if isinstance(v, (torch.Tensor, np.ndarray)))

    st_ = F.FeatureStats(keep=keep)
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(2000):
        st_.update(rng.standard_normal((64, d)), rng.standard_normal((64, 3)))
        if i in (39, 1999):
            sizes.append(state_bytes(st_))
    assert sizes[0] == sizes[1] <= keep * d * (4 + 8 + 8) + d * d * 8 + 3 * d * 8 + 10 * 3 * 8 + 1024
    assert st_.n == 128000


@needs_torchmetrics
def test_fid_api_reference_statistics_file_and_image_sets(tmp_path):
    """fid() against a saved statistics npz (EDM's mu / sigma keys) equals fid() against the
    image set itself; KID needs reference features (None against the file); IS from logits."""
    net = SmallNet()
    real, gen = _images(300, 0), _images(200, 1, shift=40)
    ref = F.feature_stats(real, net, batch_size=64)
    ref.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as z:
        assert set(z.files) == {"mu", "sigma", "n"} and z["sigma"].shape == (12, 12)
    a = F.fid(gen, real, extractor=net, batch_size=64, kid_subsets=5, kid_subset_size=100)
    b = F.fid(gen, str(tmp_path / "ref.npz"), extractor=net, batch_size=50)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-10) and a["fid"] > 0.0
    assert b["kid_mean"] is None and a["kid_mean"] is not None and a["is_mean"] > 1.0
    same = F.fid(real, real, extractor=net, kid_subsets=5, kid_subset_size=100)
    assert abs(same["fid"]) < 1e-9 and abs(same["kid_mean"]) < a["kid_mean"]
    with pytest.raises(ValueError, match="statistics of 12 features"):
        F.fid(gen, str(tmp_path / "ref.npz"), extractor=SmallNet(logits=False).conv)


def test_missing_weights_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="--fid-weights PATH") as e:
        inception.inception_v3()
    assert "\n" not in str(e.value) and inception.WEIGHTS_URL in str(e.value)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="CDP_FAST_FID_WEIGHTS: .*nope.pth is not a file"):
        F.fid(_images(4, 0), _images(4, 1))


class Payload:
    """Not a tensor: a weights file holding it needs a full unpickler."""


def test_pickled_weights_file_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "x": Payload()}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        inception.inception_v3(tmp_path / "w.pth")


def test_inception_wrapper_quantises_and_repeats_grey():
    """The wrapper hands torch-fidelity's network uint8 RGB: round(255·x), grey repeated."""
    seen = []
    w = inception.InceptionV3Features(lambda u: (seen.append(u) or (u.float().mean((2, 3)), u.float()[:, :, 0, 0])))
    x = torch.from_numpy(_images(3, 0, c=1)).permute(0, 3, 1, 2).float() / 255
    w(x)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (3, 3, 8, 8)
    assert torch.equal(seen[0][:, 1], (x[:, 0] * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        w(x * 2)


def _cli_sets(tmp_path):
    from cdp_fast.data import Samples

    Samples(_images(120, 0, c=1), np.arange(120) % 3).save_npz(tmp_path / "real.npz")
    Samples(_images(80, 1, c=1, shift=30), np.arange(80) % 3).save_npz(tmp_path / "gen.npz")


@needs_torchmetrics
def test_cli_inspect_fid(tmp_path, monkeypatch, capsys):
    """`cdp-fast inspect gen.npz --fid real.npz` prints FID / KID / IS beside the metrics and
    writes them to --json; the extractor is the test network (patched where Inception loads)."""
    _cli_sets(tmp_path)
    monkeypatch.setattr(inception, "inception_v3", lambda weights=None, device=None: SmallNet(c=1))
    rc = main(["inspect", str(tmp_path / "gen.npz"), "--real", str(tmp_path / "real.npz"), "--classifier", "none",
               "--fid", str(tmp_path / "real.npz"), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "samples: FID " in out and "KID " in out and "IS " in out
    rep = json.loads((tmp_path / "r.json").read_text())
    want = F.fid(str(tmp_path / "gen.npz"), str(tmp_path / "real.npz"), extractor=SmallNet(c=1))
    assert rep["fid"]["samples"]["fid"] == pytest.approx(want["fid"], rel=1e-10)
    assert rep["fid"]["samples"]["kid_mean"] == pytest.approx(want["kid_mean"], rel=1e-10)


def test_cli_inspect_fid_without_weights_exits_2_before_work(tmp_path, monkeypatch, capsys):
    _cli_sets(tmp_path)
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    rc = main(["inspect", str(tmp_path / "missing.npz"), "--fid", str(tmp_path / "real.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--fid-weights PATH" in err
