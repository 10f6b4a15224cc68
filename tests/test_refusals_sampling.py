"""Nothing silently wrong, sampling side: each finding of the round-3 adversarial probe
(``probe.md``; its id in the test name) is refused with a ValueError naming the argument before
any work or file write, or done right and warned about once. Tiny plain-callable networks keep
every test to a fraction of a second."""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch

import cdp_fast
from cdp_fast import SigmaDenoiser
from cdp_fast.diffusion.schedule import make_alphas_cumprod
from cdp_fast.sampling.fingerprints import fingerprint

SHAPE = (1, 4, 4)
KW = dict(image_shape=SHAPE, progress=False, compile=False)


def eps(x, t):
    return 0.1 * x


def eps_cond(x, t, y):
    return 0.1 * x + 0.01 * y.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class Net(torch.nn.Module):
    """A σ-space denoiser D(x, σ[, class_labels]) = x / (1 + σ²) (the exact one for x_0 ~ N(0, I))."""

    def forward(self, x, sigma, class_labels=None):
        return x / (1 + sigma.view(-1, *([1] * (x.dim() - 1))) ** 2)


class Bad(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x, sigma, class_labels=None):
        return {"first_row": lambda: x[:1] * 0.5, "chw": lambda: x[0] * 0.5, "scalar": lambda: x.sum()}[self.kind]()


W_LIN = torch.randn(16, 10, generator=torch.Generator().manual_seed(3))


def logits10(x):
    return x.flatten(1) @ W_LIN


# ----------------------------------------------------------------------------- R11 / R12
def _old_tensor_fp(obj):
    h = hashlib.sha256()
    h.update(str((tuple(obj.shape), str(obj.dtype))).encode())
    h.update(obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
             if obj.dtype != torch.bool else obj.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def test_R11_R12_fingerprint_sees_the_value_of_every_accepted_type():
    """R11/R12: a list or tuple was fingerprinted by its type name ('.list'), so a resume with
    other values was accepted. Every accepted type: a changed value changes the fingerprint, an
    equal value (a fresh copy) keeps it."""
    cases = {  # name: (value, an equal copy, a changed value)
        "list of ints": ([0, 1] * 4, [0, 1] * 4, [3, 4] * 4),
        "tuple of ints": ((0, 1, 2), (0, 1, 2), (0, 1, 3)),
        "list of floats": (make_alphas_cumprod("linear").tolist(), make_alphas_cumprod("linear").tolist(),
                           make_alphas_cumprod("cosine").tolist()),
        "range": (range(8), range(8), range(1, 9)),
        "nested list": ([[0, 1], [2, (3, 4)]], [[0, 1], [2, (3, 4)]], [[0, 1], [2, (3, 5)]]),
        "numpy scalars in a list": ([np.int64(1), np.int64(2)], [np.int64(1), np.int64(2)], [np.int64(1), np.int64(3)]),
        "numpy scalar": (np.float64(0.5), np.float64(0.5), np.float64(0.25)),
        "python scalar": (3, 3, 4),
        "dict": ({"a": [1, 2], "b": 3.0}, {"b": 3.0, "a": [1, 2]}, {"a": [1, 2], "b": 3.5}),
        "tensor": (torch.arange(8), torch.arange(8), torch.arange(1, 9)),
        "float64 tensor": (make_alphas_cumprod("linear"), make_alphas_cumprod("linear"), make_alphas_cumprod("cosine")),
        "ndarray": (np.arange(8), np.arange(8), np.arange(1, 9)),
        "list of tensors": ([torch.ones(2), torch.zeros(2)], [torch.ones(2), torch.zeros(2)],
                            [torch.ones(2), torch.ones(2)]),
        "object ndarray": (np.array([1, "a"], dtype=object), np.array([1, "a"], dtype=object),
                           np.array([2, "a"], dtype=object)),
    }
    for name, (value, same, other) in cases.items():
        assert fingerprint(value) == fingerprint(same), name
        assert fingerprint(value) != fingerprint(other), name
        assert "." != fingerprint(value)[:1] and not fingerprint(value).endswith("list"), name
    # equal values of another container or scalar type: the same value
    assert fingerprint([1, 2]) == fingerprint((1, 2)) == fingerprint([np.int64(1), np.int64(2)])
    # tensors and ndarrays keep the hashes manifests recorded before (old out dirs resume)
    t = make_alphas_cumprod("linear")
    assert fingerprint(t) == _old_tensor_fp(t)
    assert fingerprint(torch.tensor([True, False])) == _old_tensor_fp(torch.tensor([True, False]))
    a = np.arange(10, dtype=np.int64)
    assert fingerprint(a) == hashlib.sha256(a.tobytes()).hexdigest()[:16]


def test_R12_resume_refuses_a_changed_alphas_cumprod_list(tmp_path):
    out = tmp_path / "mix"
    kw = dict(loss=None, steps=10, skip="uniform", batch_size=4, shard_size=4, **KW)
    cdp_fast.sample(eps, 4, out=out, alphas_cumprod=make_alphas_cumprod("linear").tolist(), **kw)
    again = cdp_fast.sample(eps, 4, out=out, alphas_cumprod=make_alphas_cumprod("linear").tolist(), **kw)
    assert again.meta["complete"]
    with pytest.raises(ValueError, match="alphas_cumprod"):
        cdp_fast.sample(eps, 4, out=out, alphas_cumprod=make_alphas_cumprod("cosine").tolist(), **kw)


def test_R11_resume_refuses_changed_class_labels_list(tmp_path):
    out = tmp_path / "cls"
    kw = dict(loss=None, steps=5, batch_size=4, shard_size=4, num_classes=10, **KW)
    cdp_fast.sample(eps_cond, 4, out=out, class_labels=[0, 1] * 2, **kw)
    with pytest.raises(ValueError, match="class_labels"):
        cdp_fast.sample(eps_cond, 4, out=out, class_labels=[3, 4] * 2, **kw)


# ----------------------------------------------------------------------------- D14 / D15
@pytest.mark.parametrize("kind", ["first_row", "chw", "scalar"])
@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "ddim"])
def test_D14_D15_sigma_denoiser_of_the_wrong_shape_is_refused(kind, solver):
    """D14/D15: D of shape (1, C, H, W), (C, H, W) or () broadcast through ε = (x − D)/σ."""
    with pytest.raises(ValueError, match="SigmaDenoiser: the network Bad returned"):
        cdp_fast.sample(SigmaDenoiser(Bad(kind)), 4, loss=None, solver=solver, nfe=5 if solver == "heun" else 4,
                        batch_size=4, **KW)
    den = SigmaDenoiser(Bad(kind))
    with pytest.raises(ValueError, match="x̂_0 of x's shape"):
        den.eps_at_sigma(torch.zeros(4, *SHAPE), 1.0)


def test_D14_a_right_denoiser_still_runs():
    s = cdp_fast.sample(SigmaDenoiser(Net()), 4, loss=None, solver="heun", nfe=5, batch_size=4, output="float", **KW)
    assert np.isfinite(s.images).all() and len({im.tobytes() for im in s.images}) == 4


# ----------------------------------------------------------------------------- S4
@pytest.mark.parametrize("solver", ["ddim", "ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("skip", ["uniform", "quadratic"])
def test_S4_nfe_1_of_a_timestep_solver_is_refused(solver, skip, tmp_path):
    """S4: nfe=1 gave the single timestep t=0, and the output was x_T itself."""
    with pytest.raises(ValueError, match=r"nfe=1 .*single timestep t=0"):
        cdp_fast.sample(eps, 4, loss=None, solver=solver, nfe=1, skip=skip, batch_size=4, out=tmp_path / "o", **KW)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"steps=1 .*single timestep t=0"):
        cdp_fast.sample(eps, 4, loss=None, solver=solver, steps=1, skip=skip, batch_size=4, **KW)


def test_S4_nfe_2_uniform_warns_and_logsnr_nfe_1_runs():
    """nfe=2 with uniform spacing starts at t=500 (√ᾱ = 0.28 of the image left): warned, once."""
    with pytest.warns(UserWarning, match="starts at t=500") as rec:
        cdp_fast.sample(eps, 4, loss=None, solver="ddim", nfe=2, skip="uniform", batch_size=4, **KW)
    assert sum("starts at t=" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdp_fast.sample(eps, 4, loss=None, solver="dpmpp_2m", nfe=1, skip="logsnr", batch_size=4, **KW)
        cdp_fast.sample(eps, 4, loss=None, solver="ddim", nfe=2, skip="quadratic", batch_size=4, **KW)


# ----------------------------------------------------------------------------- W1–W3
@pytest.mark.parametrize("window", [(2000, 3000), (-10, -1), (801, 899)])
def test_W1_W3_guide_window_without_a_timestep_warns_once(window):
    """W1–W3: a window holding none of the sampled timesteps gave unguided output silently."""
    g = dict(loss="hnm", lam=1e4, tau=10.0, features="pixels", solver="dpmpp_2m",
             nfe=10, skip="uniform", batch_size=4, **KW)
    with pytest.warns(UserWarning, match="guide_window") as rec:
        cdp_fast.sample(eps, 4, guide_window=window, **g)
    assert sum("guide_window" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdp_fast.sample(eps, 4, guide_window=(800, 900), **g)       # holds t = 800 and 900


def test_W1_heun_window_outside_the_table_warns():
    with pytest.warns(UserWarning, match="guide_window"):
        cdp_fast.sample(eps, 4, loss="hnm", lam=1e4, tau=10.0, features="pixels", solver="heun", nfe=3, batch_size=4,
                        guide_window=(2000, 3000), **KW)


# ----------------------------------------------------------------------------- P3 / C40 / P4
def test_P3_C40_labeler_with_other_classes_than_num_classes_is_refused(tmp_path):
    """P3/C40: a 5-class labeler overwrote the 10-class conditioning."""
    with pytest.raises(ValueError, match=r"labeler returns logits over 5 classes but num_classes=10"):
        cdp_fast.sample(eps_cond, 4, loss=None, steps=5, num_classes=10, labeler=lambda x: logits10(x)[:, :5],
                        batch_size=4, out=tmp_path / "o", **KW)
    assert not (tmp_path / "o").exists()


def test_P4_one_class_labeler_is_refused():
    """P4: a (B, 1) labeler labelled everything 0 with confidence 1."""
    with pytest.raises(ValueError, match=r"labeler returns logits of shape \(B, 1\)"):
        cdp_fast.sample(eps, 4, loss=None, steps=5, labeler=lambda x: x.flatten(1)[:, :1], batch_size=4, **KW)


# ----------------------------------------------------------------------------- P1
def test_P1_probability_labeler_warns_and_is_not_softmaxed_twice():
    """P1: probabilities were softmaxed again (confidence squashed toward 1/K)."""
    kw = dict(loss=None, steps=5, batch_size=4, **KW)
    ref = cdp_fast.sample(eps, 4, labeler=logits10, **kw)
    with pytest.warns(UserWarning, match="labeler returns probabilities") as rec:
        got = cdp_fast.sample(eps, 4, labeler=lambda x: torch.softmax(logits10(x), 1), **kw)
    assert sum("probabilities" in str(w.message) for w in rec) == 1
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.confidence, ref.confidence, rtol=1e-5)


# ----------------------------------------------------------------------------- D17 / D16 / D20
def test_D17_one_hot_denoiser_without_num_classes_is_refused():
    """D17: the network never received class labels (a silently unconditional run)."""
    with pytest.raises(ValueError, match=r"one_hot_classes=10.*num_classes is None"):
        cdp_fast.sample(SigmaDenoiser(Net(), one_hot_classes=10), 4, loss=None, solver="heun", nfe=3, batch_size=4,
                        **KW)


def test_D16_one_hot_classes_below_num_classes_is_refused(tmp_path):
    """D16: F.one_hot failed mid-run ('Class values must be smaller than num_classes')."""
    with pytest.raises(ValueError, match=r"one_hot_classes=5.*num_classes=10"):
        cdp_fast.sample(SigmaDenoiser(Net(), one_hot_classes=5), 4, loss=None, solver="heun", nfe=3,
                        num_classes=10, batch_size=4, out=tmp_path / "o", **KW)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- D19 / H4 / H5 / C34 / C35 / D20
@pytest.mark.parametrize("labels,match", [
    ([12] * 4, r"class_labels must lie in \[0, num_classes\) = \[0, 10\)"),       # D19, H4, C34, D20
    ([-1] * 4, r"class_labels must lie in \[0, num_classes\)"),                    # H5, C35
    ([0.9, 1.9, 2.0, 3.0], "class_labels must be whole numbers"),
    ([[0], [1], [2], [3]], "class_labels must be class indices of shape"),
])
def test_D19_H4_H5_D20_class_labels_checked_against_num_classes(labels, match, tmp_path):
    """D19: labels ≥ num_classes were used and written; H4/H5/D20: negative or too large
    labels failed mid-run with a torch error."""
    with pytest.raises(ValueError, match=match):
        cdp_fast.sample(eps_cond, 4, loss=None, steps=5, num_classes=10, class_labels=labels, batch_size=4,
                        out=tmp_path / "o", **KW)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=match):
        cdp_fast.sample(SigmaDenoiser(Net(), one_hot_classes=10), 4, loss=None, solver="heun", nfe=3,
                        num_classes=10, class_labels=labels, batch_size=4, **KW)


def test_D19_good_class_labels_still_run():
    s = cdp_fast.sample(eps_cond, 4, loss=None, steps=5, num_classes=10, class_labels=np.array([0., 9., 3., 3.]),
                        batch_size=4, **KW)
    assert s.labels.tolist() == [0, 9, 3, 3]


# ----------------------------------------------------------------------------- A7, A6, S3, A9, A16, D6
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "ddpm"])
def test_A7_all_ones_table_is_refused(solver):
    """A7: an all-ones ᾱ table made ddim and dpmpp_2m return x_T."""
    with pytest.raises(ValueError, match=r"alphas_cumprod: ᾱ = 1 .*every entry is 1"):
        cdp_fast.sample(eps, 4, loss=None, solver=solver, steps=5, skip="uniform", alphas_cumprod=torch.ones(100),
                        batch_size=4, **KW)


def test_A6_ddpm_through_abar_1_names_the_table():
    """A6: ddpm on a table starting at ᾱ = 1 raised ZeroDivisionError mid-run."""
    table = make_alphas_cumprod("linear")
    table[0] = 1.0
    with pytest.raises(ValueError, match=r"alphas_cumprod: ᾱ = 1 at t=0.*solver='ddpm'"):
        cdp_fast.sample(eps, 4, loss=None, solver="ddpm", steps=10, skip="uniform", alphas_cumprod=table,
                        batch_size=4, **KW)
    cdp_fast.sample(eps, 4, loss=None, solver="ddim", steps=10, skip="uniform", alphas_cumprod=table,
                    batch_size=4, **KW)


def test_S3_heun_more_levels_than_table_entries_runs():
    """S3: Heun nfe=2001 failed with 'steps (1001) must be <= T', a limit Heun does not have."""
    s = cdp_fast.sample(eps, 1, loss=None, solver="heun", nfe=201, T=50, batch_size=1, output="float",
                        image_shape=(2,), progress=False, compile=False)
    assert s.meta["nfe"] == 201 and np.isfinite(s.images).all()


def test_A9_table_with_equal_first_entries_runs():
    """A9: equal first entries made sigma_to_t compute 0/0 (t = NaN), blamed on the model."""
    table = make_alphas_cumprod("linear")
    table[1] = table[0]

    def eps_t(x, t):          # uses t, as a real ε-model does: t = NaN would make it NaN
        return 0.1 * x * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / 1000)

    s = cdp_fast.sample(eps_t, 4, loss=None, solver="heun", nfe=5, alphas_cumprod=table, batch_size=4,
                        output="float", **KW)
    assert np.isfinite(s.images).all()


def test_A16_table_too_wide_for_karras_levels_names_the_table():
    """A16: ᾱ = 1e-300 failed with 'sigmas must be descending…' (sigmas were never passed)."""
    table = make_alphas_cumprod("linear")
    table[-1] = 1e-300
    with pytest.raises(ValueError, match=r"alphas_cumprod: solver='heun' cannot place"):
        cdp_fast.sample(eps, 4, loss=None, solver="heun", nfe=5, alphas_cumprod=table, batch_size=4, **KW)


@pytest.mark.parametrize("name", ["sigma_min", "sigma_max", "rho"])
def test_D6_sigma_denoiser_string_settings_name_the_argument(name):
    """D6: sigma_min='0.1' raised TypeError "'<' not supported…"."""
    with pytest.raises(ValueError, match=name):
        SigmaDenoiser(Net(), **{name: "0.1"})
    SigmaDenoiser(Net(), sigma_min=np.float64(0.01), sigma_max=80, rho=7)


def test_P8_numpy_labeler_is_named_as_numpy():
    """A labeler returning a numpy array of the right shape was told "shape (2, K) … got (2, 10)"."""
    from cdp_fast.models import digits

    lab = digits.digits_labeler()
    with pytest.raises(ValueError, match="torch.Tensor of logits.*ndarray"):
        cdp_fast.sample(digits.load_digits_eps_model(), 4, loss=None, steps=3, image_shape=(1, 8, 8), batch_size=4,
                        progress=False, labeler=lambda x: lab(x).detach().numpy())
