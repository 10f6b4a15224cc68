"""The bundled digits models: data split, shipped weights (weights_only), the UNet, and that
the ε-model's samples are digits the shipped classifier recognises."""
import math

import pytest
import torch

pytest.importorskip("sklearn")

from cdp_fast.ops.ddim import ddim_update_ref  # noqa: E402
from cdp_fast.models import digits  # noqa: E402
from cdp_fast.models.unet import UNet, timestep_embedding  # noqa: E402
from cdp_fast.diffusion.schedule import make_alphas_cumprod, timesteps  # noqa: E402


def test_data_split_fixed_and_disjoint():
    xa, ya = digits.load_digits_data("all")
    xtr, ytr = digits.load_digits_data("train")
    xte, yte = digits.load_digits_data("test")
    assert xa.shape == (1797, 1, 8, 8) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert len(xtr) == 1347 and len(xte) == 450
    assert float(xa.min()) == 0.0 and float(xa.max()) == 1.0
    # every image lands in exactly one split (compare as multisets of rows)
    rows = lambda x, y: sorted(map(tuple, torch.cat([x.flatten(1) * 16, y[:, None].float()], 1).tolist()))
    assert rows(torch.cat([xtr, xte]), torch.cat([ytr, yte])) == rows(xa, ya)
    # per-class stratification: every class has ~25% test images
    for c in range(10):
        n_c = int((ya == c).sum())
        assert int((yte == c).sum()) == round(0.25 * n_c)
    # deterministic
    x2, y2 = digits.load_digits_data("test")
    assert torch.equal(x2, xte) and torch.equal(y2, yte)
    with pytest.raises(ValueError, match="split"):
        digits.load_digits_data("valid")


def test_shipped_weights_load_weights_only():
    total = 0
    for name, build in ((digits.EPS_MODEL_FILE, digits.build_eps_model),
                        (digits.CLASSIFIER_FILE, digits.build_classifier)):
        path = digits.ASSETS / name
        total += path.stat().st_size
        state = torch.load(path, map_location="cpu", weights_only=True)
        ref = build().state_dict()
        assert set(state) == set(ref)
        for k, v in state.items():
            assert isinstance(v, torch.Tensor) and v.shape == ref[k].shape
            assert torch.isfinite(v.float()).all()
    assert total < 4 * 2**20, "shipped weights must stay a few MB"
    model = digits.load_digits_eps_model()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_classifier_accuracy_and_features():
    clf = digits.load_digits_classifier()
    x, y = digits.load_digits_data("test")
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    f = digits.digits_features()
    xm = digits.to_model_space(x[:5]).requires_grad_(True)
    z = f(xm)
    assert z.shape == (5, digits.DigitsClassifier.feature_dim)
    g = torch.autograd.grad(z.sum(), xm)[0]
    assert g.abs().sum() > 0  # differentiable w.r.t. x (no clamp inside)
    # f takes [-1, 1]: equal to the classifier's features of the [0, 1] image
    torch.testing.assert_close(f(digits.to_model_space(x[:5])), clf.features(x[:5]))
    lab = digits.digits_labeler()
    torch.testing.assert_close(lab(digits.to_model_space(x[:5])), clf(x[:5]))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 6)
    half = 3
    for i, tv in enumerate(t.tolist()):
        for j in range(half):
            f = math.exp(-math.log(10000.0) * j / half)
            assert emb[i, j].item() == pytest.approx(math.sin(tv * f), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_unet_shapes_and_validation():
    m = UNet(in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1)
    x = torch.randn(2, 3, 6, 10)
    assert m(x, torch.tensor([3, 500])).shape == x.shape
    assert m(x, torch.tensor(7)).shape == x.shape  # scalar t broadcast
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(2, 3, 7, 8), torch.tensor([1, 2]))


@pytest.mark.slow
def test_eps_model_samples_are_recognised():
    """64 unguided DDIM samples (η = 0, 50 uniform steps): the shipped classifier is > 80%
    confident on most of them, and they cover most classes (not a collapsed model). The
    shipped model's own check (256 samples) is in cdp_fast/assets/digits_models.json."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = digits.load_digits_eps_model()
    clf = digits.load_digits_classifier()
    abar = make_alphas_cumprod("linear", 1000)
    ts = timesteps(1000, 50, "uniform").tolist()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        for i, t in enumerate(ts):
            prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            eps = model(x, torch.full((64,), t, dtype=torch.long))
            x, _ = ddim_update_ref(x, eps, None, lam=0.0, abar_t=float(abar[t]), abar_prev=prev, sigma=0.0)
        p = torch.softmax(clf(digits.from_model_space(x)), 1)
    conf, pred = p.max(1)
    assert (conf > 0.8).float().mean().item() >= 0.75, conf
    assert len(set(pred.tolist())) >= 8
    # pixel statistics like the data: mostly near 0 or 1, few out-of-range values
    assert x.abs().max().item() < 1.5
